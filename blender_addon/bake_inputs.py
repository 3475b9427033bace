"""What an avatar layer's bake key is made of, read from Blender (hda_backend/bake_key.py does the
arithmetic): the avatar's identity and render settings, and one frame's evaluated bones, placement
and camera. Used when a layer is written (layers.py) and when layers are checked (farm.py), so both
read the same values the same way.
"""

from __future__ import annotations

import numpy as np

from ..hda_backend import bake_key
from ..hda_backend.errors import HDAError
from . import runtime
from .paths import file_sha256


def identity(obj, width: int, height: int) -> str:
    """The identity digest of the avatar ``obj`` rendered at width x height: its file's content or
    its seeds (the rule of runtime.signature), the body it names, its shading. Raises HDAError when
    its avatar file is missing."""
    h = obj.hda
    path = runtime.abspath(h.avatar_path.strip())
    if path:
        source = {"file": file_sha256(path, "avatar file")}
    else:
        mixed = h.identity_mix > 0 and h.seed_b != h.seed
        source = {"seed": h.seed, "seed_b": h.seed_b if mixed else None,
                  "mix": round(h.identity_mix, 6) if mixed else 0.0, "preset": h.uv_preset}
    return bake_key.identity_digest({**source, "body": h.body_path.strip(), "shading": runtime.shading(obj),
                                     "size": [int(width), int(height)]})


def frame_inputs(obj, depsgraph, camera, width: int, height: int) -> dict[str, np.ndarray]:
    """One frame's key inputs of ``obj`` as evaluated in ``depsgraph``, seen by ``camera`` at
    width x height (the render's pixel aspect). Raises HDAError without a camera."""
    if camera is None or camera.type != 'CAMERA':
        raise HDAError("scene camera: none is set, expected a camera object (Scene > Camera)")
    evaluated = obj.evaluated_get(depsgraph)
    bones = evaluated.pose.bones
    flat = np.empty(len(bones) * 16, dtype=np.float32)
    bones.foreach_get("matrix", flat)
    cam = camera.evaluated_get(depsgraph)
    render = depsgraph.scene_eval.render
    proj = cam.calc_matrix_camera(depsgraph, x=int(width), y=int(height),
                                  scale_x=render.pixel_aspect_x, scale_y=render.pixel_aspect_y)
    return bake_key.frame_inputs(flat.reshape(-1, 4, 4), np.array(evaluated.matrix_world),
                                 np.array(cam.matrix_world), np.array(proj))

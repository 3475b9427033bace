"""The avatars of the open file as the backend sees them: loaded UNets, poses read from the rig,
cameras, rendered frames. The caches themselves are session.caches (never saved).

Keys are :func:`objects.object_key` strings (object name + saved uid), never references to Blender
data: after undo or File > Open every ``bpy.types.ID`` may be a new Python object, while the key
still finds the right entry. A cache entry also remembers the *signature* of the properties it
was built from (avatar file and its modification time, seeds, body, preset, device), so editing a
property or replacing the avatar file is picked up without any update callback.

Everything here runs on the main thread, synchronously: handlers call it while Blender renders
(``blender -b -a`` runs no timers), so there is no worker thread to hand bpy data to.

Images are what Blender's compositor expects: linear (scene-referred) RGB premultiplied by alpha,
rows top to bottom (hda_backend.layer makes them from the rasterizer's display colours). The avatar's own colours are display (sRGB-encoded) values, the space its
training images were in: the capture studio renders under the Standard view transform, so
linearising them (the sRGB curve) gives back the scene-linear radiance the capture saw. The layer
is that radiance, and Blender's view transform maps it exactly as it maps the rest of the scene:
under Standard the person shows the backend's own colours, under AgX (Blender's default) it is
toned like a surface of the same radiance, i.e. darker and less saturated than the backend's
render, as every other object is (tests/test_blender_farm.py measures both).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from ..hda_backend.errors import HDAError
from ..hda_backend.layer import ALPHA_EMPTY, to_layer  # noqa: F401 - ALPHA_EMPTY: viewport.py reads runtime.ALPHA_EMPTY
from . import session
from .objects import object_key


# ------------------------------------------------------------------------------------------ avatars
def abspath(path: str) -> str:
    """An avatar or body path as stored ('//'-relative, '~') made absolute; '' stays ''."""
    import bpy

    return os.path.abspath(os.path.expanduser(bpy.path.abspath(path))) if path else ""


def body_file(obj) -> str | None:
    """The body file this avatar uses (absolute), or None for $HDA_SMPLX_PATH / the bundled body."""
    from .preferences import body_path as prefs_body_path

    return abspath(obj.hda.body_path.strip()) or prefs_body_path()


def signature(obj) -> tuple:
    """What the avatar's UNet is built from; a change means a new avatar."""
    h = obj.hda
    path = abspath(h.avatar_path.strip())
    stamp = None
    if path:
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = "missing"
    identity = (path, stamp) if path else (h.seed, h.seed_b if h.identity_mix > 0 else None,
                                           round(h.identity_mix, 6) if h.seed_b != h.seed else 0.0, h.uv_preset)
    return identity + (body_file(obj), h.device)


def get_body(path: str | None):
    """A body model, loaded once per session and file (path None: $HDA_SMPLX_PATH or the bundled body)."""
    from ..hda_backend.body import load_body, resolve_body_path

    resolved = str(resolve_body_path(path))
    bodies = session.caches.bodies
    if resolved not in bodies:
        bodies[resolved] = load_body(resolved)
    return bodies[resolved]


def get_layout(body):
    """The armature layout (rig.BoneLayout) of ``body``."""
    from ..hda_backend import rig

    layouts = session.caches.layouts
    if body.sha256 not in layouts:
        layouts[body.sha256] = rig.bone_layout(body)
    return layouts[body.sha256]


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise HDAError("avatar device 'cuda': this torch has no CUDA device, expected device 'cpu'")
    return torch.device(name)


def _seed_avatar(obj, body):
    """A consistently initialised avatar for the object's seed, blended in weight space towards the
    second seed by ``identity_mix`` (consistent initialisation keeps the weights aligned)."""
    import torch

    from ..hda_backend.avatar.model import Avatar
    from ..hda_backend.avatar.unet import AvatarUNet, init_unet
    from ..hda_backend.config import load_config

    h = obj.hda
    config = load_config(h.uv_preset)
    avatar = Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, seed=h.seed)
    if h.identity_mix > 0 and h.seed_b != h.seed:
        other = init_unet(AvatarUNet(config.unet), h.seed_b).state_dict()
        with torch.no_grad():
            for name, tensor in avatar.unet.state_dict().items():
                tensor.lerp_(other[name], float(h.identity_mix))
    return avatar


def get_avatar(obj):
    """The avatar of ``obj`` (an avatar armature): its file when ``avatar_path`` is set, else the
    consistent-init identity of its seed (Sample Identity writes a file from the diffusion model).
    Raises HDAError (one line) for a missing or corrupt file, a wrong body, a bad device."""
    import torch

    from ..hda_backend.avatar.io import load_avatar
    from ..hda_backend.avatar.realtime import RealtimeAvatar

    caches = session.caches
    key, sig = object_key(obj), signature(obj)
    cached = caches.avatars.get(key)
    if cached is not None and cached[0] == sig:
        return cached[1]
    caches.drop(key)
    device = _device(obj.hda.device)
    body = get_body(body_file(obj))
    path = abspath(obj.hda.avatar_path.strip())
    avatar = load_avatar(path, body) if path else _seed_avatar(obj, body)
    avatar = avatar.to(device).eval()
    # NHWC kernels: about 35% faster convolutions on the CPU (oneDNN), same values to 1e-9.
    avatar.unet.to(memory_format=torch.channels_last)
    caches.avatars[key] = (sig, avatar, RealtimeAvatar(avatar))
    caches.errors.pop(key, None)
    return avatar


def invalidate(obj) -> None:
    """Forget the avatar and frames of ``obj`` (its file changed in place, or it was removed)."""
    session.caches.drop(object_key(obj))


def clear() -> None:
    """Forget every loaded avatar and rendered frame (File > Open)."""
    session.caches.reset()


# ------------------------------------------------------------------------------------------- frames
def read_pose(obj, depsgraph, layout) -> tuple[np.ndarray, np.ndarray]:
    """SMPL-X (pose [165], transl [3]) of the *evaluated* armature (actions, drivers, constraints, IK)."""
    from ..hda_backend import rig

    evaluated = obj.evaluated_get(depsgraph)
    bones = evaluated.pose.bones
    flat = np.empty(len(bones) * 16, dtype=np.float32)
    bones.foreach_get("matrix", flat)
    index = {b.name: i for i, b in enumerate(bones)}
    missing = [n for n in layout.names if n not in index]
    if missing:
        raise HDAError(f"armature '{obj.name}': bone '{missing[0]}' is missing, expected the 55 SMPL-X bones")
    # foreach_get gives each 4x4 column by column.
    matrices = flat.reshape(-1, 4, 4).transpose(0, 2, 1)[[index[n] for n in layout.names]]
    return rig.pose_from_bone_matrices(matrices.astype(np.float64), layout)


def camera_matrices(obj, depsgraph, camera, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(viewmat [4,4], K [3,3]) of ``camera`` for the avatar ``obj`` (its body frame), at the render's
    pixel aspect; see rig.camera_from_blender."""
    from ..hda_backend import rig

    if camera is None or camera.type != 'CAMERA':
        raise HDAError("scene camera: none is set, expected a camera object (Scene > Camera)")
    if camera.data.type != 'PERSP':
        raise HDAError(f"camera '{camera.name}': type {camera.data.type}, expected a perspective camera")
    cam = camera.evaluated_get(depsgraph)
    render = depsgraph.scene_eval.render
    proj = cam.calc_matrix_camera(depsgraph, x=int(width), y=int(height),
                                  scale_x=render.pixel_aspect_x, scale_y=render.pixel_aspect_y)
    return rig.camera_from_blender(np.array(cam.matrix_world), np.array(proj), width, height,
                                   np.array(obj.evaluated_get(depsgraph).matrix_world))


def shading(obj) -> str:
    mode = obj.hda.shading
    if mode == "AUTO":
        return "flat" if obj.hda.avatar_path.strip() else "clay"
    return mode.lower()


def pose_gaussians(avatar, pose, transl):
    """The avatar's Gaussians at one SMPL-X pose [165] and translation [3] (arrays, any float type;
    run under torch.inference_mode by the caller) through the float32 reference path (exports).
    Returns one frame, no batch dimension."""
    import torch

    device = next(avatar.parameters()).device
    return avatar(torch.as_tensor(pose, dtype=torch.float32, device=device).reshape(1, -1),
                  torch.as_tensor(transl, dtype=torch.float32, device=device).reshape(1, 3)).index(0)


def fast_gaussians(obj, pose, transl):
    """:func:`pose_gaussians` through the avatar's fast path (hda_backend.avatar.realtime: bf16 UNet
    where the CPU runs it natively), for renders and the viewport."""
    get_avatar(obj)
    return session.caches.avatars[object_key(obj)][2](pose, transl)


def quantize(a) -> np.ndarray:
    """Inputs rounded to 1e-6 (radians, metres, pixels), float32. Rendering from the rounded values
    makes the cache key describe the render exactly: the same pose read from another depsgraph or
    process (float noise from re-evaluating the same keyframes) gives bit-identical pixels."""
    return np.round(np.asarray(a, dtype=np.float64), 6).astype(np.float32)


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


def render_pose(obj, pose, transl, viewmat, K, width: int, height: int):
    """Render the avatar of ``obj`` at an SMPL-X pose through an OpenCV camera (no bpy evaluation).

    pose [165], transl [3] (body frame); viewmat [4,4] (body frame -> camera), K [3,3]. Returns
    (rgba [H,W,4] float16 linear premultiplied, depth [H,W] float32 camera z, layer.DEPTH_FAR where empty);
    both read-only and shared with the frame cache. Colour is half precision because the layer file
    stores it so (exr.layer_channels): nothing is lost, and a cached frame costs 12 bytes a pixel, not 20.
    The RGBA is a view of channel planes [4,H,W] (``to_layer(planar=True)``), the layout the layer file
    needs, so writing it copies nothing first.
    """
    import torch

    from ..hda_backend.render.frames import render_gaussians
    from .preferences import frame_cache_bytes

    caches = session.caches
    key = object_key(obj)
    avatar = get_avatar(obj)
    mode = shading(obj)
    pose, transl, viewmat, K = (quantize(a) for a in (pose, transl, viewmat, K))
    frame_key = (key, caches.avatars[key][0], _digest(pose, transl), _digest(viewmat, K), int(width), int(height), mode)
    budget = frame_cache_bytes()
    hit = caches.frames.get(frame_key) if budget else None
    if hit is not None:
        caches.frames.move_to_end(frame_key)
        caches.stats["hits"] += 1
        return hit
    caches.stats["misses"] += 1
    device = next(avatar.parameters()).device
    t0 = time.perf_counter()
    with torch.inference_mode():
        g = fast_gaussians(obj, pose, transl)
        t1 = time.perf_counter()
        # SH bands above the avatar's degree are zero: evaluating them adds exact zeros.
        out, alpha = render_gaussians(g, torch.as_tensor(viewmat, device=device), torch.as_tensor(K, device=device),
                                      int(width), int(height), shading=mode, render_mode="RGB+ED",
                                      sh_degree=avatar.gaussian_config.sh_degree)
        out, alpha = out.cpu().numpy(), alpha[..., 0].cpu().numpy()
    t2 = time.perf_counter()
    rgba, depth = to_layer(out[..., :3], alpha, out[..., 3], dtype=np.float16, planar=True)  # the layer file's layout
    t3 = time.perf_counter()
    caches.timings[key] = {"avatar": 1e3 * (t1 - t0), "raster": 1e3 * (t2 - t1), "glue": 1e3 * (t3 - t2)}
    caches.add_frame(frame_key, rgba, depth, budget)
    return rgba, depth


def render_avatar(obj, depsgraph, camera, width: int, height: int):
    """Render the avatar ``obj`` as posed in ``depsgraph`` through ``camera`` at width x height pixels.

    Returns (rgba [H,W,4] float16 linear premultiplied, depth [H,W] float32 camera z in scene units,
    layer.DEPTH_FAR where empty), read-only and cached by (avatar, pose, camera, resolution). Raises
    HDAError for bad input (missing file, no camera, a broken rig).
    """
    key = object_key(obj)
    t0 = time.perf_counter()
    layout = get_layout(get_avatar(obj).body)
    pose, transl = read_pose(obj, depsgraph, layout)
    viewmat, K = camera_matrices(obj, depsgraph, camera, width, height)
    t1 = time.perf_counter()
    caches = session.caches
    misses = caches.stats["misses"]
    result = render_pose(obj, pose, transl, viewmat, K, width, height)
    if caches.stats["misses"] != misses:
        caches.timings[key]["pose"] = 1e3 * (t1 - t0)
    return result

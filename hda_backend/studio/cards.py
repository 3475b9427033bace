"""Subject cards: what the studio's people look like, one tile per subject of a dataset seed.

Each subject of ``hda synth --seed S`` is planned exactly as the dataset plans it (same attributes and
geometry), but posed in one walking step facing the camera and filmed by two cameras at eye height,
front three-quarter and back three-quarter, plus a close-up of the head from the front camera's side,
so faces, hair, garments and shoes are all in view. Rendered
by the same Blender subprocess and materials as the dataset; tiles are cropped to the person and
labelled with the subject's index and its main attributes.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import replacing, write_text
from ..body import load_body
from .person import sample_clip, subject_seed
from .synth import NUM_BETAS, _scene_spec, _write_npz, camera_names, frame_names, plan_subject, run_blender

CARD_POSE = ("walk", 0.05)  # clip and phase: mid-stride, arms near the body
CARD_RIG = (0.5, (1.55,))  # first camera 0.5 rad left of the subject's front, both at 1.55 m
HEAD_FIELD = 0.3  # metres across the close-up of the head


def _add_head_camera(plan: dict, size: int) -> None:
    """A third camera: the face from the front camera's side, HEAD_FIELD metres across."""
    import torch

    from ..body import JOINT_INDEX as J
    from ..render.camera import look_at

    head = plan["joints"][0, J["head"]].astype(np.float64) + [0.0, 0.06, 0.0]
    az = CARD_RIG[0]
    eye = head + 0.8 * np.array([math.sin(az), 0.08, math.cos(az)])
    view = look_at(torch.tensor(eye), torch.tensor(head), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).numpy()
    focal = size * 0.8 / HEAD_FIELD
    K = np.array([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])
    plan["viewmats"] = np.concatenate([plan["viewmats"], view[None]])
    plan["Ks"] = np.concatenate([plan["Ks"], K[None]])


def label(attrs: dict, index: int) -> str:
    top, bottom, hair = attrs["top"], attrs["bottom"], attrs["hair"]
    return (f"{index:02d} {attrs['age']}y {hair['style']} / {top['pattern']['kind']} {top['fabric']} {top['kind']}"
            f" / {bottom['kind']} / {attrs['shoes']['kind']}")


def render_cards(seed: int, count: int, size: int, out: Path, samples: int = 16, columns: int = 8) -> Path:
    """A PNG of ``count`` subjects of dataset seed ``seed``: per subject, front and back views side by side."""
    from ..images import contact_sheet

    body = load_body(None, NUM_BETAS)
    poses, transl = sample_clip(CARD_POSE[0], 1, CARD_POSE[1])
    tiles, labels = [], []
    with tempfile.TemporaryDirectory(prefix="hda_cards_") as tmp:
        for i in range(count):
            plan = plan_subject(body, subject_seed(seed, i), 2, 1, size, samples, (1.0, 1.0, 1.0),
                                motion=(poses, transl), rig=CARD_RIG)
            _add_head_camera(plan, size)
            out_dir = Path(tmp) / f"subject_{i:03d}"
            work = out_dir / "_work"
            work.mkdir(parents=True)
            spec, arrays = _scene_spec(plan, out_dir, [(0, 0), (1, 0), (2, 0)])
            _write_npz(work / "scene.npz", **arrays)
            write_text(work / "scene.json", json.dumps(spec))
            run_blender(work, 3, lambda n: None)
            front, back, head = (np.asarray(Image.open(out_dir / "images" / cam / f"{frame_names(1)[0]}.png").convert("RGB"))
                                 for cam in camera_names(3))
            half = size // 4  # the person stays within the middle half of the frame's width
            column = np.full((size, 2 * half, 3), 255, np.uint8)
            column[: 2 * half] = np.asarray(Image.fromarray(head).resize((2 * half, 2 * half), Image.Resampling.LANCZOS))
            tiles.append(np.concatenate([v[:, size // 2 - half: size // 2 + half] for v in (front, back)] + [column], axis=1))
            labels.append(label(plan["attrs"], i))
            shutil.rmtree(out_dir)
    sheet = contact_sheet(tiles, columns=min(columns, count), labels=[x.split(" / ")[0] for x in labels])
    # a 256-colour palette keeps the sheet small enough to commit; the people are flat-lit cloth and skin
    image = sheet.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with replacing(out) as tmp_png:
        image.save(tmp_png, format="PNG", optimize=True)
    write_text(out.with_suffix(".txt"), "\n".join(labels) + "\n")
    return out

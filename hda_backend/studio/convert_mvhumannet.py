"""Convert one MVHumanNet-style multi-view capture into the dataset format of :mod:`hda_backend.dataset`.

Expected source layout (MVHumanNet's folder structure; file names as in its release)::

    SOURCE/images/<camera>/<frame>[_img].jpg|png       colour images (any size, the same for all cameras)
    SOURCE/fmask/<camera>/<frame>[_img][_fmask].png    person masks (grey or alpha; >0 = person)
    SOURCE/camera_intrinsics.json    {"intrinsics": {<camera>: K 3x3}} or {<camera>: K 3x3};
                                     a camera entry may also be {"K": ..., "width": w, "height": h}: the
                                     resolution K belongs to, K is then rescaled to the image size
    SOURCE/camera_extrinsics.json    {<camera> or "<n>_<camera>.<ext>": {"rotation": R 3x3 world->camera,
                                     "translation": t (3) | "camera_pos": camera centre C (3), t = -R C}}
    SOURCE/smplx/smpl/<frame>.json   per-frame SMPL-X fit: global_orient, body_pose (63), betas, transl,
                                     optional jaw_pose, leye_pose, reye_pose, left/right_hand_pose (45,
                                     full axis-angle; PCA hand poses are refused)  (smplx/*.json and
                                     smplx_params/*.json are searched too)

Frames are matched across images, masks and fits by their number. The world frame stays the fits' own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..body.skeleton import POSE_PARTS
from ..dataset import read_json
from ..errors import HDAError
from ..images import save_png
from ..atomic import write_text
from .synth import FORMAT, FORMAT_VERSION, _write_npz

IMAGE_EXT = (".jpg", ".jpeg", ".png")


def _frame_key(stem: str) -> str:
    stem = re.sub(r"(_img)?(_fmask)?$", "", stem)
    return str(int(stem)) if stem.isdigit() else stem


def _camera_key(name: str) -> str:
    name = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXT else name
    return re.sub(r"^\d+_", "", name)


def _array(path, where, value, shape):
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise HDAError(f"{path}: {where} is not numeric, expected {list(shape)}") from None
    if a.size != int(np.prod(shape)):
        raise HDAError(f"{path}: {where} has {a.size} values, expected {int(np.prod(shape))}")
    a = a.reshape(shape)
    if not np.isfinite(a).all():
        raise HDAError(f"{path}: {where} contains NaN or inf")
    return a


def _files(folder: Path, what: str) -> dict:
    if not folder.is_dir():
        raise HDAError(f"{folder}: folder is missing, expected {what} per camera (MVHumanNet layout)")
    out = {}
    for cam in sorted(p for p in folder.iterdir() if p.is_dir()):
        out[cam.name] = {_frame_key(f.stem): f for f in sorted(cam.iterdir()) if f.suffix.lower() in IMAGE_EXT}
    if not out:
        raise HDAError(f"{folder}: no camera folders, expected {what} per camera")
    return out


def _fits(source: Path) -> dict:
    for sub in ("smplx/smpl", "smplx", "smplx_params", "smplx/smplx_params"):
        folder = source / sub
        if folder.is_dir():
            files = {_frame_key(f.stem): f for f in sorted(folder.glob("*.json"))}
            if files:
                return files
    raise HDAError(f"{source / 'smplx' / 'smpl'}: no per-frame SMPL-X fits (*.json), expected one per frame")


def _read_fit(path: Path):
    data = read_json(path, "MVHumanNet layout")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        raise HDAError(f"{path}: expected an object of SMPL-X parameters")
    out = {}
    for key, s in POSE_PARTS.items():
        size = (s.stop - s.start) * 3
        if key not in data:
            if key in ("global_orient", "body_pose"):
                raise HDAError(f"{path}: field '{key}' is missing, expected {size} values")
            out[key] = np.zeros(size)
            continue
        try:
            a = np.asarray(data[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise HDAError(f"{path}: field '{key}' is not numeric, expected {size} numbers") from None
        if key.endswith("hand_pose") and a.size != size:
            raise HDAError(f"{path}: field '{key}' has {a.size} values, expected {size} (full axis-angle, not PCA)")
        out[key] = _array(path, f"field '{key}'", a, (size,))
    for key in ("transl", "betas"):
        if key not in data:
            raise HDAError(f"{path}: field '{key}' is missing")
    out["transl"] = _array(path, "field 'transl'", data["transl"], (3,))
    try:
        betas = np.asarray(data["betas"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise HDAError(f"{path}: field 'betas' is not numeric, expected a list of numbers") from None
    out["betas"] = _array(path, "field 'betas'", betas, (betas.size,))
    return out


def _camera_tables(source: Path):
    """(intrinsics, extrinsics, their paths) keyed by camera name, from the capture's two JSON files."""
    intr_path, extr_path = source / "camera_intrinsics.json", source / "camera_extrinsics.json"
    intr = read_json(intr_path, "MVHumanNet layout")
    intr = intr.get("intrinsics", intr) if isinstance(intr, dict) else intr
    extr = read_json(extr_path, "MVHumanNet layout")
    if not isinstance(intr, dict) or not isinstance(extr, dict):
        raise HDAError(f"{source}: camera files must hold objects keyed by camera name")
    return ({_camera_key(k): v for k, v in intr.items()}, {_camera_key(k): v for k, v in extr.items()},
            intr_path, extr_path)


def _check_coverage(source: Path, cams, keys, images, masks, intr, extr, fits, intr_path, extr_path,
                    test_frames: int) -> None:
    """Every camera has images, masks and calibration; every frame a fit, an image and a mask per camera."""
    for cam in cams:
        for what, table, path in (("images", images, source / "images"), ("masks", masks, source / "fmask"),
                                  ("intrinsics", intr, intr_path), ("extrinsics", extr, extr_path)):
            if cam not in table:
                raise HDAError(f"{path}: camera '{cam}' is missing ({what})")
    for key in keys:
        if key not in fits:
            raise HDAError(f"{source / 'smplx'}: no fit for frame {key}")
        for cam in cams:
            if key not in images[cam]:
                raise HDAError(f"{source / 'images' / cam}: frame {key} is missing, expected an image per fitted frame")
            if key not in masks[cam]:
                raise HDAError(f"{source / 'fmask' / cam}: frame {key} is missing, expected a mask per image")
    if not keys:
        raise HDAError(f"{source}: no frames to convert")
    if test_frames >= len(keys):
        raise HDAError(f"--test-frames {test_frames}: expected fewer than the {len(keys)} frames")


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise HDAError(f"{path}: not a readable image ({exc})") from None


def _calibration(cam: str, intr_entry, extr_entry, w: int, h: int, scale: float, intr_path: Path,
                 extr_path: Path) -> dict:
    """One camera in the dataset's cameras.json form: K scaled to the image size, world-to-camera R, t."""
    k_src = intr_entry.get("K", intr_entry) if isinstance(intr_entry, dict) else intr_entry
    K = _array(intr_path, f"camera '{cam}' K", k_src, (3, 3))
    if isinstance(intr_entry, dict) and "width" in intr_entry and "height" in intr_entry:
        K[0] *= w / float(intr_entry["width"])
        K[1] *= h / float(intr_entry["height"])
    e = extr_entry
    if not isinstance(e, dict) or "rotation" not in e:
        raise HDAError(f"{extr_path}: camera '{cam}' field 'rotation' is missing")
    R = _array(extr_path, f"camera '{cam}' field 'rotation'", e["rotation"], (3, 3))
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-3) or np.linalg.det(R) < 0:
        raise HDAError(f"{extr_path}: camera '{cam}' field 'rotation' is not a rotation matrix")
    if "translation" in e:
        t = _array(extr_path, f"camera '{cam}' field 'translation'", e["translation"], (3,)) * scale
    elif "camera_pos" in e:
        t = -R @ (_array(extr_path, f"camera '{cam}' field 'camera_pos'", e["camera_pos"], (3,)) * scale)
    else:
        raise HDAError(f"{extr_path}: camera '{cam}' needs 'translation' or 'camera_pos'")
    return {"K": K.tolist(), "R": R.tolist(), "t": t.tolist(), "width": w, "height": h}


def composite_view(rgb: np.ndarray, m: np.ndarray, background) -> tuple[np.ndarray, np.ndarray]:
    """rgb [H,W,3] and mask [H,W] in [0,1] -> (the image over ``background``, the mask); a two-level mask
    (any non-zero value = person) is made binary first."""
    if m.max() > 0 and np.unique(m).size <= 2:
        m = (m > 0).astype(np.float64)
    return rgb * m[..., None] + np.asarray(background, np.float64) * (1 - m[..., None]), m


def _convert_view(source: Path, cam: str, key: str, image: Path, mask: Path, size, background):
    """(composite image, mask) of one camera and frame, read and checked."""
    try:
        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB"), np.float64) / 255.0
        with Image.open(mask) as im:
            m = np.asarray(im.convert("RGBA") if im.mode in ("LA", "RGBA") else im.convert("L"), np.float64)
    except (OSError, ValueError, SyntaxError) as exc:
        raise HDAError(f"{source}: camera '{cam}' frame {key}: not a readable image or mask ({exc})") from None
    m = (m[..., 3] if m.ndim == 3 else m) / 255.0
    if rgb.shape[:2] != (size[1], size[0]) or m.shape != (size[1], size[0]):
        raise HDAError(f"{mask}: size differs from {image}, expected {size[0]}x{size[1]}")
    return composite_view(rgb, m, background)


def _subject_record(out: Path, source: Path, size, background, cams, names, test_frames: int, test_every: int) -> dict:
    n_train = len(names) - test_frames
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": out.name, "seed": 0,
        "width": size[0], "height": size[1], "background": [float(x) for x in background],
        "cameras": list(cams), "frames": names, "train_frames": list(range(n_train)),
        "test_frames": list(range(n_train, len(names))),
        "test_cameras": list(range(test_every - 1, len(cams), test_every)) if test_every and len(cams) > 1 else [],
        "attributes": {"source": str(source), "layout": "mvhumannet"},
    }


def convert_mvhumannet(source, out, frames=None, cameras=None, test_every: int = 4, test_frames: int = 0,
                       scale: float = 1.0, background=(0.0, 0.0, 0.0)) -> Path:
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise HDAError(f"{source}: capture folder not found")
    images = _files(source / "images", "colour images")
    masks = _files(source / "fmask", "masks")
    intr, extr, intr_path, extr_path = _camera_tables(source)
    fits = _fits(source)
    cams = cameras or sorted(images)
    keys = [_frame_key(f) for f in frames] if frames else sorted(fits, key=lambda k: (len(k), k))
    _check_coverage(source, cams, keys, images, masks, intr, extr, fits, intr_path, extr_path, test_frames)

    size = None
    cam_json, names = {}, [f"{int(k):06d}" if k.isdigit() else k for k in keys]
    for cam in cams:
        first = images[cam][keys[0]]
        w, h = _image_size(first)
        if size is None:
            size = (w, h)
        elif (w, h) != size:
            raise HDAError(f"{first}: image is {w}x{h}, expected {size[0]}x{size[1]} like the other cameras")
        cam_json[cam] = _calibration(cam, intr[cam], extr[cam], w, h, scale, intr_path, extr_path)

    out.mkdir(parents=True, exist_ok=True)
    for key, name in zip(keys, names):
        fit = _read_fit(fits[key])
        _write_npz(out / "smplx" / f"{name}.npz", **{k: v.astype(np.float32) for k, v in fit.items()})
        for cam in cams:
            composite, m = _convert_view(source, cam, key, images[cam][key], masks[cam][key], size, background)
            save_png(out / "images" / cam / f"{name}.png", composite)
            save_png(out / "masks" / cam / f"{name}.png", (np.clip(m, 0, 1) * 255 + 0.5).astype(np.uint8))
    write_text(out / "cameras.json", json.dumps(cam_json, indent=1))
    write_text(out / "subject.json", json.dumps(_subject_record(out, source, size, background, cams, names,
                                                                test_frames, test_every), indent=1))
    return out

"""Multi-view capture datasets: the format ``hda synth`` writes and real captures are converted into.

A dataset is a folder of subject folders. A subject folder holds::

    subject.json                  format, name, seed, width, height, background, cameras, frames,
                                  train_frames, test_frames, test_cameras, attributes
    cameras.json                  {camera name: {K 3x3, R 3x3, t 3, width, height}}, OpenCV, world->camera
    images/<camera>/<frame>.png   RGB over the background colour (RGBA is composited over it on load)
    masks/<camera>/<frame>.png    8-bit grey, 255 = person (soft edges = coverage)
    smplx/<frame>.npz             betas, global_orient, body_pose (63), jaw_pose, leye_pose, reye_pose,
                                  left_hand_pose, right_hand_pose (45 each, full axis-angle, no PCA,
                                  flat hand mean), transl
    subject.png                   a contact sheet (not read)

:func:`load_subject` validates all of it and raises :class:`HDAError` with one line naming the file, the
field and the expected value. The loader imports neither bpy nor anything from the studio.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .body.skeleton import NUM_JOINTS, POSE_PARTS
from .devices import map_tensors
from .errors import HDAError

FORMAT = "hda-capture"
FORMAT_VERSION = 1
SMPLX_FIELDS = {name: (s.stop - s.start) * 3 for name, s in POSE_PARTS.items()}  # global_orient: 3, ...


@dataclass
class Subject:
    root: Path
    name: str
    seed: int
    attributes: dict
    background: tuple
    camera_names: list
    width: int
    height: int
    viewmats: torch.Tensor   # [C,4,4] world->camera, OpenCV
    Ks: torch.Tensor         # [C,3,3]
    frame_names: list
    train_frames: list
    test_frames: list
    test_cameras: list
    poses: torch.Tensor      # [F,55,3]
    transl: torch.Tensor     # [F,3]
    betas: torch.Tensor      # [nb]
    device: torch.device = torch.device("cpu")  # where image() and mask() put the decoded pixels

    def to(self, device: str | torch.device) -> "Subject":
        """The same subject with its cameras and poses on ``device``, and its images decoded onto it."""
        return dataclasses.replace(map_tensors(self, lambda t: t.to(device)), device=torch.device(device))

    @property
    def num_cameras(self) -> int:
        return len(self.camera_names)

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)

    @property
    def train_cameras(self) -> list:
        return [c for c in range(self.num_cameras) if c not in set(self.test_cameras)]

    def image_path(self, cam: int, frame: int) -> Path:
        return self.root / "images" / self.camera_names[cam] / f"{self.frame_names[frame]}.png"

    def mask_path(self, cam: int, frame: int) -> Path:
        return self.root / "masks" / self.camera_names[cam] / f"{self.frame_names[frame]}.png"

    def _check_index(self, cam: int, frame: int) -> None:
        if not 0 <= cam < self.num_cameras:
            raise HDAError(f"{self.root}: camera index {cam}, expected 0..{self.num_cameras - 1}")
        if not 0 <= frame < self.num_frames:
            raise HDAError(f"{self.root}: frame index {frame}, expected 0..{self.num_frames - 1}")

    def image(self, cam: int, frame: int) -> torch.Tensor:
        """[H,W,3] float32 in [0,1], RGB over the background colour."""
        self._check_index(cam, frame)
        path = self.image_path(cam, frame)
        a = _read_png(path, (self.width, self.height))
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        if a.shape[2] == 4:
            alpha = a[..., 3:4]
            a = a[..., :3] * alpha + np.asarray(self.background, np.float32) * (1 - alpha)
        return torch.from_numpy(np.ascontiguousarray(a[..., :3], dtype=np.float32)).to(self.device)

    def mask(self, cam: int, frame: int) -> torch.Tensor:
        """[H,W] float32 in [0,1]."""
        self._check_index(cam, frame)
        path = self.mask_path(cam, frame)
        a = _read_png(path, (self.width, self.height))
        if a.ndim == 3:
            a = a[..., 3] if a.shape[2] in (2, 4) else a[..., 0]
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)


def _read_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise HDAError(f"{path}: file is missing")
    try:
        with Image.open(path) as im:
            if im.size != size:
                raise HDAError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]} like cameras.json")
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                return np.asarray(im, np.float32) / 65535.0
            mode = {"1": "L", "P": "RGBA", "LA": "RGBA", "I": "L"}.get(im.mode, im.mode)
            if mode not in ("L", "RGB", "RGBA"):
                mode = "RGB"
            a = np.asarray(im.convert(mode), np.float32) / 255.0
    except HDAError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise HDAError(f"{path}: not a readable image ({exc})") from None
    return a


def read_json(path: Path, layout: str = "") -> object:
    """A JSON file, or a one-line HDAError naming it (``layout`` says which layout expects it)."""
    if not path.is_file():
        raise HDAError(f"{path}: file is missing" + (f" ({layout})" if layout else ""))
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HDAError(f"{path}: not valid JSON ({exc})") from None


def _field(source: Path, data: dict, key: str, kind, check=None, expected: str = ""):
    if not isinstance(data, dict) or key not in data:
        raise HDAError(f"{source}: field '{key}' is missing")
    value = data[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise HDAError(f"{source}: field '{key}' is {value!r}, expected a whole number")
    if kind is list and not isinstance(value, list):
        raise HDAError(f"{source}: field '{key}' is {type(value).__name__}, expected a list")
    if kind is dict and not isinstance(value, dict):
        raise HDAError(f"{source}: field '{key}' is {type(value).__name__}, expected an object")
    if kind is str and not isinstance(value, str):
        raise HDAError(f"{source}: field '{key}' is {value!r}, expected a string")
    if check is not None and not check(value):
        raise HDAError(f"{source}: field '{key}' is {value!r}, expected {expected}")
    return value


def _matrix(source: Path, data: dict, key: str, shape: tuple) -> np.ndarray:
    value = _field(source, data, key, list)
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise HDAError(f"{source}: field '{key}' is not numeric, expected a {'x'.join(map(str, shape))} array") from None
    if a.size == int(np.prod(shape)) and a.shape != shape:
        a = a.reshape(shape)
    if a.shape != shape:
        raise HDAError(f"{source}: field '{key}' has shape {list(a.shape)}, expected {list(shape)}")
    if not np.isfinite(a).all():
        raise HDAError(f"{source}: field '{key}' contains NaN or inf")
    return a


def _index_list(source: Path, data: dict, key: str, count: int, what: str) -> list:
    values = _field(source, data, key, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < count for v in values):
        raise HDAError(f"{source}: field '{key}' is {values!r}, expected {what} indices in 0..{count - 1}")
    if len(set(values)) != len(values):
        raise HDAError(f"{source}: field '{key}' repeats an index, expected each {what} once")
    return list(values)


def load_cameras(path: Path, names: list, width: int, height: int):
    """viewmats [C,4,4] and Ks [C,3,3] of the named cameras from cameras.json."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise HDAError(f"{path}: expected an object of cameras by name")
    views, Ks = [], []
    for name in names:
        if name not in data:
            raise HDAError(f"{path}: camera '{name}' is missing, expected every camera of subject.json")
        cam = data[name]
        where = f"{path}: camera '{name}'"
        K = _matrix(Path(where), cam, "K", (3, 3))
        R = _matrix(Path(where), cam, "R", (3, 3))
        t = _matrix(Path(where), cam, "t", (3,))
        if abs(K[2, 2] - 1) > 1e-6 or abs(K[2, 0]) + abs(K[2, 1]) + abs(K[1, 0]) > 1e-6 or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise HDAError(f"{where}: field 'K' is {K.tolist()}, expected [[fx,s,cx],[0,fy,cy],[0,0,1]] with fx, fy > 0")
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
            raise HDAError(f"{where}: field 'R' is not a rotation matrix, expected R R^T = I and det R = +1")
        for key, expected in (("width", width), ("height", height)):
            value = _field(Path(where), cam, key, int)
            if value != expected:
                raise HDAError(f"{where}: field '{key}' is {value}, expected {expected} like subject.json")
        view = np.eye(4)
        view[:3, :3], view[:3, 3] = R, t
        views.append(view)
        Ks.append(K)
    return torch.tensor(np.stack(views), dtype=torch.float32), torch.tensor(np.stack(Ks), dtype=torch.float32)


def load_smplx_frame(path: Path):
    """(pose [55,3], transl [3], betas [nb]) from one smplx/<frame>.npz."""
    if not path.is_file():
        raise HDAError(f"{path}: file is missing")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise HDAError(f"{path}: not a readable .npz file ({exc})") from None
    pose = np.zeros((NUM_JOINTS, 3))

    def get(key, size):
        if key not in arrays:
            raise HDAError(f"{path}: field '{key}' is missing, expected {size} values")
        a = arrays[key]
        if a.dtype.kind not in "fiu":
            raise HDAError(f"{path}: field '{key}' has dtype {a.dtype}, expected numbers")
        if size is not None and a.size != size:
            raise HDAError(f"{path}: field '{key}' has {a.size} values, expected {size}")
        a = a.astype(np.float64).reshape(-1)
        if not np.isfinite(a).all():
            raise HDAError(f"{path}: field '{key}' contains NaN or inf")
        return a

    for key, s in POSE_PARTS.items():
        pose[s] = get(key, SMPLX_FIELDS[key]).reshape(-1, 3)
    transl = get("transl", 3)
    betas = get("betas", None)
    if not 1 <= betas.size <= 300:
        raise HDAError(f"{path}: field 'betas' has {betas.size} values, expected 1..300")
    return pose, transl, betas


def load_subject(path) -> Subject:
    """Read and validate one subject folder (see the module docstring for the layout)."""
    root = Path(path)
    if not root.is_dir():
        raise HDAError(f"{root}: subject folder not found")
    meta_path = root / "subject.json"
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise HDAError(f"{meta_path}: expected a JSON object")
    _field(meta_path, meta, "format", str, lambda v: v == FORMAT, repr(FORMAT))
    _field(meta_path, meta, "format_version", int, lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION))
    name = _field(meta_path, meta, "name", str)
    seed = _field(meta_path, meta, "seed", int)
    width = _field(meta_path, meta, "width", int, lambda v: 1 <= v <= 16384, "1..16384")
    height = _field(meta_path, meta, "height", int, lambda v: 1 <= v <= 16384, "1..16384")
    background = _field(meta_path, meta, "background", list,
                        lambda v: len(v) == 3 and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v),
                        "three numbers in [0,1]")
    names_ok = lambda v: v and all(isinstance(x, str) and x and "/" not in x for x in v) and len(set(v)) == len(v)  # noqa: E731
    cameras = _field(meta_path, meta, "cameras", list, names_ok, "a non-empty list of distinct names")
    frames = _field(meta_path, meta, "frames", list, names_ok, "a non-empty list of distinct names")
    train = _index_list(meta_path, meta, "train_frames", len(frames), "frame")
    test = _index_list(meta_path, meta, "test_frames", len(frames), "frame")
    if set(train) & set(test):
        raise HDAError(f"{meta_path}: fields 'train_frames' and 'test_frames' share frames "
                       f"{sorted(set(train) & set(test))}, expected them disjoint")
    if not train:
        raise HDAError(f"{meta_path}: field 'train_frames' is empty, expected at least one frame")
    test_cams = _index_list(meta_path, meta, "test_cameras", len(cameras), "camera")
    attributes = meta.get("attributes", {})
    if not isinstance(attributes, dict):
        raise HDAError(f"{meta_path}: field 'attributes' is {type(attributes).__name__}, expected an object")

    viewmats, Ks = load_cameras(root / "cameras.json", cameras, width, height)

    poses, transls, betas0 = [], [], None
    for frame in frames:
        pose, transl, betas = load_smplx_frame(root / "smplx" / f"{frame}.npz")
        if betas0 is None:
            betas0 = betas
        elif betas.size != betas0.size:
            raise HDAError(f"{root / 'smplx' / (frame + '.npz')}: field 'betas' has {betas.size} values, "
                           f"expected {betas0.size} like frame {frames[0]}")
        poses.append(pose)
        transls.append(transl)

    for folder in ("images", "masks"):
        for cam in cameras:
            for frame in frames:
                file = root / folder / cam / f"{frame}.png"
                if not file.is_file():
                    raise HDAError(f"{file}: file is missing ({folder} needs one PNG per camera and frame)")
    # Header check (size) of every image and mask; pixels are decoded on access.
    for folder in ("images", "masks"):
        for cam in cameras:
            for frame in frames:
                file = root / folder / cam / f"{frame}.png"
                try:
                    with Image.open(file) as im:
                        size = im.size
                except (OSError, ValueError, SyntaxError) as exc:
                    raise HDAError(f"{file}: not a readable image ({exc})") from None
                if size != (width, height):
                    raise HDAError(f"{file}: image is {size[0]}x{size[1]}, expected {width}x{height} like subject.json")

    return Subject(
        root=root, name=name, seed=seed, attributes=attributes, background=tuple(float(x) for x in background),
        camera_names=list(cameras), width=width, height=height, viewmats=viewmats, Ks=Ks,
        frame_names=list(frames), train_frames=train, test_frames=test, test_cameras=test_cams,
        poses=torch.tensor(np.stack(poses), dtype=torch.float32),
        transl=torch.tensor(np.stack(transls), dtype=torch.float32),
        betas=torch.tensor(betas0, dtype=torch.float32),
    )


def list_subjects(dataset_dir) -> list[Path]:
    """The subject folders (those holding subject.json) of a dataset folder, sorted by name."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise HDAError(f"{root}: dataset folder not found")
    if (root / "subject.json").is_file():
        return [root]
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and (p / "subject.json").is_file())
    if not subjects:
        raise HDAError(f"{root}: no subject folders, expected folders holding subject.json")
    return subjects


def project(points: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates [C,N,2] of world points [N,3] (pixel centres at +0.5, OpenCV)."""
    cam = torch.einsum("cij,nj->cni", viewmats[:, :3, :3], points) + viewmats[:, None, :3, 3]
    uv = torch.einsum("cij,cnj->cni", Ks, cam)
    return uv[..., :2] / uv[..., 2:3]


__all__ = ["Subject", "list_subjects", "load_subject", "load_cameras", "load_smplx_frame", "project"]

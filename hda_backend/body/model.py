"""Loading and validating SMPL-X-format body files (`.npz`, never pickle).

A body file holds the arrays of the SMPL-X model file: v_template, f, J_regressor, weights,
kintree_table, shapedirs, posedirs (optional), vt and ft. The bundled open body and the licensed
SMPL-X neutral model share this format, so everything downstream works with either.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..devices import map_tensors
from ..errors import HDAError
from .skeleton import NUM_JOINTS, PARENTS

BUNDLED_BODY = Path(__file__).parent / "assets" / "hda_body.npz"
ENV_VAR = "HDA_SMPLX_PATH"
_SMPLX_SHAPE_SPACE = 300  # SMPL-X stores 300 shape then 100 expression components in one shapedirs array

_HOW_TO_FIX = (
    f"point body.path in your config or the {ENV_VAR} environment variable at SMPLX_NEUTRAL.npz "
    "(from smplx.is.tue.mpg.de), or unset both to use the bundled open body"
)


@dataclass(frozen=True)
class BodyModel:
    """Arrays of an SMPL-X-format body as float32/long tensors (loaded on the CPU; see :meth:`apply`).

    v_template [V,3] rest T-pose in metres (Y up, facing +Z); faces [F,3]; vt [T,2] and ft [F,3] the UV
    atlas (ft in the same face order as faces); J_regressor [55,V]; weights [V,55]; parents [55] (root -1);
    shapedirs [V,3,B]; posedirs [P,V*3] or None (no pose correctives).
    """

    v_template: torch.Tensor
    faces: torch.Tensor
    vt: torch.Tensor
    ft: torch.Tensor
    J_regressor: torch.Tensor
    weights: torch.Tensor
    parents: torch.Tensor
    shapedirs: torch.Tensor
    posedirs: torch.Tensor | None
    body_id: str
    sha256: str
    path: str

    def apply(self, fn) -> "BodyModel":
        """The same body with ``fn`` applied to every array (``Avatar.to`` moves its body this way, with
        nn.Module._apply's tensor function)."""
        return map_tensors(self, fn)

    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_betas(self) -> int:
        return self.shapedirs.shape[-1]

    def rest_joints(self) -> torch.Tensor:
        """[55,3] joint positions of the mean shape in the rest pose (computed once: posing the mean
        shape and the per-frame global transform need them)."""
        return self._rest_joints

    @functools.cached_property
    def _rest_joints(self) -> torch.Tensor:
        # A normal tensor even when first asked for under inference_mode: autograd may use it later.
        with torch.inference_mode(False), torch.no_grad():
            return self.J_regressor @ self.v_template


def resolve_body_path(config_path: str | os.PathLike | None = None) -> Path:
    """The body file to use: the config key, else $HDA_SMPLX_PATH, else the bundled open body.

    A directory is searched for SMPLX_NEUTRAL.npz (directly or in a `smplx/` subfolder), the layout of
    the SMPL-X download.
    """
    chosen = config_path or os.environ.get(ENV_VAR) or BUNDLED_BODY
    path = Path(chosen).expanduser()
    if path.is_dir():
        for candidate in (path / "SMPLX_NEUTRAL.npz", path / "smplx" / "SMPLX_NEUTRAL.npz"):
            if candidate.is_file():
                return candidate
        raise HDAError(f"body model folder {path} has no SMPLX_NEUTRAL.npz; {_HOW_TO_FIX}")
    return path


def load_body(path: str | os.PathLike | None = None, num_betas: int = 10) -> BodyModel:
    """Load and validate a body file. ``path=None`` resolves as :func:`resolve_body_path`.

    num_betas: shape components kept (clipped to what the file has; SMPL-X's expression components
    are never used, HDA poses the mean template with psi = 0).
    """
    path = resolve_body_path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise HDAError(f"body model {path}: pickle files are not loaded; use the .npz version of the model")
    if not path.is_file():
        raise HDAError(f"body model file not found: {path}; {_HOW_TO_FIX}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files if key in _FIELDS or key in _META}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise HDAError(f"body model {path}: not a readable .npz file ({exc}); {_HOW_TO_FIX}") from None
    return _from_arrays(arrays, str(path), num_betas)


_FIELDS = ("v_template", "f", "J_regressor", "weights", "kintree_table", "shapedirs", "posedirs", "vt", "ft")
_META = ("body_id",)


def _from_arrays(arrays: dict, source: str, num_betas: int) -> BodyModel:
    def field(name, ndim=None, dtype_kind="f"):
        if name not in arrays:
            raise HDAError(f"body model {source}: field '{name}' is missing; {_HOW_TO_FIX}")
        a = arrays[name]
        if ndim is not None and a.ndim != ndim:
            raise HDAError(f"body model {source}: field '{name}' has shape {a.shape}, expected {ndim} dimensions")
        if a.dtype.kind not in ("f", "i", "u"):
            raise HDAError(f"body model {source}: field '{name}' has dtype {a.dtype}, expected numbers")
        if dtype_kind == "f" and not np.isfinite(a).all():
            raise HDAError(f"body model {source}: field '{name}' contains NaN or inf")
        return a

    def expect(name, a, shape):
        if tuple(a.shape) != tuple(shape):
            raise HDAError(f"body model {source}: field '{name}' has shape {tuple(a.shape)}, expected {tuple(shape)}")

    v = field("v_template", 2)
    if v.shape[1] != 3 or v.shape[0] < 4:
        raise HDAError(f"body model {source}: field 'v_template' has shape {v.shape}, expected (V, 3)")
    n_v = v.shape[0]
    f = field("f", 2, "i")
    if f.shape[1] != 3:
        raise HDAError(f"body model {source}: field 'f' has shape {f.shape}, expected (F, 3)")
    if f.min() < 0 or f.max() >= n_v:
        raise HDAError(f"body model {source}: field 'f' indexes vertex {int(f.max())}, expected indices in [0, {n_v})")
    vt = field("vt", 2)
    if vt.shape[1] != 2:
        raise HDAError(f"body model {source}: field 'vt' has shape {vt.shape}, expected (T, 2)")
    ft = field("ft", 2, "i")
    expect("ft", ft, f.shape)
    if ft.min() < 0 or ft.max() >= vt.shape[0]:
        raise HDAError(f"body model {source}: field 'ft' indexes vt row {int(ft.max())}, expected [0, {vt.shape[0]})")
    jreg = field("J_regressor", 2)
    expect("J_regressor", jreg, (NUM_JOINTS, n_v))
    w = field("weights", 2)
    expect("weights", w, (n_v, NUM_JOINTS))
    if (w < -1e-6).any() or not np.allclose(w.sum(1), 1.0, atol=1e-3):
        raise HDAError(f"body model {source}: field 'weights' rows must be non-negative and sum to 1")
    kin = field("kintree_table", 2, "i")
    expect("kintree_table", kin, (2, NUM_JOINTS))
    # SMPL-X files store the root's parent as -1 or as uint32 max; both mean "no parent".
    parents = kin[0].astype(np.int64)
    parents[0] = -1
    if tuple(parents.tolist()) != PARENTS:
        raise HDAError(f"body model {source}: field 'kintree_table' is not the SMPL-X 55-joint tree, "
                       f"expected parents {list(PARENTS)}")
    sd = field("shapedirs", 3)
    if sd.shape[:2] != (n_v, 3):
        raise HDAError(f"body model {source}: field 'shapedirs' has shape {sd.shape}, expected ({n_v}, 3, B)")
    shape_space = min(sd.shape[2], _SMPLX_SHAPE_SPACE)
    sd = sd[:, :, : min(num_betas, shape_space)]
    posedirs = None
    if "posedirs" in arrays:
        pd = field("posedirs", 3)
        expect("posedirs", pd, (n_v, 3, (NUM_JOINTS - 1) * 9))
        if np.abs(pd).max() > 0:
            posedirs = torch.from_numpy(np.ascontiguousarray(pd.reshape(-1, pd.shape[-1]).T, dtype=np.float32))

    body_id = str(arrays["body_id"]) if "body_id" in arrays else Path(source).stem
    as_f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return BodyModel(
        v_template=as_f32(v), faces=as_long(f), vt=as_f32(vt), ft=as_long(ft), J_regressor=as_f32(jreg),
        weights=as_f32(w), parents=torch.tensor(PARENTS, dtype=torch.long), shapedirs=as_f32(sd),
        posedirs=posedirs, body_id=body_id, sha256=_fingerprint(v, f, vt, ft, w, jreg), path=source,
    )


def _fingerprint(*arrays: np.ndarray) -> str:
    """Hash of the arrays that define the template and its UV space, independent of file packing."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float64 if a.dtype.kind == "f" else np.int64)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()

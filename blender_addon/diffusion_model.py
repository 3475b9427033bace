"""The diffusion model Sample Identity draws from, and its session cache (session.models).

The model: the operator's ``model`` path, else ``$HDA_DIFFUSION_MODEL``, else the model the extension
bundles (:data:`DEFAULT_MODEL`, ``assets/default/diffusion.safetensors`` in the extension).
"""

from __future__ import annotations

import os

from ..hda_backend.errors import HDAError
from . import session
from .paths import EXT_ROOT, file_sha256

DEFAULT_MODEL = os.path.join("assets", "default", "diffusion.safetensors")
ENV_MODEL = "HDA_DIFFUSION_MODEL"


def model_path(override: str = "") -> str | None:
    """The diffusion model to sample from (see the module docstring), or None when there is none."""
    import bpy

    for candidate in (override.strip(), os.environ.get(ENV_MODEL, "").strip()):
        if candidate:
            return os.path.abspath(bpy.path.abspath(candidate))
    bundled = os.path.join(EXT_ROOT, DEFAULT_MODEL)
    return bundled if os.path.isfile(bundled) else None


def missing_model_text() -> str:
    return (f"No diffusion model: the extension's default model ({DEFAULT_MODEL}) is missing from this "
            f"install; point ${ENV_MODEL} (or the operator's Model) at a model from 'hda train-diffusion'")


def load_model(path: str, device: str = "cpu"):
    """A DiffusionModel on ``device`` (the avatar's device setting), loaded once per session, file version
    and device."""
    from ..hda_backend.devices import resolve_device
    from ..hda_backend.diffusion.sample import load_diffusion

    try:
        st = os.stat(path)
    except OSError:
        raise HDAError(f"diffusion model file not found: {path}") from None
    where = resolve_device(device, log=lambda line: None, name="avatar device")
    stamp = (st.st_mtime_ns, st.st_size, str(where))
    loaded = session.models.loaded
    cached = loaded.get(path)
    if cached is None or cached[0] != stamp:
        loaded[path] = (stamp, load_diffusion(path).to(where))
    return loaded[path][1]


def model_digest(path: str) -> str:
    """sha256 (hex) of the model file, once per session and file version: what sampled identity files
    are addressed by (identity.py)."""
    return file_sha256(path, "diffusion model file")

"""Gallery renders of avatar files kept on disk between runs (``hda eval-gen --gallery-cache DIR``).

Comparing models means running ``eval-gen`` again and again against the same reference and training
fits, and rendering their galleries is most of what each run costs once there are hundreds of them
(0.40-0.66 s an avatar at the default gallery on 2 cores: 1.7-2.8 minutes for 256 fits, every run). The
cache keeps each avatar's gallery in ``DIR/<key>.safetensors`` (images float32 [V,H,W,3], alpha
[V,H,W], with parts labels int8 [V,H,W]), where the key is the SHA-256 of:

- the avatar file's bytes (so an edited or refitted avatar renders again; a moved one does not) and
  the body's fingerprint (``BodyModel.sha256``; another body makes the avatar load, and fail, again);
- the gallery views (poses, cameras, intrinsics, size, background, device) and the rasterizer backend;
- whether part labels are rendered;
- :func:`code_fingerprint`: every Python source of ``hda_backend`` and the torch and numpy versions,
  so a change to any code that could change a pixel renders again.

A cached gallery is therefore used only where rendering would give the same tensors (tested bit for bit),
never a stale image. An entry that does not read back as its key's (truncated, another format) is
rendered again and replaced; entries are written atomically. Nothing is evicted: an entry is about
3.3 MB at the default gallery (12 views at 128²); delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_save_safetensors
from ..avatar.io import load_avatar
from ..body import BodyModel
from ..errors import HDAError
from .gallery import Gallery, GalleryViews, render_avatar, render_avatar_parts, render_gallery

CACHE_FORMAT = "hda-gallery-cache"
CACHE_FORMAT_VERSION = 1
ENTRY_SUFFIX = ".safetensors"


def sources_digest(root: str | os.PathLike) -> str:
    """SHA-256 over every Python source under ``root``: relative path and bytes, in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """:func:`sources_digest` of ``hda_backend`` with the torch and numpy versions: what decides a
    render's pixels besides its inputs (computed once a process)."""
    package = sources_digest(Path(__file__).resolve().parents[1])
    return hashlib.sha256(f"{package} torch {torch.__version__} numpy {np.__version__}".encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype} {tuple(t.shape)}".encode() + b"\0" + t.numpy().tobytes()


def render_key(avatar_bytes: bytes, body: BodyModel, views: GalleryViews, backend: str, parts: bool) -> str:
    """The cache key of one avatar file's gallery (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(f"{CACHE_FORMAT} {CACHE_FORMAT_VERSION} body {body.sha256}\0".encode())
    digest.update(hashlib.sha256(avatar_bytes).digest())
    for t in (views.poses, views.viewmats, views.Ks, views.background):
        digest.update(_tensor_bytes(t))
    digest.update(f"size {views.size} device {views.device} backend {backend} parts {bool(parts)}\0".encode())
    digest.update(code_fingerprint().encode())
    return digest.hexdigest()


class GalleryCache:
    """Gallery renders of avatar files in ``folder`` (created on first write). ``hits`` / ``misses``
    count this object's lookups."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise HDAError(f"--gallery-cache {self.folder}: not a folder")
        self.hits = 0
        self.misses = 0
        self._writable = True

    def _read(self, entry: Path, key: str, views: GalleryViews, parts: bool):
        """The entry's (images, alpha, labels) if it is ``key``'s, complete and of the views' shapes, else None."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(entry), framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                    return None
                want = {"images", "alpha"} | ({"labels"} if parts else set())
                if names != want:
                    return None
                images, alpha = f.get_tensor("images"), f.get_tensor("alpha")
                labels = f.get_tensor("labels") if parts else None
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        v, s = views.num_views, views.size
        if (images.dtype != torch.float32 or tuple(images.shape) != (v, s, s, 3) or alpha.dtype != torch.float32
                or tuple(alpha.shape) != (v, s, s)
                or (parts and (labels.dtype != torch.int8 or tuple(labels.shape) != (v, s, s)))):
            return None
        return images, alpha, labels

    def gallery(self, path: str | os.PathLike, body: BodyModel, views: GalleryViews, backend: str = "auto",
                parts: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One avatar file's gallery as :func:`.gallery.render_avatar_parts` (``parts``) or
        :func:`.gallery.render_avatar` returns it (labels None), from the cache or rendered and kept."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise HDAError(f"{path}: cannot read the avatar file ({exc.strerror or exc})") from None
        key = render_key(data, body, views, backend, parts)
        entry = self.folder / (key + ENTRY_SUFFIX)
        cached = self._read(entry, key, views, parts) if entry.is_file() else None
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        avatar = load_avatar(path, body, data)  # the bytes the key was made of, read once
        if parts:
            images, alpha, labels = render_avatar_parts(avatar, views, backend)
        else:
            (images, alpha), labels = render_avatar(avatar, views, backend), None
        if self._writable:
            tensors = {"images": images, "alpha": alpha, **({"labels": labels} if parts else {})}
            try:
                atomic_save_safetensors(tensors, entry, {"format": CACHE_FORMAT, "key": key, "avatar": path.name})
            except OSError as exc:  # a full disk or a read-only folder costs the speed-up, not the evaluation
                self._writable = False
                warnings.warn(f"gallery cache {self.folder}: not written ({exc.strerror or exc}); "
                              "rendering without it", stacklevel=2)
        return images, alpha, labels


def render_files(paths: Iterable[str | os.PathLike], body: BodyModel, views: GalleryViews,
                 backend: str = "auto", parts: bool = False, cache: GalleryCache | None = None,
                 progress: bool = False, desc: str = "gallery") -> Gallery:
    """The gallery of every avatar file (as :func:`.gallery.render_gallery` of the loaded avatars),
    each from ``cache`` where it holds it."""
    paths = list(paths)
    if cache is None:  # one avatar loaded at a time: avatars hold their UV buffers
        return render_gallery((load_avatar(p, body) for p in paths), views, backend, progress, desc,
                              total=len(paths), parts=parts)
    if not paths:
        raise HDAError("gallery: no avatars to render")
    images, alphas, labels = [], [], []
    for path in tqdm(paths, desc=desc, unit="avatar", disable=not progress):
        rgb, alpha, label = cache.gallery(path, body, views, backend, parts)
        images.append(rgb)
        alphas.append(alpha)
        labels.append(label)
    return Gallery(torch.stack(images), torch.stack(alphas), torch.stack(labels) if parts else None)

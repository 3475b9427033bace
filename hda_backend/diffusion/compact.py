"""Half-precision copies of diffusion models and avatars for shipping, kept half only where nothing changes.

A model's tensors fall into two groups: the denoiser (``model.*``) and the normaliser's statistics
(``normalizer.*``: the mean avatar and the per-coordinate spread). Each group is tried in float16 in turn
and kept there only if avatars sampled from the half copy render like those of the float32 model: the
worst PSNR between the two renders of the same seed, over every gallery view, must stay at or above
``min_psnr_db`` (default 50 dB, far above the ~26 dB that separates two different people in
``hda eval-gen``). The loaders upcast to float32, so a half file is read like any other.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_save_safetensors
from ..avatar.io import SUFFIX, load_avatar, read_avatar_file
from ..body import BodyModel
from ..errors import HDAError
from .gallery import GalleryConfig, gallery_views, mse_matrix, psnr_distance, render_gallery
from .model_io import load_diffusion, read_model_file
from .sample import sample_vectors
from .weights import write_avatar

GROUPS = {"denoiser": "model.", "normalizer": "normalizer."}


@dataclass(frozen=True)
class CompactConfig:
    seeds: tuple = (0, 1, 2, 3, 4, 5, 6, 7)  # identities compared between the float32 and half models
    min_psnr_db: float = 50.0  # worst render PSNR (any seed, any view) for a group to stay in float16
    gallery: GalleryConfig = field(default_factory=lambda: GalleryConfig(size=128))

    def to_dict(self) -> dict:
        return asdict(self)


def half_tensors(tensors: dict, groups: tuple[str, ...]) -> dict:
    """tensors: name -> tensor; the float tensors of the named groups (see :data:`GROUPS`) cast to float16."""
    prefixes = tuple(GROUPS[g] for g in groups)
    return {k: v.half() if v.is_floating_point() and k.startswith(prefixes) else v for k, v in tensors.items()}


def _render_psnr(path_a: Path, path_b: Path, body: BodyModel, views) -> float:
    """Worst PSNR (dB) over the gallery views between the renders of two avatar files."""
    images = render_gallery((load_avatar(p, body) for p in (path_a, path_b)), views).images
    return min(-float(psnr_distance(mse_matrix(images[:1, v:v + 1], images[1:, v:v + 1]))[0, 0])
               for v in range(images.shape[1]))


def compact_model(src, dst, body: BodyModel, config: CompactConfig = CompactConfig()) -> dict:
    """Write ``dst``: the model ``src`` with each tensor group in float16 where that is lossless (see the
    module docstring). Returns {"half": kept groups, "trials": [{"groups", "worst_psnr_db"}], "bytes"}."""
    src, dst = Path(src), Path(dst)
    reference = load_diffusion(src)
    metadata, tensors = read_model_file(src)
    views = gallery_views(body, config.gallery)
    want = sample_vectors(reference, list(config.seeds))
    kept: tuple[str, ...] = ()
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for group in GROUPS:
            trial = kept + (group,)
            candidate = tmp / "candidate.safetensors"
            atomic_save_safetensors(half_tensors(tensors, trial), candidate, metadata)
            got = sample_vectors(load_diffusion(candidate), list(config.seeds))
            worst = min(_render_psnr(*[write_avatar(v[i], reference.spec, reference.meta, tmp / f"{tag}{SUFFIX}")
                                       for tag, v in (("a", want), ("b", got))], body, views)
                        for i in range(len(config.seeds)))
            trials.append({"groups": list(trial), "worst_psnr_db": round(worst, 2)})
            if worst >= config.min_psnr_db:
                kept = trial
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(half_tensors(tensors, kept), dst, {**metadata, "half": json.dumps(list(kept))})
    return {"half": list(kept), "trials": trials, "bytes": dst.stat().st_size, "config": config.to_dict()}


def compact_avatar(src, dst, body: BodyModel, config: CompactConfig = CompactConfig()) -> dict:
    """Write ``dst``: the avatar ``src`` in float16 if its renders keep ``min_psnr_db``, else as it is.
    Returns {"half": bool, "worst_psnr_db", "bytes"}."""
    src, dst = Path(src), Path(dst)
    if not dst.name.endswith(SUFFIX):
        raise HDAError(f"avatar {dst}: expected a file name ending in {SUFFIX}")
    metadata, tensors = read_avatar_file(src)
    views = gallery_views(body, config.gallery)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / f"half{SUFFIX}"
        halved = {k: v.half() for k, v in tensors.items()}
        atomic_save_safetensors(halved, candidate, metadata)
        worst = _render_psnr(src, candidate, body, views)
        half = worst >= config.min_psnr_db
        atomic_save_safetensors(halved if half else tensors, dst, metadata)
    return {"half": half, "worst_psnr_db": round(worst, 2), "bytes": dst.stat().st_size}

"""A fixed gallery of renders per avatar, and the image distances the generation metrics use.

Every avatar is rendered in the same few poses from the same few cameras over one background, so two
avatars are compared pixel for pixel (paper §5.1: D(X, Y) between renders of generated and reference
avatars). Poses come from the built-in clips (:mod:`hda_backend.motion`); cameras ring the posed body
at one height, framed so that every gallery pose fits.

Distances between two avatars X, Y with gallery images x, y [V,H,W,3]:
- PSNR distance: D = -PSNR(x, y) = 10·log10(MSE), MSE pooled over all V views, pixels and channels
  (MSE floored at 1e-10, so identical renders are at -100). Pooling the MSE (not averaging per-view
  PSNRs) keeps D a monotone function of the Euclidean distance between the galleries.
- RMS distance: sqrt(MSE), the non-negative version for novelty ratios.
- LPIPS distance: 1000 × the mean over views of LPIPS-AlexNet (the paper's scale), when the ``lpips``
  package imports and AlexNet weights are on disk (:func:`hda_backend.fit.losses.load_lpips`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from ..avatar.model import Avatar
from ..body import BodyModel, pose_body
from ..body.parts import PARTS, parts_of_weights
from ..errors import HDAError
from ..motion import BUILTIN, pose_at
from ..render import rasterize
from ..render.camera import intrinsics, look_at
from ..render.frames import render_gaussians
from .image_stats import PERSON_ALPHA

CLIP_FRAMES = 64  # a pose "clip@phase" is frame round(phase·64) of the clip's 64-frame cycle
MAX_VIEWS = 64
MAX_SIZE = 1024
MSE_FLOOR = 1e-10
INCEPTION_ENV = "HDA_INCEPTION"


@dataclass(frozen=True)
class GalleryConfig:
    poses: tuple = ("walk@0.25", "wave@0.25", "squat@0.5")  # "clip@phase", phase in [0,1) of the cycle
    azimuths_deg: tuple = (0.0, 90.0, 180.0, 270.0)  # 0 = in front of the body (+Z), 90 = its left (+X)
    elevation_m: float = 0.3  # camera height above the framing centre
    size: int = 128  # square images
    fov_deg: float = 30.0
    background: tuple = (1.0, 1.0, 1.0)
    backend: str = "auto"
    device: str = "cpu"  # where avatars are posed and rendered (images come back to the CPU)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_views(self) -> int:
        return len(self.poses) * len(self.azimuths_deg)


class GalleryViews(NamedTuple):
    """The fixed poses and cameras: poses [P,55,3], viewmats [C,4,4], Ks [C,3,3]; view v = p·C + c."""

    poses: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    size: int
    background: torch.Tensor
    device: str = "cpu"  # where render_avatar poses and renders (these tensors stay on the CPU)

    @property
    def num_views(self) -> int:
        return self.poses.shape[0] * self.viewmats.shape[0]


class Gallery(NamedTuple):
    """images [N,V,H,W,3] composited over the background, in [0,1]; alpha [N,V,H,W]; labels [N,V,H,W]
    int8 body part per pixel (-1 off the person) when rendered with parts, else None."""

    images: torch.Tensor
    alpha: torch.Tensor
    labels: torch.Tensor | None = None


def parse_pose(spec: str) -> torch.Tensor:
    """A gallery pose "clip@phase" (e.g. "walk@0.25") -> axis-angle pose [55,3]."""
    clip, sep, phase_text = str(spec).partition("@")
    try:
        phase = float(phase_text) if sep else 0.0
    except ValueError:
        phase = -1.0
    if clip not in BUILTIN or not 0.0 <= phase < 1.0:
        raise HDAError(f"gallery pose {spec!r}: expected 'clip@phase' with clip one of {', '.join(BUILTIN)} "
                       "and phase in [0, 1)")
    return pose_at(clip, phase, CLIP_FRAMES)[0]


def check_gallery_config(config: GalleryConfig) -> None:
    if not config.poses or not config.azimuths_deg:
        raise HDAError("gallery: poses and azimuths_deg must be non-empty")
    if config.num_views > MAX_VIEWS:
        raise HDAError(f"gallery: {config.num_views} views (poses x cameras), expected at most {MAX_VIEWS}")
    if not 8 <= config.size <= MAX_SIZE:
        raise HDAError(f"gallery size {config.size}: expected 8..{MAX_SIZE}")
    if not 1.0 <= config.fov_deg <= 120.0:
        raise HDAError(f"gallery fov_deg {config.fov_deg}: expected 1..120")
    if len(config.background) != 3 or not all(0.0 <= float(c) <= 1.0 for c in config.background):
        raise HDAError(f"gallery background {config.background}: expected three values in [0, 1]")
    if not all(math.isfinite(float(a)) for a in config.azimuths_deg) or not math.isfinite(config.elevation_m):
        raise HDAError("gallery: azimuths_deg and elevation_m must be finite")


def gallery_views(body: BodyModel, config: GalleryConfig = GalleryConfig()) -> GalleryViews:
    """Poses and cameras of the gallery for avatars of ``body``.

    The cameras look at the centre of the posed bodies' joint bounding box (body frame: +Y up) and stand
    far enough that the posed mean template of every gallery pose fits the field of view with a 10% margin.
    """
    check_gallery_config(config)
    poses = torch.stack([parse_pose(p) for p in config.poses])
    verts = pose_body(body, poses).vertices.reshape(-1, 3)
    lo, hi = verts.min(0).values, verts.max(0).values
    target = (lo + hi) / 2
    up = torch.tensor([0.0, 1.0, 0.0])
    half_height = float(hi[1] - lo[1]) / 2
    radius = float((verts[:, [0, 2]] - target[[0, 2]]).norm(dim=-1).max())
    distance = 1.1 * max(half_height + abs(config.elevation_m) * 0.5, radius) / math.tan(
        math.radians(config.fov_deg) / 2) + radius
    views = []
    for az in config.azimuths_deg:
        a = math.radians(float(az))
        eye = target + torch.tensor([distance * math.sin(a), config.elevation_m, distance * math.cos(a)])
        views.append(look_at(eye, target, up))
    K = intrinsics(config.size, config.size, config.fov_deg)
    return GalleryViews(poses, torch.stack(views), K.expand(len(views), 3, 3).clone(), config.size,
                        torch.tensor(config.background, dtype=torch.float32), config.device)


@torch.no_grad()
def render_avatar(avatar: Avatar, views: GalleryViews, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One avatar's gallery: (images [V,H,W,3] over the background, alpha [V,H,W]), on the CPU.

    Posed and rendered on ``views.device`` (``GalleryConfig.device``); the caller's avatar is not moved."""
    images, alphas, _ = _render_views(avatar, views, backend, parts=False)
    return images, alphas


@torch.no_grad()
def render_avatar_parts(avatar: Avatar, views: GalleryViews,
                        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`render_avatar` plus each pixel's body part: labels [V,H,W] int8, an index into
    :data:`hda_backend.body.parts.PARTS`, -1 where alpha <= :data:`PERSON_ALPHA` (not the person).

    Every Gaussian carries its texel's part (:func:`hda_backend.body.parts.parts_of_weights` of the
    texel-blended skinning weights) as a one-hot colour; the same Gaussians are rasterised with those
    colours, and a pixel's part is the one that contributes most of its alpha (occlusion included).
    """
    return _render_views(avatar, views, backend, parts=True)


@torch.no_grad()
def _render_views(avatar: Avatar, views: GalleryViews, backend: str, parts: bool):
    """Images, alphas and (with ``parts``) labels of one avatar, rendered on ``views.device``, returned on the CPU."""
    device = torch.device(views.device)
    if device != next(avatar.parameters()).device:
        avatar = copy.deepcopy(avatar).to(device)
    views = views._replace(poses=views.poses.to(device), viewmats=views.viewmats.to(device), Ks=views.Ks.to(device),
                           background=views.background.to(device))
    gaussians = avatar(views.poses)
    onehot = None
    if parts:
        onehot = torch.nn.functional.one_hot(parts_of_weights(avatar.binding.weights), len(PARTS)).float()
    images, alphas, labels = [], [], []
    for p in range(views.poses.shape[0]):
        g = gaussians.index(p)
        for c in range(views.viewmats.shape[0]):
            rgb, alpha = render_gaussians(g, views.viewmats[c], views.Ks[c], views.size, views.size,
                                          background=views.background, backend=backend)
            images.append(rgb.clamp(0.0, 1.0))
            alphas.append(alpha[..., 0])
            if parts:
                weight, _, _ = rasterize(g.means, g.quats, g.scales, g.opacities, onehot.to(g.means.device),
                                         views.viewmats[c:c + 1], views.Ks[c:c + 1], views.size, views.size,
                                         sh_degree=None, backend=backend)
                label = weight[0].argmax(dim=-1).to(torch.int8)
                labels.append(torch.where(alpha[..., 0] > PERSON_ALPHA, label, torch.full_like(label, -1)))
    return torch.stack(images).cpu(), torch.stack(alphas).cpu(), torch.stack(labels).cpu() if parts else None


def render_gallery(avatars: Iterable[Avatar], views: GalleryViews, backend: str = "auto",
                   progress: bool = False, desc: str = "gallery", total: int | None = None,
                   parts: bool = False) -> Gallery:
    """Gallery of every avatar: images [N,V,H,W,3], alpha [N,V,H,W], and with ``parts`` the per-pixel
    body parts labels [N,V,H,W] (:func:`render_avatar_parts`). ``total``: N for the progress bar."""
    images, alphas, labels = [], [], []
    for avatar in tqdm(avatars, desc=desc, unit="avatar", disable=not progress, total=total):
        rgb, alpha, label = _render_views(avatar, views, backend, parts)
        images.append(rgb)
        alphas.append(alpha)
        labels.append(label)
    if not images:
        raise HDAError("gallery: no avatars to render")
    return Gallery(torch.stack(images), torch.stack(alphas), torch.stack(labels) if parts else None)


# ---------------------------------------------------------------------------------------------------
# Distances


def pairwise(a: torch.Tensor, b: torch.Tensor, pair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             chunk_elements: int = 1 << 24) -> np.ndarray:
    """[Na,Nb] matrix of ``pair(a[i], b)``; a: [Na,...], b: [Nb,...]; pair(x [...], ys [M,...]) -> [M].

    ``b`` is visited in chunks of about ``chunk_elements`` values, so the temporaries of ``pair`` stay
    bounded (hundreds of galleries of ~600k values each would otherwise need gigabytes).
    """
    step = max(1, chunk_elements // max(1, b[0].numel()))
    return np.stack([np.concatenate([pair(a[i], b[j:j + step]).double().cpu().numpy()
                                     for j in range(0, b.shape[0], step)]) for i in range(a.shape[0])])


def mse_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean squared difference [Na,Nb] between galleries a [Na,V,H,W,3] and b [Nb,V,H,W,3]."""
    if a.shape[1:] != b.shape[1:]:
        raise HDAError(f"gallery distance: image shapes {tuple(a.shape[1:])} and {tuple(b.shape[1:])} differ")
    return pairwise(a, b, lambda x, ys: ((ys - x[None]) ** 2).flatten(1).mean(1))


def psnr_distance(mse: np.ndarray) -> np.ndarray:
    """D = -PSNR = 10·log10(MSE) in dB for images in [0,1], MSE floored at 1e-10."""
    return 10.0 * np.log10(np.maximum(mse, MSE_FLOOR))


def lpips_matrix(a: torch.Tensor, b: torch.Tensor,
                 lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> np.ndarray:
    """1000 × mean-over-views LPIPS [Na,Nb]; a, b: [N,V,H,W,3]; lpips(x, y) on [V,3,H,W] -> mean over V."""
    def pair(x, ys):
        x = x.permute(0, 3, 1, 2)
        return torch.stack([1000.0 * lpips(x, y.permute(0, 3, 1, 2)).reshape(()) for y in ys])
    with torch.no_grad():
        return pairwise(a, b, pair)


def weight_distance_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Euclidean distance [Na,Nb] between weight vectors a [Na,D] and b [Nb,D] (float64, exact zeros)."""
    return pairwise(a.double(), b.double(), lambda x, ys: (ys - x[None]).norm(dim=1))


# ---------------------------------------------------------------------------------------------------
# Inception features for FID / KID


def load_inception(path: str | os.PathLike | None = None) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
    """(feature extractor images [N,H,W,3] in [0,1] -> [N,2048], or None; a one-line status).

    The weights come only from a local file: ``path`` or ``$HDA_INCEPTION``, a TorchScript Inception-V3
    feature network with the StyleGAN/clean-fid calling convention ``net(x, return_features=True)`` on
    uint8-range images x [N,3,H,W] (it resizes to 299² itself), e.g. ``inception-2015-12-05.pt``. Nothing
    is downloaded; without a file FID/KID are left out.
    """
    source = path or os.environ.get(INCEPTION_ENV)
    if not source:
        return None, f"FID/KID off: no Inception weights (give --inception FILE or set ${INCEPTION_ENV})"
    file = Path(source).expanduser()
    if not file.is_file():
        raise HDAError(f"inception weights {file}: file not found")
    try:
        with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; these files are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(file), map_location="cpu").eval()
    except Exception as exc:  # a corrupt or non-TorchScript file: torch raises several types
        raise HDAError(f"inception weights {file}: not a TorchScript model "
                       f"({(str(exc).splitlines() or [type(exc).__name__])[0][:100]})") from None

    @torch.no_grad()
    def extract(images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        pixels = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
        feats = [net(pixels[i:i + 64], return_features=True) for i in range(0, len(x), 64)]
        out = torch.cat(feats).double().numpy()
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise HDAError(f"inception weights {file}: returned features of shape {out.shape}, expected [N, F]")
        return out

    return extract, f"FID/KID on: Inception features from {file}"

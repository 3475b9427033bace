"""Does an avatar render as a plausible person? Automatic checks for sampled (or any) avatars.

Four checks, cheapest first; the render-based one runs only when the others pass (rendering NaN or
exploded Gaussians is slow and says nothing more):

- ``finite``: every UNet weight and every decoded Gaussian parameter (at the gallery poses) is finite;
- ``scale``: at most ``max_exploded_fraction`` of the Gaussians have a largest standard deviation above
  ``max_scale`` × body height;
- ``bbox``: at most ``max_outside_fraction`` of the Gaussian centres lie outside the posed body's
  bounding box grown by ``bbox_margin`` × body height (clothes and hair stay inside; a few floaters are
  tolerated);
- ``silhouette``: over all gallery views, the rendered alpha (> ``alpha_threshold``) covers at least
  ``min_body_coverage`` of the posed body mesh's silhouette, and its area is within ``area_ratio`` of
  the silhouette's (an empty, transparent, shifted or blown-up avatar fails; clothes, hair and the
  Gaussians' blur make a plausible avatar somewhat larger than the bare body, so IoU alone would be
  too strict at small image sizes; it is reported in the stats).

"Body" is the avatar's mean template (β = 0), which is what the UNet is bound to; a subject's own shape
lives in the Gaussians' offsets, within the margins above. Body height is the rest template's extent
along +Y.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..avatar.model import Avatar
from ..body import BodyModel, pose_body
from ..errors import HDAError
from .gallery import GalleryViews, render_avatar

CHECKS = ("finite", "scale", "bbox", "silhouette")


@dataclass(frozen=True)
class PlausibilityConfig:
    max_scale: float = 0.1  # largest Gaussian std allowed, × body height (0.17 m for a 1.7 m body)
    max_exploded_fraction: float = 0.01
    bbox_margin: float = 0.15  # × body height, around the posed body's bounding box
    max_outside_fraction: float = 0.02
    min_body_coverage: float = 0.6  # of the body silhouette's pixels, covered by the rendered alpha
    area_ratio: tuple = (0.5, 3.0)  # rendered alpha's area / body silhouette's area (clothes, hair, blur)
    alpha_threshold: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plausibility:
    """ok: every check passed; failed: names of failed checks (see CHECKS); reasons: one line per failed
    check; stats: the measured values (fractions, body coverage, area ratio, IoU, body height)."""

    ok: bool
    failed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def body_height(body: BodyModel) -> float:
    """Extent of the rest template along +Y, in metres."""
    y = body.v_template[:, 1]
    return float(y.max() - y.min())


def mesh_silhouette(vertices: torch.Tensor, faces: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor,
                    width: int, height: int, near: float = 0.01) -> torch.Tensor:
    """Pixels whose centre (x+0.5, y+0.5) lies inside some projected triangle: mask [H,W] bool.

    vertices: [V,3] world; faces: [F,3]; viewmat: [4,4] world→camera (OpenCV); K: [3,3]. Triangles with
    a vertex nearer than ``near`` are skipped; edges count as inside. Each triangle tests only the pixels
    of its bounding box: triangles are bucketed by box size (powers of two), one vectorised test per bucket.
    """
    cam = vertices.double() @ viewmat[:3, :3].double().T + viewmat[:3, 3].double()
    depth = cam[:, 2]
    pix = (cam @ K.double().T)[:, :2] / depth.clamp_min(near)[:, None]
    faces = faces.long()
    faces = faces[(depth[faces] > near).all(dim=1)]
    tri = pix[faces]  # [F,3,2]
    mask = torch.zeros(height, width, dtype=torch.bool)
    if tri.shape[0] == 0:
        return mask
    lo = torch.ceil(tri.min(dim=1).values - 0.5).clamp(min=0)
    hi = torch.floor(tri.max(dim=1).values - 0.5)
    hi[:, 0] = hi[:, 0].clamp(max=width - 1)
    hi[:, 1] = hi[:, 1].clamp(max=height - 1)
    extent = (hi - lo + 1).max(dim=1).values
    visible = extent >= 1
    tri, lo, hi, extent = tri[visible], lo[visible], hi[visible], extent[visible]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    size = 1
    while tri.shape[0] and size < 2 * max(width, height):
        pick = (extent <= size) & (extent > size // 2)
        if pick.any():
            off = torch.arange(size, dtype=torch.float64)
            px = lo[pick, 0, None, None] + off[None, None, :]  # [Fb,1,S]
            py = lo[pick, 1, None, None] + off[None, :, None]  # [Fb,S,1]
            cx, cy = px + 0.5, py + 0.5
            inside = (px <= hi[pick, 0, None, None]) & (py <= hi[pick, 1, None, None])
            ta, tb, tc, sign = a[pick], b[pick], c[pick], torch.sign(area[pick])[:, None, None]
            for p, q in ((ta, tb), (tb, tc), (tc, ta)):
                edge = (q[:, 0, None, None] - p[:, 0, None, None]) * (cy - p[:, 1, None, None]) \
                    - (q[:, 1, None, None] - p[:, 1, None, None]) * (cx - p[:, 0, None, None])
                inside &= edge * sign >= 0
            inside &= sign != 0
            xs = px.expand_as(inside)[inside].long()
            ys = py.expand_as(inside)[inside].long()
            mask[ys, xs] = True
        size *= 2
    return mask


def body_silhouettes(body: BodyModel, views: GalleryViews) -> torch.Tensor:
    """Silhouettes of the posed mean template in every gallery view: [V,H,W] bool (view v = p·C + c)."""
    verts = pose_body(body, views.poses).vertices
    return torch.stack([mesh_silhouette(verts[p], body.faces, views.viewmats[c], views.Ks[c], views.size, views.size)
                        for p in range(verts.shape[0]) for c in range(views.viewmats.shape[0])])


@torch.no_grad()
def check_plausible(avatar: Avatar, views: GalleryViews, config: PlausibilityConfig = PlausibilityConfig(),
                    alpha: torch.Tensor | None = None, body_masks: torch.Tensor | None = None,
                    backend: str = "auto") -> Plausibility:
    """Run the checks of this module on one avatar.

    views: the gallery poses/cameras; alpha: [V,H,W] the avatar's gallery alpha if already rendered
    (else it is rendered here when needed); body_masks: [V,H,W] from :func:`body_silhouettes` (computed
    here when None; pass them when checking many avatars of the same body).
    """
    result = Plausibility(ok=True)
    params = torch.cat([p.detach().reshape(-1) for p in avatar.unet.parameters()])
    bad = int((~torch.isfinite(params)).sum())
    if bad:
        return _fail(result, "finite", f"non-finite weights: {bad} of {params.numel()} UNet parameters are NaN/inf, "
                                       "expected all finite")
    g = avatar(views.poses)
    bad = sum(int((~torch.isfinite(t)).sum()) for t in g)
    if bad:
        return _fail(result, "finite", f"non-finite Gaussians: {bad} decoded values are NaN/inf, expected all finite")

    height = body_height(avatar.body)
    result.stats["body_height_m"] = height
    limit = config.max_scale * height
    exploded = float((g.scales.amax(dim=-1) > limit).float().mean())
    result.stats["exploded_fraction"] = exploded
    result.stats["max_scale_m"] = float(g.scales.max())
    if exploded > config.max_exploded_fraction:
        _fail(result, "scale", f"exploded Gaussians: {100 * exploded:.1f}% have a scale above {limit:.3f} m "
                               f"({config.max_scale} x body height {height:.2f} m), expected at most "
                               f"{100 * config.max_exploded_fraction:g}%")

    verts = pose_body(avatar.body, views.poses).vertices  # [P,V,3]
    margin = config.bbox_margin * height
    lo = verts.min(dim=1, keepdim=True).values - margin
    hi = verts.max(dim=1, keepdim=True).values + margin
    outside = float(((g.means < lo) | (g.means > hi)).any(dim=-1).float().mean())
    result.stats["outside_fraction"] = outside
    if outside > config.max_outside_fraction:
        _fail(result, "bbox", f"Gaussians outside the body: {100 * outside:.1f}% of the centres lie more than "
                              f"{margin:.2f} m outside the posed body's bounding box, expected at most "
                              f"{100 * config.max_outside_fraction:g}%")
    if not result.ok:
        return result

    if alpha is None:
        _, alpha = render_avatar(avatar, views, backend)
    masks = body_silhouettes(avatar.body, views) if body_masks is None else body_masks
    if alpha.shape != masks.shape:
        raise HDAError(f"plausibility: alpha has shape {tuple(alpha.shape)}, expected {tuple(masks.shape)} "
                       "like the body silhouettes")
    covered = alpha > config.alpha_threshold
    body_area = max(int(masks.sum()), 1)
    hit = int((covered & masks).sum())
    result.stats["body_coverage"] = hit / body_area
    result.stats["area_ratio"] = int(covered.sum()) / body_area
    result.stats["silhouette_iou"] = hit / max(int((covered | masks).sum()), 1)
    low, high = config.area_ratio
    if result.stats["body_coverage"] < config.min_body_coverage or not low <= result.stats["area_ratio"] <= high:
        _fail(result, "silhouette", f"silhouette: the rendered alpha > {config.alpha_threshold} covers "
                                    f"{100 * result.stats['body_coverage']:.0f}% of the posed body's silhouette with "
                                    f"{result.stats['area_ratio']:.2f}x its area, expected >= "
                                    f"{100 * config.min_body_coverage:.0f}% and {low}..{high}x")
    return result


def _fail(result: Plausibility, check: str, reason: str) -> Plausibility:
    result.ok = False
    result.failed.append(check)
    result.reasons.append(reason)
    return result

"""The appearance stage of a fit: per-texel Gaussian maps first, the UNet after (``hda fit``'s recipe).

Rendering through the UNet is the expensive path of a fit, and a UNet that starts from nothing spends
most of its steps learning what colour each texel has. So a fit runs in three stages:

1. **Maps.** One raw map [M,59] (the UNet's output format, see ``avatar.gaussians``) is initialised
   from the capture: offsets from the subject's body shape (:func:`shape_offsets`) and colours from the
   training images projected onto the posed Gaussians (:func:`project_colours`). It is then optimised
   directly by rendering training views (:func:`fit_maps`): no UNet, so a step costs a rasterization.
2. **Regression.** The UNet is regressed onto that map in UV space for the training poses
   (:func:`regress_unet`): no rendering.
3. **End to end.** The trainer fine-tunes the UNet through the renderer, where pose-dependence is learnt.

Every function here is pure apart from the optimisers it runs; each stage's result is the next stage's
input, so the trainer can checkpoint between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..avatar.gaussians import CHANNELS, SH_COEFFS
from ..avatar.model import Avatar
from ..precision import autocast
from smplx.lbs import blend_shapes
from ..render._projection import _SH_C0 as SH_C0
from ..rotations import quat_to_matrix
from ..steps import run_steps

# Pixels per cell of the depth buffer that decides which Gaussians a camera sees. The texels of a
# UV-128 map land about two pixels apart at 256², so a 3-pixel cell always holds a front texel.
ZBUFFER_CELL = 3
ZBUFFER_TOLERANCE = 0.03  # metres behind the nearest Gaussian of a cell that still count as seen
MIN_FACING = 0.2  # cos of the angle between normal and view ray below which a texel's colour is not read


@dataclass(frozen=True)
class MapGroups:
    """Learning rates of :func:`fit_maps` per output group (3DGS's per-attribute rates, in raw units)."""

    offset: float = 2e-3
    log_scale: float = 5e-3
    quat: float = 2e-3
    opacity: float = 2e-2
    sh_dc: float = 1e-2
    sh_rest: float = 5e-4


_SH = CHANNELS["sh"]
# The UNet's output channels by what they control, in channel order; each group gets its own learning
# rate when the map is fitted and its own weight when the UNet is regressed onto it.
GROUPS = {"offset": CHANNELS["offset"], "log_scale": CHANNELS["log_scale"], "quat": CHANNELS["quat"],
          "opacity": CHANNELS["opacity"], "sh_dc": slice(_SH.start, _SH.start + 3),
          "sh_rest": slice(_SH.start + 3, _SH.start + 3 * SH_COEFFS)}
# Offsets and base colour decide the render; the other groups stay near their fitted values anyway.
REGRESSION_WEIGHTS = {"offset": 1.0, "log_scale": 0.3, "quat": 0.3, "opacity": 0.3, "sh_dc": 1.0, "sh_rest": 0.3}


def colour_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """The DC SH coefficient that renders as ``rgb`` (the rasterizer maps SH to colour + 0.5)."""
    return (rgb - 0.5) / SH_C0


def shape_offsets(avatar: Avatar, betas: torch.Tensor) -> torch.Tensor:
    """[M,3] raw offsets that move the mean template's Gaussians onto the body shaped by ``betas``.

    In the rest pose this is exact: offset · offset_scale = (shaped - mean) surface point. Posed, the
    skinning uses the mean template's joints; the rest is left to the fit."""
    body, binding = avatar.body, avatar.binding
    nb = min(int(betas.numel()), body.num_betas)
    delta = blend_shapes(betas[:nb].reshape(1, nb).float(), body.shapedirs[:, :, :nb])[0]  # [V,3]
    surface = torch.einsum("mkc,mk->mc", delta[binding.corners], binding.bary)
    return surface / avatar.gaussian_config.offset_scale


def visible_texels(means: torch.Tensor, normals: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor,
                   width: int, height: int, cell: int = ZBUFFER_CELL,
                   tolerance: float = ZBUFFER_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which Gaussians one camera sees, by a coarse depth buffer over their centres.

    means, normals: [M,3] world space; viewmat [4,4]; K [3,3]. Returns (pixel xy [M,2], seen [M] bool,
    facing [M]: cos between the normal and the ray towards the camera)."""
    cam = means @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[:, 2]
    xy = (cam @ K.T)[:, :2] / z.clamp_min(1e-6)[:, None]
    campos = -viewmat[:3, :3].T @ viewmat[:3, 3]
    facing = (normals * F.normalize(campos - means, dim=-1)).sum(-1)
    inside = (z > 1e-3) & (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    cols, rows = math.ceil(width / cell), math.ceil(height / cell)
    cx = (xy[:, 0] / cell).floor().clamp(0, cols - 1).long()
    cy = (xy[:, 1] / cell).floor().clamp(0, rows - 1).long()
    index = cy * cols + cx
    nearest = torch.full((rows * cols,), float("inf"), dtype=z.dtype, device=z.device)
    nearest = nearest.scatter_reduce(0, index[inside], z[inside], reduce="amin")
    seen = inside & (z <= nearest[index] + tolerance)
    return xy, seen, facing


def sample_image(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of image [H,W,C] at pixel coordinates xy [M,2] (pixel centres at +0.5)."""
    height, width = image.shape[:2]
    grid = torch.stack([xy[:, 0] / width * 2 - 1, xy[:, 1] / height * 2 - 1], -1)
    out = F.grid_sample(image.permute(2, 0, 1)[None], grid[None, None], mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[0, :, 0].T


@torch.no_grad()
def project_colours(avatar: Avatar, raw: torch.Tensor, views: list, camera: Callable, pose: Callable,
                    data: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-texel colours [M,3] and their total weight [M], averaged over the views that see each texel.

    raw: [M,59] the map whose Gaussians are projected (their centres and normals); views: (cam, frame)
    pairs; camera(cam) -> (viewmat [4,4], K [3,3], width, height); pose(frame) -> (pose [1,55,3],
    transl [1,3]); data(cam, frame) -> (image [H,W,3], mask [H,W]). A view weighs a texel by how
    squarely it faces the camera (cos²); texels on the mask's border or outside it are skipped."""
    total = raw.new_zeros(raw.shape[0], 3)
    weight = raw.new_zeros(raw.shape[0])
    for cam, frame in views:
        p, t = pose(frame)
        g = avatar.skin(raw[None], p, t).index(0)
        normals = quat_to_matrix(g.quats)[:, :, 2]
        viewmat, K, width, height = camera(cam)
        xy, seen, facing = visible_texels(g.means, normals, viewmat, K, width, height)
        image, mask = data(cam, frame)
        inside = sample_image(mask[..., None], xy)[:, 0] > 0.99
        w = torch.where(seen & inside & (facing > MIN_FACING), facing ** 2, torch.zeros_like(facing))
        total += w[:, None] * sample_image(image, xy)
        weight += w
    return total / weight.clamp_min(1e-8)[:, None], weight


def initial_map(avatar: Avatar, betas: torch.Tensor, views: list, camera: Callable, pose: Callable,
                data: Callable, fallback: tuple = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """The stage-1 starting map [M,59]: template Gaussians moved to the subject's shape, coloured by
    projection; texels no training view sees take the mean colour of those seen (else ``fallback``)."""
    device = next(avatar.unet.parameters()).device
    raw = torch.zeros(avatar.num_gaussians, avatar.unet.config.out_channels, device=device)
    raw[:, CHANNELS["offset"]] = shape_offsets(avatar, betas).to(device)
    colour, weight = project_colours(avatar, raw, views, camera, pose, data)
    seen = weight > 0
    mean = colour[seen].mean(0) if seen.any() else colour.new_tensor(fallback)
    colour = torch.where(seen[:, None], colour, mean)
    raw[:, GROUPS["sh_dc"]] = colour_to_sh_dc(colour)
    return raw


def map_parameters(raw: torch.Tensor, rates: MapGroups) -> tuple[dict, list]:
    """Split a raw map [M,59] into one leaf tensor per output group and Adam parameter groups."""
    leaves = {k: raw[:, s].clone().requires_grad_(True) for k, s in GROUPS.items()}
    groups = [{"params": [leaves[k]], "lr": getattr(rates, k), "name": k} for k in GROUPS]
    return leaves, groups


def join_map(leaves: dict) -> torch.Tensor:
    """The raw map [M,59] from :func:`map_parameters`' leaves, in channel order."""
    return torch.cat([leaves[k] for k in GROUPS], 1)


def regression_weights(channels: int = 59) -> torch.Tensor:
    """[59] per-channel weights of :func:`regression_loss`: offsets and base colour count most."""
    w = torch.empty(channels)
    for name, s in GROUPS.items():
        w[s] = REGRESSION_WEIGHTS[name]
    return w


def regression_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted L1 between raw maps pred, target: [B,M,59] (or [M,59]); weights [59]."""
    return ((pred - target).abs() * weights).sum(-1).mean() / weights.sum()


def cosine(step: int, total: int, final: float = 0.1) -> float:
    """Learning-rate factor of a stage: cosine from 1 at step 0 to ``final`` at ``total``."""
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def views_by_frame(views: list) -> dict:
    """{frame: [cam, ...]} of (cam, frame) pairs: a step poses one frame and renders some of its cameras."""
    by_frame: dict = {}
    for cam, frame in views:
        by_frame.setdefault(frame, []).append(cam)
    return by_frame


def fit_maps(avatar: Avatar, raw: torch.Tensor, views: list, pose: Callable, view_loss: Callable,
             steps: int, rates: MapGroups = MapGroups(), generator: torch.Generator | None = None,
             cameras_per_step: int = 1, log_every: int = 10,
             on_log: Callable[[int, dict], None] = lambda step, means: None) -> torch.Tensor:
    """Stage 1: optimise the raw map [M,59] directly by rendering; returns the fitted map.

    views: (cam, frame) training pairs; pose(frame) -> (pose [1,55,3], transl [1,3]);
    view_loss(gaussians, cam, frame) -> (loss, terms) renders one view and scores it. Each step poses
    the map for one frame and renders ``cameras_per_step`` of that frame's cameras; ``on_log`` gets the
    terms averaged over every ``log_every`` steps."""
    generator = generator or torch.Generator().manual_seed(0)
    leaves, groups = map_parameters(raw, rates)
    optimizer = torch.optim.Adam(groups, eps=1e-15)
    by_frame = views_by_frame(views)
    frames = sorted(by_frame)

    def step(index: int) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = getattr(rates, group["name"]) * cosine(index, steps)
        frame = frames[int(torch.randint(len(frames), (1,), generator=generator))]
        cams = by_frame[frame]
        order = torch.randperm(len(cams), generator=generator)[:cameras_per_step]
        p, t = pose(frame)
        g = avatar.skin(join_map(leaves)[None], p, t).index(0)
        total, terms = 0.0, {}
        for i in order.tolist():
            loss, parts = view_loss(g, cams[i], frame)
            total = total + loss / len(order)
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / len(order)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return terms

    run_steps(0, steps, step, log_every, steps, on_log, lambda done: None)
    return join_map(leaves).detach()


def regress_unet(avatar: Avatar, target: torch.Tensor, maps: torch.Tensor, steps: int, lr: float,
                 batch: int = 2, generator: torch.Generator | None = None, log_every: int = 10,
                 on_log: Callable[[int, dict], None] = lambda step, means: None) -> None:
    """Stage 2: regress the avatar's UNet onto the raw map ``target`` [M,59] (in place, no rendering).

    maps: [F,6,R,R] the UV pose maps of the training frames, ``batch`` of them per step. The UNet runs
    in the avatar's ``precision``; ``on_log`` gets the loss averaged over every ``log_every`` steps."""
    generator = generator or torch.Generator().manual_seed(0)
    weights = regression_weights(target.shape[1]).to(target.device)
    optimizer = torch.optim.Adam(avatar.unet.parameters(), lr=lr)
    texels = avatar.binding.texels.to(target.device)
    unet_arithmetic = autocast(avatar.precision, target.device)

    def step(index: int) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine(index, steps)
        pick = torch.randint(maps.shape[0], (batch,), generator=generator)
        with unet_arithmetic():
            out = avatar.unet(maps[pick])
        pred = out.float().flatten(2)[:, :, texels].transpose(1, 2)
        loss = regression_loss(pred, target[None], weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"regression": float(loss.detach())}

    run_steps(0, steps, step, log_every, steps, on_log, lambda done: None)


class MapAvatar(torch.nn.Module):
    """A fitted raw map [M,59] posed by LBS alone: what any avatar of this UV layout can show with no
    pose-dependence, the reference a UNet's fit is measured against (``scripts/fidelity.py``). Called
    like :class:`Avatar` (``input_pose`` is ignored: there is no UNet to feed)."""

    def __init__(self, avatar: Avatar, raw: torch.Tensor):
        super().__init__()
        self.avatar = avatar
        self.raw = raw
        self.gaussian_config = avatar.gaussian_config

    def forward(self, pose, transl=None, input_pose=None):
        return self.avatar.skin(self.raw, pose, transl)

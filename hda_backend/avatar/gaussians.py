"""From UNet output to posed 3D Gaussians (paper Eq. 7), as pure functions.

Channel layout of the 59 UNet outputs per texel: offset 3 | log-scale 3 | quaternion 4 (wxyz) |
opacity 1 | SH degree 3 as 16 coefficients x RGB (48).

Each raw value is relative to a base that binds a fresh avatar to the template surface, so a UNet that
outputs zeros gives Gaussians tiling the template:
- centre  = LBS(bary·v̄ + offset_scale·raw_offset), v̄ the rest template (with pose correctives);
- scale   = exp(raw + log(base)), base from the texel's footprint on the surface, flattened along the normal;
- rotation= q_skin ⊗ q_tbn ⊗ normalize(raw + identity), q_tbn the texel's tangent frame, q_skin the
  blended skinning rotation (``skin_rotations``) or the global orientation only (the UNet then
  predicts pose-dependent orientation itself, as in ASH);
- opacity = sigmoid(raw + logit(init_opacity));
- SH      = raw (a zero DC term renders as 0.5 grey after gsplat's +0.5 offset), zero above ``sh_degree``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from ..body import BodyModel, blend_transforms
from ..devices import map_tensors
from ..rotations import matrix_to_quat, quat_multiply
from ..uvmap import UVLayout

SH_DEGREE = 3
SH_COEFFS = (SH_DEGREE + 1) ** 2
CHANNELS = {"offset": slice(0, 3), "log_scale": slice(3, 6), "quat": slice(6, 10), "opacity": slice(10, 11),
            "sh": slice(11, 11 + 3 * SH_COEFFS)}
# The groups above tile the channels in order, so one split gives them all: its backward is one
# concatenation, where a slice per group would each fill a zero tensor the size of the whole map.
CHANNEL_SIZES = [s.stop - s.start for s in CHANNELS.values()]


@dataclass(frozen=True)
class GaussianConfig:
    offset_scale: float = 0.05  # metres of offset per unit of raw output
    init_opacity: float = 0.9
    tangent_scale: float = 0.6  # base in-surface scale, in texel spacings
    normal_scale: float = 0.15  # base scale along the normal, in texel spacings
    skin_rotations: bool = True
    # Highest SH degree rendered. Coefficients above it are zeroed, so a ring of a few cameras cannot
    # overfit view-dependent colour that no held-out camera would agree with.
    sh_degree: int = SH_DEGREE

    def to_dict(self) -> dict:
        return asdict(self)


class Gaussians(NamedTuple):
    """means [B,M,3]; quats [B,M,4] wxyz unit; scales [B,M,3]; opacities [B,M]; sh [B,M,16,3]."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    sh: torch.Tensor

    def index(self, b: int) -> "Gaussians":
        return Gaussians(*(t[b] for t in self))


@dataclass(frozen=True)
class TexelBinding:
    """What each covered texel needs from the template, computed once per (body, layout).

    corners [M,3] vertex ids; bary [M,3]; weights [M,55] LBS weights; tbn [M,4] quaternion of the
    canonical tangent frame (tangent, bitangent, normal as columns); base_log_scale [M,3].
    """

    texels: torch.Tensor
    corners: torch.Tensor
    bary: torch.Tensor
    weights: torch.Tensor
    tbn: torch.Tensor
    base_log_scale: torch.Tensor

    def apply(self, fn) -> "TexelBinding":
        """The same binding with ``fn`` applied to every tensor (``Avatar.to`` moves it this way)."""
        return map_tensors(self, fn)


def bind_texels(body: BodyModel, layout: UVLayout, config: GaussianConfig) -> TexelBinding:
    faces = layout.texel_faces()
    corners = body.faces[faces]
    bary = layout.texel_bary()
    weights = torch.einsum("mkj,mk->mj", body.weights[corners], bary)
    p = body.v_template[corners]  # [M,3,3]
    uv = body.vt[body.ft[faces]].double()  # [M,3,2]
    e1, e2 = (p[:, 1] - p[:, 0]).double(), (p[:, 2] - p[:, 0]).double()
    d1, d2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    det = torch.where(det.abs() < 1e-18, torch.full_like(det, 1e-18), det)
    tangent = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) / det[:, None]
    normal = torch.cross(e1, e2, dim=-1)
    area3d = 0.5 * normal.norm(dim=-1)
    normal = torch.nn.functional.normalize(normal, dim=-1, eps=1e-20)
    tangent = tangent - normal * (tangent * normal).sum(-1, keepdim=True)
    # A degenerate UV map gives no tangent direction; any direction in the plane will do.
    fallback = torch.nn.functional.normalize(e1, dim=-1, eps=1e-20)
    tangent = torch.where(tangent.norm(dim=-1, keepdim=True) > 1e-12, tangent, fallback)
    tangent = torch.nn.functional.normalize(tangent, dim=-1, eps=1e-20)
    frame = torch.stack([tangent, torch.cross(normal, tangent, dim=-1), normal], dim=-1)
    # Texel spacing on the surface: sqrt(3D area / UV area) metres per UV unit, over R texels.
    spacing = torch.sqrt(area3d / (0.5 * det.abs()).clamp_min(1e-18)) / layout.res
    spacing = spacing.clamp(1e-4, 0.1)
    base = torch.stack([spacing * config.tangent_scale] * 2 + [spacing * config.normal_scale], -1)
    return TexelBinding(layout.texels, corners, bary, weights, matrix_to_quat(frame.float()),
                        torch.log(base).float())


def gather_texels(raw: torch.Tensor, binding: TexelBinding) -> torch.Tensor:
    """Raw UNet maps [B,59,R,R] -> per-Gaussian rows [B,M,59] at the covered texels."""
    return raw.flatten(2)[:, :, binding.texels.to(raw.device)].transpose(1, 2)


def decode(raw: torch.Tensor, binding: TexelBinding, rest_vertices: torch.Tensor, transforms: torch.Tensor,
           config: GaussianConfig) -> Gaussians:
    """Posed Gaussians from raw per-texel parameters.

    raw: [B,M,59] (see :func:`gather_texels`); rest_vertices: [B,V,3] unposed template (with pose
    correctives); transforms: [B,55,4,4] skinning transforms, global motion included.
    """
    dev = raw.device
    bary = binding.bary.to(dev)
    surface = torch.einsum("bmkc,mk->bmc", rest_vertices[:, binding.corners.to(dev)], bary)
    offset, log_scale, quat, opacity, sh = raw.split(CHANNEL_SIZES, -1)
    canonical = surface + config.offset_scale * offset
    skin = blend_transforms(binding.weights.to(dev), transforms)  # [B,M,4,4]
    means = torch.einsum("bmij,bmj->bmi", skin[..., :3, :3], canonical) + skin[..., :3, 3]
    scales = torch.exp(log_scale + binding.base_log_scale.to(dev))
    identity = raw.new_tensor([1.0, 0.0, 0.0, 0.0])
    local = torch.nn.functional.normalize(quat + identity, dim=-1, eps=1e-12)
    if config.skin_rotations:
        outer = matrix_to_quat(skin[..., :3, :3])
    else:
        outer = matrix_to_quat(transforms[:, :1, :3, :3]).expand(-1, local.shape[1], -1)
    quats = quat_multiply(outer, quat_multiply(binding.tbn.to(dev).expand_as(local), local))
    logit = math.log(config.init_opacity / (1.0 - config.init_opacity))
    opacities = torch.sigmoid(opacity[..., 0] + logit)
    sh = sh.reshape(*raw.shape[:2], SH_COEFFS, 3)
    if config.sh_degree < SH_DEGREE:
        sh = torch.cat([sh[:, :, :(config.sh_degree + 1) ** 2],
                        sh.new_zeros(*sh.shape[:2], SH_COEFFS - (config.sh_degree + 1) ** 2, 3)], 2)
    return Gaussians(means, quats, scales, opacities, sh)

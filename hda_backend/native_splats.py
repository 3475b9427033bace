"""Gaussians as the attributes of a native Gaussian-splat point cloud (Blender ≥ 5.3), no bpy.

Blender 5.3 renders a point cloud whose ``type`` is ``'GAUSSIAN_SPLAT'`` in Cycles and EEVEE. Its
per-point attributes are the 3DGS PLY file's values after the viewer's activations: this is what
``bpy.ops.wm.ply_import`` makes of an ``hda export-ply`` file (checked with bpy 5.3.0)::

    position        FLOAT_VECTOR  [M,3]  centre in the object's frame
    scale           FLOAT_VECTOR  [M,3]  standard deviations along the local axes (linear, not log)
    rotation        QUATERNION    [M,4]  unit quaternion w x y z (local axes -> object frame)
    radiance:base   FLOAT4        [M,4]  SH coefficient 0 of r, g, b, then the opacity in [0,1] (not logit)
    radiance:sh_k   FLOAT_VECTOR  [M,3]  SH coefficient k+1 of r, g, b, k = 0..14

Blender evaluates colour = SH·basis + 0.5 with gsplat's (the reference implementation's) basis and
view direction, and reads that colour as sRGB-encoded, as the backend's images are; so the
coefficients are stored as the backend holds them, only turned with the frame (:func:`splat_arrays`).
"""

from __future__ import annotations

import numpy as np
import torch

from .avatar.gaussians import SH_COEFFS, Gaussians
from .export_ply import check_gaussians, transform_gaussians
from .render.rasterize import EPS2D

SH_REST = SH_COEFFS - 1
# (attribute name, Blender attribute type, the data's foreach_get/foreach_set key), in writing order.
ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("position", "FLOAT_VECTOR", "vector"),
    ("scale", "FLOAT_VECTOR", "vector"),
    ("rotation", "QUATERNION", "value"),
    ("radiance:base", "FLOAT4", "vector"),
    *((f"radiance:sh_{k}", "FLOAT_VECTOR", "vector") for k in range(SH_REST)),
)


@torch.no_grad()
def camera_dilation(means: torch.Tensor, viewmat, K, near: float = 1e-3) -> torch.Tensor:
    """The variance [M] (body-frame units²) that widens each Gaussian in 3D as the rasterizer widens
    its projection in 2D: gsplat adds EPS2D px² to every projected covariance (a low-pass filter that
    keeps sub-pixel Gaussians visible); Blender does not. An isotropic σ² = EPS2D·(z/f)² at camera
    depth z projects to EPS2D px² (exactly on the optical axis, to first order elsewhere), and adding
    σ²·I to a covariance R·S²·Rᵀ keeps R, so it is exact as scales √(s² + σ²).

    means: [M,3] body frame; viewmat: [4,4] body frame -> OpenCV camera; K: [3,3] intrinsics.
    """
    view = torch.as_tensor(np.asarray(viewmat, dtype=np.float64))
    k = np.asarray(K, dtype=np.float64)
    z = (means.double().cpu() @ view[2, :3] + view[2, 3]).clamp(min=near)
    focal = float(np.sqrt(k[0, 0] * k[1, 1]))
    return (EPS2D * (z / focal) ** 2).to(means.dtype)


@torch.no_grad()
def splat_gaussians(g: Gaussians, matrix=None, source: str = "gaussians", dilation=None) -> Gaussians:
    """One frame's Gaussians (body frame) as the splat object holds them: widened by ``dilation`` [M]
    (variance added to every axis, :func:`camera_dilation`; None: not widened), then moved by
    ``matrix`` [4,4] into the splat object's frame (None: the identity). What :func:`splat_arrays`
    converts, and what a farm bake writes as a PLY file (blender_addon/native_bake.py), so the two
    hold the same splats. Raises HDAError as :func:`splat_arrays`."""
    check_gaussians(g, source)
    if dilation is not None:
        g = g._replace(scales=torch.sqrt(g.scales.double() ** 2 + dilation.double().to(g.scales.device)[:, None])
                       .to(g.scales.dtype))
    if matrix is not None:
        g = transform_gaussians(g, torch.as_tensor(np.asarray(matrix, dtype=np.float64)))
    return g


@torch.no_grad()
def splat_arrays(g: Gaussians, matrix=None, source: str = "gaussians", dilation=None) -> dict[str, np.ndarray]:
    """One frame's Gaussians (no batch dimension, in the body frame) -> the attribute arrays above.

    g: means [M,3], quats [M,4], scales [M,3], opacities [M], sh [M,16,3]; matrix: [4,4] body frame ->
    the splat object's frame (a rotation times a uniform scale plus a translation; None: the identity).
    dilation: [M] variance added to every axis in the body frame (:func:`camera_dilation`), or None.
    Returns {name: float32 C-contiguous array} in :data:`ATTRIBUTES` order, shapes as listed there.
    Raises HDAError for Gaussians a file must not hold (NaN, scales <= 0, opacities outside [0,1]).
    """
    g = splat_gaussians(g, matrix, source, dilation)
    m = g.means.shape[0]
    sh = g.sh.float().cpu()
    out = {
        "position": g.means,
        "scale": g.scales,
        "rotation": torch.nn.functional.normalize(g.quats.double(), dim=-1),
        "radiance:base": torch.cat([sh[:, 0, :], g.opacities.float().cpu().reshape(m, 1)], dim=1),
    }
    for k in range(SH_REST):
        out[f"radiance:sh_{k}"] = sh[:, k + 1, :]
    return {name: np.ascontiguousarray(out[name].cpu().numpy(), dtype=np.float32) for name, _, _ in ATTRIBUTES}

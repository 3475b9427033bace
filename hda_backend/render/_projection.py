"""EWA projection of 3D Gaussians and SH colour evaluation in plain PyTorch (autograd gives the backward).

Both follow gsplat 1.5.3 (`gsplat.cuda._torch_impl._fully_fused_projection` / `_spherical_harmonics` and the
CUDA kernel `projection_ewa_3dgs_fused_fwd_kernel`) so that the CPU rasterizer and `gsplat.rasterization`
render the same image from the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's ALPHA_THRESHOLD: fainter fragments are skipped
MAX_EXTEND = 3.33  # gsplat's fixed bound on the radius, in standard deviations
FOV_MARGIN = 0.3  # the Jacobian is evaluated at the centre clamped to (1 + this) x the field of view
DET_MIN = 1e-10  # the 2D covariance's determinant is clamped here before the conic divides by it


def quat_scale_to_rs(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """R·diag(s), the factor M of the 3D covariance M·Mᵀ.

    Args:
        quats: [N,4] wxyz, normalised here.
        scales: [N,3].

    Returns:
        [N,3,3].
    """
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))
    return R * scales[..., None, :]


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    opacities: torch.Tensor | None = None,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
):
    """Pinhole EWA splatting of N Gaussians into C cameras (gsplat's fused projection, packed=False).

    Args:
        means: [N,3] world positions.
        quats: [N,4] wxyz rotations (any norm).
        scales: [N,3] standard deviations along the local axes.
        viewmats: [C,4,4] world→camera (OpenCV: x right, y down, z forward).
        Ks: [C,3,3] intrinsics; fx, fy, cx, cy are used (no skew, like gsplat's CUDA kernel).
        width, height: image size in pixels.
        opacities: [N] or None. When given, the radius uses gsplat's opacity-aware bound
            min(3.33, sqrt(2 ln(255·opacity))) and Gaussians with opacity < 1/255 get radius 0, as the
            CUDA kernel does; when None, the fixed 3.33σ bound of gsplat's PyTorch reference is used.
        eps2d: added to the diagonal of the 2D covariance (low-pass filter).
        near_plane, far_plane: depth range kept.

    Returns:
        radii: [C,N,2] int32 half-extent in pixels along x and y; 0 (both) for culled Gaussians.
        means2d: [C,N,2] pixel coordinates of the projected centres.
        depths: [C,N] camera-space z.
        conics: [C,N,3] upper triangle (a, b, c) of the inverse 2D covariance.
    """
    C, N = viewmats.shape[0], means.shape[0]
    Rv = viewmats[:, :3, :3]  # [C,3,3]
    means_c = torch.matmul(means, Rv.transpose(1, 2)) + viewmats[:, None, :3, 3]  # [C,N,3]
    # Rv·M for all cameras as one matmul; batched 3×3 products (einsum/bmm over N) are slow and erratic on CPU.
    M = quat_scale_to_rs(quats, scales)  # [N,3(j),3(k)]
    rows_c = torch.matmul(Rv, M.transpose(0, 1).reshape(3, N * 3)).reshape(C, 3, N, 3)  # [C,i,N,k]

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C,1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tx, ty, tz = means_c.unbind(-1)  # [C,N]
    # The Jacobian is evaluated at the centre clamped to 1.3× the field of view, so that Gaussians far
    # off-screen do not blow up into huge splats that cover the image.
    lim_x_pos = (width - cx) / fx + FOV_MARGIN * (0.5 * width / fx)
    lim_x_neg = cx / fx + FOV_MARGIN * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + FOV_MARGIN * (0.5 * height / fy)
    lim_y_neg = cy / fy + FOV_MARGIN * (0.5 * height / fy)
    txc = tz * torch.maximum(torch.minimum(tx / tz, lim_x_pos), -lim_x_neg)
    tyc = tz * torch.maximum(torch.minimum(ty / tz, lim_y_pos), -lim_y_neg)
    # J = [[fx/z, 0, -fx·x/z²], [0, fy/z, -fy·y/z²]]; its zeros are skipped in J·Rv·M.
    JM0 = (fx / tz)[..., None] * rows_c[:, 0] - (fx * txc / (tz * tz))[..., None] * rows_c[:, 2]  # [C,N,3]
    JM1 = (fy / tz)[..., None] * rows_c[:, 1] - (fy * tyc / (tz * tz))[..., None] * rows_c[:, 2]
    a = (JM0 * JM0).sum(-1) + eps2d  # blurred 2D covariance [[a, b], [b, c]]
    b = (JM0 * JM1).sum(-1)
    c = (JM1 * JM1).sum(-1) + eps2d
    det = (a * c - b * b).clamp(min=DET_MIN)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], dim=-1)
    depths = tz

    with torch.no_grad():
        extend = torch.full_like(tz, MAX_EXTEND)
        valid = (a * c - b * b > 0) & (depths > near_plane) & (depths < far_plane)
        if opacities is not None:
            op = opacities.detach()[None, :].expand_as(tz)
            valid &= op >= ALPHA_THRESHOLD
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log(op.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)))
        radius = torch.stack([torch.ceil(extend * torch.sqrt(a)), torch.ceil(extend * torch.sqrt(c))], dim=-1)
        m2 = means2d.detach()
        valid &= (
            (m2[..., 0] + radius[..., 0] > 0)
            & (m2[..., 0] - radius[..., 0] < width)
            & (m2[..., 1] + radius[..., 1] > 0)
            & (m2[..., 1] - radius[..., 1] < height)
        )
        radii = torch.where(valid[..., None], radius, torch.zeros_like(radius)).to(torch.int32)
    return radii, means2d, depths, conics


# Real SH basis constants of gsplat's `_eval_sh_bases_fast` (Sloan, JCGT 2013), in gsplat's basis order;
# the numba kernel (_projection_numba) reads the same tuple.
_SH_C0 = 0.2820947917738781
SH_BASIS = (
    _SH_C0,                                                       # degree 0
    0.48860251190292,                                             # degree 1
    -1.092548430592079, 0.5462742152960395, 0.9461746957575601, 0.3153915652525201,  # degree 2
    -2.285228997322329, 0.4570457994644658, 1.445305721320277, -0.5900435899266435,  # degree 3
    1.865881662950577, 1.119528997770346,
)


def _sh_bases(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """[..., (degree+1)^2] real SH basis at unit directions dirs [..., 3]."""
    B = SH_BASIS
    out = [torch.full_like(dirs[..., 0], B[0])]
    if degree >= 1:
        x, y, z = dirs.unbind(-1)
        out += [-B[1] * y, B[1] * z, -B[1] * x]
    if degree >= 2:
        z2 = z * z
        fC1 = x * x - y * y
        fS1 = 2 * x * y
        tB = B[2] * z
        out += [B[3] * fS1, tB * y, B[4] * z2 - B[5], tB * x, B[3] * fC1]
    if degree >= 3:
        tC = B[6] * z2 + B[7]
        tB = B[8] * z
        fC2 = x * fC1 - y * fS1
        fS2 = x * fS1 + y * fC1
        out += [B[9] * fS2, tB * fS1, tC * y, z * (B[10] * z2 - B[11]), tC * x, tB * fC1, B[9] * fC2]
    return torch.stack(out, dim=-1)


def spherical_harmonics(degree: int, dirs: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """View-dependent colour from SH coefficients, like gsplat's `_spherical_harmonics` (no +0.5 offset).

    Args:
        degree: SH degree 0..3 to evaluate; coefficients past (degree+1)^2 are ignored.
        dirs: [C,N,3] viewing directions (need not be unit length).
        coeffs: [N,K,3] coefficients, K >= (degree+1)^2.

    Returns:
        [C,N,3].
    """
    nb = (degree + 1) ** 2
    bases = _sh_bases(degree, F.normalize(dirs, p=2, dim=-1))  # [C,N,nb]
    # Elementwise rather than einsum, which becomes N tiny batched matmuls on CPU.
    return (bases[..., None] * coeffs[None, :, :nb, :]).sum(dim=-2)

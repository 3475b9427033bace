"""The raster step in plain PyTorch: slow, obviously correct, differentiable by autograd, any device.

Every visible Gaussian is evaluated at every pixel, in chunks taken front to back, with gsplat's rules
(see `_raster_numba`). It is the fallback when numba is missing and the twin the numba kernels are tested
against.
"""

from __future__ import annotations

import torch

_ALPHA_THRESHOLD = 1.0 / 255.0
_T_STOP = 1e-4
_ALPHA_MAX = 0.999
_CHUNK_ELEMENTS = 1 << 22  # pixels × Gaussians evaluated at once; bounds memory, not results


def rasterize_torch(
    means2d: torch.Tensor,
    conics: torch.Tensor,
    colors: torch.Tensor,
    opacities: torch.Tensor,
    radii: torch.Tensor,
    depths: torch.Tensor,
    width: int,
    height: int,
):
    """Composite projected Gaussians front to back, without background.

    Args:
        means2d: [C,N,2]; conics: [C,N,3]; colors: [C,N,D]; opacities: [C,N];
        radii: [C,N,2] (Gaussians with a zero radius are skipped); depths: [C,N] sort keys.
        width, height: image size.

    Returns:
        colors [C,H,W,D] and alphas [C,H,W,1].
    """
    device, dtype = means2d.device, means2d.dtype
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    px, py = xs.reshape(-1, 1), ys.reshape(-1, 1)  # [P,1]
    chunk = max(1, _CHUNK_ELEMENTS // (width * height))
    out_colors, out_alphas = [], []
    for c in range(depths.shape[0]):
        visible = torch.nonzero((radii[c] > 0).all(dim=-1)).squeeze(-1)
        ids = visible[torch.argsort(depths[c, visible].detach(), stable=True)]
        T = torch.ones(width * height, device=device, dtype=dtype)
        done = torch.zeros(width * height, device=device, dtype=torch.bool)
        acc = torch.zeros(width * height, colors.shape[-1], device=device, dtype=colors.dtype)
        # At least one (possibly empty) chunk, so the outputs stay in the autograd graph of the inputs
        # even when no Gaussian is visible, as with the numba and gsplat backends.
        for start in range(0, max(ids.shape[0], 1), chunk):
            g = ids[start : start + chunk]
            dx = means2d[c, g, 0] - px  # [P,G]
            dy = means2d[c, g, 1] - py
            a, b, cc = conics[c, g].unbind(-1)
            sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
            alpha = torch.clamp_max(opacities[c, g] * torch.exp(-sigma), _ALPHA_MAX)
            valid = (sigma >= 0) & (alpha >= _ALPHA_THRESHOLD)
            alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
            with torch.no_grad():
                # The Gaussian that would take T to ≤ 1e-4 is dropped and ends the pixel; T only falls,
                # so every later Gaussian of that pixel fails the same test.
                T_after = T[:, None] * torch.cumprod(1.0 - alpha, dim=1)
                keep = (T_after > _T_STOP) & ~done[:, None]
                done = done | (valid & ~keep).any(dim=1)
            alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
            one = torch.ones_like(T[:, None])
            T_before = T[:, None] * torch.cumprod(torch.cat([one, 1.0 - alpha[:, :-1]], dim=1), dim=1)
            acc = acc + (alpha * T_before) @ colors[c, g]
            T = T * torch.prod(1.0 - alpha, dim=1)
        out_colors.append(acc.reshape(height, width, -1))
        out_alphas.append((1.0 - T).reshape(height, width, 1))
    return torch.stack(out_colors), torch.stack(out_alphas)

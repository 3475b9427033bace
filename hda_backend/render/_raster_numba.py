"""Tile-based raster step compiled with numba: binning, forward compositing and the analytic backward.

The rules are gsplat's `rasterize_to_pixels` (classic 3DGS): pixel centres at +0.5, alpha = min(0.999,
opacity·exp(-σ)), fragments with σ < 0 or alpha < 1/255 skipped, a pixel stops before the Gaussian that
would bring its transmittance to ≤ 1e-4, front to back by camera depth. The backward walks each pixel's
Gaussians back to front, recovering the transmittance from the final one saved by the forward, as in
gsplat's `rasterize_to_pixels_3dgs_bwd_kernel`.

Unlike gsplat, which lets every pixel of a tile test every Gaussian binned to the tile, a tile here visits
each of its Gaussians only over the pixels of the Gaussian's bounding box: on a CPU that is the difference
between evaluating the whole tile and a few dozen pixels per splat. The box is the opacity-aware radius
from the projection, which already encloses every pixel with alpha ≥ 1/255, so the image is unchanged.

Importing this module needs numba; `rasterize` falls back to the PyTorch twin when it is missing.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

TILE_SIZE = 16
_ALPHA_THRESHOLD = 1.0 / 255.0
_T_STOP = 1e-4
_ALPHA_MAX = 0.999
# Everything of fastmath except nnan/ninf: the kernels compare σ and alpha against thresholds and must keep
# IEEE semantics there.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(cache=True)
def _bin_tiles(means2d, radii, depths, n_cams, n_gauss, width, height, tile):
    """Counting sort of (camera, tile, depth) → (offsets [C*TH*TW+1], flat_ids [n_isects])."""
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    n_tiles = tw * th
    rect = np.zeros((n_cams * n_gauss, 4), dtype=np.int32)
    counts = np.zeros(n_cams * n_tiles + 1, dtype=np.int64)
    orders = np.empty((n_cams, n_gauss), dtype=np.int64)
    for c in range(n_cams):
        # A stable sort breaks depth ties by Gaussian index, like gsplat's radix sort and the torch twin.
        orders[c] = np.argsort(depths[c * n_gauss : (c + 1) * n_gauss], kind="mergesort")
        for i in range(n_gauss):
            f = c * n_gauss + orders[c, i]
            if radii[f, 0] <= 0 or radii[f, 1] <= 0:
                continue
            mx = means2d[f, 0] / tile
            my = means2d[f, 1] / tile
            rx = radii[f, 0] / tile
            ry = radii[f, 1] / tile
            x0 = min(max(0, int(math.floor(mx - rx))), tw)
            y0 = min(max(0, int(math.floor(my - ry))), th)
            x1 = min(max(0, int(math.ceil(mx + rx))), tw)
            y1 = min(max(0, int(math.ceil(my + ry))), th)
            rect[f, 0] = x0
            rect[f, 1] = y0
            rect[f, 2] = x1
            rect[f, 3] = y1
            for ty in range(y0, y1):
                for tx in range(x0, x1):
                    counts[c * n_tiles + ty * tw + tx + 1] += 1
    offsets = np.cumsum(counts).astype(np.int32)
    flat_ids = np.empty(offsets[-1], dtype=np.int32)
    fill = offsets[:-1].copy()
    for c in range(n_cams):
        for i in range(n_gauss):
            f = c * n_gauss + orders[c, i]
            for ty in range(rect[f, 1], rect[f, 3]):
                for tx in range(rect[f, 0], rect[f, 2]):
                    t = c * n_tiles + ty * tw + tx
                    flat_ids[fill[t]] = f
                    fill[t] += 1
    return offsets, flat_ids


@njit(inline="always")
def _pixel_box(mx, my, rx, ry, x0, y0, x1, y1):
    """Pixels (inclusive bounds) of tile [x0,x1)×[y0,y1) whose centre lies within the radius box."""
    j0 = max(x0, int(math.floor(mx - rx - 0.5)))
    j1 = min(x1 - 1, int(math.ceil(mx + rx - 0.5)))
    i0 = max(y0, int(math.floor(my - ry - 0.5)))
    i1 = min(y1 - 1, int(math.ceil(my + ry - 0.5)))
    return j0, j1, i0, i1


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _forward(means2d, conics, colors, opacities, radii, offsets, flat_ids, n_cams, width, height, tile,
             out_colors, t_final, last_ids):
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    n_tiles = tw * th
    n_ch = colors.shape[1]
    for t in prange(n_cams * n_tiles):
        c = t // n_tiles
        x0 = (t % n_tiles % tw) * tile
        y0 = (t % n_tiles // tw) * tile
        x1 = min(x0 + tile, width)
        y1 = min(y0 + tile, height)
        bw = x1 - x0
        n_pix = bw * (y1 - y0)
        T = np.ones(n_pix)
        acc = np.zeros((n_pix, n_ch))
        last = np.full(n_pix, -1, dtype=np.int32)
        done = np.zeros(n_pix, dtype=np.bool_)
        n_done = 0
        for k in range(offsets[t], offsets[t + 1]):
            if n_done == n_pix:
                break
            g = flat_ids[k]
            mx = means2d[g, 0]
            my = means2d[g, 1]
            ca = conics[g, 0]
            cb = conics[g, 1]
            cc = conics[g, 2]
            op = opacities[g]
            j0, j1, i0, i1 = _pixel_box(mx, my, radii[g, 0], radii[g, 1], x0, y0, x1, y1)
            for i in range(i0, i1 + 1):
                dy = my - (i + 0.5)
                for j in range(j0, j1 + 1):
                    p = (i - y0) * bw + (j - x0)
                    if done[p]:
                        continue
                    dx = mx - (j + 0.5)
                    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    if sigma < 0.0:
                        continue
                    alpha = min(_ALPHA_MAX, op * math.exp(-sigma))
                    if alpha < _ALPHA_THRESHOLD:
                        continue
                    next_T = T[p] * (1.0 - alpha)
                    if next_T <= _T_STOP:
                        done[p] = True
                        n_done += 1
                        continue
                    w = alpha * T[p]
                    for d in range(n_ch):
                        acc[p, d] += w * colors[g, d]
                    T[p] = next_T
                    last[p] = k
        base = c * width * height
        for i in range(y0, y1):
            for j in range(x0, x1):
                p = (i - y0) * bw + (j - x0)
                q = base + i * width + j
                for d in range(n_ch):
                    out_colors[q, d] = acc[p, d]
                t_final[q] = T[p]
                last_ids[q] = last[p]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward(means2d, conics, colors, opacities, radii, offsets, flat_ids, n_cams, width, height, tile,
              t_final, last_ids, v_out_colors, v_out_alphas, v_means2d, v_conics, v_colors, v_opacities):
    """Writes each intersection's gradient to its own row k (no two tiles share a row, so no races)."""
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    n_tiles = tw * th
    n_ch = colors.shape[1]
    for t in prange(n_cams * n_tiles):
        c = t // n_tiles
        x0 = (t % n_tiles % tw) * tile
        y0 = (t % n_tiles // tw) * tile
        x1 = min(x0 + tile, width)
        y1 = min(y0 + tile, height)
        bw = x1 - x0
        n_pix = bw * (y1 - y0)
        T = np.empty(n_pix)
        T_fin = np.empty(n_pix)
        last = np.empty(n_pix, dtype=np.int32)
        v_c = np.empty((n_pix, n_ch))
        v_a = np.empty(n_pix)
        buf = np.zeros((n_pix, n_ch))
        k_max = -1
        base = c * width * height
        for i in range(y0, y1):
            for j in range(x0, x1):
                p = (i - y0) * bw + (j - x0)
                q = base + i * width + j
                T[p] = t_final[q]
                T_fin[p] = t_final[q]
                last[p] = last_ids[q]
                k_max = max(k_max, last_ids[q])
                v_a[p] = v_out_alphas[q]
                for d in range(n_ch):
                    v_c[p, d] = v_out_colors[q, d]
        for k in range(k_max, offsets[t] - 1, -1):
            g = flat_ids[k]
            mx = means2d[g, 0]
            my = means2d[g, 1]
            ca = conics[g, 0]
            cb = conics[g, 1]
            cc = conics[g, 2]
            op = opacities[g]
            g_x = 0.0
            g_y = 0.0
            g_a = 0.0
            g_b = 0.0
            g_c = 0.0
            g_o = 0.0
            j0, j1, i0, i1 = _pixel_box(mx, my, radii[g, 0], radii[g, 1], x0, y0, x1, y1)
            for i in range(i0, i1 + 1):
                dy = my - (i + 0.5)
                for j in range(j0, j1 + 1):
                    p = (i - y0) * bw + (j - x0)
                    if k > last[p]:
                        continue
                    dx = mx - (j + 0.5)
                    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    if sigma < 0.0:
                        continue
                    vis = math.exp(-sigma)
                    alpha = min(_ALPHA_MAX, op * vis)
                    if alpha < _ALPHA_THRESHOLD:
                        continue
                    ra = 1.0 / (1.0 - alpha)
                    T[p] *= ra
                    fac = alpha * T[p]
                    v_alpha = T_fin[p] * ra * v_a[p]
                    for d in range(n_ch):
                        v_colors[k, d] += fac * v_c[p, d]
                        v_alpha += (colors[g, d] * T[p] - buf[p, d] * ra) * v_c[p, d]
                        buf[p, d] += colors[g, d] * fac
                    # Where alpha is clamped at 0.999 it no longer depends on σ or opacity.
                    if op * vis <= _ALPHA_MAX:
                        v_sigma = -op * vis * v_alpha
                        g_a += 0.5 * v_sigma * dx * dx
                        g_b += v_sigma * dx * dy
                        g_c += 0.5 * v_sigma * dy * dy
                        g_x += v_sigma * (ca * dx + cb * dy)
                        g_y += v_sigma * (cb * dx + cc * dy)
                        g_o += vis * v_alpha
            v_means2d[k, 0] = g_x
            v_means2d[k, 1] = g_y
            v_conics[k, 0] = g_a
            v_conics[k, 1] = g_b
            v_conics[k, 2] = g_c
            v_opacities[k] = g_o


@njit(cache=True)
def _scatter_add(flat_ids, src, dst):
    for k in range(flat_ids.shape[0]):
        g = flat_ids[k]
        for d in range(src.shape[1]):
            dst[g, d] += src[k, d]


def _f32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to(torch.float32).numpy())


def _use_torch_threads() -> None:
    # Follow torch's thread count so that one knob (torch.set_num_threads, OMP_NUM_THREADS) limits both.
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def bin_tiles(means2d: torch.Tensor, radii: torch.Tensor, depths: torch.Tensor, width: int, height: int):
    """Depth-sorted per-tile lists of the visible Gaussians (16×16 tiles).

    Args:
        means2d: [C,N,2]; radii: [C,N,2] int; depths: [C,N].

    Returns:
        isect_offsets: [C,TH,TW] int32 start of each tile's run in flatten_ids (gsplat's layout).
        flatten_ids: [n_isects] int32 indices into the flattened [C*N] Gaussians, per tile front to back.
    """
    C, N = depths.shape
    offsets, flat_ids = _bin_tiles(
        _f32(means2d).reshape(C * N, 2),
        np.ascontiguousarray(radii.detach().to(torch.int32).numpy()).reshape(C * N, 2),
        _f32(depths).reshape(C * N),
        C, N, width, height, TILE_SIZE,
    )
    th, tw = -(-height // TILE_SIZE), -(-width // TILE_SIZE)
    return torch.from_numpy(offsets[:-1]).reshape(C, th, tw), torch.from_numpy(flat_ids)


class NumbaRasterize(torch.autograd.Function):
    """(means2d, conics, colors, opacities) → (render colors, render alphas), composited without background.

    Inputs: means2d [C,N,2], conics [C,N,3], colors [C,N,D], opacities [C,N], radii [C,N,2] int32,
    isect_offsets [C,TH,TW], flatten_ids [n_isects] (from `bin_tiles`), width, height.
    Outputs: colors [C,H,W,D], alphas [C,H,W,1]. Computed in float32; gradients come back in the
    inputs' dtype.
    """

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, radii, isect_offsets, flatten_ids, width, height):
        _use_torch_threads()
        C, N, D = colors.shape
        t_final = np.empty(C * height * width, dtype=np.float32)
        last_ids = np.empty(C * height * width, dtype=np.int32)
        out_colors = np.empty((C * height * width, D), dtype=np.float32)
        arrays = _kernel_inputs(means2d, conics, colors, opacities, radii, isect_offsets, flatten_ids)
        _forward(*arrays, C, width, height, TILE_SIZE, out_colors, t_final, last_ids)
        t_final_t, last_ids_t = torch.from_numpy(t_final), torch.from_numpy(last_ids)
        ctx.save_for_backward(
            means2d, conics, colors, opacities, radii, isect_offsets, flatten_ids, t_final_t, last_ids_t
        )
        ctx.size = (width, height)
        render_colors = torch.from_numpy(out_colors).reshape(C, height, width, D).to(colors.dtype)
        render_alphas = (1.0 - t_final_t).reshape(C, height, width, 1).to(colors.dtype)
        return render_colors, render_alphas

    @staticmethod
    def backward(ctx, v_render_colors, v_render_alphas):
        _use_torch_threads()
        means2d, conics, colors, opacities, radii, isect_offsets, flatten_ids, t_final, last_ids = ctx.saved_tensors
        width, height = ctx.size
        C, N, D = colors.shape
        arrays = _kernel_inputs(means2d, conics, colors, opacities, radii, isect_offsets, flatten_ids)
        n_isects = flatten_ids.shape[0]
        per_isect = [np.zeros((n_isects, n), dtype=np.float32) for n in (2, 3, D, 1)]
        v_m, v_con, v_col, v_op = per_isect
        _backward(
            *arrays, C, width, height, TILE_SIZE, t_final.numpy(), last_ids.numpy(),
            _f32(v_render_colors).reshape(-1, D), _f32(v_render_alphas).reshape(-1),
            v_m, v_con, v_col, v_op.reshape(-1),
        )
        grads = []
        for src, like in zip(per_isect, (means2d, conics, colors, opacities)):
            dst = np.zeros((C * N, src.shape[1]), dtype=np.float32)
            _scatter_add(arrays[-1], src, dst)
            grads.append(torch.from_numpy(dst).reshape(like.shape).to(like.dtype))
        return (*grads, None, None, None, None, None)


def _kernel_inputs(means2d, conics, colors, opacities, radii, isect_offsets, flatten_ids):
    C, N, D = colors.shape
    return (
        _f32(means2d).reshape(C * N, 2),
        _f32(conics).reshape(C * N, 3),
        _f32(colors).reshape(C * N, D),
        _f32(opacities).reshape(C * N),
        np.ascontiguousarray(radii.to(torch.int32).numpy()).reshape(C * N, 2),
        np.append(isect_offsets.numpy().reshape(-1), np.int32(flatten_ids.shape[0])).astype(np.int32),
        np.ascontiguousarray(flatten_ids.numpy()),
    )

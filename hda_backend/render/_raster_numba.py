"""Tile-based raster step compiled with numba: binning, forward compositing and the analytic backward.

The rules are gsplat's `rasterize_to_pixels` (classic 3DGS): pixel centres at +0.5, alpha = min(0.999,
opacity·exp(-σ)), fragments with σ < 0 or alpha < 1/255 skipped, a pixel stops before the Gaussian that
would bring its transmittance to ≤ 1e-4, front to back by camera depth. The backward walks each pixel's
Gaussians back to front, recovering the transmittance from the final one saved by the forward, as in
gsplat's `rasterize_to_pixels_3dgs_bwd_kernel`.

Unlike gsplat, which lets every pixel of a tile test every Gaussian binned to the tile, a tile here visits
each of its Gaussians only over the rows its alpha ≥ 1/255 ellipse reaches, and binning drops the tiles of
the radius box that the ellipse misses; the pixels skipped are exactly those gsplat would reject, so the
image is unchanged.

Importing this module needs numba; `rasterize` falls back to the PyTorch twin when it is missing.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from ._projection import ALPHA_THRESHOLD

TILE_SIZE = 16
_TILES_PER_CHUNK = 4
# The kernels compute in float32 (like gsplat): twice the SIMD lanes of float64. Every constant is a
# float32 global, since a Python float literal would promote the arithmetic to float64.
_F32 = np.float32
_ZERO = _F32(0.0)
_HALF = _F32(0.5)
_ONE = _F32(1.0)
_ALPHA_THRESHOLD = _F32(ALPHA_THRESHOLD)
_T_STOP = _F32(1e-4)
_ALPHA_MAX = _F32(0.999)
# exp(-σ) below 1/255 is rejected, so σ can be clamped a little past gsplat's 3.33-standard-deviation bound.
_SIGMA_CLAMP = _F32(0.5 * 3.33 * 3.33 + 1.0)
_EXP_COEFFS = tuple(_F32(1.0 / math.factorial(i)) for i in range(9))
_EIGHTH = _F32(-0.125)
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Parallel kernels launch one at a time in a process: numba's workqueue threading layer (the one left
# where neither TBB nor OpenMP is installed) aborts the process when two threads launch at once, and the
# viewport's worker rasterizes while Blender's main thread may render a layer. Each launch uses every
# core already, so nothing is lost by taking turns.
_LAUNCH = threading.Lock()


@njit(parallel=True, cache=True)
def _bin_tiles(means2d, conics, opacities, radii, depths, n_cams, n_gauss, width, height, tile):
    """Counting sort of (camera, tile, depth) → (offsets [C*TH*TW+1], flat_ids [n_isects]).

    Candidate tiles are those of the radius box, as in gsplat; of those, a tile is kept only if the
    Gaussian's alpha ≥ 1/255 ellipse reaches one of its pixel centres (about a fifth of the box's tiles
    are corners the ellipse misses). The ellipse tests run in parallel; the sort itself is sequential.
    """
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    n_tiles = tw * th
    n_all = n_cams * n_gauss
    rect = np.zeros((n_all, 4), dtype=np.int64)
    n_cand = np.zeros(n_all + 1, dtype=np.int64)
    for f in prange(n_all):
        if radii[f, 0] > 0 and radii[f, 1] > 0:
            mx = means2d[f, 0] / tile
            my = means2d[f, 1] / tile
            rx = radii[f, 0] / tile
            ry = radii[f, 1] / tile
            rect[f, 0] = min(max(0, int(math.floor(mx - rx))), tw)
            rect[f, 1] = min(max(0, int(math.floor(my - ry))), th)
            rect[f, 2] = min(max(0, int(math.ceil(mx + rx))), tw)
            rect[f, 3] = min(max(0, int(math.ceil(my + ry))), th)
            n_cand[f + 1] = (rect[f, 2] - rect[f, 0]) * (rect[f, 3] - rect[f, 1])
    cand_start = np.cumsum(n_cand)
    hits = np.zeros(cand_start[-1], dtype=np.bool_)
    for f in prange(n_all):
        if n_cand[f + 1] == 0:
            continue  # culled
        n_cols = rect[f, 2] - rect[f, 0]
        sigma_max = _sigma_max(opacities[f])
        for tx in range(rect[f, 0], rect[f, 2]):
            # The rows the ellipse reaches in this column of tiles, over the whole image height.
            x0 = tx * tile
            i0, i1 = _ellipse_rows(means2d[f, 0], means2d[f, 1], conics[f, 0], conics[f, 1], conics[f, 2],
                                   sigma_max, x0, 0, min(tile, width - x0), height)
            for ty in range(rect[f, 1], rect[f, 3]):
                j = cand_start[f] + (ty - rect[f, 1]) * n_cols + tx - rect[f, 0]
                hits[j] = i0 <= min(ty * tile + tile, height) - 1 and i1 >= ty * tile
    orders = np.empty((n_cams, n_gauss), dtype=np.int64)
    counts = np.zeros(n_cams * n_tiles + 1, dtype=np.int64)
    for c in range(n_cams):
        orders[c] = c * n_gauss + _argsort_depths(depths[c * n_gauss : (c + 1) * n_gauss])
        for f in orders[c]:
            j = cand_start[f]
            for ty in range(rect[f, 1], rect[f, 3]):
                for tx in range(rect[f, 0], rect[f, 2]):
                    counts[c * n_tiles + ty * tw + tx + 1] += hits[j]
                    j += 1
    offsets = np.cumsum(counts).astype(np.int32)
    flat_ids = np.empty(offsets[-1], dtype=np.int32)
    fill = offsets[:-1].copy()
    for c in range(n_cams):
        for f in orders[c]:
            j = cand_start[f]
            for ty in range(rect[f, 1], rect[f, 3]):
                for tx in range(rect[f, 0], rect[f, 2]):
                    if hits[j]:
                        t = c * n_tiles + ty * tw + tx
                        flat_ids[fill[t]] = f
                        fill[t] += 1
                    j += 1
    return offsets, flat_ids


@njit(cache=True)
def _argsort_depths(depths):
    """Stable argsort of float32 depths, by LSD radix sort on their bit patterns (three 11-bit passes).

    Non-negative floats order like their bits, and every visible Gaussian is in front of the near plane
    (negative depths, all culled, sort last; culled Gaussians are skipped anyway). Stable, so depth ties
    keep Gaussian order, like gsplat's radix sort and the torch twin. ~10× faster than np.argsort here.
    """
    keys = depths.view(np.uint32)
    n = keys.shape[0]
    idx = np.arange(n)
    tmp = np.empty(n, dtype=np.int64)
    for shift in range(0, 33, 11):
        start = np.zeros(2049, dtype=np.int64)
        for i in range(n):
            start[((keys[i] >> shift) & 2047) + 1] += 1
        for b in range(2048):
            start[b + 1] += start[b]
        for i in range(n):
            j = idx[i]
            bucket = (keys[j] >> shift) & 2047
            tmp[start[bucket]] = j
            start[bucket] += 1
        idx, tmp = tmp, idx
    return idx


@njit(inline="always")
def _sigma_max(op):
    """σ beyond which alpha = opacity·exp(-σ) < 1/255, plus slack for float32 and the exp polynomial."""
    return math.log(op / _ALPHA_THRESHOLD) + 1e-3


@njit(inline="always")
def _ellipse_rows(mx, my, ca, cb, cc, sigma_max, x0, y0, bw, bh):
    """Rows (absolute, inclusive; empty if i1 < i0) of the bw×bh pixel block at (x0, y0) that have a pixel
    centre with σ <= sigma_max: the vertical extent of that ellipse over the block's columns.

    On the vertical line dx = X the ellipse spans dy = (-b·X ± sqrt(b²X² - c·(a·X² - 2σmax))) / c. Its top
    and bottom are reached at X = ∓(b/a)·extent; over a strip of columns, at that X clamped to the strip.
    """
    det = ca * cc - cb * cb
    x_lo = x0 + 0.5 - mx
    x_hi = x0 + bw - 0.5 - mx
    x_top = -cb / ca * math.sqrt(2.0 * sigma_max * ca / det)
    X = min(max(x_top, x_lo), x_hi)
    disc = cb * cb * X * X - cc * (ca * X * X - 2.0 * sigma_max)
    X2 = min(max(-x_top, x_lo), x_hi)
    disc2 = cb * cb * X2 * X2 - cc * (ca * X2 * X2 - 2.0 * sigma_max)
    if disc < 0.0 or disc2 < 0.0:
        return y0, y0 - 1
    dy_hi = (-cb * X + math.sqrt(disc)) / cc
    dy_lo = (-cb * X2 - math.sqrt(disc2)) / cc
    i0 = max(y0, int(math.ceil(my + dy_lo - 0.5 - 1e-3)))
    i1 = min(y0 + bh - 1, int(math.floor(my + dy_hi - 0.5 + 1e-3)))
    return i0, i1


@njit(inline="always")
def _exp_neg(s):
    """exp(-s) to 2e-6 relative for 0 <= s <= 6.6: Taylor series of exp(-s/8), raised to the 8th power.

    Plain arithmetic, so LLVM vectorises the pixel loops that use it; numba's math.exp is a scalar libm call
    (no SVML) and would cost most of the kernel.
    """
    c0, c1, c2, c3, c4, c5, c6, c7, c8 = _EXP_COEFFS
    x = _EIGHTH * s
    p = c0 + x * (c1 + x * (c2 + x * (c3 + x * (c4 + x * (c5 + x * (c6 + x * (c7 + x * c8)))))))
    p = p * p
    p = p * p
    return p * p


@njit(inline="always")
def _alpha(mx, my, ca, cb, cc, op, px, py):
    """(alpha, exp(-σ), dx, dy, valid) of one Gaussian at one pixel centre, branch-free for vectorising."""
    dx = mx - px
    dy = my - py
    sigma = _HALF * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    vis = _exp_neg(min(max(sigma, _ZERO), _SIGMA_CLAMP))  # clamped to the polynomial's accurate range
    alpha = min(_ALPHA_MAX, op * vis)
    return alpha, vis, dx, dy, (sigma >= _ZERO) & (alpha >= _ALPHA_THRESHOLD)


@njit(inline="always")
def _tile_origin(t, n_tiles, tw, tile, width, height):
    """(camera, x0, y0, width, height) of tile t; tiles at the right and bottom edges may be partial."""
    c = t // n_tiles
    x0 = (t % n_tiles % tw) * tile
    y0 = (t % n_tiles // tw) * tile
    return c, x0, y0, min(x0 + tile, width) - x0, min(y0 + tile, height) - y0


@njit(inline="always")
def _tile_geometry(t, n_tiles, tw, tile, width, height):
    """_tile_origin plus the pixel centres px, py [bw*bh] of the tile, row-major."""
    c, x0, y0, bw, bh = _tile_origin(t, n_tiles, tw, tile, width, height)
    px = np.empty(bw * bh, dtype=np.float32)
    py = np.empty(bw * bh, dtype=np.float32)
    for p in range(bw * bh):
        px[p] = x0 + p % bw + 0.5
        py[p] = y0 + p // bw + 0.5
    return c, x0, y0, bw, bh, px, py


# The kernels below work on whole tile rows: every loop over pixels runs over a slice starting at index 0
# with selects instead of branches and touches few arrays, which is the shape LLVM vectorises (a loop over
# range(a, b), with `continue`, or writing many arrays stays scalar and is ~5× slower).


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _forward(means2d, conics, colors, opacities, offsets, flat_ids, order, n_cams, width, height, tile,
             out_colors, t_final, last_ids):
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    n_tiles = tw * th
    n_ch = colors.shape[1]
    for i in prange(order.shape[0]):
        t = order[i]
        if offsets[t] == offsets[t + 1]:
            # Most tiles of an avatar frame are empty: write them without setting up any tile state.
            c, x0, y0, bw, bh = _tile_origin(t, n_tiles, tw, tile, width, height)
            for p in range(bw * bh):
                q = c * width * height + (y0 + p // bw) * width + x0 + p % bw
                for d in range(n_ch):
                    out_colors[q, d] = _ZERO
                t_final[q] = _ONE
                last_ids[q] = -1
            continue
        c, x0, y0, bw, bh, px_all, py_all = _tile_geometry(t, n_tiles, tw, tile, width, height)
        n_pix = bw * bh
        # A pixel that stops keeps its final T negated: T > 0 means still compositing.
        T_all = np.ones(n_pix, dtype=np.float32)
        last_all = np.full(n_pix, -1, dtype=np.int32)
        w_all = np.empty(n_pix, dtype=np.float32)
        acc = np.zeros((n_ch, n_pix), dtype=np.float32)
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
            k32 = np.int32(k)
            i0, i1 = _ellipse_rows(mx, my, ca, cb, cc, _sigma_max(op), x0, y0, bw, bh)
            a = (i0 - y0) * bw
            b = (i1 - y0 + 1) * bw
            if b <= a:
                continue
            px = px_all[a:b]
            py = py_all[a:b]
            T = T_all[a:b]
            last = last_all[a:b]
            w = w_all[a:b]
            for q in range(b - a):
                alpha, vis, dx, dy, valid = _alpha(mx, my, ca, cb, cc, op, px[q], py[q])
                tq = T[q]
                next_T = tq * (_ONE - alpha)
                live = valid & (tq > _ZERO)
                contrib = live & (next_T > _T_STOP)
                stop = live & (next_T <= _T_STOP)
                w[q] = alpha * tq if contrib else _ZERO
                last[q] = k32 if contrib else last[q]
                T[q] = next_T if contrib else (-tq if stop else tq)
                n_done += stop
            for d in range(n_ch):
                col = colors[g, d]
                acc_d = acc[d, a:b]
                for q in range(b - a):
                    acc_d[q] += w[q] * col
        base = c * width * height
        for p in range(n_pix):
            q = base + (y0 + p // bw) * width + x0 + p % bw
            for d in range(n_ch):
                out_colors[q, d] = acc[d, p]
            t_final[q] = abs(T_all[p])
            last_ids[q] = last_all[p]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward(means2d, conics, colors, opacities, offsets, flat_ids, order, n_cams, width, height, tile,
              t_final, last_ids, v_out_colors, v_out_alphas, v_means2d, v_conics, v_colors, v_opacities):
    """Writes each intersection's gradient to its own row k (no two tiles share a row, so no races)."""
    tw = (width + tile - 1) // tile
    th = (height + tile - 1) // tile
    n_tiles = tw * th
    n_ch = colors.shape[1]
    for i in prange(order.shape[0]):
        t = order[i]
        c, x0, y0, bw, bh = _tile_origin(t, n_tiles, tw, tile, width, height)
        base = c * width * height
        k_max = -1
        for p in range(bw * bh):
            k_max = max(k_max, last_ids[base + (y0 + p // bw) * width + x0 + p % bw])
        if k_max < offsets[t]:
            continue  # no pixel of the tile composited anything
        c, x0, y0, bw, bh, px_all, py_all = _tile_geometry(t, n_tiles, tw, tile, width, height)
        n_pix = bw * bh
        T_all = np.empty(n_pix, dtype=np.float32)
        T_fin_all = np.empty(n_pix, dtype=np.float32)
        last_all = np.empty(n_pix, dtype=np.int32)
        v_a_all = np.empty(n_pix, dtype=np.float32)
        v_c = np.empty((n_ch, n_pix), dtype=np.float32)
        buf = np.zeros((n_ch, n_pix), dtype=np.float32)  # Σ colour·weight of the Gaussians behind
        fac_all = np.empty(n_pix, dtype=np.float32)
        ra_all = np.empty(n_pix, dtype=np.float32)
        v_alpha_all = np.empty(n_pix, dtype=np.float32)
        for p in range(n_pix):
            q = base + (y0 + p // bw) * width + x0 + p % bw
            T_all[p] = t_final[q]
            T_fin_all[p] = t_final[q]
            last_all[p] = last_ids[q]
            v_a_all[p] = v_out_alphas[q]
            for d in range(n_ch):
                v_c[d, p] = v_out_colors[q, d]
        for k in range(k_max, offsets[t] - 1, -1):
            g = flat_ids[k]
            mx = means2d[g, 0]
            my = means2d[g, 1]
            ca = conics[g, 0]
            cb = conics[g, 1]
            cc = conics[g, 2]
            op = opacities[g]
            i0, i1 = _ellipse_rows(mx, my, ca, cb, cc, _sigma_max(op), x0, y0, bw, bh)
            a = (i0 - y0) * bw
            b = (i1 - y0 + 1) * bw
            if b <= a:
                continue
            px = px_all[a:b]
            py = py_all[a:b]
            T = T_all[a:b]
            T_fin = T_fin_all[a:b]
            last = last_all[a:b]
            v_a = v_a_all[a:b]
            fac = fac_all[a:b]
            ra = ra_all[a:b]
            v_alpha = v_alpha_all[a:b]
            for q in range(b - a):
                alpha, vis, dx, dy, valid = _alpha(mx, my, ca, cb, cc, op, px[q], py[q])
                used = valid & (k <= last[q])
                r = _ONE / (_ONE - alpha) if used else _ZERO
                T[q] = T[q] * r if used else T[q]
                fac[q] = alpha * T[q] if used else _ZERO
                ra[q] = r
                v_alpha[q] = T_fin[q] * r * v_a[q]
            for d in range(n_ch):
                col = colors[g, d]
                v_c_d = v_c[d, a:b]
                buf_d = buf[d, a:b]
                v_col = _ZERO
                for q in range(b - a):
                    v_col += fac[q] * v_c_d[q]
                    # Where the Gaussian is unused ra is 0 and v_alpha is masked out below.
                    v_alpha[q] += (col * T[q] - buf_d[q] * ra[q]) * v_c_d[q]
                    buf_d[q] += col * fac[q]
                v_colors[k, d] = v_col
            g_x = _ZERO
            g_y = _ZERO
            g_a = _ZERO
            g_b = _ZERO
            g_c = _ZERO
            g_o = _ZERO
            for q in range(b - a):
                alpha, vis, dx, dy, valid = _alpha(mx, my, ca, cb, cc, op, px[q], py[q])
                # Where alpha is clamped at 0.999 it no longer depends on σ or opacity.
                live = (ra[q] != _ZERO) & (op * vis <= _ALPHA_MAX)
                v_sigma = -op * vis * v_alpha[q] if live else _ZERO
                g_a += _HALF * v_sigma * dx * dx
                g_b += v_sigma * dx * dy
                g_c += _HALF * v_sigma * dy * dy
                g_x += v_sigma * (ca * dx + cb * dy)
                g_y += v_sigma * (cb * dx + cc * dy)
                g_o += vis * v_alpha[q] if live else _ZERO
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


def bin_tiles(means2d, conics, opacities, radii, depths, width: int, height: int):
    """Depth-sorted per-tile lists of the visible Gaussians (16×16 tiles).

    Args:
        means2d: [C,N,2]; conics: [C,N,3]; opacities: [C,N]; radii: [C,N,2] int; depths: [C,N].

    Returns:
        isect_offsets: [C,TH,TW] int32 start of each tile's run in flatten_ids (gsplat's layout).
        flatten_ids: [n_isects] int32 indices into the flattened [C*N] Gaussians, per tile front to back.
    """
    C, N = depths.shape
    offsets, flat_ids = _run_parallel(
        _bin_tiles,
        _f32(means2d).reshape(C * N, 2),
        _f32(conics).reshape(C * N, 3),
        _f32(opacities).reshape(C * N),
        np.ascontiguousarray(radii.detach().to(torch.int32).numpy()).reshape(C * N, 2),
        _f32(depths).reshape(C * N),
        C, N, width, height, TILE_SIZE,
        tiles_per_chunk=0,
    )
    th, tw = -(-height // TILE_SIZE), -(-width // TILE_SIZE)
    return torch.from_numpy(offsets[:-1]).reshape(C, th, tw), torch.from_numpy(flat_ids)


class NumbaRasterize(torch.autograd.Function):
    """(means2d, conics, colors, opacities) → (render colors, render alphas), composited without background.

    Inputs: means2d [C,N,2], conics [C,N,3], colors [C,N,D], opacities [C,N], isect_offsets [C,TH,TW] and
    flatten_ids [n_isects] (from `bin_tiles`), width, height.
    Outputs: colors [C,H,W,D], alphas [C,H,W,1]. Computed in float32; gradients come back in the
    inputs' dtype.
    """

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, isect_offsets, flatten_ids, width, height):
        C, N, D = colors.shape
        t_final = np.empty(C * height * width, dtype=np.float32)
        last_ids = np.empty(C * height * width, dtype=np.int32)
        out_colors = np.empty((C * height * width, D), dtype=np.float32)
        arrays = _kernel_inputs(means2d, conics, colors, opacities, isect_offsets, flatten_ids)
        _run_parallel(_forward, *arrays, C, width, height, TILE_SIZE, out_colors, t_final, last_ids)
        t_final_t, last_ids_t = torch.from_numpy(t_final), torch.from_numpy(last_ids)
        ctx.save_for_backward(
            means2d, conics, colors, opacities, isect_offsets, flatten_ids, t_final_t, last_ids_t
        )
        ctx.size = (width, height)
        render_colors = torch.from_numpy(out_colors).reshape(C, height, width, D).to(colors.dtype)
        render_alphas = (1.0 - t_final_t).reshape(C, height, width, 1).to(colors.dtype)
        return render_colors, render_alphas

    @staticmethod
    def backward(ctx, v_render_colors, v_render_alphas):
        means2d, conics, colors, opacities, isect_offsets, flatten_ids, t_final, last_ids = ctx.saved_tensors
        width, height = ctx.size
        C, N, D = colors.shape
        arrays = _kernel_inputs(means2d, conics, colors, opacities, isect_offsets, flatten_ids)
        n_isects = flatten_ids.shape[0]
        per_isect = [np.zeros((n_isects, n), dtype=np.float32) for n in (2, 3, D, 1)]
        v_m, v_con, v_col, v_op = per_isect
        _run_parallel(
            _backward, *arrays, C, width, height, TILE_SIZE, t_final.numpy(), last_ids.numpy(),
            _f32(v_render_colors).reshape(-1, D), _f32(v_render_alphas).reshape(-1),
            v_m, v_con, v_col, v_op.reshape(-1),
        )
        grads = []
        for src, like in zip(per_isect, (means2d, conics, colors, opacities)):
            dst = np.zeros((C * N, src.shape[1]), dtype=np.float32)
            _scatter_add(arrays[5], src, dst)
            grads.append(torch.from_numpy(dst).reshape(like.shape).to(like.dtype))
        return (*grads, None, None, None, None)


def _kernel_inputs(means2d, conics, colors, opacities, isect_offsets, flatten_ids):
    C, N, D = colors.shape
    offsets = np.append(isect_offsets.numpy().reshape(-1), np.int32(flatten_ids.shape[0])).astype(np.int32)
    # Busiest tiles first, handed out in small chunks: the figure fills the middle of the frame, and the
    # default static split into one contiguous block per thread leaves a thread idle.
    order = np.argsort(-np.diff(offsets), kind="stable")
    return (
        _f32(means2d).reshape(C * N, 2),
        _f32(conics).reshape(C * N, 3),
        _f32(colors).reshape(C * N, D),
        _f32(opacities).reshape(C * N),
        offsets,
        np.ascontiguousarray(flatten_ids.numpy()),
        order,
    )


def _run_parallel(kernel, *args, tiles_per_chunk: int = _TILES_PER_CHUNK):
    """Call a parallel kernel with torch's thread count (one knob, torch.set_num_threads or
    OMP_NUM_THREADS, limits both) and dynamic scheduling in chunks of tiles_per_chunk (0: static)."""
    with _LAUNCH:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        previous = numba.set_parallel_chunksize(tiles_per_chunk)
        try:
            return kernel(*args)
        finally:
            numba.set_parallel_chunksize(previous)

"""Rasterizer output -> a compositing layer: linear premultiplied RGBA and a depth pass.

An avatar's colours are display (sRGB-encoded) values, the space its training images were in, so the
layer linearises them; Blender's view transform (Standard) turns them back into the colours the
backend renders. Rows run top to bottom, like the rasterizer's images.

:func:`to_layer` is the fast path and :func:`to_layer_reference` its slow, obviously correct twin
(``tests/test_realtime.py`` compares them): the fast one converts only the bounding box of the pixels
the avatar covers. Outside that box the alpha is exactly 0, so the twin gives RGBA 0 and
depth :data:`DEPTH_FAR` there too.
"""

from __future__ import annotations

import numpy as np

DEPTH_FAR = 1.0e10      # depth of empty pixels: behind everything (Blender's background depth)
ALPHA_EMPTY = 1.0e-4    # below this coverage a pixel has no avatar depth


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0,1] (an array or a sequence) -> linear (the IEC 61966-2-1 curve)."""
    c = np.asarray(c)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def to_layer_reference(rgb: np.ndarray, alpha: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rgb [H,W,3] premultiplied display colours, alpha [H,W], depth [H,W] expected depth (0 where
    empty) -> (rgba [H,W,4] float32 linear premultiplied, depth [H,W] float32, DEPTH_FAR where the
    avatar does not cover the pixel), converting every pixel."""
    a = np.clip(alpha, 0.0, 1.0)
    straight = np.clip(rgb / np.maximum(a, 1e-6)[..., None], 0.0, 1.0)
    rgba = np.empty(rgb.shape[:2] + (4,), dtype=np.float32)
    rgba[..., :3] = srgb_to_linear(straight) * a[..., None]
    rgba[..., 3] = a
    z = np.where(a > ALPHA_EMPTY, depth, DEPTH_FAR).astype(np.float32)
    return rgba, z


def covered_box(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """(rows, columns) slices of the smallest box holding every pixel with alpha > 0, or None."""
    rows = np.flatnonzero(alpha.max(1) > 0)
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha[rows[0]:rows[-1] + 1].max(0) > 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def to_layer(rgb: np.ndarray, alpha: np.ndarray, depth: np.ndarray,
             dtype=np.float32, planar: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The values of :func:`to_layer_reference`, converting only the covered box.

    rgb [H,W,3], alpha [H,W], depth [H,W] float32 as the twin's. ``dtype``: of the RGBA (float16 for the
    layer file and the frame cache, which store colour in half: made so directly, without a float32
    frame to convert). ``planar``: the RGBA [H,W,4] is a view of channel planes [4,H,W] in memory (the
    EXR file's layout, so ``exr.layer_channels`` takes them without a copy); otherwise it is
    C-contiguous (what the viewport uploads as a texture). Both arrays are returned read-only (the
    frame cache, the viewport and the layer writer share them).

    For float32 input, bit for bit the twin's float32 values (rounded once to half for float16): the same float32
    operations in the same order, arranged for speed. The box is worked on channel-first, so every
    operation runs over whole rows (the twin's [...,3] layout broadcasts alpha over an axis of 3);
    torch divides (reading the rasterizer's strided RGB, which numpy does not vectorise) and clamps
    (numpy's clip is several times slower); numpy's vectorised power does the sRGB curve (torch's is
    slower); and torch writes the result into the layer, which makes the float16 rounding a vectorised
    conversion (numpy's float32 -> float16 cast is scalar)."""
    import torch  # here, not at the top: Blender-side code imports this module where torch may be missing

    h, w = alpha.shape
    if planar:
        rgba = np.zeros((4, h, w), dtype=dtype).transpose(1, 2, 0)
    else:
        rgba = np.zeros((h, w, 4), dtype=dtype)
    z = np.full((h, w), DEPTH_FAR, dtype=np.float32)
    box = covered_box(alpha)
    if box is not None:
        ta = torch.from_numpy(np.asarray(alpha[box], dtype=np.float32)).clamp(0.0, 1.0)
        a = ta.numpy()
        straight = torch.empty((3,) + a.shape)  # [3,h,w]: channel planes of the box
        torch.div(torch.from_numpy(np.asarray(rgb[box], dtype=np.float32)).permute(2, 0, 1), ta.clamp_min(1e-6),
                  out=straight)
        linear = _srgb_to_linear_into(straight.clamp_(0.0, 1.0).numpy())
        linear *= a
        out = torch.from_numpy(rgba[box]).permute(2, 0, 1)  # [4,h,w] view of the layer's box
        out[:3] = torch.from_numpy(linear)
        out[3] = ta
        z[box] = np.where(a > ALPHA_EMPTY, depth[box], DEPTH_FAR)
    rgba.flags.writeable = False
    z.flags.writeable = False
    return rgba, z


def _srgb_to_linear_into(c: np.ndarray) -> np.ndarray:
    """:func:`srgb_to_linear` of float32 ``c`` with float32 constants (the twin's arithmetic on float32
    arrays) and fewer temporaries; ``c`` is overwritten (it ends as c / 12.92)."""
    linear = c + np.float32(0.055)
    linear /= np.float32(1.055)
    np.power(linear, np.float32(2.4), out=linear)
    low = c <= np.float32(0.04045)
    c /= np.float32(12.92)
    np.copyto(linear, c, where=low)
    return linear

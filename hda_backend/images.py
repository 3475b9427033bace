"""Writing pictures: RGBA PNG frames (atomically) and contact sheets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .atomic import replacing


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H,W,C] floats in [0,1] -> uint8 [H,W,C]."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def unpremultiply(rgb: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A render's premultiplied rgb [...,3] and alpha [...,1] -> straight-alpha RGBA [...,4], as PNG expects
    (colour divided by alpha, floored at ``eps`` where nothing covers the pixel)."""
    return torch.cat([rgb / alpha.clamp_min(eps), alpha], dim=-1)


def save_png(path: str | os.PathLike, image) -> Path:
    """Save [H,W,3|4] floats in [0,1] (or uint8) as PNG via a temporary file and a rename."""
    array = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 else to_uint8(image)
    with replacing(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def error_heat(render: torch.Tensor, image: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """[H,W,3] picture of |render - image| (mean over RGB, x ``gain``): white where below 1 %, else from
    blue (small) to red (large)."""
    err = ((render - image).abs().mean(-1, keepdim=True) * gain).clamp(0, 1)
    heat = torch.cat([err, err * 0.3, 1 - err], -1)
    return torch.where(err > 0.01, heat, torch.ones_like(heat))


def pad_to(image: np.ndarray, height: int, width: int, value: int = 255) -> np.ndarray:
    """A uint8 [h,w,C] image centred on a ``value``-filled [height,width,C] canvas (h <= height, w <= width)."""
    out = np.full((height, width, image.shape[2]), value, dtype=np.uint8)
    y, x = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
    out[y:y + image.shape[0], x:x + image.shape[1]] = image
    return out


def contact_sheet(images: list, columns: int, labels: list[str] | None = None,
                  background=(255, 255, 255)) -> Image.Image:
    """Tile equally sized [H,W,C] images (RGBA composited over ``background``) into one picture."""
    arrays = [im if isinstance(im, np.ndarray) and im.dtype == np.uint8 else to_uint8(im) for im in images]
    h, w = arrays[0].shape[:2]
    rows = (len(arrays) + columns - 1) // columns
    label_h = 14 if labels else 0
    sheet = Image.new("RGB", (columns * w, rows * (h + label_h)), background)
    draw = ImageDraw.Draw(sheet)
    for i, a in enumerate(arrays):
        tile = Image.fromarray(a)
        x, y = (i % columns) * w, (i // columns) * (h + label_h)
        if tile.mode == "RGBA":
            base = Image.new("RGB", tile.size, background)
            base.paste(tile, mask=tile.split()[3])
            tile = base
        sheet.paste(tile.convert("RGB"), (x, y + label_h))
        if labels:
            draw.text((x + 3, y + 1), labels[i], fill=(0, 0, 0))
    return sheet


def line_plot(panels: list[tuple[str, list, list]], size=(480, 200), log_y: tuple[bool, ...] = ()) -> Image.Image:
    """Stacked line charts, one panel per (title, xs, ys), drawn with Pillow alone."""
    width, height = size
    sheet = Image.new("RGB", (width, height * len(panels)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for p, (title, xs, ys) in enumerate(panels):
        top = p * height
        left, right, low, high = 48, width - 10, top + height - 24, top + 18
        draw.rectangle([left, high, right, low], outline=(160, 160, 160))
        draw.text((left, top + 3), title, fill=(0, 0, 0))
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if np.isfinite(y) and (not (p < len(log_y) and log_y[p]) or y > 0)]
        if len(pts) < 2:
            continue
        use_log = p < len(log_y) and log_y[p]
        vals = [np.log10(y) if use_log else y for _, y in pts]
        x0, x1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1e-9)
        y0, y1 = min(vals), max(vals)
        y1 = y1 if y1 > y0 else y0 + 1e-9
        line = [(left + (x - x0) / (x1 - x0) * (right - left), low - (v - y0) / (y1 - y0) * (low - high))
                for (x, _), v in zip(pts, vals)]
        draw.line(line, fill=(200, 40, 40), width=2)
        fmt = (lambda v: f"{10 ** v:.3g}") if use_log else (lambda v: f"{v:.3g}")
        draw.text((2, high), fmt(y1), fill=(0, 0, 0))
        draw.text((2, low - 10), fmt(y0), fill=(0, 0, 0))
        draw.text((left, low + 4), f"{x0:g}", fill=(0, 0, 0))
        draw.text((right - 40, low + 4), f"{x1:g}", fill=(0, 0, 0))
    return sheet

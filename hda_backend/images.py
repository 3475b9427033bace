"""Writing pictures: RGBA PNG frames (atomically) and contact sheets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H,W,C] floats in [0,1] -> uint8 [H,W,C]."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image) -> Path:
    """Save [H,W,3|4] floats in [0,1] (or uint8) as PNG via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 else to_uint8(image)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; frames are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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

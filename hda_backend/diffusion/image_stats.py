"""Colour and texture statistics of gallery renders: what a PSNR distance cannot see.

A blend of several subjects is close in PSNR to all of them, yet it looks greyish and soft: garment
colours average out, borders blur. These statistics measure exactly that, per avatar, from its gallery
(:mod:`.gallery`: images [V,H,W,3] in [0,1] composited over the background, alpha [V,H,W], and the
per-pixel body parts of :func:`.gallery.render_avatar_parts`). Pure numpy functions.

- **Straight colours**: the person's own colour at each pixel, the background composited out:
  c = (image − (1 − α)·background) / α where α > :data:`PERSON_ALPHA`, so soft edges do not pull
  colours towards the background.
- **Colourfulness** (Hasler & Süsstrunk 2003, "Measuring colourfulness in natural images"): on 8-bit
  RGB, rg = R − G, yb = (R + G)/2 − B, M = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²), population
  statistics over the person's pixels of one view; an avatar's value is the mean over its views.
- **Sharpness**: the variance of the 4-neighbour Laplacian (OpenCV's ``Laplacian`` with ksize 1) of the
  8-bit luminance Y = 0.299 R + 0.587 G + 0.114 B, over the silhouette's interior (pixels whose four
  neighbours are the person too, so the person/background edge never counts); mean over views.
- **Part features** (the feature space of precision/recall and of the colour Fréchet distance): for each
  body part of :data:`hda_backend.body.parts.PARTS`, over that part's pixels in all views: the mean
  colour (3), the colour's standard deviation (3: prints, stripes, checks, a second garment) and the RMS
  Laplacian of the luminance inside the silhouette (1: texture and edge sharpness), colours in [0,1].
  A part no view shows gets the background colour and zero spread: that is what is seen there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..body.parts import PARTS
from ..errors import HDAError

PERSON_ALPHA = 0.5  # a pixel shows the person where the rendered alpha exceeds this
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as OpenCV's RGB -> grey
PART_STATS = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "laplacian_rms")
FEATURE_NAMES = tuple(f"{part}.{stat}" for part in PARTS for stat in PART_STATS)
MEAN_COLOUR_COLUMNS = np.array([p * len(PART_STATS) + i for p in range(len(PARTS)) for i in range(3)])


def straight_colours(images: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """images [...,3] composited over ``background`` (3 values), alpha [...] -> colours [...,3] in [0,1]
    with the background composited out where alpha > PERSON_ALPHA, the background elsewhere."""
    images, alpha = np.asarray(images, np.float64), np.asarray(alpha, np.float64)
    bg = np.asarray(background, np.float64)
    person = alpha > PERSON_ALPHA
    a = np.where(person, alpha, 1.0)[..., None]
    own = (images - (1.0 - a) * bg) / a
    return np.clip(np.where(person[..., None], own, bg), 0.0, 1.0)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler-Süsstrunk colourfulness of pixels rgb [P,3] in 0..255 (0 for no pixels)."""
    rgb = np.asarray(rgb, np.float64).reshape(-1, 3)
    if rgb.shape[0] == 0:
        return 0.0
    rg = rgb[:, 0] - rgb[:, 1]
    yb = 0.5 * (rgb[:, 0] + rgb[:, 1]) - rgb[:, 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def interior(mask: np.ndarray) -> np.ndarray:
    """[H,W] bool -> [H,W] bool: mask pixels whose 4 neighbours are in the mask (none on the image border)."""
    mask = np.asarray(mask, bool)
    out = np.zeros_like(mask)
    out[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
    return out


def laplacian(gray: np.ndarray) -> np.ndarray:
    """[H,W] -> [H,W]: up + down + left + right − 4·centre at interior pixels, 0 on the image border."""
    g = np.asarray(gray, np.float64)
    out = np.zeros_like(g)
    out[1:-1, 1:-1] = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return out


def laplacian_variance(gray: np.ndarray, mask: np.ndarray) -> float:
    """Population variance of :func:`laplacian` over :func:`interior` (mask); 0 with fewer than 2 pixels."""
    inside = interior(mask)
    if inside.sum() < 2:
        return 0.0
    return float(laplacian(gray)[inside].var())


@dataclass(frozen=True)
class AvatarStats:
    """colourfulness and sharpness: one avatar's means over its views; features [F] (FEATURE_NAMES)."""

    colourfulness: float
    sharpness: float
    features: np.ndarray


def avatar_stats(images: np.ndarray, alpha: np.ndarray, labels: np.ndarray, background) -> AvatarStats:
    """One avatar's gallery: images [V,H,W,3] in [0,1], alpha [V,H,W], labels [V,H,W] (part index or -1)."""
    images, alpha, labels = np.asarray(images), np.asarray(alpha), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or alpha.shape != images.shape[:3] or labels.shape != alpha.shape:
        raise HDAError(f"image statistics: images {images.shape}, alpha {alpha.shape}, labels {labels.shape}, "
                       "expected [V,H,W,3], [V,H,W], [V,H,W]")
    colours = straight_colours(images, alpha, background)
    luma = colours @ LUMA  # [V,H,W] in [0,1]
    person = alpha > PERSON_ALPHA
    colourful, sharp, lap, inside = [], [], [], []
    for v in range(images.shape[0]):
        colourful.append(colourfulness(255.0 * colours[v][person[v]]))
        sharp.append(laplacian_variance(255.0 * luma[v], person[v]))
        lap.append(laplacian(luma[v]))
        inside.append(interior(person[v]))
    lap, inside = np.stack(lap), np.stack(inside)
    features = []
    for p in range(len(PARTS)):
        pick = labels == p
        if not pick.any():
            features += [*np.asarray(background, np.float64), 0.0, 0.0, 0.0, 0.0]
            continue
        pixels = colours[pick]
        edges = lap[pick & inside]
        features += [*pixels.mean(0), *pixels.std(0), float(np.sqrt((edges ** 2).mean())) if edges.size else 0.0]
    return AvatarStats(float(np.mean(colourful)), float(np.mean(sharp)), np.asarray(features, np.float64))


def standardise(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """features [N,F] in units of the reference set's spread: (f − mean_ref) / std_ref per feature (a
    feature constant over the reference set keeps its scale), so no statistic dominates the distances
    by its units (colours in [0,1], Laplacian RMS a few hundredths)."""
    reference = np.asarray(reference, np.float64)
    std = reference.std(0)
    return (np.asarray(features, np.float64) - reference.mean(0)) / np.where(std > 0, std, 1.0)

"""Gaussian splat rendering: `rasterize` (gsplat conventions; gsplat on CUDA, own tiled rasterizer on CPU)."""

from .rasterize import rasterize

__all__ = ["rasterize"]

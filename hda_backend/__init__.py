"""Hyper Diffusion Avatars backend: body model, UV pose maps, avatar UNet, Gaussian rasterizers.

Importable without bpy and without CUDA.
"""

__version__ = "0.1.0"

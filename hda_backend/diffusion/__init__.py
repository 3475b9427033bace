"""Stage 2: a diffusion model over avatar UNet weights (paper §4.2-4.3)."""

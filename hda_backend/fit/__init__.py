"""Stage 1: fitting one avatar UNet per subject from multi-view video (paper §4.1, §4.3)."""

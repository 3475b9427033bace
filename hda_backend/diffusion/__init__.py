"""Stage 2: a diffusion model over avatar UNet weights (paper §4.2-4.3).

The names below (defined in hda_backend/constants.py) are shared by the modules and the command line,
which must not import torch to parse.
"""

from ..constants import MAX_SAMPLES, MAX_SEED, NORMALIZATIONS, PREDICTIONS, PROJECTIONS, TOKENIZERS

__all__ = ["MAX_SAMPLES", "MAX_SEED", "NORMALIZATIONS", "PREDICTIONS", "PROJECTIONS", "TOKENIZERS"]

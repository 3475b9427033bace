"""Stage 2: a diffusion model over avatar UNet weights (paper §4.2-4.3).

The names below are shared by the modules and the command line, which must not import torch to parse.
"""

TOKENIZERS = ("layer", "flat1d", "layer_chunked")
NORMALIZATIONS = ("coordinate", "layer")
MAX_SAMPLES = 100_000
MAX_SEED = 2 ** 63 - 1

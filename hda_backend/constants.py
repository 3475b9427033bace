"""Names and limits shared by the backend, its command line and the Blender add-on, defined once.

Torch-free and bpy-free (plain Python only): the command line parses arguments with these before it
imports torch, and the add-on reads them when Blender registers it.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------ presets
PRESETS = ("tiny", "cpu", "paper")   # hda_backend/presets/<name>.yaml, smallest first
PRESET_LABELS = {"tiny": "Tiny", "cpu": "CPU", "paper": "Paper"}
# What an avatar of each preset is (the add-on's avatar Preset menu: seed-initialised avatars).
PRESET_AVATAR_TEXT = {"tiny": "UV 32, width-16 UNet: tests and quick previews",
                      "cpu": "UV 128, width-64 UNet: the default without CUDA",
                      "paper": "UV 256, width-64 UNet: the paper's sizes, for CUDA"}
# What fitting with each preset does (the add-on's Fit Subject menu).
PRESET_FIT_TEXT = {"tiny": "UV 32, 30 steps: a quick check that fitting works",
                   "cpu": "UV 128, width-64 UNet, staged recipe: about 10 minutes on a laptop (3 from another avatar)",
                   "paper": "UV 256, the paper's schedule: for CUDA machines"}
# The Fit Subject menu's order. Blender saves an enum property as its item's index, so this order is
# part of saved files and stays as it is.
FIT_MENU_ORDER = ("cpu", "paper", "tiny")

# ------------------------------------------------------------------------------------------ files
AVATAR_SUFFIX = ".hda.safetensors"  # an avatar file (hda_backend/avatar/io.py)

# -------------------------------------------------------------------------- stage 2: weight diffusion
TOKENIZERS = ("layer", "flat1d", "layer_chunked")   # diffusion.tokenizer
NORMALIZATIONS = ("coordinate", "layer")            # diffusion.normalization
PREDICTIONS = ("x0", "eps", "v")                    # diffusion.prediction: what the denoiser outputs
PROJECTIONS = ("learned", "principal")              # diffusion.projections: the tokenizer's per-layer maps

# ------------------------------------------------------------------------------------------ devices
# How long fit-all's ranks wait for each other (rank 0's first fit): a paper-preset first fit (700k
# steps) takes about 10 h at 20 steps/s, and slower GPUs several times that.
FIT_ALL_WAIT_HOURS = 72.0

# ----------------------------------------------------------------------------------------- blender
NATIVE_BLENDER_MIN = (5, 3, 0)  # the first Blender with Gaussian-splat point clouds (the add-on's native path)

# --------------------------------------------------------------------------------------------- limits
MAX_SAMPLES = 100_000        # avatars one sampling call draws: `hda sample --n`, the weight-space baselines
MAX_EVAL_SAMPLES = 1000      # samples per row of `hda eval-gen` (each one is rendered and compared)
MAX_CYCLES_SAMPLES = 4096    # Cycles samples per pixel of `hda synth --samples`
MAX_SEED = 2 ** 63 - 1       # diffusion sampling seeds


def spoken_list(names) -> str:
    """``a, b or c``: the names as the one-line errors list what is expected."""
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

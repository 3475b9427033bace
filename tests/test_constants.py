"""hda_backend/constants.py: one definition of the shared names and limits, importable without torch."""

import subprocess
import sys

from hda_backend import constants
from hda_backend.config import PRESET_DIR, load_config

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import hda_backend.constants, hda_backend.diffusion
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_constants_import_without_torch():
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_presets_are_the_preset_files_and_every_menu_describes_each():
    on_disk = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert sorted(constants.PRESETS) == on_disk
    for table in (constants.PRESET_LABELS, constants.PRESET_AVATAR_TEXT, constants.PRESET_FIT_TEXT):
        assert sorted(table) == on_disk
    assert sorted(constants.FIT_MENU_ORDER) == on_disk
    # The avatar menu's descriptions state each preset's UV size, as the preset files set it.
    for name in constants.PRESETS:
        res = load_config(name).uv.res
        assert constants.PRESET_AVATAR_TEXT[name].startswith(f"UV {res},")
        assert constants.PRESET_FIT_TEXT[name].startswith(f"UV {res},")


def test_the_diffusion_package_and_config_use_the_same_lists():
    from hda_backend import config, diffusion

    assert diffusion.TOKENIZERS is constants.TOKENIZERS and diffusion.NORMALIZATIONS is constants.NORMALIZATIONS
    assert diffusion.MAX_SAMPLES is constants.MAX_SAMPLES and config.PRESETS is constants.PRESETS


def test_spoken_list_matches_the_written_out_lists():
    assert constants.spoken_list(("layer", "flat1d", "layer_chunked")) == "layer, flat1d or layer_chunked"
    assert constants.spoken_list(("coordinate", "layer")) == "coordinate or layer"
    assert constants.spoken_list(("one",)) == "one"


def test_distinct_limits_stay_distinct():
    # Avatars drawn per sampling call, samples per eval-gen row, Cycles samples per pixel.
    assert (constants.MAX_SAMPLES, constants.MAX_EVAL_SAMPLES, constants.MAX_CYCLES_SAMPLES) == (100_000, 1000, 4096)

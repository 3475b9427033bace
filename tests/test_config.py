import pytest

from hda_backend.config import PRESETS, load_config
from hda_backend.errors import HDAError


def test_presets():
    sizes = {name: load_config(name) for name in PRESETS}
    assert (sizes["tiny"].uv.res, sizes["cpu"].uv.res, sizes["paper"].uv.res) == (32, 128, 256)
    assert sizes["paper"].unet.width == 64 and sizes["paper"].unet.levels == 3
    # the same architecture (598,011 weights); the cpu recipe feeds it positions in 5 cm units
    assert (sizes["cpu"].unet.width, sizes["cpu"].unet.levels) == (sizes["paper"].unet.width, sizes["paper"].unet.levels)
    assert (sizes["cpu"].unet.position_scale, sizes["paper"].unet.position_scale) == (20.0, 1.0)


def test_user_file_overrides_its_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: tiny\nuv: {res: 64}\ngaussians: {skin_rotations: false}\n")
    config = load_config(path)
    assert (config.preset, config.uv.res, config.unet.width, config.gaussians.skin_rotations) == ("tiny", 64, 16, False)


@pytest.mark.parametrize("text, message", [
    ("uv: {resolution: 64}", "unknown field 'uv.resolution'"),
    ("uv: {res: '64'}", "field 'uv.res' is '64', expected a int"),
    ("uv: {res: 100}", "field 'uv.res' is 100"),
    ("render: {size: 0}", "field 'render.size' is 0"),
    ("preset: huge", "field 'preset' is 'huge'"),
    ("uv: [1, 2]", "field 'uv' should be a mapping"),
    ("unet: {levels: 6}\nuv: {res: 32}", "field 'unet.levels'"),
    ("gaussians: {init_opacity: 1.0}", "gaussians.init_opacity"),
    ("{bad yaml", "not valid YAML"),
])
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(HDAError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_preset():
    with pytest.raises(HDAError, match="preset 'huge': unknown"):
        load_config("huge")


def test_the_code_defaults_are_the_cpu_preset():
    """Config() is the cpu preset (each value written once, in config.py); tiny and paper are changes from it."""
    from hda_backend.config import Config

    assert Config() == load_config("cpu")
    assert load_config("cpu").fit.map_steps > 0 and load_config("cpu").unet.position_scale == 20.0
    paper = load_config("paper")
    assert (paper.unet.position_scale, paper.gaussians.sh_degree, paper.fit.map_steps, paper.fit.lr) == (1.0, 3, 0, 1e-4)
    tiny = load_config("tiny")
    assert (tiny.unet.width, tiny.fit.map_steps, tiny.fit.precision) == (16, 0, "float32")

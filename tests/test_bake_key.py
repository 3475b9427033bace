"""The bake key of avatar layers (hda_backend/bake_key.py) and EXR header strings (hda_backend/exr.py)."""

from __future__ import annotations


import numpy as np
import pytest

from hda_backend import bake_key
from hda_backend.errors import HDAError
from hda_backend.exr import encode_exr, layer_channels, read_strings, write_exr


def _inputs(rng, bones=55):
    return bake_key.frame_inputs(rng.normal(size=(bones, 4, 4)), rng.normal(size=(4, 4)), rng.normal(size=(4, 4)),
                                 rng.normal(size=(4, 4)))


def test_a_key_reads_back_fresh_and_names_what_changed():
    rng = np.random.default_rng(0)
    identity = bake_key.identity_digest({"seed": 3, "size": [80, 64]})
    inputs = _inputs(rng)
    text = bake_key.encode(identity, inputs)
    assert bake_key.stale_reason(text, identity, inputs) is None
    # float noise far below a pixel is not a change
    noisy = {g: v + np.float32(2e-6) for g, v in inputs.items()}
    assert bake_key.stale_reason(text, identity, noisy) is None
    for group in bake_key.GROUPS:
        changed = {g: v.copy() for g, v in inputs.items()}
        changed[group][5] += 1e-3
        assert bake_key.stale_reason(text, identity, changed) == bake_key.REASONS[group]
    other = bake_key.identity_digest({"seed": 3, "size": [80, 65]})
    assert bake_key.stale_reason(text, other, inputs) == bake_key.REASONS["identity"]
    # a placeholder (no key), a key of another version, garbage: not baked
    assert bake_key.stale_reason(None, identity, inputs) == bake_key.NOT_BAKED
    assert bake_key.stale_reason(text.replace('"version": 1', '"version": 0'), identity, inputs) == bake_key.NOT_BAKED
    assert bake_key.stale_reason("{not json", identity, inputs) == bake_key.NOT_BAKED
    # another bone count (another rig) is a pose change, not a crash
    assert bake_key.stale_reason(text, identity, _inputs(rng, bones=54)) == bake_key.REASONS["pose"]


def test_identity_digest_is_canonical_and_covers_every_field():
    a = bake_key.identity_digest({"file": "ab", "body": "", "shading": "flat", "size": [4, 5]})
    b = bake_key.identity_digest({"size": [4, 5], "shading": "flat", "body": "", "file": "ab"})
    assert a == b and len(a) == 64
    base = {"file": "ab", "body": "", "shading": "flat", "size": [4, 5]}
    for field, value in (("file", "ac"), ("body", "//b.npz"), ("shading", "clay"), ("size", [5, 4])):
        assert bake_key.identity_digest({**base, field: value}) != a


def test_frame_ranges_and_summaries():
    assert bake_key.frame_ranges([7, 1, 2, 3, 9, 10, 3]) == "1-3, 7, 9-10"
    assert bake_key.frame_ranges([]) == ""
    lines = bake_key.summarize("A", {1: None, 2: "x", 3: "x", 4: None, 5: "y", 6: "x"})
    assert lines == ["A: frames 2-3, 6: x", "A: frame 5: y"]
    assert bake_key.summarize("A", {1: None}) == []


def test_exr_header_strings_round_trip_and_bad_files_are_one_line(tmp_path):
    rgba = np.zeros((3, 5, 4), np.float32)
    path = write_exr(tmp_path / "l.exr", layer_channels(rgba, np.ones((3, 5))), {"hdaBakeKey": "k" * 9000, "a": "b"})
    assert read_strings(path) == {"hdaBakeKey": "k" * 9000, "a": "b"}
    assert read_strings(write_exr(tmp_path / "n.exr", layer_channels(rgba, np.ones((3, 5))))) == {}
    # the extra attributes only add to the header: the pixels are the same bytes
    plain = encode_exr(layer_channels(rgba, np.ones((3, 5))))
    keyed = encode_exr(layer_channels(rgba, np.ones((3, 5))), {"a": "b"})
    assert keyed.endswith(plain[-40:]) and len(keyed) == len(plain) + len(b"a\0string\0") + 4 + 1
    (tmp_path / "bad.exr").write_bytes(b"\x00" * 20)
    with pytest.raises(HDAError, match="not an OpenEXR file"):
        read_strings(tmp_path / "bad.exr")
    (tmp_path / "cut.exr").write_bytes(path.read_bytes()[:60])
    with pytest.raises(HDAError, match="truncated|ends inside"):
        read_strings(tmp_path / "cut.exr")
    with pytest.raises(HDAError, match="cannot read"):
        read_strings(tmp_path / "nowhere.exr")

"""hda_backend.exr against Blender's own OpenEXR reader (bpy in a child process), and its bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib

import numpy as np
import pytest

from hda_backend.errors import HDAError
from hda_backend.exr import LINES_PER_BLOCK, encode_exr, layer_channels, write_exr
from tests.test_blender_extension import BPY50_PYTHON, _hermetic_env

_READER = r'''
import json, sys
import bpy, numpy as np
out = {}
for path in json.loads(sys.argv[1]):
    img = bpy.data.images.load(path)
    w, h = img.size  # loads the file (the type is known after that)
    if img.type == 'MULTILAYER':
        tree = bpy.data.node_groups.new("t", "CompositorNodeTree")
        node = tree.nodes.new("CompositorNodeImage")
        node.image = img
        out[path] = {"type": img.type, "outputs": [o.name for o in node.outputs]}
        continue
    px = np.empty(w * h * 4, np.float32)
    img.pixels.foreach_get(px)
    np.save(path + ".npy", px.reshape(h, w, 4)[::-1])
    out[path] = {"type": img.type, "size": [w, h], "float": img.is_float}
print("RESULT " + json.dumps(out))
'''


def _read_in_blender(paths, tmp_path):
    script = tmp_path / "reader.py"
    script.write_text(_READER)
    env = _hermetic_env(BLENDER_USER_RESOURCES=str(tmp_path / "user"), HOME=str(tmp_path / "home"))
    proc = subprocess.run([str(BPY50_PYTHON), str(script), json.dumps([str(p) for p in paths])], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_blender_reads_what_we_write(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for h, w, dtype in ((29, 37, np.float16), (16, 16, np.float32), (1, 1, np.float32), (17, 5, np.float16)):
        rgba = rng.uniform(-2, 3, (h, w, 4)).astype(dtype)
        rgba[: h // 2] = 0  # runs of zeros, as around an avatar: blocks that compress
        path = write_exr(tmp_path / f"plain_{h}x{w}_{np.dtype(dtype).name}.exr",
                         {c: rgba[..., i] for i, c in enumerate("RGBA")})
        cases[path] = rgba.astype(np.float32)
        raw = tmp_path / f"raw_{h}x{w}_{np.dtype(dtype).name}.exr"  # every block stored raw (LayerWriter)
        raw.write_bytes(encode_exr({c: rgba[..., i] for i, c in enumerate("RGBA")}, compress=False))
        cases[raw] = rgba.astype(np.float32)
    layer = write_exr(tmp_path / "layer_0001.exr",
                      layer_channels(rng.uniform(0, 1, (20, 24, 4)), np.full((20, 24), 1e10)))
    result = _read_in_blender([*cases, layer], tmp_path)
    for path, expected in cases.items():
        info = result[str(path)]
        assert info["type"] == "IMAGE" and info["size"] == [expected.shape[1], expected.shape[0]] and info["float"]
        assert np.array_equal(np.load(str(path) + ".npy"), expected), path.name
    assert result[str(layer)] == {"type": "MULTILAYER", "outputs": ["Combined", "Alpha", "Depth"]}


def _brute_force_exr(channels, strings, compress):
    """The EXR bytes encode_exr promises, written out field by field, block by block, line by line, value
    by value (its module docstring's layout): the independent twin of its buffer-building writer."""
    names = sorted(channels)
    planes = [np.asarray(channels[n]) for n in names]
    kinds = [(1, "<e") if p.dtype == np.float16 else (2, "<f") for p in planes]
    height, width = planes[0].shape

    def attribute(name, kind, value):
        return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value

    chlist = b""
    for name, (pixel_type, _) in zip(names, kinds):
        chlist += name.encode() + b"\0" + struct.pack("<i", pixel_type) + b"\0\0\0\0" + struct.pack("<ii", 1, 1)
    window = struct.pack("<4i", 0, 0, width - 1, height - 1)
    header = (attribute("channels", "chlist", chlist + b"\0") + attribute("compression", "compression", b"\3")
              + attribute("dataWindow", "box2i", window) + attribute("displayWindow", "box2i", window)
              + attribute("lineOrder", "lineOrder", b"\0")
              + attribute("pixelAspectRatio", "float", struct.pack("<f", 1))
              + attribute("screenWindowCenter", "v2f", struct.pack("<ff", 0, 0))
              + attribute("screenWindowWidth", "float", struct.pack("<f", 1)))
    for name in sorted(strings):
        header += attribute(name, "string", strings[name].encode("ascii"))
    version = 2 + (0x400 if any(len(n) > 31 for n in names) else 0)
    prefix = struct.pack("<ii", 20000630, version) + header + b"\0"
    chunks = []
    for y0 in range(0, height, LINES_PER_BLOCK):
        raw = b""
        for y in range(y0, min(y0 + LINES_PER_BLOCK, height)):
            for plane, (_, fmt) in zip(planes, kinds):
                for x in range(width):
                    raw += struct.pack(fmt, plane[y, x])
        data = raw
        if compress:
            split = raw[0::2] + raw[1::2]
            predicted = bytes([split[0]] + [(split[i] - split[i - 1] + 128) % 256 for i in range(1, len(split))])
            packed = zlib.compress(predicted, 1)
            data = packed if len(packed) < len(raw) else raw
        chunks.append(struct.pack("<ii", y0, len(data)) + data)
    offset = len(prefix) + 8 * len(chunks)
    table = b""
    for chunk in chunks:
        table += struct.pack("<Q", offset)
        offset += len(chunk)
    return prefix + table + b"".join(chunks)


def test_encoder_writes_the_bytes_of_a_field_by_field_writer():
    rng = np.random.default_rng(3)
    for h, w in ((1, 1), (15, 3), (16, 2), (17, 5), (35, 4)):  # heights below, at and past whole blocks
        channels = {
            "R": rng.standard_normal((h, w)).astype(np.float16),
            "a.long.channel.name.over.thirty.one.characters": rng.standard_normal((h, w)).astype(np.float32),
            "Z": rng.uniform(0, 1e10, (h, w)),  # float64: stored as FLOAT
            "big": rng.standard_normal((h, w)).astype(">f4"),  # big-endian: stored little-endian
            "half.big": rng.standard_normal((h, w)).astype(">f2"),
            "strided": rng.standard_normal((h, 2 * w)).astype(np.float16)[:, ::2],  # not contiguous
        }
        channels["R"][: h // 2] = 0  # a run of zeros, so some ZIP blocks shrink and some are stored raw
        strings = {"hdaBakeKey": "k" * 70, "b": "x"}
        for compress in (False, True):
            expected = _brute_force_exr(channels, strings, compress)
            assert encode_exr(channels, strings, compress=compress) == expected, (h, w, compress)
        short = {"B": channels["R"], "G": channels["Z"]}
        assert encode_exr(short, compress=False) == _brute_force_exr(short, {}, False)
    rgba = np.zeros((40, 6, 4), np.float16)
    rgba[3:30, 1:4] = rng.uniform(0, 1, (27, 3, 4))
    layer = layer_channels(rgba, np.full((40, 6), 1e10))
    for compress in (False, True):
        assert encode_exr(layer, compress=compress) == _brute_force_exr(layer, {}, compress)


def test_layer_channels_store_colour_as_half_and_depth_as_float():
    rgba = np.random.default_rng(1).uniform(0, 1, (8, 8, 4))
    channels = layer_channels(rgba, np.full((8, 8), 1e10))
    assert sorted(channels) == ["HDA.Combined.A", "HDA.Combined.B", "HDA.Combined.G", "HDA.Combined.R",
                                "HDA.Depth.Z"]
    assert channels["HDA.Combined.G"].dtype == np.float16 and channels["HDA.Depth.Z"].dtype == np.float32
    assert np.array_equal(channels["HDA.Combined.G"], rgba[..., 1].astype(np.float16))
    assert (channels["HDA.Depth.Z"] == np.float32(1e10)).all()  # "nothing here" survives (half would be inf)


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(HDAError, match="no channels"):
        encode_exr({})
    with pytest.raises(HDAError, match="channel 'B': shape"):
        encode_exr({"A": np.zeros((4, 4)), "B": np.zeros((4, 5))})
    with pytest.raises(HDAError, match="EXR size 0x4"):
        encode_exr({"A": np.zeros((4, 0))})
    with pytest.raises(HDAError, match="channel name"):
        encode_exr({"": np.zeros((2, 2))})
    with pytest.raises(HDAError, match="layer: rgba"):
        layer_channels(np.zeros((4, 4, 3)), np.zeros((4, 4)))
    with pytest.raises(HDAError, match="shape"):
        encode_exr({"A": np.zeros(5)})
    assert not list(tmp_path.iterdir())

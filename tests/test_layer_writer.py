"""LayerWriter: the file is always one complete version of the newest write (raw blocks first, then the
same image ZIP-compressed), never an older frame and never a removed one. The compressed rewrites are
held on an Event so that every interleaving is exercised deterministically."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hda_backend import layer_writer
from hda_backend.exr import encode_exr, layer_channels, read_strings


def _channels(seed: int, h: int = 40, w: int = 24):
    rng = np.random.default_rng(seed)
    rgba = np.zeros((h, w, 4), np.float32)
    rgba[10:30, 5:15] = rng.uniform(0, 1, (20, 10, 4))  # an avatar-like box in an empty frame
    depth = np.full((h, w), 1e10, np.float32)
    depth[10:30, 5:15] = rng.uniform(2, 5, (20, 10))
    return layer_channels(rgba, depth)


@pytest.fixture
def held(monkeypatch):
    """Compressed encodes wait for ``release``; raw ones (the caller's) run at once."""
    release = threading.Event()
    real = layer_writer.encode_exr

    def encode(channels, strings=None, workers=None, compress=True):
        if compress:
            assert release.wait(30)
        return real(channels, strings, workers=workers, compress=compress)

    monkeypatch.setattr(layer_writer, "encode_exr", encode)
    writer = layer_writer.LayerWriter()
    yield writer, release
    release.set()
    writer.close()


def test_raw_now_then_the_same_image_compressed(held, tmp_path):
    writer, release = held
    path, channels, strings = tmp_path / "layer_0001.exr", _channels(0), {"hdaBakeKey": "k1"}
    writer.write(path, channels, strings)
    raw = encode_exr(channels, strings, compress=False)
    assert path.read_bytes() == raw and read_strings(path) == strings
    release.set()
    writer.flush()
    packed = encode_exr(channels, strings)
    assert path.read_bytes() == packed and len(packed) < len(raw) and read_strings(path) == strings


def test_an_older_rewrite_never_replaces_a_newer_frame(held, tmp_path):
    writer, release = held
    path = tmp_path / "layer_0001.exr"
    first, second = _channels(1), _channels(2)
    writer.write(path, first, {"hdaBakeKey": "old"})
    writer.write(path, second, {"hdaBakeKey": "new"})
    release.set()
    writer.flush()
    assert path.read_bytes() == encode_exr(second, {"hdaBakeKey": "new"})


def test_a_removed_layer_stays_removed(held, tmp_path):
    writer, release = held
    path = tmp_path / "layer_0001.exr"
    writer.write(path, _channels(3))
    writer.remove(path)
    release.set()
    writer.flush()
    assert not path.exists()
    writer.remove(path)  # removing what is not there is fine


def test_the_queue_is_bounded(held, tmp_path, monkeypatch):
    writer, release = held
    monkeypatch.setattr(layer_writer, "MAX_PENDING", 2)
    for i in range(2):
        writer.write(tmp_path / f"layer_{i:04d}.exr", _channels(i))
    third = threading.Thread(target=writer.write, args=(tmp_path / "layer_0002.exr", _channels(2)))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # waits for the oldest rewrite while two are queued
    release.set()
    third.join(30)
    assert not third.is_alive()
    writer.flush()
    for i in range(3):
        assert (tmp_path / f"layer_{i:04d}.exr").read_bytes() == encode_exr(_channels(i))


def test_close_finishes_the_rewrites_and_a_later_write_starts_again(tmp_path):
    writer = layer_writer.LayerWriter()
    path = tmp_path / "layer_0001.exr"
    writer.write(path, _channels(4))
    writer.close()
    assert path.read_bytes() == encode_exr(_channels(4))
    writer.write(path, _channels(5))
    writer.close()
    assert path.read_bytes() == encode_exr(_channels(5))


def test_a_moved_folder_is_not_brought_back(held, tmp_path):
    """A project folder moved (or a layer deleted) by someone else while a rewrite is queued stays gone:
    the rewrite creates neither the file nor its folder."""
    writer, release = held
    folder = tmp_path / "project_a" / "hda_layers"
    writer.write(folder / "layer_0001.exr", _channels(6))
    writer.write(tmp_path / "other" / "layer_0001.exr", _channels(7))
    (tmp_path / "project_a").rename(tmp_path / "project_b")
    (tmp_path / "other" / "layer_0001.exr").unlink()
    release.set()
    writer.flush()
    assert not (tmp_path / "project_a").exists() and not (tmp_path / "other" / "layer_0001.exr").exists()
    moved = tmp_path / "project_b" / "hda_layers" / "layer_0001.exr"
    assert moved.read_bytes() == encode_exr(_channels(6), compress=False)  # the moved file as it was

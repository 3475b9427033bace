"""eval-gen's gallery cache (hda_backend.diffusion.gallery_cache): a cached gallery is the render bit for
bit, and anything that could change a pixel (the file, the body, the views, the backend, part labels,
the code) renders again; broken entries are replaced; eval-gen's numbers are the same with the cache."""

import dataclasses
import json
import warnings

import pytest
import torch

from hda_backend.avatar.io import load_avatar, save_avatar
from hda_backend.body import load_body
from hda_backend.cli import main
from hda_backend.diffusion import gallery_cache
from hda_backend.diffusion.gallery import GalleryConfig, gallery_views, render_avatar, render_gallery
from hda_backend.diffusion.gallery_cache import GalleryCache, render_files, sources_digest
from hda_backend.errors import HDAError
from tests.test_eval_gen import ARGS, GALLERY, tiny_avatar, write_reference


@pytest.fixture(scope="module")
def body():
    return load_body()


def direct(paths, body, views, parts=True):
    """The reference: every file loaded and rendered, no cache involved."""
    return render_gallery((load_avatar(p, body) for p in paths), views, parts=parts)


def assert_same(a, b):
    assert torch.equal(a.images, b.images) and torch.equal(a.alpha, b.alpha)
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert torch.equal(a.labels, b.labels)


def files(folder, count=3):
    return sorted(write_reference(folder, count).glob("*.hda.safetensors"))


def test_a_cached_gallery_is_the_render_bit_for_bit_and_is_not_rendered_again(tmp_path, body, monkeypatch):
    views = gallery_views(body, GALLERY)
    paths = files(tmp_path / "ref")
    first = GalleryCache(tmp_path / "galleries")
    got = render_files(paths, body, views, parts=True, cache=first)
    assert (first.hits, first.misses) == (0, 3) and len(list((tmp_path / "galleries").iterdir())) == 3
    want = direct(paths, body, views)
    assert_same(got, want)

    def no_render(*args, **kwargs):
        raise AssertionError("rendered although cached")

    monkeypatch.setattr(gallery_cache, "render_avatar_parts", no_render)
    again = GalleryCache(tmp_path / "galleries")  # another run: only the folder is shared
    assert_same(render_files(paths, body, views, parts=True, cache=again), want)
    assert (again.hits, again.misses) == (0 + 3, 0)
    # Without a cache the same function renders (the twin the cached path is compared with).
    monkeypatch.undo()
    assert_same(render_files(paths, body, views, parts=True), want)


def test_anything_that_could_change_a_pixel_renders_again(tmp_path, body, monkeypatch):
    views = gallery_views(body, GALLERY)
    paths = files(tmp_path / "ref")
    render_files(paths, body, views, parts=True, cache=GalleryCache(tmp_path / "galleries"))

    # A refitted avatar (other bytes at the same path): that one only.
    save_avatar(tiny_avatar(0, colour_seed=7), paths[1], origin="test:refit")
    cache = GalleryCache(tmp_path / "galleries")
    assert_same(render_files(paths, body, views, parts=True, cache=cache), direct(paths, body, views))
    assert (cache.hits, cache.misses) == (2, 1)

    # Other views, no part labels, another backend name or other code: every one.
    other_views = gallery_views(body, GalleryConfig(poses=GALLERY.poses, azimuths_deg=GALLERY.azimuths_deg, size=40))
    cache = GalleryCache(tmp_path / "galleries")
    assert_same(render_files(paths, body, other_views, parts=True, cache=cache), direct(paths, body, other_views))
    assert cache.misses == 3
    cache = GalleryCache(tmp_path / "galleries")
    plain = render_files(paths, body, views, parts=False, cache=cache)
    assert cache.misses == 3 and plain.labels is None
    for i, p in enumerate(paths):
        images, alpha = render_avatar(load_avatar(p, body), views)
        assert torch.equal(plain.images[i], images) and torch.equal(plain.alpha[i], alpha)
    cache = GalleryCache(tmp_path / "galleries")
    render_files(paths, body, views, backend="cpu", parts=True, cache=cache)
    assert cache.misses == 3
    monkeypatch.setattr(gallery_cache, "code_fingerprint", lambda: "edited code")
    cache = GalleryCache(tmp_path / "galleries")
    render_files(paths, body, views, parts=True, cache=cache)
    assert cache.misses == 3
    monkeypatch.undo()
    # The body's fingerprint is in the key: an avatar of another body is loaded (and refused) again.
    key = gallery_cache.render_key(paths[0].read_bytes(), body, views, "auto", True)
    other_body = dataclasses.replace(body, sha256="0" * 64)
    assert gallery_cache.render_key(paths[0].read_bytes(), other_body, views, "auto", True) != key
    with pytest.raises(HDAError, match="body_sha256"):
        GalleryCache(tmp_path / "galleries").gallery(paths[0], other_body, views, parts=True)


def test_sources_digest_follows_every_python_source(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    before = sources_digest(tmp_path / "pkg")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert sources_digest(tmp_path / "pkg") == before
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    edited = sources_digest(tmp_path / "pkg")
    assert edited != before
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "b.py")  # the same bytes elsewhere
    assert sources_digest(tmp_path / "pkg") not in (before, edited)
    assert len(gallery_cache.code_fingerprint()) == 64


def test_an_entry_holds_the_render_of_the_bytes_its_key_was_made_of(tmp_path, body, monkeypatch):
    """A fit that rewrites its file while an evaluation reads it: the entry (and the gallery returned)
    are the render of the bytes that were hashed, never the newer file under the older key."""
    views = gallery_views(body, GALLERY)
    path = files(tmp_path / "ref", 1)[0]
    before = path.read_bytes()
    key = gallery_cache.render_key

    def refit_after_hashing(data, *args):
        save_avatar(tiny_avatar(0, colour_seed=7), path, origin="test:refit")  # lands after the read
        return key(data, *args)

    monkeypatch.setattr(gallery_cache, "render_key", refit_after_hashing)
    got = render_files([path], body, views, parts=True, cache=GalleryCache(tmp_path / "galleries"))
    monkeypatch.undo()
    assert path.read_bytes() != before
    (tmp_path / "old").mkdir()
    old = tmp_path / "old" / path.name
    old.write_bytes(before)
    want = direct([old], body, views)
    assert_same(got, want)
    assert not torch.equal(want.images, direct([path], body, views).images)  # the refit renders otherwise
    # Read back under the old bytes' key, the entry is the old render too.
    cache = GalleryCache(tmp_path / "galleries")
    assert_same(render_files([old], body, views, parts=True, cache=cache), want)
    assert (cache.hits, cache.misses) == (1, 0)


def test_broken_entries_are_rendered_again_and_replaced(tmp_path, body):
    views = gallery_views(body, GALLERY)
    paths = files(tmp_path / "ref", 2)
    render_files(paths, body, views, parts=True, cache=GalleryCache(tmp_path / "galleries"))
    entries = {p: tmp_path / "galleries" / (gallery_cache.render_key(p.read_bytes(), body, views, "auto", True)
                                        + gallery_cache.ENTRY_SUFFIX) for p in paths}
    data = entries[paths[0]].read_bytes()
    entries[paths[0]].write_bytes(data[: len(data) // 2])            # truncated
    entries[paths[1]].write_bytes(data)                              # another key's entry under this name
    cache = GalleryCache(tmp_path / "galleries")
    assert_same(render_files(paths, body, views, parts=True, cache=cache), direct(paths, body, views))
    assert cache.misses == 2
    cache = GalleryCache(tmp_path / "galleries")
    render_files(paths, body, views, parts=True, cache=cache)
    assert (cache.hits, cache.misses) == (2, 0)


def test_a_cache_that_cannot_be_written_costs_the_speed_up_only(tmp_path, body, monkeypatch):
    views = gallery_views(body, GALLERY)
    paths = files(tmp_path / "ref", 2)
    (tmp_path / "file").write_text("")
    with pytest.raises(HDAError, match="not a folder"):
        GalleryCache(tmp_path / "file")
    calls = []

    def full_disk(*args):
        calls.append(args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery_cache, "atomic_save_safetensors", full_disk)
    cache = GalleryCache(tmp_path / "galleries")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = render_files(paths, body, views, parts=True, cache=cache)
    assert_same(got, direct(paths, body, views))
    assert len(calls) == 1 and len(caught) == 1 and "No space left" in str(caught[0].message)


def test_eval_gen_gives_the_same_numbers_with_the_cache_and_renders_each_fit_once(tmp_path, capsys):
    ref = write_reference(tmp_path / "held_out", 3)
    train = tmp_path / "train"
    train.mkdir()
    for i in range(4):
        save_avatar(tiny_avatar(0, colour_seed=200 + i), train / f"t_{i}.hda.safetensors", origin=f"test:t{i}")
    common = ["eval-gen", "--reference", str(ref), "--train", str(train), "--baselines", "copy,blend", *ARGS]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    for run in ("first", "second"):
        assert main([*common, "--out", str(tmp_path / run), "--gallery-cache", str(tmp_path / "galleries")]) == 0
    printed = capsys.readouterr().out
    assert "7 galleries reused, 0 rendered" in printed and "0 galleries reused, 7 rendered" in printed
    reports = {run: json.loads((tmp_path / run / "eval_gen.json").read_text()) for run in ("plain", "first", "second")}
    assert reports["plain"]["gallery_cache"] is None
    assert reports["second"]["gallery_cache"]["hits"] == 7
    for report in reports.values():  # the drawn rows' files live in each run's own folder
        for row in report["rows"]:
            row.pop("files"), row.pop("seconds_per_identity")
            for sample in row["samples"]:
                sample.pop("file", None)
    for run in ("first", "second"):
        for key in ("rows", "held_out_vs_train", "reference_stats", "train_stats"):
            assert reports[run][key] == reports["plain"][key], key

"""Atomic files and training checkpoints: O_TMPFILE writes, the fallback, sweeps, exact resume, bad files, kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hda_backend import atomic, checkpoint
from hda_backend.errors import HDAError
from hda_backend.outputs import beside, output_stem

ROOT = Path(__file__).resolve().parents[1]
FMT = "test-checkpoint"


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tmp"))


def test_write_atomic_uses_an_anonymous_file_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "a.bin"
    seen = []

    def write(fh):
        seen.append(os.readlink(f"/proc/self/fd/{fh.fileno()}"))
        assert not _temporaries(target.parent)  # no name while it is written
        fh.write(b"hello")

    atomic.write_atomic(target, write)
    assert target.read_bytes() == b"hello" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert "(deleted)" in seen[0] or "#" in seen[0]  # an O_TMPFILE file has no directory entry
    def fail(fh):
        fh.write(b"partial")
        raise RuntimeError("half written")

    with pytest.raises(RuntimeError, match="half"):
        atomic.write_atomic(target, fail)
    assert target.read_bytes() == b"hello" and not _temporaries(target.parent)
    # Without O_TMPFILE: mkstemp + rename, the same result.
    monkeypatch.setattr(atomic, "_open_anonymous", lambda folder: None)
    atomic.write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert not _temporaries(target.parent)


def test_sweep_removes_only_the_targets_temporaries(tmp_path):
    target = tmp_path / "m.ckpt.safetensors"
    mine = [tmp_path / "m.ckpt.safetensorsab_3xyz9.tmp", tmp_path / "m.ckpt.safetensors00000000.tmp"]
    others = [tmp_path / "other.safetensorsab_3xyz9.tmp", tmp_path / "m.ckpt.safetensorsab.tmp",
              tmp_path / "m.ckpt.safetensors", tmp_path / "m.ckpt.safetensorsab_3xyz9.tmp.keep"]
    for p in mine + others:
        p.write_bytes(b"x")
    assert sorted(atomic.sweep_temporaries(target)) == sorted(mine)
    assert all(p.exists() for p in others) and not any(p.exists() for p in mine)
    # Both mechanisms name their temporaries so that the sweep finds them.
    import tempfile

    fd, name = tempfile.mkstemp(dir=tmp_path, prefix=target.name, suffix=".tmp")
    os.close(fd)
    assert atomic.temporary_pattern(target).fullmatch(Path(name).name)


def test_atomic_save_safetensors_equals_save_file(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, dtype=torch.float64)[None]}
    atomic.atomic_save_safetensors(tensors, tmp_path / "x.safetensors", {"k": "v"})
    save_file(tensors, tmp_path / "y.safetensors", metadata={"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()


def _job(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, optimizer, generator, ema


def _train(model, optimizer, generator, ema, steps):
    for _ in range(steps):
        x = torch.randn(5, 6, generator=generator)
        loss = model(x).pow(2).mean()  # dropout draws from torch's global RNG
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 0.1)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    reference = _job()
    _train(*reference, 10)
    model, optimizer, generator, ema = _job()
    _train(model, optimizer, generator, ema, 4)
    path = tmp_path / "j.ckpt.safetensors"
    checkpoint.save(path, model.state_dict(), optimizer, generator, 4, 1.25, "fp", FMT, groups={"ema": ema},
                    tensors={"extra.x": torch.ones(2)}, metadata={"note": "n"}, global_rng=True)
    # The file, read without the module: the optimiser's own state dict, the RNGs and the metadata.
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    saved = load_file(path)
    state = optimizer.state_dict()
    assert meta["format"] == FMT and meta["step"] == "4" and meta["seconds"] == "1.250" and meta["note"] == "n"
    assert json.loads(meta["param_groups"]) == json.loads(json.dumps(state["param_groups"]))
    assert meta["fingerprint"] == "fp"
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(saved[f"optim.{index}.{key}"], torch.as_tensor(value))
    assert torch.equal(saved["rng.data"], generator.get_state())
    assert torch.equal(saved["rng.torch"], torch.get_rng_state())
    assert torch.equal(saved["extra.x"], torch.ones(2))
    assert all(torch.equal(saved[f"ema.{k}"], v) and torch.equal(saved[f"model.{k}"], model.state_dict()[k])
               for k, v in ema.items())
    # A fresh job resumed from it ends where the uninterrupted one does, bit for bit.
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint restores it
    model, optimizer, generator, ema = _job(seed=7)
    step, seconds = checkpoint.load(path, model, optimizer, generator, "fp", FMT, groups={"ema": ema},
                                    global_rng=True)
    assert (step, seconds) == (4, 1.25)
    _train(model, optimizer, generator, ema, 6)
    ref_model, ref_opt, ref_gen, ref_ema = reference
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    assert all(torch.equal(ema[k], ref_ema[k]) for k in ema)
    assert torch.equal(generator.get_state(), ref_gen.get_state())


def test_bad_checkpoints_end_in_one_line(tmp_path):
    model, optimizer, generator, _ = _job()
    path = tmp_path / "j.ckpt.safetensors"
    with pytest.raises(HDAError, match="checkpoint file not found"):
        checkpoint.load(path, model, optimizer, generator, "fp", FMT)
    checkpoint.save(path, model.state_dict(), optimizer, generator, 3, 0.5, "fp", FMT)
    cases = []
    cut = tmp_path / "cut.ckpt.safetensors"
    cut.write_bytes(path.read_bytes()[:300])
    cases.append((cut, "fp", FMT, model, "cut.ckpt.safetensors: not a readable safetensors file .*delete it"))
    cases.append((path, "fp", "other-format", model, "field 'format' is 'test-checkpoint', expected 'other-format'"))
    cases.append((path, "other", FMT, model, "field 'fingerprint' differs from this run's config; resume with"))
    wide = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(9, 3))
    cases.append((path, "fp", FMT, wide, "does not fit this model .*; delete it to start over"))
    for file, fingerprint, fmt, net, message in cases:
        opt = torch.optim.AdamW(net.parameters())
        with pytest.raises(HDAError, match=message) as info:
            checkpoint.load(file, net, opt, generator, fingerprint, fmt)
        assert "\n" not in str(info.value)
    # A file without the torch RNG asked for; an older fit checkpoint's generator key ``rng`` still loads.
    with pytest.raises(HDAError, match="does not fit this model"):
        checkpoint.load(path, model, optimizer, generator, "fp", FMT, global_rng=True)
    tensors = load_file(path)
    tensors["rng"] = tensors.pop("rng.data")
    with safe_open(str(path), "pt") as fh:
        save_file(tensors, tmp_path / "old.ckpt.safetensors", metadata=fh.metadata())
    assert checkpoint.load(tmp_path / "old.ckpt.safetensors", model, optimizer, generator, "fp", FMT) == (3, 0.5)


def test_output_naming_rule():
    assert output_stem("a/b.hda.safetensors", ".hda.safetensors") == Path("a/b")
    assert beside(Path("a/b"), "ckpt.safetensors") == Path("a/b.ckpt.safetensors")
    with pytest.raises(HDAError, match=r"--out a/x.hda.safetensors: expected a file name ending in .safetensors "
                                       r"\(and not .hda.safetensors, which is an avatar\)"):
        output_stem("a/x.hda.safetensors", ".safetensors", {".hda.safetensors": "an avatar"})
    for bad in ("a/.safetensors", "a/x.npz"):
        with pytest.raises(HDAError, match="expected a file name ending in .safetensors"):
            output_stem(bad, ".safetensors")


WRITER = r"""
import os, sys, time
import torch
sys.path.insert(0, sys.argv[2])
from hda_backend import atomic, checkpoint
if os.environ.get("NO_TMPFILE"):
    atomic._open_anonymous = lambda folder: None


def slow_write_bytes(path, data):  # the real write_atomic, fed in 1 MB pieces: most of the time is in the write
    def write(fh):
        for start in range(0, len(data), 1 << 20):
            fh.write(data[start:start + (1 << 20)])
            time.sleep(0.005)
    return atomic.write_atomic(path, write)


atomic.write_bytes = slow_write_bytes
path = sys.argv[1]
model = torch.nn.Linear(1024, 2048)  # 8 MB of weights, 16 MB of AdamW moments: ~25 MB a checkpoint
optimizer = torch.optim.AdamW(model.parameters())
generator = torch.Generator().manual_seed(0)
model(torch.ones(1, 1024)).sum().backward()
optimizer.step()
step = 0
if os.path.exists(path):
    step, _ = checkpoint.load(path, model, optimizer, generator, "kill", "kill-test")
while True:
    step += 1
    with torch.no_grad():
        model.weight.fill_(step)
    checkpoint.save(path, model.state_dict(), optimizer, generator, step, 0.0, "kill", "kill-test")
"""


def _step(path: Path) -> int:
    try:
        with safe_open(str(path), "pt") as fh:
            return int(fh.metadata()["step"])
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("mode", ["tmpfile", "fallback"])
def test_killing_checkpoint_writes_leaves_a_whole_checkpoint_and_no_temporary(tmp_path, mode):
    """SIGKILL a process that writes ~25 MB checkpoints back to back, at random instants, again and again:
    the checkpoint is always whole, its content is that of its step, and no temporary file remains once the
    job resumes (O_TMPFILE: any leftover is a whole file, from the microseconds between link and rename)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "job.ckpt.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"NO_TMPFILE": "1"} if mode == "fallback" else {})}
    rng = random.Random(0)
    last, partial = 0, 0
    for kill in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(ROOT)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 120
            while _step(path) < last + 2:  # it resumed and has written at least two checkpoints
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "the writer made no progress"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in a write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        leftovers = _temporaries(tmp_path)
        partial += bool(leftovers)
        if mode == "tmpfile":
            for leftover in leftovers:  # never a partial file: only a whole one between link and rename
                assert load_file(leftover).keys()
        model = torch.nn.Linear(1024, 2048)
        optimizer = torch.optim.AdamW(model.parameters())
        step, _ = checkpoint.load(path, model, optimizer, torch.Generator(), "kill", "kill-test")
        assert step >= last + 2 and bool((model.weight == step).all())  # whole, and its own step's content
        assert not _temporaries(tmp_path), f"kill {kill}: {_temporaries(tmp_path)}"
        last = step
    if mode == "fallback":  # the kills do land in writes: the named temporaries show it
        assert partial >= 1


@pytest.mark.parametrize("anonymous", [True, False])
def test_write_bytes_without_make_parents_never_creates_a_folder(tmp_path, monkeypatch, anonymous):
    """make_parents=False: a missing folder is an OSError, through O_TMPFILE and through the mkstemp
    fallback alike, and nothing is created; an existing folder is written as usual."""
    from hda_backend import atomic

    if not anonymous:
        monkeypatch.setattr(atomic, "_open_anonymous", lambda folder: None)
    with pytest.raises(OSError):
        atomic.write_bytes(tmp_path / "gone" / "f.bin", b"x", make_parents=False)
    assert not (tmp_path / "gone").exists()
    assert atomic.write_bytes(tmp_path / "f.bin", b"y", make_parents=False).read_bytes() == b"y"

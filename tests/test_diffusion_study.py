"""scripts/diffusion_study.py span-ceiling on tiny avatars: the projection path (normalise, project layer by
layer, decode, write, render) against avatars whose place in the span is known."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from hda_backend.avatar.io import save_avatar
from tests.test_eval_gen import tiny_avatar

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "diffusion_study.py"), "span-ceiling", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO)


def test_span_ceiling_reproduces_avatars_of_the_span_and_names_bad_sizes(tmp_path):
    train, held = tmp_path / "train", tmp_path / "held"
    train.mkdir()
    held.mkdir()
    avatars = [tiny_avatar(i, colour_seed=100 + i) for i in range(4)]
    for i, avatar in enumerate(avatars):
        save_avatar(avatar, train / f"subj_{i}.hda.safetensors")
    # Held out: a layer-wise mix of two training avatars (its output convolution from subject 1, every other
    # layer from subject 3): on the span layer by layer, so its projection renders as itself, while no
    # single training avatar is it.
    mix = tiny_avatar(3, colour_seed=103)
    with torch.no_grad():
        for name, p in mix.unet.named_parameters():
            if name.startswith("outc."):
                p.copy_(dict(avatars[1].unet.named_parameters())[name])
    save_avatar(mix, held / "mix.hda.safetensors")
    run = _run("--train", train, "--held-out", held, "--sizes", "4", "--out", tmp_path / "out", "--preset", "tiny")
    assert run.returncode == 0, run.stderr[-2000:]
    row = re.search(r"^\| 4 \| ([\d.]+) / [\d.]+ dB \| ([\d.]+) dB \| ([+-][\d.]+) dB \| ([\d.]+) \| (\d+) % \|$", run.stdout, re.M)
    assert row, run.stdout
    own, nearest, gain, ratio, off = (float(g) for g in row.groups())
    # In the span: rendered as itself up to float32 rounding (161 dB measured), far nearer than its nearest
    # training avatar (69 dB: tiny avatars cover few pixels, so different ones are still close in PSNR).
    assert own > 100.0 and gain > 50.0 and abs(own - nearest - gain) <= 0.02
    assert abs(ratio - 1.0) < 1e-3 and off == 0.0
    assert len(list((tmp_path / "out" / "n004").glob("*.hda.safetensors"))) == 1
    bad = _run("--train", train, "--held-out", held, "--sizes", "9", "--out", tmp_path / "out", "--preset", "tiny")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (f"span-ceiling: --sizes [9]: expected values from 2 to the 4 fits "
                                                   f"in {train}")

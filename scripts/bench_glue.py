#!/usr/bin/env python3
"""Milliseconds of the final-render handler's glue stage, this tree against an earlier commit's code.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD .venv/bin/python scripts/bench_glue.py --against REV [--reps 40]

The glue stage turns the rasterizer's output into the avatar's layer file, as blender_addon/layers.py
``write_frame`` does (the layer writer's raw-block write, without its background ZIP rewrite):

    layer     hda_backend.layer.to_layer(..., dtype=float16): linear premultiplied half RGBA + depth
    channels  hda_backend.exr.layer_channels: the layer's EXR channel planes
    encode    hda_backend.exr.encode_exr(compress=False): the file's bytes, blocks stored raw
    write     hda_backend.atomic.write_bytes: the file, atomically (a new path each time, as in a first
              render; removed after each repetition, as the background rewrite shrinks it in the add-on)

and, for the viewport, ``to_layer`` in float32 (``layer f32``). The frame is a real one: the first
bundled reference avatar in a walk, rendered at 512x512 by the rasterizer in the handler's mode (RGB + expected
depth) from a camera 3.2 m away. ``REV``'s hda_backend/layer.py and hda_backend/exr.py are loaded from
git (``git show``) and run on the same frame; both paths alternate repetition by repetition (A/B, then
B/A), and the figures are medians, with the median of the per-repetition ratios old/new, so a busy
machine slows both alike. Both must write the same file bytes (checked). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

import hda_backend
from hda_backend import atomic, exr, layer
from hda_backend.avatar.io import SUFFIX, load_avatar
from hda_backend.avatar.realtime import RealtimeAvatar
from hda_backend.body import load_body
from hda_backend.motion import procedural
from hda_backend.render.camera import intrinsics, look_at
from hda_backend.render.frames import render_gaussians

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("layer", "channels", "encode", "write", "glue", "layer f32")


def _module_at(rev: str, name: str) -> types.ModuleType:
    """hda_backend/<name>.py as it was at ``rev``, as a module of the hda_backend package (so its relative
    imports resolve to this tree's helpers, which this comparison does not touch)."""
    source = subprocess.run(["git", "show", f"{rev}:hda_backend/{name}.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"{hda_backend.__name__}._at_{name}")
    module.__package__ = hda_backend.__name__
    exec(compile(source, f"{rev}:hda_backend/{name}.py", "exec"), module.__dict__)
    return module


@torch.inference_mode()
def _frame(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb+depth [H,W,4], alpha [H,W]) of a bundled reference avatar, as the handler gets them."""
    avatar = load_avatar(sorted((ROOT / "assets" / "default" / "references").glob("*" + SUFFIX))[0], load_body()).eval()
    pose = procedural("walk", 24).poses[5]  # arms down, mid-stride
    view = look_at(torch.tensor([0.4, 0.3, 3.2]), torch.tensor([0.0, -0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    img, alpha = render_gaussians(RealtimeAvatar(avatar, "float32")(pose), view, intrinsics(size, size, 35.0),
                                  size, size, render_mode="RGB+ED")
    return img.numpy(), alpha[..., 0].numpy()


def _glue(to_layer, layer_channels, encode_exr, img, alpha, path: Path, planar: bool) -> tuple[list[float], bytes]:
    kwargs = {"planar": True} if planar else {}
    t = [time.perf_counter()]
    rgba, depth = to_layer(img[..., :3], alpha, img[..., 3], dtype=np.float16, **kwargs)
    t.append(time.perf_counter())
    channels = layer_channels(rgba, depth)
    t.append(time.perf_counter())
    data = encode_exr(channels, compress=False)
    t.append(time.perf_counter())
    atomic.write_bytes(path, data)
    t.append(time.perf_counter())
    to_layer(img[..., :3], alpha, img[..., 3])
    t.append(time.perf_counter())
    ms = [1e3 * (b - a) for a, b in zip(t, t[1:])]
    return ms[:4] + [sum(ms[:4]), ms[4]], data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git revision whose layer.py and exr.py to compare with")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    old_layer, old_exr = _module_at(args.against, "layer"), _module_at(args.against, "exr")
    img, alpha = _frame(args.size)
    box = layer.covered_box(alpha)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size}x{args.size} frame, the avatar's "
          f"box {box[0].stop - box[0].start}x{box[1].stop - box[1].start} px; {args.reps} repetitions, A/B alternating")
    paths = {"old": (old_layer.to_layer, old_exr.layer_channels, old_exr.encode_exr, False),
             "new": (layer.to_layer, exr.layer_channels, exr.encode_exr, True)}
    times = {k: [] for k in paths}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(-2, args.reps):  # two warm-up repetitions
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            data = {}
            for which in order:
                path = Path(tmp) / f"{which}_{rep + 2}.exr"
                ms, data[which] = _glue(*paths[which][:3], img, alpha, path, paths[which][3])
                path.unlink()
                if rep >= 0:
                    times[which].append(ms)
            assert data["old"] == data["new"], "the two paths wrote different files"
    old, new = np.array(times["old"]), np.array(times["new"])
    print(f"{'stage':<10} {'old ms':>8} {'new ms':>8} {'old/new':>8}")
    for i, stage in enumerate(STAGES):
        print(f"{stage:<10} {np.median(old[:, i]):>8.2f} {np.median(new[:, i]):>8.2f} "
              f"{np.median(old[:, i] / new[:, i]):>8.2f}")
    print("glue = layer + channels + encode + write (the handler's glue stage); layer f32 = to_layer in float32 "
          "(the viewport's). Ratios: median of the per-repetition ratios.")


if __name__ == "__main__":
    main()

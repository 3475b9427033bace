"""The numba kernels' warm-up (hda_backend/render/warmup.py, blender_addon/kernels.py): after it, a
fresh process renders, fits and runs an avatar's per-frame fast path without compiling anything (every
kernel comes from numba's cache).

Each step runs in its own interpreter with an empty $NUMBA_CACHE_DIR, as after a fresh install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("numba")

from blender_addon import kernels  # noqa: E402
from hda_backend.render import warmup  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

_RENDER_AFTER = """
import json, torch
from hda_backend.render import rasterize
from hda_backend.render.warmup import cache_stats, compiled_signatures
before = compiled_signatures()
g = torch.Generator().manual_seed(1)
n = 300   # another scene and size than the warm-up's: the kernels' types do not depend on them
means = (torch.rand(n, 3, generator=g) - 0.5) + torch.tensor([0.0, 0.0, 4.0])
quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
scales, opacities = torch.full((n, 3), 0.04), torch.full((n,), 0.7)
colors = torch.randn(n, 16, 3, generator=g) * 0.3
viewmats, Ks = torch.eye(4)[None], torch.tensor([[[60.0, 0, 40], [0, 60.0, 30], [0, 0, 1]]])
with torch.no_grad():
    rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 80, 60, sh_degree=3,
              render_mode="RGB+ED", backend="cpu")
means.requires_grad_(True)
image, alpha, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 80, 60, sh_degree=3, backend="cpu")
(image.sum() + alpha.sum()).backward()
# Another avatar than the warm-up's (UV resolution, UNet, a pose): the kernels' types do not depend on them.
from hda_backend.avatar.model import Avatar
from hda_backend.avatar.realtime import RealtimeAvatar
from hda_backend.avatar.unet import UNetConfig
from hda_backend.body import load_body
from hda_backend.config import load_config
avatar = Avatar.from_init(load_body(), 64, UNetConfig(16, 2), load_config("tiny").gaussians, seed=3)
with torch.inference_mode():
    RealtimeAvatar(avatar, "float32")(0.2 * torch.randn(1, 55, 3, generator=g), torch.ones(3))
print(json.dumps({"before": before, "stats": cache_stats()}))
"""


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")
    return env


def test_after_the_warm_up_a_fresh_process_compiles_no_kernel(tmp_path):
    cache, stamp = tmp_path / "numba", tmp_path / "user" / "kernels.json"
    argv, env = kernels.command(sys.path, str(REPO), str(stamp), python=sys.executable)
    env.update(NUMBA_CACHE_DIR=str(cache))
    warm = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    progress = [text for text in map(kernels.describe, warm.stdout.splitlines()) if text]
    assert progress == ["compiling kernels 1/3: forward kernels", "compiling kernels 2/3: backward kernels",
                        "compiling kernels 3/3: avatar kernels", "kernels ready"]
    # The stamp that lets later starts skip the child names the kernels' sources, numba and Python.
    assert json.loads(stamp.read_text()) == kernels.stamp(str(REPO), sys.path)
    named = {os.path.relpath(path, REPO).replace(os.sep, ".")[:-3] for path in kernels.source_files(str(REPO))}
    assert named == set(warmup.KERNELS)  # every kernel module is warmed, and only those
    assert not kernels.is_warm(str(stamp), dict(kernels.stamp(str(REPO), sys.path), sources=[]))
    assert kernels.is_warm(str(stamp), kernels.stamp(str(REPO), sys.path))
    assert not kernels.is_warm(str(stamp), dict(kernels.stamp(str(REPO), sys.path), numba="0.0"))

    after = subprocess.run([sys.executable, "-c", _RENDER_AFTER], env=_env(cache), capture_output=True,
                           text=True, timeout=600, cwd=tmp_path)
    assert after.returncode == 0, after.stderr[-3000:]
    report = json.loads(after.stdout.strip().splitlines()[-1])
    assert all(n == 0 for n in report["before"].values())          # nothing compiled at import
    for name, (hits, misses) in report["stats"].items():
        assert hits >= 1 and misses == 0, (name, hits, misses)      # loaded from the cache, never compiled


def test_describe_reads_only_the_progress_lines():
    assert kernels.describe("HDA_KERNELS 0 3 forward kernels") == "compiling kernels 1/3: forward kernels"
    assert kernels.describe("HDA_KERNELS 3 3 done") == "kernels ready"
    assert kernels.describe("Traceback (most recent call last):") is None


_FIT = """
import json, sys
from hda_backend.cli import main
from hda_backend.render.warmup import cache_stats
main(["fit", sys.argv[1], "--out", sys.argv[2], "--config", sys.argv[3]])
print(json.dumps(cache_stats()))
"""


def test_a_fit_runs_numba_cached_kernels_whether_or_not_the_cache_was_warm(tmp_path):
    """A process that compiles the rasterizer's kernels runs other machine code than one that loads them
    (fastmath reassoc), so a fit compiles them in a child when the cache is cold: its first run on a
    fresh install and every later run (a resume included) then give the same weights, bit for bit."""
    from safetensors.torch import load_file

    from tests.teacher import write_teacher_subject

    subject = write_teacher_subject(tmp_path / "data" / "teacher")
    config = tmp_path / "fit.yaml"
    config.write_text('preset: tiny\nfit: {"steps": 6, "map_steps": 6, "regress_steps": 2}\n')
    env = _env(tmp_path / "numba")
    runs = []
    for name in ("cold", "warm"):
        out = tmp_path / f"{name}.hda.safetensors"
        done = subprocess.run([sys.executable, "-c", _FIT, str(subject), str(out), str(config)], env=env,
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((done.stdout + done.stderr, json.loads(done.stdout.strip().splitlines()[-1]),
                     load_file(str(out))))
    (cold_log, cold_stats, cold), (warm_log, warm_stats, warm) = runs
    assert "compiling 8 numba kernels in a child process" in cold_log
    assert "numba kernels in a child" not in warm_log
    for stats in (cold_stats, warm_stats):  # both fits loaded every kernel they ran from the cache
        assert stats["_backward"][0] >= 1 and all(misses == 0 for _, misses in stats.values()), stats
    assert cold.keys() == warm.keys()
    assert all(torch.equal(cold[k], warm[k]) for k in cold)

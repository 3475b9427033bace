#!/usr/bin/env python3
"""The device check: everything this project does on a GPU, measured once, printed as one table.

    scripts/device_check.sh                       # on a lent GPU: sets up .venv-device, then runs this
    OMP_WAIT_POLICY=PASSIVE python scripts/device_check.py --cpu   # anywhere: the rows' code, small

Rows (each PASS or FAIL against its target):

    gsplat parity     gsplat's ``rasterization`` against the CPU rasterizer on the same avatar-like scenes:
                      image PSNR >= 40 dB and gradient cosine >= 0.99 (means, quats, scales, opacities, SH)
    avatar 512x512    ms per frame of the whole avatar, pose -> UV maps -> UNet -> Gaussians -> image
                      (after one pose -> Gaussians under DeviceGuard: no tensor made or read off the GPU)
    avatar 1920x1080  the same at 1080p, target >= 100 frames per second (paper preset, UV 256)
    paper fit         a paper-preset fit of a tiny synthetic subject for a few hundred steps: steps per
                      second >= 20, and the loss falls
    default samples   the bundled default model (assets/default) sampled on CUDA and on the CPU with the
                      same seeds, both avatars rendered by the same renderer: PSNR >= 40 dB
    fit-all nccl      ``torchrun --nproc_per_node=1 -m hda_backend.cli fit-all`` on two tiny subjects:
                      fit-all's distributed path (set_device, nccl, the gloo wait group) at world size 1

``--cpu`` runs every row's code on the CPU at test sizes, with the CPU's partner where CUDA would be
(the PyTorch twin rasterizer for gsplat, a second CPU run for the samples, gloo for nccl), and marks
each row "skipped: no CUDA": tests/test_device_check.py runs it so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hda_backend.avatar.io import load_avatar  # noqa: E402
from hda_backend.avatar.model import Avatar  # noqa: E402
from hda_backend.body import load_body, pose_body  # noqa: E402
from hda_backend.config import load_config  # noqa: E402
from hda_backend.devices import DeviceGuard  # noqa: E402
from hda_backend.motion import procedural  # noqa: E402
from hda_backend.precision import resolve as resolve_precision  # noqa: E402
from hda_backend.render.bench import avatar_scene  # noqa: E402
from hda_backend.render.camera import follow_cameras, intrinsics  # noqa: E402
from hda_backend.render.frames import render_gaussians  # noqa: E402
from hda_backend.render.rasterize import rasterize  # noqa: E402

DEFAULT_MODEL = REPO / "assets" / "default" / "diffusion.safetensors"
SKIPPED = "skipped: no CUDA"
PSNR_TARGET = 40.0
COSINE_TARGET = 0.99
FPS_TARGET = 100.0
FIT_STEPS_PER_S = 20.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(torch.mean((a.double().cpu() - b.double().cpu()) ** 2))
    return 99.0 if mse == 0 else min(99.0, -10.0 * math.log10(mse))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu().flatten(), b.double().cpu().flatten()
    norm = float(a.norm() * b.norm())
    return 1.0 if norm == 0 and float(a.norm() + b.norm()) == 0 else float(a @ b) / max(norm, 1e-300)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- rows


def check_parity(cuda: bool) -> tuple[str, bool]:
    """gsplat (CUDA tensors) against the CPU rasterizer (numba); on the CPU: the PyTorch twin against it."""
    scenes = [(2_000, 128, 0), (20_000, 256, 1), (60_000, 512, 2)] if cuda else [(200, 32, 0)]
    worst_psnr, worst_cos = math.inf, math.inf
    for n, size, seed in scenes:
        scene = avatar_scene(n, size, seed)
        gen = torch.Generator().manual_seed(seed)
        weights = torch.rand(1, size, size, 3, generator=gen)
        outs = []
        for backend, device in (("cpu", "cpu"), ("cuda", "cuda") if cuda else ("torch", "cpu")):
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in scene.items()}
            leaves = {k: inputs[k].clone().requires_grad_(True)
                      for k in ("means", "quats", "scales", "opacities", "colors")}
            render, alpha, _ = rasterize(**{**inputs, **leaves}, backend=backend)
            ((render * weights.to(device)).sum() + alpha.sum()).backward()
            outs.append((render.detach().cpu(), {k: v.grad.cpu() for k, v in leaves.items()}))
        (ref, ref_grads), (out, grads) = outs
        worst_psnr = min(worst_psnr, psnr(out.clamp(0, 1), ref.clamp(0, 1)))
        worst_cos = min(worst_cos, min(cosine(grads[k], ref_grads[k]) for k in ref_grads))
    value = f"PSNR min {worst_psnr:.1f} dB, grad cosine min {worst_cos:.4f} ({len(scenes)} scenes)"
    return value, worst_psnr >= PSNR_TARGET and worst_cos >= COSINE_TARGET


def avatar_frame_ms(device: torch.device, preset: str, width: int, height: int, frames: int) -> float:
    """Median ms per frame of the whole avatar: pose -> maps -> UNet -> Gaussians -> image (CUDA-synchronised)."""
    config = load_config(preset)
    avatar = Avatar.from_init(load_body(config.body.path, config.body.num_betas), config.uv.res, config.unet,
                              config.gaussians, seed=0).to(device).eval()
    avatar.precision = resolve_precision("auto", device)
    motion = procedural("walk", frames + 3)
    joints = pose_body(load_body(config.body.path, config.body.num_betas), motion.poses, transl=motion.transl).joints
    viewmats, _ = follow_cameras(joints, "front", max(width, height))
    K = intrinsics(width, height, 30.0).to(device)
    viewmats, poses, transl = viewmats.to(device), motion.poses.to(device), motion.transl.to(device)
    times = []
    with torch.inference_mode():
        with DeviceGuard(device):  # pose -> Gaussians creates and touches no tensor off the device
            avatar(poses[:1], transl[:1])
        for f in range(frames + 3):  # three warm-up frames (kernel selection, numba/JIT first calls)
            _sync(device)
            start = time.perf_counter()
            g = avatar(poses[f:f + 1], transl[f:f + 1]).index(0)
            rgb, _ = render_gaussians(g, viewmats[f], K, width, height, background=(1.0, 1.0, 1.0))
            _sync(device)
            if f >= 3:
                times.append((time.perf_counter() - start) * 1000.0)
    assert rgb.shape == (height, width, 3) and rgb.device.type == device.type
    return statistics.median(times)


def check_avatar(cuda: bool, width: int, height: int) -> tuple[str, bool]:
    device = torch.device("cuda" if cuda else "cpu")
    preset, frames = ("paper", 30) if cuda else ("tiny", 2)
    if not cuda:  # the same code at a test size
        width, height = max(16, width // 16), max(16, height // 16)
    ms = avatar_frame_ms(device, preset, width, height, frames)
    return f"{ms:.2f} ms/frame = {1000.0 / ms:.0f} fps ({preset} preset, {width}x{height})", 1000.0 / ms >= FPS_TARGET


def _subject(root: Path, size: int, name: str = "teacher") -> Path:
    from tests.teacher import write_teacher_subject

    return write_teacher_subject(root, size=size, name=name)


def check_fit(cuda: bool, work: Path) -> tuple[str, bool]:
    from hda_backend.fit.trainer import fit_subject
    from hda_backend.steplog import read_step_log

    device = "cuda" if cuda else "cpu"
    # The paper preset with a 30-step warm-up (its own is 30k steps, over which a few hundred steps
    # would not move the loss); everything else, UV 256 and the width-64 UNet included, as in the paper.
    preset, steps, size, every = ("paper", 300, 128, 50) if cuda else ("tiny", 10, 32, 5)
    config = load_config(preset, {"fit": {"warmup_steps": 30 if cuda else 2, "log_every": every,
                                          "checkpoint_every": 10 * steps}})
    subject = _subject(work / "fit_subject", size)
    out = work / f"fit_{preset}.hda.safetensors"
    result = fit_subject(subject, out, config, steps=steps, progress=False, device=device, log=lambda line: None)
    rows = [r for r in read_step_log(result.paths.metrics, math.inf) if "stage" not in r]
    first, last = rows[0], rows[-1]
    rate = (last["step"] - first["step"]) / max(last["seconds"] - first["seconds"], 1e-9)
    falls = last["loss"] < first["loss"]
    value = (f"{rate:.1f} steps/s, loss {first['loss']:.4f} -> {last['loss']:.4f} over {steps} steps "
             f"({preset} preset, {size}x{size} subject)")
    return value, rate >= FIT_STEPS_PER_S and falls


def check_samples(cuda: bool, work: Path, seeds: list[int], steps: int | None) -> tuple[str, bool]:
    from hda_backend.diffusion.model_io import load_diffusion
    from hda_backend.diffusion.sample import sample_vectors
    from hda_backend.diffusion.weights import write_avatar

    body = load_body()
    worst, worst_weight = math.inf, 0.0
    reference_model = load_diffusion(DEFAULT_MODEL)
    other_model = load_diffusion(DEFAULT_MODEL).to("cuda" if cuda else "cpu")
    ref_vectors = sample_vectors(reference_model, seeds, steps)
    other_vectors = sample_vectors(other_model, seeds, steps)
    motion = procedural("walk", 4)
    for i, seed in enumerate(seeds):
        images = []
        for tag, vec in (("cpu", ref_vectors[i]), ("other", other_vectors[i])):
            path = write_avatar(vec, reference_model.spec, reference_model.meta,
                                work / f"sample_{seed}_{tag}.hda.safetensors")
            avatar = load_avatar(path, body)  # both rendered by the CPU renderer: only the sampling differs
            with torch.no_grad():
                g = avatar(motion.poses[1:2], motion.transl[1:2]).index(0)
                joints = pose_body(body, motion.poses[1:2], transl=motion.transl[1:2]).joints
                viewmats, Ks = follow_cameras(joints, "front", 256)
                rgb, _ = render_gaussians(g, viewmats[0], Ks[0], 256, 256, background=(1.0, 1.0, 1.0))
            images.append(rgb)
        worst = min(worst, psnr(images[0].clamp(0, 1), images[1].clamp(0, 1)))
        scale = float(ref_vectors[i].abs().max())
        worst_weight = max(worst_weight, float((ref_vectors[i] - other_vectors[i]).abs().max()) / max(scale, 1e-12))
    value = (f"rendered PSNR min {worst:.1f} dB over seeds {seeds}, weights max abs diff {worst_weight:.1e} "
             f"of max abs weight")
    return value, worst >= PSNR_TARGET


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_fit_all(cuda: bool, work: Path) -> tuple[str, bool]:
    data = work / "fit_all_data"
    first = _subject(data / "s0", 32, "s0")
    shutil.copytree(first, data / "s1")
    text = (data / "s1" / "subject.json").read_text()
    (data / "s1" / "subject.json").write_text(text.replace('"name": "s0"', '"name": "s1"'))
    out = work / "fit_all_out"
    device = "cuda" if cuda else "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
           "-m", "hda_backend.cli", "fit-all", str(data), "--out", str(out), "--preset", "tiny", "--steps", "3",
           "--device", device]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    backend = "nccl" if cuda else "gloo"
    said = re.search(rf"fit-all: rank 0 of 1, {backend} on {device}", run.stdout + run.stderr) is not None
    fitted = sorted(p.name for p in out.glob("*.hda.safetensors")) if out.is_dir() else []
    ok = run.returncode == 0 and said and fitted == ["s0.hda.safetensors", "s1.hda.safetensors"]
    tail = "" if ok else f"; exit {run.returncode}: {(run.stderr.strip().splitlines() or [''])[-1][:160]}"
    return f"torchrun world size 1, {backend} on {device}: {len(fitted)}/2 subjects fitted{tail}", ok


# -------------------------------------------------------------------------------------------- table


def run_checks(cuda: bool, work: Path, seeds: list[int], sample_steps: int | None) -> list[tuple[str, str, str, str]]:
    rows = [
        ("gsplat parity", f"PSNR >= {PSNR_TARGET:.0f} dB, grad cosine >= {COSINE_TARGET}", lambda: check_parity(cuda)),
        ("avatar 512x512", f">= {FPS_TARGET:.0f} fps, no tensor off the device",
         lambda: check_avatar(cuda, 512, 512)),
        ("avatar 1920x1080", f">= {FPS_TARGET:.0f} fps, no tensor off the device",
         lambda: check_avatar(cuda, 1920, 1080)),
        ("paper fit", f">= {FIT_STEPS_PER_S:.0f} steps/s, loss falls", lambda: check_fit(cuda, work)),
        ("default samples CUDA vs CPU", f"rendered PSNR >= {PSNR_TARGET:.0f} dB",
         lambda: check_samples(cuda, work, seeds, sample_steps)),
        ("fit-all nccl (world size 1)", "exit 0, nccl on cuda:0, 2 subjects", lambda: check_fit_all(cuda, work)),
    ]
    table = []
    for name, target, check in rows:
        start = time.perf_counter()
        try:
            value, ok = check()
            status = ("PASS" if ok else "FAIL") if cuda else SKIPPED
        except Exception as exc:  # noqa: BLE001 - a failing row is a FAIL with its reason, the others still run
            value, status = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", "FAIL"
        table.append((name, target, f"{value} [{time.perf_counter() - start:.0f} s]", status))
    return table


def format_table(table: list[tuple[str, str, str, str]], header: str) -> str:
    lines = [header, "", "| check | target | measured | result |", "|---|---|---|---|"]
    lines += [f"| {name} | {target} | {value} | {status} |" for name, target, value, status in table]
    return "\n".join(lines)


def describe_machine(cuda: bool) -> str:
    gpu = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if cuda else "no CUDA device"
    try:
        import gsplat

        gs = f"gsplat {gsplat.__version__}"
    except Exception:  # noqa: BLE001 - reported, not needed for the CPU rows
        gs = "gsplat not importable"
    return f"device check: torch {torch.__version__}, {gpu}, {gs}, {torch.get_num_threads()} CPU threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run every row's code on the CPU at test sizes "
                                                           "(rows marked 'skipped: no CUDA')")
    parser.add_argument("--seeds", default="0,1", help="default-model seeds to compare (comma-separated)")
    parser.add_argument("--sample-steps", type=int, help="DDIM steps for the samples row (default: the model's)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("HDA_CACHE_DIR", str(work / "cache"))
        table = run_checks(cuda, work, seeds, args.sample_steps)
    print(format_table(table, describe_machine(cuda)), flush=True)
    return 1 if any(status == "FAIL" for *_, status in table) else 0


if __name__ == "__main__":
    sys.exit(main())

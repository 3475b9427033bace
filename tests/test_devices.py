"""Device ownership on CPU-only machines: the ``--device`` choice, per-rank devices, the whole avatar on
the ``meta`` device under :class:`DeviceGuard`, and fit-all's wait for the first fit (two gloo ranks)."""

import dataclasses
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from hda_backend.avatar.model import Avatar
from hda_backend.avatar.unet import UNetConfig
from hda_backend.avatar.gaussians import GaussianConfig
from hda_backend.body import load_body
from hda_backend.body.parts import parts_of_weights
from hda_backend.devices import DeviceError, DeviceGuard, parse_device, rank_device, resolve_device
from hda_backend.errors import HDAError
from hda_backend.fit.losses import photometric_loss
from hda_backend.render import frames

TINY = UNetConfig(width=16, levels=2)
META = torch.device("meta")


@pytest.fixture
def body(smplx_like_path):
    return load_body(smplx_like_path)


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("CUDA:1", "cuda:1"),
                                            (" cpu ", "cpu")])
def test_parse_device_accepts_the_documented_forms(text, expected):
    assert parse_device(text) == expected


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "mps", "", "cpu:0"])
def test_parse_device_refuses_anything_else_in_one_line(text):
    with pytest.raises(HDAError, match=r"^--device .*expected auto, cpu, cuda or cuda:N$"):
        parse_device(text)


def test_auto_says_in_one_line_what_it_chose():
    lines = []
    assert resolve_device("auto", lines.append, cuda_count=0) == torch.device("cpu")
    assert len(lines) == 1 and lines[0].startswith("device: auto chose cpu")
    lines.clear()
    assert resolve_device("auto", lines.append, cuda_count=2) == torch.device("cuda", 0)
    assert len(lines) == 1 and lines[0].startswith("device: auto chose cuda:0")
    lines.clear()
    assert resolve_device("cpu", lines.append, cuda_count=2) == torch.device("cpu") and lines == []
    assert resolve_device("cuda:1", lines.append, cuda_count=2) == torch.device("cuda", 1)


@pytest.mark.parametrize("requested, count, message", [("cuda", 0, "sees no CUDA device"),
                                                       ("cuda:2", 2, "only 2 CUDA device"),
                                                       ("tpu", 1, "expected auto, cpu")])
def test_impossible_devices_are_one_line_errors(requested, count, message):
    with pytest.raises(HDAError, match=message):
        resolve_device(requested, cuda_count=count)


@pytest.mark.parametrize("requested, rank, local_world, gpus, expected", [
    ("auto", 0, 2, 0, "cpu"), ("auto", 1, 2, 0, "cpu"),        # no GPU: every rank on the CPU (gloo)
    ("auto", 0, 2, 2, "cuda:0"), ("auto", 1, 2, 2, "cuda:1"),  # one GPU per rank, by LOCAL_RANK
    ("cuda", 1, 2, 4, "cuda:1"), ("cpu", 1, 2, 2, "cpu"),
    ("cuda:1", 0, 1, 2, "cuda:1"),                              # one rank may name its GPU
])
def test_rank_device_gives_every_rank_its_own_device(requested, rank, local_world, gpus, expected):
    assert rank_device(requested, rank, local_world, gpus) == expected


@pytest.mark.parametrize("requested, local_world, gpus, message", [
    ("auto", 3, 2, "3 ranks on this machine but 2 CUDA"),   # NCCL refuses two ranks on one GPU
    ("cuda:0", 2, 2, "expected --device cuda or auto"),     # every rank would take GPU 0
    ("cuda", 1, 0, "sees no CUDA device"),
])
def test_rank_device_refuses_what_nccl_cannot_run(requested, local_world, gpus, message):
    with pytest.raises(HDAError, match=message):
        rank_device(requested, 0, local_world, gpus)


def _tensors(avatar):
    body = [getattr(avatar.body, f.name) for f in dataclasses.fields(avatar.body)]
    layout = [getattr(avatar.layout, f.name) for f in dataclasses.fields(avatar.layout)]
    binding = [getattr(avatar.binding, f.name) for f in dataclasses.fields(avatar.binding)]
    return [t for t in body + layout + binding + list(avatar.unet.parameters()) if isinstance(t, torch.Tensor)]


def test_avatar_to_moves_the_body_layout_and_binding_with_the_unet(body):
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0)
    assert body.posedirs is not None  # the pose correctives (61 MB with SMPL-X) move too
    moved = avatar.to("meta")
    assert moved is avatar and all(t.device == META for t in _tensors(avatar))
    assert body.v_template.device.type == "cpu"  # the shared, loaded body itself stays where it was
    # Module.to's tensor function reaches every array with its values: float arrays convert, indices stay.
    wide = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0).to(torch.float64)
    reference = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0)
    for a, b in zip(_tensors(wide), _tensors(reference)):
        assert a.dtype == (torch.float64 if b.is_floating_point() else b.dtype)
        assert torch.equal(a, b.to(a.dtype))


@pytest.mark.parametrize("static, jitter", [(False, False), (False, True), (True, False)])
def test_the_avatar_pipeline_runs_on_meta_and_returns_meta_tensors(body, static, jitter):
    """pose -> UV maps -> UNet -> Gaussians with every module and input on meta: any tensor made on the
    CPU, or any body array left behind, fails under the guard (a GPU run would fail or copy there)."""
    cpu = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0, static=static)
    pose, transl = torch.zeros(2, 55, 3), torch.zeros(2, 3)
    reference = cpu(pose, transl, input_pose=pose + 0.1 if jitter else None)
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0, static=static).to("meta")
    pose_m, transl_m = pose.to("meta"), transl.to("meta")
    with DeviceGuard("meta"):
        g = avatar(pose_m, transl_m, input_pose=pose_m + 0.1 if jitter else None)
    for out, ref in zip(g, reference):
        assert out.device == META and out.shape == ref.shape and out.dtype == ref.dtype


def test_the_guard_catches_a_body_left_on_the_cpu(body):
    """The bug this issue fixed: Avatar.to() that does not move the body (copied on every call)."""
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0).to("meta")
    object.__setattr__(avatar, "body", body)  # plant the mistake: the CPU body under a meta avatar
    pose = torch.zeros(1, 55, 3, device="meta")
    with pytest.raises(DeviceError, match=r"expected every tensor on meta: .*got a cpu tensor"):
        with DeviceGuard("meta"):
            avatar(pose)


def test_the_guard_catches_cpu_constants_and_mixed_operations():
    x = torch.ones(3, device="meta")
    with pytest.raises(DeviceError, match=r"made a cpu tensor of shape \[3\]"):
        with DeviceGuard("meta"):
            x * torch.tensor([0.92, 0.85, 0.78])  # the old clay colour: a CPU constant
    with pytest.raises(DeviceError, match="got a cpu tensor"):
        with DeviceGuard("meta"):
            torch.ones(3).to(x.device)  # an upload on every call
    with DeviceGuard("meta") as guard:  # CPU scalars are legal everywhere; device-following code passes
        y = x * torch.tensor(2.0) + x.new_tensor([1.0, 2.0, 3.0]) + torch.zeros(3, device=x.device)
    assert guard.violations == [] and y.device == META


def _fake_rasterize(calls):
    """Stands in for the rasterizer on meta (it reads values): checks its inputs share one device."""
    def rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None,
                  backgrounds=None, render_mode="RGB", backend="auto"):
        tensors = [means, quats, scales, opacities, colors, viewmats, Ks]
        tensors += [] if backgrounds is None else [backgrounds]
        calls.append({t.device for t in tensors})
        channels = colors.shape[-1] if sh_degree is None else 3
        return (means.new_zeros(1, height, width, channels), means.new_zeros(1, height, width, 1), {})
    return rasterize


@pytest.mark.parametrize("shading", ["flat", "clay"])
def test_a_render_frame_and_its_loss_stay_on_the_avatar_device(body, monkeypatch, shading):
    calls = []
    monkeypatch.setattr(frames, "rasterize", _fake_rasterize(calls))
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0).to("meta")
    viewmat, K = torch.eye(4, device="meta"), torch.eye(3, device="meta")
    image, mask = torch.zeros(12, 16, 3, device="meta"), torch.zeros(12, 16, device="meta")
    weights = {"l1": 0.8, "ssim": 0.2, "lpips": 0.0, "mask": 0.1}
    with DeviceGuard("meta"):
        g = avatar(torch.zeros(1, 55, 3, device="meta")).index(0)
        rgb, alpha = frames.render_gaussians(g, viewmat, K, 16, 12, background=(1.0, 1.0, 1.0), shading=shading)
        loss, terms = photometric_loss(rgb, alpha[..., 0], image, mask, weights)
    assert calls == [{META}] and rgb.shape == (12, 16, 3) and loss.device == META
    assert set(terms) == {"l1", "ssim", "mask"} and all(t.device == META for t in terms.values())


def test_body_parts_of_an_avatar_stay_on_its_device(body):
    # eval-gen labels the parts of an avatar on its device (diffusion.gallery): the joint->part matrix follows.
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0).to("meta")
    with DeviceGuard("meta"):
        parts = parts_of_weights(avatar.binding.weights)
    assert parts.device == META and parts.shape == (avatar.num_gaussians,)


# ---------------------------------------------------------------------------------------------------
# fit-all: ranks wait for rank 0's first fit on a gloo group with its own (long) timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_worker(rank: int, port: int, first_fit_s: float, wait_hours: float, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import datetime

    import torch.distributed as dist

    from hda_backend.errors import HDAError
    from hda_backend.fit.fit_all import wait_for_ranks, wait_group

    # The default group times out after 1 s: a plain barrier would fail while rank 0 "fits".
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=1))
    group = wait_group(wait_hours)
    try:
        if rank == 0:
            time.sleep(first_fit_s)  # the first fit
        wait_for_ranks(group, wait_hours, rank, "rank 0's first fit")
        results.put((rank, "ok"))
    except HDAError as exc:
        results.put((rank, str(exc)))
    if rank == 1 or first_fit_s < 3:
        dist.destroy_process_group()


def _run_pair(first_fit_s: float, wait_hours: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_wait_worker, args=(r, port, first_fit_s, wait_hours, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in procs:
            rank, value = results.get(timeout=120)
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


@pytest.mark.parametrize("principal", [0, 8])
def test_the_weight_denoiser_and_its_sampling_maps_follow_it_to_meta(principal):
    # Sampling's per-token maps (composites, noise factors and their token indices) are made where the
    # denoiser is; principal projections are set from the data on the CPU (as training does) and then move.
    from hda_backend.config import load_config
    from hda_backend.diffusion.transformer import DenoiserConfig, WeightDenoiser
    from hda_backend.diffusion.weights import LayerSpec

    spec = LayerSpec.for_unet(load_config("tiny").unet)
    model = WeightDenoiser(spec, DenoiserConfig("layer", 1000, 16, 1, 2, 32, principal=principal))
    if principal:
        model.tokenizer.set_principal_projections(torch.randn(6, spec.dim))
    model = model.to("meta")
    with DeviceGuard("meta"):
        out = model(torch.zeros(2, spec.dim, device=META), torch.zeros(2, dtype=torch.long, device=META))
        maps = model.tokenizer.composites() + model.tokenizer.noise_factors()
    assert out.device == META and out.shape == (2, spec.dim)
    assert all(tokens.device == META and m.device == META for tokens, m in maps)


def test_ranks_wait_for_a_first_fit_longer_than_the_default_timeout():
    assert _run_pair(first_fit_s=2.5, wait_hours=1.0) == {0: "ok", 1: "ok"}


def test_a_wait_past_wait_hours_ends_with_one_line():
    out = _run_pair(first_fit_s=6.0, wait_hours=1.0 / 3600)  # a 1 s wait for a 6 s fit
    assert out[1].startswith("fit-all: rank 1 waited for rank 0's first fit longer than")
    assert "--wait-hours" in out[1] and "\n" not in out[1]


# ---------------------------------------------------------------------------------------------------
# --device on every entry point, and the add-on's device setting reaching the fit job


COMMANDS = {
    "render": ["render", "--init", "0", "--out", "o"],
    "fit": ["fit", "subject", "--out", "o.hda.safetensors"],
    "fit-all": ["fit-all", "data", "--out", "o"],
    "eval-fit": ["eval-fit", "subject", "a.hda.safetensors"],
    "train-diffusion": ["train-diffusion", "fits", "--out", "d.safetensors"],
    "sample": ["sample", "--model", "d.safetensors", "--out", "o"],
    "interpolate": ["interpolate", "--a", "a.hda.safetensors", "--b", "b.hda.safetensors", "--t", "0.5", "--out", "o"],
    "eval-gen": ["eval-gen", "--reference", "r", "--out", "o"],
    "export-ply": ["export-ply", "--init", "0", "--out", "o"],
    "build-default": ["build-default"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_entry_point_takes_device(command, capsys):
    from hda_backend.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(COMMANDS[command]).device == "auto"
    assert parser.parse_args(COMMANDS[command] + ["--device", "cuda:1"]).device == "cuda:1"
    assert main(COMMANDS[command] + ["--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'gpu0': expected auto, cpu, cuda or cuda:N" in err


def test_parsing_every_entry_point_with_a_device_does_not_import_torch():
    # `hda ... --help` and argument errors answer without the seconds torch takes to import: --device is
    # checked by form when parsed, resolved by hda_backend.devices when the command runs.
    script = ("import json, sys\nfrom hda_backend.cli import build_parser\nparser = build_parser()\n"
              f"for args in {json.dumps(list(COMMANDS.values()))}:\n"
              "    parser.parse_args(args + ['--device', 'cuda:1'])\n"
              "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_cuda_request_without_cuda_is_one_line(tmp_path, capsys):
    from hda_backend.cli import main

    code = main(["render", "--init", "0", "--frames", "1", "--preset", "tiny", "--out", str(tmp_path),
                 "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device cuda: torch" in err and "sees no CUDA device" in err


def test_the_addon_device_setting_reaches_the_fit_job(tmp_path):
    from blender_addon import fitjob
    from hda_backend.cli import build_parser

    argv, _ = fitjob.fit_command("subj", tmp_path / "o.hda.safetensors", "/ext", device="cuda", python="py",
                                 sys_path=[], base_env={})
    args = build_parser().parse_args(argv[3:])
    assert args.device == "cuda" and args.backend is None  # --backend keeps choosing the rasterizer (auto)

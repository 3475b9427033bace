"""``hda train-diffusion``, ``hda sample``, ``hda interpolate`` and ``hda bench sample``.

Wired into ``hda_backend/cli.py`` with ``add_parsers(sub)``, ``add_bench_parser(bench)`` and
``DIFFUSION_COMMANDS``. Under torchrun: ``torchrun --nproc_per_node=2 -m hda_backend.cli train-diffusion ...``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

from ..cli_args import add_config_args, add_device_arg, config_from_args, int_in
from ..errors import HDAError
from . import MAX_SAMPLES, MAX_SEED, NORMALIZATIONS, TOKENIZERS

MAX_STEPS = 100_000_000


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise HDAError(f"--t {text!r}: expected a number in [0, 1]") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise HDAError(f"--t {text}: expected a number in [0, 1]")
    return value


def add_parsers(sub) -> None:
    p = sub.add_parser("train-diffusion", help="train the weight-space diffusion model on fitted avatars")
    p.add_argument("fits", help="a folder of fitted avatars (*.hda.safetensors), all of one architecture")
    p.add_argument("--out", required=True, help="the model file to write (e.g. diff.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt.safetensors")
    p.add_argument("--tokenizer", choices=TOKENIZERS, help="override diffusion.tokenizer")
    p.add_argument("--normalization", choices=NORMALIZATIONS, help="override diffusion.normalization")
    p.add_argument("--steps", type=int_in("--steps", 1, MAX_STEPS), help="total steps (default: epochs)")
    add_device_arg(p)
    add_config_args(p)

    p = sub.add_parser("sample", help="sample new avatars from a trained diffusion model")
    p.add_argument("--model", required=True, help="a model file from train-diffusion")
    p.add_argument("--seed", type=int_in("--seed", 0, MAX_SEED), default=0, help="first seed")
    p.add_argument("--n", type=int_in("--n", 1, MAX_SAMPLES), default=1, help="avatars: seeds seed..seed+n-1")
    p.add_argument("--steps", type=int_in("--steps", 1, MAX_STEPS), help="DDIM steps K (default: the model's)")
    p.add_argument("--out", required=True, help="folder for sample_<seed>.hda.safetensors")
    add_device_arg(p)

    p = sub.add_parser("interpolate", help="an identity between two seeds (noise slerp) or two avatar files")
    p.add_argument("--model", help="a model file: interpolate between --seed-a and --seed-b")
    p.add_argument("--seed-a", type=int_in("--seed-a", 0, MAX_SEED))
    p.add_argument("--seed-b", type=int_in("--seed-b", 0, MAX_SEED))
    p.add_argument("--a", help="an avatar file: interpolate linearly in weight space to --b")
    p.add_argument("--b", help="an avatar file")
    p.add_argument("--t", type=_fraction, required=True, help="0 gives a, 1 gives b")
    p.add_argument("--steps", type=int_in("--steps", 1, MAX_STEPS), help="DDIM steps K (with --model)")
    p.add_argument("--out", required=True, help="the avatar file to write (*.hda.safetensors)")
    add_device_arg(p)


def add_bench_parser(bench) -> None:
    b = bench.add_parser("sample", help="seconds to sample one identity (noise to avatar file)")
    b.add_argument("--model", help="a trained model file (default: an untrained one at the preset's size; "
                                   "sampling time does not depend on the weights)")
    b.add_argument("--steps", type=int_in("--steps", 1, MAX_STEPS), help="DDIM steps K (default: the model's)")
    b.add_argument("--n", type=int_in("--n", 1, 1000), default=3, help="timed identities")
    b.add_argument("--tokenizer", choices=TOKENIZERS, help="override diffusion.tokenizer (untrained model only)")
    add_config_args(b)


def cmd_train_diffusion(args) -> None:
    from .train import train_diffusion

    d = config_from_args(args).diffusion
    d = dataclasses.replace(d, tokenizer=args.tokenizer or d.tokenizer,
                            normalization=args.normalization or d.normalization)
    result = train_diffusion(args.fits, args.out, d, resume=args.resume, steps=args.steps, device=args.device)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        print(f"wrote {result.paths.model} after {result.steps} steps in {result.seconds / 60:.1f} min "
              f"({d.tokenizer} tokens, {result.parameters:,} parameters, {d.normalization} normalisation "
              f"x {result.norm_scale:.3g}, final loss {result.final_loss:.4g}); "
              f"curve: {result.paths.curve}, log: {result.paths.log}")


def cmd_sample(args) -> None:
    from .sample import sample_avatars

    start = time.perf_counter()
    paths = sample_avatars(args.model, args.seed, args.n, args.steps, args.out, progress=True, device=args.device)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} avatars to {args.out} ({paths[0].name} ...) in {elapsed:.1f} s")


def cmd_interpolate(args) -> None:
    from .model_io import load_diffusion
    from .sample import check_steps, interpolate_avatars, interpolate_noise
    from .weights import write_avatar

    by_seed = args.model is not None or args.seed_a is not None or args.seed_b is not None
    by_file = args.a is not None or args.b is not None
    if by_seed == by_file:
        raise HDAError("interpolate: give either --model with --seed-a and --seed-b, or --a and --b (avatar files)")
    if by_seed:
        if args.model is None or args.seed_a is None or args.seed_b is None:
            raise HDAError("interpolate: --model, --seed-a and --seed-b go together")
        from ..devices import resolve_device

        model = load_diffusion(args.model)
        check_steps(model, args.steps)  # bad input stays one line: checked before the device is chosen
        model.to(resolve_device(args.device))  # the noise is drawn on the CPU: the same on every device
        vec = interpolate_noise(model, args.seed_a, args.seed_b, args.t, args.steps)
        path = write_avatar(vec, model.spec, model.meta, args.out,
                            origin=f"interpolate:sample:{args.seed_a}:{args.seed_b}:{args.t:g} model:{model.path.name}")
    else:
        if args.a is None or args.b is None:
            raise HDAError("interpolate: --a and --b go together")
        path = interpolate_avatars(args.a, args.b, args.t, args.out)
    print(f"wrote {path}")


def cmd_bench_sample(args) -> None:
    from .model_io import DiffusionModel, load_diffusion
    from .sample import bench_sample

    if args.model:
        if args.tokenizer:
            raise HDAError("--tokenizer: only for the untrained model; a model file has its own")
        model = load_diffusion(args.model)
    else:
        import torch

        from .model_io import denoiser_config
        from .transformer import WeightDenoiser
        from .weights import AvatarMeta, LayerSpec, Normalizer

        config = config_from_args(args)
        d = dataclasses.replace(config.diffusion, tokenizer=args.tokenizer or config.diffusion.tokenizer)
        spec = LayerSpec.for_unet(config.unet)
        meta = AvatarMeta(unet=config.unet.to_dict(), gaussians=config.gaussians.to_dict(), uv_res=config.uv.res,
                          body_id="bench", body_sha256="bench", pose_input="posed")
        model = DiffusionModel(WeightDenoiser(spec, denoiser_config(d)).eval(),
                               Normalizer("coordinate", torch.zeros(spec.dim), torch.ones(spec.dim)),
                               spec, meta, d, Path(f"untrained-{config.preset}"))
    with tempfile.TemporaryDirectory() as tmp:
        r = bench_sample(model, tmp, args.n, args.steps)
    print(f"sample: {r['median_s']:.3f} s per identity (median of {r['n']}, min {r['min_s']:.3f} s), "
          f"{r['steps']} DDIM steps, {r['tokenizer']} tokens, {r['parameters']:,} parameters, "
          f"{r['threads']} threads, noise to avatar file")


DIFFUSION_COMMANDS = {"train-diffusion": cmd_train_diffusion, "sample": cmd_sample, "interpolate": cmd_interpolate}

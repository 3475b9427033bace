"""The ``hda`` command line.

Bad input ends with one line ``hda: error: ...`` and exit status 2, never a traceback. Set HDA_DEBUG=1
to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import os

# torch and numba each bring an OpenMP runtime whose idle threads spin; on a small shared machine they
# starve each other (10-30x slower renders). Passive waiting must be chosen before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from .cli_args import Parser, add_config_args, add_device_arg, config_from_args, int_in  # noqa: E402
from .constants import FIT_ALL_WAIT_HOURS, PROJECTIONS  # noqa: E402
from .errors import HDAError  # noqa: E402
from .studio.cli import STUDIO_COMMANDS  # noqa: E402
from .diffusion.cli import DIFFUSION_COMMANDS, cmd_bench_sample  # noqa: E402
from .diffusion.cli import add_bench_parser as add_diffusion_bench_parser  # noqa: E402
from .diffusion.cli import add_parsers as add_diffusion_parsers  # noqa: E402
from .studio.cli import add_parsers as add_studio_parsers  # noqa: E402
from .check_blend import FARM_COMMANDS  # noqa: E402
from .check_blend import add_parser as add_check_blend_parser  # noqa: E402

MAX_SIZE = 8192


def _positive(name: str, limit: int):
    return int_in(name, 1, limit)


_size = _positive("--size", MAX_SIZE)


def resolve_device(requested: str, log=None):
    """The torch device for ``--device`` (imported here: the parser itself runs without torch); auto's
    line goes to ``log`` (default: stderr)."""
    from .devices import log_stderr, resolve_device as resolve

    return resolve(requested, log or log_stderr)


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise HDAError(f"--wait-hours {text!r}: expected a number of hours") from None
    if not 0 < value < 10_000:
        raise HDAError(f"--wait-hours {text}: expected a positive number of hours below 10000")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hda", description="Hyper Diffusion Avatars: animatable Gaussian human avatars.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("render", help="render an avatar through a motion to RGBA PNG frames")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--avatar", help="an avatar file (*.hda.safetensors)")
    src.add_argument("--init", type=int, metavar="SEED", help="a consistently initialised (untrained) avatar")
    p.add_argument("--motion", default="wave", help="walk, wave, squat, turn, or an SMPL-X/AMASS .npz file")
    p.add_argument("--frames", type=_positive("--frames", 100_000), help="frames of the motion to render")
    p.add_argument("--camera", choices=("orbit", "front"), default="orbit")
    p.add_argument("--size", type=_size, help="image width and height in pixels (default: the preset's)")
    p.add_argument("--shading", choices=("flat", "clay"), default=None,
                   help="flat: the avatar's colours; clay: grey shaded by Gaussian normals "
                        "(default: clay for --init, flat for --avatar)")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default=None)
    add_device_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    add_config_args(p)

    p = sub.add_parser("fit", help="fit one avatar UNet to a subject's multi-view video")
    p.add_argument("subject", help="a subject folder of a capture dataset")
    p.add_argument("--out", required=True, help="the avatar file to write (*.hda.safetensors)")
    p.add_argument("--init-from", help="start from this avatar's weights (same architecture)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt.safetensors")
    p.add_argument("--static", action="store_true", help="baseline: UNet input frozen at the rest pose")
    p.add_argument("--steps", type=_positive("--steps", 10_000_000), help="override fit.steps / fit.init_steps")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default=None)
    add_device_arg(p)
    add_config_args(p)

    p = sub.add_parser("eval-fit", help="held-out PSNR/SSIM(/LPIPS) of fitted avatars on a subject")
    p.add_argument("subject")
    p.add_argument("avatars", nargs="+", help="avatar files to compare (e.g. an avatar and its --static baseline)")
    p.add_argument("--frames", type=_positive("--frames", 10_000), default=8, help="frames per split")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--png", help="the side-by-side picture (ground truth, each avatar, its error) on held-out-motion "
                                 "frames (default: <first avatar>.eval.png)")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default=None)
    add_device_arg(p)
    add_config_args(p)

    p = sub.add_parser("fit-all", help="fit every subject of a dataset (shards over torchrun ranks)")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="folder for <subject>.hda.safetensors")
    p.add_argument("--init-from", help="start every subject from this avatar (default: the first subject's fit)")
    p.add_argument("--init", choices=("first", "mean"), default="first",
                   help="first: every later subject starts from the first subject's fit; mean: from the mean of "
                        "the fits before it, in doubling rounds (means/ in --out)")
    p.add_argument("--steps", type=_positive("--steps", 10_000_000))
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default=None)
    add_device_arg(p)
    p.add_argument("--wait-hours", type=_hours, default=FIT_ALL_WAIT_HOURS,
                   help=f"how long ranks wait for each other, e.g. for rank 0's first fit "
                        f"(default: {FIT_ALL_WAIT_HOURS:g})")
    add_config_args(p)

    p = sub.add_parser("export-ply", help="write an avatar's Gaussians as standard 3DGS .ply files, one per frame")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--avatar", help="an avatar file (*.hda.safetensors)")
    src.add_argument("--init", type=int, metavar="SEED", help="a consistently initialised (untrained) avatar")
    p.add_argument("--motion", help="walk, wave, ... or an SMPL-X/AMASS .npz (default: the rest pose)")
    p.add_argument("--frames", help="N or A:B, 0-based, B excluded (default: every frame of the motion)")
    p.add_argument("--coords", choices=("body", "zup"), default="body",
                   help="body: the backend's coordinates; zup: +Y up turned to +Z up (Blender)")
    p.add_argument("--out", required=True, help="a folder (frame_NNNN.ply) or a .ply file name")
    add_device_arg(p)
    add_config_args(p)

    p = sub.add_parser("info", help="describe an avatar, body, or motion file")
    p.add_argument("file")

    p = sub.add_parser("bench", help="benchmarks (print timings)")
    bench = p.add_subparsers(dest="bench", required=True, parser_class=Parser)
    b = bench.add_parser("raster", help="CPU rasterizer ms per frame, forward and forward+backward")
    b.add_argument("--counts", default="10000,60000", help="comma-separated Gaussian counts")
    b.add_argument("--sizes", default="256,512", help="comma-separated image sizes")
    b.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    add_diffusion_bench_parser(bench)
    p = sub.add_parser("eval-gen", help="generation metrics (MMD/COV/1-NNA, FID/KID, novelty, plausibility) "
                                        "of diffusion models and baselines against reference avatars")
    p.add_argument("--reference", required=True, help="folder of reference avatars (*.hda.safetensors)")
    p.add_argument("--train", help="folder of the training avatars, if not the reference set (novelty, baselines, "
                                        "memorisation); the reference set is then held out")
    p.add_argument("--model", action="append", metavar="NAME=DIFF.safetensors", help="a diffusion model row (repeatable)")
    p.add_argument("--samples", action="append", metavar="NAME=DIR", help="a row of already generated avatars (repeatable)")
    p.add_argument("--baselines", default="copy,pca,blend", help="comma-separated baselines (copy, pca, blend) or 'none'")
    p.add_argument("--n", type=int, help="samples per generated row (default: as many as reference avatars)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="DDIM steps for model rows (default: the model's)")
    p.add_argument("--seed-sets", type=_positive("--seed-sets", 1000), default=1,
                   help="model rows: MMD/COV/1-NNA also on this many independent seed sets of n (default 1)")
    p.add_argument("--poses", help="gallery poses, comma-separated clip@phase (default walk@0.25,wave@0.25,squat@0.5)")
    p.add_argument("--cameras", type=_positive("--cameras", 16), default=4, help="gallery cameras around the body")
    p.add_argument("--size", type=_positive("--size", 1024), default=128, help="gallery image size")
    p.add_argument("--inception", help="TorchScript Inception-V3 features file for FID/KID (or $HDA_INCEPTION)")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--gallery-cache", metavar="DIR",
                   help="keep the reference and training galleries in DIR between runs (keyed by file bytes, "
                        "gallery and code: the same numbers, rendered once)")
    add_device_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    add_config_args(p)

    add_studio_parsers(sub)
    add_diffusion_parsers(sub)
    add_check_blend_parser(sub)

    p = sub.add_parser("build-default", help="build the bundled default model from nothing: studio, fit-all, "
                                             "diffusion, int8/float16 bundle, eval-gen, model card (resumable)")
    p.add_argument("--out", default="assets/default", help="the bundle folder (default: assets/default)")
    p.add_argument("--work", default="build/default", help="intermediate data and the build record "
                                                           "(default: build/default)")
    p.add_argument("--subjects", type=int_in("--subjects", 2, 100_000), default=None,
                   help="training subjects (default 96)")
    p.add_argument("--held-out", type=int_in("--held-out", 0, 100_000), default=None,
                   help="further subjects fitted but never trained on: eval-gen's reference set (default 32; 0: "
                        "evaluate against the training fits)")
    p.add_argument("--init", choices=("first", "mean"), default=None,
                   help="fit-all --init for the fits (default: the build's recipe)")
    p.add_argument("--seed-sets", type=int_in("--seed-sets", 1, 30), default=None,
                   help="eval-gen --seed-sets of the eval stage (default 3)")
    p.add_argument("--width", type=int_in("--width", 1, 4096), default=None,
                   help="the denoiser's width, FFN 4 x width (default 48; the shipped 24-subject model: 24)")
    p.add_argument("--projections", choices=PROJECTIONS, default=None,
                   help="the denoiser's per-layer projections (default learned; principal: each layer's fixed "
                        "principal directions, README Stage 2)")
    p.add_argument("--workers", type=int_in("--workers", 1, 1024), default=None,
                   help="fit-all processes for the fits stage, under torchrun (default: one per CUDA device, "
                        "else one single-threaded process per CPU core as memory allows; 1: in this process)")
    p.add_argument("--until", help="stop after this stage (studio, fits, diffusion, bundle, eval, fit-eval, card)")
    p.add_argument("--redo", help="redo this stage and every later one")
    add_device_arg(p)
    return parser


def cmd_render(args) -> None:
    from .avatar.io import load_avatar
    from .avatar.model import Avatar
    from .body import load_body
    from .motion import get_motion
    from .render.frames import render_motion

    config = config_from_args(args)
    body = load_body(config.body.path, config.body.num_betas)
    if args.avatar:
        avatar = load_avatar(args.avatar, body)
    else:
        avatar = Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, seed=args.init)
    motion = get_motion(args.motion, args.frames)
    avatar = avatar.to(resolve_device(args.device))  # once the arguments are known to be good
    shading = args.shading or ("clay" if args.init is not None else "flat")
    size = args.size or config.render.size
    start = time.perf_counter()
    paths = render_motion(avatar, motion, args.out, size, args.camera, config.render.fov_deg, shading,
                          args.backend or config.render.backend)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} frames ({size}x{size}, {avatar.num_gaussians} Gaussians) and contact_sheet.png "
          f"to {args.out} in {elapsed:.1f} s")


def cmd_fit(args) -> None:
    from .fit.trainer import fit_subject

    result = fit_subject(args.subject, args.out, config_from_args(args), init_from=args.init_from, resume=args.resume,
                         static=args.static, steps=args.steps, backend=args.backend, device=args.device)
    print(f"wrote {result.paths.avatar} after {result.steps} steps in {result.seconds / 60:.1f} min "
          f"(training-view PSNR {result.final_psnr:.2f} dB); curve: {result.paths.curve}, views: {result.paths.views}")


def cmd_eval_fit(args) -> None:
    import json

    from .avatar.io import load_avatar
    from .body import load_body
    from .dataset import load_subject
    import numpy as np

    from .atomic import write_text
    from .avatar.io import SUFFIX
    from .fit.evaluate import comparison_sheet, evaluate, format_table
    from .fit.losses import load_lpips
    from .images import save_png

    config = config_from_args(args)
    subject = load_subject(args.subject)
    body = load_body(config.body.path, config.body.num_betas)
    loaded = [(path, load_avatar(path, body)) for path in args.avatars]  # every file checked first
    device = resolve_device(args.device)
    subject = subject.to(device)
    perceptual, status = load_lpips(config.fit.lpips_alexnet)
    if perceptual is None:
        print(status)
    rows, avatars = [], []
    backend = args.backend or config.render.backend
    for path, avatar in loaded:
        avatar = avatar.to(device)
        name = Path(path).name.removesuffix(SUFFIX) + (" (static)" if avatar.static else "")
        avatars.append((name, avatar))
        rows.append((name, evaluate(subject, avatar, args.frames, backend, perceptual, progress=True)))
    print(format_table(rows))
    if args.json:
        write_text(Path(args.json), json.dumps({n: r for n, r in rows}, indent=2))
    png = Path(args.png or Path(args.avatars[0]).parent / f"{Path(args.avatars[0]).name.removesuffix(SUFFIX)}.eval.png")
    save_png(png, np.asarray(comparison_sheet(subject, avatars, backend=backend)))
    print(f"side by side: {png}")


def cmd_fit_all(args) -> None:
    from .fit.fit_all import fit_all

    log = fit_all(args.dataset, args.out, config_from_args(args), init_from=args.init_from, steps=args.steps,
                  backend=args.backend, device=args.device, wait_hours=args.wait_hours, init=args.init)
    fitted = sum(row["status"] == "fitted" for row in log)
    print(f"fitted {fitted}, skipped {len(log) - fitted} subjects into {args.out}")


def cmd_export_ply(args) -> None:
    import torch

    from .avatar.io import load_avatar
    from .avatar.model import Avatar
    from .body import NUM_JOINTS, load_body
    from .export_ply import coords_matrix, export_frames, output_paths, parse_frames
    from .motion import get_motion

    config = config_from_args(args)
    matrix = coords_matrix(args.coords)
    body = load_body(config.body.path, config.body.num_betas)
    if args.avatar:
        avatar = load_avatar(args.avatar, body)
    else:
        avatar = Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, seed=args.init)
    if args.motion:
        motion = get_motion(args.motion)
        poses, transl = motion.poses, motion.transl
    else:
        poses, transl = torch.zeros(1, NUM_JOINTS, 3), torch.zeros(1, 3)
    frames = parse_frames(args.frames, poses.shape[0])
    paths = output_paths(args.out, frames)
    avatar = avatar.to(resolve_device(args.device))  # once the arguments are known to be good
    start = time.perf_counter()
    export_frames(avatar, poses[frames], transl[frames], paths, matrix, progress=True)
    print(f"wrote {len(paths)} .ply files ({avatar.num_gaussians} Gaussians each, {args.coords} coordinates): "
          f"{paths[0]}{' ... ' + str(paths[-1]) if len(paths) > 1 else ''} in {time.perf_counter() - start:.1f} s")


def cmd_eval_gen(args) -> None:
    from .body import load_body
    from .diffusion.eval_gen import EvalGenConfig, evaluate_generation, format_table, parse_named
    from .diffusion.gallery import GalleryConfig, load_inception
    from .fit.losses import load_lpips

    config = config_from_args(args)
    baselines = () if args.baselines.strip() == "none" else tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    gallery = GalleryConfig(
        poses=tuple(x.strip() for x in args.poses.split(",")) if args.poses else GalleryConfig.poses,
        azimuths_deg=tuple(360.0 * c / args.cameras for c in range(args.cameras)), size=args.size,
        fov_deg=config.render.fov_deg, backend=args.backend or config.render.backend,
        device=str(resolve_device(args.device, log=print)))  # with the other status lines, before the work
    eval_config = EvalGenConfig(n=args.n, seed=args.seed, steps=args.steps, seed_sets=args.seed_sets,
                                baselines=baselines, gallery=gallery)
    perceptual, lpips_status = load_lpips(config.fit.lpips_alexnet)
    inception, inception_status = load_inception(args.inception)
    for status in (lpips_status, inception_status):
        print(status)
    report = evaluate_generation(args.reference, args.out, load_body(config.body.path, config.body.num_betas),
                                 models=parse_named(args.model, "--model"), samples=parse_named(args.samples, "--samples"),
                                 train=args.train, config=eval_config, lpips=perceptual, inception=inception,
                                 notes=(lpips_status, inception_status), gallery_cache=args.gallery_cache)
    print(format_table(report))
    if report["gallery_cache"] is not None:
        cached = report["gallery_cache"]
        print(f"gallery cache {cached['folder']}: {cached['hits']} galleries reused, {cached['misses']} rendered")
    print(f"wrote {Path(args.out) / 'eval_gen.md'}, eval_gen.json, samples_vs_nearest.png and samples/")


def cmd_build_default(args) -> None:
    from .build_default import Compute, DefaultBuildConfig, build_default
    from .config import DiffusionConfig

    start = time.perf_counter()
    given = {"subjects": args.subjects, "held_out": args.held_out, "fit_init": args.init,
             "eval_seed_sets": args.seed_sets}
    recipe = DefaultBuildConfig().overrides
    diffusion = dict(recipe["diffusion"])
    if args.width is not None:
        diffusion.update(width=args.width, ffn=4 * args.width)
    if args.projections is not None:
        diffusion["projections"] = args.projections
        if args.projections == DiffusionConfig.projections:  # the preset's own, so no override (as old records)
            del diffusion["projections"]
    if diffusion != recipe["diffusion"]:
        given["overrides"] = {**recipe, "diffusion": diffusion}
    build = DefaultBuildConfig(**{k: v for k, v in given.items() if v is not None})
    build_default(args.out, args.work, build, redo=args.redo, until=args.until,
                  compute=Compute(args.device, args.workers or 0))
    print(f"build-default: finished in {time.perf_counter() - start:.0f} s; {Path(args.out) / 'MODEL_CARD.md'}")


def cmd_info(args) -> None:
    from .describe import describe

    print(describe(args.file))


def cmd_bench(args) -> None:
    if args.bench == "sample":
        return cmd_bench_sample(args)
    from .render.bench import bench_raster, print_bench_raster

    def ints(text, name):
        try:
            values = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise HDAError(f"{name} {text!r}: expected comma-separated whole numbers") from None
        if not values or min(values) < 1:
            raise HDAError(f"{name} {text!r}: expected positive numbers")
        return values

    counts = ints(args.counts, "--counts")
    sizes = ints(args.sizes, "--sizes")
    if max(sizes) > MAX_SIZE:
        raise HDAError(f"--sizes {args.sizes}: expected sizes up to {MAX_SIZE}")
    print_bench_raster(bench_raster(counts=counts, sizes=sizes, backend=args.backend))


COMMANDS = {"render": cmd_render, "fit": cmd_fit, "eval-fit": cmd_eval_fit, "fit-all": cmd_fit_all, "info": cmd_info, "eval-gen": cmd_eval_gen, "export-ply": cmd_export_ply, "bench": cmd_bench, "build-default": cmd_build_default, **STUDIO_COMMANDS, **DIFFUSION_COMMANDS, **FARM_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        status = COMMANDS[args.command](args)
        return status if type(status) is int else 0  # check-blend returns 1 when the file is not ready
    except HDAError as exc:
        print(f"hda: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hda: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless debugging
        if os.environ.get("HDA_DEBUG"):
            raise
        print(f"hda: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set HDA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

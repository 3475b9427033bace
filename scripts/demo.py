#!/usr/bin/env python3
"""``make demo``: new people from the diffusion model, animated and rendered by Blender through the extension.

    .venv/bin/python scripts/demo.py [--out out/demo] [--model assets/default/diffusion.safetensors]
                                     [--identities 16] [--frames 48] [--size 384] [--seed 0] [--samples 8]

1. samples ``--identities`` people with seeds ``--seed`` ... (one seed is one person, bit for bit);
2. renders them with the backend: ``contact_sheet.png`` (every identity in one pose, labelled with its
   seed) and ``identity_strip.png`` (the first identity in six poses: pose-dependent shape);
3. builds the extension zip and runs scripts/demo_blender.py in a child Python with bpy and a
   throw-away Blender user folder (the user's own Blender settings are never read or written): the
   extension is installed from the zip, and the scene is built with its operators (hda.add_avatar,
   hda.sample_identity with the same model and seeds, hda.import_motion from the clips written
   here), rendered with ``render(animation=True)`` through the extension's compositor layer, saved
   as ``demo.blend`` with relative paths and its avatar layers baked (hda.bake_layer);
4. writes ``demo.gif`` (and ``demo.mp4`` when Blender has FFmpeg) and ``demo.json`` (seeds, files,
   per-stage wall times) and prints a summary.

Bad arguments or a missing or corrupt model end with one line ``demo: error: ...`` and exit status 2;
a failed extension build or Blender phase with one line and status 1 (Blender's output: blender.log).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see hda_backend/cli.py

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from build_extension import BuildError, build  # noqa: E402
from hda_backend.atomic import replacing, write_text  # noqa: E402
from hda_backend.cli_args import int_in  # noqa: E402
from hda_backend.errors import HDAError  # noqa: E402

DEFAULT_MODEL = REPO / "assets" / "default" / "diffusion.safetensors"
BLENDER_SCRIPT = Path(__file__).with_name("demo_blender.py")
ADDON = "bl_ext.user_default.hda_avatars"
FPS = 24                      # the clips' rate; the Blender scene takes it (import_motion SCENE_FPS)
CYCLE = 24                    # frames per cycle (one second) of the built-in clips written for Blender
TILE = 256                    # backend picture tiles (pixels)
SHEET_POSE = ("walk", 0.25)   # (built-in clip, phase) every identity of the contact sheet is shown in
# One identity in six poses that bend it differently (shoulders, hips, knees, spine): pose-dependent shape.
STRIP_POSES = (("walk", 0.25), ("jumping_jack", 0.5), ("squat", 0.5), ("lunge", 0.25), ("kick", 0.5), ("bow", 0.5))
MAX_IDENTITIES, MAX_FRAMES, SIZES = 64, 600, (64, 2048)
MAX_SEED = 2 ** 31 - 1 - MAX_IDENTITIES   # Blender's IntProperty holds the seeds
# What the demo writes; a re-run removes these first, so nothing stale is left beside the new output.
OUTPUTS = ("frames", "identities", "motions", "hda_avatars", "hda_layers", "demo.blend", "demo.blend1",
           "demo.gif", "demo.mp4", "contact_sheet.png", "identity_strip.png", "demo.json", "blender.log")


class DemoError(Exception):
    """The Blender phase failed (not bad input): exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own error prints usage over two lines
        raise HDAError(f"{message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusion model (default: the bundled one)")
    p.add_argument("--identities", type=int_in("--identities", 1, MAX_IDENTITIES), default=16,
                   help="people to sample for the contact sheet; the first two walk and wave in Blender")
    p.add_argument("--frames", type=int_in("--frames", 1, MAX_FRAMES), default=48, help=f"animation frames ({FPS} fps)")
    p.add_argument("--size", type=int_in("--size", *SIZES), default=384, help="Blender frame width and height")
    p.add_argument("--seed", type=int_in("--seed", 0, MAX_SEED), default=0, help="first identity seed")
    p.add_argument("--samples", type=int_in("--samples", 1, 4096), default=8, help="Cycles samples per pixel")
    p.add_argument("--no-video", action="store_true", help="skip demo.mp4")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ backend side
def tiled_clip(name: str, frames: int):
    """The built-in clip ``name`` (CYCLE frames per cycle) repeated to ``frames`` frames, the walk's
    forward travel carried on from cycle to cycle. Returns (poses [F,55,3], transl [F,3]) float64."""
    import numpy as np

    from hda_backend.motion import procedural

    clip = procedural(name, CYCLE, FPS)
    poses, transl = clip.poses.double().numpy(), clip.transl.double().numpy()
    cycles = math.ceil(frames / CYCLE)
    # Forward (+Z) travel is linear over frames 0 .. CYCLE-1, so a whole cycle covers CYCLE such steps;
    # the other axes bob periodically and carry nothing over.
    travel = np.zeros(3)
    travel[2] = (transl[-1, 2] - transl[0, 2]) * CYCLE / max(CYCLE - 1, 1)
    all_poses = np.concatenate([poses] * cycles)[:frames]
    all_transl = np.concatenate([transl + k * travel for k in range(cycles)])[:frames]
    return all_poses, all_transl


def write_motion(path: Path, name: str, frames: int) -> Path:
    import numpy as np

    poses, transl = tiled_clip(name, frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, poses=poses.reshape(frames, -1), trans=transl, mocap_frame_rate=np.float64(FPS))
    return path


def three_quarter_camera(centre, size: int, half_height: float, turn_deg: float = 25.0, fov_deg: float = 30.0):
    """(viewmat [4,4], K [3,3]) of a camera turned ``turn_deg`` from the front of a body (+Y up,
    facing +Z), looking at ``centre`` [3] and seeing ``half_height`` metres above and below it."""
    import torch

    from hda_backend.render.camera import intrinsics, look_at

    a = math.radians(turn_deg)
    centre = torch.as_tensor(centre, dtype=torch.float32)
    distance = half_height / math.tan(math.radians(fov_deg) / 2)
    eye = centre + distance * torch.tensor([math.sin(a), 0.08, math.cos(a)])
    return look_at(eye, centre, torch.tensor([0.0, 1.0, 0.0])), intrinsics(size, size, fov_deg)


def render_tile(avatar, pose, transl, viewmat, K, size: int):
    """pose [55,3], transl [3] -> RGBA uint8 [size,size,4] (straight alpha) of the avatar's own colours."""
    import torch

    from hda_backend.images import to_uint8, unpremultiply
    from hda_backend.render.frames import render_gaussians

    with torch.no_grad():
        g = avatar(torch.as_tensor(pose, dtype=torch.float32)[None],
                   torch.as_tensor(transl, dtype=torch.float32)[None]).index(0)
        rgb, alpha = render_gaussians(g, viewmat, K, size, size, shading="flat")
    return to_uint8(unpremultiply(rgb, alpha))


def clip_pose(name: str, phase: float):
    """(pose [55,3], transl [3]) of the built-in clip ``name`` at ``phase`` in [0, 1) of a 100-frame cycle."""
    from hda_backend.motion import pose_at

    return pose_at(name, phase, 100)


def backend_pictures(paths: list[Path], seeds: list[int], out: Path) -> dict:
    """contact_sheet.png (every identity in SHEET_POSE) and identity_strip.png (the first identity in
    each of STRIP_POSES), rendered by the backend through one fixed camera per picture."""
    import torch
    from tqdm import tqdm

    from hda_backend.avatar.io import load_avatar
    from hda_backend.body import load_body, pose_body
    from hda_backend.images import contact_sheet

    down = torch.tensor([0.0, 1.0, 0.0])  # aim under the pelvis-head midpoint: legs are longer than the rest
    body = load_body()
    pose, transl = clip_pose(*SHEET_POSE)
    joints = pose_body(body, pose[None], transl=transl[None]).joints[0]
    viewmat, K = three_quarter_camera(0.5 * (joints[0] + joints[15]) - 0.36 * down, TILE, 1.0)
    tiles, first = [], None
    for path in tqdm(paths, desc="contact sheet", unit="identity"):
        avatar = load_avatar(path, body).eval()
        first = avatar if first is None else first
        tiles.append(render_tile(avatar, pose, transl, viewmat, K, TILE))
    contact_sheet(tiles, min(4, len(tiles)), labels=[f"seed {s}" for s in seeds]).save(out / "contact_sheet.png")

    rest = pose_body(body, torch.zeros(1, 55, 3)).joints[0]
    viewmat, K = three_quarter_camera(0.5 * (rest[0] + rest[15]) - 0.3 * down, TILE, 1.2, 15.0)
    strip = [render_tile(first, *clip_pose(name, phase), viewmat, K, TILE) for name, phase in STRIP_POSES]
    contact_sheet(strip, len(strip), labels=[f"seed {seeds[0]}: {name} {phase:.2f}" for name, phase in STRIP_POSES]
                  ).save(out / "identity_strip.png")
    return {"contact_sheet": "contact_sheet.png", "identity_strip": "identity_strip.png"}


def write_gif(frames: list[Path], path: Path, fps: int) -> None:
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in frames]
    # One shared palette (from the middle frame) keeps the GIF from flickering between frames.
    palette = images[len(images) // 2].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    quantized = [im.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG) for im in images]
    with replacing(path) as tmp:
        quantized[0].save(tmp, format="GIF", save_all=True, append_images=quantized[1:], loop=0,
                          duration=round(1000 / fps), optimize=False)


# ------------------------------------------------------------------------------------ Blender side
def hermetic_env(root: Path) -> dict:
    """The child's environment: every Blender user folder (config, scripts, extensions) under ``root``
    (BLENDER_USER_RESOURCES, with the BLENDER_USER_* overrides removed), and the thumbnail cache Blender
    fills on save (XDG_CACHE_HOME), so the user's own Blender (~/.config/blender) is neither read nor
    changed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLENDER_USER_", "BLENDER_SYSTEM_"))}
    env.pop("PYTHONPATH", None)  # the child imports the installed extension, not this checkout
    env.pop("HDA_DIFFUSION_MODEL", None)  # the model is passed to hda.sample_identity explicitly
    env.update(BLENDER_USER_RESOURCES=str(root / "blender_user"), XDG_CACHE_HOME=str(root / "cache"),
               OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    for name in ("blender_user", "cache"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return env


def run_blender(args_path: Path, env: dict, log_path: Path, frames: int) -> dict:
    """Run demo_blender.py; its DEMO-FRAME lines drive a progress bar, the whole output goes to ``log_path``."""
    from tqdm import tqdm

    report, error = None, None
    with open(log_path, "w") as log, tqdm(total=frames, desc="blender render", unit="frame") as bar:
        proc = subprocess.Popen([sys.executable, str(BLENDER_SCRIPT), str(args_path)], env=env, cwd=args_path.parent,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("DEMO-FRAME "):
                bar.update(1)
            elif line.startswith("DEMO-STAGE "):
                bar.set_postfix_str(line.split()[1])
            elif line.startswith("DEMO-REPORT "):
                report = json.loads(line[len("DEMO-REPORT "):])
            elif line.startswith("DEMO-ERROR "):
                error = line[len("DEMO-ERROR "):].strip()
        code = proc.wait()
    if error or code != 0 or report is None:
        raise DemoError(f"Blender phase failed ({error or f'exit status {code}'}); see {log_path}")
    return report


# -------------------------------------------------------------------------------------------- main
def clean(out: Path) -> None:
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class Stopwatch:
    """Wall seconds per named stage, each measured from the end of the previous one."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 2)
        self.last = now


def run(args) -> dict:
    watch = Stopwatch()
    model_path = Path(args.model).resolve()
    if not model_path.is_file():
        raise HDAError(f"--model {args.model}: diffusion model file not found, expected a file from "
                       "'hda train-diffusion' (the bundled default lives at assets/default/diffusion.safetensors)")
    from hda_backend.diffusion.model_io import load_diffusion
    from hda_backend.diffusion.sample import sample_avatars

    model = load_diffusion(model_path)  # a corrupt model is refused before anything is written
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clean(out)
    seeds = list(range(args.seed, args.seed + args.identities))
    identity_files = sample_avatars(model, args.seed, args.identities, None, out / "identities", progress=True)
    del model  # the Blender child loads its own copy
    watch.mark("sample")
    pictures = backend_pictures(identity_files, seeds, out)
    watch.mark("backend_pictures")

    people = [{"seed": seeds[0], "role": "walk", "motion": str(write_motion(out / "motions" / "walk.npz", "walk",
                                                                            args.frames))}]
    if args.identities > 1:
        people.append({"seed": seeds[1], "role": "wave",
                       "motion": str(write_motion(out / "motions" / "wave.npz", "wave", args.frames))})
    with tempfile.TemporaryDirectory(prefix="hda_demo_") as tmp:
        tmp = Path(tmp)
        zip_path = build(tmp / "dist")
        watch.mark("extension_zip")
        blender_args = {"zip": str(zip_path), "addon": ADDON, "blend": str(out / "demo.blend"),
                        "model": str(model_path), "people": people, "size": args.size, "samples": args.samples,
                        "frames_dir": "frames", "video": None if args.no_video else str(out / "demo.mp4")}
        args_path = tmp / "demo_blender.json"
        args_path.write_text(json.dumps(blender_args))
        report = run_blender(args_path, hermetic_env(tmp), out / "blender.log", args.frames)
    watch.mark("blender")
    frames = [Path(f) for f in report["frames"]]
    write_gif(frames, out / "demo.gif", report["fps"])
    watch.mark("gif")
    watch.seconds["total"] = round(time.perf_counter() - watch.start, 2)

    def rel(p):
        return Path(p).resolve().relative_to(out).as_posix()

    summary = {
        "format": "hda-demo", "format_version": 1, "model": str(model_path), "seeds": seeds,
        "scene_seeds": [p["seed"] for p in people], "frames": len(frames), "fps": report["fps"],
        "size": args.size, "cycles_samples": args.samples, "blender": report["blender"],
        "files": {"frames": [rel(f) for f in frames], "gif": "demo.gif",
                  "video": "demo.mp4" if (out / "demo.mp4").is_file() else None,
                  "blend": "demo.blend", "identities": [rel(p) for p in identity_files],
                  "scene_identities": [a["avatar_path"] for a in report["avatars"]],
                  "motions": [rel(p["motion"]) for p in people], "log": "blender.log", **pictures},
        "avatars": report["avatars"],
        "seconds": {**watch.seconds, "blender_stages": report["stages"]},
    }
    write_text(out / "demo.json", json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict, out: str) -> None:
    s = summary["seconds"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in s["blender_stages"].items())
    n = len(summary["seeds"])
    print(f"demo: {n} {'identity' if n == 1 else 'identities'} (seeds {summary['seeds'][0]}..{summary['seeds'][-1]}), "
          f"{summary['frames']} frames at {summary['size']}x{summary['size']} in {out}/")
    print(f"  sample {s['sample']:.1f} s | backend pictures {s['backend_pictures']:.1f} s | extension zip "
          f"{s['extension_zip']:.1f} s | blender {s['blender']:.1f} s ({stages}) | gif {s['gif']:.1f} s | "
          f"total {s['total']:.1f} s")
    files = summary["files"]
    shown = ["frames/", files["gif"], files["video"], files["contact_sheet"], files["identity_strip"],
             files["blend"], "demo.json"]
    print("  " + ", ".join(f for f in shown if f))


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        summary = run(args)
    except HDAError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except (DemoError, BuildError) as exc:  # the extension build or the Blender phase failed
        print(f"demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

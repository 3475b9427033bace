"""Stage-1 fidelity on subjects nobody tuned on: synthesise, fit, evaluate, print the table.

    python scripts/fidelity.py --seed 9090 --subjects 3 --work build/fidelity

1. ``hda synth`` renders ``--subjects`` fresh studio subjects of ``--seed`` (resumes);
2. subject_000 is fitted from the consistent initialisation, pose-dependent and its ``--static`` twin;
   every further subject is fitted ``--init-from`` subject_000's avatar of the same kind;
3. ``eval-fit``'s splits (training views, held-out cameras, held-out motion; PSNR inside the mask's
   bounding box dilated by 8 px, full frame beside) for each avatar, and a side-by-side PNG per subject.

Prints one markdown table (per subject and the mean) with each fit's wall time and the load average
over it, and writes ``<work>/fidelity.json``. Finished fits are kept: re-running resumes.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see hda_backend/cli.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from hda_backend.atomic import write_text  # noqa: E402
from hda_backend.avatar.io import SUFFIX, load_avatar  # noqa: E402
from hda_backend.body import load_body  # noqa: E402
from hda_backend.config import load_config  # noqa: E402
from hda_backend.dataset import list_subjects, load_subject  # noqa: E402
from hda_backend.errors import HDAError  # noqa: E402
from hda_backend.fit.evaluate import comparison_sheet, evaluate  # noqa: E402
from hda_backend.checkpoint import read_safetensors  # noqa: E402
from hda_backend.fit.appearance import MapAvatar  # noqa: E402
from hda_backend.fit.trainer import FitPaths, fit_map_only, fit_subject, initial_avatar  # noqa: E402
from hda_backend.images import save_png  # noqa: E402
from hda_backend.studio.synth import SynthOptions, synth  # noqa: E402

KINDS = ("pose", "static")


def fit_one(subject_dir: Path, out: Path, config, init_from: Path | None, static: bool) -> dict:
    """Fit (or find) one avatar; returns its wall time and the load average while it ran."""
    record = out.with_name(out.name.removesuffix(SUFFIX) + ".fidelity.json")
    if out.is_file() and record.is_file():
        return json.loads(record.read_text())
    load = os.getloadavg()[0]
    start = time.perf_counter()
    resume = out.with_name(out.name.removesuffix(SUFFIX) + ".ckpt.safetensors").exists()
    fit_subject(subject_dir, out, config, init_from=init_from, static=static, resume=resume, progress=False,
                log=lambda line: print(f"  {line}", flush=True))
    info = {"seconds": round(time.perf_counter() - start, 1), "load_before": round(load, 2),
            "load_after_1min": round(os.getloadavg()[0], 2), "load_after_5min": round(os.getloadavg()[1], 2),
            "resumed": resume}
    write_text(record, json.dumps(info))
    return info


def fitted_map(subject_dir: Path, fits: Path, config, body, init_from) -> MapAvatar:
    """The pose-dependent fit's stage-1 map (its ``*.map.safetensors``), fitted again if the file is missing."""
    path = FitPaths.for_output(fits / f"{subject_dir.name}.pose{SUFFIX}").map
    if path.is_file():
        return MapAvatar(initial_avatar(config, body), read_safetensors(path, "fit map")[1]["raw"])
    return MapAvatar(*fit_map_only(subject_dir, config, init_from, log=lambda line: print(f"  {line}", flush=True)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True, help="a dataset seed nobody tuned on")
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--cameras", type=int, default=12)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data", type=Path, help="an existing synth output of these settings (default: <work>/data)")
    p.add_argument("--eval-frames", type=int, default=8, help="frames per split")
    args = p.parse_args(argv)
    try:
        config = load_config(args.preset)
        data = args.data or args.work / "data"
        synth(SynthOptions(subjects=args.subjects, cameras=args.cameras, frames=args.frames, size=args.size,
                           seed=args.seed, out=data))
        subjects = list_subjects(data)[: args.subjects]
        fits = args.work / "fits"
        body = load_body(config.body.path, config.body.num_betas)
        results = []
        for i, subject_dir in enumerate(subjects):
            row = {"subject": subject_dir.name, "fits": {}, "eval": {}}
            for kind in KINDS:
                out = fits / f"{subject_dir.name}.{kind}{SUFFIX}"
                init = None if i == 0 else fits / f"{subjects[0].name}.{kind}{SUFFIX}"
                print(f"{subject_dir.name} {kind}{' from ' + init.name if init else ''}", flush=True)
                row["fits"][kind] = fit_one(subject_dir, out, config, init, kind == "static")
            subject = load_subject(subject_dir)
            avatars = [(kind, load_avatar(fits / f"{subject_dir.name}.{kind}{SUFFIX}", body)) for kind in KINDS]
            for kind, avatar in avatars:
                row["eval"][kind] = evaluate(subject, avatar, args.eval_frames)
            # The ceiling of the representation: stage 1's map, posed by LBS alone, without the UNet.
            init = None if i == 0 else fits / f"{subjects[0].name}.pose{SUFFIX}"
            row["eval"]["map"] = evaluate(subject, fitted_map(subject_dir, fits, config, body, init), args.eval_frames)
            save_png(args.work / f"{subject_dir.name}.side_by_side.png", np.asarray(comparison_sheet(subject, avatars)))
            results.append(row)
            write_text(args.work / "fidelity.json", json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                "results": results}, indent=1))
        print(table(results))
    except HDAError as exc:
        print(f"fidelity: error: {exc}", file=sys.stderr)
        return 2
    return 0


def table(results: list[dict]) -> str:
    """Per subject and mean: box PSNR of each split, the pose-dependent gain on the held-out motion, fit
    minutes and the load average."""
    head = ("| subject | train | held-out cameras | held-out motion | static: held-out motion | gain | "
            "map, no UNet: train / held-out motion | fit min (pose / static) | load avg |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    columns = []
    for r in results:
        pose, static, ceiling = r["eval"]["pose"], r["eval"]["static"], r["eval"]["map"]
        values = [pose["train"]["psnr"], pose["novel view"]["psnr"], pose["novel pose"]["psnr"],
                  static["novel pose"]["psnr"], pose["novel pose"]["psnr"] - static["novel pose"]["psnr"],
                  ceiling["train"]["psnr"], ceiling["novel pose"]["psnr"]]
        columns.append(values)
        f = r["fits"]
        lines.append(f"| {r['subject']} | " + " | ".join(f"{v:.2f}" for v in values[:5])
                     + f" | {values[5]:.2f} / {values[6]:.2f}"
                     + f" | {f['pose']['seconds'] / 60:.1f} / {f['static']['seconds'] / 60:.1f}"
                     + f" | {f['pose']['load_before']:.2f} |")
    mean = np.mean(np.array(columns), 0)
    lines.append("| **mean** | " + " | ".join(f"**{v:.2f}**" for v in mean[:5]) + f" | {mean[5]:.2f} / {mean[6]:.2f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

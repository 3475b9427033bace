"""How the UNet's position units change how well it can be regressed onto a fitted map (README, Fitting).

    python scripts/position_scale_ablation.py SUBJECT --scale 20 [--map-steps 150] [--steps 300] [--lr 1e-3]

Fits stage 1's map of SUBJECT (``--map-steps`` of the cpu preset's map stage, 3 cameras per step), then
regresses a freshly initialised cpu-preset UNet onto it for ``--steps`` (batch 1, bf16 autocast, the
positions scaled by ``--scale``) and prints, every 50 steps, the regression loss and the base colour's
PSNR in UV space, and every 150 steps the training-crop PSNR (mask box grown by 10 %) of renders of the
UNet's map on 12 training views, beside the map's own.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see hda_backend/cli.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from hda_backend.config import load_config  # noqa: E402
from hda_backend.dataset import load_subject  # noqa: E402
from hda_backend.fit.appearance import GROUPS, regress_unet  # noqa: E402
from hda_backend.fit.trainer import _Views, fit_map_only, view_scorer  # noqa: E402
from hda_backend.render._projection import _SH_C0  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("subject")
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--map-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    config = load_config("cpu")
    config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, position_scale=args.scale),
                                 fit=dataclasses.replace(config.fit, map_steps=args.map_steps))
    subject = load_subject(args.subject)
    avatar, raw = fit_map_only(args.subject, config)
    avatar.precision = "bfloat16"
    scorer = view_scorer(subject, _Views(subject), config.fit, config.render.backend)
    views = [(c, f) for c in subject.train_cameras for f in subject.train_frames][::37][:12]

    @torch.no_grad()
    def render_psnr(texels: torch.Tensor) -> float:
        scores = [float(scorer(avatar.skin(texels[None], subject.poses[f:f + 1], subject.transl[f:f + 1]).index(0),
                               c, f, config.gaussians.sh_degree)[1]["psnr"]) for c, f in views]
        return sum(scores) / len(scores)

    print(f"map: render PSNR {render_psnr(raw):.2f} dB", flush=True)
    frames = subject.train_frames
    maps = torch.cat([avatar.pose_inputs(subject.poses[frames[i:i + 16]])[0] for i in range(0, len(frames), 16)])
    clock = time.perf_counter()

    def on_log(step, means):
        with torch.no_grad():
            out = avatar.unet(maps[:1]).flatten(2)[:, :, avatar.binding.texels].transpose(1, 2)[0]
        dc = GROUPS["sh_dc"]
        colour = -10 * math.log10(float(((out[:, dc] - raw[:, dc]) * _SH_C0).pow(2).mean()))
        line = f"step {step} {time.perf_counter() - clock:.0f}s loss {means['regression']:.4f} colour PSNR {colour:.2f}"
        if step % 150 == 0:
            line += f" render PSNR {render_psnr(out):.2f}"
        print(line, flush=True)

    regress_unet(avatar, raw, maps, args.steps, args.lr, batch=1, log_every=50, on_log=on_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

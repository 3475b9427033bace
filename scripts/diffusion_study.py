"""Weight-space measurements of trained diffusion models (tokenizer and normalisation ablations).

    python scripts/diffusion_study.py make-set --base AVATAR --n 24 --rank 4 --out DIR
    python scripts/diffusion_study.py evaluate --fits DIR --model NAME=DIFF.safetensors [...] [--samples 16]

``make-set`` writes a synthetic training set of known structure: base + sum_k c_ik d_k, with c ~ N(0, 1) and
``rank`` directions d_k whose entries are Gaussian with a per-layer scale (``--scale`` times the layer's std in
the base) times a per-coordinate log-normal factor, so coordinates within a layer vary by different amounts,
as fitted deltas do. ``evaluate`` prints one markdown row per model, all in weight space (comparable across
normalisations):

- ``denoise@t``: E|x0_pred - x0|^2 / E|x0 - mean|^2 on the training avatars at timestep t (EMA model);
- ``in-span``: the length of the samples' component in that span (from the mean), over the same spread
  (the training avatars: about 1; samples collapsed onto the mean: about 0);
- ``off-span``: the samples' distance to the affine span of the training set, over the set's RMS spread
  (0: on the span; about 1: as far off as a typical avatar is from the mean);
- ``NN ratio``: each sample's distance to its nearest training avatar over the median training
  nearest-neighbour distance (about 0: copies; about 1: as novel as the training avatars are among themselves).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hda_backend.diffusion.metrics import span_measures  # noqa: E402
from hda_backend.diffusion.model_io import load_diffusion  # noqa: E402
from hda_backend.diffusion.sample import sample_vectors  # noqa: E402
from hda_backend.diffusion.schedule import add_noise, alphas_cumprod  # noqa: E402
from hda_backend.diffusion.weights import load_weight_set, write_avatar  # noqa: E402


def make_set(base: Path, n: int, rank: int, scale: float, seed: int, out: Path) -> None:
    data = load_weight_set(base)
    gen = torch.Generator().manual_seed(seed)
    x0 = data.vectors[0]
    directions = torch.randn(rank, data.spec.dim, generator=gen)
    directions *= torch.exp(torch.randn(data.spec.dim, generator=gen))  # per-coordinate spread
    for layer in data.spec.layers:
        s = slice(layer.offset, layer.offset + layer.length)
        directions[:, s] *= scale * x0[s].std() / directions[:, s].std()
    coefs = torch.randn(n, rank, generator=gen)
    for i in range(n):
        write_avatar(x0 + coefs[i] @ directions, data.spec, data.meta, out / f"synth_{i:03d}.hda.safetensors",
                     origin=f"synthetic:{i} rank:{rank} scale:{scale:g}")
    print(f"wrote {n} avatars to {out}")


@torch.no_grad()
def evaluate(fits: Path, models: list[tuple[str, Path]], samples: int, steps: int | None) -> None:
    data = load_weight_set(fits)
    x = data.vectors.double()
    mean = x.mean(0)
    spread = (x - mean).pow(2).sum(1).mean()
    print("| model | tokenizer | normalisation | parameters | final loss | denoise@100 | denoise@250 | denoise@400 "
          "| in-span | off-span | NN ratio (median) | s per identity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path in models:
        model = load_diffusion(path)
        abar = alphas_cumprod(model.schedule)
        z = model.normalizer.encode(data.vectors)
        gen = torch.Generator().manual_seed(0)
        errors = []
        for t in (100, 250, 400):
            tt = torch.full((len(z),), t)
            pred = model.denoiser(add_noise(z, torch.randn(z.shape, generator=gen), tt, abar), tt)
            errors.append(((model.normalizer.decode(pred).double() - x).pow(2).sum(1).mean() / spread).item())
        start = time.perf_counter()
        s = sample_vectors(model, list(range(samples)), steps).double()
        per_identity = (time.perf_counter() - start) / samples
        span = span_measures(s.numpy(), x.numpy())
        with safe_open(str(path), "pt") as fh:
            loss = float(fh.metadata()["final_loss"])
        params = sum(p.numel() for p in model.denoiser.parameters())
        print(f"| {name} | {model.config.tokenizer} | {model.config.normalization} | {params:,} | {loss:.4f} | "
              f"{errors[0]:.4f} | {errors[1]:.4f} | {errors[2]:.4f} | "
              f"{span.in_span.mean():.3f} | {span.off_span.mean():.3f} | "
              f"{np.median(span.nn_ratio):.3f} | {per_identity:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-set")
    p.add_argument("--base", required=True, type=Path)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("evaluate")
    p.add_argument("--fits", required=True, type=Path)
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int)
    args = parser.parse_args()
    if args.command == "make-set":
        make_set(args.base, args.n, args.rank, args.scale, args.seed, args.out)
    else:
        models = [(m.split("=", 1)[0], Path(m.split("=", 1)[1])) for m in args.model]
        evaluate(args.fits, models, args.samples, args.steps)


if __name__ == "__main__":
    main()

"""Weight-space measurements of trained diffusion models (tokenizer, target, capacity and sampler ablations).

    python scripts/diffusion_study.py make-set --base AVATAR --n 96 --rank 32 [--unet-width 16 --unet-levels 2] \
        --out DIR
    python scripts/diffusion_study.py evaluate --fits DIR --model NAME=DIFF.safetensors [...] [--samples 64]
        [--steps K] [--eta η]
    python scripts/diffusion_study.py span-ceiling --train DIR --held-out DIR --sizes 24,96,224 --out DIR
        [--gallery-cache DIR]

``make-set`` writes a synthetic training set of known structure: base + sum_k c_ik d_k, with c ~ N(0, 1) and
``rank`` directions d_k whose entries are Gaussian with a per-layer scale (``--scale`` times the layer's std in
the base) times a per-coordinate log-normal factor, so coordinates within a layer vary by different amounts,
as fitted deltas do. The base is the given avatar, or with ``--unet-width``/``--unet-levels`` a freshly
initialised avatar UNet of that size (the same layer structure at a fraction of the weights, so a study
trains in minutes). The base, directions and coefficients are written to ``DIR/basis.safetensors``.
``span-ceiling`` asks what any layer-token model with linear per-layer decoders can reach on real fits: each
held-out fit is projected, layer by layer in the diffusion model's normalised coordinates, onto the affine span
of the first N training fits (:func:`hda_backend.diffusion.metrics.layer_span_projection`), and its gallery is
compared with the fit's own: PSNR to itself, PSNR of its nearest training subject among those N, and the
projections' colourfulness over the held-out fits'. Projections no nearer to a person than their nearest
training subject, and greyer, say that such a model's samples can only be copies or blends at that N.
``evaluate`` prints one markdown row per model, all in weight space (comparable across normalisations),
after rows that calibrate them (for a set with a basis): new people drawn from the set's own law, blends of
two training avatars, the mean avatar.

- ``denoise@t``: E|x0_pred - x0|^2 / E|x0 - mean|^2 on the training avatars at timestep t (EMA model);
- ``in-span``: the length of the samples' component in that span (from the mean), over the same spread
  (the training avatars: about 1; samples collapsed onto the mean: about 0);
- ``off-span``: the samples' distance to the affine span of the training set, over the set's RMS spread
  (0: on the span; about 1: as far off as a typical avatar is from the mean);
- ``NN ratio``: each sample's distance to its nearest training avatar over the median training
  nearest-neighbour distance (about 0: copies; about 1: as novel as the training avatars are among themselves);
- with a basis (:func:`hda_backend.diffusion.metrics.basis_measures`): ``coef norm`` (1 a new person, 1/2 a
  blend of two, 0 the mean), ``layer agreement`` (1 when all layers carry one person), ``coef NN`` and
  ``blend distance`` (the distance to the nearest training person, and to the nearest segment between two,
  over the same for new people: about 1 new, 0 copies / blends).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hda_backend.atomic import atomic_save_safetensors  # noqa: E402
from hda_backend.avatar.unet import AvatarUNet, UNetConfig  # noqa: E402
from hda_backend.body import load_body  # noqa: E402
from hda_backend.config import load_config  # noqa: E402
from hda_backend.diffusion.gallery import GalleryConfig, gallery_views, mse_matrix  # noqa: E402
from hda_backend.diffusion.gallery_cache import GalleryCache, render_files  # noqa: E402
from hda_backend.diffusion.image_stats import avatar_stats  # noqa: E402
from hda_backend.diffusion.metrics import basis_measures, layer_span_projection, span_measures  # noqa: E402
from hda_backend.diffusion.model_io import load_diffusion  # noqa: E402
from hda_backend.diffusion.sample import sample_vectors  # noqa: E402
from hda_backend.diffusion.schedule import add_noise, alphas_cumprod, predicted_x0  # noqa: E402
from hda_backend.diffusion.weights import (LayerSpec, Normalizer, load_weight_set, state_dict_to_vector,  # noqa: E402
                                           write_avatar)
from hda_backend.errors import HDAError  # noqa: E402

BASIS = "basis.safetensors"


def base_vector(base: Path, unet_width: int | None, unet_levels: int | None, seed: int):
    """(x0 [D], spec, meta): the base avatar's weights, or with --unet-width/--unet-levels a freshly
    initialised avatar UNet of that size (seeded) written with the base's other metadata."""
    data = load_weight_set(base)
    if unet_width is None and unet_levels is None:
        return data.vectors[0], data.spec, data.meta
    unet = dict(data.meta.unet, width=unet_width or data.meta.unet["width"],
                levels=unet_levels or data.meta.unet["levels"])
    meta = dataclasses.replace(data.meta, unet=unet)
    torch.manual_seed(seed)
    state = AvatarUNet(UNetConfig(**unet)).state_dict()
    spec = LayerSpec.for_unet(meta.unet_config)
    return state_dict_to_vector({k: v for k, v in state.items() if k in _conv_keys(spec)}, spec), spec, meta


def _conv_keys(spec: LayerSpec) -> set:
    return {f"{layer.name}.{part}" for layer in spec.layers for part in ("weight", "bias")}


def make_set(base: Path, n: int, rank: int, scale: float, seed: int, out: Path,
             unet_width: int | None = None, unet_levels: int | None = None) -> None:
    x0, spec, meta = base_vector(base, unet_width, unet_levels, seed)
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(rank, spec.dim, generator=gen)
    directions *= torch.exp(torch.randn(spec.dim, generator=gen))  # per-coordinate spread
    for layer in spec.layers:
        s = slice(layer.offset, layer.offset + layer.length)
        directions[:, s] *= scale * x0[s].std() / directions[:, s].std()
    coefs = torch.randn(n, rank, generator=gen)
    for i in range(n):
        write_avatar(x0 + coefs[i] @ directions, spec, meta, out / f"synth_{i:03d}.hda.safetensors",
                     origin=f"synthetic:{i} rank:{rank} scale:{scale:g}")
    # The known structure, for evaluate's coefficient measures (not an avatar: no *.hda.safetensors suffix).
    atomic_save_safetensors({"base": x0.contiguous(), "directions": directions.contiguous(),
                             "coefficients": coefs.contiguous()}, out / BASIS, {"rank": str(rank)})
    print(f"wrote {n} avatars ({spec.dim:,} weights, {len(spec.layers)} layers) and {BASIS} to {out}")


def _basis(fits: Path):
    """make-set's known structure (base, directions, coefficients) or None for a folder of real fits."""
    path = fits / BASIS
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k).double().numpy() for k in ("base", "directions", "coefficients")}


def _basis_cells(vectors: np.ndarray, basis, spec: LayerSpec) -> str:
    if basis is None:
        return "– | – | – | –"
    m = basis_measures(vectors, basis["base"], basis["directions"], basis["coefficients"],
                       [slice(layer.offset, layer.offset + layer.length) for layer in spec.layers])
    return f"{m.norm.mean():.2f} | {m.agreement.mean():.2f} | {np.median(m.nn):.2f} | {np.median(m.segment):.2f}"


def _reference_rows(data, basis, x: np.ndarray, samples: int) -> list[str]:
    """Rows that calibrate the measures: new people drawn from the set's own law, blends of two training
    avatars, the mean avatar (only for a set with a known basis)."""
    if basis is None:
        return []
    rng = np.random.default_rng(1)
    fresh = basis["base"] + rng.standard_normal((samples, basis["directions"].shape[0])) @ basis["directions"]
    pairs = np.array([rng.choice(len(x), 2, replace=False) for _ in range(samples)])
    blends = (x[pairs[:, 0]] + x[pairs[:, 1]]) / 2
    rows = []
    for name, v in (("new people (the set's law)", fresh), ("blend of two training avatars", blends),
                    ("mean avatar", np.repeat(x.mean(0, keepdims=True), samples, 0))):
        span = span_measures(v, x)
        rows.append(f"| {name} | – | – | – | – | – | – | – | {span.in_span.mean():.3f} | "
                    f"{span.off_span.mean():.3f} | {np.median(span.nn_ratio):.3f} | "
                    f"{_basis_cells(v, basis, data.spec)} | – |")
    return rows


@torch.no_grad()
def evaluate(fits: Path, models: list[tuple[str, Path]], samples: int, steps: int | None,
             eta: float | None) -> None:
    data = load_weight_set(fits)
    basis = _basis(fits)
    x = data.vectors.double()
    mean = x.mean(0)
    spread = (x - mean).pow(2).sum(1).mean()
    print("| model | tokenizer / prediction | normalisation | parameters | final loss | denoise@100 | denoise@250 "
          "| denoise@400 | in-span | off-span | NN ratio (median) | coef norm | layer agreement | coef NN "
          "| blend distance | s per identity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in _reference_rows(data, basis, x.numpy(), samples):
        print(row)
    for name, path in models:
        model = load_diffusion(path)
        abar = alphas_cumprod(model.schedule)
        z = model.normalizer.encode(data.vectors)
        gen = torch.Generator().manual_seed(0)
        errors = []
        for t in (100, 250, 400):
            tt = torch.full((len(z),), t)
            z_t = add_noise(z, torch.randn(z.shape, generator=gen), tt, abar)
            pred = predicted_x0(model.denoiser(z_t, tt), z_t, tt, abar, model.config.prediction)
            errors.append(((model.normalizer.decode(pred).double() - x).pow(2).sum(1).mean() / spread).item())
        start = time.perf_counter()
        s = sample_vectors(model, list(range(samples)), steps, eta).double()
        per_identity = (time.perf_counter() - start) / samples
        span = span_measures(s.numpy(), x.numpy())
        with safe_open(str(path), "pt") as fh:
            loss = float(fh.metadata()["final_loss"])
        params = sum(p.numel() for p in model.denoiser.parameters())
        print(f"| {name} | {model.config.tokenizer} / {model.config.prediction} | {model.config.normalization} | "
              f"{params:,} | {loss:.4f} | {errors[0]:.4f} | {errors[1]:.4f} | {errors[2]:.4f} | "
              f"{span.in_span.mean():.3f} | {span.off_span.mean():.3f} | "
              f"{np.median(span.nn_ratio):.3f} | {_basis_cells(s.numpy(), basis, data.spec)} | "
              f"{per_identity:.2f} |", flush=True)


def _colourfulness(gallery, background: np.ndarray) -> np.ndarray:
    """[N]: each avatar's colourfulness over its gallery views (eval-gen's measure)."""
    return np.array([avatar_stats(gallery.images[i].numpy(), gallery.alpha[i].numpy(), gallery.labels[i].numpy(),
                                  background).colourfulness for i in range(len(gallery.images))])


def _psnr(mse: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-20))


@torch.no_grad()
def span_ceiling(train_dir: Path, held_dir: Path, sizes: list[int], out: Path, gallery_cache: Path | None,
                 preset: str) -> None:
    train, held = load_weight_set(train_dir), load_weight_set(held_dir)
    if train.spec.dim != held.spec.dim:
        raise HDAError(f"{held_dir}: avatars of {held.spec.dim} weights, expected {train.spec.dim} like {train_dir}")
    if not sizes or min(sizes) < 2 or max(sizes) > len(train.paths):
        raise HDAError(f"--sizes {sizes}: expected values from 2 to the {len(train.paths)} fits in {train_dir}")
    d = load_config(preset).diffusion
    body = load_body()
    views = gallery_views(body, GalleryConfig())
    background = views.background.numpy()
    cache = GalleryCache(gallery_cache) if gallery_cache is not None else None
    held_gallery = render_files(held.paths, body, views, parts=True, cache=cache, progress=True, desc="held out")
    train_gallery = render_files(train.paths[:max(sizes)], body, views, parts=True, cache=cache, progress=True,
                                 desc="train")
    held_colour = _colourfulness(held_gallery, background).mean()
    to_train = mse_matrix(held_gallery.images, train_gallery.images)  # [held, max N]; each N reads its columns
    layers = [slice(layer.offset, layer.offset + layer.length) for layer in train.spec.layers]
    print(f"{len(held.paths)} held-out fits ({held_dir}), colourfulness {held_colour:.1f}")
    print("| training fits N | projection: PSNR to itself (mean / median) | nearest of the N: PSNR | gain "
          "| colourfulness ratio | off the span |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        norm = Normalizer.fit(train.vectors[:n], train.spec, d.normalization, d.norm_eps)
        z_held = norm.encode(held.vectors).double().numpy()
        z = layer_span_projection(z_held, norm.encode(train.vectors[:n]).numpy(), layers)
        off = ((z_held - z) ** 2).sum() / (z_held ** 2).sum()  # share of their squared distance from the training mean
        x = norm.decode(torch.from_numpy(z).float())
        folder = out / f"n{n:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [write_avatar(x[i], held.spec, held.meta, folder / p.name, f"span projection of {p.name}")
                 for i, p in enumerate(held.paths)]
        gallery = render_files(paths, body, views, parts=True, cache=cache, progress=True, desc=f"projections, N = {n}")
        own = _psnr((gallery.images - held_gallery.images).pow(2).flatten(1).mean(1).double().numpy())
        nearest = _psnr(to_train[:, :n].min(1))
        ratio = _colourfulness(gallery, background).mean() / held_colour
        print(f"| {n} | {own.mean():.2f} / {np.median(own):.2f} dB | {nearest.mean():.2f} dB | "
              f"{np.mean(own - nearest):+.2f} dB | {ratio:.2f} | {100 * off:.0f} % |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-set")
    p.add_argument("--base", required=True, type=Path)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-width", type=int, help="a freshly initialised avatar UNet of this width as the base")
    p.add_argument("--unet-levels", type=int, help="... and this many levels")
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("evaluate")
    p.add_argument("--fits", required=True, type=Path)
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, help="DDIM steps (default: each model's)")
    p.add_argument("--eta", type=float, help="DDIM η (default: each model's)")
    p = sub.add_parser("span-ceiling")
    p.add_argument("--train", required=True, type=Path, help="training fits, in the order subsets take them")
    p.add_argument("--held-out", required=True, type=Path, help="fits of people the training set does not hold")
    p.add_argument("--sizes", required=True, help="comma-separated N: the first N training fits span")
    p.add_argument("--out", required=True, type=Path, help="where the projected avatars are written")
    p.add_argument("--gallery-cache", type=Path, help="eval-gen's gallery cache folder")
    p.add_argument("--preset", default="cpu", help="its diffusion normalisation is the one used")
    args = parser.parse_args()
    if args.command == "span-ceiling":
        try:
            sizes = [int(n) for n in args.sizes.split(",")]
        except ValueError:
            sys.exit(f"span-ceiling: --sizes {args.sizes!r}: expected comma-separated whole numbers, e.g. 24,96")
        try:
            span_ceiling(args.train, args.held_out, sizes, args.out, args.gallery_cache, args.preset)
        except HDAError as exc:
            sys.exit(f"span-ceiling: {exc}")
    elif args.command == "make-set":
        make_set(args.base, args.n, args.rank, args.scale, args.seed, args.out, args.unet_width,
                 args.unet_levels)
    else:
        models = [(m.split("=", 1)[0], Path(m.split("=", 1)[1])) for m in args.model]
        evaluate(args.fits, models, args.samples, args.steps, args.eta)


if __name__ == "__main__":
    main()

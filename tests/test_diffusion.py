"""Stage 2 diffusion: weights as data, tokenizers, training (resume, DDP), sampling, CLI, bad input."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hda_backend.avatar.io import load_avatar, save_avatar
from hda_backend.avatar.model import Avatar
from hda_backend.avatar.unet import AvatarUNet, UNetConfig, init_unet, num_parameters
from hda_backend.body import load_body
from hda_backend.cli import main
from hda_backend.config import load_config
from hda_backend.diffusion.sample import (ddim_sample_projected, interpolate_avatars, interpolate_noise,
                                          load_diffusion, sample_avatars, sample_vectors, slerp)
from hda_backend.diffusion.schedule import ScheduleConfig, ddim_sample
from hda_backend.diffusion.tokenizers import make_tokenizer
from hda_backend.diffusion.train import draw_batch, learning_rate, terminal_scale, train_diffusion
from hda_backend.diffusion.transformer import DenoiserConfig, WeightDenoiser
from hda_backend.diffusion.weights import (AvatarMeta, LayerSpec, Normalizer, load_weight_set, state_dict_to_vector,
                                           vector_to_state_dict, write_avatar)
from hda_backend.errors import HDAError

TINY = load_config("tiny")
# Coefficients of the training set along two random directions: a known two-dimensional distribution.
COEFS = [(-1, -1), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 1), (0, 0), (1, 0)]


def _meta(body, unet=TINY.unet, pose_input="posed"):
    return AvatarMeta(unet=unet.to_dict(), gaussians=TINY.gaussians.to_dict(), uv_res=TINY.uv.res,
                      body_id=body.body_id, body_sha256=body.sha256, pose_input=pose_input)


@pytest.fixture(scope="module")
def body():
    return load_body()


@pytest.fixture(scope="module")
def plane_set(tmp_path_factory, body):
    """8 tiny avatars: init(seed 0) + a·u + b·v for the COEFS; returns (folder, base, u, v, spec)."""
    root = tmp_path_factory.mktemp("plane")
    spec = LayerSpec.for_unet(TINY.unet)
    base = state_dict_to_vector(init_unet(AvatarUNet(TINY.unet), 0).state_dict(), spec)
    gen = torch.Generator().manual_seed(0)
    u = 0.01 * torch.randn(spec.dim, generator=gen)
    v = 0.01 * torch.randn(spec.dim, generator=gen)
    for i, (a, b) in enumerate(COEFS):
        write_avatar(base + a * u + b * v, spec, _meta(body), root / "fits" / f"s{i}.hda.safetensors", f"test:{i}")
    return root / "fits", base, u, v, spec


def _small(**changes):
    """A fast diffusion config for mechanics tests (not for quality)."""
    d = dataclasses.replace(TINY.diffusion, width=16, heads=2, ffn=32, blocks=1, checkpoint_every=5, log_every=5)
    return dataclasses.replace(d, **changes)


# ---------------------------------------------------------------- weights as data

def test_layer_spec_matches_the_unet():
    cpu = load_config("cpu").unet
    spec = LayerSpec.for_unet(cpu)
    unet = AvatarUNet(cpu)
    assert spec.dim == num_parameters(unet) == 598_011
    assert [layer.name for layer in spec.layers] == [name for name, _ in unet.conv_layers()]
    assert len(spec.layers) == 15 and max(spec.lengths) == 73_792
    offset = 0
    for layer, (_, conv) in zip(spec.layers, unet.conv_layers()):
        assert layer.offset == offset and layer.kernel_shape == tuple(conv.weight.shape)
        assert layer.length == conv.weight.numel() + conv.bias.numel()
        offset += layer.length
    assert LayerSpec.from_json(spec.to_json()) == spec


def test_weights_vector_avatar_file_round_trip_is_exact(tmp_path, body):
    avatar = Avatar.from_init(body, TINY.uv.res, TINY.unet, TINY.gaussians, seed=3)
    with torch.no_grad():
        avatar.unet.outc.bias.normal_()
    path = save_avatar(avatar, tmp_path / "a.hda.safetensors")
    data = load_weight_set(path)
    state = avatar.unet.state_dict()
    # Independent reference: the token of each conv is its flattened kernel followed by its bias.
    reference = torch.cat([torch.cat([conv.weight.reshape(-1), conv.bias]) for _, conv in avatar.unet.conv_layers()])
    assert torch.equal(data.vectors[0], reference.detach())
    assert all(torch.equal(t, state[k]) for k, t in vector_to_state_dict(data.vectors[0], data.spec).items())
    assert data.meta == AvatarMeta(unet=TINY.unet.to_dict(), gaussians=TINY.gaussians.to_dict(), uv_res=32,
                                   body_id=body.body_id, body_sha256=body.sha256, pose_input="posed")
    out = write_avatar(data.vectors[0], data.spec, data.meta, tmp_path / "b.hda.safetensors", "copy")
    loaded = load_avatar(out, body)  # the ordinary avatar loader (as hda render and Blender use)
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(load_weight_set(out).vectors, data.vectors)


def test_normalizer_statistics_and_round_trip():
    spec = LayerSpec.for_unet(UNetConfig(width=4, levels=1))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, spec.dim, generator=gen) * torch.linspace(0.1, 3.0, spec.dim) + 2.0
    x[:, 5] = 7.0  # a coordinate that never varies: floored, not divided by zero
    coord = Normalizer.fit(x, spec, "coordinate", eps=1e-3)
    z = coord.encode(x)
    mask = torch.ones(spec.dim, dtype=torch.bool)
    mask[5] = False
    assert torch.allclose(z[:, mask].mean(0), torch.zeros(int(mask.sum())), atol=1e-5)
    assert torch.allclose(z[:, mask].std(0, unbiased=False), torch.ones(int(mask.sum())), atol=1e-4)
    first = spec.layers[0]
    block = x[:, first.offset:first.offset + first.length].double()
    pooled = (block - block.mean(0)).pow(2).mean().sqrt()
    assert coord.std[5].item() == pytest.approx(1e-3 * pooled.item(), rel=1e-5) and z[:, 5].abs().max() == 0
    layer = Normalizer.fit(x, spec, "layer")
    zl = layer.encode(x)
    assert torch.allclose(zl.mean(0), torch.zeros(spec.dim), atol=1e-5)  # the mean avatar in both modes
    for entry in spec.layers:
        piece = zl[:, entry.offset:entry.offset + entry.length]
        assert piece.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert piece.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    for norm in (coord, layer):
        assert torch.allclose(norm.decode(norm.encode(x)), x, atol=1e-5)
        again = Normalizer.from_tensors(norm.to_tensors(), norm.mode, spec.dim)
        assert torch.equal(again.mean, norm.mean) and torch.equal(again.std, norm.std)
    half = Normalizer.fit(x, spec, "coordinate", eps=1e-3, scale=0.5)
    assert torch.allclose(half.encode(x), 0.5 * z, atol=1e-6)
    assert torch.allclose(half.decode(half.encode(x)), x, atol=1e-5)
    single = Normalizer.fit(x[:1], spec, "coordinate")  # a set of one: nothing to scale by
    assert torch.equal(single.std, torch.ones(spec.dim)) and torch.equal(single.encode(x[:1]), torch.zeros(1, spec.dim))


def test_terminal_scale_analytic():
    # Two points ±c·u (u a unit vector): the largest variance along one direction is c².
    u = torch.nn.functional.normalize(torch.randn(500), dim=0)
    for c, abar in ((100.0, 0.0066), (3.0, 0.0066), (100.0, 1e-6)):
        expected = min(1.0, 1.0 / math.sqrt(abar * c * c))
        assert terminal_scale(torch.stack([c * u, -c * u]) + 5.0, abar) == pytest.approx(expected, rel=1e-4)
    assert terminal_scale(torch.ones(3, 10), 0.0066) == 1.0  # no spread


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("kind", ["layer", "flat1d", "layer_chunked"])
def test_tokenizer_split_merge_and_shapes(kind):
    spec = LayerSpec.for_unet(TINY.unet)
    chunk = 1000
    tok = make_tokenizer(kind, spec, 8, chunk)
    x = torch.randn(3, spec.dim)
    assert torch.equal(tok.merge(tok.split(x)), x)
    # Independent reference: the pieces by slicing, in the tokenizer's definition.
    if kind == "layer":
        expected = [x[:, e.offset:e.offset + e.length] for e in spec.layers]
    elif kind == "flat1d":
        expected = [x[:, i:i + chunk] for i in range(0, spec.dim, chunk)]
    else:
        expected = [x[:, e.offset + c:e.offset + min(c + chunk, e.length)]
                    for e in spec.layers for c in range(0, e.length, min(chunk, e.length))]
    got = [row[:, i] for row in tok.split(x) for i in range(row.shape[1])]
    assert len(got) == len(expected) == tok.num_tokens
    for g, e in zip(sorted(got, key=lambda t: t.sum().item()), sorted(expected, key=lambda t: t.sum().item())):
        assert torch.equal(g[:, :e.shape[1]], e) and not g[:, e.shape[1]:].any()  # zero padding
    tokens = tok.encode(x)
    assert tokens.shape == (3, tok.num_tokens, 8)
    assert torch.equal(tok.decode(tokens), torch.zeros(3, spec.dim))  # zero-initialised output projections


def test_tokenizer_parameter_counts():
    spec = LayerSpec.for_unet(load_config("cpu").unet)
    with torch.device("meta"):  # the paper-size projections alone would take 2.4 GB
        layer, flat, chunked = (make_tokenizer(kind, spec, 512, 4096) for kind in ("layer", "flat1d", "layer_chunked"))
    proj = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("proj_"))
    assert proj == 2 * 598_011 * 512  # a separate in and out projection per conv layer, no bias
    assert layer.proj_in[8].weight.numel() == 73_792 * 512  # the largest token alone: 37.8M
    assert flat.num_tokens == math.ceil(598_011 / 4096)
    assert chunked.num_tokens == sum(math.ceil(n / 4096) for n in spec.lengths)


def test_denoiser_shapes_and_time_dependence():
    spec = LayerSpec.for_unet(TINY.unet)
    torch.manual_seed(0)
    model = WeightDenoiser(spec, DenoiserConfig("layer_chunked", 512, 16, 1, 2, 32))
    for lin in model.tokenizer.proj_out:
        torch.nn.init.normal_(lin.weight)
    x = torch.randn(2, spec.dim)
    a, b = model(x, torch.tensor([0, 0])), model(x, torch.tensor([400, 400]))
    assert a.shape == (2, spec.dim) and not torch.allclose(a, b)


@pytest.mark.parametrize("kind, tied, eta, principal", [
    ("layer", False, 0.0, False), ("flat1d", False, 0.0, False), ("layer_chunked", False, 0.0, False),
    ("layer", True, 0.0, False), ("layer", False, 1.0, False), ("layer_chunked", True, 0.5, False),
    ("layer", True, 1.0, True), ("layer_chunked", True, 0.0, True)])
def test_ddim_on_projected_pieces_equals_ddim_on_weight_vectors(kind, tied, eta, principal):
    spec = LayerSpec.for_unet(TINY.unet)
    torch.manual_seed(1)
    model = WeightDenoiser(spec, DenoiserConfig(kind, 1000, 32, 2, 2, 64, tied=tied, principal=24 * principal)).eval()
    if principal:  # the span of a low-rank set, and trained-like heads instead of the zero start
        model.tokenizer.set_principal_projections(_low_rank_set(spec, 12, 6))
    for lin in model.tokenizer.head_out if principal else model.tokenizer.proj_out:  # trained-like, not zero
        torch.nn.init.normal_(lin.weight, std=0.05)
    x_T = torch.randn(2, spec.dim)

    def noises():
        gen = torch.Generator().manual_seed(7)
        return lambda: torch.randn(2, spec.dim, generator=gen)

    with torch.no_grad():
        # plain DDIM through the full model
        reference = ddim_sample(model, x_T, 20, ScheduleConfig(), "x0", eta, noises())
        full_noise = noises()
        fast = ddim_sample_projected(model, model.tokenizer.composites(), x_T, 20, ScheduleConfig(), eta,
                                     lambda: model.tokenizer.project(full_noise()))
    scale = max(1.0, reference.abs().max().item())  # float32 rounding grows with the values (the principal span's
    assert torch.allclose(fast, reference, atol=2e-5 * scale), (fast - reference).abs().max()  # reach 23)


@pytest.mark.parametrize("kind, tied, principal", [("layer", False, False), ("flat1d", False, False),
                                                   ("layer_chunked", True, False), ("layer", True, True)])
def test_noise_factors_give_projected_noise_its_covariance(kind, tied, principal):
    # project(z), z ~ N(0, I_D), is N(0, W_in W_inᵀ) per token (W_in cut to the token's values), tokens
    # independent: F Fᵀ must equal W_in W_inᵀ, by hand from the token's gathered rows.
    spec = LayerSpec.for_unet(TINY.unet)
    torch.manual_seed(2)
    tok = make_tokenizer(kind, spec, 12, 1000, tied=tied, principal=8 * principal)
    if principal:
        tok.set_principal_projections(_low_rank_set(spec, 10, 20))
    for lin in tok.proj_out if not principal else ():
        torch.nn.init.normal_(lin.weight, std=0.1)
    factors = tok.noise_factors()
    covered = sorted(int(i) for tokens, _ in factors for i in tokens)
    assert covered == list(range(tok.num_tokens))
    # Where each token starts in the vector: split a vector of positions; row i of the pieces is token i.
    pieces = tok.split(torch.arange(spec.dim, dtype=torch.float32)[None])
    starts = [int(row[0]) for group in pieces for row in group[0]]
    for tokens, f in factors:
        for i in tokens.tolist():
            n = tok.token_lengths[i]
            basis = torch.zeros(n, spec.dim)  # the token's own values, one at a time
            basis[torch.arange(n), starts[i] + torch.arange(n)] = 1.0
            w = tok.project(basis)[:, i].T.double()  # [width, n]: the token's input map
            assert torch.allclose(f.double() @ f.double().T, w @ w.T, atol=1e-5)


def test_tied_projections_read_with_the_transpose_and_halve_the_parameters():
    spec = LayerSpec.for_unet(TINY.unet)
    tok = make_tokenizer("layer", spec, 8, 4096, tied=True)
    untied = make_tokenizer("layer", spec, 8, 4096)
    count = lambda t: sum(p.numel() for n, p in t.named_parameters() if n.startswith("proj_"))  # noqa: E731
    assert count(tok) == spec.dim * 8 and count(untied) == 2 * spec.dim * 8
    for lin in tok.proj_out:
        torch.nn.init.normal_(lin.weight)
    x = torch.randn(3, spec.dim)
    projected = tok.project(x)
    for i, layer in enumerate(spec.layers):  # token i is layer i: W_outᵀ x_layer, by hand
        expected = x[:, layer.offset:layer.offset + layer.length] @ tok.proj_out[i].weight
        assert torch.allclose(projected[:, i], expected, atol=1e-5)



def _low_rank_set(spec, n, rank, seed=3):
    """[n, D]: n centred avatars in a random rank-``rank`` subspace, coordinates of different scales (RMS 1)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=gen) @ torch.randn(rank, spec.dim, generator=gen)
    z = z * torch.rand(spec.dim, generator=gen)
    z = z - z.mean(0)
    return z / z.pow(2).mean().sqrt()


@pytest.mark.parametrize("kind, width, k, rank", [("layer", 12, 12, 5), ("layer", 4, 6, 9), ("layer", 8, 6, 5),
                                                ("layer_chunked", 12, 12, 5)])
def test_principal_projections_are_the_data_span_read_at_unit_rms(kind, width, k, rank):
    spec = LayerSpec.for_unet(TINY.unet)
    z = _low_rank_set(spec, 16, rank)
    tok = make_tokenizer(kind, spec, width, 1000, principal=k)
    tok.set_principal_projections(z)
    assert not any(p.requires_grad for p in tok.proj_out.parameters())
    pieces = tok.split(z)
    for g, (proj, _) in enumerate(tok.group_sizes):
        m = pieces[g].reshape(-1, pieces[g].shape[-1]).double()
        # brute force: the top-k right singular vectors of the stacked pieces, as an orthogonal projector
        _, sigma, vh = torch.linalg.svd(m, full_matrices=False)
        kept = min(k, int((sigma > sigma[0] * 1e-5).sum()))
        reference = vh[:kept].T @ vh[:kept]
        w_out = tok.proj_out[proj].weight.double()  # [n, k] = c·Vᵀ, zero columns beyond the data's rank
        c = float(tok.proj_scale[proj])
        assert torch.allclose(w_out @ w_out.T / c ** 2, reference, atol=1e-5)
        assert (w_out[:, kept:] == 0).all()
        coefficients = m @ w_out / c ** 2  # unit RMS over the kept directions
        assert coefficients[:, :kept].pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)
    tokens = tok.project(z).detach().double()  # [N, L, width]
    r = min(width, rank)
    if kind == "layer" and k >= rank:
        # every layer's token of an avatar is the same vector: its coordinates along the set's joint principal
        # directions at unit variance (brute force from the SVD of z; compared as Gram matrices, sign-free)
        u, _, _ = torch.linalg.svd(z.double(), full_matrices=False)
        person = u[:, :r] * len(z) ** 0.5
        for i in range(len(spec.layers)):
            assert torch.allclose(tokens[:, i, :r] @ tokens[:, i, :r].T, person @ person.T, atol=1e-6 * len(z))
        assert (tokens[:, :, r:].abs() < 1e-6).all()
        # with head_out the inverse of head_in, decode(project(x)) returns the training avatars
        with torch.no_grad():
            for head_in, head_out in zip(tok.head_in, tok.head_out):
                head_out.weight.copy_(torch.linalg.pinv(head_in.weight.double()).float())
        assert torch.allclose(tok.decode(tok.project(z)).detach(), z, atol=1e-3 * z.abs().max())
    if kind == "layer":  # a vector orthogonal to every layer's span reads as zero tokens
        off = torch.randn(1, spec.dim, dtype=torch.float64)
        for layer in spec.layers:
            part = slice(layer.offset, layer.offset + layer.length)
            basis = torch.linalg.qr(z[:, part].double().T)[0]  # [n, N]: this layer's span
            off[:, part] -= (off[:, part] @ basis) @ basis.T
        assert tok.project(off.float()).detach().abs().max() < 1e-4 * off.abs().max()


def test_principal_denoiser_starts_at_the_mean_and_keeps_its_projections():
    spec = LayerSpec.for_unet(TINY.unet)
    model = WeightDenoiser(spec, DenoiserConfig("layer", 1000, 16, 1, 2, 32, principal=16))
    model.tokenizer.set_principal_projections(_low_rank_set(spec, 8, 3))
    frozen = [w.clone() for w in model.tokenizer.proj_out.parameters()]
    assert torch.equal(model(torch.randn(2, spec.dim), torch.tensor([3, 300])), torch.zeros(2, spec.dim))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = (model(torch.randn(4, spec.dim), torch.tensor([1, 2, 3, 4])) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.tokenizer.proj_out.parameters()))
    assert model(torch.randn(1, spec.dim), torch.tensor([5])).abs().max() > 0
    # the scale is part of the file: a fresh model loads it and reads tokens the same way
    fresh = WeightDenoiser(spec, DenoiserConfig("layer", 1000, 16, 1, 2, 32, principal=16))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, spec.dim)
    assert torch.equal(fresh.tokenizer.project(x), model.tokenizer.project(x))


# ---------------------------------------------------------------- training

def test_learning_rate_schedule_and_batches():
    d = dataclasses.replace(TINY.diffusion, lr=1e-3, lr_decay=0.9, lr_decay_every=200)
    # 2 steps per epoch: lr drops by 10% every 400 steps.
    assert [learning_rate(d, s, 2) for s in (0, 399, 400, 799, 800)] == pytest.approx([1e-3, 1e-3, 9e-4, 9e-4, 8.1e-4])
    gen = torch.Generator().manual_seed(0)
    z = torch.arange(20.0)[:, None].expand(20, 3)
    x0, noise, t = draw_batch(gen, z, 16, 500)
    assert len(set(x0[:, 0].tolist())) == 16 and noise.shape == (16, 3) and int(t.max()) < 500  # without replacement
    x0, _, _ = draw_batch(gen, z[:5], 16, 500)
    assert x0.shape == (16, 3) and set(x0[:, 0].tolist()) <= set(range(5))  # with replacement


@pytest.mark.parametrize("projections", ["learned", "principal"])
def test_training_learns_a_two_dimensional_distribution(plane_set, tmp_path, projections):
    fits, base, u, v, _ = plane_set
    d = dataclasses.replace(TINY.diffusion, projections=projections)
    result = train_diffusion(fits, tmp_path / "diff.safetensors", d, steps=300, progress=False)
    log = [json.loads(line) for line in result.paths.log.read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"] and result.paths.curve.is_file()
    model = load_diffusion(result.paths.model)
    samples = sample_vectors(model, list(range(8)))
    basis = torch.stack([u, v], dim=1).double()
    offsets = (samples - base).double().T
    coefs = torch.linalg.lstsq(basis, offsets).solution.T  # [8, 2]
    residual = (offsets - basis @ coefs.T).norm(dim=0)
    # The reference scale: how far the training avatars lie from their mean.
    train_offsets = load_weight_set(fits).vectors.double()
    spread = (train_offsets - train_offsets.mean(0)).pow(2).sum(1).mean().sqrt()
    off = residual / spread
    assert off.median() < 0.08 and off.max() < 0.25, off  # on the plane of the training set
    train = torch.tensor(COEFS, dtype=torch.float64)
    zscore = (coefs - train.mean(0)) / train.std(0)
    assert zscore.abs().max() < 2.5, coefs  # within the range of the training coefficients
    assert (coefs.std(0) > 0.3).all(), coefs  # spread over it, not one point (an untrained model gives the mean)


@pytest.mark.parametrize("projections", ["learned", "principal"])
def test_resume_equals_uninterrupted_run(plane_set, tmp_path, projections):
    fits = plane_set[0]
    d = _small(dropout=0.1, projections=projections)  # dropout draws from torch's RNG: its state is restored too
    full = train_diffusion(fits, tmp_path / "full.safetensors", d, steps=20, progress=False)
    part = train_diffusion(fits, tmp_path / "part.safetensors", d, steps=20, progress=False, stop_after=10)
    assert part.steps == 10 and not part.paths.model.exists()
    resumed = train_diffusion(fits, tmp_path / "part.safetensors", d, steps=20, resume=True, progress=False)
    assert resumed.steps == 20
    a, b = load_file(full.paths.model), load_file(resumed.paths.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_file(full.paths.checkpoint), load_file(resumed.paths.checkpoint)
    assert all(torch.equal(ca[k], cb[k]) for k in ca if k != "rng.torch") and ca.keys() == cb.keys()
    rows = [[(r["step"], r["loss"]) for r in map(json.loads, p.read_text().splitlines())]
            for p in (full.paths.log, resumed.paths.log)]
    assert rows[0] == rows[1] and [s for s, _ in rows[0]] == [5, 10, 15, 20]
    with pytest.raises(HDAError, match="exists: pass --resume"):
        train_diffusion(fits, tmp_path / "part.safetensors", d, steps=20, progress=False)


def test_torchrun_two_ranks_match_one_process(plane_set, tmp_path):
    fits = plane_set[0]
    d = _small()
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps({"preset": "tiny", "diffusion": {k: getattr(d, k) for k in (
        "width", "heads", "ffn", "blocks", "checkpoint_every", "log_every")}}))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "hda_backend.cli", "train-diffusion", str(fits), "--config", str(config),
                           "--out", str(tmp_path / "ddp.safetensors"), "--steps", "12"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = train_diffusion(fits, tmp_path / "one.safetensors", load_config(str(config)).diffusion, steps=12,
                             progress=False)
    a, b = load_file(tmp_path / "ddp.safetensors"), load_file(single.paths.model)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ddp.loss.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def small_model(plane_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "diff.safetensors"
    train_diffusion(plane_set[0], out, _small(), steps=10, progress=False)
    return out


def test_same_seed_same_avatar_bit_for_bit(small_model, tmp_path, body):
    first = sample_avatars(small_model, 5, 3, 4, tmp_path / "a")
    again = sample_avatars(small_model, 6, 1, 4, tmp_path / "b")
    assert [p.name for p in first] == [f"sample_{s}.hda.safetensors" for s in (5, 6, 7)]
    a, b, c = load_file(first[1]), load_file(again[0]), load_file(first[0])
    assert all(torch.equal(a[k], b[k]) for k in a)  # seed 6 alone == seed 6 among others
    assert not all(torch.equal(a[k], c[k]) for k in a)
    avatar = load_avatar(first[0], body)  # sampled files are ordinary avatars
    assert avatar.unet.config == TINY.unet
    with safe_open(str(first[0]), "pt") as fh:
        assert fh.metadata()["origin"].startswith("sample:5 ")


def test_interpolation(small_model, plane_set, tmp_path):
    model = load_diffusion(small_model)
    assert torch.equal(interpolate_noise(model, 2, 9, 0.0, 4), sample_vectors(model, [2], 4)[0])
    assert torch.equal(interpolate_noise(model, 2, 9, 1.0, 4), sample_vectors(model, [9], 4)[0])
    a, b = torch.randn(1000), torch.randn(1000)
    mid = slerp(a, b, 0.5)
    # Analytic: the midpoint of a slerp bisects the angle and has norm |a| = |b| for equal norms.
    b = b * a.norm() / b.norm()
    mid = slerp(a, b, 0.5)
    assert torch.dot(mid, a) / mid.norm() == pytest.approx((torch.dot(mid, b) / mid.norm()).item(), rel=1e-4)
    assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-4)
    fits = sorted(plane_set[0].iterdir())
    out = interpolate_avatars(fits[0], fits[1], 0.25, tmp_path / "mix.hda.safetensors")
    data = load_weight_set(fits[:2])
    assert torch.allclose(load_weight_set(out).vectors[0], 0.75 * data.vectors[0] + 0.25 * data.vectors[1], atol=1e-7)


def test_cli_sample_interpolate_and_errors(small_model, plane_set, tmp_path, capsys):
    assert main(["sample", "--model", str(small_model), "--seed", "4", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "s")]) == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["sample_4.hda.safetensors", "sample_5.hda.safetensors"]
    assert main(["interpolate", "--model", str(small_model), "--seed-a", "1", "--seed-b", "2", "--t", "0.3",
                 "--steps", "3", "--out", str(tmp_path / "i.hda.safetensors")]) == 0
    fits = sorted(plane_set[0].iterdir())
    assert main(["interpolate", "--a", str(fits[0]), "--b", str(fits[1]), "--t", "1",
                 "--out", str(tmp_path / "j.hda.safetensors")]) == 0
    assert torch.equal(load_weight_set(tmp_path / "j.hda.safetensors").vectors, load_weight_set(fits[1]).vectors)
    capsys.readouterr()
    cases = [
        (["sample", "--model", str(small_model), "--n", "0", "--out", str(tmp_path)], "--n 0: expected 1..100000"),
        (["sample", "--model", str(small_model), "--n", "999999999", "--out", str(tmp_path)], "--n 999999999"),
        (["sample", "--model", str(small_model), "--steps", "501", "--out", str(tmp_path)],
         "--steps 501: expected 1..500"),
        (["sample", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)], "not found"),
        (["interpolate", "--model", str(small_model), "--seed-a", "1", "--t", "0.5", "--out", "x.hda.safetensors"],
         "--seed-b"),
        (["interpolate", "--a", str(fits[0]), "--b", str(fits[1]), "--t", "1.5", "--out", "x"], "--t 1.5"),
        (["train-diffusion", str(tmp_path / "empty"), "--preset", "tiny", "--out", str(tmp_path / "d.safetensors")],
         "not found"),
        (["train-diffusion", str(fits[0].parent), "--preset", "tiny", "--out", str(tmp_path / "d.hda.safetensors")],
         "expected a file name ending in .safetensors"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("hda: error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- bad input

def test_bad_training_sets(plane_set, tmp_path, body):
    fits, base, _, _, spec = plane_set
    (tmp_path / "empty").mkdir()
    with pytest.raises(HDAError, match="no avatar files"):
        load_weight_set(tmp_path / "empty")
    bad = base.clone()
    bad[123] = float("nan")
    path = tmp_path / "nan" / "nan.hda.safetensors"
    write_avatar(base, spec, _meta(body), path)
    tensors = load_file(path)
    tensors["inc.0.weight"][0, 0, 0, 0] = float("nan")
    with safe_open(str(path), "pt") as fh:
        save_file(tensors, path, metadata=fh.metadata())
    with pytest.raises(HDAError, match=r"nan\.hda\.safetensors: tensor 'inc\.0\.weight' contains NaN"):
        load_weight_set([*sorted(fits.iterdir()), path])
    other = UNetConfig(width=8, levels=2)
    narrow = tmp_path / "narrow.hda.safetensors"
    write_avatar(torch.zeros(LayerSpec.for_unet(other).dim), LayerSpec.for_unet(other), _meta(body, other), narrow)
    with pytest.raises(HDAError, match=r"narrow\.hda\.safetensors: field 'unet' .*expected .*'width': 16"):
        load_weight_set([*sorted(fits.iterdir()), narrow])
    static = tmp_path / "static.hda.safetensors"
    write_avatar(base, spec, _meta(body, pose_input="rest"), static)
    with pytest.raises(HDAError, match="field 'pose_input' is 'rest', expected 'posed'"):
        load_weight_set([*sorted(fits.iterdir()), static])
    with pytest.raises(HDAError, match="contains NaN/inf; refusing"):
        write_avatar(bad, spec, _meta(body), tmp_path / "x.hda.safetensors")
    with pytest.raises(HDAError, match="expected a file name ending in .hda.safetensors"):
        write_avatar(base, spec, _meta(body), tmp_path / "x.safetensors")


def test_bad_model_and_checkpoint_files(small_model, plane_set, tmp_path):
    data = small_model.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(HDAError, match="cut.safetensors: not a readable safetensors file"):
        load_diffusion(cut)
    # A model for another avatar architecture than its layer spec describes.
    tensors = load_file(small_model)
    with safe_open(str(small_model), "pt") as fh:
        metadata = dict(fh.metadata())
    meta = json.loads(metadata["avatar_meta"])
    meta["unet"]["width"] = 8
    save_file(tensors, tmp_path / "other.safetensors", metadata={**metadata, "avatar_meta": json.dumps(meta)})
    with pytest.raises(HDAError, match="field 'layer_spec' .* does not match the avatar UNet"):
        load_diffusion(tmp_path / "other.safetensors")
    tensors["normalizer.std"][0] = float("inf")
    save_file(tensors, tmp_path / "inf.safetensors", metadata=metadata)
    with pytest.raises(HDAError, match="'normalizer.std' is not finite"):
        load_diffusion(tmp_path / "inf.safetensors")
    with pytest.raises(HDAError, match="DDIM|--steps 0"):
        sample_avatars(small_model, 0, 1, 0, tmp_path)
    # A checkpoint cut short by a crash (not by our atomic writer): resuming says what to do.
    fits = plane_set[0]
    out = tmp_path / "r.safetensors"
    train_diffusion(fits, out, _small(), steps=10, progress=False, stop_after=5)
    ckpt = tmp_path / "r.ckpt.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(HDAError, match="r.ckpt.safetensors: not a readable safetensors file"):
        train_diffusion(fits, out, _small(), steps=10, resume=True, progress=False)
    # A checkpoint of other avatars or settings is refused, not silently continued.
    train_diffusion(fits, tmp_path / "s.safetensors", _small(), steps=10, progress=False, stop_after=5)
    with pytest.raises(HDAError, match="field 'fingerprint' differs"):
        train_diffusion(fits, tmp_path / "s.safetensors", _small(lr=1e-2), steps=10, resume=True, progress=False)


def test_version_1_model_files_load_as_x0_and_sample_the_same(small_model, tmp_path):
    tensors = load_file(small_model)
    with safe_open(str(small_model), "pt") as fh:
        metadata = dict(fh.metadata())
    assert metadata["format_version"] == "2"
    config = json.loads(metadata["diffusion"])
    for name in ("prediction", "sample_eta", "tied_projections"):  # fields a version 1 file never had
        del config[name]
    old = tmp_path / "v1.safetensors"
    save_file(tensors, old, metadata={**metadata, "format_version": "1", "diffusion": json.dumps(config)})
    model = load_diffusion(old)
    assert (model.config.prediction, model.config.sample_eta, model.config.tied_projections) == ("x0", 0.0, False)
    # Deterministic DDIM as then, whatever today's default η: the same avatar as the new file sampled at η 0.
    new = load_diffusion(small_model)
    assert new.config.sample_eta == 1.0
    assert torch.equal(sample_vectors(model, [3], 4), sample_vectors(new, [3], 4, eta=0.0))
    save_file(tensors, tmp_path / "v9.safetensors", metadata={**metadata, "format_version": "9"})
    with pytest.raises(HDAError, match="field 'format_version' is '9', expected one of 1, 2"):
        load_diffusion(tmp_path / "v9.safetensors")
    for field, value, message in (("prediction", "noise", "prediction 'noise', expected one of x0, eps, v"),
                                  ("projections", "pca", "projections 'pca', expected one of learned, principal")):
        bad = {**json.loads(metadata["diffusion"]), field: value}
        save_file(tensors, tmp_path / "bad.safetensors", metadata={**metadata, "diffusion": json.dumps(bad)})
        with pytest.raises(HDAError, match=message):
            load_diffusion(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("changes", [{"prediction": "v"}, {"prediction": "eps"}, {"tied_projections": True},
                                     {"sample_eta": 1.0}, {"projections": "principal", "principal_rank": 3}])
def test_training_and_sampling_variants(plane_set, tmp_path, changes):
    out = tmp_path / "diff.safetensors"
    train_diffusion(plane_set[0], out, _small(**changes), steps=5, progress=False)
    model = load_diffusion(out)
    assert all(getattr(model.config, k) == v for k, v in changes.items())
    a, b = sample_vectors(model, [1, 2], 3)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert torch.equal(sample_vectors(model, [2], 3)[0], b)  # a seed is still one avatar, bit for bit
    if model.config.sample_eta > 0:  # the step noise comes from the seed: η = 0 gives another avatar
        assert not torch.equal(sample_vectors(model, [2], 3, eta=0.0)[0], b)


def test_bad_prediction_and_eta_in_config():
    for overrides, field in (({"prediction": "noise"}, "diffusion.prediction"),
                             ({"sample_eta": 1.5}, "diffusion.sample_eta"),
                             ({"projections": "pca"}, "diffusion.projections"),
                             ({"principal_rank": -1}, "diffusion.principal_rank")):
        with pytest.raises(HDAError, match=field):
            load_config("tiny", {"diffusion": overrides})

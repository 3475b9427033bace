"""int8 storage of the denoiser's projections (diffusion/int8.py) and compact's precision policy (compact.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hda_backend.avatar.unet import AvatarUNet, init_unet
from hda_backend.body import load_body
from hda_backend.checkpoint import read_safetensors
from hda_backend.config import load_config
from hda_backend.diffusion.compact import CompactConfig, compact_model, compact_tensors, int8_axes
from hda_backend.diffusion.int8 import dequantize, quantize
from hda_backend.diffusion.model_io import read_model_file
from hda_backend.diffusion.sample import load_diffusion, sample_vectors
from hda_backend.diffusion.train import train_diffusion
from hda_backend.diffusion.weights import AvatarMeta, LayerSpec, state_dict_to_vector, write_avatar
from hda_backend.errors import HDAError

TINY = load_config("tiny")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default" / "diffusion.safetensors"
SEEDS = (0, 1)


def _brute_force_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8, one value at a time: the scale max|w|/127 rounded up to a float16 (float32 if
    float16 cannot hold it), q = round-half-even(w / scale) in float32 arithmetic."""
    exact = [np.float32(np.float32(np.abs(row).max()) / np.float32(127)) for row in w]
    with np.errstate(over="ignore"):
        halves = [np.float16(s) for s in exact]
    halves = [np.nextafter(h, np.float16(np.inf)) if np.float32(h) < s else h for h, s in zip(halves, exact)]
    scales = np.array(halves if all(np.isfinite(h) for h in halves) else exact)
    q = np.zeros(w.shape, np.int8)
    for r in range(w.shape[0]):
        s = np.float32(scales[r])
        for c in range(w.shape[1]):
            q[r, c] = 0 if s == 0 else int(np.round(np.float32(w[r, c]) / s))
    return q, scales


@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("per", ["row", "column"])
def test_quantize_matches_a_per_row_brute_force(huge, per):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 33, generator=gen) * torch.tensor([1.0, 1e-3, 30.0, 1e-9, 0.0, 2.0, 1.0])[:, None]
    w[5, 3] = -2.0 * 127  # a row whose largest value is negative: it must come back as -127 · scale exactly
    if huge:
        w[6] *= 1e7  # beyond float16's range: the matrix keeps float32 scales
    if per == "column":  # the same matrix transposed: its columns are the rows above
        w = w.T.contiguous()
    q, scale = quantize(w, per)
    rows = w.numpy() if per == "row" else w.numpy().T
    q_ref, scale_ref = _brute_force_rows(rows)
    if per == "column":
        q_ref, scale_ref = q_ref.T, scale_ref[None]
    else:
        scale_ref = scale_ref[:, None]
    assert q.dtype == torch.int8 and scale.dtype == (torch.float32 if huge else torch.float16)
    assert np.array_equal(q.numpy(), q_ref) and np.array_equal(scale.numpy(), scale_ref)
    back = dequantize(q, scale)
    # The bound that makes int8 safe to reason about: every value within half a step of its row (column).
    assert ((back - w).abs() <= scale.float() / 2).all()
    assert (scale.float() >= w.abs().amax(1 if per == "row" else 0, keepdim=True) / 127).all()
    assert int(q.abs().max()) == 127
    zero, outlier = ((4,), (5, 3)) if per == "row" else ((slice(None), 4), (3, 5))
    assert torch.equal(back[zero], torch.zeros(33)) and float(back[outlier]) == float(w[outlier])


def test_a_row_on_the_grid_comes_back_exactly():
    w = torch.tensor([[127.0, -64.0, 1.0, 0.0], [127 / 1024, -64 / 1024, 1 / 1024, 0.0]])  # steps 1 and 2^-10
    q, scale = quantize(w, "row")
    assert q.tolist() == [[127, -64, 1, 0]] * 2 and scale.tolist() == [[1.0], [1 / 1024]]
    assert torch.equal(dequantize(q, scale), w)


@pytest.fixture(scope="module")
def body():
    return load_body()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, body):
    """A tiny model trained on 12 avatars that differ like different people: random init + four random
    directions of the init's mean magnitude (two of them render ~24 dB apart, two people ~26 dB)."""
    return _train(tmp_path_factory.mktemp("compact"), body)


def _train(root: Path, body, **changes) -> Path:
    spec = LayerSpec.for_unet(TINY.unet)
    meta = AvatarMeta(unet=TINY.unet.to_dict(), gaussians=TINY.gaussians.to_dict(), uv_res=TINY.uv.res,
                      body_id=body.body_id, body_sha256=body.sha256, pose_input="posed")
    base = state_dict_to_vector(init_unet(AvatarUNet(TINY.unet), 0).state_dict(), spec)
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(4, spec.dim, generator=gen) * base.abs().mean()
    for i in range(12):
        write_avatar(base + torch.randn(4, generator=gen) @ directions, spec, meta,
                     root / "fits" / f"s{i}.hda.safetensors", f"test:{i}")
    d = dataclasses.replace(TINY.diffusion, width=16, heads=2, ffn=32, blocks=1, checkpoint_every=1000,
                            log_every=100, sample_steps=4, **changes)
    train_diffusion(root / "fits", root / "model.safetensors", d, steps=60, progress=False)
    return root / "model.safetensors"


def test_a_principal_model_stores_its_one_projection_in_int8(body, tmp_path):
    # Principal projections are tied: only W_out is int8 (per row); the small heads and scales are float16,
    # and the file samples like the float32 model up to the int8 rounding of the directions.
    trained = _train(tmp_path, body, projections="principal")
    metadata, tensors = read_model_file(trained)
    axes = int8_axes(tensors)
    assert axes and all(".proj_out." in n and per == "row" for n, per in axes.items())
    assert not any(".proj_in." in n for n in tensors)
    written, fields = compact_tensors(tensors, {"denoiser": "int8", "normalizer": "float16"})
    for name in ("model.tokenizer.proj_scale", "model.tokenizer.head_in.0.weight", "model.tokenizer.head_out.0.weight"):
        assert written[name].dtype == torch.float16, name
    path = tmp_path / "int8.safetensors"
    save_file(written, path, metadata={**metadata, **fields})
    reference, small = load_diffusion(trained), load_diffusion(path)
    a, b = sample_vectors(reference, [0, 1]), sample_vectors(small, [0, 1])
    spread = (a - reference.normalizer.mean).norm(dim=1)
    assert ((a - b).norm(dim=1) < 0.05 * spread).all(), (a - b).norm(dim=1) / spread


def test_an_int8_file_round_trips_and_loads_as_float32(trained, tmp_path):
    metadata, tensors = read_model_file(trained)
    axes = int8_axes(tensors)
    names = list(axes)
    assert names and all((".proj_in." in n and per == "column") or (".proj_out." in n and per == "row")
                         for n, per in axes.items())
    written, fields = compact_tensors(tensors, {"denoiser": "int8", "normalizer": "float16"})
    path = tmp_path / "int8.safetensors"
    save_file(written, path, metadata={**metadata, **fields})
    with safe_open(str(path), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert json.loads(f.metadata()["int8"]) == names and json.loads(f.metadata()["half"]) == [
            "denoiser", "normalizer"]
    for key, dtype in stored.items():
        assert dtype == ("I8" if key in names else "F16"), key
        assert key in tensors or key.removesuffix(".scale") in names, key
    got_metadata, got = read_model_file(path)
    assert got_metadata == {**metadata, "half": fields["half"]} and set(got) == set(tensors)
    for key, value in got.items():
        if key in names:  # exactly the brute-forced reference, within half a step of the float32 weights
            q, scale = quantize(tensors[key], axes[key])
            # one scale per avatar weight: per row of an output projection, per column of an input one
            assert scale.shape == ((q.shape[0], 1) if axes[key] == "row" else (1, q.shape[1]))
            assert value.dtype == torch.float32 and torch.equal(value, dequantize(q, scale))
            assert ((value - tensors[key]).abs() <= scale.float() / 2).all()
        else:  # as stored; load_diffusion upcasts
            assert value.dtype == torch.float16 and torch.equal(value, tensors[key].half())
    model = load_diffusion(path)
    assert all(p.dtype == torch.float32 for p in model.denoiser.parameters())
    assert torch.equal(model.denoiser.tokenizer.proj_out[0].weight, got["model.tokenizer.proj_out.0.weight"])


@pytest.mark.parametrize("which", ["float32", "float16", "bundled"])
def test_files_without_int8_read_exactly_as_before(trained, tmp_path, which):
    """read_model_file is the raw safetensors read for every file without int8 tensors, so the loader builds
    the same model bit for bit: the trained float32 file, its float16 copy, the bundled default."""
    if which == "bundled":
        path = DEFAULT_MODEL
    elif which == "float16":
        metadata, tensors = read_model_file(trained)
        written, fields = compact_tensors(tensors, {"denoiser": "float16", "normalizer": "float16"})
        assert "int8" not in fields
        path = tmp_path / "half.safetensors"
        save_file(written, path, metadata={**metadata, **fields})
    else:
        path = trained
    raw_metadata, raw = read_safetensors(path, "diffusion model")
    metadata, tensors = read_model_file(path)
    assert metadata == raw_metadata and tensors.keys() == raw.keys()
    assert all(tensors[k].dtype == raw[k].dtype and torch.equal(tensors[k], raw[k]) for k in raw)
    if which != "bundled":
        model = load_diffusion(path)
        state = model.denoiser.state_dict()
        assert all(torch.equal(state[k], raw[f"model.{k}"].float()) for k in state)


def _outlier_copy(src: Path, dst: Path, factor: float = 1e4) -> None:
    """The same function as ``src`` with one huge column in every output projection: the final LayerNorm's
    first channel divided by ``factor`` and the projections' first column multiplied by it. Each row's int8
    step is then set by the huge value, and the row's other values round to 0."""
    metadata, tensors = read_model_file(src)
    tensors = dict(tensors)
    for key in ("model.norm_out.weight", "model.norm_out.bias"):
        tensors[key] = tensors[key].clone()
        tensors[key][0] /= factor
    for key in [k for k in tensors if k.startswith("model.tokenizer.proj_out.")]:
        tensors[key] = tensors[key].clone()
        tensors[key][:, 0] *= factor
    save_file(tensors, dst, metadata=metadata)


def test_compact_falls_back_to_float16_where_int8_changes_the_person(trained, body, tmp_path):
    config = CompactConfig(seeds=SEEDS)
    honest = compact_model(trained, tmp_path / "honest.safetensors", body, config)
    assert honest["precisions"] == {"denoiser": "int8", "normalizer": "float16"}
    assert honest["trials"][0]["worst_psnr_db"] >= config.int8_min_psnr_db
    with safe_open(str(tmp_path / "honest.safetensors"), "pt") as f:
        assert "I8" in {f.get_slice(k).get_dtype() for k in f.keys()}
    outlier = tmp_path / "outlier.safetensors"
    _outlier_copy(trained, outlier)
    # The copy samples the same people in float32 ...
    assert torch.allclose(sample_vectors(load_diffusion(outlier), list(SEEDS)),
                          sample_vectors(load_diffusion(trained), list(SEEDS)), atol=1e-4)
    # ... but not in int8, so compact measures that and keeps the denoiser in float16.
    result = compact_model(outlier, tmp_path / "fallback.safetensors", body, config)
    first, second = result["trials"][:2]
    assert first["precisions"] == {"denoiser": "int8"} and first["worst_psnr_db"] < config.int8_min_psnr_db
    assert second["precisions"] == {"denoiser": "float16"} and second["worst_psnr_db"] >= config.min_psnr_db
    assert result["precisions"]["denoiser"] == "float16" and result["int8"] == []
    with safe_open(str(tmp_path / "fallback.safetensors"), "pt") as f:
        assert "int8" not in f.metadata() and "I8" not in {f.get_slice(k).get_dtype() for k in f.keys()}
    assert result["bytes"] > honest["bytes"]
    # A threshold nothing meets leaves every group in float32.
    strict = compact_model(trained, tmp_path / "strict.safetensors", body,
                           CompactConfig(seeds=SEEDS, min_psnr_db=1e9, int8_min_psnr_db=1e9))
    assert strict["precisions"] == {} and [t["precisions"] for t in strict["trials"]] == [
        {"denoiser": "int8"}, {"denoiser": "float16"}, {"normalizer": "float16"}]


def test_compact_judges_the_seeds_the_float32_model_samples_plausibly(trained, body, tmp_path, monkeypatch):
    from hda_backend.diffusion import compact
    from hda_backend.diffusion.plausibility import Plausibility

    seeds = (0, 1, 2)
    first = compact_model(trained, tmp_path / "a.safetensors", body, CompactConfig(seeds=seeds))
    per_seed = first["trials"][0]["seed_psnr_db"]
    assert len(per_seed) == 3
    assert first["trials"][0]["worst_psnr_db"] == min(per_seed[seeds.index(s)] for s in first["judged_seeds"])
    order = sorted(range(3), key=lambda i: per_seed[i])
    worst, runner_up = order[0], order[1]
    assert per_seed[runner_up] - per_seed[worst] > 0.05
    # A threshold between the worst seed and the next: int8 passes only with the worst seed left out.
    config = CompactConfig(seeds=seeds, int8_min_psnr_db=(per_seed[worst] + per_seed[runner_up]) / 2)

    def verdicts(flagged):
        calls = []

        def fake(avatar, views, plausibility, **inputs):
            calls.append(avatar)
            return Plausibility(ok=len(calls) - 1 not in flagged)
        return fake

    monkeypatch.setattr(compact, "check_plausible", verdicts({worst}))
    left_out = compact_model(trained, tmp_path / "b.safetensors", body, config)
    assert left_out["judged_seeds"] == [s for i, s in enumerate(seeds) if i != worst]
    assert left_out["precisions"]["denoiser"] == "int8"
    assert left_out["trials"][0]["worst_psnr_db"] == per_seed[runner_up]
    assert left_out["trials"][0]["seed_psnr_db"] == per_seed
    monkeypatch.setattr(compact, "check_plausible", verdicts(set()))
    every = compact_model(trained, tmp_path / "c.safetensors", body, config)
    assert every["judged_seeds"] == list(seeds) and every["precisions"]["denoiser"] == "float16"
    # No plausible sample at all: every seed is judged rather than none.
    monkeypatch.setattr(compact, "check_plausible", verdicts({0, 1, 2}))
    none = compact_model(trained, tmp_path / "d.safetensors", body, config)
    assert none["judged_seeds"] == list(seeds) and none["precisions"]["denoiser"] == "float16"


@pytest.fixture(scope="module")
def int8_file(trained, tmp_path_factory):
    metadata, tensors = read_model_file(trained)
    written, fields = compact_tensors(tensors, {"denoiser": "int8"})
    return {**metadata, **fields}, written


NAME = "model.tokenizer.proj_out.0.weight"


@pytest.mark.parametrize("change, message", [
    (lambda m, t: t.pop(NAME + ".scale"), f"tensor '{NAME}.scale' is missing: the scales of int8 tensor"),
    (lambda m, t: t.update({NAME + ".scale": t[NAME + ".scale"].to(torch.int32)}),
     f"tensor '{NAME}.scale' is int32 of shape"),
    (lambda m, t: t.update({NAME + ".scale": t[NAME + ".scale"][:-1]}), f"tensor '{NAME}.scale' is float16 of shape"),
    (lambda m, t: t.update({NAME + ".scale": t[NAME + ".scale"][:, 0]}),
     f"tensor '{NAME}.scale' is float16 of shape \\(\\d+,\\), expected .* one scale per row or per column"),
    (lambda m, t: t.update({NAME + ".scale": -t[NAME + ".scale"] - 1}), "holds a negative or non-finite scale"),
    (lambda m, t: t.update({NAME: t[NAME].float()}), f"tensor '{NAME}' is float32 of shape .* expected an int8"),
    (lambda m, t: t.pop(NAME), f"tensor '{NAME}' \\(listed in field 'int8'\\) is missing"),
    (lambda m, t: m.update({"int8": json.dumps([n for n in json.loads(m["int8"]) if n != NAME])}),
     f"tensor '{NAME}' is int8 but field 'int8' does not list it"),
    (lambda m, t: m.update({"int8": "{proj"}), "field 'int8' is '{proj', expected a JSON list of tensor names"),
])
def test_bad_int8_files_are_one_line_errors(int8_file, tmp_path, change, message):
    metadata, tensors = dict(int8_file[0]), dict(int8_file[1])
    change(metadata, tensors)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    with pytest.raises(HDAError, match=message) as info:
        load_diffusion(path)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_listed_int8_file_is_not_half_read_as_raw_integers(int8_file, tmp_path):
    """Saving back what read_model_file returns gives a valid float32 file (the ``int8`` field is dropped with
    the scales), so a re-saved model is never misread."""
    metadata, tensors = int8_file
    path = tmp_path / "int8.safetensors"
    save_file(tensors, path, metadata=metadata)
    again = tmp_path / "again.safetensors"
    m, t = read_model_file(path)
    save_file(t, again, metadata=m)
    assert all(load_file(again)[k].dtype != torch.int8 for k in t)
    assert torch.equal(sample_vectors(load_diffusion(again), [0]), sample_vectors(load_diffusion(path), [0]))

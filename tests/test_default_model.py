"""The bundled default model (assets/default, built by `hda build-default`): what users get out of the box."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hda_backend.avatar.io import SUFFIX, load_avatar
from hda_backend.body import load_body
from hda_backend.diffusion.compact import GROUPS
from hda_backend.build_default import BUNDLE_LIMIT
from hda_backend.diffusion.int8 import SCALE_SUFFIX
from hda_backend.diffusion.gallery import GalleryConfig, gallery_views, mse_matrix, psnr_distance, render_gallery
from hda_backend.diffusion.plausibility import body_silhouettes, check_plausible
from hda_backend.diffusion.sample import load_diffusion, sample_vectors
from hda_backend.diffusion.weights import load_weight_set, write_avatar

DEFAULT = Path(__file__).resolve().parent.parent / "assets" / "default"
MODEL = DEFAULT / "diffusion.safetensors"
SEEDS = list(range(32))
# Two different people (two fits, or a sample and a fit) render about 20-27 dB apart on this gallery;
# a copy of the same network would be above 60 dB. 35 dB separates the two with a wide margin.
SAME_PERSON_DB = 35.0


@pytest.fixture(scope="module")
def body():
    return load_body()


@pytest.fixture(scope="module")
def model():
    return load_diffusion(MODEL)


@pytest.fixture(scope="module")
def views(body):
    return gallery_views(body, GalleryConfig(size=64))


@pytest.fixture(scope="module")
def samples(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("default_samples")
    vectors = sample_vectors(model, SEEDS)
    paths = [write_avatar(vectors[i], model.spec, model.meta, folder / f"sample_{s}{SUFFIX}")
             for i, s in enumerate(SEEDS)]
    return vectors, paths


def test_bundle_is_small_and_complete():
    files = [p for p in DEFAULT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= BUNDLE_LIMIT
    names = {p.relative_to(DEFAULT).as_posix() for p in files}
    assert {"diffusion.safetensors", "MODEL_CARD.md", "build.json"} <= names
    assert sum(n.startswith("references/") and n.endswith(SUFFIX) for n in names) >= 2
    card = (DEFAULT / "MODEL_CARD.md").read_text()
    record = json.loads((DEFAULT / "build.json").read_text())
    for row in record["stages"]["eval"]["rows"]:  # the card's table holds the recorded metrics
        assert f"{row['mmd_psnr_db']:.2f}" in card
    assert record["config"]["subjects"] >= 24


def test_half_precision_groups_are_what_the_file_says(model):
    with safe_open(str(MODEL), "pt") as f:
        half = json.loads(f.metadata()["half"])
        int8 = json.loads(f.metadata().get("int8", "[]"))  # the denoiser's projections, if compact kept int8
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(half) <= set(GROUPS)
    for key, dtype in dtypes.items():
        group = next(g for g, prefix in GROUPS.items() if key.startswith(prefix))
        if key in int8:
            assert dtype == "I8" and dtypes[key + SCALE_SUFFIX] in ("F16", "F32"), key
        elif key.removesuffix(SCALE_SUFFIX) not in int8:
            assert dtype == ("F16" if group in half else "F32"), key
    # The loader works in float32 whatever the file holds.
    assert all(p.dtype == torch.float32 for p in model.denoiser.parameters())


def test_a_seed_is_always_the_same_person(model, samples):
    vectors, _ = samples
    again = sample_vectors(model, [SEEDS[5], SEEDS[0]])
    assert torch.equal(again[0], vectors[5]) and torch.equal(again[1], vectors[0])


def test_every_seed_renders_a_plausible_person(body, views, samples):
    _, paths = samples
    masks = body_silhouettes(body, views)
    for seed, path in zip(SEEDS, paths):
        avatar = load_avatar(path, body)
        result = check_plausible(avatar, views, body_masks=masks)
        assert result.ok, f"seed {seed}: {result.reasons}"
        g = avatar(views.poses)
        assert all(torch.isfinite(t).all() for t in g)


def _gallery(paths, body, views):
    return render_gallery((load_avatar(p, body) for p in paths), views).images


def test_samples_differ_from_each_other_and_from_the_references(body, views, samples):
    vectors, paths = samples
    some = _gallery(paths[:8], body, views)
    references = sorted((DEFAULT / "references").glob(f"*{SUFFIX}"))
    refs = _gallery(references, body, views)
    between = -psnr_distance(mse_matrix(some, some))
    assert between[~torch.eye(8, dtype=torch.bool).numpy()].max() < SAME_PERSON_DB
    assert (-psnr_distance(mse_matrix(some, refs))).max() < SAME_PERSON_DB
    # In weight space too, no sample sits nearer a reference than a tenth of the references' own spacing.
    ref_vectors = load_weight_set(references).vectors
    spacing = torch.pdist(ref_vectors).min()
    assert torch.cdist(vectors, ref_vectors).min() > 0.1 * spacing

"""Body parts, per-pixel part labels and the image statistics behind eval-gen's colour, sharpness and
precision/recall columns, against hand-computed cases and brute-force loops."""

import math

import numpy as np
import pytest
import torch

from hda_backend.avatar.model import Avatar
from hda_backend.body import JOINT_NAMES, load_body
from hda_backend.body.parts import PARTS, joint_part, parts_of_weights
from hda_backend.config import load_config
from hda_backend.diffusion import image_stats
from hda_backend.diffusion.gallery import GalleryConfig, gallery_views, render_avatar, render_avatar_parts
from hda_backend.errors import HDAError


# ------------------------------------------------------------------------------------------------
# Body parts


def test_joint_parts_by_hand():
    assert [joint_part(n) for n in ("pelvis", "neck", "jaw", "left_shoulder", "right_wrist", "left_index3",
                                    "right_thumb1", "left_hip", "right_knee", "left_ankle", "right_foot")] == \
        ["torso", "head", "head", "arms", "arms", "arms", "arms", "legs", "legs", "feet", "feet"]
    with pytest.raises(HDAError, match="SMPL-X joint name"):
        joint_part("tail")


def test_texel_parts_match_a_loop_and_the_body_layout():
    body = load_body()
    config = load_config("tiny")
    avatar = Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, seed=0)
    weights = avatar.binding.weights
    got = parts_of_weights(weights)
    for m in range(0, weights.shape[0], 7):  # brute force: sum each texel's weights by part name
        sums = {p: 0.0 for p in PARTS}
        for j, name in enumerate(JOINT_NAMES):
            sums[joint_part(name)] += float(weights[m, j])
        assert PARTS[int(got[m])] == max(PARTS, key=lambda p: (sums[p], -PARTS.index(p)))
    # Where the parts sit on the rest T-pose (+Y up, arms along X): head above torso above legs above
    # feet; the arms reach furthest sideways.
    rest = torch.einsum("mk,mkc->mc", avatar.binding.bary, body.v_template[avatar.binding.corners])
    height = [float(rest[got == p, 1].mean()) for p in range(len(PARTS))]
    side = [float(rest[got == p, 0].abs().mean()) for p in range(len(PARTS))]
    h, t, a, legs, f = range(5)
    assert height[h] > height[t] > height[legs] > height[f]
    assert side[a] == max(side) and all((got == p).sum() > 10 for p in range(len(PARTS)))
    with pytest.raises(HDAError, match=r"expected \[M, 55\]"):
        parts_of_weights(weights[:, :54])


def test_rendered_part_labels_follow_the_body_and_the_silhouette():
    body = load_body()
    config = load_config("tiny")
    avatar = Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, seed=0)
    views = gallery_views(body, GalleryConfig(poses=("walk@0.25",), azimuths_deg=(0.0,), size=64))
    rgb, alpha, labels = render_avatar_parts(avatar, views)
    plain_rgb, plain_alpha = render_avatar(avatar, views)
    assert torch.equal(rgb, plain_rgb) and torch.equal(alpha, plain_alpha)
    assert labels.dtype == torch.int8 and labels.shape == alpha.shape
    assert torch.equal(labels >= 0, alpha > image_stats.PERSON_ALPHA)
    rows = torch.arange(64, dtype=torch.float32)[:, None].expand(64, 64)
    mean_row = [float(rows[labels[0] == p].mean()) for p in range(len(PARTS))]
    h, t, _, legs, f = range(5)
    assert mean_row[h] < mean_row[t] < mean_row[legs] < mean_row[f]  # image rows grow downwards


# ------------------------------------------------------------------------------------------------
# Image statistics


def test_colourfulness_by_hand():
    # Half pure red, half pure blue: rg = (255, 0), yb = (127.5, -255).
    pixels = np.array([[255.0, 0, 0]] * 5 + [[0, 0, 255.0]] * 5)
    sigma = math.hypot(127.5, 191.25)
    mu = math.hypot(127.5, -63.75)
    assert image_stats.colourfulness(pixels) == pytest.approx(sigma + 0.3 * mu, rel=1e-12)
    # One colour: no spread; rg = 100, yb = 150 - 50 = 100.
    assert image_stats.colourfulness(np.tile([200.0, 100.0, 50.0], (7, 1))) == pytest.approx(0.3 * math.sqrt(2) * 100)
    assert image_stats.colourfulness(np.full((9, 3), 128.0)) == 0.0  # grey
    assert image_stats.colourfulness(np.zeros((0, 3))) == 0.0


def test_laplacian_variance_of_known_patterns():
    i, j = np.mgrid[0:10, 0:10]
    c, m = 3.0, 50.0
    checker = m + c * (-1.0) ** (i + j)  # each neighbour is the opposite sign: L = ±8c, as often + as -
    full = np.ones((10, 10), bool)
    assert image_stats.laplacian_variance(checker, full) == pytest.approx(64 * c * c, rel=1e-12)
    assert image_stats.laplacian_variance(2.0 * i + 5.0 * j, full) == pytest.approx(0.0, abs=1e-20)  # a ramp
    # Only the mask's interior counts: a 6x6 square's interior is its 4x4 centre, whatever lies outside.
    square = np.zeros((10, 10), bool)
    square[2:8, 2:8] = True
    noisy = np.where(square, checker, np.random.default_rng(0).normal(0, 100, (10, 10)))
    assert image_stats.interior(square).sum() == 16
    assert image_stats.laplacian_variance(noisy, square) == pytest.approx(64 * c * c, rel=1e-12)
    # Brute force on random data.
    g = np.random.default_rng(1).random((7, 8))
    mask = np.random.default_rng(2).random((7, 8)) > 0.2
    values = [g[y - 1, x] + g[y + 1, x] + g[y, x - 1] + g[y, x + 1] - 4 * g[y, x]
              for y in range(1, 6) for x in range(1, 7)
              if mask[y, x] and mask[y - 1, x] and mask[y + 1, x] and mask[y, x - 1] and mask[y, x + 1]]
    assert image_stats.laplacian_variance(g, mask) == pytest.approx(np.var(values), rel=1e-12)


def test_straight_colours_undo_the_composite():
    colour = np.array([0.8, 0.1, 0.3])
    bg = np.array([1.0, 1.0, 1.0])
    alpha = np.array([1.0, 0.8, 0.6, 0.3])
    images = alpha[:, None] * colour + (1 - alpha[:, None]) * bg
    got = image_stats.straight_colours(images, alpha, bg)
    np.testing.assert_allclose(got[:3], np.tile(colour, (3, 1)), atol=1e-12)
    np.testing.assert_allclose(got[3], bg)  # not the person: the background


def test_avatar_stats_against_a_pixel_loop():
    """A two-view gallery: head in flat red, torso in blue/yellow stripes, the rest absent."""
    h = w = 10
    bg = (1.0, 1.0, 1.0)
    images = np.ones((2, h, w, 3))
    alpha = np.zeros((2, h, w))
    labels = np.full((2, h, w), -1, np.int8)
    for v in range(2):
        alpha[v, 1:9, 2:8] = 1.0
        labels[v, 1:4, 2:8] = 0
        images[v, 1:4, 2:8] = (0.8, 0.2, 0.2)
        labels[v, 4:9, 2:8] = 1
        for x in range(2, 8):
            images[v, 4:9, x] = (0.0, 0.0, 1.0) if (x + v) % 2 else (1.0, 1.0, 0.0)
    stats = image_stats.avatar_stats(images, alpha, labels, bg)
    person = alpha > 0.5
    want_colourful = np.mean([image_stats.colourfulness(255 * images[v][person[v]]) for v in range(2)])
    assert stats.colourfulness == pytest.approx(want_colourful, rel=1e-12)
    luma = images @ np.array([0.299, 0.587, 0.114])
    want_sharp = np.mean([image_stats.laplacian_variance(255 * luma[v], person[v]) for v in range(2)])
    assert stats.sharpness == pytest.approx(want_sharp, rel=1e-12)
    f = stats.features.reshape(len(PARTS), len(image_stats.PART_STATS))
    np.testing.assert_allclose(f[0, :6], [0.8, 0.2, 0.2, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(f[1, :6], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], atol=1e-12)  # half blue, half yellow
    for p in (0, 1):  # RMS Laplacian of the luminance: loop over the part's pixels inside the silhouette
        lap = []
        for v in range(2):
            for y in range(1, h - 1):
                for x in range(1, w - 1):
                    if labels[v, y, x] == p and all(person[v, y + dy, x + dx]
                                                    for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))):
                        lap.append(luma[v, y - 1, x] + luma[v, y + 1, x] + luma[v, y, x - 1] + luma[v, y, x + 1]
                                   - 4 * luma[v, y, x])
        assert f[p, 6] == pytest.approx(math.sqrt(np.mean(np.square(lap))), rel=1e-12)
    np.testing.assert_allclose(f[2:], np.tile([1, 1, 1, 0, 0, 0, 0], (3, 1)))  # absent parts: background, no spread
    assert image_stats.FEATURE_NAMES[7] == "torso.mean_r" and len(image_stats.FEATURE_NAMES) == 35
    with pytest.raises(HDAError, match="expected"):
        image_stats.avatar_stats(images, alpha[:1], labels, bg)


def test_standardise_in_reference_units():
    ref = np.array([[0.0, 5.0], [2.0, 5.0]])  # feature 0: mean 1, std 1; feature 1 constant
    np.testing.assert_allclose(image_stats.standardise(np.array([[3.0, 7.0]]), ref), [[2.0, 2.0]])

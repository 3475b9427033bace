"""Stage-2 evaluation: metrics against brute force and closed forms, plausibility, baselines, `hda eval-gen`."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hda_backend.avatar.io import load_avatar, read_avatar_file, save_avatar
from hda_backend.avatar.model import Avatar
from hda_backend.avatar.unet import UNetConfig
from hda_backend.body import load_body, pose_body
from hda_backend.cli import main
from hda_backend.config import load_config
from hda_backend.diffusion import baselines, eval_gen, image_stats, metrics
from hda_backend.diffusion.eval_gen import EvalGenConfig, evaluate_generation, format_table
from hda_backend.diffusion.gallery import (GalleryConfig, gallery_views, load_inception, mse_matrix, pairwise,
                                           parse_pose, psnr_distance, render_avatar, render_avatar_parts,
                                           weight_distance_matrix)
from hda_backend.diffusion.plausibility import body_silhouettes, check_plausible, mesh_silhouette
from hda_backend.diffusion.sample import sample_avatars
from hda_backend.diffusion.train import train_diffusion
from hda_backend.diffusion.weights import load_weight_set
from hda_backend.errors import HDAError
from hda_backend.fit.losses import psnr

rng = np.random.default_rng(0)

# ------------------------------------------------------------------------------------------------
# MMD, COV, 1-NNA


def brute_mmd_cov(d):
    g, r = d.shape
    mins = []
    for j in range(r):
        best = math.inf
        for i in range(g):
            best = min(best, d[i, j])
        mins.append(best)
    matched = set()
    for i in range(g):
        best_j = 0
        for j in range(r):
            if d[i, j] < d[i, best_j]:
                best_j = j
        matched.add(best_j)
    return sum(mins) / r, len(matched) / r


def brute_one_nna(points_g, points_r):
    """Leave-one-out 1-NN over the union with Euclidean distances (no ties among random points)."""
    union = [(p, 0) for p in points_g] + [(p, 1) for p in points_r]
    correct = 0
    for a, (pa, la) in enumerate(union):
        best, label = math.inf, None
        for b, (pb, lb) in enumerate(union):
            if a != b and np.linalg.norm(pa - pb) < best:
                best, label = np.linalg.norm(pa - pb), lb
        correct += label == la
    return correct / len(union)


def dist(a, b):
    return np.linalg.norm(a[:, None] - b[None], axis=-1)


def test_mmd_and_coverage_match_brute_force():
    for g, r in ((7, 5), (3, 9), (6, 6)):
        d = rng.random((g, r))
        d[0, 1] = d[0, 0]  # a tie: COV takes the lowest reference index
        want_mmd, want_cov = brute_mmd_cov(d)
        assert metrics.mmd(d) == pytest.approx(want_mmd, abs=1e-12)
        assert metrics.coverage(d) == pytest.approx(want_cov, abs=1e-12)


def test_one_nna_matches_brute_force_on_random_points():
    for g, r in ((8, 8), (5, 11)):
        pg, pr = rng.normal(size=(g, 3)), rng.normal(0.3, 1.0, size=(r, 3))
        value = metrics.one_nna(dist(pg, pg), dist(pg, pr), dist(pr, pr))
        assert value == pytest.approx(brute_one_nna(pg, pr), abs=1e-12)


def test_one_nna_analytic_cases():
    pr = rng.normal(size=(6, 4))
    # Exact copies: every sample's nearest neighbour is its twin in the other set.
    assert metrics.one_nna(dist(pr, pr), dist(pr, pr), dist(pr, pr)) == 0.0
    # Two clusters far apart: every nearest neighbour is in the own set.
    pg = pr + 1000.0
    assert metrics.one_nna(dist(pg, pg), dist(pg, pr), dist(pr, pr)) == 1.0
    # Ties, by hand on a line: S_g = {0, 0}, S_r = {0, 5}. The gen points each tie with one gen and one
    # ref (1/2 each), the ref at 0 ties with two gens (0), the ref at 5 ties with all three (1/3).
    pg, pr = np.array([[0.0], [0.0]]), np.array([[0.0], [5.0]])
    assert metrics.one_nna(dist(pg, pg), dist(pg, pr), dist(pr, pr)) == pytest.approx((0.5 + 0.5 + 0 + 1 / 3) / 4)


def test_metrics_refuse_bad_matrices():
    with pytest.raises(HDAError, match="NaN"):
        metrics.mmd(np.array([[0.0, np.nan]]))
    with pytest.raises(HDAError, match="expected"):
        metrics.one_nna(np.zeros((2, 2)), np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(HDAError, match="2D"):
        metrics.coverage(np.zeros(3))


# ------------------------------------------------------------------------------------------------
# FID, KID


def whitened(n, f, seed):
    """n points in R^f with sample mean 0 and unbiased sample covariance exactly I."""
    z = np.random.default_rng(seed).normal(size=(n, f))
    z -= z.mean(0)
    q, _ = np.linalg.qr(z)  # orthonormal columns, still zero mean
    return q * math.sqrt(n - 1)


def test_frechet_distance_closed_forms():
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.random(4) + 0.1, rng.random(4) + 0.1
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # commuting (diagonal) case
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # Non-commuting: Tr((S1 S2)^1/2) from the eigenvalues of the (non-symmetric) product itself.
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 3))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T  # s2 of rank 3, like features of few samples
    cross = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_fid_from_features_equals_gaussian_closed_form():
    f = 3
    l1, l2 = np.tril(rng.normal(size=(f, f))), np.tril(rng.normal(size=(f, f)))
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    feat1 = whitened(40, f, 1) @ l1.T + mu1  # sample mean mu1, sample covariance l1 l1ᵀ exactly
    feat2 = whitened(30, f, 2) @ l2.T + mu2
    s1, s2 = l1 @ l1.T, l2 @ l2.T
    cross = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * cross
    assert metrics.fid(feat1, feat2) == pytest.approx(want, rel=1e-8)
    assert metrics.fid(feat1, feat1) == pytest.approx(0.0, abs=1e-8)


def brute_kid(x, y, degree=3, coef=1.0):
    f = x.shape[1]

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(f)) / f + coef) ** degree

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force_unbiased_mmd():
    x, y = rng.normal(size=(9, 5)), rng.normal(0.5, 1.0, size=(9, 5))
    want = brute_kid(x, y)
    # Subsets as large as the sets: every subset is the whole set (the subset size is clipped to 9).
    mean, std = metrics.kid(x, y, metrics.KIDConfig(subsets=5, subset_size=1000))
    assert mean == pytest.approx(want, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)
    # Smaller subsets: the mean of brute-force estimates over the same seeded draws.
    cfg = metrics.KIDConfig(subsets=4, subset_size=5, seed=3)
    draws = np.random.default_rng(3)
    values = []
    for _ in range(4):
        ia, ib = draws.choice(9, 5, replace=False), draws.choice(9, 5, replace=False)
        values.append(brute_kid(x[ia], y[ib]))
    assert metrics.kid(x, y, cfg)[0] == pytest.approx(np.mean(values), rel=1e-10)


def test_inception_loader_refuses_missing_and_corrupt_files(tmp_path, monkeypatch):
    monkeypatch.delenv("HDA_INCEPTION", raising=False)
    extractor, status = load_inception(None)
    assert extractor is None and "FID/KID off" in status
    with pytest.raises(HDAError, match="not found"):
        load_inception(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(HDAError, match="not a TorchScript model"):
        load_inception(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save make the stand-in file
def test_inception_loader_uses_the_torchscript_convention(tmp_path):
    class Net(torch.nn.Module):  # stands in for inception-2015-12-05.pt: uint8 NCHW -> features
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = x.to(torch.float32)
            return torch.stack([x.mean(dim=(1, 2, 3)), x[:, 0].amax(dim=(1, 2))], dim=1)

    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(Net()), str(path))
    extractor, status = load_inception(path)
    images = rng.random((3, 8, 8, 3))
    pixels = np.round(images * 255)
    want = np.stack([pixels.mean(axis=(1, 2, 3)), pixels[..., 0].max(axis=(1, 2))], axis=1)
    np.testing.assert_allclose(extractor(images), want, rtol=1e-6)
    assert "FID/KID on" in status


# ------------------------------------------------------------------------------------------------
# Improved precision and recall


def brute_precision_recall(real, fake, k):
    def radius(points, i):
        return sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)[k - 1]

    def inside(x, points):
        return any(np.linalg.norm(x - points[i]) <= radius(points, i) for i in range(len(points)))

    return (sum(inside(f, real) for f in fake) / len(fake), sum(inside(r, fake) for r in real) / len(real))


def test_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [3.0], [10.0]])
    fake = np.array([[0.0], [0.5], [20.0], [21.0]])
    # k=1: real radii 1, 1, 2, 7; fake radii 0.5, 0.5, 1, 1. Fake 0 and 0.5 lie in the ball of real 0;
    # 20 and 21 are 10 and 11 from real 10 (radius 7). Real 0 and 1 lie within 0.5 of fake 0.5 (1 on
    # the boundary counts); real 3 and 10 are in no fake ball.
    assert metrics.precision_recall(real, fake, k=1) == (0.5, 0.5)
    # k=2: real radii 3, 2, 3, 9: 20 is still 10 > 9 from real 10; fake radii 20, 19.5, 19.5, 20.5 cover
    # every real point.
    assert metrics.precision_recall(real, fake, k=2) == (0.5, 1.0)
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(HDAError, match="k=4"):
        metrics.precision_recall(real, fake, k=4)
    with pytest.raises(HDAError, match="widths differ"):
        metrics.precision_recall(real, np.zeros((4, 2)), k=1)


def test_precision_recall_match_brute_force():
    for g, r, k in ((9, 12, 3), (15, 6, 2)):
        real, fake = rng.normal(size=(r, 4)), rng.normal(0.4, 1.3, size=(g, 4))
        assert metrics.precision_recall(real, fake, k) == pytest.approx(brute_precision_recall(real, fake, k))


# ------------------------------------------------------------------------------------------------
# Novelty


def test_novelty_by_hand():
    train = np.array([[0.0], [1.0], [3.0]])  # nearest-neighbour distances 1, 1, 2: median 1, min 1
    gen = np.array([[0.0], [0.5], [6.0]])  # nearest training distances 0, 0.5, 3
    result = metrics.novelty(dist(gen, train), dist(train, train))
    np.testing.assert_allclose(result.ratios, [0.0, 0.5, 3.0])
    assert result.median_ratio == 0.5
    assert result.copy_fraction == pytest.approx(2 / 3)
    assert (result.train_nn_median, result.train_nn_min) == (1.0, 1.0)
    with pytest.raises(HDAError, match="non-negative"):
        metrics.novelty(-dist(gen, train), dist(train, train))


# ------------------------------------------------------------------------------------------------
# Baselines


def test_span_measures_by_hand():
    # Training set on the x axis: mean (1, 0, 0), spread mean |x - m|^2 = 1, span = the x axis,
    # nearest-neighbour distances 2 and 2 (median 2).
    train = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    samples = np.array([[1.0, 0.0, 0.0], [3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    got = metrics.span_measures(samples, train)
    np.testing.assert_allclose(got.in_span, [0.0, 2.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(got.off_span, [0.0, 4.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(got.nn_ratio, [0.5, math.sqrt(17) / 2, 0.0], atol=1e-12)
    # Three points spanning a plane (z = 0): mean (1, 1, 0), spread (|(-1,-1)|^2 + |(1,-1)|^2 + |(0,2)|^2)/3 = 8/3.
    train = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    got = metrics.span_measures(np.array([[1.0, 1.0, 2.0], [5.0, 4.0, 0.0]]), train)
    np.testing.assert_allclose(got.in_span, [0.0, 5.0 / math.sqrt(8 / 3)], atol=1e-12)
    np.testing.assert_allclose(got.off_span, [2.0 / math.sqrt(8 / 3), 0.0], atol=1e-12)
    # nearest-neighbour distances in the set: 2, 2, sqrt(10) -> median 2; samples' nearest: sqrt(6), sqrt(17)
    np.testing.assert_allclose(got.nn_ratio, [math.sqrt(6) / 2, math.sqrt(17) / 2], atol=1e-12)


def test_basis_measures_by_hand():
    # Two layers of 3 values each, r = 2, directions the unit vectors of each layer's first two values.
    base = np.array([1.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    directions = np.array([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    layers = [slice(0, 3), slice(3, 6)]
    train = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    samples = base + np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]]) @ directions
    samples[2] += np.array([0.0, 0.0, 7.0, 0.0, 0.0, 0.0])  # off the basis: not a coefficient
    # A sample whose layers disagree: layer 1 carries (2, 0), layer 2 (-2, 0).
    split = base + np.array([2.0, 0.0, 0.0, -2.0, 0.0, 0.0])
    got = metrics.basis_measures(np.vstack([samples, split]), base, directions, train, layers)
    np.testing.assert_allclose(got.norm, [2.0, 0.5, 0.0, 2.0], atol=1e-12)  # |c|^2 / r per layer, averaged
    np.testing.assert_allclose(got.agreement, [1.0, 1.0, 0.0, 0.0], atol=1e-12)
    # Nearest training coefficients: (2,0) is a copy, (1,0) lies on the segment (0,0)-(2,0) 1 away from both
    # ends, (0,0) a copy; the split sample's mean coefficient (0,0) too.
    fresh = np.random.default_rng(0).standard_normal((256, 2))
    nn_scale = np.median(np.sqrt(((fresh[:, None] - train[None]) ** 2).sum(-1)).min(1))
    np.testing.assert_allclose(got.nn, [0.0, 1.0 / nn_scale, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(got.segment, [0.0, 0.0, 0.0, 0.0], atol=1e-12)
    # A point off every segment: (2, 2) is sqrt(2) from the segment (2,0)-(0,2); its scale from the same draws.
    seg_scale = np.median([min(_segment_distance_loop(f, train[i], train[j]) for i in range(3) for j in range(3)
                               if i < j) for f in fresh])
    far = metrics.basis_measures(base + np.array([[2.0, 2.0]]) @ directions, base, directions, train, layers)
    np.testing.assert_allclose(far.segment, [math.sqrt(2) / seg_scale], rtol=1e-3)
    with pytest.raises(HDAError, match="fewer than r"):
        metrics.basis_measures(samples, base, directions, train, [slice(0, 1), slice(1, 6)])


def _segment_distance_loop(p, a, b):
    q = a + (b - a) * np.linspace(0.0, 1.0, 20001)[:, None]  # brute force along the segment
    return float(np.sqrt(((p - q) ** 2).sum(1)).min())


def test_span_measures_match_least_squares_and_loops():
    rng = np.random.default_rng(3)
    train, samples = rng.normal(size=(6, 20)), rng.normal(size=(4, 20))
    got = metrics.span_measures(samples, train)
    mean = train.mean(0)
    spread = math.sqrt(sum(float(((row - mean) ** 2).sum()) for row in train) / len(train))
    for i, s in enumerate(samples):
        coef = np.linalg.lstsq((train - mean).T, s - mean, rcond=None)[0]  # nearest point of the affine span
        foot = (train - mean).T @ coef
        assert got.in_span[i] == pytest.approx(np.linalg.norm(foot) / spread, rel=1e-9)
        assert got.off_span[i] == pytest.approx(np.linalg.norm(s - mean - foot) / spread, rel=1e-9)
        nearest = min(math.dist(s, t) for t in train)
        within = sorted(min(math.dist(a, b) for j, b in enumerate(train) if j != k) for k, a in enumerate(train))
        assert got.nn_ratio[i] == pytest.approx(nearest / ((within[2] + within[3]) / 2), rel=1e-9)
    assert metrics.span_measures(train, train).off_span == pytest.approx(np.zeros(6), abs=1e-9)
    with pytest.raises(HDAError, match="expected \\[G, D\\]"):
        metrics.span_measures(samples[:, :3], train)
    with pytest.raises(HDAError, match="all equal"):
        metrics.span_measures(samples, np.ones((3, 20)))


def test_copy_baseline_draws_training_rows_without_repeats():
    train = torch.randn(5, 7)
    samples, index = baselines.copy_samples(train, 12, seed=4)
    assert torch.equal(samples, train[index])
    assert sorted(index[:5].tolist()) == list(range(5)) and sorted(index[5:10].tolist()) == list(range(5))
    again, _ = baselines.copy_samples(train, 12, seed=4)
    assert torch.equal(samples, again)


def test_pca_baseline_spans_the_training_set_with_its_variances():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(6, 40, generator=gen) * torch.linspace(0.1, 2.0, 40)
    mean, components, variances = baselines.fit_pca(train)
    assert components.shape[0] == 5  # rank N-1
    torch.testing.assert_close(components @ components.T, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    centred = train.double() - train.double().mean(0)
    # The coefficients of the training vectors have exactly the stated variances.
    coeff = centred @ components.T
    torch.testing.assert_close(coeff.var(0), variances, rtol=1e-8, atol=0)
    samples = baselines.pca_samples(train, 4000, seed=1).double()
    # Samples stay in the affine span of the training vectors ...
    residual = (samples - mean) - ((samples - mean) @ components.T) @ components
    assert residual.abs().max() < 1e-4
    # ... with the training set's covariance along each component (4000 draws: within ~10%).
    sample_var = ((samples - mean) @ components.T).var(0)
    assert ((sample_var / variances - 1).abs() < 0.12).all()
    assert torch.equal(baselines.pca_samples(train, 3, seed=1), baselines.pca_samples(train, 3, seed=1))
    with pytest.raises(HDAError, match="N >= 2"):
        baselines.pca_samples(train[:1], 3, seed=0)


def test_blend_baseline_averages_two_distinct_training_avatars():
    train = torch.randn(3, 9, dtype=torch.float64)
    samples, pairs = baselines.blend_samples(train, 600, seed=5)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    for s_, (i, j) in zip(samples[:20], pairs[:20]):
        torch.testing.assert_close(s_, (train[i] + train[j]) / 2, rtol=0, atol=1e-15)
    counts = {(i, j): int(((pairs[:, 0] == i) & (pairs[:, 1] == j)).sum())
              for i in range(3) for j in range(3) if i != j}
    assert all(60 <= c <= 140 for c in counts.values()), counts  # 6 ordered pairs, ~100 each
    again, _ = baselines.blend_samples(train, 600, seed=5)
    assert torch.equal(samples, again)
    two = torch.randn(2, 4)
    mid, _ = baselines.blend_samples(two, 3, seed=0)  # two subjects: always their midpoint
    torch.testing.assert_close(mid, ((two[0] + two[1]) / 2).expand(3, 4))
    vectors, origins = baselines.baseline_samples("blend", train.float(), 2, seed=5)
    first = baselines.blend_pairs(3, 2, seed=5)
    assert origins == [f"baseline:blend:{int(i)}:{int(j)}" for i, j in first]
    torch.testing.assert_close(vectors, ((train[first[:, 0]] + train[first[:, 1]]) / 2).float())
    with pytest.raises(HDAError, match="N >= 2"):
        baselines.blend_samples(train[:1], 3, seed=0)


# ------------------------------------------------------------------------------------------------
# Gallery and plausibility

GALLERY = GalleryConfig(poses=("walk@0.25", "squat@0.5"), azimuths_deg=(0.0, 180.0), size=48)


def tiny_avatar(seed=0, colour_seed=None):
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=seed)
    if colour_seed is not None:
        gen = torch.Generator().manual_seed(colour_seed)
        with torch.no_grad():  # a trained-looking avatar: colour structure and small offsets
            avatar.unet.outc.weight[11:14].normal_(0, 0.5, generator=gen)
            avatar.unet.outc.bias[11:14] = torch.randn(3, generator=gen) * 0.5
            avatar.unet.outc.bias[0:3] = torch.randn(3, generator=gen) * 0.3
    return avatar


def brute_silhouette(pix, faces, width, height):
    mask = np.zeros((height, width), bool)
    for y, x in itertools.product(range(height), range(width)):
        p = np.array([x + 0.5, y + 0.5])
        for f in faces:
            a, b, c = pix[f[0]], pix[f[1]], pix[f[2]]
            m = np.array([b - a, c - a]).T
            if abs(np.linalg.det(m)) < 1e-12:
                continue
            u, v = np.linalg.solve(m, p - a)
            if u >= -1e-9 and v >= -1e-9 and u + v <= 1 + 1e-9:
                mask[y, x] = True
                break
    return mask


def test_mesh_silhouette_matches_point_in_triangle_loops():
    gen = np.random.default_rng(5)
    verts = np.c_[gen.uniform(-1, 1, (12, 2)), gen.uniform(2, 4, 12)]
    faces = np.array([gen.choice(12, 3, replace=False) for _ in range(8)])
    view = torch.eye(4)
    K = torch.tensor([[20.0, 0, 12], [0, 20.0, 10], [0, 0, 1]])
    mask = mesh_silhouette(torch.tensor(verts), torch.tensor(faces), view, K, 24, 20)
    pix = (verts @ K.double().numpy().T)[:, :2] / verts[:, 2:]
    want = brute_silhouette(pix, faces, 24, 20)
    assert mask.sum() > 20 and np.array_equal(mask.numpy(), want)


def test_gallery_frames_every_pose_and_psnr_distance_is_pooled_mse():
    body = load_body()
    views = gallery_views(body, GALLERY)
    verts = pose_body(body, views.poses).vertices
    for p, c in itertools.product(range(2), range(2)):
        cam = verts[p] @ views.viewmats[c, :3, :3].T + views.viewmats[c, :3, 3]
        pix = (cam @ views.Ks[c].T)[:, :2] / cam[:, 2:]
        assert (pix > 0).all() and (pix < GALLERY.size).all()
    masks = body_silhouettes(body, views)
    assert masks.shape == (4, 48, 48) and 0.02 < masks.float().mean() < 0.5
    torch.testing.assert_close(parse_pose("walk@0.25"), views.poses[0])
    with pytest.raises(HDAError, match="clip@phase"):
        parse_pose("moonwalk@0.5")
    a, b = torch.rand(2, 4, 6, 6, 3), torch.rand(3, 4, 6, 6, 3)
    d = psnr_distance(mse_matrix(a, b))
    assert d[1, 2] == pytest.approx(-float(psnr(a[1], b[2])), abs=1e-4)
    assert psnr_distance(mse_matrix(a, a))[0, 0] == -100.0  # identical galleries: the MSE floor
    w = weight_distance_matrix(a.flatten(1), b.flatten(1))
    assert w[0, 1] == pytest.approx(float((a[0] - b[1]).norm()), rel=1e-6)
    # Chunked visits of b (one gallery per chunk here) give the same matrix as a plain double loop.
    chunked = pairwise(a, b, lambda x, ys: ((ys - x[None]) ** 2).flatten(1).mean(1), chunk_elements=1)
    loops = [[float(((a[i] - b[j]) ** 2).mean()) for j in range(3)] for i in range(2)]
    np.testing.assert_allclose(chunked, loops, rtol=1e-6)


def test_plausibility_passes_a_trained_like_avatar_and_names_each_failure():
    body = load_body()
    views = gallery_views(body, GALLERY)
    masks = body_silhouettes(body, views)

    def verdict(edit=None):
        avatar = tiny_avatar(0, colour_seed=3)
        if edit:
            with torch.no_grad():
                edit(avatar.unet.outc)
        return check_plausible(avatar, views, body_masks=masks)

    good = verdict()
    assert good.ok and good.failed == [] and good.stats["body_coverage"] > 0.9
    cases = {
        "finite": lambda conv: conv.weight.view(-1)[7].fill_(float("nan")),
        "scale": lambda conv: conv.bias[3:6].add_(10.0),  # log-scale channels
        "bbox": lambda conv: conv.bias[0:3].add_(100.0),  # offsets of 5 m
        "silhouette": lambda conv: conv.bias[10].fill_(-30.0),  # opacity ~ 0
    }
    words = {"finite": "NaN", "scale": "exploded", "bbox": "outside the body", "silhouette": "silhouette"}
    for check, edit in cases.items():
        result = verdict(edit)
        assert not result.ok and result.failed == [check], (check, result)
        assert words[check] in result.reasons[0]


# ------------------------------------------------------------------------------------------------
# hda eval-gen end to end

ARGS = ["--preset", "tiny", "--size", "48", "--cameras", "2", "--poses", "walk@0.25,squat@0.5"]


def write_reference(folder, count=6):
    """Tiny subjects from one consistent initialisation, differing in colour and offsets like fits do."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        save_avatar(tiny_avatar(0, colour_seed=100 + i), folder / f"subj_{i}.hda.safetensors", origin=f"test:{i}")
    return folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalgen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HDA_CACHE_DIR", str(root / "cache"))
        mp.delenv("HDA_INCEPTION", raising=False)
        ref = write_reference(root / "ref")
        model = root / "diff.safetensors"
        train_diffusion(ref, model, load_config("tiny").diffusion, steps=20, progress=False, log=lambda _: None)
        out = root / "out"
        code = main(["eval-gen", "--reference", str(ref), "--model", f"diff={model}", "--steps", "5",
                     "--samples", f"given={ref}", "--out", str(out), *ARGS])
        assert code == 0
        direct = sample_avatars(model, seed=0, n=6, steps=5, out_dir=root / "direct")
    return ref, out, json.loads((out / "eval_gen.json").read_text()), direct


def test_eval_gen_copy_row_is_memorisation(evaluated):
    _, _, report, _ = evaluated
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["diff", "given", "copy", "pca", "blend"]
    for name in ("copy", "given"):  # the reference files themselves, drawn or given
        row = rows[name]
        assert row["one_nna_psnr"] == 0.0 and row["cov_psnr"] == 1.0 and row["mmd_psnr_db"] == 100.0
        assert row["novelty_weight"]["median_ratio"] == 0.0 and row["novelty_weight"]["copy_fraction"] == 1.0
        assert row["novelty_image"]["median_ratio"] == 0.0
        assert row["plausible_fraction"] == 1.0
        # The same six avatars as the references: every image statistic matches exactly.
        assert row["colourfulness_ratio"] == pytest.approx(1.0) and row["sharpness_ratio"] == pytest.approx(1.0)
        assert row["colour_fd"] == pytest.approx(0.0, abs=1e-6)
        assert (row["precision"], row["recall"], row["pr_k"]) == (1.0, 1.0, 3)
        assert row["nearest_train_rms"] == 0.0 and not row["no_copies"]
    assert rows["given"]["seconds_per_identity"] is None and rows["copy"]["seconds_per_identity"] > 0
    assert report["reference_stats"]["colourfulness"] == pytest.approx(rows["copy"]["colourfulness"])


def test_eval_gen_blend_row_is_pairwise_averages(evaluated):
    ref, out, report, _ = evaluated
    row = next(r for r in report["rows"] if r["name"] == "blend")
    train = load_weight_set(ref)
    samples = load_weight_set(out / "samples" / "blend")
    for i, path in enumerate(samples.paths):
        meta, _ = read_avatar_file(path)
        a, b = (int(x) for x in meta["origin"].split(":")[2:4])
        assert a != b
        torch.testing.assert_close(samples.vectors[i], (train.vectors[a] + train.vectors[b]) / 2)
    assert row["count"] == 6
    assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0 and row["colour_fd"] > 0.0


def test_eval_gen_pca_row_is_new_and_in_the_training_span(evaluated):
    ref, out, report, _ = evaluated
    row = next(r for r in report["rows"] if r["name"] == "pca")
    assert row["count"] == 6 and row["novelty_weight"]["median_ratio"] > 0.1
    assert 0.0 < row["one_nna_psnr"] <= 1.0 and 0.0 < row["cov_psnr"] <= 1.0
    train = load_weight_set(ref).vectors.double()
    samples = load_weight_set(out / "samples" / "pca").vectors.double()
    basis = torch.linalg.qr((train - train.mean(0)).T).Q  # [D, 6] spans the centred training set
    residual = (samples - train.mean(0)) - ((samples - train.mean(0)) @ basis) @ basis.T
    assert residual.abs().max() < 1e-4
    # Nearest references as reported are the argmax-PSNR over independently re-rendered galleries.
    body, views = load_body(), gallery_views(load_body(), GALLERY)
    first = render_avatar(load_avatar(row["files"][0], body), views)[0]
    refs = [render_avatar(load_avatar(p, body), views)[0] for p in sorted(ref.glob("*.hda.safetensors"))]
    scores = [float(psnr(first, r)) for r in refs]
    assert row["samples"][0]["nearest_reference"] == f"subj_{int(np.argmax(scores))}"
    assert row["samples"][0]["nearest_psnr_db"] == pytest.approx(max(scores), abs=1e-3)
    # Without a separate training set the nearest training subject is the nearest reference.
    assert row["samples"][0]["nearest_training"] == row["samples"][0]["nearest_reference"]


def test_eval_gen_model_samples_beside_their_nearest_training_subjects(evaluated, tmp_path):
    """<model>_vs_nearest_training.png: every sample of a model row beside its nearest training subject
    (argmax PSNR over independently rendered galleries); only model rows get one."""
    ref, out, report, _ = evaluated
    row = next(r for r in report["rows"] if r["name"] == "diff")
    body, views = load_body(), gallery_views(load_body(), GALLERY)
    refs = [render_avatar(load_avatar(p, body), views)[0] for p in sorted(ref.glob("*.hda.safetensors"))]
    for i, sample in enumerate(row["samples"]):
        image = render_avatar(load_avatar(row["files"][i], body), views)[0]
        scores = [float(psnr(image, r)) for r in refs]
        assert sample["nearest_training"] == f"subj_{int(np.argmax(scores))}"
        assert sample["nearest_training_psnr_db"] == pytest.approx(max(scores), abs=1e-3)
    sheet = Image.open(out / "diff_vs_nearest_training.png")
    zoom = -(-eval_gen.SHEET_TILE // GALLERY.size)
    assert sheet.width >= 2 * eval_gen.TRAINING_SHEET_PAIRS * GALLERY.size * zoom
    assert sorted(p.name for p in out.glob("*_vs_nearest_training.png")) == ["diff_vs_nearest_training.png"]


def test_eval_gen_writes_table_sheet_and_sample_files(evaluated):
    _, out, report, _ = evaluated
    table = (out / "eval_gen.md").read_text()
    assert "| copy (baseline, 6) | 100.00 | 100.0 | 0.0 |" in table
    assert "FID/KID off" in table and "## Protocol" in table
    sheet = Image.open(out / "samples_vs_nearest.png")
    assert sheet.size[0] == 12 * 144 and sheet.size[1] == 5 * (144 + 14)  # 5 rows of 6 pairs, tiles zoomed 3x
    assert "| 0.0 | 1.00 (" in table  # the copy row's colour FD and colourfulness ratio
    # A report written before the colour columns existed (a resumed build's eval) still formats.
    old = json.loads(json.dumps(report))
    for row in old["rows"]:
        for key in ("colour_fd", "colourfulness", "colourfulness_ratio", "sharpness_ratio", "precision", "recall"):
            del row[key]
    assert "| — | — (—) | — | — | — |" in format_table(old)
    files = sorted((out / "samples" / "copy").glob("*.hda.safetensors"))
    assert len(files) == 6
    meta, _ = read_avatar_file(files[0])
    assert meta["origin"].startswith("baseline:copy:")


def run_error(args, capsys):
    code = main(["eval-gen", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("hda: error:") and "\n" not in err, err
    return err


def test_eval_gen_bad_inputs(tmp_path, capsys):
    ref = write_reference(tmp_path / "ref", count=3)
    out = ["--out", str(tmp_path / "out")]
    (tmp_path / "empty").mkdir()
    assert "no avatar files" in run_error(["--reference", str(tmp_path / "empty"), *out, *ARGS], capsys)
    assert "--n 0" in run_error(["--reference", str(ref), "--n", "0", *out, *ARGS], capsys)
    assert "--n 5000" in run_error(["--reference", str(ref), "--n", "5000", *out, *ARGS], capsys)
    err = run_error(["--reference", str(ref), "--model", f"m={tmp_path / 'nope.safetensors'}", *out, *ARGS], capsys)
    assert "diffusion model file not found" in err
    assert "NAME=PATH" in run_error(["--reference", str(ref), "--samples", "nodir", *out, *ARGS], capsys)
    assert "given twice" in run_error(["--reference", str(ref), "--samples", f"a={ref}", "--samples", f"a={ref}",
                                       *out, *ARGS], capsys)
    assert "--steps 0" in run_error(["--reference", str(ref), "--steps", "0", *out, *ARGS], capsys)
    assert "nothing to evaluate" in run_error(["--reference", str(ref), "--baselines", "none", *out, *ARGS], capsys)
    assert "baseline 'gan'" in run_error(["--reference", str(ref), "--baselines", "copy,gan", *out, *ARGS], capsys)
    assert "clip@phase" in run_error(["--reference", str(ref), *out, "--preset", "tiny", "--poses", "fly@2"], capsys)
    # Another architecture in the reference folder, and as a samples row.
    other = tmp_path / "other"
    other.mkdir()
    config = load_config("tiny")
    wide = Avatar.from_init(load_body(), config.uv.res, UNetConfig(width=8, levels=2), config.gaussians, seed=0)
    save_avatar(wide, other / "wide.hda.safetensors")
    err = run_error(["--reference", str(ref), "--samples", f"w={other}", *out, *ARGS], capsys)
    assert "field 'unet'" in err and "wide.hda.safetensors" in err
    save_avatar(wide, ref / "zz_wide.hda.safetensors")
    assert "field 'unet'" in run_error(["--reference", str(ref), *out, *ARGS], capsys)
    (ref / "zz_wide.hda.safetensors").unlink()
    # A NaN weight in an avatar file.
    meta, tensors = read_avatar_file(ref / "subj_0.hda.safetensors")
    tensors["outc.bias"][0] = float("nan")
    save_file(tensors, str(ref / "subj_0.hda.safetensors"), metadata=meta)
    assert "NaN" in run_error(["--reference", str(ref), *out, *ARGS], capsys)
    # A truncated file.
    (ref / "subj_0.hda.safetensors").write_bytes(b"\x00" * 7)
    assert "subj_0" in run_error(["--reference", str(ref), *out, *ARGS], capsys)


def test_eval_gen_model_row_samples_through_the_diffusion_model(evaluated):
    _, _, report, direct = evaluated
    row = next(r for r in report["rows"] if r["name"] == "diff")
    assert row["kind"] == "model" and row["count"] == 6 and row["seconds_per_identity"] > 0
    # The row's files are the model's own samples: the same seeds give the same weights bit for bit.
    mine = load_weight_set([Path(f) for f in row["files"]])
    theirs = load_weight_set(direct)
    assert torch.equal(mine.vectors, theirs.vectors)
    assert 0.0 <= row["one_nna_psnr"] <= 1.0 and 0.0 < row["cov_psnr"] <= 1.0
    assert len(row["samples"]) == 6 and all("ok" in s["plausible"] for s in row["samples"])


def test_eval_gen_held_out_reference_with_injected_lpips_and_features(tmp_path):
    """A held-out split (--train), and the LPIPS / FID / KID columns with injected stand-ins for the nets."""

    all_refs = write_reference(tmp_path / "all", count=6)
    train, held = tmp_path / "train", tmp_path / "held"
    train.mkdir()
    held.mkdir()
    for i, path in enumerate(sorted(all_refs.glob("*.hda.safetensors"))):
        path.rename((train if i < 3 else held) / path.name)

    def lpips(x, y):  # [V,3,H,W] pairs -> mean distance, like LPIPS' call
        return (x - y).abs().mean()

    def features(images):  # [N,H,W,3] -> [N,4]
        return np.concatenate([images.mean(axis=(1, 2)), (images ** 2).mean(axis=(1, 2, 3))[:, None]], axis=1)

    config = EvalGenConfig(baselines=("copy",), gallery=GALLERY)
    body = load_body()
    report = evaluate_generation(held, tmp_path / "out", body, train=train, config=config, lpips=lpips,
                                 inception=features, progress=False)
    row = report["rows"][0]
    assert report["train"]["count"] == 3 and not report["train"]["same_as_reference"]
    # Copies of the training avatars: zero novelty against the training set ...
    assert row["novelty_image"]["median_ratio"] == 0.0 and row["novelty_weight"]["copy_fraction"] == 1.0
    # ... but not copies of the held-out references.
    assert row["mmd_psnr_db"] < 60.0 and row["one_nna_psnr"] > 0.0
    views = gallery_views(body, GALLERY)

    def gallery(folder):
        return torch.stack([render_avatar(load_avatar(p, body), views)[0]
                            for p in sorted(folder.glob("*.hda.safetensors"))])

    gen = torch.stack([render_avatar(load_avatar(Path(f), body), views)[0] for f in row["files"]])
    ref = gallery(held)
    lp = np.array([[1000 * float((g - r).abs().mean()) for r in ref] for g in gen])
    assert row["mmd_lpips"] == pytest.approx(lp.min(axis=0).mean(), rel=1e-5)
    assert row["cov_lpips"] == pytest.approx(len(set(lp.argmin(axis=1))) / 3)
    fg, fr = features(gen.flatten(0, 1).numpy()), features(ref.flatten(0, 1).numpy())
    assert row["fid"] == pytest.approx(metrics.fid(fg, fr), rel=1e-5)
    assert row["kid"] == pytest.approx(metrics.kid(fg, fr, config.kid)[0], rel=1e-5)
    # Against the training set the copies are copies: memorisation in every column, and no "no copies".
    t = row["vs_train"]
    assert (t["mmd_psnr_db"], t["cov_psnr"], t["one_nna_psnr"]) == (100.0, 1.0, 0.0)
    assert (t["precision"], t["recall"]) == (1.0, 1.0)
    assert t["pr_k"] == 2 and row["nearest_train_rms"] == 0.0 and not row["no_copies"]
    # Colour FD and precision/recall against the held-out set, from independently rendered galleries.
    def stats(files):
        out = []
        for f in files:
            rgb, alpha, labels = render_avatar_parts(load_avatar(Path(f), body), views)
            out.append(image_stats.avatar_stats(rgb.numpy(), alpha.numpy(), labels.numpy(), GALLERY.background))
        return out

    sg, sr = stats(row["files"]), stats(sorted(held.glob("*.hda.safetensors")))
    fg, fr = np.stack([s.features for s in sg]), np.stack([s.features for s in sr])
    cols = image_stats.MEAN_COLOUR_COLUMNS
    assert row["colour_fd"] == pytest.approx(max(0.0, metrics.fid(255 * fg[:, cols], 255 * fr[:, cols])), rel=1e-6)
    want = metrics.precision_recall(image_stats.standardise(fr, fr), image_stats.standardise(fg, fr), 2)
    assert (row["precision"], row["recall"]) == pytest.approx(want)
    assert row["colourfulness_ratio"] == pytest.approx(np.mean([s.colourfulness for s in sg])
                                                       / np.mean([s.colourfulness for s in sr]), rel=1e-6)
    assert row["sharpness_ratio"] == pytest.approx(np.mean([s.sharpness for s in sg])
                                                   / np.mean([s.sharpness for s in sr]), rel=1e-6)
    # The held-out subjects themselves against the training set (the scale for the memorisation table),
    # by brute force over independently rendered galleries: RMS over views, pixels and channels.
    held_gallery, train_gallery = gallery(held), gallery(train)
    rms_ht = np.array([[math.sqrt(float(((h - t) ** 2).mean())) for t in train_gallery] for h in held_gallery])
    rms_tt = np.array([[math.sqrt(float(((a - b) ** 2).mean())) if i != j else np.inf
                        for j, b in enumerate(train_gallery)] for i, a in enumerate(train_gallery)])
    real = report["held_out_vs_train"]
    assert real["nearest_train_rms"] == pytest.approx(rms_ht.min(), rel=1e-4)
    assert real["closest_train_pair_rms"] == pytest.approx(rms_tt.min(), rel=1e-4)
    assert real["no_copies"] == bool(rms_ht.min() >= rms_tt.min())
    assert real["novelty_image"]["copy_fraction"] == pytest.approx((rms_ht.min(axis=1) < rms_tt.min()).mean())
    assert real["novelty_image"]["median_ratio"] == pytest.approx(
        np.median(rms_ht.min(axis=1)) / np.median(rms_tt.min(axis=1)), rel=1e-4)
    psnr_ht = -20 * np.log10(np.maximum(rms_ht, 1e-5))
    assert real["vs_train"]["mmd_psnr_db"] == pytest.approx(psnr_ht.max(axis=0).mean(), abs=1e-3)
    assert real["vs_train"]["cov_psnr"] == pytest.approx(len(set(psnr_ht.argmax(axis=1))) / 3)
    table = (tmp_path / "out" / "eval_gen.md").read_text()
    assert "MMD-LPIPS" in table and "KID×1000" in table and "held-out" in table
    assert "## Against the training set (memorisation)" in table and "| **no** |" in table
    assert "| held-out subjects (real people, 3) |" in table


def test_eval_gen_seed_sets_match_separately_sampled_and_rendered_sets(evaluated, tmp_path, capsys):
    ref, out, _, _ = evaluated
    model = out.parent / "diff.safetensors"
    body = load_body()
    config = EvalGenConfig(n=3, seed=0, steps=5, seed_sets=3, baselines=(), gallery=GALLERY)
    report = evaluate_generation(ref, tmp_path / "out", body, models={"diff": model}, config=config, progress=False)
    row = report["rows"][0]
    assert [s["seed"] for s in row["seed_sets"]] == [0, 3, 6]
    assert {k: row["seed_sets"][0][k] for k in ("mmd_psnr_db", "cov_psnr", "one_nna_psnr")} == {
        k: row[k] for k in ("mmd_psnr_db", "cov_psnr", "one_nna_psnr")}
    views = gallery_views(body, GALLERY)

    def gallery(files):
        return torch.stack([render_avatar(load_avatar(Path(f), body), views)[0] for f in files])

    def distance(a, b):  # -PSNR of the MSE pooled over views, pixels and channels, by hand
        mse = np.array([[float(((x - y) ** 2).mean()) for y in b] for x in a])
        return 10 * np.log10(np.maximum(mse, 1e-10))

    r = gallery(sorted(ref.glob("*.hda.safetensors")))
    for s in row["seed_sets"]:
        g = gallery(sample_avatars(model, seed=s["seed"], n=3, steps=5, out_dir=tmp_path / f"direct{s['seed']}"))
        d_gr, d_gg, d_rr = distance(g, r), distance(g, g), distance(r, r)
        assert s["mmd_psnr_db"] == pytest.approx(-d_gr.min(axis=0).mean(), abs=1e-4)
        assert s["cov_psnr"] == pytest.approx(len(set(d_gr.argmin(axis=1))) / r.shape[0])
        assert s["one_nna_psnr"] == pytest.approx(metrics.one_nna(d_gg, d_gr, d_rr))
    assert row["seed_sets"][1]["mmd_psnr_db"] != row["seed_sets"][2]["mmd_psnr_db"]  # different samples
    assert "## Seed sets" in (tmp_path / "out" / "eval_gen.md").read_text()
    code = main(["eval-gen", "--reference", str(ref), "--model", f"diff={model}", "--n", "6", "--seed-sets", "500",
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--seed-sets 500: expected 1.." in err


def test_layer_span_projection_matches_least_squares_per_layer():
    rng = np.random.default_rng(5)
    layers = [slice(0, 7), slice(7, 9), slice(9, 20)]
    train, vectors = rng.normal(size=(5, 20)), rng.normal(size=(3, 20))
    got = metrics.layer_span_projection(vectors, train, layers)
    for s in layers:
        mean = train[:, s].mean(0)
        for i, v in enumerate(vectors):  # the nearest point of the layer's affine span, by least squares
            coef = np.linalg.lstsq((train[:, s] - mean).T, v[s] - mean, rcond=None)[0]
            np.testing.assert_allclose(got[i, s], mean + (train[:, s] - mean).T @ coef, atol=1e-12)
    # A training avatar is its own projection; so is a mix of two avatars' layers (per layer, not as a
    # whole: span_measures puts that mix off the whole-vector span).
    mix = np.concatenate([train[0, :7], train[3, 7:9], train[1, 9:]])
    np.testing.assert_allclose(metrics.layer_span_projection(np.vstack([train[2], mix]), train, layers),
                               np.vstack([train[2], mix]), atol=1e-12)
    assert metrics.span_measures(mix[None], train).off_span[0] > 0.1
    # By hand: training points (0, 0), (2, 0) span the x axis through (1, 0); (5, 3) lands on (5, 0);
    # with the coordinates as two layers of one value, the second layer has no spread: its mean, 0.
    hand = np.array([[0.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(metrics.layer_span_projection(np.array([[5.0, 3.0]]), hand, [slice(0, 2)]),
                               [[5.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(metrics.layer_span_projection(np.array([[5.0, 3.0]]), hand,
                                                             [slice(0, 1), slice(1, 2)]), [[5.0, 0.0]], atol=1e-12)
    with pytest.raises(HDAError, match=r"expected \[M, D\] and \[N >= 2, D\]"):
        metrics.layer_span_projection(vectors, train[:1], layers)

"""Generation metrics (paper §5.1): MMD, COV, 1-NNA on distance matrices; FID, KID, improved precision and
recall on features; novelty.

Pure functions on numpy arrays. Distances follow one convention: smaller = closer. A similarity such as
PSNR is negated before it comes here (see :mod:`.gallery`), as HyperDiffusion's evaluation code does, so
MMD on D = -PSNR is minus the paper's MMD_PSNR (which is reported as a PSNR, higher = better).

Notation: S_g the generated set (|S_g| = G), S_r the reference set (|S_r| = R). A matrix ``d_gr`` [G,R]
holds D(X, Y) for X in S_g, Y in S_r; ``d_gg`` [G,G] and ``d_rr`` [R,R] are the within-set distances.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..errors import HDAError


def _matrix(name: str, d, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise HDAError(f"{name}: shape {d.shape}, expected a non-empty 2D distance matrix")
    if (rows is not None and d.shape[0] != rows) or (cols is not None and d.shape[1] != cols):
        raise HDAError(f"{name}: shape {d.shape}, expected ({rows}, {cols})")
    if not np.isfinite(d).all():
        raise HDAError(f"{name}: contains NaN or inf, expected finite distances")
    return d


def mmd(d_gr: np.ndarray) -> float:
    """Minimum matching distance: MMD(S_g, S_r) = 1/R · Σ_{Y∈S_r} min_{X∈S_g} D(X, Y).

    d_gr: [G,R]. How close the generated set comes to every reference sample (fidelity).
    """
    d = _matrix("d_gr", d_gr)
    return float(d.min(axis=0).mean())


def coverage(d_gr: np.ndarray) -> float:
    """Coverage: COV(S_g, S_r) = |{argmin_{Y∈S_r} D(X, Y) : X ∈ S_g}| / R.

    d_gr: [G,R]. The fraction of reference samples that are the nearest reference of at least one
    generated sample (diversity). A tie picks the lowest reference index (numpy's argmin).
    """
    d = _matrix("d_gr", d_gr)
    return float(np.unique(d.argmin(axis=1)).size / d.shape[1])


def one_nna(d_gg: np.ndarray, d_gr: np.ndarray, d_rr: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy over S_g ∪ S_r (the paper's 1-NNA; 0.5 is ideal).

    d_gg: [G,G], d_gr: [G,R], d_rr: [R,R].

    Protocol: every sample Z of the union is classified by its nearest neighbour N_Z among all other
    samples of the union (Z itself excluded, so its zero self-distance never counts; other samples at
    distance 0, e.g. exact copies, do count). The prediction is correct when N_Z comes from Z's own set.
    1-NNA = (Σ_{X∈S_g} 1[N_X ∈ S_g] + Σ_{Y∈S_r} 1[N_Y ∈ S_r]) / (G + R).

    Ties: when several samples share the minimum distance exactly, the classifier picks one of them
    uniformly at random, and Z contributes its expected correctness (the fraction of the tied
    neighbours that share Z's set) instead of an arbitrary index-order choice.

    Reading it: 0.5 means the sets are indistinguishable; 1.0 means they are separated (mode collapse
    or poor samples); far below 0.5 means each sample's nearest neighbour lies in the other set, e.g.
    generated samples that copy reference samples one to one (exact copies give 0).
    """
    g = _matrix("d_gg", d_gg).shape[0]
    r = _matrix("d_rr", d_rr).shape[0]
    _matrix("d_gg", d_gg, g, g)
    _matrix("d_rr", d_rr, r, r)
    _matrix("d_gr", d_gr, g, r)
    if g + r < 2:
        raise HDAError("1-NNA: needs at least two samples in S_g ∪ S_r")
    full = np.block([[np.asarray(d_gg, np.float64), np.asarray(d_gr, np.float64)],
                     [np.asarray(d_gr, np.float64).T, np.asarray(d_rr, np.float64)]])
    np.fill_diagonal(full, np.inf)
    labels = np.concatenate([np.zeros(g, bool), np.ones(r, bool)])
    nearest = full.min(axis=1, keepdims=True)
    tied = full == nearest  # [G+R, G+R]: the neighbours at the minimum distance
    same = (tied & (labels[None, :] == labels[:, None])).sum(axis=1)
    return float((same / tied.sum(axis=1)).mean())


# ---------------------------------------------------------------------------------------------------
# FID and KID on features


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½).

    mu1, mu2: [F]; sigma1, sigma2: [F,F] symmetric positive semi-definite. Tr((S1 S2)^½) is computed as
    Σ sqrt(eig(S1^½ S2 S1^½)), the same spectrum as S1 S2 but of a symmetric matrix, so it stays real and
    stable when the covariances are rank deficient (fewer samples than features).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * cross)


def _features(name: str, f, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < min_rows or f.shape[1] < 1:
        raise HDAError(f"{name}: shape {f.shape}, expected [N >= {min_rows}, F >= 1] features")
    if not np.isfinite(f).all():
        raise HDAError(f"{name}: contains NaN or inf, expected finite features")
    return f


def fid(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet Inception Distance between feature sets feat_a [Na,F] and feat_b [Nb,F] (Heusel et al.).

    Each set is summarised by its mean and unbiased covariance (N-1 denominator), then
    :func:`frechet_distance`. With fewer samples than features the covariances are rank deficient and
    FID is biased upwards; compare FIDs only at equal sample counts.
    """
    a, b = _features("FID features a", feat_a), _features("FID features b", feat_b)
    if a.shape[1] != b.shape[1]:
        raise HDAError(f"FID: feature widths differ ({a.shape[1]} vs {b.shape[1]}), expected equal")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1]),
                            b.mean(0), np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1]))


@dataclass(frozen=True)
class KIDConfig:
    subsets: int = 100  # random subsets averaged (stylegan2-ada / torchmetrics default)
    subset_size: int = 1000  # clipped to the smaller set, see :func:`kid`
    degree: int = 3  # polynomial kernel k(x, y) = (x·y / F + coef)^degree
    coef: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD² estimate with the kernel k(a, b) = (a·b / F + coef)^degree.

    x: [m,F], y: [n,F] (m, n >= 2). MMD²_u = Σ_{i≠j} k(x_i,x_j)/(m(m-1)) + Σ_{i≠j} k(y_i,y_j)/(n(n-1))
    - 2 Σ_{i,j} k(x_i,y_j)/(m n).
    """
    f = x.shape[1]
    kxx = (x @ x.T / f + coef) ** degree
    kyy = (y @ y.T / f + coef) ** degree
    kxy = (x @ y.T / f + coef) ** degree
    m, n = x.shape[0], y.shape[0]
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kid(feat_a: np.ndarray, feat_b: np.ndarray, config: KIDConfig = KIDConfig()) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al.): (mean, std) of the unbiased polynomial-kernel MMD²
    over ``config.subsets`` random subsets.

    feat_a: [Na,F], feat_b: [Nb,F]. Each subset draws s = min(subset_size, Na, Nb) rows of each set
    without replacement from a generator seeded with ``config.seed``, so the subset size never exceeds
    the number of samples (torchmetrics' default of 1000 would fail on the paper's 500). When s equals
    both set sizes every subset is the full set and the result is the plain unbiased estimate.
    """
    a, b = _features("KID features a", feat_a), _features("KID features b", feat_b)
    if a.shape[1] != b.shape[1]:
        raise HDAError(f"KID: feature widths differ ({a.shape[1]} vs {b.shape[1]}), expected equal")
    if config.subsets < 1 or config.subset_size < 2 or config.degree < 1:
        raise HDAError(f"KID config {config}: expected subsets >= 1, subset_size >= 2, degree >= 1")
    size = min(config.subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(config.seed)
    values = []
    for _ in range(config.subsets):
        ia = rng.choice(a.shape[0], size, replace=False)
        ib = rng.choice(b.shape[0], size, replace=False)
        values.append(polynomial_mmd2_unbiased(a[ia], b[ib], config.degree, config.coef))
    return float(np.mean(values)), float(np.std(values))


FeatureExtractor = Callable[[np.ndarray], np.ndarray]
"""images [N,H,W,3] float in [0,1] -> features [N,F]; e.g. :func:`.gallery.load_inception`."""


# ---------------------------------------------------------------------------------------------------
# Improved precision and recall


def _distances(a: np.ndarray, b: np.ndarray, rows: int = 64) -> np.ndarray:
    """[Na,Nb] Euclidean distances from differences (exact zeros and ties, unlike the expanded square)."""
    return np.concatenate([np.linalg.norm(a[i:i + rows, None] - b[None], axis=-1)
                           for i in range(0, a.shape[0], rows)])


def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """[N] distance from each point to its k-th nearest other point of the same set."""
    d = _distances(points, points)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake [G,F] against real [R,F] features.

    Each set's manifold is the union of balls around its points, a point's radius being the distance to
    its k-th nearest neighbour in its own set (itself excluded, other duplicates counted).
    precision = the fraction of fake points inside the real manifold (fidelity: samples look like data);
    recall = the fraction of real points inside the fake manifold (diversity: the data is covered).
    A point on a ball's boundary is inside. Needs k < G and k < R.
    """
    real, fake = _features("precision/recall real", real), _features("precision/recall fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise HDAError(f"precision/recall: feature widths differ ({real.shape[1]} vs {fake.shape[1]}), expected equal")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise HDAError(f"precision/recall: k={k} with {real.shape[0]} real and {fake.shape[0]} fake points, "
                       "expected 1 <= k < both set sizes")
    d = _distances(fake, real)  # [G,R]
    precision = (d <= _knn_radii(real, k)[None, :]).any(axis=1).mean()
    recall = (d <= _knn_radii(fake, k)[:, None]).any(axis=0).mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------------
# Novelty


@dataclass(frozen=True)
class Novelty:
    """How far generated samples are from their nearest training sample, on the training set's own scale.

    ratios: [G] per-sample nearest-training distance / median train-train nearest-neighbour distance;
    median_ratio: median of ratios (≈0 for copies, ≈1 for samples as far from the training set as
    training subjects are from each other); copy_fraction: fraction of samples closer to some training
    sample than the closest pair of distinct training samples are to each other; train_nn_median and
    train_nn_min: the training set's own scale.
    """

    ratios: np.ndarray
    median_ratio: float
    copy_fraction: float
    train_nn_median: float
    train_nn_min: float

    def summary(self) -> dict:
        return {"median_ratio": self.median_ratio, "copy_fraction": self.copy_fraction,
                "train_nn_median": self.train_nn_median, "train_nn_min": self.train_nn_min}


def novelty(d_gt: np.ndarray, d_tt: np.ndarray) -> Novelty:
    """Novelty of generated samples against the training set.

    d_gt: [G,T] non-negative distances from each generated sample to each training sample; d_tt: [T,T]
    training-training distances (T >= 2; the diagonal is ignored). Let n(X) = min_t d_gt[X,t] and
    m(t) = min_{t'≠t} d_tt[t,t']. ratio(X) = n(X) / median_t m(t); a sample is a "copy" when
    n(X) < min_t m(t), i.e. it is nearer a training subject than any two training subjects are.
    The distance must be non-negative with 0 for identical inputs (an L2 or RMS distance, not -PSNR).
    """
    t = _matrix("d_tt", d_tt).shape[0]
    if t < 2:
        raise HDAError("novelty: the training set has one sample, expected at least 2")
    _matrix("d_tt", d_tt, t, t)
    d_gt = _matrix("d_gt", d_gt, None, t)
    d_tt = np.asarray(d_tt, np.float64).copy()
    if (d_gt < 0).any() or (d_tt < 0).any():
        raise HDAError("novelty: negative distances, expected a non-negative distance (L2 or RMS)")
    np.fill_diagonal(d_tt, np.inf)
    train_nn = d_tt.min(axis=1)
    scale = float(np.median(train_nn))
    nearest = d_gt.min(axis=1)
    ratios = nearest / scale if scale > 0 else np.where(nearest > 0, np.inf, 0.0)
    return Novelty(ratios, float(np.median(ratios)), float((nearest < train_nn.min()).mean()), scale,
                   float(train_nn.min()))


@dataclass(frozen=True)
class SpanMeasures:
    """Where generated weight vectors lie relative to the training set (one value per sample, [G] each).

    - ``in_span``: the length of the sample's component inside the training set's affine span (from the
      mean), over the set's RMS spread: the training avatars are about 1, samples collapsed onto the mean 0;
    - ``off_span``: the sample's distance to that span over the same spread: 0 on the span, about 1 as far
      off as a typical avatar is from the mean;
    - ``nn_ratio``: the distance to the nearest training vector over the median nearest-neighbour distance
      within the training set: about 0 for copies, about 1 as novel as the training avatars are among
      themselves.
    """

    in_span: np.ndarray
    off_span: np.ndarray
    nn_ratio: np.ndarray


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0))


def span_measures(samples: np.ndarray, train: np.ndarray) -> SpanMeasures:
    """samples: [G, D], train: [N, D] (N >= 2, not all equal) weight vectors -> :class:`SpanMeasures`.

    With m the training mean, spread = mean_n |x_n - m|², P the orthogonal projector onto the span of
    {x_n - m} (directions of singular value above the usual rank tolerance): in_span = |P(s - m)| /
    sqrt(spread), off_span = |(I - P)(s - m)| / sqrt(spread), nn_ratio = min_n |s - x_n| / median_n
    min_{k != n} |x_n - x_k|.
    """
    s = np.atleast_2d(np.asarray(samples, np.float64))
    x = np.atleast_2d(np.asarray(train, np.float64))
    if x.shape[0] < 2 or s.shape[0] < 1 or s.shape[1] != x.shape[1]:
        raise HDAError(f"span measures: samples {s.shape} and training set {x.shape}, expected [G, D] and "
                       "[N >= 2, D]")
    if not (np.isfinite(s).all() and np.isfinite(x).all()):
        raise HDAError("span measures: NaN or inf in the weight vectors")
    mean = x.mean(0)
    centred = x - mean
    spread = (centred ** 2).sum(1).mean()
    if spread <= 0:
        raise HDAError("span measures: the training vectors are all equal, expected a spread")
    u, sv, _ = np.linalg.svd(centred.T, full_matrices=False)  # u: [D, N], the span's directions
    basis = u[:, sv > sv.max() * max(centred.shape) * np.finfo(np.float64).eps]
    offset = s - mean
    inside = offset @ basis
    within = _pairwise(x, x)
    np.fill_diagonal(within, np.inf)
    train_nn = np.median(within.min(1))
    return SpanMeasures(in_span=np.linalg.norm(inside, axis=1) / np.sqrt(spread),
                        off_span=np.linalg.norm(offset - inside @ basis.T, axis=1) / np.sqrt(spread),
                        nn_ratio=_pairwise(s, x).min(1) / train_nn)


def layer_span_projection(vectors: np.ndarray, train: np.ndarray, layers: list[slice]) -> np.ndarray:
    """vectors: [M, D], train: [N >= 2, D] -> [M, D]: each vector's nearest point, layer by layer, of the
    training set's affine span (each ``layers`` slice projected on its own, so layers may take different
    training avatars' mixtures, as a layer-token model's per-layer linear decoders can).

    The closest a generator whose every layer decodes linearly into the span of the training weights can
    come to a vector (README, Default model: the span ceiling). Distances are Euclidean in the given
    coordinates, so pass normalised weights for the diffusion model's metric.
    """
    v = np.atleast_2d(np.asarray(vectors, np.float64))
    x = np.atleast_2d(np.asarray(train, np.float64))
    if x.shape[0] < 2 or v.shape[1] != x.shape[1]:
        raise HDAError(f"layer span projection: vectors {v.shape} and training set {x.shape}, expected [M, D] "
                       "and [N >= 2, D]")
    if not (np.isfinite(v).all() and np.isfinite(x).all()):
        raise HDAError("layer span projection: NaN or inf in the weight vectors")
    out = np.empty_like(v)
    for s in layers:
        mean = x[:, s].mean(0)
        centred = x[:, s] - mean
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)  # vt: [N, n], the span's directions as rows
        basis = vt[sv > sv.max(initial=0.0) * max(centred.shape) * np.finfo(np.float64).eps]
        out[:, s] = mean + ((v[:, s] - mean) @ basis.T) @ basis
    return out


@dataclass(frozen=True)
class BasisMeasures:
    """Samples of a weight set of known structure, x = base + c·B with c ~ N(0, I_r) (scripts/diffusion_study.py).

    Each sample's coefficients are recovered layer by layer (least squares on that layer's rows of B), since a
    layer-token model could give each layer its own person. One value per sample, [G] each:

    - ``norm``: mean over layers of |ĉ_l|² / r: about 1 for a new person (c ~ N(0, I)), 1/2 for the midpoint
      of two training people, 0 for the mean;
    - ``agreement``: |mean_l ĉ_l|² / mean_l |ĉ_l|²: 1 when every layer carries the same person, about 1/L
      when the layers are independent draws;
    - ``nn``: the distance from ĉ = mean_l ĉ_l to the nearest training coefficient vector, over the same
      for fresh N(0, I) draws (median): about 1 new, 0 copies;
    - ``segment``: the distance from ĉ to the nearest segment between two training coefficient vectors,
      over the same for fresh draws (median): about 1 new, 0 for a blend of two training people.
    """

    norm: np.ndarray
    agreement: np.ndarray
    nn: np.ndarray
    segment: np.ndarray


def _segment_distance(c: np.ndarray, train: np.ndarray) -> np.ndarray:
    """c: [G, r], train: [N, r] -> [G]: min over pairs i < j of the distance to the segment [train_i, train_j]."""
    a = train[:, None, :]  # [N, 1, r]
    ab = train[None, :, :] - a  # [N, N, r]
    length2 = np.maximum((ab * ab).sum(-1), 1e-300)
    out = np.empty(len(c))
    for g, point in enumerate(c):
        s = np.clip(((point - a) * ab).sum(-1) / length2, 0.0, 1.0)
        out[g] = np.sqrt((((a + s[..., None] * ab) - point) ** 2).sum(-1)).min()
    return out


def basis_measures(samples: np.ndarray, base: np.ndarray, directions: np.ndarray, train_coefs: np.ndarray,
                   layers: list[slice], seed: int = 0) -> BasisMeasures:
    """samples [G, D]; base [D]; directions B [r, D]; train_coefs [N, r] (N >= 2); layers: the D-slices of
    the layers (each at least r long) -> :class:`BasisMeasures`. ``seed`` draws the 256 fresh N(0, I)
    coefficient vectors that set the scale of ``nn`` and ``segment``."""
    s = np.atleast_2d(np.asarray(samples, np.float64)) - np.asarray(base, np.float64)
    b = np.asarray(directions, np.float64)
    c_train = np.asarray(train_coefs, np.float64)
    r = b.shape[0]
    if b.shape[1] != s.shape[1] or c_train.ndim != 2 or c_train.shape[1] != r or len(c_train) < 2:
        raise HDAError(f"basis measures: samples {s.shape}, directions {b.shape}, training coefficients "
                       f"{c_train.shape}, expected [G, D], [r, D], [N >= 2, r]")
    if any(sl.stop - sl.start < r for sl in layers):
        raise HDAError(f"basis measures: a layer has fewer than r = {r} values; expected every layer >= r")
    per_layer = np.stack([np.linalg.lstsq(b[:, sl].T, s[:, sl].T, rcond=None)[0].T for sl in layers])  # [L, G, r]
    norm = (per_layer ** 2).sum(-1).mean(0) / r
    c = per_layer.mean(0)
    agreement = (c ** 2).sum(-1) / np.maximum((per_layer ** 2).sum(-1).mean(0), 1e-300)
    fresh = np.random.default_rng(seed).standard_normal((256, r))
    nn = _pairwise(c, c_train).min(1) / np.median(_pairwise(fresh, c_train).min(1))
    segment = _segment_distance(c, c_train) / np.median(_segment_distance(fresh, c_train))
    return BasisMeasures(norm=norm, agreement=agreement, nn=nn, segment=segment)

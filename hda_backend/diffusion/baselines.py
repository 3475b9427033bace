"""Reference generators with a diffusion model's output interface: N weight vectors [N, D] from a seed.

- ``copy``: training avatars drawn at random, the memorisation reference. A perfect-fidelity,
  zero-novelty generator: it scores the best possible MMD/COV against its own training set while its
  1-NNA falls far below 50%, which is what a model that memorised its training set looks like.
- ``pca``: a Gaussian in weight space. PCA of the training vectors (rank <= N-1 for N vectors), each
  component's coefficient drawn from N(0, observed variance), reconstructed. It only works because
  every fit starts from the same initialisation (weights of different subjects are aligned); it is the
  simplest generative model a diffusion model has to beat.
- ``blend``: the average of two distinct training avatars drawn at random: what a model that only
  interpolates between subjects produces. A new person has to beat it on colour fidelity and precision.
"""

from __future__ import annotations

import torch

from ..constants import MAX_SAMPLES
from ..errors import HDAError

BASELINES = ("copy", "pca", "blend")


def _check(train: torch.Tensor, n: int, min_rows: int) -> None:
    if train.ndim != 2 or train.shape[0] < min_rows:
        raise HDAError(f"baseline training vectors: shape {tuple(train.shape)}, expected [N >= {min_rows}, D]")
    if not torch.isfinite(train).all():
        raise HDAError("baseline training vectors: contain NaN/inf, expected finite weights")
    if not 1 <= n <= MAX_SAMPLES:
        raise HDAError(f"baseline samples n={n}: expected 1..{MAX_SAMPLES}")


def copy_indices(num_train: int, n: int, seed: int) -> torch.Tensor:
    """[n] training indices: concatenated random permutations of 0..num_train-1, so no subject repeats
    before every subject has been drawn once."""
    gen = torch.Generator().manual_seed(int(seed))
    rounds = -(-n // num_train)
    return torch.cat([torch.randperm(num_train, generator=gen) for _ in range(rounds)])[:n]


def copy_samples(train: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """train: [N,D] -> (samples [n,D], source indices [n]): exact copies of random training avatars."""
    _check(train, n, 1)
    index = copy_indices(train.shape[0], n, seed)
    return train[index].clone(), index


def fit_pca(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """train: [N,D] -> (mean [D], components [r,D] orthonormal rows, variances [r]).

    r = the number of singular values of the centred data above 1e-6 of the largest (at most N-1);
    variances are the coefficients' unbiased variances S²/(N-1). Computed in float64.
    """
    x = train.double()
    mean = x.mean(0)
    centred = x - mean
    # The N×N Gram matrix instead of an SVD of [N, D]: D is up to ~600k, N a few dozen or hundreds.
    gram = centred @ centred.T
    eigvals, eigvecs = torch.linalg.eigh(gram)
    order = torch.argsort(eigvals, descending=True)
    eigvals, eigvecs = eigvals[order].clamp_min(0.0), eigvecs[:, order]
    keep = eigvals > 1e-12 * eigvals[0] if eigvals[0] > 0 else torch.zeros_like(eigvals, dtype=torch.bool)
    singular = eigvals[keep].sqrt()
    components = (eigvecs[:, keep].T @ centred) / singular[:, None]
    return mean, components, eigvals[keep] / (train.shape[0] - 1)


def pca_samples(train: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """train: [N,D] (N >= 2) -> samples [n,D] = mean + Σ_k z_k·sqrt(var_k)·component_k, z ~ N(0, 1) seeded."""
    _check(train, n, 2)
    mean, components, variances = fit_pca(train)
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(n, components.shape[0], generator=gen, dtype=torch.float64)
    return (mean + (z * variances.sqrt()) @ components).to(torch.float32)


def blend_pairs(num_train: int, n: int, seed: int) -> torch.Tensor:
    """[n,2] pairs of distinct training indices, each pair drawn uniformly from the seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    first = torch.randint(num_train, (n,), generator=gen)
    # An offset in 1..N-1 makes the second index differ from the first, uniformly over the others.
    second = (first + torch.randint(1, num_train, (n,), generator=gen)) % num_train
    return torch.stack([first, second], dim=1)


def blend_samples(train: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """train: [N,D] (N >= 2) -> (samples [n,D] = (train[i] + train[j]) / 2, pairs [n,2] = (i, j), i != j)."""
    _check(train, n, 2)
    pairs = blend_pairs(train.shape[0], n, seed)
    return ((train[pairs[:, 0]].double() + train[pairs[:, 1]].double()) / 2).to(train.dtype), pairs


def baseline_samples(name: str, train: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """A baseline's samples [n,D] and each sample's origin string (written into the avatar files)."""
    if name == "copy":
        samples, index = copy_samples(train, n, seed)
        return samples, [f"baseline:copy:{int(i)}" for i in index]
    if name == "pca":
        return pca_samples(train, n, seed), [f"baseline:pca:{seed}:{i}" for i in range(n)]
    if name == "blend":
        samples, pairs = blend_samples(train, n, seed)
        return samples, [f"baseline:blend:{int(i)}:{int(j)}" for i, j in pairs]
    raise HDAError(f"baseline {name!r}: expected one of {', '.join(BASELINES)}")

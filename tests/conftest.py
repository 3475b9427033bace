"""Shared fixtures: a synthetic body file in the SMPL-X layout, made in the test (no licensed data)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see hda_backend/cli.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hda_backend.body.skeleton import NUM_JOINTS, PARENTS  # noqa: E402


def write_smplx_like(path, rows=24, cols=32, seed=0, root_parent=np.uint32(2**32 - 1).astype(np.int64)):
    """A tube-shaped body with a grid UV atlas, 55 joints up its axis, 400 shape components (SMPL-X's
    300 shape + 100 expression) and non-zero pose correctives, written like SMPLX_NEUTRAL.npz."""
    rng = np.random.default_rng(seed)
    ang = np.linspace(0, 2 * np.pi, cols, endpoint=False)
    height = np.linspace(-1.0, 0.6, rows)
    v = np.stack([np.stack([0.15 * np.cos(ang), np.full(cols, h), 0.15 * np.sin(ang)], -1) for h in height])
    v = v.reshape(-1, 3)
    # UV grid with one seam column duplicated, as SMPL-X has more vt than v.
    uu = (np.arange(cols + 1) + 0.5) / (cols + 1) * 0.98 + 0.01
    vv = (np.arange(rows) + 0.5) / rows * 0.98 + 0.01
    vt = np.stack(np.meshgrid(uu, vv), -1).reshape(-1, 2)
    f, ft = [], []
    for r in range(rows - 1):
        for c in range(cols):
            a, b = r * cols + c, r * cols + (c + 1) % cols
            d, e = a + cols, b + cols
            ta, tb = r * (cols + 1) + c, r * (cols + 1) + c + 1
            td, te = ta + cols + 1, tb + cols + 1
            f += [[a, b, e], [a, e, d]]
            ft += [[ta, tb, te], [ta, te, td]]
    f, ft = np.array(f, np.int64), np.array(ft, np.int64)
    n_v = v.shape[0]
    jreg = np.zeros((NUM_JOINTS, n_v))
    for j in range(NUM_JOINTS):
        jreg[j, rng.choice(n_v, 4, replace=False)] = rng.dirichlet(np.ones(4))
    weights = rng.dirichlet(np.ones(NUM_JOINTS) * 0.05, size=n_v)
    kintree = np.stack([np.array(PARENTS, np.int64), np.arange(NUM_JOINTS)])
    kintree[0, 0] = root_parent
    np.savez(
        path, v_template=v.astype(np.float64), f=f.astype(np.uint32), vt=vt, ft=ft.astype(np.uint32),
        J_regressor=jreg, weights=weights, kintree_table=kintree,
        shapedirs=rng.normal(0, 0.01, (n_v, 3, 400)), posedirs=rng.normal(0, 0.01, (n_v, 3, 486)),
    )
    return path


@pytest.fixture
def smplx_like_path(tmp_path):
    return write_smplx_like(tmp_path / "SMPLX_NEUTRAL.npz")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HDA_CACHE_DIR", str(tmp_path / "cache"))

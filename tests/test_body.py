"""Body model loading and posing, against smplx's own lbs() and against hand-built cases."""

import numpy as np
import pytest
import torch
from smplx.lbs import lbs as smplx_lbs

from hda_backend.body import ENV_VAR, check_pose, load_body, pose_body, resolve_body_path, skin_points
from hda_backend.errors import HDAError
from tests.conftest import write_smplx_like


def _smplx_reference(body, pose, betas):
    """smplx.lbs.lbs on the same arrays (zero pose correctives where the body has none)."""
    posedirs = body.posedirs if body.posedirs is not None else torch.zeros(54 * 9, body.num_vertices * 3)
    return smplx_lbs(betas, pose.reshape(pose.shape[0], -1), body.v_template, body.shapedirs[:, :, : betas.shape[1]],
                     posedirs, body.J_regressor, body.parents, body.weights)


@pytest.mark.parametrize("shape", ["betas", "mean"])
@pytest.mark.parametrize("which", ["bundled", "smplx_like"])
def test_pose_matches_smplx_lbs(which, shape, smplx_like_path):
    """With betas, and for the mean shape (betas None: the rest joints regressed once per body)."""
    body = load_body(None if which == "bundled" else smplx_like_path)
    gen = torch.Generator().manual_seed(1)
    pose = torch.randn(3, 55, 3, generator=gen) * 0.4
    betas = torch.randn(3, 10, generator=gen) if shape == "betas" else torch.zeros(3, 10)
    verts, joints = _smplx_reference(body, pose, betas)
    out = pose_body(body, pose, betas=betas if shape == "betas" else None)
    assert torch.allclose(out.vertices, verts, atol=1e-5)
    assert torch.allclose(out.joints, joints, atol=1e-5)


def test_transforms_map_rest_joints_and_vertices(smplx_like_path):
    body = load_body(smplx_like_path)
    pose = torch.randn(2, 55, 3, generator=torch.Generator().manual_seed(2)) * 0.5
    transl = torch.tensor([[0.3, -1.0, 2.0], [0.0, 0.5, 0.0]])
    out = pose_body(body, pose, transl=transl)
    rest = body.rest_joints()
    # A_j maps joint j's rest position to its posed position (rigid part of the kinematic chain).
    mapped = torch.einsum("bjik,jk->bji", out.transforms[..., :3, :3], rest) + out.transforms[..., :3, 3]
    assert torch.allclose(mapped, out.joints, atol=1e-5)
    assert torch.allclose(skin_points(out.rest_vertices, body.weights, out.transforms), out.vertices, atol=1e-6)
    rigid = out.transforms[..., :3, :3]
    assert torch.allclose(rigid @ rigid.transpose(-1, -2), torch.eye(3).expand_as(rigid), atol=1e-5)


def test_smplx_layout_file_is_read_like_smplx(smplx_like_path):
    """SMPL-X files: uint32 root parent, 400 shape+expression components (only the first 300 are shape),
    dense pose correctives [V,3,486]."""
    body = load_body(smplx_like_path, num_betas=16)
    assert body.num_betas == 16
    assert body.parents[0] == -1
    assert body.posedirs is not None and body.posedirs.shape == (486, body.num_vertices * 3)
    raw = np.load(smplx_like_path)
    pd = torch.from_numpy(raw["posedirs"]).float()
    pose = torch.zeros(1, 55, 3)
    pose[0, 4, 0] = 0.7
    out = pose_body(body, pose)
    rot = torch.tensor([[1, 0, 0], [0, np.cos(0.7), -np.sin(0.7)], [0, np.sin(0.7), np.cos(0.7)]], dtype=torch.float32)
    feature = torch.zeros(54, 3, 3)
    feature[3] = rot - torch.eye(3)
    expected = body.v_template + torch.einsum("vcp,p->vc", pd, feature.reshape(-1))
    assert torch.allclose(out.rest_vertices[0], expected, atol=1e-5)
    assert load_body(smplx_like_path, num_betas=1000).num_betas == 300


def test_path_resolution(tmp_path, monkeypatch, smplx_like_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_body_path(None).name == "hda_body.npz"
    monkeypatch.setenv(ENV_VAR, str(smplx_like_path))
    assert resolve_body_path(None) == smplx_like_path
    assert resolve_body_path(str(tmp_path)) == smplx_like_path  # a folder holding SMPLX_NEUTRAL.npz
    assert load_body().sha256 == load_body(smplx_like_path).sha256


def _rewrite(path, **changes):
    data = dict(np.load(path))
    data.update(changes)
    for key, value in list(data.items()):
        if value is None:
            del data[key]
    np.savez(path, **data)
    return path


@pytest.mark.parametrize("change, message", [
    (dict(weights=np.ones((10, 55))), "field 'weights' has shape"),
    (dict(v_template=np.full((768, 3), np.nan)), "'v_template' contains NaN"),
    (dict(J_regressor=None), "field 'J_regressor' is missing"),
    (dict(kintree_table=np.zeros((2, 55), np.int64)), "not the SMPL-X 55-joint tree"),
    (dict(f=np.array([[0, 1, 100000]])), "field 'f' indexes vertex"),
])
def test_malformed_body_files(smplx_like_path, change, message):
    _rewrite(smplx_like_path, **change)
    with pytest.raises(HDAError, match=message) as err:
        load_body(smplx_like_path)
    assert str(smplx_like_path) in str(err.value) and "\n" not in str(err.value)


def test_missing_corrupt_and_pickle_files(tmp_path):
    with pytest.raises(HDAError, match=f"not found.*{ENV_VAR}"):
        load_body(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(HDAError, match="not a readable .npz"):
        load_body(tmp_path / "bad.npz")
    (tmp_path / "SMPLX_NEUTRAL.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(HDAError, match="pickle files are not loaded"):
        load_body(tmp_path / "SMPLX_NEUTRAL.pkl")
    with pytest.raises(HDAError, match="has no SMPLX_NEUTRAL.npz"):
        load_body(tmp_path)


@pytest.mark.parametrize("pose, message", [
    (torch.zeros(1, 52, 3), r"shape \(1, 52, 3\), expected \(55, 3\)"),
    (torch.zeros(156), r"shape \(156,\), expected"),
    (torch.full((55, 3), float("nan")), "NaN or inf"),
    (torch.full((1, 165), float("inf")), "NaN or inf"),
])
def test_bad_poses(pose, message):
    with pytest.raises(HDAError, match=message):
        check_pose(pose)


def test_pose_layouts_agree():
    pose = torch.randn(2, 55, 3)
    assert torch.equal(check_pose(pose.reshape(2, 165)), pose)
    assert torch.equal(check_pose(pose[0]), pose[:1])


def test_unchanged_arrays_give_the_same_fingerprint(tmp_path):
    a = write_smplx_like(tmp_path / "a.npz")
    b = write_smplx_like(tmp_path / "b.npz")
    c = write_smplx_like(tmp_path / "c.npz", seed=3)
    assert load_body(a).sha256 == load_body(b).sha256 != load_body(c).sha256

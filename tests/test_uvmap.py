"""UV layouts and pose maps: round trips and brute-force references."""

import numpy as np
import pytest
import torch

from hda_backend.body import load_body, pose_body, vertex_normals
from hda_backend.errors import HDAError
from hda_backend.uvmap import global_transform, pose_maps, rasterize_uv, texel_centres, uv_layout


@pytest.fixture
def body(smplx_like_path):
    return load_body(smplx_like_path)


def test_texel_round_trip(body):
    """texel centre -> (face, bary) -> surface point -> UV lands back on the texel centre."""
    layout = uv_layout(body, 64)
    uv = torch.einsum("mkc,mk->mc", body.vt[body.ft[layout.texel_faces()]], layout.texel_bary())
    centres = torch.from_numpy(texel_centres(64)).reshape(-1, 2)[layout.texels].float()
    assert torch.allclose(uv, centres, atol=1e-5)
    # Row 0 is the top of the texture: its texels have v close to 1.
    assert texel_centres(64)[0, 0, 1] == pytest.approx(1 - 0.5 / 64)
    assert texel_centres(64)[0, 5, 0] == pytest.approx(5.5 / 64)


def test_rasterize_matches_brute_force():
    rng = np.random.default_rng(0)
    vt = rng.uniform(0, 1, (30, 2))
    ft = rng.choice(30, (12, 3))
    face_id, bary = rasterize_uv(vt, ft, 24)
    centres = texel_centres(24).reshape(-1, 2)
    expected = np.full(len(centres), -1)
    for i, p in enumerate(centres):
        for fi, (a, b, c) in enumerate(vt[ft]):
            m = np.array([[a[0] - c[0], b[0] - c[0]], [a[1] - c[1], b[1] - c[1]]])
            if abs(np.linalg.det(m)) < 1e-12:
                continue
            l0, l1 = np.linalg.solve(m, p - c)
            if min(l0, l1, 1 - l0 - l1) >= -1e-9:
                expected[i] = fi
                break
    assert np.array_equal(face_id.reshape(-1), expected)
    assert np.allclose(bary.reshape(-1, 3)[expected >= 0].sum(1), 1.0)


def test_layout_cache_is_reused_and_repaired(body, tmp_path):
    first = uv_layout(body, 32)
    cached = list((tmp_path / "cache").glob("uv_*_32.npz"))
    assert len(cached) == 1
    cached[0].write_bytes(b"garbage")
    again = uv_layout(body, 32)
    assert torch.equal(first.face_id, again.face_id)
    with pytest.raises(HDAError, match="uv resolution 100"):
        uv_layout(body, 100)


def test_pose_maps_interpolate_the_root_relative_template(body):
    layout = uv_layout(body, 32)
    pose = torch.randn(2, 55, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    maps, posed = pose_maps(body, layout, pose)
    assert maps.shape == (2, 6, 32, 32)
    local = pose.clone()
    local[:, 0] = 0
    ref = pose_body(body, local)
    positions = ref.vertices - ref.joints[:, :1]
    normals = vertex_normals(ref.vertices, body.faces)
    faces = body.faces[layout.texel_faces()]
    bary = layout.texel_bary()
    for b in range(2):
        for m in range(0, layout.num_texels, 97):
            row, col = divmod(int(layout.texels[m]), 32)
            want_p = sum(bary[m, k] * positions[b, faces[m, k]] for k in range(3))
            want_n = torch.nn.functional.normalize(sum(bary[m, k] * normals[b, faces[m, k]] for k in range(3)), dim=0)
            assert torch.allclose(maps[b, 3:, row, col], want_p, atol=1e-5)
            assert torch.allclose(maps[b, :3, row, col], want_n, atol=1e-4)
    assert (maps[:, :, ~layout.mask] == 0).all()


def test_global_motion_does_not_change_the_maps_and_composes_exactly(body):
    layout = uv_layout(body, 32)
    pose = torch.randn(1, 55, 3, generator=torch.Generator().manual_seed(3)) * 0.3
    turned = pose.clone()
    turned[:, 0] = torch.tensor([0.3, 2.0, -0.5])
    a, _ = pose_maps(body, layout, pose)
    b, local = pose_maps(body, layout, turned)
    assert torch.equal(a, b)
    transl = torch.tensor([[1.0, 0.2, -3.0]])
    full = pose_body(body, turned, transl=transl)
    composed = global_transform(body, turned, transl)[:, None] @ local.transforms
    assert torch.allclose(composed, full.transforms, atol=1e-5)

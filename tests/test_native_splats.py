"""Native-splat attributes (Blender ≥ 5.3) against the 3DGS PLY rows that Blender's own PLY importer
turns into the same attributes: an independent path through log scales, logit opacities and the
channel-major f_rest layout."""

import numpy as np
import pytest
import torch

from hda_backend.errors import HDAError
from hda_backend.export_ply import PROPERTIES, write_ply
from hda_backend.native_splats import ATTRIBUTES, SH_REST, camera_dilation, splat_arrays
from hda_backend.render._projection import project_gaussians
from hda_backend.render.camera import intrinsics, look_at
from hda_backend.render.rasterize import EPS2D
from hda_backend.rig import body_to_world
from tests.test_export_ply import random_gaussians, read_ply


def _importer_view(rows) -> dict[str, np.ndarray]:
    """What bpy.ops.wm.ply_import (5.3) makes of 3DGS PLY rows: activations applied, f_rest channel-major."""
    col = {name: rows[name].astype(np.float64) for name in PROPERTIES}
    out = {
        "position": np.stack([col["x"], col["y"], col["z"]], 1),
        "scale": np.exp(np.stack([col[f"scale_{i}"] for i in range(3)], 1)),
        "rotation": np.stack([col[f"rot_{i}"] for i in range(4)], 1),
        "radiance:base": np.stack([col["f_dc_0"], col["f_dc_1"], col["f_dc_2"],
                                   1.0 / (1.0 + np.exp(-col["opacity"]))], 1),
    }
    for k in range(SH_REST):
        out[f"radiance:sh_{k}"] = np.stack([col[f"f_rest_{c * SH_REST + k}"] for c in range(3)], 1)
    return out


@pytest.mark.parametrize("placed", [False, True])
def test_attributes_match_ply_rows(tmp_path, placed):
    g = random_gaussians(300, seed=3)
    # The add-on's frame: body -> armature object (+Y up to +Z up), here also moved, turned and scaled.
    matrix = None
    if placed:
        turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        place = np.eye(4)
        place[:3, :3] = 1.5 * turn
        place[:3, 3] = (0.2, -1.0, 3.0)
        matrix = place @ body_to_world(np.eye(4))
    arrays = splat_arrays(g, matrix)
    assert list(arrays) == [name for name, _, _ in ATTRIBUTES]
    m = g.means.shape[0]
    for name, kind, _ in ATTRIBUTES:
        width = {"FLOAT_VECTOR": 3, "QUATERNION": 4, "FLOAT4": 4}[kind]
        assert arrays[name].shape == (m, width) and arrays[name].dtype == np.float32
        assert arrays[name].flags.c_contiguous
    if matrix is None:
        path = write_ply(tmp_path / "g.ply", g)
    else:
        from hda_backend.export_ply import transform_gaussians
        path = write_ply(tmp_path / "g.ply", transform_gaussians(g, torch.as_tensor(matrix, dtype=torch.float32)))
    expected = _importer_view(read_ply(path))
    for name in arrays:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=1e-5, atol=2e-6, err_msg=name)


def test_frame_moves_centres_and_keeps_colour_of_the_front_view():
    g = random_gaussians(50, seed=1)
    matrix = body_to_world(np.eye(4))
    arrays = splat_arrays(g, matrix)
    # (x, y, z) body -> (x, -z, y) Blender, analytically.
    means = g.means.numpy()
    np.testing.assert_allclose(arrays["position"], np.stack([means[:, 0], -means[:, 2], means[:, 1]], 1), atol=1e-6)
    np.testing.assert_allclose(arrays["radiance:base"][:, :3], g.sh[:, 0].numpy(), atol=1e-6)  # DC does not turn
    np.testing.assert_allclose(arrays["radiance:base"][:, 3], g.opacities.numpy(), atol=1e-7)


def test_bad_gaussians_are_refused():
    g = random_gaussians(10)
    bad = g._replace(scales=g.scales.clone().index_fill_(0, torch.tensor([2]), -1.0))
    with pytest.raises(HDAError, match="scales"):
        splat_arrays(bad, source="avatar 'A'")


def test_camera_dilation_projects_to_the_rasterizers_screen_space_dilation():
    # Gaussians near the optical axis: the widened 3D Gaussian projected without a 2D filter equals
    # the original projected with the rasterizer's EPS2D (the first-order projection of sigma^2 I).
    g = random_gaussians(40, seed=5)
    g = g._replace(means=g.means * 0.02 + torch.tensor([0.0, 0.0, 0.3]))
    viewmat = look_at(torch.tensor([0.0, 0.0, 3.0]), torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])).float()
    K = intrinsics(64, 64, 40.0)
    dilation = camera_dilation(g.means, viewmat.numpy(), K.numpy())
    arrays = splat_arrays(g, dilation=dilation)
    widened = torch.as_tensor(arrays["scale"])
    _, _, _, conic_rasterizer = project_gaussians(g.means, g.quats, g.scales, viewmat[None], K[None], 64, 64, eps2d=EPS2D)
    _, _, _, conic_widened = project_gaussians(g.means, g.quats, widened, viewmat[None], K[None], 64, 64, eps2d=0.0)
    torch.testing.assert_close(conic_widened, conic_rasterizer, rtol=2e-3, atol=1e-4)
    # and it does matter: without the widening the conics are far apart
    _, _, _, conic_plain = project_gaussians(g.means, g.quats, g.scales, viewmat[None], K[None], 64, 64, eps2d=0.0)
    assert (conic_plain - conic_rasterizer).abs().max() > 0.1

"""3DGS .ply export: the INRIA layout read back by a parser written here (and by plyfile), the SH
convention checked against the reference implementation's formulas, frame transforms, bad input."""

import math

import numpy as np
import pytest
import torch

from hda_backend.avatar.gaussians import Gaussians
from hda_backend.avatar.model import Avatar
from hda_backend.body import load_body
from hda_backend.cli import main
from hda_backend.config import load_config
from hda_backend.errors import HDAError
from hda_backend.export_ply import (PROPERTIES, YUP_TO_ZUP, output_paths, parse_frames, transform_gaussians,
                                    write_ply)
from hda_backend.motion import procedural
from hda_backend.ply_comments import read_comments
from hda_backend.render.camera import intrinsics, look_at
from hda_backend.render.frames import render_gaussians


def read_ply(path):
    """A minimal binary-little-endian PLY reader: header lines -> numpy structured dtype -> rows."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    count, fields = None, []
    for line in header[2:-1]:
        words = line.split()
        if words[0] == "element":
            assert words[1] == "vertex"
            count = int(words[2])
        else:
            assert words[:2] == ["property", "float"], line
            fields.append((words[2], "<f4"))
    rows = np.frombuffer(data[end:], dtype=np.dtype(fields))
    assert rows.shape == (count,)
    return rows


def random_gaussians(m=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.randn(m, 3, generator=gen) * 0.3,
        quats=torch.nn.functional.normalize(torch.randn(m, 4, generator=gen), dim=-1),
        scales=torch.rand(m, 3, generator=gen) * 0.05 + 0.005,
        opacities=torch.rand(m, generator=gen) * 0.98 + 0.01,
        sh=torch.randn(m, 16, 3, generator=gen) * 0.3,
    )


# The reference implementation's SH evaluation (graphdeco-inria/gaussian-splatting utils/sh_utils.py
# eval_sh), transcribed: sh [N,3,16] channel-first, dirs [N,3] unit.
C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
      1.445305721320277, -0.5900435899266435)


def inria_eval_sh(sh, dirs):
    x, y, z = dirs[:, 0:1], dirs[:, 1:2], dirs[:, 2:3]
    r = C0 * sh[..., 0]
    r = r - C1 * y * sh[..., 1] + C1 * z * sh[..., 2] - C1 * x * sh[..., 3]
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    r = (r + C2[0] * xy * sh[..., 4] + C2[1] * yz * sh[..., 5] + C2[2] * (2 * zz - xx - yy) * sh[..., 6]
         + C2[3] * xz * sh[..., 7] + C2[4] * (xx - yy) * sh[..., 8])
    r = (r + C3[0] * y * (3 * xx - yy) * sh[..., 9] + C3[1] * xy * z * sh[..., 10]
         + C3[2] * y * (4 * zz - xx - yy) * sh[..., 11] + C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12]
         + C3[4] * x * (4 * zz - xx - yy) * sh[..., 13] + C3[5] * z * (xx - yy) * sh[..., 14]
         + C3[6] * x * (xx - 3 * yy) * sh[..., 15])
    return r


def inria_features(rows):
    """f_dc/f_rest loaded as the reference's load_ply does: [N,3,16] channel-first SH."""
    n = rows.shape[0]
    dc = np.stack([rows[f"f_dc_{c}"] for c in range(3)], 1)[:, :, None]
    names = sorted((p for p in rows.dtype.names if p.startswith("f_rest_")), key=lambda p: int(p.split("_")[-1]))
    extra = np.stack([rows[p] for p in names], 1).reshape(n, 3, 15)
    return np.concatenate([dc, extra], 2).astype(np.float64)


def test_layout_and_values_read_back(tmp_path):
    g = random_gaussians()
    path = write_ply(tmp_path / "g.ply", g)
    rows = read_ply(path)
    assert rows.dtype.names == PROPERTIES and len(PROPERTIES) == 62
    assert path.stat().st_mode & 0o777 == 0o644
    assert np.array_equal(np.stack([rows["x"], rows["y"], rows["z"]], 1), g.means.numpy())
    assert not any(rows[n].any() for n in ("nx", "ny", "nz"))
    for m in (0, 57, 199):
        for c in range(3):
            assert rows[f"f_dc_{c}"][m] == g.sh[m, 0, c]
            for k in range(1, 16):
                assert rows[f"f_rest_{c * 15 + k - 1}"][m] == g.sh[m, k, c]
    sigmoid = 1 / (1 + np.exp(-rows["opacity"].astype(np.float64)))
    assert np.allclose(sigmoid, g.opacities.numpy(), atol=1e-6)
    scales = np.exp(np.stack([rows[f"scale_{i}"] for i in range(3)], 1).astype(np.float64))
    assert np.allclose(scales, g.scales.numpy(), rtol=1e-6)
    rot = np.stack([rows[f"rot_{i}"] for i in range(4)], 1)
    assert np.allclose(rot, g.quats.numpy(), atol=1e-6)


def test_plyfile_reads_the_same_values(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    g = random_gaussians(50, seed=3)
    path = write_ply(tmp_path / "g.ply", g)
    ply = plyfile.PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"] and ply.elements[0].count == 50
    vertex = ply["vertex"]
    assert tuple(p.name for p in vertex.properties) == PROPERTIES
    ours = read_ply(path)
    for name in PROPERTIES:
        assert np.array_equal(vertex[name], ours[name]), name


def test_header_comments_are_read_back_and_leave_the_values(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    g = random_gaussians(20, seed=4)
    key = '{"camera": "AAA=", "identity": "ab12", "version": 1}'
    path = write_ply(tmp_path / "g.ply", g, {"hdaBakeKey": key, "other": "two words"})
    assert read_comments(path) == {"hdaBakeKey": key, "other": "two words"}
    ply = plyfile.PlyData.read(str(path))  # an independent reader sees the same comments and values
    assert ply.comments == [f"hdaBakeKey {key}", "other two words"]
    plain = read_ply(write_ply(tmp_path / "plain.ply", g))
    assert read_comments(tmp_path / "plain.ply") == {}
    for name in PROPERTIES:
        assert np.array_equal(ply["vertex"][name], plain[name]), name
    with pytest.raises(HDAError, match="one line of ASCII"):
        write_ply(tmp_path / "bad.ply", g, {"hdaBakeKey": "two\nlines"})
    assert not (tmp_path / "bad.ply").exists()
    (tmp_path / "text.ply").write_text("not a ply file")
    with pytest.raises(HDAError, match="text.ply: not a PLY file"):
        read_comments(tmp_path / "text.ply")
    with pytest.raises(HDAError, match="missing.ply: cannot read"):
        read_comments(tmp_path / "missing.ply")


def test_sh_convention_matches_the_reference_implementation(tmp_path):
    """Colours a reference viewer computes from the file equal the colours our renderer computes."""
    from hda_backend.render._projection import spherical_harmonics

    g = random_gaussians(64, seed=5)
    rows = read_ply(write_ply(tmp_path / "g.ply", g))
    campos = torch.tensor([0.3, -1.2, 2.5])
    dirs = torch.nn.functional.normalize(g.means - campos, dim=-1)
    ours = (spherical_harmonics(3, (g.means - campos)[None], g.sh)[0] + 0.5).clamp_min(0)
    theirs = np.clip(inria_eval_sh(inria_features(rows), dirs.double().numpy()) + 0.5, 0, None)
    assert np.allclose(ours.numpy(), theirs, atol=1e-5)


def test_zup_transform_rotates_means_covariances_and_view_dependent_colour():
    from hda_backend.render._projection import spherical_harmonics
    from hda_backend.rotations import quat_to_matrix

    g = random_gaussians(40, seed=7)
    matrix = torch.eye(4)
    matrix[:3, :3] = YUP_TO_ZUP
    h = transform_gaussians(g, matrix)
    # (x, y, z) -> (x, -z, y): the body's +Y up becomes +Z up.
    assert torch.allclose(h.means, torch.stack([g.means[:, 0], -g.means[:, 2], g.means[:, 1]], -1))
    cov = lambda q, s: quat_to_matrix(q) @ torch.diag_embed(s ** 2) @ quat_to_matrix(q).transpose(1, 2)
    assert torch.allclose(cov(h.quats, h.scales), YUP_TO_ZUP @ cov(g.quats, g.scales) @ YUP_TO_ZUP.T, atol=1e-7)
    # Seen from the rotated direction, each Gaussian has the colour it had before.
    d = torch.nn.functional.normalize(torch.randn(1, 40, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert torch.allclose(spherical_harmonics(3, d @ YUP_TO_ZUP.T, h.sh), spherical_harmonics(3, d, g.sh), atol=1e-5)


def test_similarity_transform_renders_like_the_moved_camera():
    """Rendering transformed Gaussians from a camera moved with them gives the original image."""
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=2)
    with torch.no_grad():
        avatar.unet.outc.weight[11:59].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        g = avatar(procedural("wave", 4).poses[1:2]).index(0)
    angle = 0.7
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) @ YUP_TO_ZUP
    matrix = torch.eye(4)
    matrix[:3, :3] = 1.5 * rot
    matrix[:3, 3] = torch.tensor([0.4, -2.0, 1.0])
    h = transform_gaussians(g, matrix)
    view = look_at(torch.tensor([0.5, 0.2, 3.0]), torch.tensor([0.0, -0.3, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    # Scaling the world by 1.5 scales the camera distance too: view' = diag(1,1,1,1) rescaled so that
    # view'(T x) = view(x) up to depth scale; the image is the same for a pinhole camera.
    scaled = torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0]))
    view2 = scaled @ view @ torch.linalg.inv(matrix)
    K = intrinsics(48, 48, 35.0)
    a, alpha_a = render_gaussians(g, view, K, 48, 48, backend="cpu")
    b, alpha_b = render_gaussians(h, view2, K, 48, 48, backend="cpu")
    assert alpha_a.mean() > 0.05
    assert (a - b).abs().max() < 2e-3 and (alpha_a - alpha_b).abs().max() < 2e-3


def test_transform_refuses_mirror_and_non_uniform_scale():
    g = random_gaussians(5)
    for diag in ([1.0, 1.0, -1.0], [1.0, 2.0, 1.0]):
        with pytest.raises(HDAError, match="rotation times a uniform positive scale"):
            transform_gaussians(g, torch.diag(torch.tensor(diag + [1.0])))


@pytest.mark.parametrize("field,value,message", [
    ("means", float("nan"), "field 'means' is NaN or inf for 1 of 20"),
    ("sh", float("inf"), "field 'sh' is NaN or inf for 1 of 20"),
    ("scales", 0.0, "field 'scales' has values <= 0"),
    ("opacities", 1.5, "field 'opacities' has values outside"),
])
def test_bad_gaussians_are_refused_and_nothing_is_written(tmp_path, field, value, message):
    g = random_gaussians(20)
    getattr(g, field)[3] = value
    with pytest.raises(HDAError, match=message):
        write_ply(tmp_path / "bad.ply", g)
    assert list(tmp_path.iterdir()) == []


def test_wrong_shapes_and_unwritable_paths(tmp_path):
    g = random_gaussians(10)
    with pytest.raises(HDAError, match=r"field 'means' has shape \(1, 10, 3\), expected"):
        write_ply(tmp_path / "b.ply", Gaussians(*(t[None] for t in g)))
    with pytest.raises(HDAError, match=r"field 'sh' has shape \(10, 9, 3\), expected \(10, 16, 3\)"):
        write_ply(tmp_path / "b.ply", g._replace(sh=g.sh[:, :9]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(HDAError, match=f"{blocker}/g.ply: cannot write here"):
        write_ply(blocker / "g.ply", g)


def test_frame_specs_and_output_names(tmp_path):
    assert parse_frames(None, 4) == [0, 1, 2, 3]
    assert parse_frames("2", 4) == [2] and parse_frames("1:3", 4) == [1, 2]
    assert parse_frames(":2", 4) == [0, 1] and parse_frames("2:", 4) == [2, 3]
    for bad in ("4", "3:3", "x", "-1:2", "0:9"):
        with pytest.raises(HDAError, match="--frames"):
            parse_frames(bad, 4)
    assert output_paths(tmp_path / "a.ply", [5]) == [tmp_path / "a.ply"]
    assert output_paths(tmp_path / "a.ply", [5, 6]) == [tmp_path / "a_0005.ply", tmp_path / "a_0006.ply"]
    assert output_paths(tmp_path / "d", [0, 12]) == [tmp_path / "d" / "frame_0000.ply", tmp_path / "d" / "frame_0012.ply"]


def test_cli_writes_the_avatars_gaussians_for_each_frame(tmp_path, capsys):
    code = main(["export-ply", "--init", "4", "--motion", "squat", "--frames", "1:3", "--preset", "tiny",
                 "--coords", "zup", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=4)
    assert out.startswith(f"wrote 2 .ply files ({avatar.num_gaussians} Gaussians each, zup coordinates): "
                          f"{tmp_path / 'out'}")
    motion = procedural("squat", 30)
    for f in (1, 2):
        rows = read_ply(tmp_path / "out" / f"frame_{f:04d}.ply")
        with torch.no_grad():
            g = avatar(motion.poses[f:f + 1], motion.transl[f:f + 1]).index(0)
        xyz = np.stack([rows["x"], rows["y"], rows["z"]], 1)
        assert np.allclose(xyz, (g.means @ YUP_TO_ZUP.T).numpy(), atol=1e-6)
        assert rows.shape[0] == avatar.num_gaussians
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frame_0001.ply", "frame_0002.ply"]
    code = main(["export-ply", "--init", "0", "--motion", "wave", "--frames", "40:50", "--preset", "tiny",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("hda: error: --frames '40:50': expected 0 <= A < B <= 30 "
                                         "(the motion has 30 frames)")

"""Avatar UNet, Gaussian decoding and the avatar file format."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hda_backend.avatar.gaussians import GaussianConfig, gather_texels
from hda_backend.avatar.io import load_avatar, read_avatar_file, save_avatar
from hda_backend.avatar.model import Avatar
from hda_backend.avatar.unet import AvatarUNet, UNetConfig, conv_layer, init_unet, num_parameters, run_unet
from hda_backend.body import load_body, pose_body
from hda_backend.errors import HDAError
from hda_backend.rotations import quat_to_matrix
from tests.conftest import write_smplx_like

TINY = UNetConfig(width=16, levels=2)


@pytest.fixture
def body(smplx_like_path):
    return load_body(smplx_like_path)


def test_paper_unet_size():
    unet = AvatarUNet(UNetConfig(width=64, levels=3))
    layers = unet.conv_layers()
    assert num_parameters(unet) == 598_011
    assert len(layers) == 15
    assert max(c.weight.numel() + c.bias.numel() for _, c in layers) == 73_792
    assert unet(torch.zeros(1, 6, 32, 32)).shape == (1, 59, 32, 32)


def test_consistent_initialisation():
    a, b, c = (init_unet(AvatarUNet(TINY), seed) for seed in (7, 7, 8))
    torch.manual_seed(123)  # global RNG state must not matter
    d = init_unet(AvatarUNet(TINY), 7)
    for (ka, va), (_, vb), (_, vc), (_, vd) in zip(*(m.state_dict().items() for m in (a, b, c, d))):
        assert torch.equal(va, vb) and torch.equal(va, vd)
        if ka.endswith("weight"):
            assert not torch.equal(va, vc)


def _zero_avatar(body, config=GaussianConfig()):
    avatar = Avatar(body, 32, TINY, config)
    for p in avatar.unet.parameters():
        torch.nn.init.zeros_(p)
    return avatar


@pytest.mark.parametrize("skin_rotations", [True, False])
def test_zero_output_gaussians_sit_on_the_skinned_template(body, skin_rotations):
    """With a zero UNet, each Gaussian is the LBS of its texel's template point, with texel-blended
    weights (paper Eq. 7), checked against a per-texel loop; its third axis is the face normal carried
    by the skinning rotation (or by the global orientation only)."""
    avatar = _zero_avatar(body, GaussianConfig(skin_rotations=skin_rotations))
    pose = torch.randn(1, 55, 3, generator=torch.Generator().manual_seed(4)) * 0.05
    pose[0, 0] = torch.tensor([0.2, 1.0, -0.3])
    transl = torch.tensor([[0.5, 0.1, -2.0]])
    g = avatar(pose, transl)
    full = pose_body(body, pose, transl=transl)
    faces, bary = body.faces[avatar.layout.texel_faces()], avatar.layout.texel_bary()
    checked = 0
    for m in range(0, avatar.num_gaussians, 23):
        point = sum(bary[m, k] * full.rest_vertices[0, faces[m, k]] for k in range(3))
        weights = sum(bary[m, k] * body.weights[faces[m, k]] for k in range(3))
        skin = sum(weights[j] * full.transforms[0, j] for j in range(55))
        assert torch.allclose(g.means[0, m], skin[:3, :3] @ point + skin[:3, 3], atol=1e-5)
        rot = skin[:3, :3] if skin_rotations else full.transforms[0, 0, :3, :3]
        # A blend of different joint rotations is not a rotation; compare where it nearly is one.
        if (rot.T @ rot - torch.eye(3)).abs().max() > 0.05:
            continue
        v0, v1, v2 = (body.v_template[faces[m, k]] for k in range(3))
        normal = torch.nn.functional.normalize(torch.cross(v1 - v0, v2 - v0, dim=0), dim=0)
        want = torch.nn.functional.normalize(rot @ normal, dim=0)
        assert torch.allclose(quat_to_matrix(g.quats[0, m])[:, 2], want, atol=5e-2)
        checked += 1
    assert checked >= 3
    assert torch.allclose(g.opacities, torch.full_like(g.opacities, 0.9))
    assert (g.scales[..., 2] < g.scales[..., 0]).all()
    assert torch.equal(g.sh, torch.zeros_like(g.sh))


def test_global_rotation_turns_gaussians_rigidly(body):
    avatar = _zero_avatar(body)
    pose = torch.zeros(1, 55, 3)
    turned = pose.clone()
    turned[0, 0] = torch.tensor([0.0, 1.2, 0.3])
    a, b = avatar(pose), avatar(turned, torch.tensor([[0.0, 0.0, 1.0]]))
    g = pose_body(body, turned, transl=torch.tensor([[0.0, 0.0, 1.0]])).transforms[0, 0]
    assert torch.allclose(b.means[0], a.means[0] @ g[:3, :3].T + g[:3, 3], atol=1e-5)
    ra, rb = quat_to_matrix(a.quats[0]), quat_to_matrix(b.quats[0])
    assert torch.allclose(rb, g[:3, :3] @ ra, atol=1e-4)


def test_outputs_map_to_documented_channels(body):
    avatar = _zero_avatar(body)
    with torch.no_grad():
        avatar.unet.outc.bias[0:3] = torch.tensor([1.0, 0.0, 0.0])  # offset x
        avatar.unet.outc.bias[3:6] = 0.5  # log-scale
        avatar.unet.outc.bias[10] = 100.0  # opacity logit
        avatar.unet.outc.bias[11:14] = torch.tensor([0.1, 0.2, 0.3])  # SH DC RGB
    base = _zero_avatar(body)(torch.zeros(1, 55, 3))
    g = avatar(torch.zeros(1, 55, 3))
    assert torch.allclose(g.means - base.means, torch.tensor([0.05, 0.0, 0.0]).expand_as(g.means), atol=1e-6)
    assert torch.allclose(g.scales / base.scales, torch.full_like(g.scales, torch.e ** 0.5), rtol=1e-5)
    assert torch.allclose(g.opacities, torch.ones_like(g.opacities))
    assert torch.allclose(g.sh[..., 0, :], torch.tensor([0.1, 0.2, 0.3]).expand(*g.sh.shape[:2], 3))


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_sh_above_the_avatar_degree_is_zero(body, degree):
    """gaussians.sh_degree keeps the first (d+1)^2 coefficients as the UNet made them and zeroes the rest."""
    full = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=1)
    capped = Avatar.from_init(body, 32, TINY, GaussianConfig(sh_degree=degree), seed=1)
    pose = torch.randn(1, 55, 3) * 0.2
    kept = (degree + 1) ** 2
    g_full, g_capped = full(pose), capped(pose)
    assert torch.equal(g_capped.sh[:, :, :kept], g_full.sh[:, :, :kept])
    assert g_capped.sh[:, :, kept:].abs().max() == 0 and g_full.sh[:, :, kept:].abs().max() > 0
    assert torch.equal(g_capped.means, g_full.means)


def test_input_pose_feeds_the_unet_and_pose_skins(body):
    """With input_pose the UNet sees one pose and the Gaussians are skinned into the other."""
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=2)
    pose, other = torch.randn(1, 55, 3) * 0.3, torch.randn(1, 55, 3) * 0.3
    mixed, seen, skinned = avatar(pose, input_pose=other), avatar(other), avatar(pose)
    assert torch.equal(mixed.sh, seen.sh) and torch.equal(mixed.opacities, seen.opacities)
    assert not torch.allclose(mixed.sh, skinned.sh)
    zero = _zero_avatar(body)  # no UNet output: the Gaussians are the skinned template, whatever it sees
    assert torch.allclose(zero(pose, input_pose=other).means, zero(pose).means)
    assert torch.equal(avatar(pose, input_pose=pose).means, skinned.means)


def test_gradients_reach_every_conv(body):
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0)
    g = avatar(torch.randn(1, 55, 3) * 0.2)
    (g.means.square().sum() + g.sh.square().sum() + g.scales.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in avatar.unet.parameters())


def test_file_round_trip(body, tmp_path):
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(offset_scale=0.02), seed=3)
    path = save_avatar(avatar, tmp_path / "a.hda.safetensors", origin="init:3")
    loaded = load_avatar(path, body)
    pose = torch.randn(1, 55, 3) * 0.3
    assert torch.equal(avatar(pose).means, loaded(pose).means)
    assert loaded.gaussian_config.offset_scale == 0.02
    meta, _ = read_avatar_file(path)
    assert meta["origin"] == "init:3" and meta["body_sha256"] == body.sha256


def _write_variant(path, body, meta_change=None, tensor_change=None):
    avatar = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=0)
    save_avatar(avatar, path)
    meta, tensors = read_avatar_file(path)
    meta.update(meta_change or {})
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("meta_change, tensor_change, message", [
    ({"format": "something"}, None, "field 'format' is 'something'"),
    ({"format_version": "9"}, None, "field 'format_version'"),
    ({"uv_res": "33"}, None, "field 'uv_res'"),
    ({"unet": "{not json"}, None, "field 'unet' is not valid"),
    ({"unet": json.dumps({"width": 32, "levels": 2})}, None, "tensor 'inc.0.weight' has shape"),
    ({"body_sha256": "0" * 64}, None, "field 'body_sha256'"),
    (None, lambda t: t.__setitem__("outc.bias", torch.full_like(t["outc.bias"], float("nan"))), "'outc.bias' contains NaN"),
    (None, lambda t: t.pop("outc.bias"), "'outc.bias' is missing"),
    (None, lambda t: t.__setitem__("outc.weight", torch.zeros(3, 3)), "'outc.weight' has shape"),
])
def test_bad_avatar_files(body, tmp_path, meta_change, tensor_change, message):
    path = _write_variant(tmp_path / "bad.hda.safetensors", body, meta_change, tensor_change)
    with pytest.raises(HDAError, match=message) as err:
        load_avatar(path, body)
    assert str(path) in str(err.value)


def test_truncated_and_missing_files(body, tmp_path):
    path = save_avatar(Avatar.from_init(body, 32, TINY, GaussianConfig()), tmp_path / "t.hda.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HDAError, match="not a readable safetensors file"):
        load_avatar(path, body)
    for broken in (b"\x00" * 4, (10 ** 6).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]"):
        path.write_bytes(broken)  # too short; a header longer than the file; a header that is not a map
        with pytest.raises(HDAError, match="not a readable safetensors file"):
            load_avatar(path, body)
    # Bytes read by the caller are what is loaded (the file is not read again).
    path.unlink()
    saved = Avatar.from_init(body, 32, TINY, GaussianConfig())
    assert torch.equal(load_avatar(path, body, data).unet.outc.bias, saved.unet.outc.bias)
    with pytest.raises(HDAError, match="avatar file not found"):
        load_avatar(tmp_path / "none.hda.safetensors", body)


def test_avatar_of_another_body_is_refused(body, tmp_path):
    path = save_avatar(Avatar.from_init(body, 32, TINY, GaussianConfig()), tmp_path / "a.hda.safetensors")
    other = load_body(write_smplx_like(tmp_path / "other.npz", seed=5))
    with pytest.raises(HDAError, match="made for body"):
        load_avatar(path, other)


def test_gather_picks_covered_texels(body):
    avatar = _zero_avatar(body)
    raw = torch.arange(59 * 32 * 32, dtype=torch.float32).reshape(1, 59, 32, 32)
    rows = gather_texels(raw, avatar.binding)
    r, c = divmod(int(avatar.layout.texels[5]), 32)
    assert torch.equal(rows[0, 5], raw[0, :, r, c])


def test_static_avatar_sees_the_rest_pose_but_is_skinned_into_the_pose(body, tmp_path):
    """The static baseline: UNet outputs frozen at the rest pose, positions still follow LBS."""
    static = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=2, static=True)
    dynamic = Avatar.from_init(body, 32, TINY, GaussianConfig(), seed=2)
    pose = torch.randn(1, 55, 3, generator=torch.Generator().manual_seed(9)) * 0.3
    at_rest, posed = dynamic(torch.zeros(1, 55, 3)), static(pose)
    assert torch.equal(posed.sh, at_rest.sh) and torch.equal(posed.opacities, at_rest.opacities)
    assert not torch.equal(dynamic(pose).sh, at_rest.sh)
    assert (posed.means - at_rest.means).abs().max() > 0.01
    loaded = load_avatar(save_avatar(static, tmp_path / "s.hda.safetensors"), body)
    assert loaded.static and read_avatar_file(tmp_path / "s.hda.safetensors")[0]["pose_input"] == "rest"
    assert torch.equal(loaded(pose).means, posed.means)


def test_position_scale_is_a_change_of_units_at_the_input():
    """A UNet with position_scale s on maps in metres equals the same weights at scale 1 on maps whose
    positions were multiplied by s; no parameter depends on it."""
    scaled = AvatarUNet(UNetConfig(width=8, levels=2, position_scale=20.0))
    plain = AvatarUNet(UNetConfig(width=8, levels=2))
    init_unet(plain, seed=2)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 16, 16)
    by_hand = torch.cat([x[:, :3], 20.0 * x[:, 3:]], 1)
    assert torch.allclose(scaled(x), plain(by_hand), atol=1e-6)
    assert not torch.allclose(scaled(x), plain(x), atol=1e-3)
    assert num_parameters(scaled) == num_parameters(plain)


def test_the_unet_runs_channels_last_and_matches_the_contiguous_layout():
    """AvatarUNet.forward makes its input channels-last (oneDNN's faster layout); its twin is the same
    network run in the contiguous layout. Gradients too: fitting trains through this path."""
    unet = init_unet(AvatarUNet(UNetConfig(position_scale=20.0)), 0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = unet(x)
        ref = run_unet(unet, x, conv_layer)
    assert out.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    assert ref.is_contiguous()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    grads = []
    for run in (lambda: unet(x), lambda: run_unet(unet, x, conv_layer)):
        unet.zero_grad()
        run().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6 * float(grads[1].abs().max()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, slow = unet(x).float(), run_unet(unet, x, conv_layer).float()
    assert (fast - slow).abs().max() <= 0.02 * slow.abs().max()  # bf16: equal here, within rounding anywhere

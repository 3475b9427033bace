"""The per-frame fast paths against their slow, obviously correct twins (README, Speed).

- hda_backend.avatar.realtime.RealtimeAvatar against Avatar in float32: maps, Gaussians, and renders of
  the bundled reference avatars and a sampled identity within PSNR_FLOOR_DB (40 dB);
- its sparse vertex normals against body.vertex_normals;
- the viewport's level of detail (RealtimeAvatar.skin of an earlier pose's UNet output): exactly the
  fast path with the same pose's output, within PSNR_LOD_FLOOR_DB of it a few frames of a walk later;
- hda_backend.layer.to_layer against to_layer_reference;
- hda_backend.exr's threaded chunk compression against the same chunks compressed one by one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hda_backend import exr
from hda_backend.avatar.io import SUFFIX, load_avatar
from hda_backend.avatar import realtime
from hda_backend.avatar.realtime import PSNR_FLOOR_DB, RealtimeAvatar, vertex_face_matrix, vertex_normals_sparse
from hda_backend.avatar.unet import conv_layer
from hda_backend.body import load_body, vertex_normals
from hda_backend.diffusion.sample import load_diffusion, sample_vectors
from hda_backend.diffusion.weights import write_avatar
from hda_backend.fit.losses import psnr
from hda_backend.layer import DEPTH_FAR, to_layer, to_layer_reference
from hda_backend.motion import procedural
from hda_backend.preview import PSNR_LOD_FLOOR_DB, REFRESH_FRAMES, PoseStage, PreviewRequest
from hda_backend.render.camera import intrinsics, look_at
from hda_backend.render.frames import render_gaussians

DEFAULT = Path(__file__).resolve().parent.parent / "assets" / "default"
REFERENCES = sorted((DEFAULT / "references").glob("*" + SUFFIX))


@pytest.fixture(scope="module")
def body():
    return load_body()


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    model = load_diffusion(DEFAULT / "diffusion.safetensors")
    path = tmp_path_factory.mktemp("realtime") / f"sample_3{SUFFIX}"
    return write_avatar(sample_vectors(model, [3])[0], model.spec, model.meta, path)


def test_sparse_vertex_normals_equal_the_scatter_add_ones(body):
    gen = torch.Generator().manual_seed(0)
    vertices = body.v_template + 0.02 * torch.randn(body.v_template.shape, generator=gen)
    incidence = vertex_face_matrix(body.faces, vertices.shape[0])
    fast = vertex_normals_sparse(vertices, body.faces, incidence)
    torch.testing.assert_close(fast, vertex_normals(vertices[None], body.faces)[0], atol=1e-5, rtol=0)


def assert_maps_close(maps, ref_maps):
    """Positions (metres) to 1e-5; unit normals to 2e-4 (0.01°): a vertex sums its faces' normals in
    another order than the twin's scatter-adds, and where they nearly cancel (fingers, ears)
    normalising magnifies float32 rounding (5e-5 seen)."""
    torch.testing.assert_close(maps[:, 3:], ref_maps[:, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(maps[:, :3], ref_maps[:, :3], atol=2e-4, rtol=0)


@pytest.mark.parametrize("path", ["numba", "torch"])
@torch.inference_mode()
def test_float32_fast_path_gives_the_reference_maps_and_gaussians(body, path, monkeypatch):
    """Through the CPU's numba kernels and through the PyTorch fast path (CUDA's, and the CPU's
    without numba), maps and Gaussians are the float32 twin's."""
    avatar = load_avatar(REFERENCES[0], body).eval()
    if path == "torch":
        monkeypatch.setattr(realtime, "frame_kernels", lambda avatar: None)
    fast = RealtimeAvatar(avatar, "float32")
    if path == "numba":
        assert fast.kernels is not None or realtime.frame_kernels(avatar) is None
    else:
        assert fast.kernels is None
    gen = torch.Generator().manual_seed(1)
    pose, transl = 0.3 * torch.randn(1, 55, 3, generator=gen), torch.tensor([[0.1, -0.2, 0.3]])
    maps, _ = fast.pose_inputs(pose)
    ref_maps, _ = avatar.pose_inputs(pose)
    assert maps.is_contiguous(memory_format=torch.channels_last)
    assert_maps_close(maps, ref_maps)
    for mine, ref in zip(fast(pose, transl), avatar(pose, transl).index(0)):
        torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", [p.name for p in REFERENCES] + ["sampled"])
@torch.inference_mode()
def test_bf16_fast_path_renders_trained_avatars_within_the_floor(body, sampled, which):
    """Over a clip, the bf16 fast path and the float32 reference render the same avatar within 40 dB
    (the floor), and really differ (the fast path did run in bf16)."""
    avatar = load_avatar(sampled if which == "sampled" else DEFAULT / "references" / which, body).eval()
    avatar.unet.to(memory_format=torch.channels_last)
    fast = RealtimeAvatar(avatar, "bfloat16")
    poses = procedural("walk", 3).poses
    size = 192
    K = intrinsics(size, size, 35.0)
    view = look_at(torch.tensor([0.4, 0.3, 3.2]), torch.tensor([0.0, -0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    worst = float("inf")
    for frame in range(poses.shape[0]):
        ref = render_gaussians(avatar(poses[frame:frame + 1]).index(0), view, K, size, size)[0]
        mine = render_gaussians(fast(poses[frame]), view, K, size, size)[0]
        worst = min(worst, float(psnr(mine, ref)))
    assert PSNR_FLOOR_DB < worst < 150.0, worst


NUMBA = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba missing")


@NUMBA
@pytest.mark.parametrize("skin_rotations,sh_degree", [(True, 3), (True, 1), (False, 0)])
@torch.inference_mode()
def test_fused_decoder_is_decode(body, skin_rotations, sh_degree):
    """The numba decoder against gaussians.decode (its twin) on raw outputs far from zero, a posed
    template and a global motion; and its sparse skinning weights hold every dense one."""
    from dataclasses import replace

    from hda_backend.avatar.gaussians import decode
    from hda_backend.uvmap import global_transform

    avatar = load_avatar(REFERENCES[0], body).eval()
    kernels = realtime.frame_kernels(avatar)
    config = replace(avatar.gaussian_config, skin_rotations=skin_rotations, sh_degree=sh_degree)
    gen = torch.Generator().manual_seed(11)
    pose = 0.4 * torch.randn(1, 55, 3, generator=gen)
    posed = realtime.pose_body(body, realtime.local_pose(pose))
    transforms = global_transform(body, pose, torch.tensor([[0.3, -0.1, 0.2]]))[:, None] @ posed.transforms
    raw = 0.5 * torch.randn(1, avatar.binding.texels.shape[0], 59, generator=gen)
    for dense, (ids, weights) in ((avatar.binding.weights, kernels.texel_weights), (body.weights, kernels.vertex_weights)):
        rebuilt = torch.zeros_like(dense).scatter_add_(1, torch.from_numpy(ids), torch.from_numpy(weights))
        torch.testing.assert_close(rebuilt, dense.float(), atol=0, rtol=0)
        assert ids.shape[1] < 55 // 2  # sparse: a few joints each
    fused = kernels.decode(raw, posed.rest_vertices, transforms, config)
    twin = decode(raw, avatar.binding, posed.rest_vertices, transforms, config).index(0)
    for name, mine, ref in zip(twin._fields, fused, twin):
        assert mine.shape == ref.shape, name
        torch.testing.assert_close(mine, ref, atol=2e-6, rtol=1e-5, msg=name)
    assert (twin.sh[:, (sh_degree + 1) ** 2:] == 0).all() and (twin.sh[:, :(sh_degree + 1) ** 2] != 0).any()


@NUMBA
@torch.inference_mode()
def test_fused_pose_maps_are_the_twins(body):
    """The numba maps kernel against uvmap.pose_maps (its twin: skin_points, vertex_normals, the texel
    interpolation and scatter), on a strong pose: vertices, normals and positions, zeros off the atlas."""
    from hda_backend.body import pose_transforms
    from hda_backend.uvmap import pose_maps

    avatar = load_avatar(REFERENCES[0], body).eval()
    kernels = realtime.frame_kernels(avatar)
    pose = 0.6 * torch.randn(1, 55, 3, generator=torch.Generator().manual_seed(12))
    ref_maps, posed = pose_maps(body, avatar.layout, pose)
    joints, transforms, v_rest = pose_transforms(body, realtime.local_pose(pose))
    vertices, maps = kernels.pose_maps(v_rest[0], transforms[0], joints[0, 0])
    torch.testing.assert_close(vertices, posed.vertices[0], atol=2e-6, rtol=1e-5)
    assert maps.is_contiguous(memory_format=torch.channels_last)
    assert_maps_close(maps, ref_maps)
    covered = torch.zeros(avatar.uv_res ** 2, dtype=torch.bool)
    covered[avatar.layout.texels] = True
    assert (maps.flatten(2)[0][:, ~covered] == 0).all()
    assert torch.allclose(maps.flatten(2)[0][:3, covered].norm(dim=0), torch.tensor(1.0), atol=1e-5)


FUSED = pytest.mark.skipif(not realtime.fused_conv_available("cpu"), reason="this torch lacks oneDNN's fused convolution")


@FUSED
@pytest.mark.parametrize("silu", [True, False])
@torch.inference_mode()
def test_fused_bf16_convs_are_conv_and_silu_under_autocast(silu):
    """oneDNN's conv + SiLU in one call with packed weights against the module's conv_layer under bf16
    autocast (its twin), against float32 within bf16's precision, and exactly equal to the same oneDNN
    call given the plain bf16 weights (the packing changes the layout, not the values)."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    h = torch.randn(1, 16, 20, 20, generator=gen).contiguous(memory_format=torch.channels_last)
    fused = realtime.FusedBf16Convs()(conv, h.to(torch.bfloat16), silu).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        twin = conv_layer(conv, h, silu).float()
    exact = conv_layer(conv, h, silu)
    scale = float(exact.abs().max())
    assert float((fused - twin).abs().max()) <= 0.02 * scale
    assert float((fused - exact).abs().max()) <= 0.02 * scale
    assert float((fused - exact).abs().max()) > 0  # it did run in bf16
    plain = torch.ops.mkldnn._convolution_pointwise(
        h.to(torch.bfloat16), conv.weight.to(torch.bfloat16), conv.bias.to(torch.bfloat16), conv.padding,
        conv.stride, conv.dilation, conv.groups, "swish" if silu else "none", [], "").float()
    assert torch.equal(fused, plain)


@FUSED
def test_fused_bf16_convs_see_every_weight_edit():
    """Each way of changing a conv's weights is seen at the next call: in-place edits (through .data,
    which bypasses the version counter, too), assignment to .data, a new Parameter, load_state_dict,
    edits of inference tensors; and so is a new input size."""
    gen = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    h = torch.randn(1, 8, 12, 12, generator=gen).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
    convs = realtime.FusedBf16Convs()

    def expected(x):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return conv_layer(conv, x.float(), True).float()

    def check(x=h):
        out = convs(conv, x, True).float()
        assert float((out - expected(x)).abs().max()) <= 0.02 * float(expected(x).abs().max())
        return out

    first = check()
    with torch.inference_mode():
        assert torch.equal(convs(conv, h, True).float(), first)  # reused
    edits = [
        lambda: conv.weight.mul_(-1.5),
        lambda: conv.weight.data.mul_(-1.5),
        lambda: conv.bias.data.add_(0.3),
        lambda: setattr(conv.weight, "data", torch.randn(conv.weight.shape, generator=gen)),
        lambda: setattr(conv, "weight", torch.nn.Parameter(torch.randn(conv.weight.shape, generator=gen))),
        lambda: conv.load_state_dict({"weight": torch.randn(conv.weight.shape, generator=gen), "bias": conv.bias}),
    ]
    previous = first
    for edit in edits:
        with torch.no_grad():
            edit()
        out = check()
        assert not torch.equal(out, previous)
        previous = out
    check(torch.randn(1, 8, 20, 16, generator=gen).contiguous(memory_format=torch.channels_last).to(torch.bfloat16))
    with torch.inference_mode():  # weights without a version counter
        conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        first = check()
        conv.weight.mul_(-1.5)
        assert not torch.equal(check(), first)


@torch.inference_mode()
def test_without_the_fused_operator_the_unet_runs_under_autocast(body, monkeypatch):
    avatar = load_avatar(REFERENCES[0], body).eval()
    monkeypatch.setattr(realtime, "fused_conv_available", lambda device="cpu": False)
    fast = RealtimeAvatar(avatar, "bfloat16")
    maps, _ = fast.pose_inputs(0.2 * torch.randn(1, 55, 3, generator=torch.Generator().manual_seed(4)))
    assert not fast.fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = avatar.unet(maps)
    torch.testing.assert_close(fast.run_unet(maps), expected, atol=0, rtol=0)
    assert not RealtimeAvatar(avatar, "float32").fused and not realtime.fused_conv_available("meta")


@torch.inference_mode()
def test_reskinning_a_poses_own_unet_output_is_the_fast_path_exactly(body):
    """skin(raw_output(pose)) is __call__ (bit for bit, with the posed template reused or recomputed),
    and __call__ is still the float32 twin, Avatar itself."""
    avatar = load_avatar(REFERENCES[1], body).eval()
    fast = RealtimeAvatar(avatar, "float32")
    gen = torch.Generator().manual_seed(4)
    pose, transl = 0.3 * torch.randn(165, generator=gen), torch.tensor([0.2, 0.1, -0.3])
    raw, posed = fast.raw_output(pose)
    assert raw.shape == (1, avatar.layout.texels.shape[0], 59)
    for mine, again, full, ref in zip(fast.skin(raw, pose, transl), fast.skin(raw, pose, transl, posed),
                                      fast(pose, transl), avatar(pose.reshape(1, 55, 3), transl[None]).index(0)):
        assert torch.equal(mine, full) and torch.equal(again, full)
        torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", [p.name for p in REFERENCES])
@torch.inference_mode()
def test_reskinned_nearby_frames_render_within_the_lod_floor(body, which):
    """The level of detail: frame k's UNet output skinned to frame k + d of a walk at 24 fps
    (d < REFRESH_FRAMES, as the viewport's pose stage allows) renders within PSNR_LOD_FLOOR_DB of the full
    path at k + d, and really differs from it (the pose-dependent detail is stale)."""
    avatar = load_avatar(DEFAULT / "references" / which, body).eval()
    fast = RealtimeAvatar(avatar, "float32")
    clip = procedural("walk", 24, 24.0)
    size = 128
    K = intrinsics(size, size, 35.0)
    view = look_at(torch.tensor([0.4, 0.3, 3.2]), torch.tensor([0.0, -0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    worst, best = float("inf"), 0.0
    for k in range(0, 24, 4):
        raw, _ = fast.raw_output(clip.poses[k])
        for d in range(1, REFRESH_FRAMES):
            pose = clip.poses[(k + d) % 24]
            full = render_gaussians(fast(pose), view, K, size, size)[0]
            value = float(psnr(render_gaussians(fast.skin(raw, pose), view, K, size, size)[0], full))
            worst, best = min(worst, value), max(best, value)
    assert worst >= PSNR_LOD_FLOOR_DB and best < 80.0, (worst, best)



@pytest.mark.parametrize("which", [p.name for p in REFERENCES])
@torch.inference_mode()
def test_the_pose_stage_carries_the_output_along_the_pose_change(body, which):
    """The viewport's level of detail as the pose stage runs it (the UNet's output carried along the
    last pose change, preview.extrapolate), on a walk and a bow at 24 fps played twice: every
    re-skinned frame of the walk renders within PSNR_LOD_FLOOR_DB of the full path, and on both clips
    the worst frame is at least 2 dB closer to it than the output of the frame before re-skinned as is
    (measured 3.3-8.8 dB closer on these two avatars)."""
    avatar = load_avatar(DEFAULT / "references" / which, body).eval()
    fast = RealtimeAvatar(avatar, "float32")
    size = 128
    K = intrinsics(size, size, 35.0)
    view = look_at(torch.tensor([0.4, 0.3, 3.2]), torch.tensor([0.0, -0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    for clip in ("walk", "bow"):
        poses = procedural(clip, 24, 24.0).poses.reshape(24, -1).numpy()
        full = [render_gaussians(fast(p), view, K, size, size)[0] for p in poses]
        raws = [fast.raw_output(p)[0] for p in poses]
        stage, carried, as_is = PoseStage(), [], []
        for i in range(48):
            k = i % 24
            runs = stage.unet_runs
            request = PreviewRequest(fast, poses[k], np.zeros(3, np.float32), poses[k].tobytes(), None, None,
                                     size, size, "flat", 1, True)
            g = stage(request)[1]
            if stage.unet_runs == runs and i > 1:
                carried.append(float(psnr(render_gaussians(g, view, K, size, size)[0], full[k])))
                stale = render_gaussians(fast.skin(raws[k - 1], poses[k]), view, K, size, size)[0]
                as_is.append(float(psnr(stale, full[k])))
        assert len(carried) == 23 and stage.unet_runs == 24   # every 2nd frame; frame 1 (as is) left out
        assert min(carried) >= min(as_is) + 2.0, (clip, min(carried), min(as_is))
        if clip == "walk":
            assert min(carried) >= PSNR_LOD_FLOOR_DB, min(carried)

@pytest.mark.parametrize("which", [p.name for p in REFERENCES])
@torch.inference_mode()
def test_with_look_ahead_the_frames_between_interpolate(body, which):
    """The level of detail with look-ahead (each request names the pose REFRESH_FRAMES frames on, the
    worker's follow_up runs the UNet on it): on a walk, a bow and a jumping jack at 24 fps played
    twice, the frames reaching a predicted pose are the full path bit for bit, the UNet runs on the
    critical path once, and the frames between, interpolated, are at least 4 dB closer to the full path
    in the worst frame than without look-ahead (carried; measured 6.8-9.3 dB closer here), and within
    PSNR_LOD_FLOOR_DB of it on the walk and bow."""
    avatar = load_avatar(DEFAULT / "references" / which, body).eval()
    fast = RealtimeAvatar(avatar, "float32")
    size = 128
    K = intrinsics(size, size, 35.0)
    view = look_at(torch.tensor([0.4, 0.3, 3.2]), torch.tensor([0.0, -0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    for clip in ("walk", "bow", "jumping_jack"):
        poses = procedural(clip, 24, 24.0).poses.reshape(24, -1).numpy()
        full = [render_gaussians(fast(p), view, K, size, size)[0] for p in poses]
        worst, runs = {}, {}
        for ahead in (True, False):
            stage, between = PoseStage(), []
            for i in range(48):
                k = i % 24
                request = PreviewRequest(fast, poses[k], np.zeros(3, np.float32), poses[k].tobytes(), None, None,
                                         size, size, "flat", 1, True, poses[(k + REFRESH_FRAMES) % 24] if ahead else None)
                image = render_gaussians(stage(request)[1], view, K, size, size)[0]
                stage.follow_up()
                if i % REFRESH_FRAMES:
                    if i > 1:  # frame 1 re-skins as is without look-ahead: no pose change to follow yet
                        between.append(float(psnr(image, full[k])))
                elif ahead:
                    assert torch.equal(image, full[k]), (clip, i)
            worst[ahead], runs[ahead] = min(between), stage.unet_runs
        assert runs == {True: 1, False: 24}  # without look-ahead: every 2nd frame
        assert worst[True] >= worst[False] + 4.0, (clip, worst)
        if clip != "jumping_jack":
            assert worst[True] >= PSNR_LOD_FLOOR_DB, (clip, worst)


def _layer_frame(rng, h, w, box):
    """A rasterizer-like frame: alpha in ``box`` (0 elsewhere), premultiplied colours, depth where covered."""
    alpha = np.zeros((h, w), np.float32)
    alpha[box] = rng.uniform(0.0, 1.0, alpha[box].shape)
    rgb = (rng.uniform(0, 1, (h, w, 3)) * alpha[..., None]).astype(np.float32)
    depth = np.where(alpha > 0, rng.uniform(1, 5, (h, w)), 0.0).astype(np.float32)
    return rgb, alpha, depth


def test_fast_layer_equals_the_reference_layer():
    rng = np.random.default_rng(0)
    h, w = 64, 80
    rgb, alpha, depth = _layer_frame(rng, h, w, np.s_[10:40, 20:61])
    alpha[12, 25] = 1e-5  # covered, but too faintly for a depth
    alpha[30, 40] = 1.25  # over 1: clipped
    rgb[30, 41] = np.float32(0.04045) * alpha[30, 41]  # the sRGB curve's knee exactly
    rgb[31, 42] = 0.001 * alpha[31, 42]  # its linear part
    rgb[32, 43] = 3.0  # colour over the alpha: clipped
    alpha[33, 44], rgb[33, 44] = 5e-7, 2.5e-7  # under the division's floor of 1e-6
    # The box touching every border of the image: rows 0 and h-1, columns 0 and w-1.
    bordered = _layer_frame(rng, h, w, np.s_[0:h, 0:w])
    bordered[1][1:-1, 1:-1] = 0.0
    bordered[1][5, 0], bordered[1][0, 7], bordered[1][h - 1, 9], bordered[1][11, w - 1] = 0.5, 3e-5, 1.0, 0.2
    empty = (rgb * 0, alpha * 0, depth * 0)
    for frame in ((rgb, alpha, depth), bordered, empty):
        ref_rgba, ref_z = to_layer_reference(*frame)
        for dtype in (np.float32, np.float16):
            for planar in (False, True):
                rgba, z = to_layer(*frame, dtype=dtype, planar=planar)
                assert rgba.shape == (h, w, 4) and rgba.dtype == dtype and z.dtype == np.float32
                assert not rgba.flags.writeable and not z.flags.writeable
                # The same float32 operations as the twin: its values bit for bit, rounded once to half
                # for float16 (half's own rounding of the twin, so within half's rounding step).
                np.testing.assert_array_equal(rgba, ref_rgba.astype(dtype))
                np.testing.assert_array_equal(z, ref_z)
                if planar:  # channel planes in memory: the EXR layer's layout, taken without a copy
                    assert rgba.transpose(2, 0, 1).flags.c_contiguous
                    if dtype == np.float16:
                        assert np.shares_memory(exr.layer_channels(rgba, z)["HDA.Combined.R"], rgba)
                else:
                    assert rgba.flags.c_contiguous  # what the viewport uploads as a texture
    assert not to_layer(*empty)[0].any() and (to_layer(*empty)[1] == DEPTH_FAR).all()
    z = to_layer(rgb, alpha, depth)[1]
    assert z[12, 25] == DEPTH_FAR and z[30, 40] == depth[30, 40]
    assert to_layer(*bordered)[1][0, 7] == DEPTH_FAR and to_layer(*bordered)[0][0, 7, 3] == np.float32(3e-5)


def test_threaded_exr_compression_writes_the_same_bytes():
    rng = np.random.default_rng(2)
    rgba = np.zeros((70, 50, 4), np.float32)
    rgba[20:55, 5:40] = rng.uniform(0, 1, (35, 35, 4))
    depth = np.where(rgba[..., 3] > 0, 3.0, DEPTH_FAR).astype(np.float32)
    channels = exr.layer_channels(rgba, depth)
    threaded = exr.encode_exr(channels, workers=3)
    exr._deflate.cache_clear()  # compress every block again, one by one
    assert threaded == exr.encode_exr(channels, workers=1)


@torch.inference_mode()
def test_rendering_only_the_avatars_sh_bands_changes_nothing(body):
    """Renders evaluate SH up to the avatar's own degree (1 for the references); the bands above are
    zero, so the degree-3 evaluation (the twin) gives the same image."""
    avatar = load_avatar(REFERENCES[0], body).eval()
    degree = avatar.gaussian_config.sh_degree
    assert degree < 3
    g = RealtimeAvatar(avatar, "float32")(procedural("walk", 2).poses[1])
    K = intrinsics(96, 96, 35.0)
    view = look_at(torch.tensor([0.3, 0.2, 3.0]), torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    low, alpha_low = render_gaussians(g, view, K, 96, 96, render_mode="RGB+ED", sh_degree=degree)
    full, alpha_full = render_gaussians(g, view, K, 96, 96, render_mode="RGB+ED", sh_degree=3)
    torch.testing.assert_close(low, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(alpha_low, alpha_full, atol=0, rtol=0)

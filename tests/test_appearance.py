"""The appearance stage of a fit (fit/appearance.py): shape offsets, projection, direct maps, regression."""

import math

import pytest
import torch

from hda_backend.avatar.gaussians import CHANNELS
from hda_backend.avatar.model import Avatar
from hda_backend.body import load_body, pose_body
from hda_backend.config import load_config
from hda_backend.fit.appearance import (colour_to_sh_dc, fit_maps, initial_map, project_colours, regress_unet,
                                        regression_loss, regression_weights, shape_offsets, visible_texels)
from hda_backend.fit.losses import photometric_loss, psnr
from hda_backend.motion import procedural
from hda_backend.render._projection import _SH_C0
from hda_backend.render.camera import intrinsics, look_at
from hda_backend.render.frames import render_gaussians
from hda_backend.uvmap import interpolate

SIZE = 96


@pytest.fixture(scope="module")
def avatar():
    config = load_config("tiny")
    return Avatar.from_init(load_body(None, 10), config.uv.res, config.unet, config.gaussians, seed=0)


def _rig(count=6):
    K = intrinsics(SIZE, SIZE, 40.0)
    views = []
    for c in range(count):
        angle = 2 * math.pi * c / count
        eye = torch.tensor([3.2 * math.sin(angle), -0.3 + (0.6 if c % 2 else -0.2), 3.2 * math.cos(angle)])
        views.append(look_at(eye, torch.tensor([0.0, -0.3, 0.0]), torch.tensor([0.0, 1.0, 0.0])))
    return views, K


def _textured_map(avatar, betas=None):
    """A raw map whose base colour is a smooth known function of the canonical surface point."""
    raw = torch.zeros(avatar.num_gaussians, 59)
    if betas is not None:
        raw[:, CHANNELS["offset"]] = shape_offsets(avatar, betas)
    rest = pose_body(avatar.body, torch.zeros(1, 55, 3)).vertices
    surface = interpolate(avatar.layout, avatar.body.faces, rest)[0]
    colour = 0.5 + 0.35 * torch.stack([torch.sin(surface[:, 1] * 4), torch.cos(surface[:, 0] * 5),
                                       torch.sin(surface[:, 2] * 6 + 1)], -1)
    raw[:, 11:14] = colour_to_sh_dc(colour)
    return raw, colour


def _scene(avatar, raw, frames=2):
    views, K = _rig()
    poses = procedural("wave", frames).poses
    images = {}
    with torch.no_grad():
        for f in range(frames):
            g = avatar.skin(raw[None], poses[f:f + 1]).index(0)
            for c, view in enumerate(views):
                rgb, alpha = render_gaussians(g, view, K, SIZE, SIZE, background=(1.0, 1.0, 1.0), sh_degree=0)
                images[c, f] = (rgb, alpha[..., 0])
    return {"camera": lambda c: (views[c], K, SIZE, SIZE), "pose": lambda f: (poses[f:f + 1], None),
            "data": lambda c, f: images[c, f], "views": [(c, f) for c in range(len(views)) for f in range(frames)]}


def test_colour_to_sh_dc_renders_back_as_the_colour():
    rgb = torch.tensor([[0.1, 0.5, 0.9]])
    assert torch.allclose(colour_to_sh_dc(rgb) * _SH_C0 + 0.5, rgb)


def test_shape_offsets_put_the_rest_pose_on_the_shaped_body(avatar):
    betas = torch.linspace(-2, 2, 10)
    raw = torch.zeros(avatar.num_gaussians, 59)
    raw[:, CHANNELS["offset"]] = shape_offsets(avatar, betas)
    means = avatar.skin(raw[None], torch.zeros(1, 55, 3)).means[0]
    shaped = pose_body(avatar.body, torch.zeros(1, 55, 3), betas[None]).vertices  # independent: the LBS path
    expected = interpolate(avatar.layout, avatar.body.faces, shaped)[0]
    assert (means - expected).abs().max() < 1e-5
    assert (means - avatar.skin(torch.zeros_like(raw)[None], torch.zeros(1, 55, 3)).means[0]).norm(dim=-1).max() > 0.01


def test_visible_texels_hide_a_plane_behind_another():
    # Two 20x20 grids of points facing the camera at z = 2 and z = 3, the far one fully behind the near one.
    xs = torch.linspace(-0.3, 0.3, 20)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    near = torch.cat([grid, torch.full((400, 1), 2.0)], 1)
    far = torch.cat([grid * 0.9, torch.full((400, 1), 3.0)], 1)
    means = torch.cat([near, far])
    normals = torch.tensor([0.0, 0.0, -1.0]).expand(800, 3)
    viewmat, K = torch.eye(4), intrinsics(SIZE, SIZE, 40.0)
    xy, seen, facing = visible_texels(means, normals, viewmat, K, SIZE, SIZE)
    assert seen[:400].all() and not seen[400:].any()
    rays = torch.nn.functional.normalize(-means, dim=-1)  # towards the camera at the origin
    assert torch.allclose(facing, (normals * rays).sum(-1), atol=1e-5) and (facing > 0.95).all()
    brute = means @ K.T
    assert torch.allclose(xy, brute[:, :2] / brute[:, 2:], atol=1e-4)


def test_projection_recovers_a_known_texture(avatar):
    betas = torch.linspace(-1, 1, 10)
    truth, colour = _textured_map(avatar, betas)
    scene = _scene(avatar, truth)
    start = truth.clone()
    start[:, 11:14] = 0
    got, weight = project_colours(avatar, start, scene["views"], scene["camera"], scene["pose"], scene["data"])
    seen = weight > 0
    assert seen.float().mean() > 0.8
    error = (got[seen] - colour[seen]).abs()
    assert error.median() < 0.03 and error.mean() < 0.06
    # initial_map also moves the Gaussians onto the shaped body and fills unseen texels
    raw = initial_map(avatar, betas, scene["views"], scene["camera"], scene["pose"], scene["data"])
    assert torch.allclose(raw[:, CHANNELS["offset"]], truth[:, CHANNELS["offset"]])
    assert torch.isfinite(raw).all()


def test_fit_maps_approaches_the_renders_of_a_known_map(avatar):
    truth, _ = _textured_map(avatar)
    scene = _scene(avatar, truth)
    weights = {"l1": 1.0, "ssim": 0.1, "lpips": 0.0, "mask": 0.1}

    def view_loss(g, cam, frame):
        image, mask = scene["data"](cam, frame)
        view, K, w, h = scene["camera"](cam)
        rgb, alpha = render_gaussians(g, view, K, w, h, background=(1.0, 1.0, 1.0), sh_degree=0)
        loss, terms = photometric_loss(rgb, alpha[..., 0], image, mask, weights)
        return loss, terms | {"psnr": psnr(rgb.detach(), image)}

    def score(raw):
        return sum(float(view_loss(avatar.skin(raw[None], scene["pose"](f)[0]).index(0), c, f)[1]["psnr"])
                   for c, f in scene["views"]) / len(scene["views"])

    start = torch.zeros_like(truth)
    fitted = fit_maps(avatar, start, scene["views"], scene["pose"], view_loss, steps=120, cameras_per_step=2)
    assert score(fitted) > score(start) + 3
    assert fitted.shape == truth.shape and fitted.requires_grad is False


def test_regression_reaches_the_map_it_is_given(avatar):
    student = Avatar.from_init(avatar.body, avatar.uv_res, avatar.unet.config, avatar.gaussian_config, seed=3)
    target, colour = _textured_map(avatar, torch.linspace(-2, 2, 10))  # smooth in the body's coordinates
    maps = student.pose_inputs(procedural("squat", 4).poses)[0]
    weights = regression_weights()

    def output():
        with torch.no_grad():
            return student.unet(maps[:1]).flatten(2)[:, :, student.binding.texels].transpose(1, 2)[0]

    before = float(regression_loss(output(), target, weights))
    regress_unet(student, target, maps, steps=300, lr=3e-3, batch=2)
    out = output()
    assert float(regression_loss(out, target, weights)) < 0.2 * before
    rendered = out[:, 11:14] * _SH_C0 + 0.5
    assert (rendered - colour).abs().median() < 0.03


def test_regression_weights_cover_every_channel_once():
    w = regression_weights()
    assert w.shape == (59,) and (w > 0).all()
    assert float(w[CHANNELS["offset"]].min()) == 1.0 and float(w[11:14].min()) == 1.0 and float(w[14]) == pytest.approx(0.3)
    pred, target = torch.zeros(2, 5, 59), torch.ones(2, 5, 59)
    assert float(regression_loss(pred, target, w)) == pytest.approx(1.0)

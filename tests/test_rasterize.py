"""`rasterize` against a brute-force reference written here, and its projection/SH against gsplat's PyTorch code.

The reference evaluates every Gaussian at every pixel in float64 and composites them in depth order with
gsplat's rules, all in plain autograd; it shares no code with the package.
"""

import importlib
import math
import subprocess
import sys

import pytest
import torch

from hda_backend.errors import HDAError
from hda_backend.render import rasterize

raster_module = importlib.import_module("hda_backend.render.rasterize")


@pytest.fixture(autouse=True)
def _one_thread():
    """The scenes are tiny: one thread is as fast, and spares the run from OpenMP threads spinning
    against other load on small machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
projection = importlib.import_module("hda_backend.render._projection")
HAS_NUMBA = raster_module.numba_available()

# --------------------------------------------------------------------------------------------------------
# Independent reference


def ref_quat_to_rotmat(q):
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z], -1),
    ], -2)


# Real SH constants and polynomials as in the original 3DGS code (sh_utils.py), not gsplat's formulation.
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def ref_sh(deg, sh, d):
    """sh [...,K,3], d [...,3] unit → [...,3]."""
    out = SH_C0 * sh[..., 0, :]
    if deg >= 1:
        x, y, z = (d[..., i:i + 1] for i in range(3))
        out = out - SH_C1 * y * sh[..., 1, :] + SH_C1 * z * sh[..., 2, :] - SH_C1 * x * sh[..., 3, :]
    if deg >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out = (out + SH_C2[0] * xy * sh[..., 4, :] + SH_C2[1] * yz * sh[..., 5, :]
               + SH_C2[2] * (2 * zz - xx - yy) * sh[..., 6, :] + SH_C2[3] * xz * sh[..., 7, :]
               + SH_C2[4] * (xx - yy) * sh[..., 8, :])
    if deg >= 3:
        out = (out + SH_C3[0] * y * (3 * xx - yy) * sh[..., 9, :] + SH_C3[1] * xy * z * sh[..., 10, :]
               + SH_C3[2] * y * (4 * zz - xx - yy) * sh[..., 11, :]
               + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12, :]
               + SH_C3[4] * x * (4 * zz - xx - yy) * sh[..., 13, :]
               + SH_C3[5] * z * (xx - yy) * sh[..., 14, :] + SH_C3[6] * x * (xx - 3 * yy) * sh[..., 15, :])
    return out


def reference_render(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None,
                     backgrounds=None, near_plane=0.01, far_plane=1e10, render_mode="RGB"):
    """Dense float64 rasterization, differentiable by autograd. Returns colors [C,H,W,D'], alphas [C,H,W,1]."""
    W, H, near, far = width, height, near_plane, far_plane
    means, quats, scales, opacities, colors = (t.double() for t in (means, quats, scales, opacities, colors))
    viewmats, Ks = viewmats.double(), Ks.double()
    R = ref_quat_to_rotmat(quats)
    cov3d = R @ torch.diag_embed(scales ** 2) @ R.transpose(-1, -2)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5,
                            torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 1, 2)  # [P,1,2]
    images, alphas = [], []
    for c in range(viewmats.shape[0]):
        Rc, tc, K = viewmats[c, :3, :3], viewmats[c, :3, 3], Ks[c]
        p = means @ Rc.T + tc
        x, y, z = p.unbind(-1)
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        # Jacobian at the centre clamped to 1.3 × the half-extent of the image plane (gsplat's rule).
        xz = torch.clamp(x / z, min=-(cx / fx + 0.15 * W / fx), max=(W - cx) / fx + 0.15 * W / fx)
        yz = torch.clamp(y / z, min=-(cy / fy + 0.15 * H / fy), max=(H - cy) / fy + 0.15 * H / fy)
        zero = torch.zeros_like(z)
        J = torch.stack([torch.stack([fx / z, zero, -fx * xz / z], -1),
                         torch.stack([zero, fy / z, -fy * yz / z], -1)], -2)
        cov2d = J @ Rc @ cov3d @ Rc.T @ J.transpose(-1, -2) + 0.3 * torch.eye(2, dtype=torch.float64)
        conic = torch.linalg.inv(cov2d)
        mean2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
        keep = ((z > near) & (z < far)).nonzero().squeeze(-1)
        keep = keep[torch.argsort(z[keep].detach(), stable=True)]
        if sh_degree is None:
            feat = colors
        else:
            campos = -Rc.T @ tc
            d = means - campos
            feat = torch.clamp_min(ref_sh(sh_degree, colors, d / d.norm(dim=-1, keepdim=True)) + 0.5, 0.0)
        if render_mode != "RGB":
            depth = z[:, None]
            feat = depth if render_mode == "ED" else torch.cat([feat, depth], -1)
        delta = pix - mean2d[keep][None]  # [P,G,2]
        sigma = 0.5 * torch.einsum("pgi,gij,pgj->pg", delta, conic[keep], delta)
        alpha = torch.clamp_max(opacities[keep] * torch.exp(-sigma), 0.999)
        alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
        with torch.no_grad():
            # gsplat stops a pixel before the Gaussian that would take T to <= 1e-4.
            stop = torch.cumprod(1 - alpha, dim=1) <= 1e-4
        alpha = torch.where(stop, torch.zeros_like(alpha), alpha)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
        weight = alpha * trans
        img = weight @ feat[keep]
        acc = weight.sum(1, keepdim=True)
        if backgrounds is not None and render_mode != "ED":
            bg = backgrounds[c].double()
            if render_mode == "RGB+ED":
                bg = torch.cat([bg, bg.new_zeros(1)])
            img = img + (1 - acc) * bg
        if render_mode != "RGB":
            img = torch.cat([img[:, :-1], img[:, -1:] / acc.clamp_min(1e-10)], -1)
        images.append(img.reshape(H, W, -1))
        alphas.append(acc.reshape(H, W, 1))
    return torch.stack(images), torch.stack(alphas)


# --------------------------------------------------------------------------------------------------------
# Scenes


def look_at(campos, target):
    """OpenCV world→camera matrix looking from campos at target, world up +y."""
    campos, target = torch.as_tensor(campos, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
    fwd = torch.nn.functional.normalize(target - campos, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(torch.tensor([0.0, -1.0, 0.0]), fwd), dim=0)
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd])
    M = torch.eye(4)
    M[:3, :3] = R
    M[:3, 3] = -R @ campos
    return M


def make_scene(seed, n=160, width=48, height=40, n_cams=2, sh_degree=None, channels=3):
    """Overlapping, anisotropic Gaussians around the origin; cameras ~3 m away see some of them leave the
    frame, and a few sit behind each camera."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.5, 0.5, 0.3])
    # A handful far to the side (partly off-screen) and behind the first camera (at z = -3).
    means[:6, 0] += torch.tensor([1.1, -1.2, 1.3, -1.0, 1.6, -1.5])
    means[6:10, 2] = torch.tensor([-3.5, -4.0, -3.2, -5.0])
    quats = torch.randn(n, 4, generator=g) * 2
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.01), math.log(0.15), generator=g))
    scales[10:20, 0] *= 3  # strongly anisotropic
    opacities = torch.empty(n).uniform_(0.05, 1.0, generator=g)
    opacities[20:30] = 0.9995  # alpha clamps at 0.999 near their centres
    if sh_degree is None:
        colors = torch.rand(n, channels, generator=g)
    else:
        colors = torch.randn(n, 16, 3, generator=g) * 0.25
    campos = [(0.0, 0.0, -3.0), (1.5, -0.8, -2.6), (-2.4, 0.5, -1.9)][:n_cams]
    viewmats = torch.stack([look_at(p, (0.0, 0.0, 0.0)) for p in campos])
    Ks = torch.stack([
        torch.tensor([[55.0 + 5 * i, 0.0, width / 2 + 3 * i], [0.0, 50.0 + 3 * i, height / 2 - 2 * i],
                      [0.0, 0.0, 1.0]])
        for i in range(n_cams)
    ])
    backgrounds = torch.rand(n_cams, 3 if sh_degree is not None else channels, generator=g)
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                viewmats=viewmats, Ks=Ks, width=width, height=height, sh_degree=sh_degree,
                backgrounds=backgrounds)


PARAMS = ("means", "quats", "scales", "opacities", "colors")


def render_with_grads(fn, scene, weights_seed=123, **kwargs):
    """Render with every Gaussian parameter requiring grad; backprop a fixed random weighting of the
    colors and alphas. Returns (colors, alphas, {name: grad})."""
    inputs = dict(scene)
    for name in PARAMS:
        inputs[name] = scene[name].clone().requires_grad_(True)
    colors, alphas = fn(**inputs, **kwargs)[:2]
    g = torch.Generator().manual_seed(weights_seed)
    wc = torch.randn(colors.shape, generator=g, dtype=torch.float64)
    wa = torch.randn(alphas.shape, generator=g, dtype=torch.float64)
    ((colors.double() * wc).sum() + (alphas.double() * wa).sum()).backward()
    return colors.detach().double(), alphas.detach().double(), {n: inputs[n].grad for n in PARAMS}


def psnr(a, b):
    return (10 * torch.log10(1.0 / ((a - b) ** 2).mean())).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")), "torch"]


def assert_matches_reference(scene, backend, render_mode="RGB"):
    out, alpha, grads = render_with_grads(rasterize, scene, backend=backend, render_mode=render_mode)
    ref, ref_alpha, ref_grads = render_with_grads(reference_render, scene, render_mode=render_mode)
    assert out.shape == ref.shape and alpha.shape == ref_alpha.shape
    n_color = out.shape[-1] - (render_mode == "RGB+ED")
    if n_color:
        assert psnr(out[..., :n_color], ref[..., :n_color]) >= 40
    assert (alpha - ref_alpha).abs().max() <= 1e-3
    assert ref_alpha.max() > 0.9 and ref_alpha.min() < 0.1  # the scene has covered and empty pixels
    for name in PARAMS:
        assert grads[name] is not None, name
        assert ref_grads[name].abs().sum() > 0, name
        assert cosine(grads[name], ref_grads[name]) >= 0.99, name
    return out, ref, ref_alpha


# --------------------------------------------------------------------------------------------------------
# Against the brute-force reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sh_degree", [None, 0, 1, 2, 3])
def test_matches_reference(backend, sh_degree):
    scene = make_scene(seed=10 + (sh_degree or 0), sh_degree=sh_degree, n_cams=2 if sh_degree else 3)
    assert_matches_reference(scene, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_other_channel_count_and_no_background(backend):
    scene = make_scene(seed=3, channels=5, width=64, height=64, n_cams=1, n=250)
    scene["backgrounds"] = None
    assert_matches_reference(scene, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expected_depth_matches_reference(backend):
    scene = make_scene(seed=4, sh_degree=3)
    out, ref, ref_alpha = assert_matches_reference(scene, backend, render_mode="RGB+ED")
    covered = ref_alpha[..., 0] > 0.5
    # Expected depth in metres; the cameras are ~3 m away, so this is a relative error of ~1e-4.
    assert (out[..., 3][covered] - ref[..., 3][covered]).abs().max() <= 1e-3
    assert ((ref[..., 3][covered] > 1.5) & (ref[..., 3][covered] < 4.5)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_only_mode(backend):
    scene = make_scene(seed=6)
    out, alpha, _ = rasterize(**scene, render_mode="ED", backend=backend)
    ref, ref_alpha = reference_render(**scene, render_mode="ED")
    assert out.shape == (2, 40, 48, 1)
    covered = ref_alpha > 0.5
    assert (out.double()[covered] - ref[covered]).abs().max() <= 1e-3


@pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")
def test_numba_kernels_match_torch_twin():
    scene = make_scene(seed=7, sh_degree=2, n=300, width=64, height=48, n_cams=3)
    torch.set_num_threads(2)  # the kernels split tiles over threads: exercise that here
    fast, fast_alpha, fast_grads = render_with_grads(rasterize, scene, backend="cpu", render_mode="RGB+ED")
    torch.set_num_threads(1)
    slow, slow_alpha, slow_grads = render_with_grads(rasterize, scene, backend="torch", render_mode="RGB+ED")
    assert psnr(fast[..., :3], slow[..., :3]) >= 60
    assert (fast_alpha - slow_alpha).abs().max() <= 1e-4
    for name in PARAMS:
        assert cosine(fast_grads[name], slow_grads[name]) >= 0.9999, name


@pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")
@pytest.mark.parametrize("sh_degree", [None, 0, 1, 2, 3])
def test_fused_projection_matches_torch_twins(sh_degree):
    fused = importlib.import_module("hda_backend.render._projection_numba")
    scene = make_scene(seed=20 + (sh_degree or 0), sh_degree=sh_degree, n=400, width=64, height=48, n_cams=3)
    scene["opacities"][:4] = 0.003  # below 1/255: culled by opacity
    if sh_degree is not None:
        scene["colors"] = scene["colors"] * 4  # some colours below 0: the clamp is exercised
    args = [scene[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    torch.set_num_threads(2)  # the kernel splits the Gaussians over threads
    radii, means2d, depths, conics, rgb = fused.project_and_shade(
        *args, 64, 48, sh_degree, raster_module.EPS2D, 0.01, 1e10)
    torch.set_num_threads(1)
    ref_radii, ref_means2d, ref_depths, ref_conics = projection.project_gaussians(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], 64, 48,
        opacities=scene["opacities"], eps2d=raster_module.EPS2D)
    assert torch.equal(radii, ref_radii)
    visible = (ref_radii > 0).all(-1)
    assert visible.sum() > 600 and (~visible).sum() >= 3 * 4  # culled: opacity, behind, off-screen
    torch.testing.assert_close(depths, ref_depths, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(means2d[visible], ref_means2d[visible], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(conics[visible], ref_conics[visible], rtol=1e-5, atol=1e-7)
    if sh_degree is None:
        assert rgb is None
    else:
        campos = torch.linalg.inv(scene["viewmats"])[:, :3, 3]
        dirs = scene["means"][None] - campos[:, None]
        ref_rgb = torch.clamp_min(projection.spherical_harmonics(sh_degree, dirs, scene["colors"]) + 0.5, 0.0)
        assert (ref_rgb == 0).any()  # the clamp at 0 is exercised
        torch.testing.assert_close(rgb, ref_rgb, rtol=2e-6, atol=1e-6)  # float32 rounding


def projection_outputs_with_grads(project, scene, sh_degree):
    """The projection's differentiable outputs (means2d, depths, conics, rgb) for ``scene`` with means, quats,
    scales and colours requiring grad, and their gradients for a fixed random weighting of every output."""
    inputs = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "colors")}
    outputs = project(inputs)
    g = torch.Generator().manual_seed(5)
    sum(((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outputs if o is not None)).backward()
    return outputs, {k: v.grad for k, v in inputs.items()}


@pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")
@pytest.mark.parametrize("sh_degree", [None, 0, 1, 2, 3])
def test_fused_projection_gradients_match_autograd_of_the_twins(sh_degree):
    fused = importlib.import_module("hda_backend.render._projection_numba")
    scene = make_scene(seed=40 + (sh_degree or 0), sh_degree=sh_degree, n=400, width=64, height=48, n_cams=3)
    scene["means"][30:40] *= torch.tensor([6.0, 6.0, 1.0])  # far outside the field of view: the Jacobian's clamp
    if sh_degree is not None:
        scene["colors"] = scene["colors"] * 4  # some colours below 0: the clamp cuts their gradient

    def fast(x):
        torch.set_num_threads(2)  # the backward splits the Gaussians over threads
        out = fused.project_and_shade(x["means"], x["quats"], x["scales"], scene["opacities"], x["colors"],
                                      scene["viewmats"], scene["Ks"], 64, 48, sh_degree, raster_module.EPS2D,
                                      0.01, 1e10)
        torch.set_num_threads(1)
        return out[1:]

    def twin(x):
        _, means2d, depths, conics = projection.project_gaussians(
            x["means"], x["quats"], x["scales"], scene["viewmats"], scene["Ks"], 64, 48,
            opacities=scene["opacities"], eps2d=raster_module.EPS2D)
        rgb = None
        if sh_degree is not None:
            campos = torch.linalg.inv(scene["viewmats"])[:, :3, 3]
            dirs = x["means"][None] - campos[:, None]
            rgb = torch.clamp_min(projection.spherical_harmonics(sh_degree, dirs, x["colors"]) + 0.5, 0.0)
        return means2d, depths, conics, rgb

    outputs, grads = projection_outputs_with_grads(fast, scene, sh_degree)
    ref_outputs, ref_grads = projection_outputs_with_grads(twin, scene, sh_degree)
    for out, ref in zip(outputs, ref_outputs):
        assert (out is None) == (ref is None)
    # The clamps are exercised: Jacobians at the edge of the widened field of view, colours cut at 0.
    means_c = scene["means"] @ scene["viewmats"][:, :3, :3].transpose(1, 2) + scene["viewmats"][:, None, :3, 3]
    fov_x = (scene["Ks"][:, 0, 2] + 0.3 * 32) / scene["Ks"][:, 0, 0]
    assert ((means_c[..., 0] / means_c[..., 2]).abs() > 1.5 * fov_x[:, None]).sum() >= 10
    if sh_degree is not None:
        assert (ref_outputs[3] == 0).any()
        assert (grads["colors"][:, (sh_degree + 1) ** 2:] == 0).all()
    else:
        assert grads["colors"] is None and ref_grads["colors"] is None
    for name in ("means", "quats", "scales") + (("colors",) if sh_degree is not None else ()):
        ref = ref_grads[name]
        assert ref.abs().max() > 0, name
        # float32 in both, summed in other orders: equal to a few ulps of the largest gradient.
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")
def test_cpu_backend_projects_with_the_fused_kernel_unless_cameras_need_gradients(monkeypatch):
    fused = raster_module._numba_projection()
    real, calls = fused.project_and_shade, []
    monkeypatch.setattr(fused, "project_and_shade", lambda *a: calls.append(1) or real(*a))
    scene = make_scene(seed=15, sh_degree=3, n_cams=2)
    with torch.no_grad():
        out, alpha, _ = rasterize(**scene, backend="cpu", render_mode="RGB+ED")
    assert calls == [1]
    ref, ref_alpha = reference_render(**scene, render_mode="RGB+ED")
    assert psnr(out[..., :3].double(), ref[..., :3]) >= 40
    assert (alpha.double() - ref_alpha).abs().max() <= 1e-3
    covered = ref_alpha[..., 0] > 0.5
    assert (out[..., 3].double()[covered] - ref[..., 3][covered]).abs().max() <= 1e-3
    # With gradients for the Gaussians (a fit) too; test_matches_reference checks those gradients.
    render_with_grads(rasterize, scene, backend="cpu")
    assert calls == [1, 1]
    # The twins run where the cameras need a gradient, and for inputs that are not float32.
    viewmats = scene["viewmats"].clone().requires_grad_(True)
    out, _, _ = rasterize(**{**scene, "viewmats": viewmats}, backend="cpu")
    out.sum().backward()
    assert viewmats.grad is not None and viewmats.grad.abs().sum() > 0
    with torch.no_grad():
        rasterize(**{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}, backend="cpu")
    assert calls == [1, 1]


def test_twin_in_float64_matches_reference_tightly():
    scene = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in make_scene(seed=8).items()}
    out, alpha, grads = render_with_grads(rasterize, scene, backend="torch")
    ref, ref_alpha, ref_grads = render_with_grads(reference_render, scene)
    assert (out - ref).abs().max() <= 1e-9
    assert (alpha - ref_alpha).abs().max() <= 1e-9
    for name in PARAMS:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_visible_gives_background_and_zero_grads(backend):
    scene = make_scene(seed=14, n=20, n_cams=1)
    scene["means"] = scene["means"] * 0.1 + torch.tensor([0.0, 0.0, -5.0])  # all behind the camera
    out, alpha, grads = render_with_grads(rasterize, scene, backend=backend)
    assert (alpha == 0).all()
    assert torch.equal(out, scene["backgrounds"].double()[:, None, None, :].expand_as(out))
    for name in PARAMS:
        assert grads[name] is not None and (grads[name] == 0).all(), name


@pytest.mark.skipif(not HAS_NUMBA, reason="numba missing")
def test_meta_shapes_and_tiles():
    scene = make_scene(seed=9, width=40, height=36, n_cams=2)
    N = scene["means"].shape[0]
    _, _, meta = rasterize(**scene, backend="cpu")
    assert meta["backend"] == "cpu"
    assert meta["radii"].shape == (2, N, 2) and meta["radii"].dtype == torch.int32
    assert meta["means2d"].shape == (2, N, 2) and meta["depths"].shape == (2, N)
    assert meta["conics"].shape == (2, N, 3) and meta["opacities"].shape == (2, N)
    assert (meta["tile_width"], meta["tile_height"]) == (3, 3)
    assert meta["isect_offsets"].shape == (2, 3, 3)
    # Behind-camera Gaussians (indices 6..9, camera 0 at z=-3) are culled.
    assert (meta["radii"][0, 6:10] == 0).all()
    # Each tile run lists only visible Gaussians, sorted front to back.
    flat, offsets = meta["flatten_ids"].long(), meta["isect_offsets"].flatten().tolist() + [len(meta["flatten_ids"])]
    depths = meta["depths"].detach().flatten()
    for a, b in zip(offsets[:-1], offsets[1:]):
        run = depths[flat[a:b]]
        assert (run[1:] >= run[:-1]).all()
    assert (meta["radii"].flatten(0, 1)[flat] > 0).all()


def test_fallback_without_numba_uses_torch_twin(monkeypatch):
    monkeypatch.setattr(raster_module, "_numba_raster", lambda: None)
    scene = make_scene(seed=11, n_cams=1)
    out, _, meta = rasterize(**scene, backend="cpu")
    ref, _ = reference_render(**scene)
    assert meta["backend"] == "torch"
    assert psnr(out.double(), ref) >= 40


def test_import_needs_neither_gsplat_nor_numba():
    code = (
        "import sys\n"
        "sys.modules['gsplat'] = None\n"
        "sys.modules['numba'] = None\n"
        "import torch\n"
        "from hda_backend.render import rasterize\n"
        "m = torch.zeros(1, 3); m[0, 2] = 2.0\n"
        "out, a, meta = rasterize(m, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1), torch.ones(1),\n"
        "    torch.ones(1, 3), torch.eye(4)[None], torch.tensor([[[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]]]), 16, 16)\n"
        "print(meta['backend'], a.max().item() > 0.5)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "True"]


# --------------------------------------------------------------------------------------------------------
# Projection and SH equal gsplat's own PyTorch implementation


def test_projection_matches_gsplat_torch_impl():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    scene = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in make_scene(seed=12, n=300).items()}
    W, H = scene["width"], scene["height"]
    covars, _ = _quat_scale_to_covar_preci(scene["quats"], scene["scales"], compute_preci=False)
    radii_g, means2d_g, depths_g, conics_g, _ = _fully_fused_projection(
        scene["means"], covars, scene["viewmats"], scene["Ks"], W, H, eps2d=0.3, near_plane=0.01, far_plane=1e10)
    radii, means2d, depths, conics = projection.project_gaussians(
        scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], W, H)
    assert torch.equal(radii, radii_g)
    valid = (radii_g > 0).all(-1)
    assert valid.sum() > 100 and (~valid).sum() >= 8  # behind the camera or off-screen
    torch.testing.assert_close(means2d[valid], means2d_g[valid], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(depths, depths_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conics[valid], conics_g[valid], rtol=1e-9, atol=1e-12)


def test_opacity_aware_radii_follow_gsplat_cuda_rule():
    scene = make_scene(seed=13, n=200)
    scene["opacities"][:5] = 0.003  # below 1/255: culled
    args = (scene["means"], scene["quats"], scene["scales"], scene["viewmats"], scene["Ks"], 48, 40)
    fixed = projection.project_gaussians(*args)[0]
    aware, _, _, conics = projection.project_gaussians(*args, opacities=scene["opacities"])
    assert (aware[:, :5] == 0).all()
    assert (aware <= fixed).all() and (aware < fixed).any()
    # The box holds every pixel with alpha >= 1/255: 2σ <= 2 ln(255·opacity) at the box edge.
    det = conics[..., 0] * conics[..., 2] - conics[..., 1] ** 2
    var_x = conics[..., 2] / det
    extend = torch.sqrt(2 * torch.log(scene["opacities"].clamp_min(1 / 255) * 255)).clamp(max=3.33)
    visible = (aware > 0).all(-1)
    assert (aware[..., 0][visible] >= (extend * var_x.sqrt())[visible] - 1e-4).all()


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_match_gsplat_torch_impl(degree):
    from gsplat.cuda._torch_impl import _spherical_harmonics

    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(2, 50, 3, generator=g, dtype=torch.float64) * 3
    coeffs = torch.randn(50, 16, 3, generator=g, dtype=torch.float64)
    ours = projection.spherical_harmonics(degree, dirs, coeffs)
    theirs = _spherical_harmonics(degree, dirs, coeffs[None].expand(2, -1, -1, -1))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Bad input: one-line HDAError naming the argument


def bad_call(**changes):
    scene = make_scene(seed=0, n=12, n_cams=1)
    scene.update(changes)
    with pytest.raises(HDAError) as info:
        rasterize(**scene)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_rejects_means_of_wrong_shape():
    assert "means" in bad_call(means=torch.zeros(12, 2)) and "[N,3]" in bad_call(means=torch.zeros(12, 2))


def test_rejects_quats_of_wrong_length():
    assert "quats" in bad_call(quats=torch.ones(11, 4))


def test_rejects_scales_of_wrong_shape():
    assert "scales" in bad_call(scales=torch.ones(12, 2))


def test_rejects_opacities_of_wrong_shape():
    assert "opacities" in bad_call(opacities=torch.ones(12, 1))


def test_rejects_colors_of_wrong_shape():
    assert "colors" in bad_call(colors=torch.ones(12, 3, 2))


def test_rejects_viewmats_of_wrong_shape():
    assert "viewmats" in bad_call(viewmats=torch.eye(4))


def test_rejects_Ks_for_other_camera_count():
    assert "Ks" in bad_call(Ks=torch.eye(3)[None].expand(2, 3, 3))


def test_rejects_backgrounds_of_wrong_width():
    assert "backgrounds" in bad_call(backgrounds=torch.zeros(1, 4))


def test_rejects_nan_in_means():
    means = torch.zeros(12, 3)
    means[3, 1] = float("nan")
    message = bad_call(means=means)
    assert "means" in message and "[3, 1]" in message and "finite" in message


def test_rejects_inf_in_means():
    means = torch.zeros(12, 3)
    means[0, 2] = float("inf")
    assert "means" in bad_call(means=means)


@pytest.mark.parametrize("field,value", [("width", 0), ("height", -4), ("width", 8193), ("height", 9000),
                                         ("width", 32.0)])
def test_rejects_bad_image_size(field, value):
    message = bad_call(**{field: value})
    assert field in message and "8192" in message


def test_rejects_unknown_render_mode():
    message = bad_call(render_mode="RGBD")
    assert "render_mode" in message and "RGB+ED" in message


def test_rejects_unknown_backend():
    message = bad_call(backend="opengl")
    assert "backend" in message and "cuda" in message


def test_rejects_sh_degree_too_large_for_coefficients():
    message = bad_call(colors=torch.zeros(12, 4, 3), sh_degree=2)
    assert "sh_degree" in message and "9" in message


def test_rejects_sh_degree_above_three():
    assert "sh_degree" in bad_call(colors=torch.zeros(12, 25, 3), sh_degree=4)


def test_rejects_near_plane_beyond_far_plane():
    assert "near_plane" in bad_call(near_plane=5.0, far_plane=1.0)


def test_cuda_backend_rejects_cpu_tensors():
    message = bad_call(backend="cuda")
    assert "cuda" in message and "CUDA tensors" in message

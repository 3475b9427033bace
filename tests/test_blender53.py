"""Blender 5.3: the extension's native path, in real Blender 5.3 (bpy 5.3 in .venv-bpy53, built by
``make test-blender53``): install, add a keyed avatar, render frames 1 and 10 natively with Cycles and
compare with the backend's own render of each pose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hda_backend.avatar.model import Avatar
from hda_backend.body import load_body
from hda_backend.config import load_config
from hda_backend.render.frames import render_gaussians
from tests.test_blender_extension import REPO, built_zip  # noqa: F401
from tests.test_blender_scene import FRAMES, _camera_by_hand, _dirs, _poses, _psnr, _run, _srgb_to_linear

BPY53_PYTHON = REPO / ".venv-bpy53" / "bin" / "python"
SAMPLES = 32                # Cycles samples per pixel of the native renders
# Measured 40.5 / 40.2 dB (frames 1 / 10) at 80x64, 32 samples; the plain conversion, without the
# rasterizer's dilation baked into the scales, gave 28.3 / 28.5 dB.
NATIVE_MIN_PSNR = 36.0

pytestmark = pytest.mark.skipif(not BPY53_PYTHON.exists(),
                                reason="no .venv-bpy53 (bpy==5.3.* on Python 3.13: `make test-blender53`)")


def _flat_frames(object_world: np.ndarray, width: int, height: int) -> dict:
    """The avatar (tiny preset, seed 3) in its own colours, rendered straight by the backend and
    linearised as the compositing layer does: linear premultiplied RGB and alpha per frame."""
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=3).eval()
    viewmat, K = _camera_by_hand(object_world, width, height)
    poses, out = _poses(), {}
    with torch.no_grad():
        for i, frame in enumerate(FRAMES):
            g = avatar(torch.tensor(poses["pose"][i:i + 1], dtype=torch.float32),
                       torch.tensor(poses["transl"][i:i + 1], dtype=torch.float32)).index(0)
            rgb, alpha = render_gaussians(g, torch.tensor(viewmat, dtype=torch.float32),
                                          torch.tensor(K, dtype=torch.float32), width, height, shading="flat")
            rgb, alpha = rgb.double().numpy(), alpha[..., 0].double().numpy()
            straight = np.clip(rgb / np.maximum(alpha, 1e-6)[..., None], 0, 1)
            out[frame] = (_srgb_to_linear(straight) * alpha[..., None], alpha)
    return out


@pytest.fixture(scope="module")
def native_run(tmp_path_factory, built_zip):  # noqa: F811
    root = tmp_path_factory.mktemp("blender53")
    return _run(BPY53_PYTHON, "native", root, _dirs(root, BPY53_PYTHON), zip=str(built_zip), samples=SAMPLES)


def test_native_render_matches_the_backend(native_run):
    report, arrays = native_run
    assert report["version"][:2] >= [5, 3] and not report["torch_at_register"]
    assert report["errors"] == {}, report["errors"]
    native = report["native"]
    assert native["type"] == 'GAUSSIAN_SPLAT' and native["parent"] == native["splats"].removesuffix("_splats")
    assert native["layer_nodes"] == []   # the compositing layer is gone: Blender renders the avatar once
    h, w = arrays["empty_1"].shape[:2]
    reference = _flat_frames(arrays["matrix_world"], w, h)
    regions = {}
    for frame in FRAMES:
        empty, got = arrays[f"empty_{frame}"], arrays[f"native_{frame}"]
        ref_rgb, ref_alpha = reference[frame]
        expected = ref_rgb + empty[..., :3] * (1 - ref_alpha[..., None])
        changed = np.abs(got[..., :3] - empty[..., :3]).max(-1) > 1e-2
        regions[frame] = ref_alpha > 0.02
        region = regions[frame] | changed
        psnr = _psnr(got[..., :3][region], expected[region])
        print(f"frame {frame}: native vs backend PSNR {psnr:.2f} dB on {region.sum()} avatar pixels")
        assert psnr >= NATIVE_MIN_PSNR, f"frame {frame}: PSNR {psnr:.1f} dB against the backend render"
        assert (changed & ~(ref_alpha > 1e-3)).sum() < 0.02 * region.sum()  # nothing far outside the avatar
    assert (regions[1] ^ regions[10]).sum() > 100
    # Each frame shows its own pose, not the other frame's (the splats follow the render's frames).
    for frame, other in ((1, 10), (10, 1)):
        ref_rgb, ref_alpha = reference[other]
        empty, got = arrays[f"empty_{frame}"], arrays[f"native_{frame}"]
        wrong = ref_rgb + empty[..., :3] * (1 - ref_alpha[..., None])
        region = regions[frame] | regions[other]
        assert _psnr(got[..., :3][region], wrong[region]) < NATIVE_MIN_PSNR - 6
    assert report["splats_after_layer"] == [True, []]

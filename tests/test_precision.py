"""bf16 autocast of the UNet (hda_backend/precision.py): chosen from the hardware, close to float32."""

from pathlib import Path

import pytest
import torch

from hda_backend import precision
from hda_backend.avatar.io import load_avatar
from hda_backend.body import load_body
from hda_backend.errors import HDAError
from hda_backend.fit.losses import psnr
from hda_backend.motion import procedural
from hda_backend.render.camera import intrinsics, look_at
from hda_backend.render.frames import render_gaussians

REFERENCE = Path(__file__).resolve().parent.parent / "assets" / "default" / "references" / "subject_000.hda.safetensors"


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, "bf16_native", lambda device="cpu": True)
    assert precision.resolve("auto") == "bfloat16"
    monkeypatch.setattr(precision, "bf16_native", lambda device="cpu": False)
    assert precision.resolve("auto") == "float32"
    assert precision.resolve("bfloat16") == "bfloat16" and precision.resolve("float32") == "float32"
    with pytest.raises(HDAError, match="precision 'half': expected one of auto, float32, bfloat16"):
        precision.resolve("half")


def test_bf16_native_answers_for_every_device_kind():
    assert isinstance(precision.bf16_native("cpu"), bool)
    assert precision.bf16_native("meta") is False
    if not torch.cuda.is_available():
        assert precision.bf16_native("cuda") is False


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(8, 8)
    with precision.autocast("bfloat16")():
        assert (a @ a).dtype == torch.bfloat16
    with precision.autocast("float32")():
        assert (a @ a).dtype == torch.float32


@torch.no_grad()
def test_bf16_unet_renders_a_trained_avatar_within_tolerance_of_float32():
    """The bundled reference avatar (a real fit), posed over a clip, rendered with its UNet in bf16 and in
    float32: the Gaussians stay float32 and the renders agree to well over 35 dB."""
    avatar = load_avatar(REFERENCE, load_body())
    poses = procedural("squat", 3).poses
    K = intrinsics(128, 128, 35.0)
    view = look_at(torch.tensor([0.0, 0.3, 3.5]), torch.tensor([0.0, -0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    worst = float("inf")
    for frame in range(3):
        images = {}
        for mode in ("float32", "bfloat16"):
            avatar.precision = mode
            g = avatar(poses[frame:frame + 1]).index(0)
            assert g.means.dtype == torch.float32 and g.sh.dtype == torch.float32
            images[mode] = render_gaussians(g, view, K, 128, 128, background=(1.0, 1.0, 1.0))[0]
        worst = min(worst, float(psnr(images["bfloat16"], images["float32"])))
    assert 35.0 < worst < 200.0  # close, and really computed in another precision
    print(f"bf16 vs float32, worst of 3 frames: {worst:.1f} dB")

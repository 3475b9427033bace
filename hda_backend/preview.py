"""The viewport's per-frame job in two stages, torch and numpy only (no Blender data), so they can run
on :class:`hda_backend.latest.LatestWins`'s worker threads while Blender's main thread reads the next
pose and draws:

1. :class:`PoseStage`: pose -> posed Gaussians through the avatar's fast path, skipped when the pose
   is the one it evaluated last (orbiting a still avatar only re-rasterizes);
2. :func:`raster_stage`: Gaussians -> the layer the viewport draws (linear premultiplied RGBA and depth,
   hda_backend.layer.to_layer) for the request's camera and size.

Run one after the other on one thread (:func:`render_preview`) they are exactly the viewport's serial
path, the twin the worker is compared with (tests/test_latest.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layer import to_layer
from .render.frames import render_gaussians


@dataclass(frozen=True)
class PreviewRequest:
    """One viewport image of one avatar. Arrays are copies owned by the request (read on the main
    thread from Blender, never Blender data)."""

    fast: object            # hda_backend.avatar.realtime.RealtimeAvatar
    pose: np.ndarray        # [165] axis-angle
    transl: np.ndarray      # [3]
    pose_key: bytes         # equal for equal poses (the quantized pose's bytes)
    viewmat: np.ndarray     # [4,4] world (avatar body frame) -> camera
    K: np.ndarray           # [3,3] intrinsics for width x height
    width: int
    height: int
    shading: str            # "flat" or "clay"
    sh_degree: int          # SH bands the avatar has


class PoseStage:
    """Stage 1: a request -> (request, Gaussians). Remembers the last pose it evaluated, per avatar
    (used by one worker thread only)."""

    def __init__(self):
        self._last: tuple | None = None   # (RealtimeAvatar, pose key, Gaussians)

    def __call__(self, request: PreviewRequest):
        last = self._last
        if last is not None and last[0] is request.fast and last[1] == request.pose_key:
            return request, last[2]
        with torch.inference_mode():
            g = request.fast(request.pose, request.transl)
        self._last = (request.fast, request.pose_key, g)
        return request, g


def raster_stage(posed) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: (request, Gaussians) -> (rgba [H,W,4], depth [H,W]) as hda_backend.layer.to_layer."""
    request, g = posed
    device = g.means.device
    with torch.inference_mode():
        out, alpha = render_gaussians(g, torch.as_tensor(request.viewmat, dtype=torch.float32, device=device),
                                      torch.as_tensor(request.K, dtype=torch.float32, device=device),
                                      int(request.width), int(request.height), shading=request.shading,
                                      render_mode="RGB+ED", sh_degree=request.sh_degree)
        out, alpha = out.cpu().numpy(), alpha[..., 0].cpu().numpy()
    return to_layer(out[..., :3], alpha, out[..., 3])


def render_preview(request: PreviewRequest) -> tuple[np.ndarray, np.ndarray]:
    """Both stages on the calling thread: the serial path."""
    return raster_stage(PoseStage()(request))

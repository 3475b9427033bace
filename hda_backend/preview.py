"""The viewport's per-frame job in two stages, torch and numpy only (no Blender data), so they can run
on :class:`hda_backend.latest.LatestWins`'s worker threads while Blender's main thread reads the next
pose and draws:

1. :class:`PoseStage`: pose -> posed Gaussians through the avatar's fast path, skipped when the pose
   is the one it evaluated last (orbiting a still avatar only re-rasterizes). A request marked
   ``lod`` (the viewport while the pose or view moves: playback, scrubbing) may instead *re-skin* the
   last UNet output: that raw output decoded with the new pose's skinning
   (``RealtimeAvatar.skin``), which costs the decode only, not the UV maps and the UNet. The UNet
   runs again on every :data:`REFRESH_FRAMES`-th such request, and always for a request without
   ``lod`` (the viewport once the playhead and view stop), so the still image is the full path's;
2. :func:`raster_stage`: Gaussians -> the layer the viewport draws (linear premultiplied RGBA and depth,
   hda_backend.layer.to_layer) for the request's camera and size.

Run one after the other on one thread (:func:`render_preview`) they are exactly the viewport's serial
path, the twin the worker is compared with (tests/test_latest.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .avatar.realtime import PSNR_FLOOR_DB
from .layer import to_layer
from .render.frames import render_gaussians

# During playback the UNet runs on one pose-stage request in this many; the others re-skin its
# output. Counting requests (not time) keeps the worker deterministic. 2 keeps the pose-dependent
# detail at most one evaluated frame stale, which renders within the fast paths' 40 dB of the full path
# (measured worst 41.5 dB on the bundled references at 1 frame of a 24 fps walk, 35.2 at 2, 32.0 at 3;
# tests/test_realtime.py), and halves the UNet's cost during playback (README, Speed: with 4, the
# latency was lower but the images drawn while playing fell to 33 dB).
REFRESH_FRAMES = 2
# Images drawn while playing stay within this of the full path: the fast paths' own floor.
PSNR_LOD_FLOOR_DB = PSNR_FLOOR_DB


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
    lod: bool = False       # may re-skin the last UNet output (playback); False: full quality


class PoseStage:
    """Stage 1: a request -> (request, Gaussians). Remembers, per avatar, the Gaussians of the last pose
    it evaluated and the last UNet output (used by one worker thread only)."""

    def __init__(self, refresh_frames: int = REFRESH_FRAMES):
        self.refresh_frames = refresh_frames
        self._last: tuple | None = None   # (RealtimeAvatar, pose key, exact, Gaussians)
        self._raw: tuple | None = None    # (RealtimeAvatar, pose key, raw UNet output [1,M,59])
        self._reskins = 0                 # requests re-skinned since the UNet last ran
        self.unet_runs = 0

    def __call__(self, request: PreviewRequest):
        fast, key = request.fast, request.pose_key
        last = self._last
        if last is not None and last[0] is fast and last[1] == key and (last[2] or request.lod):
            return request, last[3]
        raw = self._raw
        reskin = (request.lod and raw is not None and raw[0] is fast
                  and self._reskins + 1 < self.refresh_frames)
        with torch.inference_mode():
            if reskin:
                g = fast.skin(raw[2], request.pose, request.transl)
                self._reskins += 1
                exact = raw[1] == key
            else:
                out, posed = fast.raw_output(request.pose)
                g = fast.skin(out, request.pose, request.transl, posed)
                self._raw, self._reskins, exact = (fast, key, out), 0, True
                self.unet_runs += 1
        self._last = (fast, key, exact, g)
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

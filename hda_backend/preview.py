"""The viewport's per-frame job in two stages, torch and numpy only (no Blender data), so they can run
on :class:`hda_backend.latest.LatestWins`'s worker threads while Blender's main thread reads the next
pose and draws:

1. :class:`PoseStage`: pose -> posed Gaussians through the avatar's fast path, skipped when the pose
   is the one it evaluated last (orbiting a still avatar only re-rasterizes). A request marked
   ``lod`` (the viewport while the pose or view moves: playback, scrubbing) may instead *re-skin* the
   last UNet output: that raw output decoded with the new pose's skinning
   (``RealtimeAvatar.skin``), which costs the decode only, not the UV maps and the UNet. That output
   is first carried along the pose change between the UNet's last two poses (:func:`extrapolate`;
   as is before the UNet has run on two), which follows the pose-dependent detail to first order.
   The UNet runs again
   on every :data:`REFRESH_FRAMES`-th such request, and always for a request without ``lod`` (the
   viewport once the playhead and view stop), so the still image is the full path's;
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
# detail at most one evaluated frame stale, and halves the UNet's cost during playback. On a 24 fps walk
# at 128 px that renders within the fast paths' 40 dB of the full path (worst 41.3 dB re-skinned as is,
# 44.6 carried along the pose change, on the bundled references; 35.2 and 32.0 as is at 2 and 3 frames
# stale, 36.3-41.2 carried at 3: tests/test_realtime.py, README, Speed).
REFRESH_FRAMES = 2
# Images drawn while playing a walk stay within this of the full path: the fast paths' own floor.
# Faster motions (squats, jumping jacks, arm raises at 24 fps) change the pose-dependent detail more
# in one frame and fall below it (README, Speed: the level of detail by motion).
PSNR_LOD_FLOOR_DB = PSNR_FLOOR_DB
# How far along the last pose change the UNet output is carried: a re-skinned pose at most one
# refresh interval past the newer UNet pose, or back to the older one (interpolation).
EXTRAPOLATE_RANGE = (-1.0, 1.0)


def extrapolate(older: tuple, newer: tuple, pose: np.ndarray):
    """The UNet output for ``pose`` [165] to first order along the last pose change: older, newer: (raw
    [1,M,59], pose [165]) of the UNet's last two runs -> raw_newer + s (raw_newer - raw_older), where s
    is the projection of pose - pose_newer onto pose_newer - pose_older over the local joints (the UNet
    does not see the global orientation), clamped to :data:`EXTRAPOLATE_RANGE`. Exact where the output
    is linear in the pose along that line; the newer output itself where the two poses are equal."""
    (raw_a, pose_a), (raw_b, pose_b) = older, newer
    step = np.asarray(pose_b, np.float64)[3:] - np.asarray(pose_a, np.float64)[3:]
    norm2 = float(step @ step)
    if norm2 == 0.0:
        return raw_b
    s = float((np.asarray(pose, np.float64)[3:] - np.asarray(pose_b, np.float64)[3:]) @ step) / norm2
    s = min(max(s, EXTRAPOLATE_RANGE[0]), EXTRAPOLATE_RANGE[1])
    return raw_b if s == 0.0 else torch.lerp(raw_b, raw_a, -s)  # raw_b + s (raw_b - raw_a), one pass


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
        self._raw: tuple | None = None    # (RealtimeAvatar, pose key, raw UNet output [1,M,59], pose [165])
        self._older: tuple | None = None  # the same of the UNet run before that one
        self._reskins = 0                 # requests re-skinned since the UNet last ran
        self.unet_runs = 0

    def __call__(self, request: PreviewRequest):
        fast, key = request.fast, request.pose_key
        last = self._last
        if last is not None and last[0] is fast and last[1] == key and (last[2] or request.lod):
            return request, last[3]
        raw, older = self._raw, self._older
        reskin = (request.lod and raw is not None and raw[0] is fast
                  and self._reskins + 1 < self.refresh_frames)
        with torch.inference_mode():
            if reskin:
                exact = raw[1] == key
                # As is until the UNet has run on two poses of this avatar (the first re-skin of a clip).
                carry = not exact and older is not None and older[0] is fast
                out = extrapolate(older[2:], raw[2:], request.pose) if carry else raw[2]
                g = fast.skin(out, request.pose, request.transl)
                self._reskins += 1
            else:
                out, posed = fast.raw_output(request.pose)
                g = fast.skin(out, request.pose, request.transl, posed)
                if raw is not None and not np.array_equal(raw[3], request.pose):  # a pose change to follow
                    self._older = raw
                self._raw, self._reskins, exact = (fast, key, out, np.array(request.pose)), 0, True
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

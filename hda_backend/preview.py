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
   viewport once the playhead and view stop), so the still image is the full path's.
   *Look-ahead*: during playback the add-on also sends the pose the playhead will show
   REFRESH_FRAMES frames on (``ahead``, predicted from the action and checked against this frame's
   evaluated pose). Once a frame whose UNet output is its own is rasterized, the stage runs the UNet on
   that pose (:meth:`PoseStage.follow_up`, off that frame's critical path), so the frames in between
   *interpolate* between two UNet outputs instead of extrapolating, and the frame that reaches the
   predicted pose skins an output made for it, with no UNet on its critical path. A prediction the
   playhead does not reach (a jump, a constraint) is never used for that frame: it falls back to the
   path above;
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
# stale, 36.3-41.2 carried at 3: tests/test_realtime.py, README, Speed). With look-ahead, 1 (the UNet
# on every frame, ahead) did not fit 24 fps on 2 cores once it stopped sharing them with the rasterizer.
REFRESH_FRAMES = 2
# Images drawn while playing a walk stay within this of the full path: the fast paths' own floor.
# Faster motions (squats, jumping jacks, arm raises at 24 fps) change the pose-dependent detail more
# in one frame and fall below it (README, Speed: the level of detail by motion).
PSNR_LOD_FLOOR_DB = PSNR_FLOOR_DB
# How far along the last pose change the UNet output is carried: a re-skinned pose at most one
# refresh interval past the newer UNet pose, or back to the older one (interpolation).
EXTRAPOLATE_RANGE = (-1.0, 1.0)
# A pose the UNet ran on ahead of time stands for the evaluated pose when no joint differs by more
# than this (radians; 0.1 mm at a metre): Blender's float32 armature evaluation and the add-on's
# float64 prediction from the same keys differ by ~1e-6.
AHEAD_MATCH_RAD = 1e-4


def same_pose(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two poses [165] agree within :data:`AHEAD_MATCH_RAD` on every coordinate."""
    return bool(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() <= AHEAD_MATCH_RAD)


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
    ahead: np.ndarray | None = None  # [165] the pose playback shows REFRESH_FRAMES frames on, or None


class PoseStage:
    """Stage 1: a request -> (request, Gaussians). Remembers, per avatar, the Gaussians of the last pose
    it evaluated, the UNet's last two outputs and the one it ran ahead of time (used by one worker
    thread only)."""

    def __init__(self, refresh_frames: int = REFRESH_FRAMES):
        self.refresh_frames = refresh_frames
        self._last: tuple | None = None   # (RealtimeAvatar, pose key, exact, Gaussians)
        self._raw: tuple | None = None    # (RealtimeAvatar, raw UNet output [1,M,59], pose [165])
        self._older: tuple | None = None  # the same of the UNet output before that one
        self._ahead: tuple | None = None  # the same of the UNet run on a predicted pose
        self._next: tuple | None = None   # (RealtimeAvatar, pose [165]) for follow_up
        self._reskins = 0                 # requests re-skinned since the UNet output was a pose's own
        self.unet_runs = 0                # UNet runs on a request's critical path
        self.ahead_runs = 0               # UNet runs in follow_up

    def __call__(self, request: PreviewRequest):
        fast, key = request.fast, request.pose_key
        last = self._last
        self._next = None
        if last is not None and last[0] is fast and last[1] == key and (last[2] or request.lod):
            return request, last[3]
        raw, older, ahead = self._raw, self._older, self._ahead
        if ahead is not None and ahead[0] is not fast:
            ahead = self._ahead = None
        own = False  # whether the output is the UNet's on this very pose (then the next one may be prepared)
        with torch.inference_mode():
            if request.lod and ahead is not None and same_pose(ahead[2], request.pose):
                # The UNet already ran on this pose (within AHEAD_MATCH_RAD), ahead of time.
                g = fast.skin(ahead[1], request.pose, request.transl)
                self._keep(ahead)
                own, exact = True, False
            elif (request.lod and raw is not None and raw[0] is fast
                  and self._reskins + 1 < self.refresh_frames):
                exact = False
                if ahead is not None:  # between the last output and the one made ahead: interpolate
                    out = extrapolate(ahead[1:], raw[1:], request.pose)
                elif older is not None and older[0] is fast:  # follow the last pose change
                    out = extrapolate(older[1:], raw[1:], request.pose)
                else:  # as is until the UNet has run on two poses of this avatar
                    out = raw[1]
                g = fast.skin(out, request.pose, request.transl)
                self._reskins += 1
            else:
                out, posed = fast.raw_output(request.pose)
                g = fast.skin(out, request.pose, request.transl, posed)
                self._keep((fast, out, np.array(request.pose)))
                self.unet_runs += 1
                own, exact = True, True
        if own and request.lod and request.ahead is not None and not same_pose(request.ahead, request.pose):
            self._next = (fast, np.array(request.ahead))
        self._last = (fast, key, exact, g)
        return request, g

    def _keep(self, output: tuple) -> None:
        """``output`` (avatar, raw, pose) is now the newest UNet output, of the request's own pose."""
        raw = self._raw
        if raw is not None and not np.array_equal(raw[2], output[2]):  # a pose change to follow
            self._older = raw
        self._raw, self._ahead, self._reskins = output, None, 0

    def follow_up(self, wait=lambda: None) -> None:
        """After a request whose output was its own pose's: the UNet on the pose playback shows next, for
        the requests up to it. The worker thread calls it once the request's Gaussians are handed on,
        with ``wait`` blocking until that request is rasterized (hda_backend.latest)."""
        task, self._next = self._next, None
        if task is None:
            return
        wait()
        fast, pose = task
        with torch.inference_mode():
            out, _ = fast.raw_output(pose)
        self._ahead = (fast, out, pose)
        self.ahead_runs += 1


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

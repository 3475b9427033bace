"""The add-on's session state, all of it: one Blender session's, never saved anywhere, no bpy.

Everything the add-on remembers between calls lives here and nowhere else, so that the sidebar, the
preferences, the handlers and the operators read and write the same objects, and unregister forgets
all of it with one :func:`reset`. It is kept out of Blender properties so that a stale status is
never saved into a .blend or userpref.blend.

- :data:`backend`: the last *Check backend* result, the running check, the running or last install,
  the background compile of the raster kernels (kernels.py).
- :data:`caches`: loaded bodies, bone layouts and avatars, rendered frames, per-avatar errors and
  timings (runtime.py). Keys are runtime's object keys (name + saved uid), never Blender references.
- :data:`viewport`: the 3D-view draw handler, its GPU resources, per-region workers (threads that must be
  closed: `Viewport.close_workers`) and images (viewport.py).
- :data:`render`: whether Blender is rendering (handlers.py), the layer files' writer (layers.py).
- :data:`native`: what each native splat object holds now (native.py, Blender ≥ 5.3).
- :data:`fit`: the running or last fit and the avatar it is for (operators/fit.py).
- :data:`models`: loaded diffusion models (Sample Identity; diffusion_model.py).
- :data:`identity`: live identity samples running on worker threads, and the requests waiting (identity.py).
- :data:`farm`: the last *Check for Farm* result (farm.py), for the sidebar.
- :data:`registration`: the classes register() registered, the sys.path entries the preferences added.

Running child processes (checks, installs, fits), the viewport's worker threads and the layer writer's
thread must be stopped by the caller before :func:`reset`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, fields


class _Part:
    def reset(self) -> None:
        """Back to the state of a fresh session (new, empty containers)."""
        fresh = type(self)()
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


@dataclass
class Backend(_Part):
    last_check: dict | None = None   # probe result (see probe.run) of the last "Check backend"
    check_ok: bool = False
    check_line: str = ""             # one-line summary of the last check
    check_job: object = None         # deps.Job of a running check
    install_job: object = None       # deps.Job of the running or last install
    install_line: str = ""           # last install outcome ("installed ..." / pip's error / "cancelled")
    kernels_job: object = None       # deps.Job compiling the raster kernels in the background (kernels.py)
    kernels_line: str = ""           # its progress or outcome, for the panel and the preferences


@dataclass
class Caches(_Part):
    avatars: dict = field(default_factory=dict)      # object key -> (signature, Avatar, RealtimeAvatar)
    bodies: dict = field(default_factory=dict)       # resolved body path -> BodyModel
    layouts: dict = field(default_factory=dict)      # body sha256 -> rig.BoneLayout
    frames: OrderedDict = field(default_factory=OrderedDict)  # frame key -> (rgba, depth), least recent first
    frame_bytes: int = 0
    errors: dict = field(default_factory=dict)       # object key -> last error line, for the sidebar
    timings: dict = field(default_factory=dict)      # object key -> {stage: ms} of the last frame rendered
    stats: dict = field(default_factory=lambda: {"hits": 0, "misses": 0})
    file_hashes: dict = field(default_factory=dict)  # file path -> ((mtime_ns, size), sha256): avatar files, models (paths.file_sha256)

    def add_frame(self, key, rgba, depth, budget: int) -> None:
        """Keep a rendered frame within ``budget`` bytes, dropping the least recently used ones; a
        frame larger than the whole budget is not kept (budget 0: the cache is off)."""
        if rgba.nbytes + depth.nbytes > budget:
            return
        self.frames[key] = (rgba, depth)
        self.frame_bytes += rgba.nbytes + depth.nbytes
        self.trim(budget)

    def trim(self, budget: int) -> None:
        """Drop the least recently used frames until the kept ones fit in ``budget`` bytes."""
        while self.frame_bytes > budget and self.frames:
            old_rgba, old_depth = self.frames.popitem(last=False)[1]
            self.frame_bytes -= old_rgba.nbytes + old_depth.nbytes

    def drop(self, key: str) -> None:
        """Forget the avatar, timings and frames of one object key."""
        self.avatars.pop(key, None)
        self.timings.pop(key, None)
        for fk in [k for k in self.frames if k[0] == key]:
            rgba, depth = self.frames.pop(fk)
            self.frame_bytes -= rgba.nbytes + depth.nbytes


@dataclass
class Viewport(_Part):
    handle: object = None                            # the SpaceView3D draw handler
    gpu: dict = field(default_factory=dict)          # "shader", "batch": built lazily in the first draw
    views: dict = field(default_factory=dict)        # region pointer -> {"key": view key, "changed": time}
    workers: dict = field(default_factory=dict)      # (region, object key) -> hda_backend.latest.LatestWins
    requested: dict = field(default_factory=dict)    # (region, object key) -> layer key last asked for
    shown: dict = field(default_factory=dict)        # (region, object key) -> seq of the worker's result uploaded
    drawn: dict = field(default_factory=dict)        # (region, object key) -> (layer key, viewport.upload(), terms, shift)
    stats: dict = field(default_factory=dict)        # object key -> {"ms": pose -> image ms, "scale": factor}
    last_pose: dict = field(default_factory=dict)    # object key -> (pose digest, time it changed)
    frames: dict = field(default_factory=dict)       # object key -> scene frame of its last playback request
    ahead: dict = field(default_factory=dict)        # object key -> whether playback's last request looked ahead
    played: dict = field(default_factory=dict)       # object key -> {frame: pose evaluated while playing}
    unpredicted: dict = field(default_factory=dict)  # object key -> action whose keys missed the pose this play

    def close_workers(self) -> None:
        """Stop the worker threads (each finishes the stage call it is in)."""
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()

    def forget_images(self) -> None:
        """Stop the workers; forget images and textures (File > Open); the handler and shader stay."""
        self.close_workers()
        for d in (self.views, self.requested, self.shown, self.drawn, self.last_pose, self.frames, self.ahead,
                  self.played, self.unpredicted, self.stats):
            d.clear()


@dataclass
class Render(_Part):
    rendering: bool = False          # between render_pre and render_post/complete/cancel
    hidden_proxies: list = field(default_factory=list)  # shadow-only proxies hidden for a Workbench render
    before_save: tuple | None = None  # (target, [(object name, property, value)]) between save_pre and save_post
    layer_files: object = None       # hda_backend.layer_writer.LayerWriter of the layer files (layers.py); closed by unregister


@dataclass
class Native(_Part):
    written: dict = field(default_factory=dict)      # object key -> (signature, pose, camera) its splats hold


@dataclass
class Fit(_Part):
    """The session's fit (one at a time): the avatar is remembered by name and uid, never by reference."""

    job: object = None               # fitjob.FitJob, running or last
    avatar: str = ""
    uid: str = ""
    subject: str = ""
    line: str = ""                   # the outcome, for the sidebar and the operator's report

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running


@dataclass
class Models(_Part):
    loaded: dict = field(default_factory=dict)       # path -> ((mtime, size), DiffusionModel)


@dataclass
class Identity(_Part):
    """Live identity controls (identity.py): samples in flight, per avatar (object key)."""

    jobs: dict = field(default_factory=dict)         # object key -> identity.SampleJob, running or finished
    pending: dict = field(default_factory=dict)      # object key -> identity.Request to sample after the job
    quiet: int = 0                                   # > 0: an operator sets the controls; no live sampling


@dataclass
class Farm(_Part):
    checked: bool = False
    lines: list = field(default_factory=list)        # the last check's problems, one line each
    line: str = ""                                   # its summary, for the sidebar


@dataclass
class Registration(_Part):
    classes: list = field(default_factory=list)      # registered bpy classes, in order
    sys_paths: list = field(default_factory=list)    # sys.path entries the add-on appended


backend = Backend()
caches = Caches()
viewport = Viewport()
render = Render()
native = Native()
fit = Fit()
models = Models()
identity = Identity()
farm = Farm()
registration = Registration()

PARTS = (backend, caches, viewport, render, native, fit, models, identity, farm, registration)


def reset() -> None:
    """Forget everything (unregister). Child processes, handlers and timers must be gone already."""
    for part in PARTS:
        part.reset()

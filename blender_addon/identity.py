"""Sampled identities: the diffusion model's person for an avatar's identity controls (Seed, Second
Seed, Identity Mix) as a content-addressed avatar file, kept in step with the controls.

Files: ``identity_<seed>[_<seed_b>_<mix>]-<model>[-s<steps>].hda.safetensors`` in
paths.avatar_output_dir() (``//hda_avatars/`` of the saved .blend; the extension's user folder before
the first save, copied into the project when it is saved: paths.keep_with_blend). <model> is the start of
the model file's sha256 and <mix> the slider at its step (:data:`MIX_STEP`), so one model, seed pair
and mix always name one file: an existing file is reused, never written again (the sampler is
deterministic, hda_backend.diffusion.sample).

Live controls: Sample Identity marks the avatar ``sampled`` and records its model and steps; from
then on a change of the controls (props.py update callbacks → :func:`controls_changed`) samples
again. With a UI the sample runs on a worker thread (torch only, never bpy: about 0.2-0.3 s per
identity with the default model on 2 cores, plus one model load of about 5 s per session) and the
:func:`tick` timer, on the main thread, hands each finished file to its avatar; changes made while a
sample runs wait as one request (the latest values), sampled next. In background mode (``blender
-b``, where no timers run) it samples at once. An avatar whose file was loaded or fitted is not
``sampled``: its controls never replace that file.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from . import session
from .diffusion_model import load_model, missing_model_text, model_digest, model_path
from .messages import error_text
from .objects import object_key
from .paths import avatar_output_dir, relative_path

MIX_STEP = 0.01          # Identity Mix resolution of sampled files (the slider shows two decimals)
DIGEST_CHARS = 12        # hex digits of the model's sha256 in a file name
TICK_SECONDS = 0.1       # how often the main thread looks for finished samples
JOIN_SECONDS = 30.0      # unregister waits this long for a sample in flight (a first model load takes ~5 s)


@dataclass(frozen=True)
class Request:
    """One identity to sample, resolved on the main thread so the worker needs no bpy."""

    model: str               # absolute path of the diffusion model file
    seed: int
    seed_b: int
    mix: float               # a multiple of MIX_STEP in [0, 1]; 0 when seed_b == seed
    steps: int | None        # DDIM steps; None: the model's
    folder: str              # where the avatar file goes
    device: str = "cpu"      # the avatar's device setting: where the model samples


def normalized(seed: int, seed_b: int, mix: float) -> tuple[int, int, float]:
    """(seed, seed_b, mix) as sampled: mix to MIX_STEP; one seed alone when the mix is 0 or both are equal."""
    mix = round(round(float(mix) / MIX_STEP) * MIX_STEP, 2)
    if seed_b == seed or mix <= 0.0:
        return int(seed), int(seed), 0.0
    return int(seed), int(seed_b), mix


def file_name(digest: str, seed: int, seed_b: int, mix: float, steps: int | None) -> str:
    """The content-addressed name of the identity (normalized values, the model file's sha256 hex)."""
    seeds = f"{seed}" + (f"_{seed_b}_{mix:.2f}" if mix > 0 else "")
    return f"identity_{seeds}-{digest[:DIGEST_CHARS]}" + (f"-s{steps}" if steps else "") + ".hda.safetensors"


def sample_file(request: Request) -> str:
    """The avatar file of ``request``: the existing one, else sampled and written (atomically). No bpy:
    it runs on the worker thread too."""
    from ..hda_backend.diffusion.sample import interpolate_noise, sample_vectors
    from ..hda_backend.diffusion.weights import write_avatar

    digest = model_digest(request.model)
    path = os.path.join(request.folder, file_name(digest, request.seed, request.seed_b, request.mix, request.steps))
    if os.path.isfile(path):
        return path
    model = load_model(request.model, request.device)
    name = os.path.basename(request.model)
    if request.mix > 0:
        vec = interpolate_noise(model, request.seed, request.seed_b, request.mix, request.steps)
        origin = f"sample:{request.seed}~{request.seed_b}@{request.mix:.2f} model:{name}"
    else:
        vec = sample_vectors(model, [request.seed], request.steps)[0]
        origin = f"sample:{request.seed} model:{name}"
    return str(write_avatar(vec, model.spec, model.meta, path, origin=origin))


def request_for(obj, model: str | None = None, steps: int | None = None) -> Request | None:
    """The identity ``obj``'s controls ask for (main thread): its recorded model and steps unless given;
    None when there is no diffusion model."""
    h = obj.hda
    path = model_path(h.identity_model if model is None else model)
    if path is None:
        return None
    seed, seed_b, mix = normalized(h.seed, h.seed_b, h.identity_mix)
    steps = h.identity_steps if steps is None else steps
    return Request(path, seed, seed_b, mix, steps or None, avatar_output_dir(), h.device)


@contextmanager
def quiet():
    """Set an avatar's identity controls without live sampling (an operator samples itself)."""
    session.identity.quiet += 1
    try:
        yield
    finally:
        session.identity.quiet -= 1


class SampleJob:
    """One request sampled on a worker thread; ``path`` or ``error`` (one line) once ``done``."""

    def __init__(self, request: Request):
        self.request = request
        self.path: str | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="hda-identity", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.path = sample_file(self.request)
        except Exception as exc:  # noqa: BLE001 - bad models and a missing backend become the avatar's error line
            self.error = error_text(exc)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def busy(obj) -> bool:
    """Whether a live sample for ``obj`` is running or waiting (the sidebar says so)."""
    key = object_key(obj)
    return key in session.identity.jobs or key in session.identity.pending


def _background() -> bool:
    import bpy

    return bpy.app.background


def _apply(obj, path: str) -> None:
    """``path`` becomes the avatar's file; the 3D views redraw with it."""
    import bpy

    obj.hda.avatar_path = relative_path(path, bpy.data.filepath)
    session.caches.errors.pop(object_key(obj), None)
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == 'VIEW_3D':
                area.tag_redraw()


def _fail(obj, line: str) -> None:
    session.caches.errors[object_key(obj)] = line
    print(f"HDA Avatars: {obj.name}: {line}", file=sys.stderr)


def controls_changed(obj) -> None:
    """Seed, Second Seed or Identity Mix of ``obj`` changed (their update callback)."""
    if session.identity.quiet or not obj.hda.sampled:
        return
    request = request_for(obj)
    if request is None:
        _fail(obj, missing_model_text())
        return
    if _background():
        try:
            _apply(obj, sample_file(request))
        except Exception as exc:  # noqa: BLE001 - an update callback cannot report: the panel and stderr show it
            _fail(obj, error_text(exc))
        return
    key = object_key(obj)
    session.identity.pending[key] = request
    if key not in session.identity.jobs:
        session.identity.jobs[key] = SampleJob(session.identity.pending.pop(key))
    import bpy

    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=TICK_SECONDS)


def _find(key: str):
    import bpy

    for obj in bpy.data.objects:
        if obj.type == 'ARMATURE' and obj.hda.is_avatar and object_key(obj) == key:
            return obj
    return None


def tick() -> float | None:
    """Timer on the main thread: hand finished samples to their avatars (a result the controls have
    moved on from is still shown while the next one samples, unless nothing newer is coming: undo),
    start the waiting requests. Returns the next interval, None when nothing is left."""
    state = session.identity
    for key, job in list(state.jobs.items()):
        if not job.done:
            continue
        del state.jobs[key]
        obj = _find(key)
        if obj is not None and obj.hda.sampled:
            if job.error:
                _fail(obj, job.error)
            elif key in state.pending or request_for(obj) == job.request:
                _apply(obj, job.path)
        if key in state.pending:
            state.jobs[key] = SampleJob(state.pending.pop(key))
    return TICK_SECONDS if state.jobs or state.pending else None


def unregister() -> None:
    """Stop the timer and wait for samples in flight (their threads never touch bpy)."""
    import bpy

    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    for job in session.identity.jobs.values():
        job.wait(JOIN_SECONDS)
    session.identity.reset()

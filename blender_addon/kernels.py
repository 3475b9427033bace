"""Compile the rasterizer's numba kernels in the background when the add-on is enabled.

The first render after installing used to stall for about half a minute while numba compiled the
raster kernels inside Blender (and the per-frame path's projection, UV-map and decoding kernels). Now, a moment after register() (a one-shot timer: register itself
starts nothing), a child process of Blender's own Python, with Blender's module path, runs
hda_backend.render.warmup.compile_kernels, which compiles every kernel into numba's on-disk cache;
Blender's first render then loads them from the cache. The child touches no bpy and imports torch
outside Blender's process, so the interface stays responsive; the panel and the preferences show its
progress (:func:`status_line`). A stamp in the extension's user folder (the kernels' source files, numba
and Python versions) skips the child on later starts once it has succeeded. Timers do not run in
``blender -b``: there the first render compiles (or loads what an earlier session cached).

Importing this module does not import bpy; the timer functions import it when they run. The child
runs this file as a script, so its module level imports nothing of the add-on (no relative imports).
"""

from __future__ import annotations

import json
import os
import sys

MARKER = "HDA_KERNELS "
ENV_ARGS = "HDA_KERNELS_ARGS"
STAMP_NAME = "kernels.json"
POLL_S = 0.5


def source_files(ext_root: str) -> list[str]:
    """The kernels' sources: every ``*_numba.py`` module of hda_backend (the modules the warm-up's
    KERNELS name), sorted."""
    found = []
    for folder, _, files in os.walk(os.path.join(ext_root, "hda_backend")):
        found += [os.path.join(folder, f) for f in files if f.endswith("_numba.py")]
    return sorted(found)


def stamp(ext_root: str, sys_path: list[str]) -> dict | None:
    """What the compiled kernels depend on: the kernels' sources (path, size, mtime), numba's and
    Python's versions; None when numba is not installed on ``sys_path``."""
    from importlib import metadata

    try:
        numba_version = next(metadata.distributions(name="numba", path=list(sys_path))).version
    except StopIteration:
        return None
    sources = []
    for path in source_files(ext_root):
        st = os.stat(path)
        sources.append([os.path.relpath(path, ext_root), st.st_size, st.st_mtime_ns])
    return {"sources": sources, "numba": numba_version, "python": sys.version.split()[0]}


def is_warm(stamp_path: str, current: dict | None) -> bool:
    try:
        with open(stamp_path) as fh:
            return current is not None and json.load(fh) == current
    except (OSError, ValueError):
        return False


def command(sys_path: list[str], ext_root: str, stamp_path: str, python: str | None = None) -> tuple[list[str], dict]:
    """(argv, env) that compile the kernels in a child process of ``python`` (default: this interpreter)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONNOUSERSITE"] = "1"
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # torch's and numba's OpenMP threads must not spin against Blender
    env[ENV_ARGS] = json.dumps({"sys_path": list(sys_path), "ext_root": str(ext_root), "stamp": stamp_path})
    return [python or sys.executable, os.path.abspath(__file__)], env


def describe(line: str) -> str | None:
    """Status text for one line of the child's output (its progress lines), None for other lines."""
    if not line.startswith(MARKER):
        return None
    done, total, stage = line[len(MARKER):].split(" ", 2)
    if done == total:
        return "kernels ready"
    return f"compiling kernels {int(done) + 1}/{total}: {stage.strip()}"


def run(sys_path: list[str], ext_root: str, stamp_path: str) -> None:
    """The child: compile, then write the stamp (atomically) so later starts skip the child."""
    sys.path[:] = list(sys_path) + [ext_root]   # hda_backend as a top-level package, as in probe.py
    from hda_backend.atomic import write_text
    from hda_backend.render.warmup import compile_kernels

    def progress(done, total, stage):
        sys.stdout.write(f"{MARKER}{done} {total} {stage}\n")
        sys.stdout.flush()

    compile_kernels(progress)
    current = stamp(ext_root, sys_path)
    if current is not None:
        os.makedirs(os.path.dirname(stamp_path), exist_ok=True)
        write_text(stamp_path, json.dumps(current))


# --------------------------------------------------------------------------------- in Blender (timers)
def _finish(job) -> None:
    from . import deps, session

    if job.state == deps.DONE:
        session.backend.kernels_line = "kernels ready"
    elif job.state == deps.CANCELLED:
        session.backend.kernels_line = "kernel compile cancelled: the first render compiles them"
    else:
        tail = [line.strip() for line in job.lines if line.strip()]
        session.backend.kernels_line = "kernel compile failed: " + (tail[-1] if tail else "no output")


def _redraw() -> None:
    import bpy

    wm = getattr(bpy.context, "window_manager", None)
    for window in getattr(wm, "windows", ()):
        for area in window.screen.areas:
            if area.type in {'PREFERENCES', 'VIEW_3D'}:
                area.tag_redraw()


def _tick():
    from . import session

    job = session.backend.kernels_job
    if job is None:
        return None
    job.poll()
    if job.running:
        session.backend.kernels_line = job.status if job.status != "starting" else "compiling kernels..."
        _redraw()
        return POLL_S
    _finish(job)
    _redraw()
    return None


def start():
    """One-shot timer callback (registered by register()): start the child unless the stamp says the
    kernels are cached already, or numba is missing (then the PyTorch rasterizer runs, nothing to compile)."""
    import bpy

    from . import deps, session
    from .paths import EXT_ROOT, user_dir

    try:
        stamp_path = os.path.join(user_dir("kernels"), STAMP_NAME)
        current = stamp(EXT_ROOT, sys.path)
    except OSError as exc:  # an unwritable user folder, a missing source: the first render compiles
        session.backend.kernels_line = f"kernels not compiled ahead: {exc}"
        return None
    if current is None:
        session.backend.kernels_line = "numba not installed: no kernels to compile"
        return None
    if is_warm(stamp_path, current):
        session.backend.kernels_line = "kernels ready"
        return None
    argv, env = command(sys.path, EXT_ROOT, stamp_path)
    session.backend.kernels_job = deps.Job(argv, env=env, describe=describe, on_exit=None).start()
    session.backend.kernels_line = "compiling kernels..."
    bpy.app.timers.register(_tick, first_interval=POLL_S)
    return None


def register() -> None:
    import bpy

    bpy.app.timers.register(start, first_interval=1.0)


def unregister() -> None:
    """Stop the child and the timers (unregister; session.reset then forgets the job)."""
    import bpy

    from . import session

    job = session.backend.kernels_job
    if job is not None and job.running:
        job.cancel()
        job.wait(timeout=10)
    for func in (start, _tick):
        while bpy.app.timers.is_registered(func):
            bpy.app.timers.unregister(func)


if __name__ == "__main__":
    args = json.loads(os.environ[ENV_ARGS])
    run(args["sys_path"], args["ext_root"], args["stamp"])

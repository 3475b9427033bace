"""Backend dependency installer: pure functions and a subprocess job, no bpy.

The add-on installs the backend's packages into the extension's *user* directory
(``bpy.utils.extension_path_user(<addon>, path="deps")``), never into Blender's own site-packages and
never into the extension's install folder (wiped on every upgrade). It runs

    <Blender's python> -m pip install --target <deps>.partial -c <constraints> ... <PINNED>

in a child process. The constraints file pins numpy to the version Blender already ships, so pip
resolves everything against Blender's numpy; the copy pip puts into the target anyway (``--target``
ignores installed packages) is deleted afterwards, and the folder is *appended* to ``sys.path``, so
Blender's own numpy always wins. Only when pip succeeds does ``<deps>.partial`` replace ``<deps>``:
a failed or cancelled install leaves the previous one untouched.

Everything here is importable and testable without Blender; the bpy layer (operators/backend.py)
only starts a :class:`Job`, polls it from a timer or modal operator, and shows its status text.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

# The backend's pins (requirements.txt minus numpy, which Blender provides). tests/ checks they agree.
PINNED = (
    "torch==2.13.0",
    "smplx==0.1.28",
    "gsplat==1.5.3",
    "safetensors>=0.4",
    "pyyaml>=6",
    "pillow>=10",
    "numba>=0.60",
    "tqdm>=4.66",
)
# Packages Blender ships that an install must never shadow: pinned to Blender's version, then pruned.
HOST_PACKAGES = ("numpy",)

# Where torch builds come from. CPU: PyTorch's CPU index first (its "+cpu" wheels sort above PyPI's
# same-version CUDA wheels), PyPI for everything else. CUDA: PyPI's default Linux torch wheel is the
# CUDA build; Windows needs PyTorch's CUDA index. macOS has one build (CPU/MPS) on PyPI.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
PYPI_INDEX = "https://pypi.org/simple"
VARIANTS = ("CPU", "CUDA")

RUNNING, DONE, FAILED, CANCELLED = "RUNNING", "DONE", "FAILED", "CANCELLED"


# --------------------------------------------------------------------------------------- command line
def pip_launcher(python: str | None = None) -> list[str]:
    """How to run pip with ``python`` (default: this interpreter, i.e. Blender's).

    ``-m pip`` when pip is importable; otherwise pip run straight from the wheel that ``ensurepip``
    bundles (a pip wheel is runnable as ``python pip.whl/pip``), so nothing is installed into
    Blender's own site-packages just to get pip.
    """
    python = python or sys.executable
    if python != sys.executable or importlib.util.find_spec("pip") is not None:
        return [python, "-m", "pip"]
    bundled = Path(importlib.util.find_spec("ensurepip").origin).parent / "_bundled"
    wheels = sorted(bundled.glob("pip-*.whl"))
    if not wheels:
        raise RuntimeError(f"{python} has neither pip nor ensurepip's bundled pip wheel")
    return [python, str(wheels[-1] / "pip")]


def host_pins(names=HOST_PACKAGES) -> dict[str, str]:
    """{name: version} of the packages this interpreter already has (Blender's numpy)."""
    from importlib import metadata

    pins = {}
    for name in names:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            spec = importlib.util.find_spec(name)
            if spec is not None:  # importable without dist-info: ask the module itself
                pins[name] = __import__(name).__version__
    return pins


def write_constraints(path: str | os.PathLike, pins: dict[str, str]) -> Path:
    path = Path(path)
    path.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    return path


def pip_command(target, packages=PINNED, *, variant="CPU", wheel_dir=None, constraints=None,
                platform=sys.platform, launcher=None) -> list[str]:
    """The pip command line that installs ``packages`` into ``target``.

    wheel_dir: install offline from this folder (``--no-index --find-links``), for machines without
    network and for tests. Otherwise torch comes from the index chosen by ``variant`` (CPU or CUDA).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    argv = list(launcher or pip_launcher())
    argv += ["install", "--target", str(target), "--no-input", "--disable-pip-version-check",
             "--no-warn-script-location", "--progress-bar", "off", "--prefer-binary"]
    if constraints:
        argv += ["-c", str(constraints)]
    if wheel_dir:
        argv += ["--no-index", "--find-links", str(wheel_dir)]
    elif variant == "CPU" and platform != "darwin":
        argv += ["--index-url", TORCH_CPU_INDEX, "--extra-index-url", PYPI_INDEX]
    elif variant == "CUDA" and platform == "win32":
        argv += ["--index-url", TORCH_CUDA_INDEX, "--extra-index-url", PYPI_INDEX]
    else:
        argv += ["--index-url", PYPI_INDEX]
    return argv + list(packages)


def subprocess_env(base=None) -> dict[str, str]:
    """Environment for the pip child: no user site, no pip target/user overrides, unbuffered output."""
    env = dict(os.environ if base is None else base)
    for key in ("PIP_TARGET", "PIP_USER", "PIP_PREFIX", "PIP_REQUIRE_VIRTUALENV", "PYTHONPATH"):
        env.pop(key, None)
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


# --------------------------------------------------------------------------------------- pip's output
_SUCCESS = re.compile(r"^Successfully installed (.+)$")


def parse_pip_line(line: str) -> str | None:
    """A short status text for one line of pip's output, or None for lines not worth showing."""
    line = line.strip()
    if not line:
        return None
    if line.startswith("ERROR:"):
        return line[len("ERROR:"):].strip()
    if line.startswith(("Collecting ", "Processing ", "Downloading ", "Building wheel", "Looking in")):
        return line if len(line) <= 120 else line[:117] + "..."
    if line.startswith("Installing collected packages:"):
        names = [n for n in line.split(":", 1)[1].split(",") if n.strip()]
        return f"Installing {len(names)} packages..."
    m = _SUCCESS.match(line)
    if m:
        return f"Installed {len(m.group(1).split())} packages"
    return None


def summarize(returncode: int | None, lines: list[str]) -> tuple[bool, str, list[str]]:
    """(ok, one-line message, installed 'name-version' list) from pip's exit status and output."""
    installed = []
    for line in lines:
        m = _SUCCESS.match(line.strip())
        if m:
            installed = m.group(1).split()
    if returncode == 0:
        if installed:
            return True, f"installed {', '.join(installed)}", installed
        return True, "nothing to install", installed
    errors = [line.strip()[len("ERROR:"):].strip() for line in lines if line.strip().startswith("ERROR:")]
    if errors:
        # pip's most specific error is the "No matching distribution" / resolver line; keep the first.
        return False, errors[0], installed
    tail = [line.strip() for line in lines if line.strip()]
    return False, (tail[-1] if tail else f"pip exited with status {returncode}"), installed


# ---------------------------------------------------------------------------------------- the target
def prune_host_packages(target: str | os.PathLike, names=HOST_PACKAGES) -> list[str]:
    """Delete copies of Blender's own packages (numpy) that pip put into ``target``; returns them."""
    target = Path(target)
    removed = []
    for name in names:
        norm = name.lower().replace("-", "_")
        for entry in target.iterdir() if target.is_dir() else ():
            low = entry.name.lower()
            stem = low.split("-", 1)[0]
            if low == norm or low == f"{norm}.libs" or (stem == norm and low.endswith((".dist-info", ".egg-info"))):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry.name)
        for script in ("f2py", "f2py.exe", "numpy-config", "numpy-config.exe") if norm == "numpy" else ():
            p = target / "bin" / script
            if p.exists():
                p.unlink()
    return sorted(removed)


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move ``new`` to ``final``, replacing what was there (the old folder is removed afterwards)."""
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def resolve_site_packages(path: str | os.PathLike, version=sys.version_info) -> Path | None:
    """The site-packages folder for "use an existing Python environment".

    Accepts the site-packages folder itself or an environment root (venv/conda: lib/pythonX.Y/
    site-packages, Windows: Lib/site-packages). None when the folder does not exist.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    for candidate in (p / "lib" / f"python{version[0]}.{version[1]}" / "site-packages",
                      p / "Lib" / "site-packages"):
        if candidate.is_dir():
            return candidate
    return p


def append_paths(paths, sys_path=None) -> list[str]:
    """Append the folders in ``paths`` not already on ``sys_path``; returns those appended."""
    sys_path = sys.path if sys_path is None else sys_path
    added = []
    for p in paths:
        p = str(p)
        if p not in sys_path:
            sys_path.append(p)
            added.append(p)
    return added


def remove_paths(paths, sys_path=None) -> None:
    sys_path = sys.path if sys_path is None else sys_path
    for p in paths:
        while str(p) in sys_path:
            sys_path.remove(str(p))


# ----------------------------------------------------------------------------------------------- jobs
class Job:
    """A child process whose output is read by a thread and consumed by :meth:`poll` on the caller's
    thread (Blender's main thread). The reader thread only moves text into a queue; it never touches
    bpy. ``describe`` turns an output line into status text; ``on_exit(job)`` runs in :meth:`poll`
    once the process has ended and may change ``state``/``message``."""

    def __init__(self, argv, *, env=None, cwd=None, describe=parse_pip_line, on_exit=None, max_lines=400):
        self.argv = [str(a) for a in argv]
        self.env, self.cwd = env, cwd
        self.describe, self.on_exit, self.max_lines = describe, on_exit, max_lines
        self.lines: list[str] = []
        self.status = "starting"
        self.message = ""
        self.state = RUNNING
        self.returncode: int | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = False
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "Job":
        # Own process group/session, so cancel() also stops pip's children (build-backend hooks).
        if sys.platform == "win32":
            kwargs = {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            kwargs = {"start_new_session": True}
        self._proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", bufsize=1, env=self.env, cwd=self.cwd, **kwargs)
        self._reader = threading.Thread(target=self._read, name="hda-job-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            self._queue.put(line.rstrip("\r\n"))
        self._proc.stdout.close()
        self._queue.put(None)

    def poll(self) -> str:
        """Consume pending output; once the process has ended and its output is read, finish."""
        if self.state != RUNNING:
            return self.state
        ended = False
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                ended = True
                break
            self.lines.append(line)
            del self.lines[:-self.max_lines]
            text = self.describe(line) if self.describe else None
            if text:
                self.status = text
        if ended:
            self._reader.join()
            self.returncode = self._proc.wait()
            self._finish()
        return self.state

    def _finish(self):
        if self._cancelled:
            self.state, self.message = CANCELLED, "cancelled"
        else:
            ok, self.message, _ = summarize(self.returncode, self.lines)
            self.state = DONE if ok else FAILED
        if self.on_exit is not None:
            try:
                self.on_exit(self)
            except Exception as exc:  # a failure while finishing (e.g. a locked folder) is a failed job
                self.state, self.message = FAILED, f"{type(exc).__name__}: {exc}"
        self.status = self.message

    def wait(self, timeout: float | None = None) -> str:
        """Block until the job ends (background mode, where no timer runs). Cancels on timeout."""
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            self.lines.append(f"ERROR: timed out after {timeout:.0f} s")
        self._reader.join()
        return self.poll()

    def cancel(self) -> None:
        """Stop the child process and its children (terminate, then kill); :meth:`poll` then reports
        CANCELLED."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._cancelled = True
        self._signal_tree(kill=False)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._signal_tree(kill=True)
            self._proc.wait()
        if sys.platform != "win32":  # children that ignored SIGTERM while their parent exited
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _signal_tree(self, kill: bool) -> None:
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self._proc.pid)], capture_output=True)
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            pass

    @property
    def running(self) -> bool:
        return self.state == RUNNING


def start_install(target, packages=PINNED, *, variant="CPU", wheel_dir=None, python=None, env=None) -> Job:
    """Install ``packages`` into ``<target>.partial`` and, on success, swap it in as ``target``.

    The returned job is running; poll it. Its ``message`` ends as "installed ..." or pip's error.
    """
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    pins = host_pins()
    constraints = write_constraints(target.with_name(target.name + ".constraints.txt"), pins)
    argv = pip_command(partial, packages, variant=variant, wheel_dir=wheel_dir, constraints=constraints,
                       launcher=pip_launcher(python))

    def on_exit(job: Job):
        if job.state == DONE:
            pruned = prune_host_packages(partial, tuple(pins))
            replace_dir(partial, target)
            if pruned:
                job.message += f" (kept Blender's own {', '.join(sorted(pins))})"
        else:
            shutil.rmtree(partial, ignore_errors=True)

    return Job(argv, env=subprocess_env(env), on_exit=on_exit).start()

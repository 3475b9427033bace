"""Fit a subject in a child process and follow its progress: no bpy, no torch.

Blender must stay responsive while an avatar fits for minutes, so the fit runs as

    <Blender's python> -c <boot> fit SUBJECT --out FILE --resume [--preset P] [--steps N] ...

i.e. ``hda fit`` (hda_backend.cli) in a child of Blender's own interpreter (``sys.executable``) with
Blender's module path (``sys.path``, which holds the extension's deps folder or the chosen existing
environment, see preferences.sync_sys_path) plus the extension's root, so ``hda_backend`` imports as a
top-level package there. The child gets its own process group; cancelling terminates the whole group.
Nothing is lost by a cancel: the fit checkpoints atomically every ``fit.checkpoint_every`` steps and the
command always passes ``--resume``, so fitting the same subject to the same file again continues from
the last checkpoint (a fresh fit when there is none).

Progress comes from two places: the step count from the progress bar the fit prints (tqdm's
``step/total``, one line per update), and loss and PSNR from the rows the fit appends to
``<out>.metrics.jsonl`` (``step``, ``loss``, ``psnr``, ... every ``fit.log_every`` steps), read
incrementally. The outcome is the exit status and the CLI's last line (``wrote ...`` or
``hda: error: ...``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import deps

try:
    from ..hda_backend.constants import AVATAR_SUFFIX, PRESETS
    from ..hda_backend.errors import HDAError
    from ..hda_backend.outputs import CHECKPOINT, beside, output_stem
except ImportError:  # blender_addon imported as a top-level package (its bpy-free tests): hda_backend beside it
    from hda_backend.constants import AVATAR_SUFFIX, PRESETS
    from hda_backend.errors import HDAError
    from hda_backend.outputs import CHECKPOINT, beside, output_stem
ENV_SYS_PATH = "HDA_FIT_SYS_PATH"
# The child's whole program: take Blender's module path, then run the CLI with the remaining argv.
BOOT = ("import json, os, sys; sys.path[:] = json.loads(os.environ['HDA_FIT_SYS_PATH']); "
        "from hda_backend.cli import main; sys.exit(main(sys.argv[1:]))")
_BAR = re.compile(r"\|\s*(\d+)/(\d+)\s*\[")
# The fit's progress bars, one per stage, named by their description's first word (fit/trainer.py):
# (that word, what the sidebar calls the stage).
STAGES = (("maps", "colour maps"), ("regress", "UNet regression"), ("fit", "end to end"))
_STAGE = re.compile(r"^\s*(" + "|".join(word for word, _ in STAGES) + r") ")
_RESUMING = re.compile(r"^resuming .* at step (\d+)/(\d+)$")
# hda_backend.render.warmup.load_from_cache's line: the fit's first run on a machine compiles the
# rasterizer's kernels in a child before its first step (about 40 s).
_COMPILING = re.compile(r"^compiling \d+ numba kernels")


@dataclass(frozen=True)
class FitFiles:
    """The files ``hda fit --out avatar`` writes (hda_backend.fit.trainer.FitPaths' naming)."""

    avatar: Path
    checkpoint: Path
    metrics: Path

    @classmethod
    def for_output(cls, out: str | os.PathLike) -> "FitFiles":
        try:
            stem = output_stem(out, AVATAR_SUFFIX)
        except HDAError as exc:
            raise ValueError(str(exc)) from None
        return cls(Path(out), beside(stem, CHECKPOINT), beside(stem, "metrics.jsonl"))


def fit_command(subject: str | os.PathLike, out: str | os.PathLike, ext_root: str | os.PathLike, *,
                preset: str | None = None, steps: int | None = None, init_from: str | None = None,
                backend: str | None = None, device: str | None = None, python: str | None = None,
                sys_path: list[str] | None = None,
                base_env: dict | None = None, numba_cache: str | None = None) -> tuple[list[str], dict]:
    """(argv, env) of the child process that fits ``subject`` into ``out``.

    preset: tiny | cpu | paper (None: the CLI's default); steps: None for the preset's; backend:
    auto | cpu | cuda (None: the preset's); device: auto | cpu | cuda[:N], where the fit's tensors live
    (None: the CLI's auto); python: default this interpreter (Blender's);
    sys_path: default this interpreter's module path; ext_root: the folder holding hda_backend/;
    numba_cache: the child's own numba cache folder. Inside Blender it must differ from Blender's:
    numba caches compiled kernels per source file, and the same file is the module
    ``hda_backend.render._raster_numba`` in the child but ``bl_ext.<repo>.hda_avatars.hda_backend...``
    in Blender, so a kernel cached by one fails to load (ModuleNotFoundError) in the other.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    FitFiles.for_output(out)
    argv = [python or sys.executable, "-c", BOOT, "fit", str(subject), "--out", str(out), "--resume"]
    if preset:
        argv += ["--preset", preset]
    if steps:
        argv += ["--steps", str(int(steps))]
    if init_from:
        argv += ["--init-from", str(init_from)]
    if backend:
        argv += ["--backend", backend]
    if device:
        argv += ["--device", device]
    env = dict(os.environ if base_env is None else base_env)
    env.pop("PYTHONPATH", None)
    paths = list(sys.path if sys_path is None else sys_path)
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE",
               **{ENV_SYS_PATH: json.dumps([str(ext_root)] + [p for p in paths if p != str(ext_root)])})
    if numba_cache:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    return argv, env


class MetricsReader:
    """Reads the rows a fit appends to its ``*.metrics.jsonl``, each complete line once.

    The fit rewrites the file (temporary file + rename) when it starts or resumes, keeping only the
    rows up to its checkpoint: a new file (another inode) or a shorter one is read again from the top.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._offset = 0
        self._inode = None
        self._partial = b""

    def poll(self) -> list[dict]:
        """New complete rows since the last call (also appended to :attr:`rows`)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._inode, self._offset, self._partial, self.rows = stat.st_ino, 0, b"", []
        if stat.st_size == self._offset:
            return []
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read(stat.st_size - self._offset)
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the rest of it
        new = []
        for line in lines:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line cut short by a kill; the fit rewrites the file on resume
            if isinstance(row, dict) and "step" in row:
                new.append(row)
        self.rows += new
        return new


@dataclass
class FitJob:
    """A running or finished fit: the child process (deps.Job) and what is known of its progress."""

    job: deps.Job
    files: FitFiles
    metrics: MetricsReader
    step: int = 0
    total: int = 0
    stage: str = ""            # which of STAGES the progress bar counts
    compiling: bool = False    # the kernels are being compiled before the first step
    outcome: str = ""          # the CLI's final line (wrote ... / hda: error: ...)
    lines: list = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.job.state

    @property
    def running(self) -> bool:
        return self.job.running

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def psnr(self) -> float | None:
        rows = self.metrics.rows
        return float(rows[-1]["psnr"]) if rows and "psnr" in rows[-1] else None

    @property
    def loss(self) -> float | None:
        rows = self.metrics.rows
        return float(rows[-1]["loss"]) if rows and "loss" in rows[-1] else None

    @property
    def message(self) -> str:
        return self.job.message

    def status(self) -> str:
        """One line for the sidebar and the status bar."""
        if not self.running:
            return self.message
        if not self.total:
            return "compiling the rasterizer's kernels (once)..." if self.compiling else "starting the fit..."
        text = f"{self.stage}: step {self.step}/{self.total}" if self.stage else f"step {self.step}/{self.total}"
        if self.psnr is not None:
            text += f", PSNR {self.psnr:.1f} dB"
        return text

    def poll(self) -> str:
        """Consume the child's output and new metrics rows; returns the job state (deps.RUNNING, ...)."""
        state = self.job.poll()
        self.metrics.poll()
        return state

    def wait(self, timeout: float | None = None) -> str:
        self.job.wait(timeout)
        return self.poll()

    def cancel(self) -> None:
        self.job.cancel()

    # deps.Job callbacks ------------------------------------------------------------------------
    def _describe(self, line: str):
        self.compiling = self.compiling or bool(_COMPILING.match(line.strip()))
        m = _BAR.search(line) or _RESUMING.match(line.strip())
        if m:
            self.step, self.total = int(m.group(1)), int(m.group(2))
            stage = _STAGE.match(line.split("\r")[-1]) if _BAR.search(line) else None
            word = stage.group(1) if stage else "fit"
            self.stage = next(name for key, name in STAGES if key == word)
        return None

    def _finish(self, job: deps.Job) -> None:
        self.metrics.poll()
        tail = [line.strip() for line in job.lines if line.strip() and not _BAR.search(line)]
        errors = [line for line in tail if line.startswith("hda: ")]
        if job.state == deps.CANCELLED:
            if self.files.checkpoint.exists():
                job.message = (f"fit cancelled at step {self.step}; its checkpoint {self.files.checkpoint.name} "
                               "keeps the progress: fit again to resume")
            else:
                job.message = f"fit cancelled at step {self.step}, before its first checkpoint"
        elif job.returncode == 0 and self.files.avatar.is_file():
            job.state, job.message = deps.DONE, (tail[-1] if tail else f"wrote {self.files.avatar}")
            self.step = self.total = max(self.total, self.step)
        else:
            job.state = deps.FAILED
            if errors:
                job.message = errors[-1].removeprefix("hda: error: ").removeprefix("hda: ")
            else:
                job.message = tail[-1] if tail else f"the fit process exited with status {job.returncode}"
        self.outcome = job.message


def start_fit(subject, out, ext_root, **kwargs) -> FitJob:
    """Start ``hda fit`` in a child process (see :func:`fit_command` for the arguments); poll the result."""
    argv, env = fit_command(subject, out, ext_root, **kwargs)
    files = FitFiles.for_output(out)
    files.avatar.parent.mkdir(parents=True, exist_ok=True)
    fit = FitJob(job=None, files=files, metrics=MetricsReader(files.metrics))
    fit.job = deps.Job(argv, env=env, describe=fit._describe, on_exit=fit._finish)
    fit.job.start()
    return fit

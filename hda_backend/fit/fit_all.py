"""``hda fit-all``: fit every subject of a dataset, sharded over processes with torch.distributed.

Run alone, or under ``torchrun --nproc_per_node=N -m hda_backend.cli fit-all ...`` (gloo on CPU, nccl
with CUDA, one GPU per rank by LOCAL_RANK; across machines with torchrun's rendezvous). As HyperDiffusion
does, the first subject is fitted in full (rank 0, while the others wait) and every other subject starts
from its weights, which is faster and keeps the fitted weights aligned for the diffusion stage;
``--init-from`` starts every subject from a given avatar instead. Subjects are dealt round-robin over
ranks; a subject whose avatar file exists is skipped, and one with a checkpoint is resumed.

Ranks wait for each other (for the first fit, and at the end) on a separate gloo group whose timeout is
``wait_hours``: a fit takes hours, far beyond the process group's default timeout (10 minutes for
NCCL), which would otherwise end the waiting ranks.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..avatar.io import SUFFIX
from ..config import Config
from ..constants import FIT_ALL_WAIT_HOURS
from ..dataset import list_subjects
from ..devices import log_stderr, rank_device, resolve_device
from ..errors import HDAError
from .trainer import FitPaths, fit_subject

INITS = ("first", "mean")  # --init: every later subject from the first fit, or from the running mean
MEANS_FOLDER = "means"


def _init_distributed(requested: str, log: Callable[[str], None]) -> tuple[int, int, bool, torch.device]:
    """(rank, world, distributed, this rank's device) for ``--device`` ``requested``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Under torchrun (which sets LOCAL_RANK) even one rank runs the distributed path, so that a single
    # GPU checks the nccl set-up (scripts/device_check.py).
    if world <= 1 and "LOCAL_RANK" not in os.environ:
        return 0, 1, False, resolve_device(requested, log)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = torch.device(rank_device(requested, int(os.environ.get("LOCAL_RANK", "0")), local,
                                      torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before nccl, or every rank's communicator uses GPU 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # Ranks on one machine share its cores: each takes its part instead of oversubscribing.
    threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    log(f"fit-all: rank {dist.get_rank()} of {dist.get_world_size()}, {dist.get_backend()} on {device}")
    return dist.get_rank(), dist.get_world_size(), True, device


def wait_group(hours: float):
    """A gloo group of every rank whose collectives time out after ``hours`` (not the default 10 min)."""
    return dist.new_group(backend="gloo", timeout=timedelta(hours=hours))


def wait_for_ranks(group, hours: float, rank: int, what: str) -> None:
    """Block until every rank of ``group`` arrives, at most ``hours``; a rank that waited longer, or
    whose peer died, ends with one line naming what it waited for."""
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(hours=hours), wait_all_ranks=True)
    except RuntimeError as exc:
        raise HDAError(f"fit-all: rank {rank} waited for {what} longer than {hours:g} h or lost a rank "
                       f"({str(exc).splitlines()[0][:160]}); raise --wait-hours, or re-run fit-all to resume") from None


def mean_rounds(count: int) -> list[range]:
    """``--init mean``'s rounds over subjects 1..count-1: round k holds indices 2^k .. 2^(k+1)-1 (the last
    one cut at ``count``), which all start from the mean of the first 2^k fits."""
    return [range(1 << k, min(2 << k, count)) for k in range(max(count - 1, 0).bit_length())]


def mean_path(out_dir: Path, first: int) -> Path:
    return out_dir / MEANS_FOLDER / f"mean_of_first_{first:05d}{SUFFIX}"


def write_mean_avatar(fits: list[Path], path: Path) -> Path:
    """The element-wise mean of the avatar files ``fits`` (one architecture), accumulated in float64 and
    written atomically to ``path`` as an ordinary avatar file."""
    from ..diffusion.weights import load_weight_set, write_avatar

    weights = load_weight_set(fits)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_avatar(weights.vectors.double().mean(dim=0).float(), weights.spec, weights.meta, path,
                        origin=f"mean of {len(fits)} fits: {fits[0].name} .. {fits[-1].name}")


def fit_all(dataset_dir, out_dir, config: Config, init_from=None, steps: int | None = None,
            backend: str | None = None, progress: bool = True, device: str = "auto",
            wait_hours: float = FIT_ALL_WAIT_HOURS, init: str = "first") -> list[dict]:
    """Fit the subjects of ``dataset_dir`` into ``out_dir/<subject>.hda.safetensors``.

    Returns this rank's log: {"subject", "status": "fitted"|"skipped", "rank"} per subject it handled;
    the same lines go to ``out_dir/fit_all.rank<k>.jsonl``. ``device``: auto | cpu | cuda[:N] (under
    torchrun, see ``devices.rank_device``); ``wait_hours``: how long ranks wait for each other;
    ``init``: "first" (every later subject from the first fit) or "mean" (from the running mean, in
    doubling rounds; see the module docstring).
    """
    if init not in INITS:
        raise HDAError(f"--init {init!r}: expected one of {', '.join(INITS)}")
    if init == "mean" and init_from is not None:
        raise HDAError("--init mean and --init-from both choose the initial weights: give one of them")
    subjects = list_subjects(dataset_dir)
    if not subjects:
        raise HDAError(f"dataset {dataset_dir}: no subject folders (with subject.json) found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not wait_hours > 0:
        raise HDAError(f"--wait-hours {wait_hours}: expected a positive number of hours")
    rank, world, distributed, rank_dev = _init_distributed(device, log_stderr)
    log: list[dict] = []
    waiting = wait_group(wait_hours) if distributed else None

    def run(subject: Path, init, n_steps):
        paths = FitPaths.for_output(out_dir / f"{subject.name}{SUFFIX}")
        if paths.avatar.is_file():
            log.append({"subject": subject.name, "status": "skipped", "rank": rank})
            return
        fit_subject(subject, paths.avatar, config, init_from=init, resume=paths.checkpoint.exists(),
                    steps=n_steps, backend=backend, progress=progress and rank == 0,
                    log=lambda m: print(f"[rank {rank}] {m}", flush=True), device=rank_dev)
        log.append({"subject": subject.name, "status": "fitted", "rank": rank})

    fits = [out_dir / f"{s.name}{SUFFIX}" for s in subjects]
    try:
        if init_from is not None:
            for subject in subjects[rank::world]:
                run(subject, init_from, steps)
        else:
            first = subjects[0]
            if rank == 0:
                run(first, None, steps)
            if distributed:
                wait_for_ranks(waiting, wait_hours, rank, f"rank 0's first fit ({first.name})")
        if init_from is None and init == "first":
            for subject in subjects[1:][rank::world]:
                run(subject, fits[0], steps)
        elif init_from is None:
            for k, members in enumerate(mean_rounds(len(subjects))):
                start = fits[0]  # the mean of one fit is that fit
                if members.start > 1:
                    start = mean_path(out_dir, members.start)
                    if rank == 0 and not start.is_file():  # written once: a resumed round reuses it
                        write_mean_avatar(fits[:members.start], start)
                    if distributed:
                        wait_for_ranks(waiting, wait_hours, rank, f"the mean of the first {members.start} fits")
                for i in members[rank::world]:
                    run(subjects[i], start, steps)
                if distributed and members.stop < len(subjects):
                    wait_for_ranks(waiting, wait_hours, rank, f"round {k}'s fits (subjects {members.start}.."
                                                              f"{members.stop - 1})")
        with (out_dir / f"fit_all.rank{rank}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in log)
        if distributed:
            wait_for_ranks(waiting, wait_hours, rank, "the other ranks' fits")
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return log

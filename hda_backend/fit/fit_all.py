"""``hda fit-all``: fit every subject of a dataset, sharded over processes with torch.distributed.

Run alone, or under ``torchrun --nproc_per_node=N -m hda_backend.cli fit-all ...`` (gloo on CPU, nccl
with CUDA; across machines with torchrun's rendezvous). As HyperDiffusion does, the first subject is
fitted in full (rank 0, while the others wait) and every other subject starts from its weights, which
is faster and keeps the fitted weights aligned for the diffusion stage; ``--init-from`` starts every
subject from a given avatar instead. Subjects are dealt round-robin over ranks; a subject whose avatar
file exists is skipped, and one with a checkpoint is resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..avatar.io import SUFFIX
from ..config import Config
from ..dataset import list_subjects
from ..errors import HDAError
from .trainer import FitPaths, fit_subject


def _init_distributed() -> tuple[int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # Ranks on one machine share its cores: each takes its part instead of oversubscribing.
    threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    return dist.get_rank(), dist.get_world_size(), True


def fit_all(dataset_dir, out_dir, config: Config, init_from=None, steps: int | None = None,
            backend: str | None = None, progress: bool = True) -> list[dict]:
    """Fit the subjects of ``dataset_dir`` into ``out_dir/<subject>.hda.safetensors``.

    Returns this rank's log: {"subject", "status": "fitted"|"skipped", "rank"} per subject it handled;
    the same lines go to ``out_dir/fit_all.rank<k>.jsonl``.
    """
    subjects = list_subjects(dataset_dir)
    if not subjects:
        raise HDAError(f"dataset {dataset_dir}: no subject folders (with subject.json) found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, distributed = _init_distributed()
    log: list[dict] = []

    def run(subject: Path, init, n_steps):
        paths = FitPaths.for_output(out_dir / f"{subject.name}{SUFFIX}")
        if paths.avatar.is_file():
            log.append({"subject": subject.name, "status": "skipped", "rank": rank})
            return
        fit_subject(subject, paths.avatar, config, init_from=init, resume=paths.checkpoint.exists(),
                    steps=n_steps, backend=backend, progress=progress and rank == 0,
                    log=lambda m: print(f"[rank {rank}] {m}", flush=True))
        log.append({"subject": subject.name, "status": "fitted", "rank": rank})

    try:
        if init_from is None:
            first, rest = subjects[0], subjects[1:]
            if rank == 0:
                run(first, None, steps)
            if distributed:
                dist.barrier()
            init = out_dir / f"{first.name}{SUFFIX}"
        else:
            rest, init = subjects, init_from
        for subject in rest[rank::world]:
            run(subject, init, steps)
        with (out_dir / f"fit_all.rank{rank}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in log)
        if distributed:
            dist.barrier()
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return log

"""The step / log / checkpoint skeleton that ``hda fit`` and ``hda train-diffusion`` share.

A long job is ``total`` optimiser steps from ``start`` (0, or a checkpoint's step). After each step the
skeleton averages the step's scalar terms since the last log row; every ``log_every`` steps (and at the
end) it hands the averages to ``on_log``; every ``checkpoint_every`` steps (and at the end) it calls
``on_checkpoint``, after which a run asked to ``stop_after`` a step returns early, as a kill would.
What a step, a row and a checkpoint are stays with each job.
"""

from __future__ import annotations

from typing import Callable

from .steplog import due


def run_steps(start: int, total: int, step: Callable[[int], dict], log_every: int, checkpoint_every: int,
              on_log: Callable[[int, dict], None], on_checkpoint: Callable[[int], None],
              stop_after: int | None = None, bar=None) -> int:
    """Run steps ``start`` .. ``total - 1``; ``step(index)`` returns {name: float}. Returns the number of
    steps done when it returned: ``total``, or the checkpointed step ``stop_after`` asked for."""
    running: dict[str, list[float]] = {}
    for index in range(start, total):
        for key, value in step(index).items():
            running.setdefault(key, []).append(float(value))
        done = index + 1
        if bar is not None:
            bar.update(1)
        if due(done, log_every, total):
            on_log(done, {k: sum(v) / len(v) for k, v in running.items()})
            running = {}
        if due(done, checkpoint_every, total):
            on_checkpoint(done)
            if stop_after is not None and stop_after <= done < total:
                return done
    return total

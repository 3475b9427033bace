"""The JSONL step logs of long jobs (``hda fit``'s metrics, ``hda train-diffusion``'s loss): one JSON
object with a ``step`` per line, cut back to a checkpoint's step on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .atomic import write_text


def read_step_log(path: Path, upto: int) -> list[dict]:
    """The rows of ``path`` with ``step`` <= ``upto``; [] if there is no file."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill; everything after it is newer than the checkpoint anyway
        if row.get("step", math.inf) <= upto:
            rows.append(row)
    return rows


def due(done: int, every: int, total: int) -> bool:
    """Whether a periodic action (log row, checkpoint) falls after step ``done``: every ``every`` steps and at the end."""
    return done % every == 0 or done == total


def append_step_log(path: Path, row: dict) -> None:
    """Add one row (a kill may cut it; :func:`read_step_log` stops there)."""
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def write_step_log(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` with ``rows`` atomically (temporary file + rename)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

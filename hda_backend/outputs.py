"""How a job names what it writes: one rule for ``hda fit``, ``fit-all`` and ``train-diffusion``.

``--out`` names the job's product, ``<stem><SUFFIX>``, where SUFFIX is its file format's (an avatar's
``.hda.safetensors``, a diffusion model's ``.safetensors``). Everything else the job writes goes beside
it as ``<stem>.<role>.<ext>``:

==========================  ===========================================
``<stem>.ckpt.safetensors``  the resumable checkpoint (:mod:`hda_backend.checkpoint`)
``<stem>.<log>.jsonl``       the step log (``metrics`` for fits, ``loss`` for diffusion)
``<stem>.<name>.png``        pictures (``curve``, ``views``)
==========================  ===========================================

A job over a folder (``fit-all``) names each item's product ``<item><SUFFIX>`` inside ``--out`` (so each
item's side files follow the rule above) and its own records ``<job>.<part>.jsonl`` there.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import HDAError

CHECKPOINT = "ckpt.safetensors"


def output_stem(out: str | os.PathLike, suffix: str, refuse: dict[str, str] | None = None) -> Path:
    """``out`` without ``suffix``; one-line HDAError if ``out`` does not end in it, is only it, or ends in a
    suffix of ``refuse`` (suffix -> what such a file is)."""
    out = Path(out)
    refuse = refuse or {}
    if not out.name.endswith(suffix) or out.name == suffix or any(out.name.endswith(r) for r in refuse):
        also = "".join(f" (and not {r}, which is {what})" for r, what in refuse.items())
        raise HDAError(f"--out {out}: expected a file name ending in {suffix}{also}")
    return out.parent / out.name[: -len(suffix)]


def beside(stem: Path, role: str) -> Path:
    """The side file ``<stem>.<role>`` (``role`` with its extension, e.g. ``"loss.jsonl"``)."""
    return Path(f"{stem}.{role}")

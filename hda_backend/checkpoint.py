"""Resumable training checkpoints: model, optimiser and RNG states in one safetensors file, written atomically.

Tensors:

===================  ===================================================================================
``model.<key>``      the model's state dict
``<group>.<key>``    further named state dicts (e.g. ``ema.*``), restored in place on load
``optim.<i>.<name>`` the optimiser's per-parameter state (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``)
``rng.data``         the state of the job's own ``torch.Generator`` (``rng`` in older fit checkpoints)
``rng.torch``        torch's global CPU RNG (``global_rng=True``: for dropout and the like)
``rng.cuda``         the current CUDA device's RNG (``global_rng=True``, when CUDA is available)
anything else        extra tensors the caller saves and does not restore (e.g. ``normalizer.*``)
===================  ===================================================================================

Metadata: ``format`` (the job's checkpoint format name), ``step``, ``seconds`` (time trained so far),
``param_groups`` (JSON of the optimiser's param groups), ``fingerprint`` (what the job was started with;
a resume with anything else is refused), and extra caller fields.

Writes go through :func:`hda_backend.atomic.atomic_save_safetensors` (an anonymous ``O_TMPFILE`` linked
into place only when complete); every save and load first sweeps temporaries a killed writer may have
left. A checkpoint that is unreadable, of another format or job, or does not fit the model ends in one
line (:class:`HDAError`) that says to delete it to start over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_save_safetensors, sweep_temporaries
from .errors import HDAError

RESTART = "delete it to start over"


def read_safetensors(path: str | os.PathLike, what: str, hint: str = "") -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file; one-line HDAError naming ``what`` and ``path`` if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise HDAError(f"{what} {path}: not a readable safetensors file ({str(exc).splitlines()[0]})"
                       + (f"; {hint}" if hint else "")) from None


def save(path: str | os.PathLike, model_state: dict, optimizer: torch.optim.Optimizer, generator: torch.Generator,
         step: int, seconds: float, fingerprint: str, fmt: str, *, groups: dict | None = None,
         tensors: dict | None = None, metadata: dict | None = None, global_rng: bool = False) -> Path:
    """Write the checkpoint ``path`` (see the module docstring). ``groups``: name -> state dict, saved as
    ``<name>.<key>`` and restored by :func:`load`; ``tensors``/``metadata``: extra entries, saved only."""
    sweep_temporaries(path)
    state = optimizer.state_dict()
    out = {f"model.{k}": v for k, v in model_state.items()}
    for name, group in (groups or {}).items():
        out.update({f"{name}.{k}": v for k, v in group.items()})
    for index, entry in state["state"].items():
        for key, value in entry.items():
            out[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    out["rng.data"] = generator.get_state()
    if global_rng:
        out["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on the GPU draws from the device's generator
            out["rng.cuda"] = torch.cuda.get_rng_state()
    out.update(tensors or {})
    fields = {"format": fmt, "step": str(step), "seconds": f"{seconds:.3f}",
              "param_groups": json.dumps(state["param_groups"]), "fingerprint": fingerprint}
    return atomic_save_safetensors(out, path, {**fields, **(metadata or {})})


def load(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator, fingerprint: str, fmt: str, *, groups: dict | None = None,
         global_rng: bool = False, started_with: str = "config") -> tuple[int, float]:
    """Restore ``model``, ``optimizer``, ``generator`` (and ``groups``' tensors in place, and torch's global
    RNGs with ``global_rng``) from ``path``; returns (step, seconds). ``started_with`` names what the
    fingerprint covers, for the error when it differs (e.g. "config, subject or --init-from")."""
    path = Path(path)
    sweep_temporaries(path)
    if not path.is_file():
        raise HDAError(f"checkpoint file not found: {path}")
    metadata, tensors = read_safetensors(path, "checkpoint", RESTART)
    if metadata.get("format") != fmt:
        raise HDAError(f"checkpoint {path}: field 'format' is {metadata.get('format')!r}, expected '{fmt}'")
    if metadata.get("fingerprint") != fingerprint:
        raise HDAError(f"checkpoint {path}: field 'fingerprint' differs from this run's {started_with}; "
                       f"resume with the same arguments, or {RESTART}")
    try:
        step, seconds = int(metadata["step"]), float(metadata["seconds"])
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for name, group in (groups or {}).items():
            for key in group:
                group[key].copy_(tensors[f"{name}.{key}"])
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        generator.set_state(tensors["rng.data"] if "rng.data" in tensors else tensors["rng"])
        if global_rng:
            torch.set_rng_state(tensors["rng.torch"])
            if torch.cuda.is_available() and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise HDAError(f"checkpoint {path}: does not fit this model ({str(exc).splitlines()[0]}); {RESTART}") from None
    return step, seconds

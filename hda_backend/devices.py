"""Which device the tensors live on: the ``--device`` choice, per-rank devices, and a guard for tests.

Every entry point takes ``--device auto|cpu|cuda[:N]``. ``auto`` picks the first CUDA device when torch
sees one, else the CPU, and says so in one log line; ``--backend`` still chooses the rasterizer (its
``auto`` follows the tensors' device). Modules own their tensors (``Avatar.to`` moves the body, UV
layout and texel binding with the UNet), and every function that creates tensors takes the device of
its inputs. :class:`DeviceGuard` checks that rule while a test runs the pipeline on another device.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from .cli_args import parse_device
from .errors import HDAError

def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_device(requested: str | torch.device | None = "auto", log: Callable[[str], None] = log_stderr,
                   cuda_count: int | None = None, name: str = "--device") -> torch.device:
    """The device for a request; ``auto`` logs one line saying what it chose and why (default: to stderr,
    beside progress bars, so that a command's stdout stays its result).

    cuda_count: the number of CUDA devices (None: ask torch). A CUDA request without CUDA, or for a
    device index torch does not see, is one clear error line."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    requested = parse_device(requested or "auto", name)
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if requested == "auto":
        if count > 0:
            chosen = torch.device("cuda", 0)
            log(f"device: auto chose {chosen} ({_cuda_name(0)}; {count} CUDA device(s) visible)")
        else:
            chosen = torch.device("cpu")
            log(f"device: auto chose cpu (torch {torch.__version__} sees no CUDA device)")
        return chosen
    if requested == "cpu":
        return torch.device("cpu")
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if count == 0:
        raise HDAError(f"{name} {requested}: torch {torch.__version__} sees no CUDA device; "
                       "expected --device cpu or auto (or a torch build with CUDA)")
    if index >= count:
        raise HDAError(f"{name} {requested}: only {count} CUDA device(s) visible, expected cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def _cuda_name(index: int) -> str:
    try:
        return torch.cuda.get_device_name(index)
    except (RuntimeError, AssertionError, AttributeError):
        return "CUDA device"


def rank_device(requested: str, local_rank: int, local_world: int, cuda_count: int) -> str:
    """The device of one torchrun rank (a pure function): "cpu" or "cuda:<local_rank>".

    requested: the ``--device`` value; local_rank / local_world: this rank and the ranks on its machine;
    cuda_count: CUDA devices this machine's torch sees. ``auto`` gives every rank its own GPU when there
    are enough of them, and the CPU when there is none; NCCL needs one GPU per rank, so fewer GPUs than
    ranks, or one ``cuda:N`` named for several ranks, is an error line, not a hang."""
    requested = parse_device(requested)
    if requested == "cpu" or (requested == "auto" and cuda_count == 0):
        return "cpu"
    if cuda_count == 0:
        raise HDAError(f"--device {requested}: torch sees no CUDA device on this machine; "
                       "expected --device cpu or auto")
    if ":" in requested:
        if local_world > 1:
            raise HDAError(f"--device {requested} with {local_world} ranks on one machine: expected --device cuda "
                           "or auto (each rank takes the GPU of its LOCAL_RANK)")
        index = int(requested.split(":")[1])
        if index >= cuda_count:
            raise HDAError(f"--device {requested}: only {cuda_count} CUDA device(s) visible, "
                           f"expected cuda:0..cuda:{cuda_count - 1}")
        return requested
    if local_world > cuda_count:
        raise HDAError(f"--device {requested}: {local_world} ranks on this machine but {cuda_count} CUDA device(s); "
                       f"expected torchrun --nproc_per_node at most {cuda_count} (NCCL needs one GPU per rank)")
    return f"cuda:{local_rank}"


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A copy of the frozen dataclass ``obj`` with ``fn`` applied to each tensor field (None kept)."""
    changes = {f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj)
               if isinstance(getattr(obj, f.name), torch.Tensor)}
    return dataclasses.replace(obj, **changes)


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors in an operation's arguments or result (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    return []


class DeviceError(AssertionError):
    """An operation mixed devices or made a tensor off the expected device (see :class:`DeviceGuard`)."""


class DeviceGuard(TorchFunctionMode):
    """Fails when, inside the ``with`` block, a torch operation takes or makes a tensor off ``device``.

    Zero-dimensional CPU tensors are allowed (PyTorch passes them to kernels of any device as scalars).
    Everything else counts: a CPU tensor created without ``device=`` (a constant that should follow its
    inputs), an input on another device (a hidden per-call copy, or an op that fails on a GPU), an
    explicit ``.to()`` from the CPU (a per-frame upload of something the module should own). The
    violations are collected and raised as one :class:`DeviceError` when the block exits."""

    def __init__(self, device: str | torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.violations: list[str] = []

    def _off(self, t: torch.Tensor) -> bool:
        if t.device.type == "cpu" and t.dim() == 0:
            return False
        if t.device.type != self.device.type:
            return True
        return self.device.index is not None and t.device.index not in (None, self.device.index)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
        for t in _tensors_in((args, kwargs)):
            if self._off(t):
                self.violations.append(f"{name} got a {t.device} tensor of shape {list(t.shape)}")
        result = func(*args, **kwargs)
        for t in _tensors_in(result):
            if self._off(t):
                self.violations.append(f"{name} made a {t.device} tensor of shape {list(t.shape)}")
        return result

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if self.violations:
            shown = "; ".join(self.violations[:5])
            more = f" (and {len(self.violations) - 5} more)" if len(self.violations) > 5 else ""
            raise DeviceError(f"expected every tensor on {self.device}: {shown}{more}") from exc
        return False

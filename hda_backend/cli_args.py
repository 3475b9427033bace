"""Argument types and config options shared by every ``hda`` subcommand module.

Kept apart from ``hda_backend/cli.py`` because that module imports the subcommand modules at load time.
"""

from __future__ import annotations

import argparse
import re

from .errors import HDAError

# Parsing must not import torch (it takes seconds): the device is checked by form here and resolved by
# hda_backend.devices when the command runs.
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the ``hda`` command and every subcommand parser."""

    def error(self, message):  # argparse's default prints usage over two lines and exits
        raise HDAError(f"{self.prog}: {message} (see --help)")


def int_in(name: str, low: int, high: int):
    """argparse type: a whole number in [low, high], else a one-line error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise HDAError(f"{name} {text!r}: expected a whole number") from None
        if not low <= value <= high:
            raise HDAError(f"{name} {value}: expected {low}..{high}")
        return value
    return parse


def parse_device(text: str, name: str = "--device") -> str:
    """The device request ``text`` checked: "auto", "cpu", "cuda" or "cuda:N" (the argparse type of
    ``--device``), else a one-line error."""
    value = str(text).strip().lower()
    if not _DEVICE.match(value):
        raise HDAError(f"{name} {text!r}: expected {DEVICE_CHOICES}")
    return value


def add_device_arg(p) -> None:
    p.add_argument("--device", type=parse_device, default="auto",
                   help="auto, cpu, cuda or cuda:N: where the tensors live (auto: the first CUDA device if "
                        "torch sees one, else the CPU, said in one log line); --backend picks the rasterizer")


def add_config_args(p) -> None:
    p.add_argument("--preset", help="tiny, cpu or paper (default: paper with CUDA, else cpu)")
    p.add_argument("--config", help="a YAML config file (may name a preset and override fields)")


def config_from_args(args):
    from .config import load_config

    if args.preset and args.config:
        raise HDAError("--preset and --config: give one; a config file names its preset itself")
    return load_config(args.config or args.preset)

"""``hda synth`` and ``hda convert``: the studio's subcommands.

Wire into ``hda_backend/cli.py`` with ``add_parsers(sub)`` in ``build_parser()`` and
``COMMANDS.update(STUDIO_COMMANDS)``. Also runnable alone: ``python -m hda_backend.studio.cli synth ...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..cli_args import Parser, int_in
from ..constants import MAX_CYCLES_SAMPLES
from ..errors import HDAError

MAX_SUBJECTS = 100_000
MAX_CAMERAS = 256
MAX_FRAMES = 100_000
MAX_SIZE = 8192


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HDAError(f"--seed {text!r}: expected a whole number") from None
    if not 0 <= value < 2 ** 63:
        raise HDAError(f"--seed {value}: expected 0..2^63-1")
    return value


def _colour(text: str) -> tuple:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise HDAError(f"--background {text!r}: expected three numbers R,G,B in [0,1]") from None
    if len(values) != 3 or not all(0 <= v <= 1 for v in values):
        raise HDAError(f"--background {text!r}: expected three numbers R,G,B in [0,1]")
    return values


def add_parsers(sub) -> None:
    """Add the ``synth`` and ``convert`` subcommands to an argparse subparsers object."""
    p = sub.add_parser("synth", help="render a synthetic multi-view dataset of clothed people with Blender")
    p.add_argument("--subjects", type=int_in("--subjects", 1, MAX_SUBJECTS), default=1)
    p.add_argument("--cameras", type=int_in("--cameras", 1, MAX_CAMERAS), default=8,
                   help="cameras on the ring, alternating between two heights")
    p.add_argument("--frames", type=int_in("--frames", 1, MAX_FRAMES), default=30,
                   help="frames per subject; a quarter of them (at least one) show the held-out test motion")
    p.add_argument("--size", type=int_in("--size", 16, MAX_SIZE), default=256, help="image width and height")
    p.add_argument("--seed", type=_seed, default=0, help="dataset seed; subject i gets its own seed from it")
    p.add_argument("--samples", type=int_in("--samples", 1, MAX_CYCLES_SAMPLES), default=16,
                   help="Cycles samples per pixel (denoised)")
    p.add_argument("--background", type=_colour, default=(1.0, 1.0, 1.0), help="R,G,B in [0,1] behind the person")
    p.add_argument("--out", required=True, help="dataset folder (re-running resumes)")

    p = sub.add_parser("convert", help="convert a real multi-view capture (MVHumanNet layout) to the dataset format")
    p.add_argument("source", help="one MVHumanNet-style capture folder")
    p.add_argument("--out", required=True, help="subject folder to write")
    p.add_argument("--frames", help="comma-separated frame names to keep (default: all with a fit)")
    p.add_argument("--cameras", help="comma-separated camera names to keep (default: all)")
    p.add_argument("--test-every", type=int_in("--test-every", 0, 1000), default=4,
                   help="hold out every n-th camera for evaluation (0: none)")
    p.add_argument("--test-frames", type=int_in("--test-frames", 0, MAX_FRAMES), default=0,
                   help="hold out the last n frames as the test motion")
    p.add_argument("--scale", type=float, default=1.0, help="multiply camera translations by this (to metres)")
    p.add_argument("--background", type=_colour, default=(0.0, 0.0, 0.0),
                   help="R,G,B the images are composited over with their masks")


def cmd_synth(args) -> None:
    from .synth import SynthOptions, synth

    start = time.perf_counter()
    opts = SynthOptions(subjects=args.subjects, cameras=args.cameras, frames=args.frames, size=args.size,
                        seed=args.seed, out=Path(args.out), samples=args.samples, background=args.background)
    paths = synth(opts)
    print(f"wrote {len(paths)} subjects to {args.out} in {time.perf_counter() - start:.1f} s")


def cmd_convert(args) -> None:
    from .convert_mvhumannet import convert_mvhumannet

    def names(text):
        return [x for x in text.split(",") if x] if text else None

    if not args.scale > 0:
        raise HDAError(f"--scale {args.scale}: expected a positive number")
    out = convert_mvhumannet(args.source, args.out, frames=names(args.frames), cameras=names(args.cameras),
                             test_every=args.test_every, test_frames=args.test_frames, scale=args.scale,
                             background=args.background)
    print(f"wrote {out}")


STUDIO_COMMANDS = {"synth": cmd_synth, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="hda", description="the HDA capture studio")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_parsers(sub)
    try:
        args = parser.parse_args(argv)
        STUDIO_COMMANDS[args.command](args)
        return 0
    except HDAError as exc:
        print(f"hda: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

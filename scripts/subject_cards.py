#!/usr/bin/env python3
"""Subject cards of the capture studio: what `hda synth --seed SEED` people look like.

    .venv/bin/python scripts/subject_cards.py --seed 0 --subjects 16 --size 256 --columns 4 --out docs/subject_cards.png

One tile per subject (front and back three-quarter views, the same people, geometry and materials as the
dataset, in one walking pose), labelled with the subject's index and age; the attributes of each tile
are listed in the .txt written beside the PNG. Cycles renders 2 images per subject (~5 s each here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hda_backend.errors import HDAError  # noqa: E402
from hda_backend.studio.cards import render_cards  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (as hda synth --seed)")
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--size", type=int, default=256,
                    help="render size; a tile is 1.5 x size wide (front, back, head close-up) and size tall")
    ap.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    ap.add_argument("--columns", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("docs/subject_cards.png"))
    args = ap.parse_args()
    if not (1 <= args.subjects <= 256 and 64 <= args.size <= 2048 and 1 <= args.columns <= 64):
        print("subject_cards: error: expected --subjects 1..256, --size 64..2048, --columns 1..64", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        out = render_cards(args.seed, args.subjects, args.size, args.out, args.samples, args.columns)
    except HDAError as exc:
        print(f"subject_cards: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size // 1024} KB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

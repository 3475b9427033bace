"""``hda check-blend FILE.blend``: the add-on's *Check for Farm* for a render-farm TD, from a shell.

Opens the file in a Blender Python (this interpreter when it has the ``bpy`` module, else a Blender
binary: ``--blender``, ``$HDA_BLENDER`` or ``blender`` on PATH) in a child process, runs
blender_addon/farm.py's check on the scene ``blender -b FILE.blend -a`` renders (the file's active
scene) and prints one line per avatar problem: layers (or a native avatar's splat frames, Blender
≥ 5.3) missing, placeholders, stale (pose, placement, camera, identity or settings changed since the
bake), a compositor (or splat modifier) that does not read them, a duplicated avatar sharing
another's layers, an avatar file that does not load. Exit status 0 when
the file is ready for the farm, 1 when any problem was found, 2 for bad input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import HDAError

ROOT = Path(__file__).resolve().parent.parent          # holds hda_backend/ and blender_addon/
CHILD = ROOT / "blender_addon" / "check_blend_child.py"
ENV_BLENDER = "HDA_BLENDER"
TIMEOUT_S = 3600


def add_parser(sub) -> None:
    p = sub.add_parser("check-blend", help="report every avatar whose baked layers or splat frames are missing or stale "
                                           "before a .blend is sent to a render farm (exit status 1 if any)")
    p.add_argument("blend", help="the saved .blend file")
    p.add_argument("--blender", help=f"a Blender executable (default: this Python's bpy module, else ${ENV_BLENDER}, "
                                     "else blender on PATH)")


def child_command(blender: str | None) -> list[str]:
    """The interpreter that runs the check: a Blender binary in background mode, or this Python with bpy."""
    has_bpy = importlib.util.find_spec("bpy") is not None
    chosen = blender or (None if has_bpy else os.environ.get(ENV_BLENDER) or shutil.which("blender"))
    if chosen:
        if not shutil.which(chosen) and not os.access(chosen, os.X_OK):
            raise HDAError(f"--blender {chosen}: not an executable, expected a Blender binary")
        return [chosen, "-b", "--factory-startup", "--python", str(CHILD), "--"]
    if not has_bpy:
        raise HDAError(f"no Blender found: pass --blender PATH, set ${ENV_BLENDER}, or install the bpy module")
    return [sys.executable, str(CHILD)]


def check_blend(blend: str | os.PathLike, blender: str | None = None) -> dict:
    """Run the check in a child process; returns its report {"scene", "frames", "avatars", "lines", "notes"}."""
    path = Path(blend)
    if not path.is_file():
        raise HDAError(f"{path}: .blend file not found")
    if not CHILD.is_file():
        raise HDAError(f"{CHILD}: missing, expected the extension's blender_addon package beside hda_backend")
    with tempfile.TemporaryDirectory(prefix="hda_check_") as tmp:
        out = Path(tmp) / "report.json"
        proc = subprocess.run(child_command(blender) + [str(ROOT), str(path.resolve()), str(out)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        if not out.is_file():
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:]) or f"exit status {proc.returncode}"
            raise HDAError(f"{path}: Blender could not check the file ({tail})")
        report = json.loads(out.read_text())
    if report.get("error"):
        raise HDAError(f"{path}: {report['error']}")
    return report


def cmd_check_blend(args) -> int:
    report = check_blend(args.blend, args.blender)
    for line in report["notes"]:
        print(f"note: {line}")
    for line in report["lines"]:
        print(line)
    first, last = report["frames"]
    if report["lines"]:
        print(f"{args.blend}: NOT ready for the farm: {len(report['lines'])} problem(s) in scene "
              f"'{report['scene']}' ({report['avatars']} avatar(s), frames {first}-{last})", file=sys.stderr)
        return 1
    print(f"{args.blend}: ready for the farm: scene '{report['scene']}', {report['avatars']} avatar(s), "
          f"frames {first}-{last} baked and current")
    return 0


FARM_COMMANDS = {"check-blend": cmd_check_blend}

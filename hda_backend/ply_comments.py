"""Named comments in a PLY file's header, ``comment <name> <text>`` lines (no torch): what the farm
bake of native splats stores its bake key in (blender_addon/native_bake.py), read back by the farm
check, which must run where torch is missing (``hda check-blend``). Readers of the format skip them.
"""

from __future__ import annotations

import os

from .errors import HDAError

HEADER_LIMIT = 1 << 16  # bytes of a file read_comments searches for the end of the header


def comment_lines(comments: dict[str, str] | None) -> list[str]:
    """The header lines of ``comments`` {name: one-line ASCII text}. Raises HDAError otherwise."""
    lines = []
    for name, text in (comments or {}).items():
        if not name.isidentifier() or "\n" in text or "\r" in text or not text.isascii():
            raise HDAError(f"PLY comment {name!r}: expected an identifier and one line of ASCII text")
        lines.append(f"comment {name} {text}")
    return lines


def read_comments(path: str | os.PathLike) -> dict[str, str]:
    """{name: text} of a PLY file's ``comment <name> <text>`` header lines. Raises HDAError when the
    file is missing or does not start with a PLY header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_LIMIT)
    except OSError as exc:
        raise HDAError(f"{path}: cannot read ({exc.strerror or exc})") from None
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        raise HDAError(f"{path}: not a PLY file, expected a header starting 'ply' and ending 'end_header'")
    comments = {}
    for line in head[:end].decode("ascii", "replace").splitlines():
        parts = line.split(" ", 2)
        if parts[0] == "comment" and len(parts) == 3:
            comments[parts[1]] = parts[2]
    return comments

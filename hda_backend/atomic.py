"""Atomic files: written to a temporary file in the target's folder, then renamed over the target, so a
kill leaves either the old file or the new one, never half of one. The one place every writer goes
through (avatars, models, frames, EXR layers, .ply exports, caches, logs, records).

Two mechanisms:

- :func:`replacing` yields a named temporary path (``<name>XXXXXXXX.tmp``, from mkstemp) for writers
  that need a file name (PIL, numpy, EXR); a kill while they write leaves that temporary behind.
- :func:`write_atomic` (and :func:`write_bytes`, :func:`write_text`, :func:`atomic_save_safetensors`)
  writes into an anonymous ``O_TMPFILE`` file in the target's folder, which has no name until it is
  complete: then it is linked in (``linkat`` on ``/proc/self/fd/N`` with ``AT_SYMLINK_FOLLOW``, through
  ctypes, since ``os.link`` does not follow those links) under a temporary name and renamed over the
  target at once. A kill at any instant leaves no temporary, except in the microseconds between the
  link and the rename. Where ``O_TMPFILE`` is unsupported (not Linux, some file systems) it falls back
  to :func:`replacing`. :func:`sweep_temporaries` removes what either could leave (checkpoints call it
  on every save and load).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_TMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkstemp's, so one pattern covers both mechanisms
_libc = None


@contextmanager
def replacing(path: str | os.PathLike, make_parents: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; on success it becomes ``path`` (readable by all:
    mkstemp makes owner-only files, and these are meant to be shared), on any failure it is removed.
    ``make_parents=False``: a missing folder is an error (OSError) instead of being created."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temporary_pattern(path: str | os.PathLike) -> re.Pattern:
    """The names of the temporaries this module writes for ``path``: ``<name>`` + 8 mkstemp characters + ``.tmp``."""
    return re.compile(re.escape(Path(path).name) + r"[a-z0-9_]{8}\.tmp")


def sweep_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left in its folder by a killed writer; returns what was removed.
    Call it only where no other process writes ``path`` at the same time (a resumed job's own output)."""
    path = Path(path)
    pattern = temporary_pattern(path)
    removed = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _linkat():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        _libc.linkat.restype = ctypes.c_int
    return _libc.linkat


def _open_anonymous(folder: Path) -> int | None:
    """An ``O_TMPFILE`` descriptor in ``folder``, or None where the system or file system has none."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):  # linkat needs the descriptor's /proc link
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.ENOSYS):
            return None
        raise


def _link_into_place(fd: int, path: Path) -> None:
    """Give the anonymous file ``fd`` a temporary name beside ``path`` and rename it over ``path``."""
    source = f"/proc/self/fd/{fd}".encode()
    while True:
        tmp = path.parent / f"{path.name}{''.join(secrets.choice(_TMP_ALPHABET) for _ in range(8))}.tmp"
        if _linkat()(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(tmp), _AT_SYMLINK_FOLLOW) == 0:
            break
        err = ctypes.get_errno()
        if err != errno.EEXIST:
            raise OSError(err, f"linkat into {tmp}: {os.strerror(err)}")
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], make_parents: bool = True) -> Path:
    """Call ``write(fh)`` on a binary file that becomes ``path`` (mode 0644) only once ``write`` returned;
    see the module docstring. On any failure ``path`` is left as it was. ``make_parents=False``: a
    missing folder is an error (OSError) instead of being created."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_anonymous(path.parent)
    if fd is None:
        with replacing(path, make_parents) as tmp, open(tmp, "wb") as fh:
            write(fh)
        return path
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, 0o644)  # O_TMPFILE's mode is masked by the umask; these files are meant to be shared
        write(fh)
        fh.flush()
        _link_into_place(fd, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_bytes(path: str | os.PathLike, data: bytes, make_parents: bool = True) -> Path:
    return write_atomic(path, lambda fh: fh.write(data), make_parents)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict) -> Path:
    """Write a safetensors file atomically (:func:`write_atomic`), so a crash never leaves half a file."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return write_bytes(path, data)

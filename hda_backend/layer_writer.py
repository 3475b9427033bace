"""Layer files written at once with raw blocks, then rewritten ZIP-compressed off the caller's thread.

Blender composites a frame right after the frame handler wrote the avatar's layer, so whatever the
handler spends writing, the render waits for. ZIP compression is most of that (about 10 ms of the
~15 ms a 512² layer costs to encode) and reading does not need it: a ZIP-typed EXR whose blocks are
stored raw is the same image. :class:`LayerWriter` therefore writes each file with raw blocks
(``exr.encode_exr(compress=False)``, atomically) and queues a rewrite of the same channels and header
strings, compressed, on one background thread; farms and disks get the small file a moment later.

Why this never shows a wrong frame:
- both versions hold the same pixels and bake key, and each is put in place atomically, so a reader
  sees one complete version or the other;
- a rewrite replaces the file only if no later :meth:`LayerWriter.write` or :meth:`LayerWriter.remove`
  of that path came after the write it belongs to (a generation per path, checked and acted on under
  one lock, so a newer frame or a deleted layer is never overwritten by an older one);
- a file (or its folder) that someone else moved or deleted meanwhile is left gone: a rewrite never
  creates a file or a folder, it only replaces the raw file it wrote;
- if the process ends first, the raw file stays: valid and current, only larger.

The queue is bounded (:data:`MAX_PENDING` rewrites): a caller that writes faster than the rewrites keep
up waits for the oldest, so memory stays bounded at any resolution.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .exr import encode_exr

MAX_PENDING = 8  # rewrites queued at most (each holds its frame's channels: ~3 MB at 512², 25 MB at 1080p)


class LayerWriter:
    """Writes EXR files fast now and compressed later (module docstring). Call it from one thread
    (Blender's main thread); the rewrites run on a thread of their own."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest: dict[Path, int] = {}  # path -> generation of its newest write whose rewrite is pending
        self._generation = itertools.count(1)
        self._pending: deque[Future] = deque()
        self._pool: ThreadPoolExecutor | None = None  # started on the first write

    def write(self, path: str | os.PathLike, channels: dict[str, np.ndarray],
              strings: dict[str, str] | None = None) -> Path:
        """Write ``path`` (as ``exr.write_exr``, blocks stored raw) and queue its compressed rewrite.
        The caller must not modify the ``channels`` arrays afterwards (the rewrite reads them)."""
        path = Path(path).absolute()
        data = encode_exr(channels, strings, compress=False)
        with self._lock:
            generation = next(self._generation)
            write_bytes(path, data)
            self._latest[path] = generation
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="hda-layer-zip")
            self._pending.append(self._pool.submit(self._rewrite, path, generation, channels, strings))
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft().result()
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        return path

    def _rewrite(self, path: Path, generation: int, channels, strings) -> bool:
        with self._lock:
            if self._latest.get(path) != generation:
                return False  # superseded already: no need to compress it
        data = encode_exr(channels, strings, workers=1)
        with self._lock:
            if self._latest.get(path) != generation:
                return False  # a newer write or a removal of this path came after ours
            del self._latest[path]
            if not path.is_file():
                return False  # moved or deleted by someone else (a project folder moved): never bring it back
            try:
                write_bytes(path, data, make_parents=False)  # nor its folder, if that goes in the meantime
            except OSError:
                return False  # the raw file stays in place: same image, only larger
        return True

    def remove(self, path: str | os.PathLike) -> None:
        """Delete ``path`` if it exists; a rewrite still queued for it will not bring it back."""
        path = Path(path).absolute()
        with self._lock:
            self._latest.pop(path, None)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def flush(self) -> None:
        """Wait until every queued rewrite is done."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Finish the queued rewrites and stop the thread (a later write starts a new one)."""
        self.flush()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

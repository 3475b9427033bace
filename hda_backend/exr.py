"""Writing OpenEXR images (multi-layer channel names, half/float channels, ZIP compression), numpy only.

Blender's compositor reads an avatar's per-frame layer from EXR files: linear float RGBA plus a
depth pass, the data a render farm needs without the add-on. This writes them without Blender or
an OpenEXR binding: a single-part scanline file whose channels are named ``<layer>.<pass>.<channel>``
(``HDA.Combined.R`` ... ``HDA.Depth.Z``), the naming Blender's own multi-layer EXRs use, so its
Image node offers one output per pass. Colour is stored as half floats (OpenEXR's usual colour
precision, 2^-11 relative), depth as 32-bit floats (it holds 1e10 for "nothing here").

Layout (OpenEXR 2 file format): magic and version, header attributes, a table of chunk offsets,
then chunks of 16 scanlines, each ``int32 y, int32 size, data`` with the block's lines one after the
other and, within a line, each channel's values in channel-name order. ZIP compression (type 3)
reorders the block's bytes into even/odd halves, stores byte differences (+128) and deflates them;
a block that does not shrink is stored raw, as the format allows.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .atomic import write_bytes
from .errors import HDAError

MAGIC = 20000630
PIXEL_TYPES = {np.dtype(np.float16): 1, np.dtype(np.float32): 2}   # OpenEXR HALF, FLOAT
ZIP_COMPRESSION = 3
LINES_PER_BLOCK = 16       # ZIP compresses 16 scanlines per chunk
MAX_SIZE = 65536


def _attribute(name: str, kind: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value


def _predict(blocks: np.ndarray) -> np.ndarray:
    """ZIP's predictor on each row of blocks [N, bytes] uint8 (one chunk's bytes per row, all rows
    alike in length): even/odd byte split, then byte differences + 128 modulo 256, first byte kept."""
    reordered = np.concatenate([blocks[:, 0::2], blocks[:, 1::2]], axis=1)
    predicted = reordered.copy()
    np.subtract(reordered[:, 1:], reordered[:, :-1], out=predicted[:, 1:])  # uint8: wraps modulo 256
    predicted[:, 1:] += np.uint8(128)
    return predicted


@functools.lru_cache(maxsize=16)
def _deflate(predicted: bytes) -> bytes:
    """Deflated predicted bytes. Cached because empty blocks (rows without the avatar) repeat within
    and across frames."""
    return zlib.compress(predicted, 1)


def _zip_chunks(lines: np.ndarray, workers: int, compress: bool = True) -> list[bytes]:
    """The ZIP-compressed data of each block of LINES_PER_BLOCK scanlines of lines [H, bytes] uint8, or
    its raw bytes where compression does not shrink it (as the format allows) or ``compress`` is False."""
    height = lines.shape[0]
    full = height - height % LINES_PER_BLOCK
    groups = [lines[:full].reshape(full // LINES_PER_BLOCK, -1)] if full else []
    if full < height:
        groups.append(lines[full:].reshape(1, -1))
    raw = [row for group in groups for row in group]
    if not compress:
        return [r.tobytes() for r in raw]
    predicted = [row.tobytes() for group in groups for row in _predict(group)]
    if workers > 1:
        # zlib releases the GIL: the blocks deflate in parallel, and map keeps their order.
        with ThreadPoolExecutor(workers) as pool:
            packed = list(pool.map(_deflate, predicted))
    else:
        packed = [_deflate(p) for p in predicted]
    return [data if len(data) < r.size else r.tobytes() for data, r in zip(packed, raw)]


def encode_exr(channels: dict[str, np.ndarray], strings: dict[str, str] | None = None,
               workers: int | None = None, compress: bool = True) -> bytes | bytearray:
    """EXR file bytes of channels {name: [H,W] array, row 0 at the top}; float16 arrays are stored
    as HALF, anything else as FLOAT (32-bit). ``strings``: extra header attributes of type string
    (ASCII; e.g. the layer's bake key), read back by :func:`read_strings`. ``workers``: threads
    compressing the chunks (None: one per CPU); the bytes are the same for any number.
    ``compress=False`` stores every block raw: the same image in the same ZIP-typed file, several
    times larger, written in a fraction of the time (readers take a block whose size is the raw
    size as stored raw; hda_backend.layer_writer rewrites such files compressed later); it returns a
    bytearray (the buffer the file was built in, not copied into a bytes object)."""
    if not channels:
        raise HDAError("EXR: no channels given, expected at least one [H,W] array")
    names = sorted(channels)  # the format stores channels in name order
    planes = [np.asarray(channels[n]) for n in names]
    planes = [p if p.dtype == np.float16 else np.asarray(p, dtype=np.float32) for p in planes]
    height, width = planes[0].shape if planes[0].ndim == 2 else (0, 0)
    for name, plane in zip(names, planes):
        if plane.ndim != 2 or plane.shape != (height, width):
            raise HDAError(f"EXR channel '{name}': shape {plane.shape}, expected ({height}, {width}) like the others")
        if not name or len(name) > 255 or "\0" in name:
            raise HDAError(f"EXR channel name {name!r}: expected 1..255 characters without NUL")
    if not (1 <= width <= MAX_SIZE and 1 <= height <= MAX_SIZE):
        raise HDAError(f"EXR size {width}x{height}: expected 1..{MAX_SIZE} pixels per side")
    chlist = b"".join(n.encode() + b"\0" + struct.pack("<iB3xii", PIXEL_TYPES[p.dtype], 0, 1, 1)
                      for n, p in zip(names, planes)) + b"\0"
    box = struct.pack("<iiii", 0, 0, width - 1, height - 1)
    header = b"".join([
        _attribute("channels", "chlist", chlist),
        _attribute("compression", "compression", bytes([ZIP_COMPRESSION])),
        _attribute("dataWindow", "box2i", box),
        _attribute("displayWindow", "box2i", box),
        _attribute("lineOrder", "lineOrder", b"\0"),
        _attribute("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
        _attribute("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
        _attribute("screenWindowWidth", "float", struct.pack("<f", 1.0)),
        *(_attribute(name, "string", value.encode("ascii")) for name, value in sorted((strings or {}).items())),
    ]) + b"\0"
    version = 2 | (0x400 if max(len(n) for n in names) > 31 else 0)  # long-names flag
    prefix = struct.pack("<ii", MAGIC, version) + header
    # Scanline bytes: within a line, channel after channel (little-endian values).
    little = [np.ascontiguousarray(p, dtype=p.dtype.newbyteorder("<")) for p in planes]  # copies only if needed
    line = sum(p.itemsize * width for p in little)
    if not compress:
        return _raw_file(prefix, little, line)
    lines = np.empty((height, line), dtype=np.uint8)
    _put_planes(little, [(0, lines[:, None])])
    starts = range(0, height, LINES_PER_BLOCK)
    workers = min(len(starts), os.cpu_count() or 1) if workers is None else workers
    packed = _zip_chunks(lines, workers, compress)
    chunks = [struct.pack("<ii", y, len(data)) + data for y, data in zip(starts, packed)]
    offset = len(prefix) + 8 * len(chunks)
    table = bytearray()
    for chunk in chunks:
        table += struct.pack("<Q", offset)
        offset += len(chunk)
    return prefix + bytes(table) + b"".join(chunks)


def _put_planes(planes: list[np.ndarray], parts: list[tuple[int, np.ndarray]]) -> None:
    """Copy planes [H,W] (contiguous, little-endian) into scanline bytes, channel after channel within
    a line. ``parts``: (first line, view [blocks, lines, line bytes] uint8) covering the image's lines in
    order, lines of a part one block after the other."""
    column = 0
    for plane in planes:
        src = plane.view(np.uint8).reshape(plane.shape[0], -1)
        for y, view in parts:
            blocks, rows = view.shape[:2]
            view[:, :, column:column + src.shape[1]] = src[y:y + blocks * rows].reshape(blocks, rows, -1)
        column += src.shape[1]


def _raw_file(prefix: bytes, planes: list[np.ndarray], line: int) -> bytearray:
    """The file of ``encode_exr(compress=False)``: prefix (magic, version, header), the chunk offset
    table, then each block of LINES_PER_BLOCK scanlines (fewer in the last) as ``int32 y, int32 size``
    and its raw lines. Built in one preallocated buffer: the offsets and block headers are written as
    arrays, each plane's bytes with one strided copy per run of full blocks, so the image is copied
    once (no per-block bytes, no join)."""
    height = planes[0].shape[0]
    full, rest = divmod(height, LINES_PER_BLOCK)
    blocks = full + (rest > 0)
    stride = 8 + LINES_PER_BLOCK * line  # a full chunk: its header and its lines
    first = len(prefix) + 8 * blocks     # where the first chunk starts
    out = bytearray(first + 8 * blocks + height * line)
    buf = np.frombuffer(out, dtype=np.uint8)
    buf[:len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    buf[len(prefix):first] = (first + stride * np.arange(blocks, dtype=np.int64)).astype("<u8").view(np.uint8)
    ys = np.arange(blocks, dtype=np.int64) * LINES_PER_BLOCK
    heads = np.stack([ys, np.minimum(LINES_PER_BLOCK, height - ys) * line], axis=1).astype("<i4")
    as_strided = np.lib.stride_tricks.as_strided
    as_strided(buf[first:], shape=(blocks, 8), strides=(stride, 1))[:] = heads.view(np.uint8)
    parts = []
    if full:
        parts.append((0, as_strided(buf[first + 8:], shape=(full, LINES_PER_BLOCK, line), strides=(stride, line, 1))))
    if rest:
        last = first + full * stride + 8
        parts.append((full * LINES_PER_BLOCK, buf[last:last + rest * line].reshape(1, rest, line)))
    _put_planes(planes, parts)
    return out


def write_exr(path: str | os.PathLike, channels: dict[str, np.ndarray], strings: dict[str, str] | None = None) -> Path:
    """Write an EXR atomically (temporary file + rename): a reader never sees half a frame."""
    return write_bytes(path, encode_exr(channels, strings))


def read_strings(path: str | os.PathLike) -> dict[str, str]:
    """The string attributes of an EXR file's header (only the header is read). Raises HDAError for a
    file that is not a readable single-part EXR."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(8)
            if len(data) < 8 or struct.unpack("<i", data[:4])[0] != MAGIC:
                raise HDAError(f"{path}: not an OpenEXR file (bad magic number)")
            strings = {}
            while True:
                name = _read_name(fh, path)
                if not name:
                    return strings
                kind = _read_name(fh, path)
                size_bytes = fh.read(4)
                if len(size_bytes) < 4:
                    raise HDAError(f"{path}: OpenEXR header ends inside attribute '{name}'")
                size = struct.unpack("<i", size_bytes)[0]
                value = fh.read(size)
                if size < 0 or len(value) < size:
                    raise HDAError(f"{path}: OpenEXR header ends inside attribute '{name}'")
                if kind == "string":
                    strings[name] = value.decode("ascii", "replace")
    except OSError as exc:
        raise HDAError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_name(fh, path) -> str:
    """A NUL-terminated header name (at most 255 bytes)."""
    out = bytearray()
    while True:
        c = fh.read(1)
        if not c:
            raise HDAError(f"{path}: OpenEXR header is truncated")
        if c == b"\0":
            return out.decode("ascii", "replace")
        out += c
        if len(out) > 255:
            raise HDAError(f"{path}: OpenEXR header name longer than 255 bytes")


def layer_channels(rgba: np.ndarray, depth: np.ndarray, layer: str = "HDA") -> dict[str, np.ndarray]:
    """Channels of a compositing layer: rgba [H,W,4] linear premultiplied, depth [H,W] -> EXR channels
    ``<layer>.Combined.R/G/B/A`` (half) and ``<layer>.Depth.Z`` (float). The colour planes are views of
    ``rgba`` where it already is half channel planes (``layer.to_layer(dtype=float16, planar=True)``),
    one copy otherwise."""
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4 or np.shape(depth) != rgba.shape[:2]:
        raise HDAError(f"layer: rgba {rgba.shape} and depth {np.shape(depth)}, expected [H,W,4] and [H,W]")
    planes = np.ascontiguousarray(rgba.transpose(2, 0, 1), dtype=np.float16)  # half, planar: copied if not so yet
    out = {f"{layer}.Combined.{c}": planes[i] for i, c in enumerate("RGBA")}
    out[f"{layer}.Depth.Z"] = np.asarray(depth, dtype=np.float32)
    return out

"""Trace readers: recorded references as ``(pages uint64, writes bool)`` arrays.

Formats:

- ``.npz`` (numpy zip) with array ``page`` (unsigned or non-negative
  integers; stored as uint64) and optionally ``write`` (bool or 0/1; all
  reads if absent), one entry per reference, and optionally ``meta``: one
  JSON string saying where the trace came from (``read_trace_meta``; e.g.
  ``guestd.workload.lackey`` records the command, the window of references
  kept and the page size).
- text: page numbers, one per line or comma-separated (decimal, or hex with
  ``0x``). A write is marked by a ``W`` suffix (``42W``) or by a second,
  whitespace-separated column (``42 W``, ``42 1``; ``R``/``0`` is a read;
  also ``S``/``M`` for store/modify and ``L`` for load). ``#`` starts a
  comment; blank lines are skipped. A bad entry is an error naming the file
  and the line.

``read_trace("-")`` reads standard input (``.npz`` bytes are recognised by
their zip magic).
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import TraceFormatError

__all__ = ["read_trace", "read_trace_meta", "parse_text_trace", "load_npz_trace", "write_npz_trace"]

_ZIP_MAGIC = b"PK\x03\x04"
_WRITE_FLAGS = {"w": True, "1": True, "s": True, "m": True, "write": True,
                "r": False, "0": False, "l": False, "read": False}
_U64_MAX = (1 << 64) - 1


def read_trace(source: str | Path | BinaryIO) -> tuple[np.ndarray, np.ndarray]:
    """Read a trace from a path, ``"-"`` (stdin) or a binary stream."""
    if isinstance(source, (str, Path)) and str(source) == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    elif isinstance(source, (str, Path)):
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise TraceFormatError(name, 0, f"cannot read: {e.strerror or e}") from None
    else:
        data = source.read()
        name = getattr(source, "name", "<stream>")
    if data.startswith(_ZIP_MAGIC):
        return load_npz_trace(io.BytesIO(data), name)
    return parse_text_trace(data, name)


def load_npz_trace(f: str | Path | BinaryIO, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    name = name or str(f)
    try:
        with np.load(f, allow_pickle=False) as z:
            if "page" not in z.files:
                raise TraceFormatError(name, 0, f"no array 'page' in the .npz (arrays: {', '.join(z.files) or 'none'})")
            page = z["page"]
            write = z["write"] if "write" in z.files else None
    except TraceFormatError:
        raise
    except Exception as e:  # a damaged zip or array: say which file
        raise TraceFormatError(name, 0, f"not a readable .npz trace: {e}") from None
    if page.ndim != 1 or page.dtype.kind not in "ui":
        raise TraceFormatError(name, 0, f"'page' must be a 1-d integer array, got {page.dtype} shape {page.shape}")
    if page.dtype.kind == "i" and page.size and int(page.min()) < 0:
        raise TraceFormatError(name, 0, f"'page' has a negative entry at index {int(np.argmin(page))}")
    pages = page.astype(np.uint64)
    if write is None:
        return pages, np.zeros(pages.shape[0], bool)
    if write.shape != page.shape:
        raise TraceFormatError(name, 0, f"'write' has shape {write.shape}, 'page' has {page.shape}")
    if write.dtype != bool:
        if write.dtype.kind not in "ui" or (write.size and not np.isin(write, (0, 1)).all()):
            raise TraceFormatError(name, 0, f"'write' must be bool or 0/1, got dtype {write.dtype}")
    return pages, write.astype(bool)


def write_npz_trace(path: str | Path, pages: np.ndarray, writes: np.ndarray,
                    meta: dict[str, object] | None = None) -> None:
    arrays: dict[str, np.ndarray] = {"page": np.asarray(pages, np.uint64), "write": np.asarray(writes, bool)}
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez_compressed(path, **arrays)


def read_trace_meta(path: str | Path) -> dict[str, object]:
    """The ``meta`` of an ``.npz`` trace ({} when it has none)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                return {}
            raw = str(z["meta"])
    except Exception as e:
        raise TraceFormatError(str(path), 0, f"not a readable .npz trace: {e}") from None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise TraceFormatError(str(path), 0, f"'meta' is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise TraceFormatError(str(path), 0, f"'meta' must be a JSON object, got {type(meta).__name__}")
    return meta


def parse_text_trace(data: bytes | str, name: str = "<text>") -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, str):
        data = data.encode()
    fast = _parse_plain_decimal(data)
    if fast is not None:
        return fast
    pages: list[int] = []
    writes: list[bool] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise TraceFormatError(name, line, "not UTF-8 text (and not an .npz)") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        items = [x.strip() for x in line.split(",")] if "," in line else [line]
        if items and items[-1] == "":
            items.pop()             # a trailing comma
        for item in items:
            p, w = _parse_item(item, name, lineno)
            pages.append(p)
            writes.append(w)
    return np.array(pages, np.uint64), np.array(writes, bool)


def _parse_item(item: str, name: str, lineno: int) -> tuple[int, bool]:
    fields = item.split()
    if len(fields) == 2:
        flag = _WRITE_FLAGS.get(fields[1].lower())
        if flag is None:
            raise TraceFormatError(name, lineno, f"bad access flag {fields[1]!r} (expected W/R, 1/0, S/L/M)")
        return _parse_page(fields[0], name, lineno), flag
    if len(fields) != 1:
        raise TraceFormatError(name, lineno, f"bad entry {item!r}: expected PAGE, PAGE W, or PAGE FLAG")
    tok = fields[0]
    write = False
    last = tok[-1:].lower()
    if last in ("w", "r"):          # not hex digits, so no clash with 0x pages
        write = last == "w"
        tok = tok[:-1]
    return _parse_page(tok, name, lineno), write


def _parse_page(tok: str, name: str, lineno: int) -> int:
    try:
        v = int(tok, 16) if tok[:2].lower() == "0x" else int(tok, 10)
    except ValueError:
        raise TraceFormatError(name, lineno, f"bad page number {tok!r}") from None
    if not 0 <= v <= _U64_MAX:
        raise TraceFormatError(name, lineno, f"page number {tok} outside 0..2^64-1")
    return v


def _parse_plain_decimal(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Fast path for digits-and-whitespace files: one page per line, or ``PAGE 0|1`` per line."""
    if not data or data.translate(None, b"0123456789 \t\r\n"):
        return None
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    # a line of <= 19 characters cannot hold a number beyond uint64; longer ones
    # go to the slow path, which checks the range (a regex scan is far slower)
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [len(data)]))
    if int((stops - starts).max()) > 19:
        return None
    vals = np.fromstring(data.decode("ascii"), dtype=np.uint64, sep=" ")
    if vals.size == lines:
        return vals, np.zeros(vals.size, bool)
    if vals.size == 2 * lines:
        flags = vals[1::2]
        if np.all(flags <= 1):
            return vals[0::2].copy(), flags.astype(bool)
    return None

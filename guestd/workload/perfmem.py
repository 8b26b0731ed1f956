"""Read ``perf mem`` samples as a page trace.

``perf mem record -- CMD`` samples the loads and stores of a program with
the CPU's memory-sampling unit (PEBS, IBS, SPE); ``perf mem report -D``
dumps each sample as a line::

    # PID, TID, IP, ADDR, LOCAL WEIGHT, DSRC, SYMBOL
     4242  4242 0x00005581a3c0d1e2 0x0167ffd2a8c3f10    33 0x68100142 /usr/bin/sort:compare

or, with ``-x,``, the same fields separated by commas. ``--phys-data`` and
``--data-page-size`` add columns; the header says which, and the parser
finds ``ADDR`` and ``DSRC`` by name. A sample is one reference to the page
of ``ADDR``; it writes when ``DSRC``'s memory operation is a store
(``PERF_MEM_OP_STORE``, bit 2 of its low five bits). A sample without a data
address (``ADDR`` 0) is left out.

Without ``-x`` some perf versions print ``ADDR`` as ``0x016`` followed by the
unpadded address (a format string's typo, ``0x016%PRIx64``): such a field is
read past that prefix. ``-x,`` avoids the question; use it.

A sampled trace is not every access: perf keeps one access in N (its
``-c``/``-F`` period), so distances between reuses are shorter in the trace
than in the program. The metadata says ``sampled: true``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import TraceFormatError
from .trace import write_npz_trace

__all__ = ["PerfMemTrace", "parse_perf_mem", "convert_perf_mem", "looks_like_perf_mem"]

_DEFAULT_COLUMNS = ["PID", "TID", "IP", "ADDR", "LOCAL WEIGHT", "DSRC", "SYMBOL"]
_OP_STORE = 0x4


class PerfMemTrace:
    def __init__(self, pages: np.ndarray, writes: np.ndarray, samples: int, skipped: int, page_bytes: int,
                 source: str) -> None:
        self.pages = pages
        self.writes = writes
        self.samples = samples          # sample lines read
        self.skipped = skipped          # without a data address
        self.page_bytes = page_bytes
        self.source = source

    def meta(self) -> dict[str, object]:
        return {"source": "perf-mem", "log": self.source, "sampled": True, "page_bytes": self.page_bytes,
                "samples": self.samples, "samples_without_address": self.skipped,
                "kept_refs": int(self.pages.size)}

    def save(self, out: str | Path) -> Path:
        write_npz_trace(out, self.pages, self.writes, meta=self.meta())
        return Path(out)


def looks_like_perf_mem(head: bytes) -> bool:
    text = head.decode("utf-8", "replace")
    return "# PID, TID, IP, ADDR" in text or "LOCAL WEIGHT, DSRC" in text


def _addr(field: str, fixed_width: bool) -> int:
    if not fixed_width and field.startswith("0x016") and len(field) != 18:
        field = "0x" + field[5:]
    return int(field, 16)


def parse_perf_mem(text: str, name: str = "<perf mem>", page_bytes: int = 4096) -> PerfMemTrace:
    if page_bytes <= 0 or page_bytes & (page_bytes - 1):
        raise TraceFormatError(name, 0, f"page_bytes must be a power of two, got {page_bytes}")
    shift = page_bytes.bit_length() - 1
    columns = list(_DEFAULT_COLUMNS)
    pages: list[int] = []
    writes: list[bool] = []
    samples = skipped = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            head = line.lstrip()[1:]
            if "ADDR" in head and "DSRC" in head:
                columns = [c.strip() for c in head.split(",") if c.strip()]
            continue
        sep = "," if line.count(",") >= len(columns) - 2 else None
        fields = [f.strip() for f in (line.split(sep, len(columns) - 1) if sep else line.split(None, len(columns) - 1))]
        if len(fields) < len(columns) - 1:
            raise TraceFormatError(name, lineno, f"expected {len(columns)} fields ({', '.join(columns)}), "
                                                 f"got {len(fields)}: {line.strip()[:80]!r}")
        try:
            addr = _addr(fields[columns.index("ADDR")], fixed_width=sep is not None)
            dsrc = int(fields[columns.index("DSRC")], 16)
        except (ValueError, IndexError):
            raise TraceFormatError(name, lineno, f"bad ADDR or DSRC in {line.strip()[:80]!r}") from None
        samples += 1
        if addr == 0:
            skipped += 1
            continue
        pages.append(addr >> shift)
        writes.append(bool(dsrc & 0x1F & _OP_STORE))
    if not pages:
        raise TraceFormatError(name, 0, f"no perf mem samples with a data address ({samples} sample line(s)); "
                                        "expected the output of `perf mem report -D`")
    return PerfMemTrace(np.array(pages, np.uint64), np.array(writes, bool), samples, skipped, page_bytes, name)


def convert_perf_mem(report: str | Path, out: str | Path | None = None, *, page_bytes: int = 4096,
                     max_refs: int | None = None, skip_refs: int = 0) -> PerfMemTrace:
    try:
        text = Path(report).read_text(errors="replace")
    except OSError as e:
        raise TraceFormatError(str(report), 0, f"cannot read: {e.strerror or e}") from None
    tr = parse_perf_mem(text, str(report), page_bytes)
    end = None if max_refs is None else skip_refs + max_refs
    tr.pages, tr.writes = tr.pages[skip_refs:end], tr.writes[skip_refs:end]
    if out is not None:
        tr.save(out)
    return tr

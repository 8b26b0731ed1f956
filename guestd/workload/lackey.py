"""Record real programs' memory references with valgrind's lackey, as page traces.

``record_lackey(cmd, out)`` runs ``valgrind --tool=lackey --trace-mem=yes
CMD`` with lackey's log on a pipe, parses it as it streams (a few MiB at a
time: a run of billions of accesses never sits in memory) and writes the
project's trace format (``guestd.workload.trace``: ``.npz`` with ``page``
uint64, ``write`` bool) plus ``meta``: the command, the window of references
kept, the page size, what was counted. ``convert_lackey_log(log, out)`` does
the same from a lackey log already on disk.

Lackey's lines: ``I  ADDR,SIZE`` (instruction fetch), `` L ADDR,SIZE``
(load), `` S ADDR,SIZE`` (store), `` M ADDR,SIZE`` (modify: a load and a
store, one reference that writes). Each kept access is one reference to the
page of its first byte, and a second reference when it crosses into the
next page. Instruction fetches are left out unless ``instructions=True``.
Valgrind's own ``==PID==`` lines are skipped.

    python -m balloonlab.guestd.workload.lackey -o sort.npz [--max-refs N] [--skip N] -- sort big.txt
    python -m balloonlab.guestd.workload.lackey -o t.npz --from-log lackey.log
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from ..errors import GuestdError, TraceFormatError
from .trace import write_npz_trace

__all__ = ["LackeyTrace", "LackeyParser", "record_lackey", "convert_lackey_log", "main"]

_CHUNK_BYTES = 8 << 20
_MAX_HEX_DIGITS = 16


@dataclass
class LackeyTrace:
    """What a recording kept: the references and how they were taken."""

    pages: np.ndarray                 # uint64 page numbers (address // page_bytes)
    writes: np.ndarray                # bool, one per reference
    command: list[str]                # the traced command ("" entries for a converted log)
    skip_refs: int                    # references dropped at the start
    max_refs: int | None              # the cap on references kept (None: all)
    page_bytes: int
    instructions: bool                # instruction fetches counted
    total_refs: int                   # references lackey produced up to where we stopped
    source: str = "valgrind-lackey"
    extra: dict[str, object] = field(default_factory=dict)

    def meta(self) -> dict[str, object]:
        d = asdict(self)
        del d["pages"], d["writes"]
        d["kept_refs"] = int(self.pages.size)
        return d

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        write_npz_trace(out, self.pages, self.writes, meta=self.meta())
        return out


class LackeyParser:
    """Incremental parser of lackey's output: feed bytes, get (pages, writes) arrays back."""

    def __init__(self, page_bytes: int = 4096, instructions: bool = False) -> None:
        if page_bytes <= 0 or page_bytes & (page_bytes - 1):
            raise GuestdError(f"page_bytes must be a power of two, got {page_bytes}")
        self.shift = page_bytes.bit_length() - 1
        self.page_bytes = page_bytes
        self.instructions = instructions
        self._rest = b""
        self.lines = 0

    def feed(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        buf = self._rest + data
        cut = buf.rfind(b"\n") + 1
        self._rest = buf[cut:]
        return self._parse(buf[:cut])

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        rest, self._rest = self._rest, b""
        return self._parse(rest + b"\n") if rest.strip() else (np.zeros(0, np.uint64), np.zeros(0, bool))

    def _parse(self, text: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised: every line is located by its newline and its comma, the hex address read digit by digit."""
        if not text:
            return np.zeros(0, np.uint64), np.zeros(0, bool)
        b = np.frombuffer(text, np.uint8)
        ends = np.flatnonzero(b == 10)
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        self.lines += ends.size
        long_enough = ends - starts >= 5
        starts, ends = starts[long_enough], ends[long_enough]
        c0 = b[starts]
        c1 = b[starts + 1]
        data = (c0 == ord(" ")) & ((c1 == ord("L")) | (c1 == ord("S")) | (c1 == ord("M"))) & (b[starts + 2] == ord(" "))
        keep = data
        if self.instructions:
            keep = keep | ((c0 == ord("I")) & (c1 == ord(" ")) & (b[starts + 2] == ord(" ")))
        starts, ends, kinds = starts[keep], ends[keep], c1[keep]
        if not starts.size:
            return np.zeros(0, np.uint64), np.zeros(0, bool)
        # the address runs from the first hex digit after the spaces to the comma
        commas = np.flatnonzero(b == ord(","))
        ci = np.searchsorted(commas, starts)
        if ci.size and (ci >= commas.size).any():
            raise TraceFormatError("<lackey>", 0, "a reference line without a comma")
        comma = commas[ci]
        if (comma >= ends).any():
            bad = int(np.argmax(comma >= ends))
            raise TraceFormatError("<lackey>", 0, f"bad reference line {bytes(text[starts[bad]:ends[bad]])!r}")
        first = starts + 3
        first += b[first] == ord(" ")            # instruction lines have two spaces
        n_digits = comma - first
        if (n_digits < 1).any() or (n_digits > _MAX_HEX_DIGITS).any():
            bad = int(np.argmax((n_digits < 1) | (n_digits > _MAX_HEX_DIGITS)))
            raise TraceFormatError("<lackey>", 0, f"bad address in line {bytes(text[starts[bad]:ends[bad]])!r}")
        addr = np.zeros(starts.size, np.uint64)
        lut = np.full(256, 255, np.uint8)
        for i, ch in enumerate(b"0123456789abcdef"):
            lut[ch] = i
        for i, ch in enumerate(b"ABCDEF"):
            lut[ch] = 10 + i
        for k in range(int(n_digits.max())):
            has = n_digits > k
            d = lut[b[np.where(has, comma - 1 - k, 0)]]
            if (has & (d == 255)).any():
                bad = int(np.argmax(has & (d == 255)))
                raise TraceFormatError("<lackey>", 0, f"bad hex address in line {bytes(text[starts[bad]:ends[bad]])!r}")
            addr |= np.where(has, d.astype(np.uint64) << np.uint64(4 * k), np.uint64(0))
        size = np.zeros(starts.size, np.uint64)
        for k in range(4):                       # sizes are small decimals
            pos = comma + 1 + k
            has = pos < ends
            d = b[np.where(has, pos, 0)].astype(np.int64) - ord("0")
            ok = has & (d >= 0) & (d <= 9)
            size = np.where(ok, size * np.uint64(10) + np.where(ok, d, 0).astype(np.uint64), size)
        size = np.maximum(size, np.uint64(1))
        sh = np.uint64(self.shift)
        page = addr >> sh
        last = (addr + size - np.uint64(1)) >> sh
        write = (kinds == ord("S")) | (kinds == ord("M"))
        cross = last != page
        if cross.any():
            # an access straddling two pages references both, in address order
            reps = 1 + cross.astype(np.int64)
            out_page = np.repeat(page, reps)
            out_write = np.repeat(write, reps)
            second = np.cumsum(reps) - 1
            out_page[second[cross]] = last[cross]
            return out_page, out_write
        return page, write


def _windowed(chunks: Iterator[tuple[np.ndarray, np.ndarray]], skip: int, max_refs: int | None
              ) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Keep references ``[skip, skip + max_refs)``; returns pages, writes, references seen, and whether the cap was hit."""
    kept_p: list[np.ndarray] = []
    kept_w: list[np.ndarray] = []
    seen = 0
    kept = 0
    full = False
    for p, w in chunks:
        lo = max(0, skip - seen)
        seen += p.size
        if lo >= p.size:
            continue
        p, w = p[lo:], w[lo:]
        if max_refs is not None and kept + p.size >= max_refs:
            take = max_refs - kept
            kept_p.append(p[:take].copy())
            kept_w.append(w[:take].copy())
            kept += take
            full = True
            break
        kept_p.append(p.copy())
        kept_w.append(w.copy())
        kept += p.size
    pages = np.concatenate(kept_p) if kept_p else np.zeros(0, np.uint64)
    writes = np.concatenate(kept_w) if kept_w else np.zeros(0, bool)
    return pages, writes, seen, full


def _stream(f: BinaryIO, parser: LackeyParser) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    while True:
        data = f.read(_CHUNK_BYTES)
        if not data:
            break
        yield parser.feed(data)
    yield parser.close()


def record_lackey(command: Sequence[str], out: str | Path | None = None, *, max_refs: int | None = 10_000_000,
                  skip_refs: int = 0, page_bytes: int = 4096, instructions: bool = False,
                  stdin: str | Path | None = None, cwd: str | Path | None = None,
                  valgrind: str = "valgrind") -> LackeyTrace:
    """Run ``command`` under lackey and keep references ``[skip_refs, skip_refs + max_refs)``.

    The program's own stdout is discarded; ``stdin`` names a file to feed
    it. Once ``max_refs`` references are kept the program is stopped (the
    rest would be thrown away). Writes ``out`` when given.
    """
    if not command:
        raise GuestdError("record_lackey: empty command")
    exe = shutil.which(valgrind)
    if exe is None:
        raise GuestdError(f"record_lackey: {valgrind!r} not found on PATH (install valgrind)")
    if max_refs is not None and max_refs < 1:
        raise GuestdError(f"max_refs must be >= 1 or None, got {max_refs}")
    if skip_refs < 0:
        raise GuestdError(f"skip_refs must be >= 0, got {skip_refs}")
    parser = LackeyParser(page_bytes, instructions)
    rfd, wfd = os.pipe()
    stdin_f = open(stdin, "rb") if stdin is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([exe, "--tool=lackey", "--trace-mem=yes", f"--log-fd={wfd}", *command],
                                stdin=stdin_f, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(wfd,), cwd=cwd)
    finally:
        os.close(wfd)
        if stdin is not None:
            stdin_f.close()   # type: ignore[union-attr]
    with os.fdopen(rfd, "rb", buffering=0) as f:
        try:
            pages, writes, seen, full = _windowed(_stream(f, parser), skip_refs, max_refs)
        finally:
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait()
    if not full and rc != 0:
        raise GuestdError(f"record_lackey: {' '.join(command)!r} under valgrind exited with status {rc}")
    if pages.size == 0:
        raise GuestdError(f"record_lackey: no references recorded from {' '.join(command)!r} "
                          f"(skip_refs={skip_refs}, {seen} seen)")
    tr = LackeyTrace(pages, writes, list(command), skip_refs, max_refs, page_bytes, instructions, seen)
    if out is not None:
        tr.save(out)
    return tr


def convert_lackey_log(log: str | Path, out: str | Path | None = None, *, max_refs: int | None = None,
                       skip_refs: int = 0, page_bytes: int = 4096, instructions: bool = False) -> LackeyTrace:
    """Parse a lackey log already on disk (streamed), keep the window, write ``out`` when given."""
    parser = LackeyParser(page_bytes, instructions)
    try:
        with open(log, "rb") as f:
            pages, writes, seen, _ = _windowed(_stream(f, parser), skip_refs, max_refs)
    except OSError as e:
        raise TraceFormatError(str(log), 0, f"cannot read: {e.strerror or e}") from None
    except TraceFormatError as e:
        raise TraceFormatError(str(log), 0, e.reason) from None
    if pages.size == 0:
        raise TraceFormatError(str(log), 0, "no lackey reference lines (' L ADDR,SIZE', ...) found")
    tr = LackeyTrace(pages, writes, [], skip_refs, max_refs, page_bytes, instructions, seen,
                     source="lackey-log", extra={"log": str(log)})
    if out is not None:
        tr.save(out)
    return tr


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m balloonlab.guestd.workload.lackey",
                                 description="Record a program's memory references (valgrind lackey) as a page trace.")
    ap.add_argument("-o", "--out", required=True, help="output .npz trace")
    ap.add_argument("--max-refs", type=int, default=10_000_000, help="references to keep (0 = all)")
    ap.add_argument("--skip", type=int, default=0, help="references to drop at the start")
    ap.add_argument("--page-bytes", type=int, default=4096)
    ap.add_argument("--instructions", action="store_true", help="count instruction fetches too")
    ap.add_argument("--stdin", help="file fed to the program's standard input")
    ap.add_argument("--from-log", help="convert this lackey log instead of running a command")
    ap.add_argument("command", nargs="*", help="the command to trace (after --)")
    args = ap.parse_args(argv)
    cap = args.max_refs or None
    try:
        if args.from_log:
            tr = convert_lackey_log(args.from_log, args.out, max_refs=cap, skip_refs=args.skip,
                                    page_bytes=args.page_bytes, instructions=args.instructions)
        else:
            tr = record_lackey(args.command, args.out, max_refs=cap, skip_refs=args.skip,
                               page_bytes=args.page_bytes, instructions=args.instructions, stdin=args.stdin)
    except GuestdError as e:
        print(f"lackey: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "refs": int(tr.pages.size), "distinct_pages": int(np.unique(tr.pages).size),
                      "write_frac": round(float(tr.writes.mean()), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

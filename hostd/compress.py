"""What the host does with a page on its way to host swap: zero-page detection and memory compression.

Both sit on the host's reclaim path, between the TLB shootdown (which hands
the host the page's content token) and the swap write, and both are off
unless a scenario turns them on (``[host] compression``,
``[host] zero_page_detection``).

Zero pages. A page whose content is the zero page (``proto.content``: key
``ZERO_KEY``) is not written anywhere: its p2m entry becomes ZERO, no frame,
no slot, no I/O; a later fault maps a fresh zero page exactly as for a page
never backed. The check reads the page once (``zero_check_page_us``).
ESX does the same on its reclaim path ("zero pages are not swapped", and
TPS shares them with one zero frame); KVM's KSM merges them with the zero
page (``use_zero_pages``).

Compression (ESX "memory compression", vSphere 4.1 on; Linux zswap as the
second reference). ESX compresses a page it would swap and keeps it only
if it compresses to 2 KiB or less (half a page), in a per-VM compression
cache capped at 10 % of the VM's configured memory (``Mem.MemZipMaxPct``
= 10); a page that does not compress that well is swapped. A fault on a
compressed page decompresses it: CPU, no I/O. When the cache is full its
oldest pages are decompressed and written to swap to make room (VMware,
"Understanding Memory Resource Management in VMware vSphere 5.0", 2011,
section 2.5 "Memory compression"). zswap does the same in Linux: a
compressed cache in front of the swap device, a ``max_pool_percent`` cap
(20), pages that compress badly rejected to swap, the oldest written back
when the pool is full (Documentation/admin-guide/mm/zswap.rst).

The cache's memory is real host frames. Compressed bytes are packed into
whole frames, ``ceil(bytes / 4096)`` of them per VM (zsmalloc-like packing
with no fragmentation: the best case), kind ZCACHE, owned by the VM: a page
in the cache saves host memory only by its compression ratio. The frames
come from the VM's own partition (the pages just evicted free more than the
cache needs: at most half a frame each), so the cache never takes memory
from another guest.

Costs (virtual µs, charged where the work happens: a request that waits
for its own reclaim waits for them; the tick-boundary reclaim runs on the
host's CPU, charged to no vCPU, and is counted in ``compress_cpu_us``):
- ``compress_page_us`` = 5.3: LZ4 at 780 MB/s compresses a 4 KiB page in
  5.25 µs (github.com/lz4/lz4 README, benchmark table, "LZ4 default");
  every page tried costs it, whether it fits or not;
- ``decompress_page_us`` = 0.8: LZ4 decompresses at 4970 MB/s (same table);
- ``zero_check_page_us`` = 0.4: one read of a 4 KiB page at ~10 GB/s.

Determinism: the books are per VM, and a VM's pages enter and leave its
cache only through its own evictions (its partition mid-tick, guest-id
order at the boundary), its own faults and its own balloon or reports; the
cache's oldest page is by insertion order, ties impossible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from balloonlab.proto.content import PAGE_BYTES, ZERO_KEY, ContentMap, compressed_bytes, content_keys

from .errors import InvariantViolation
from .framepool import FrameKind, FramePool
from .hostswap import PENDING_TOKEN
from .p2m import P2M, PageState

__all__ = ["ZipConfig", "ReclaimZip", "COMPRESS_CACHE_PCT_DEFAULT", "COMPRESS_MAX_BYTES_DEFAULT"]

COMPRESS_CACHE_PCT_DEFAULT = 10.0   # ESX Mem.MemZipMaxPct
COMPRESS_MAX_BYTES_DEFAULT = 2048   # ESX keeps a page only if it compresses to 2 KiB or less
COMPRESS_PAGE_US_DEFAULT = 5.3      # LZ4, 780 MB/s (module docstring)
DECOMPRESS_PAGE_US_DEFAULT = 0.8    # LZ4, 4970 MB/s
ZERO_CHECK_PAGE_US_DEFAULT = 0.4    # a 4 KiB read at ~10 GB/s

_COMPRESSED = int(PageState.COMPRESSED)
_ZERO = int(PageState.ZERO)

@dataclass(frozen=True, slots=True)
class ZipConfig:
    """``[host] compression``, ``zero_page_detection`` and their knobs (the schema's ``HostTable`` checks them)."""

    compression: bool = False
    zero_pages: bool = False
    cache_pct: float = COMPRESS_CACHE_PCT_DEFAULT
    max_bytes: int = COMPRESS_MAX_BYTES_DEFAULT
    compress_page_us: float = COMPRESS_PAGE_US_DEFAULT
    decompress_page_us: float = DECOMPRESS_PAGE_US_DEFAULT
    zero_check_page_us: float = ZERO_CHECK_PAGE_US_DEFAULT

    @property
    def enabled(self) -> bool:
        return self.compression or self.zero_pages


class _Book:
    """One VM's compression cache and its zero-dropped pages; arrays per gpfn, frames as a stack."""

    __slots__ = ("size", "token", "seq", "next_seq", "bytes", "frames", "n_frames", "cap_frames")

    def __init__(self, guest_pages: int, cap_frames: int) -> None:
        self.size = np.zeros(guest_pages, np.int32)      # compressed bytes of a COMPRESSED gpfn, else 0
        self.token = np.zeros(guest_pages, np.uint64)    # content of a COMPRESSED or ZERO gpfn, else 0
        self.seq = np.zeros(guest_pages, np.int64)       # insertion order of a COMPRESSED gpfn
        self.next_seq = 1
        self.bytes = 0
        self.frames = np.zeros(16, np.int64)
        self.n_frames = 0
        self.cap_frames = cap_frames


@dataclass(slots=True)
class ZipCounters:
    zero_checked_pages: int = 0          # pages looked at for zeros on the reclaim path
    zero_pages_dropped: int = 0          # ... found zero: no slot, no I/O
    zero_pages_refaulted: int = 0        # faults that mapped a fresh zero page for one
    compress_attempts: int = 0           # pages compressed on the reclaim path
    compressed_pages: int = 0            # ... that fit (<= max_bytes) and went into the cache
    compress_rejected_pages: int = 0     # ... that did not: to swap
    decompressed_pages: int = 0          # faults served from the cache (no I/O)
    compress_spilled_pages: int = 0      # the cache's oldest pages written to swap to make room
    compressed_dropped_pages: int = 0    # left the cache without a decompression (ballooned, reported, fresh)
    compress_cpu_us: float = 0.0         # compression, decompression and zero checks, virtual µs


class ReclaimZip:
    """Every VM's compression cache and zero-dropped pages, over the host's frame pool."""

    def __init__(self, cfg: ZipConfig, pool: FramePool) -> None:
        self.cfg = cfg
        self.pool = pool
        self._books: dict[int, _Book] = {}
        self.counters = ZipCounters()
        self._guest_counters: dict[int, ZipCounters] = {}

    # -- guests ---------------------------------------------------------------------

    def add_guest(self, guest_id: int, guest_pages: int) -> None:
        cap = int(guest_pages * self.cfg.cache_pct / 100.0)
        self._books[guest_id] = _Book(guest_pages, cap)
        self._guest_counters[guest_id] = ZipCounters()

    def remove_guest(self, guest_id: int) -> None:
        """The guest is gone: its books go (its ZCACHE frames are freed with the rest of its frames)."""
        self._books.pop(guest_id, None)

    def book(self, guest_id: int) -> _Book:
        return self._books[guest_id]

    def tokens_of(self, guest_id: int, gpfns: np.ndarray) -> np.ndarray:
        """The content held for COMPRESSED or ZERO gpfns (0 for others)."""
        return self._books[guest_id].token[gpfns]

    # -- the reclaim path ---------------------------------------------------------------

    def absorb(self, guest_id: int, p2m: P2M, gpfns: np.ndarray, tokens: np.ndarray, cmap: ContentMap,
               compress: bool) -> tuple[np.ndarray, float]:
        """Evicted pages (their shootdown's tokens): drop the zero ones, compress those that fit.

        Returns the mask of pages taken (now ZERO or COMPRESSED in ``p2m``;
        the rest go to swap as before) and the CPU time spent. Call
        ``fit`` after the evicted frames are freed: the cache's frames come
        from them. ``compress``: the memory state lets them run (``memstate.may_compress``); else
        every page goes to swap.
        """
        taken = np.zeros(gpfns.size, bool)
        known = tokens != PENDING_TOKEN          # a silent guest's placeholder: only swap can wait for it
        c, gc = self.counters, self._guest_counters[guest_id]
        b = self._books[guest_id]
        cpu = 0.0
        if self.cfg.zero_pages and compress and np.any(known):
            idx = np.flatnonzero(known)
            zero = content_keys(cmap, guest_id, tokens[idx]) == np.uint64(ZERO_KEY)
            n = int(idx.size)
            cpu += n * self.cfg.zero_check_page_us
            for x in (c, gc):
                x.zero_checked_pages += n
            z = idx[zero]
            if z.size:
                taken[z] = True
                p2m.set(gpfns[z], PageState.ZERO)
                b.token[gpfns[z]] = tokens[z]
                for x in (c, gc):
                    x.zero_pages_dropped += int(z.size)
        if compress and self.cfg.compression:
            idx = np.flatnonzero(known & ~taken)
            if idx.size:
                size = compressed_bytes(cmap, guest_id, tokens[idx])
                fits = size <= self.cfg.max_bytes
                cpu += idx.size * self.cfg.compress_page_us
                k = idx[fits]
                for x in (c, gc):
                    x.compress_attempts += int(idx.size)
                    x.compressed_pages += int(k.size)
                    x.compress_rejected_pages += int(idx.size - k.size)
                if k.size:
                    taken[k] = True
                    gp = gpfns[k]
                    p2m.set(gp, PageState.COMPRESSED)
                    b.token[gp] = tokens[k]
                    b.size[gp] = size[fits]
                    b.seq[gp] = b.next_seq + np.arange(gp.size)
                    b.next_seq += int(gp.size)
                    b.bytes += int(size[fits].sum())
        for x in (c, gc):
            x.compress_cpu_us += cpu
        return taken, cpu

    def fit(self, guest_id: int, p2m: P2M) -> tuple[np.ndarray, np.ndarray, float]:
        """Give the cache the frames its bytes need, within its cap: spill its oldest pages first.

        Returns the spilled gpfns and their tokens (the caller writes them
        to swap: they are SWAPPED from now) and the CPU time (each spilled
        page is decompressed before its write).
        """
        b = self._books[guest_id]
        spill = np.zeros(0, np.int64)
        if _frames_for(b.bytes) > b.cap_frames:
            inside = np.flatnonzero(p2m.state == _COMPRESSED)
            order = inside[np.argsort(b.seq[inside], kind="stable")]
            keep_bytes = b.cap_frames * PAGE_BYTES
            # drop the oldest until what is left fits: the shortest prefix whose removal suffices
            removed = np.cumsum(b.size[order].astype(np.int64))
            k = int(np.searchsorted(removed, b.bytes - keep_bytes, side="left")) + 1
            spill = order[:k]
        tokens = b.token[spill].copy()
        cpu = 0.0
        if spill.size:
            self._forget(b, spill)
            cpu = spill.size * self.cfg.decompress_page_us
            for x in (self.counters, self._guest_counters[guest_id]):
                x.compress_spilled_pages += int(spill.size)
                x.compress_cpu_us += cpu
        self._resize(guest_id, b)
        return spill, tokens, cpu

    # -- faults and drops --------------------------------------------------------------------

    def take_out(self, guest_id: int, gpfns: np.ndarray, state: np.ndarray, fresh: np.ndarray) -> tuple[np.ndarray, float]:
        """Faults on COMPRESSED or ZERO gpfns (``state`` theirs): their tokens and the CPU time.

        A fresh page (the guest overwrites it whole) comes back as token 0
        with no decompression. The caller maps a frame for each; the cache
        shrinks by the bytes that left (its surplus frames are freed).
        """
        b = self._books[guest_id]
        c, gc = self.counters, self._guest_counters[guest_id]
        tokens = b.token[gpfns].copy()
        tokens[fresh] = 0
        comp = state == _COMPRESSED
        n_dec = int(np.count_nonzero(comp & ~fresh))
        n_zero = int(np.count_nonzero(~comp))
        n_drop = int(np.count_nonzero(comp & fresh))
        cpu = n_dec * self.cfg.decompress_page_us
        for x in (c, gc):
            x.decompressed_pages += n_dec
            x.zero_pages_refaulted += n_zero
            x.compressed_dropped_pages += n_drop
            x.compress_cpu_us += cpu
        self._forget(b, gpfns)
        self._resize(guest_id, b)
        return tokens, cpu

    def drop(self, guest_id: int, gpfns: np.ndarray, state: np.ndarray) -> int:
        """COMPRESSED or ZERO gpfns leave without being read (ballooned, reported free); frames freed."""
        b = self._books[guest_id]
        n = int(np.count_nonzero(state == _COMPRESSED))
        for x in (self.counters, self._guest_counters[guest_id]):
            x.compressed_dropped_pages += n
        self._forget(b, gpfns)
        return self._resize(guest_id, b)

    def _forget(self, b: _Book, gpfns: np.ndarray) -> None:
        b.bytes -= int(b.size[gpfns].astype(np.int64).sum())
        b.size[gpfns] = 0
        b.token[gpfns] = 0
        b.seq[gpfns] = 0

    def _resize(self, guest_id: int, b: _Book) -> int:
        """Exactly ``ceil(bytes / page)`` frames: allocate or free the difference; returns frames freed."""
        want = _frames_for(b.bytes)
        if want > b.n_frames:
            got = self.pool.alloc(want - b.n_frames, FrameKind.ZCACHE, guest_id)
            if got.size < want - b.n_frames:
                self.pool.free(got)
                raise InvariantViolation(f"guest {guest_id}: no frame for its compression cache "
                                         f"({want - b.n_frames} needed): the evicted frames should have covered it")
            if want > b.frames.size:
                grown = np.zeros(max(want, 2 * b.frames.size), np.int64)
                grown[:b.n_frames] = b.frames[:b.n_frames]
                b.frames = grown
            b.frames[b.n_frames:want] = got
            b.n_frames = want
            return 0
        if want < b.n_frames:
            out = b.frames[want:b.n_frames].copy()
            b.n_frames = want
            self.pool.free(out)
            return int(out.size)
        return 0

    # -- observation and the invariant ------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Host-wide counters and gauges (``compress_cache_*`` for the cache's size now)."""
        out: dict[str, Any] = {k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in _as_dict(self.counters).items()}
        out["compress_cache_frames"] = sum(b.n_frames for b in self._books.values())
        out["compress_cache_bytes"] = sum(b.bytes for b in self._books.values())
        return out

    def guest_snapshot(self, guest_id: int, p2m: P2M) -> dict[str, Any]:
        b = self._books[guest_id]
        out: dict[str, Any] = {k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in _as_dict(self._guest_counters[guest_id]).items()}
        out.update(compress_cache_frames=b.n_frames, compress_cache_bytes=b.bytes,
                   compress_cache_cap_frames=b.cap_frames)
        return out

    def frames_of(self, guest_id: int) -> np.ndarray:
        b = self._books[guest_id]
        return b.frames[:b.n_frames]

    def check_guest(self, guest_id: int, p2m: P2M, pages: np.ndarray | None = None) -> None:
        """The books agree with the p2m and the pool; ``pages``: only those gpfns (the sample)."""
        b = self._books.get(guest_id)
        if b is None:
            if np.any((p2m.state == _COMPRESSED) | (p2m.state == _ZERO)):
                raise InvariantViolation(f"guest {guest_id} has COMPRESSED or ZERO pages but no compression books")
            return
        state = p2m.state if pages is None else p2m.state[pages]
        gp = np.arange(p2m.guest_pages) if pages is None else pages
        comp = state == _COMPRESSED
        held = comp | (state == _ZERO)
        if np.any(~comp & (b.size[gp] != 0)) or np.any(~held & (b.token[gp] != 0)):
            bad = int(gp[np.flatnonzero((~comp & (b.size[gp] != 0)) | (~held & (b.token[gp] != 0)))[0]])
            raise InvariantViolation(f"guest {guest_id} gpfn {bad} is {PageState(p2m.state[bad]).name} but the "
                                     f"compression books still hold it")
        # (a zero page compresses to nothing: 0 bytes is a real size; zswap stores same-filled pages so)
        if np.any(comp & ((b.size[gp] < 0) | (b.size[gp] > self.cfg.max_bytes))):
            bad = int(gp[np.flatnonzero(comp & ((b.size[gp] < 0) | (b.size[gp] > self.cfg.max_bytes)))[0]])
            raise InvariantViolation(f"guest {guest_id} gpfn {bad} is COMPRESSED with {int(b.size[bad])} bytes")
        if pages is None:
            total = int(b.size[comp].astype(np.int64).sum())
            if total != b.bytes:
                raise InvariantViolation(f"guest {guest_id}: its compression cache counts {b.bytes} bytes, "
                                         f"its pages hold {total}")
        if b.n_frames != _frames_for(b.bytes) or b.n_frames > b.cap_frames:
            raise InvariantViolation(f"guest {guest_id}: compression cache of {b.bytes} bytes in {b.n_frames} "
                                     f"frames (cap {b.cap_frames})")
        f = b.frames[:b.n_frames]
        pool = self.pool
        ok = (pool.kind[f] == FrameKind.ZCACHE) & (pool.owner_guest[f] == guest_id) & (pool.token[f] == 0)
        if not np.all(ok):
            bad_f = int(f[np.flatnonzero(~ok)[0]])
            raise InvariantViolation(f"guest {guest_id}: compression cache frame {bad_f} is "
                                     f"{FrameKind(pool.kind[bad_f]).name} of guest {int(pool.owner_guest[bad_f])}")

    def holds_frame(self, guest_id: int, frame: int) -> bool:
        b = self._books.get(guest_id)
        return b is not None and bool(np.any(b.frames[:b.n_frames] == frame))


def _frames_for(n_bytes: int) -> int:
    return -(-int(n_bytes) // PAGE_BYTES)


def _as_dict(c: ZipCounters) -> dict[str, Any]:
    return {k: getattr(c, k) for k in ZipCounters.__dataclass_fields__}

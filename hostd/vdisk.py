"""One guest's virtual disk, served through the host's page cache (QEMU's cache modes).

Content is one ``uint64`` token per block. ``tokens`` is what the guest
would read now (its disk as it sees it); ``image`` is what the device
holds. They differ only on **dirty** blocks (writeback mode), whose newest
content is in the host's cache frame until the flusher writes it. A block
never written holds ``0``, which the guest reads as its initial content.

The cache (``mode`` "writeback" or "writethrough"; none with "none"):

- Its unit is a cluster of ``cluster_pages`` blocks (64 KiB by default),
  cached whole or not at all: a read that misses loads the cluster (one
  device request); a write into a cluster that is not cached and that does
  not cover it whole must read the rest first (**read-modify-write**: the
  seed's nested-swapping *double fault*, counted in ``double_faults`` and
  recorded per request for the host's monitor). A hit costs
  ``page_copy_us`` per page.
- Per block: not cached / clean / dirty. Per cluster: an LRU stamp, the
  virtual time of its last use.
- writeback: a write lands in the cache (dirty) and completes after a page
  copy; the flusher writes it to the device later (``flush``, at tick
  boundaries: Linux's dirty expiry and background threshold). A guest over
  its dirty limit writes its own oldest dirty clusters back before its
  write completes (Linux's ``balance_dirty_pages`` throttling).
  writethrough: a write completes when it is on the device; the cache copy
  is clean. none: no cache; a request holds I/O buffers (IOBUF frames)
  until the host's clock passes its completion.
- The cache is bounded by one host budget (``hostd.hostcache``), which
  gives each disk an **allowance** for the next tick at each boundary. A
  request that would take the disk past its allowance first drops the
  disk's own least recently used clean clusters (or writes back dirty
  ones): within a tick a disk only ever touches its own cache, so the
  result cannot depend on other guests' timing. Clean clusters are simply
  dropped (a later read goes to the device); dirty ones are written back;
  nothing here is ever host-swapped.
- Pinned blocks (``set_pinned``: the pinning monitor's cure, on the guest's
  swap area) keep their clusters cached: never dropped.

At most ``max_inflight_requests`` requests are in service at once; a
request beyond that starts, in virtual time, when the earliest in-flight
one completes.

Call order, driven by ``HostMemory`` which owns the frames::

    check_blocks -> fit_allowance -> frames_needed_{read,write} -> [host makes room] -> read|write
    each tick: retire, flush (the host cache's boundary work), allowance set by hostd.hostcache

``read``/``write`` assume the pool has ``frames_needed_*`` free frames and
do not await.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Collection
from heapq import heappop, heappush

import numpy as np

from balloonlab.proto.costs import CostModel

from .devices import Device, DeviceProfile, device_profile
from .errors import BadBatch, InvariantViolation, OutOfRange
from ._books import take_clusters
from .framepool import FrameKind, FramePool
from .p2m import NO_LOC, as_page_numbers, unique_pages

_nz = np.count_nonzero   # on small masks a fraction of np.any's cost; truthy exactly when np.any is

__all__ = ["CacheState", "VirtualDisk", "VdiskCounters", "IoResult", "DoubleFault", "CLUSTER_PAGES_DEFAULT",
           "MAX_INFLIGHT_REQUESTS_DEFAULT", "DOUBLE_FAULT_RECORDS_MAX", "CACHE_MODES"]

CLUSTER_PAGES_DEFAULT = 16          # 64 KiB clusters of 4 KiB pages
MAX_INFLIGHT_REQUESTS_DEFAULT = 32  # the disk's queue depth
DOUBLE_FAULT_RECORDS_MAX = 256      # kept for the host's monitor between two drains; the counters see all
CACHE_MODES = ("writeback", "writethrough", "none")
"""QEMU's ``cache=`` modes (the lab's default is writethrough: ``hostd.hostcache``)."""


class CacheState(IntEnum):
    NOT_CACHED = 0
    FRAME = 1          # in a host cache frame (clean or dirty: ``VirtualDisk.dirty``)


_NOT_CACHED = int(CacheState.NOT_CACHED)
_FRAME = int(CacheState.FRAME)
_NO_TOKENS = np.zeros(0, np.uint64)
_CACHE_KIND = int(FrameKind.CACHE)
_FEW_PAGES = 32     # up to this many pages a loop of scalar frees beats the array calls' fixed cost
_FEW_FRAMES_SCALAR = 4   # above this many frames one compiled release beats free_one calls


@dataclass(slots=True)
class VdiskCounters:
    read_requests: int = 0
    write_requests: int = 0
    read_pages: int = 0
    write_pages: int = 0
    cache_hit_pages: int = 0
    cache_miss_pages: int = 0        # requested pages that were not cached
    cluster_loads: int = 0           # device reads of a cluster (a miss or a read-modify-write)
    cluster_load_pages: int = 0
    double_faults: int = 0           # written pages that waited for a read-modify-write read
    double_fault_read_pages: int = 0  # ... the pages that read brought in
    double_fault_wait_us: float = 0.0
    dropped_clean_pages: int = 0     # clean cache pages dropped (budget, allowance, host pressure)
    writeback_pages: int = 0         # dirty pages written to the device (flusher, throttling, dropping)
    writeback_requests: int = 0
    throttled_writes: int = 0        # writes that waited for the guest's own write-back (dirty limit)
    device_read_pages: int = 0
    device_write_pages: int = 0
    iobuf_retired_pages: int = 0
    backpressure_waits: int = 0
    backpressure_wait_us: float = 0.0
    swap_area_read_pages: int = 0    # pages read from / written to the guest's swap area, as the host
    swap_area_write_pages: int = 0   # sees them (``set_swap_area``); 0 until the area is known
    chained_reads: int = 0           # reads served with an earlier one (hostd.readchain): round trips saved
    chained_faults: int = 0          # EPT faults served with a read (hostd.readchain): round trips saved
    ahead_reads: int = 0             # reads served before their batch ran (TickDone.ahead): round trips saved
    ahead_faults: int = 0            # EPT faults served so (TickDone.ahead): round trips saved


@dataclass(frozen=True, slots=True)
class DoubleFault:
    """One write's read-modify-write: its blocks that waited for the rest of their clusters to be read."""

    op: str                     # "write"
    blocks: np.ndarray          # the guest's disk blocks (int64)
    start_vt_us: float          # when the request started
    done_vt_us: float           # when the read was done

    @property
    def added_us(self) -> float:
        """Virtual time the read added to the request."""
        return self.done_vt_us - self.start_vt_us


@dataclass(frozen=True, slots=True)
class IoResult:
    tokens: np.ndarray          # per requested block (reads); empty for writes
    done_vt_us: float
    double_fault_pages: int     # written pages that waited for a read-modify-write read


class VirtualDisk:
    def __init__(self, guest_id: int, n_blocks: int, pool: FramePool, costs: CostModel, *,
                 device: Device | None = None, profile: DeviceProfile | str = "ssd", offset_base: int = 0,
                 mode: str = "writeback", cluster_pages: int = CLUSTER_PAGES_DEFAULT, allowance_pages: int = 0,
                 max_inflight_requests: int = MAX_INFLIGHT_REQUESTS_DEFAULT) -> None:
        if n_blocks < 0 or cluster_pages < 1 or allowance_pages < 0 or max_inflight_requests < 1:
            raise ValueError(
                f"vdisk of guest {guest_id}: n_blocks={n_blocks}, cluster_pages={cluster_pages}, "
                f"allowance_pages={allowance_pages}, max_inflight_requests={max_inflight_requests}")
        if mode not in CACHE_MODES:
            raise ValueError(f"vdisk of guest {guest_id}: cache mode {mode!r} is not one of {list(CACHE_MODES)}")
        self.guest_id = guest_id
        self.n_blocks = int(n_blocks)
        self.mode = mode
        self.cluster_pages = int(cluster_pages)
        self.allowance_pages = int(allowance_pages)
        self.dirty_limit_pages = max(1, self.allowance_pages // 5)
        self.dirty_background_pages = self.allowance_pages // 10
        self.max_inflight_requests = int(max_inflight_requests)
        self.pool = pool
        self.costs = costs
        if device is None:
            device = Device(device_profile(profile) if isinstance(profile, str) else profile, f"vdisk{guest_id}")
        self.device = device
        self.offset_base = int(offset_base)
        device.add_lane(guest_id)
        self.tokens = np.zeros(self.n_blocks, np.uint64)
        self.image = np.zeros(self.n_blocks, np.uint64)
        self.cache_state = np.zeros(self.n_blocks, np.uint8)
        self.cache_loc = np.full(self.n_blocks, NO_LOC, np.int64)
        self.dirty = np.zeros(self.n_blocks, bool)
        self.dirty_since_us = np.zeros(self.n_blocks, np.float64)
        self.pinned = np.zeros(self.n_blocks, bool)
        self.swap_exempt = np.zeros(self.n_blocks, bool)
        n_clusters = -(-self.n_blocks // self.cluster_pages)
        self.cluster_stamp_us = np.zeros(n_clusters, np.float64)   # LRU: virtual time of the last use
        self.cluster_cached = np.zeros(n_clusters, np.int64)       # cached blocks per cluster
        self.cluster_dirty = np.zeros(n_clusters, np.int64)        # dirty blocks per cluster
        self.cluster_pinned = np.zeros(n_clusters, bool)           # holds a pinned block: never dropped
        # The LRU order of the cached clusters, kept as they are touched so that dropping the oldest
        # needs no scan: a heap of (stamp, cluster). Every cached cluster has an entry with its current
        # stamp; entries whose stamp is no longer the cluster's, or whose cluster left the cache, are
        # stale and skipped when popped (rebuilt when they outnumber the live ones).
        self._lru: list[tuple[float, int]] = []
        self.cached_pages = 0
        self.dirty_pages = 0
        self.fill_pages_tick = 0                                   # cache fills this tick (allowance weights)
        self._inflight_done_us: list[float] = []
        self._inflight_frames: list[np.ndarray] = []    # a request's IOBUF frames ("none" mode; else empty)
        self.counters = VdiskCounters()
        self.swap_area: tuple[int, int] = (0, 0)
        self.double_fault_records: list[DoubleFault] = []
        self.double_fault_records_dropped = 0
        self._views()

    def _views(self) -> None:
        """Scalar views of the per-block and per-cluster arrays for the one-block paths.

        An element of a memoryview is a plain int, float or bool, 2-3x
        cheaper to get or set than a numpy element. Only ``cluster_pinned``
        is ever replaced (``_kept_clusters``), which renews its view.
        """
        self._v_tokens = memoryview(self.tokens)
        self._v_image = memoryview(self.image)
        self._v_state = memoryview(self.cache_state)
        self._v_loc = memoryview(self.cache_loc)
        self._v_dirty = memoryview(self.dirty)
        self._v_since = memoryview(self.dirty_since_us)
        self._v_pinned = memoryview(self.pinned)
        self._v_stamp = memoryview(self.cluster_stamp_us)
        self._v_cached = memoryview(self.cluster_cached)
        self._v_cdirty = memoryview(self.cluster_dirty)
        self._v_cpinned = memoryview(self.cluster_pinned)

    @property
    def cached(self) -> bool:
        return self.mode != "none"

    # -- validation and planning -------------------------------------------

    def check_blocks(self, blocks: np.ndarray | bytes, *, unique: bool = False) -> np.ndarray:
        return as_page_numbers(blocks, self.guest_id, "block", self.n_blocks, unique=unique)

    def check_tokens(self, blocks: np.ndarray, tokens: np.ndarray | bytes) -> np.ndarray:
        tok = np.frombuffer(tokens, "<u8") if isinstance(tokens, (bytes, bytearray, memoryview)) \
            else np.asarray(tokens).reshape(-1)
        if tok.size != blocks.size:
            raise BadBatch(f"guest {self.guest_id}: write of {blocks.size} blocks carries {tok.size} tokens")
        if tok.size and tok.dtype.kind not in "iu":
            raise BadBatch(f"guest {self.guest_id}: tokens must be integers, got dtype {tok.dtype}")
        return tok.astype(np.uint64, copy=False)

    def _cluster_blocks(self, clusters: np.ndarray) -> np.ndarray:
        if self.cluster_pages == 1:
            return clusters
        if clusters.size == 1:
            lo = int(clusters[0]) * self.cluster_pages
            return np.arange(lo, min(lo + self.cluster_pages, self.n_blocks), dtype=np.int64)
        cand = (clusters[:, None] * self.cluster_pages + np.arange(self.cluster_pages)).ravel()
        return cand[cand < self.n_blocks]

    def _fill_for_read(self, blocks_u: np.ndarray) -> np.ndarray:
        """Blocks to load for a read: every block of each cluster with a missing block (clusters are whole)."""
        if blocks_u.size == 1:    # the usual one-page request, in scalars: the same blocks
            if self.cache_state[blocks_u[0]] != _NOT_CACHED:
                return blocks_u[:0]
            return self._cluster_blocks(blocks_u // self.cluster_pages)
        missing = blocks_u[self.cache_state[blocks_u] == _NOT_CACHED]
        if missing.size == 0:
            return missing
        return self._cluster_blocks(unique_pages(missing // self.cluster_pages))

    def _fill_for_write(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(blocks to cache, of which those to read first) for a write of distinct ``blocks``."""
        missing = blocks[self.cache_state[blocks] == _NOT_CACHED]
        if missing.size == 0:
            return missing, missing
        fill = self._cluster_blocks(unique_pages(missing // self.cluster_pages))
        written = np.zeros(self.n_blocks, bool) if fill.size * 8 > self.n_blocks else None
        if written is not None:
            written[blocks] = True
            read = fill[~written[fill]]
        elif blocks.size == 1:
            read = fill[fill != blocks[0]]
        else:
            read = fill[~np.isin(fill, blocks)]
        return fill, read

    def frames_needed_read(self, blocks: np.ndarray) -> int:
        if not self.cached:
            return int(blocks.size)
        return int(self._fill_for_read(unique_pages(blocks)).size)

    def frames_needed_write(self, blocks: np.ndarray) -> int:
        if not self.cached:
            return int(blocks.size)
        return int(self._fill_for_write(blocks)[0].size)

    def _fill_one(self, block: int) -> int:
        """``frames_needed_*`` of a request for one block in a cached mode: its whole cluster, or nothing."""
        if self._v_state[block] != _NOT_CACHED:
            return 0
        b0 = block - block % self.cluster_pages
        return min(b0 + self.cluster_pages, self.n_blocks) - b0

    def frames_needed_one(self, block: int) -> int:
        """``frames_needed_read``/``_write`` of one block, in scalars (they agree on one block)."""
        return self._fill_one(block) if self.cached else 1

    # -- the allowance: a request first makes room in its own disk's share -----------

    def fit_allowance(self, blocks: np.ndarray, vt_us: float, write: bool) -> float:
        """Drop (or write back) own LRU clusters so this request's fills stay within the allowance.

        Returns when the request may start: later than ``vt_us`` only if
        dirty clusters had to be written back first.
        """
        if not self.cached:
            return float(vt_us)
        blocks_u = unique_pages(blocks)
        fill = self._fill_for_write(blocks_u)[0] if write else self._fill_for_read(blocks_u)
        over = self.cached_pages + int(fill.size) - self.allowance_pages
        if over <= 0 or fill.size == 0:      # a request that caches nothing new needs no room
            return float(vt_us)
        # In batches (1/16 of the allowance), so that the scan for the oldest clusters is not per request.
        over += max(self.cluster_pages, self.allowance_pages // 16)
        keep = unique_pages(blocks_u // self.cluster_pages)
        return self.release_clusters(over, vt_us, keep=keep, dirty_too=True)

    def fit_allowance_one(self, block: int, vt_us: float) -> float:
        """``fit_allowance`` of a read or a write of one block, in scalars: the same drops, the same time."""
        return self.fit_one(block, vt_us)[0]

    def fit_one(self, block: int, vt_us: float, need: int | None = None) -> tuple[float, int]:
        """``fit_allowance_one``, then ``frames_needed_one``: (when the request may start, frames it needs).

        One call for the usual request; a hit needs no room and drops nothing. ``need``: the block's
        ``need_bound_one``, when the caller has it already.
        """
        n = self.need_bound_one(block) if need is None else need
        if n == 0 or self.mode == "none":
            return float(vt_us), n
        cp = self.cluster_pages
        allowance = self.allowance_pages
        over = self.cached_pages + n - allowance
        if over <= 0:
            return float(vt_us), n
        over += max(cp, allowance // 16)
        return self.release_clusters(over, vt_us, keep=block // cp, dirty_too=True), n

    def need_bound_one(self, block: int) -> int:
        """The frames ``fit_one`` asks for ``block`` (0: a hit), found without changing anything."""
        if self.mode == "none":
            return 1
        if self._v_state[block] != _NOT_CACHED:
            return 0
        cp = self.cluster_pages
        b0 = block - block % cp
        return min(b0 + cp, self.n_blocks) - b0

    def release_clusters(self, want_pages: int, vt_us: float, *, keep: np.ndarray | int | None = None,
                         dirty_too: bool = False) -> float:
        """Drop own least recently used clusters (clean first) until ``want_pages`` are freed.

        With ``dirty_too`` dirty clusters are written back, then dropped,
        once the clean ones are gone; returns when those writes are done.
        Pinned clusters and ``keep`` stay. Ties by cluster index.
        """
        done = float(vt_us)
        freed = self.drop_clean(want_pages, keep=keep)
        if freed >= want_pages or not dirty_too:
            return done
        victims = self._oldest((self.cluster_cached > 0) & ~self._excluded(keep), want_pages - freed)
        if victims.size:
            done = max(done, self._write_back_clusters(victims, vt_us))
            self._drop_clusters(victims)
        return done

    def drop_clean(self, want_pages: int, *, keep: np.ndarray | int | None = None) -> int:
        """Drop own least recently used clean clusters (not pinned, not in ``keep``); returns pages freed.

        The oldest first, ties by cluster index, until they hold ``want_pages``
        (the last one may hold more): popped off the LRU heap, so the cost is
        the clusters dropped and passed over, not the disk's size.
        """
        if want_pages <= 0 or self.cached_pages == 0:
            return 0
        if keep is None:
            kept: Collection[int] = ()
        elif isinstance(keep, np.ndarray):
            kept = keep.tolist() if keep.size < 8 else set(keep.tolist())
        else:
            kept = (int(keep),)
        heap = self._lru
        stamps, cached, dirty, pinned = self._v_stamp, self._v_cached, self._v_cdirty, self._v_cpinned
        victims: list[int] = []
        passed: list[tuple[float, int]] = []
        seen: set[int] = set()
        got = 0
        while got < want_pages and heap:
            entry = heappop(heap)
            s, c = entry
            if c in seen or not cached[c] or stamps[c] != s:
                continue            # stale, or a second entry of the same (stamp, cluster)
            seen.add(c)
            if dirty[c] or pinned[c] or c in kept:
                passed.append(entry)
                continue
            victims.append(c)
            got += cached[c]
        for entry in passed:
            heappush(heap, entry)
        if not victims:
            return 0
        if got <= _FEW_PAGES:
            return self._drop_few(victims)
        return self._drop_clusters(np.array(victims, np.int64))

    def _lru_push(self, stamp: float, cluster: int) -> None:
        heap = self._lru
        heappush(heap, (stamp, cluster))
        if len(heap) > 2 * self.cached_pages + 256:
            self._lru_rebuild()

    def _lru_rebuild(self) -> None:
        """One live entry per cached cluster (a sorted list is a heap)."""
        cand = np.flatnonzero(self.cluster_cached)
        order = cand[np.lexsort((cand, self.cluster_stamp_us[cand]))]
        self._lru = list(zip(self.cluster_stamp_us[order].tolist(), order.tolist()))

    def _excluded(self, keep: np.ndarray | int | None) -> np.ndarray:
        """Clusters never to drop now: pinned (or exempt), and ``keep``."""
        if keep is None or (isinstance(keep, np.ndarray) and keep.size == 0):
            return self.cluster_pinned
        out = self.cluster_pinned.copy()
        out[keep] = True
        return out

    def _oldest(self, mask: np.ndarray, want_pages: int) -> np.ndarray:
        """Clusters in ``mask``, least recently used first (ties by index), until they hold ``want_pages``."""
        return self._oldest_of(np.flatnonzero(mask), want_pages)

    def _oldest_of(self, cand: np.ndarray, want_pages: int) -> np.ndarray:
        """``_oldest`` of the clusters ``cand`` (ascending, each holding a page or more)."""
        if cand.size == 0 or want_pages <= 0:
            return cand[:0]
        # Every candidate holds at least one page, so the `want` oldest suffice.
        k = min(cand.size, int(want_pages))
        if k < cand.size:
            stamps = self.cluster_stamp_us[cand]
            cut = np.partition(stamps, k - 1)[k - 1]
            cand = cand[stamps <= cut]      # ties at the cut all stay: the order below decides among them
        order = cand[np.lexsort((cand, self.cluster_stamp_us[cand]))]
        upto = int(np.searchsorted(np.cumsum(self.cluster_cached[order]), want_pages)) + 1
        return order[:upto]

    def droppable_clusters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clusters, their stamps, their pages) of clean, unpinned cached clusters: the host cache's candidates."""
        cand = np.flatnonzero((self.cluster_cached > 0) & (self.cluster_dirty == 0) & ~self.cluster_pinned)
        return cand, self.cluster_stamp_us[cand], self.cluster_cached[cand]

    def _drop_few(self, clusters: list[int]) -> int:
        """``_drop_clusters`` of a few clean clusters in one compiled pass: the same frames freed in the same
        order (the clusters in the order given, each one's blocks ascending)."""
        out = np.empty(len(clusters) * self.cluster_pages, np.int64)
        try:
            n = take_clusters(np.array(clusters, np.int64), self.cluster_pages, self.cache_state, self.cache_loc,
                              self.cluster_dirty, self.cluster_cached, _FRAME, _NOT_CACHED, NO_LOC, out)
        except ValueError as exc:
            raise InvariantViolation(f"vdisk {self.guest_id}: {exc}") from None
        if n > _FEW_FRAMES_SCALAR:
            self.pool.free_run(out[:n], self.guest_id)   # the same frames, order and lists as free_ones
        else:
            self.pool.free_ones(out[:n].tolist())     # in the order found, as one free_one each
        self.cached_pages -= n
        self.counters.dropped_clean_pages += n
        return n

    def _drop_clusters(self, clusters: np.ndarray) -> int:
        blocks = self._cluster_blocks(clusters)
        blocks = blocks[self.cache_state[blocks] == _FRAME]
        if _nz(self.dirty[blocks]):
            raise InvariantViolation(f"vdisk {self.guest_id}: dropping a dirty cache page")
        self.pool.free(self.cache_loc[blocks])
        self.cache_state[blocks] = _NOT_CACHED
        self.cache_loc[blocks] = NO_LOC
        self.cluster_cached[clusters] = 0
        self.cached_pages -= int(blocks.size)
        self.counters.dropped_clean_pages += int(blocks.size)
        return int(blocks.size)

    # -- I/O (synchronous: the pool must already have the frames) ---------------

    def read(self, blocks: np.ndarray, vt_us: float) -> IoResult:
        c = self.counters
        start = self._admit(vt_us)
        c.read_requests += 1
        c.read_pages += int(blocks.size)
        c.swap_area_read_pages += self._in_swap_area(blocks)
        if not self.cached:
            done = self._device(start, blocks, write=False)
            self._hold(self._iobufs(blocks), done)
            c.cache_miss_pages += int(blocks.size)
            return IoResult(self.tokens[blocks].copy(), done, 0)
        blocks_u = unique_pages(blocks)
        hits = (int(self.cache_state[blocks_u[0]] == _FRAME) if blocks_u.size == 1
                else int(np.count_nonzero(self.cache_state[blocks_u] == _FRAME)))
        done = start
        fill = self._fill_for_read(blocks_u)
        if fill.size:
            done = self._load(fill, start)
        done += blocks.size * self.costs.page_copy_us
        self._touch(blocks_u, vt_us)
        if fill.size:
            self._hold(None, done)      # in the device's queue; a hit is not
        c.cache_hit_pages += hits
        c.cache_miss_pages += int(blocks_u.size) - hits
        return IoResult(self.pool.token[self.cache_loc[blocks]], done, 0)

    def read_one(self, block: int, vt_us: float) -> IoResult:
        """``read`` of one block in a cached mode, in scalars (the usual request): the same books, frames
        and times. A hit takes no frame; a miss needs ``frames_needed_one`` free (``fit_allowance_one``)."""
        tokens, done = self.read_one_reply(block, vt_us)
        return IoResult(tokens, done, 0)

    def read_one_reply(self, block: int, vt_us: float) -> tuple[np.ndarray, float]:
        """``read_one`` as the reply carries it, (tokens, done_vt_us): the one path both take."""
        f, done = self.read_one_frame(block, vt_us)
        return self.pool.token[f:f + 1].copy(), done

    def read_one_frame(self, block: int, vt_us: float) -> tuple[int, float]:
        """``read_one_reply`` as (the frame that holds the block now, done_vt_us): a read chain takes the
        token from the frame itself, with no array of one on its way.

        Flattened (``_admit``, ``_load_cluster_of`` with ``_cache_in_one``,
        ``_hold`` and ``_touch_cluster`` inlined for a cluster of one block),
        it must agree with ``read`` on an array of one;
        ``tests/test_vdisk_lru.py`` drives both side by side on random requests.
        """
        c = self.counters
        start = float(vt_us)
        if len(self._inflight_done_us) >= self.max_inflight_requests:
            start = self._admit(vt_us)
        c.read_requests += 1
        c.read_pages += 1
        lo, hi = self.swap_area
        if lo <= block < hi:
            c.swap_area_read_pages += 1
        cp = self.cluster_pages
        cl = block // cp
        if self._v_state[block] != _NOT_CACHED:
            done = start + self.costs.page_copy_us
            c.cache_hit_pages += 1
            f = self._v_loc[block]
        elif cp == 1:
            # ``_load_cluster_of`` a cluster of one block, with ``_cache_in_one`` and ``_lru_push``; stamped
            # now, as ``_touch_cluster`` below would (nothing between reads the stamp), so the heap gets its one
            # live entry and not a stale one besides
            f = self._cache_block(block, cl, float(vt_us))
            done = self.device.submit(self.guest_id, start, 1, write=False, offset=self.offset_base + block)
            if not done > start:
                done = start
            c.cluster_loads += 1
            c.cluster_load_pages += 1
            c.device_read_pages += 1
            self.fill_pages_tick += 1
            done += self.costs.page_copy_us
            self._inflight_done_us.append(done)     # in the device's queue; a hit is not (``_hold``)
            self._inflight_frames.append(_NO_FRAMES)
            c.cache_miss_pages += 1
        else:
            fresh = not self._v_cached[cl]
            if fresh:
                # stamped now, as ``_touch_cluster`` would (nothing between reads the stamp): the heap
                # gets the cluster's one live entry as it is cached, not a stale one besides
                self._v_stamp[cl] = float(vt_us)
            done = self._load_cluster_of(block, start) + self.costs.page_copy_us
            self._inflight_done_us.append(done)
            self._inflight_frames.append(_NO_FRAMES)
            c.cache_miss_pages += 1
            f = self._v_loc[block]
            if fresh:
                return f, done
        self._touch_cluster(cl, float(vt_us))
        return f, done

    def _load_cluster_of(self, block: int, start_us: float) -> float:
        """``_load`` of the (uncached) cluster holding ``block``: one device request."""
        cp = self.cluster_pages
        b0 = block - block % cp
        n = min(b0 + cp, self.n_blocks) - b0
        if n == 1:
            self._cache_in_one(block)
        else:
            self._cache_in_run(b0, n)
        start_us = float(start_us)
        done = self.device.submit(self.guest_id, start_us, n, write=False, offset=self.offset_base + b0)
        if not done > start_us:         # max(start_us, done), the same float
            done = start_us
        c = self.counters
        c.cluster_loads += 1
        c.cluster_load_pages += n
        c.device_read_pages += n
        self.fill_pages_tick += n
        return done

    def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> IoResult:
        """A write of distinct ``blocks`` in the disk's cache mode."""
        c = self.counters
        start = self._admit(vt_us)
        c.write_requests += 1
        c.write_pages += int(blocks.size)
        c.swap_area_write_pages += self._in_swap_area(blocks)
        if not self.cached:
            self.tokens[blocks] = tokens
            self.image[blocks] = tokens
            done = self._device(start, blocks, write=True)
            self._hold(self._iobufs(blocks), done)
            c.cache_miss_pages += int(blocks.size)
            return IoResult(_NO_TOKENS, done, 0)
        hits = int(np.count_nonzero(self.cache_state[blocks] == _FRAME))
        fill, read = self._fill_for_write(blocks)
        write_start = start
        rmw = 0
        if read.size:
            # The host caches whole clusters: the rest of each cluster comes first (nested swapping).
            write_start = self._load(read, start)
            waited = blocks[np.isin(blocks // self.cluster_pages, unique_pages(read // self.cluster_pages))]
            rmw = int(waited.size)
            c.double_faults += rmw
            c.double_fault_read_pages += int(read.size)
            c.double_fault_wait_us += write_start - start
            if len(self.double_fault_records) < DOUBLE_FAULT_RECORDS_MAX:
                self.double_fault_records.append(DoubleFault("write", waited.astype(np.int64), float(start),
                                                             float(write_start)))
            else:
                self.double_fault_records_dropped += 1
        new = fill[self.cache_state[fill] == _NOT_CACHED]
        if new.size:
            self._cache_in(new)     # the rest of the clusters (read or about to be overwritten)
        self.tokens[blocks] = tokens
        self.pool.token[self.cache_loc[blocks]] = tokens
        done = write_start + blocks.size * self.costs.page_copy_us
        if self.mode == "writethrough":
            self.image[blocks] = tokens
            done = max(done, self._device(write_start, blocks, write=True))
        else:
            was_clean = ~self.dirty[blocks]
            newly = blocks[was_clean]
            self.dirty[newly] = True
            self.dirty_since_us[newly] = float(vt_us)
            if newly.size:
                np.add.at(self.cluster_dirty, newly // self.cluster_pages, 1)
                self.dirty_pages += int(newly.size)
            if self.dirty_pages > self.dirty_limit_pages:
                # Over its dirty limit the writer writes its own oldest back first (balance_dirty_pages),
                # down to the background level.
                c.throttled_writes += 1
                done = max(done, self.write_back_oldest(self.dirty_pages - self.dirty_background_pages,
                                                        write_start))
        self._touch(blocks, vt_us)
        if read.size or self.mode == "writethrough":
            self._hold(None, done)      # in the device's queue; a write into the cache is not
        c.cache_hit_pages += hits
        c.cache_miss_pages += int(blocks.size) - hits
        return IoResult(_NO_TOKENS, done, rmw)

    def write_one(self, block: int, token: int, vt_us: float) -> IoResult:
        """``write`` of one block in a cached mode, in scalars: the same books, frames and times.

        A block whose cluster is not cached and holds other blocks is a
        read-modify-write: that rare request takes the array path.
        """
        if self._write_one_rmw(block):
            return self.write(np.array((block,), np.int64), np.array((token,), np.uint64), vt_us)
        return IoResult(_NO_TOKENS, self.write_one_done(block, token, vt_us), 0)

    def _write_one_rmw(self, block: int) -> bool:
        """Whether a write of ``block`` alone must read the rest of its cluster first."""
        if self._v_state[block] != _NOT_CACHED:
            return False
        cp = self.cluster_pages
        b0 = block - block % cp
        return min(b0 + cp, self.n_blocks) - b0 > 1

    def write_one_done(self, block: int, token: int, vt_us: float) -> float:
        """``write_one``'s completion time: the one path both take (the reply carries nothing else).

        Flattened (``_admit``, ``_cache_in_one``, ``_hold`` and
        ``_touch_cluster`` inlined), it must agree with ``write`` on an array
        of one; ``tests/test_vdisk_lru.py`` drives both side by side on
        random requests.
        """
        hit = self._v_state[block] != _NOT_CACHED
        cp = self.cluster_pages
        if not hit and cp > 1 and self._write_one_rmw(block):
            return self.write(np.array((block,), np.int64), np.array((token,), np.uint64), vt_us).done_vt_us
        c = self.counters
        start = float(vt_us)
        if len(self._inflight_done_us) >= self.max_inflight_requests:
            start = self._admit(vt_us)
        c.write_requests += 1
        c.write_pages += 1
        lo, hi = self.swap_area
        if lo <= block < hi:
            c.swap_area_write_pages += 1
        cl = block // cp
        pool = self.pool
        if hit:
            f = self._v_loc[block]
        else:
            # ``_cache_in_one``, with ``_lru_push``
            f = self._cache_block(block, cl)
        self._v_tokens[block] = token
        pool.token_mv[f] = token
        done = start + self.costs.page_copy_us
        writethrough = self.mode == "writethrough"
        if writethrough:
            self._v_image[block] = token
            c.device_write_pages += 1
            dev_done = self.device.submit(self.guest_id, start, 1, write=True, offset=self.offset_base + block)
            if dev_done > done:
                done = dev_done
        else:
            if not self._v_dirty[block]:
                self._v_dirty[block] = True
                self._v_since[block] = float(vt_us)
                self._v_cdirty[cl] += 1
                self.dirty_pages += 1
            if self.dirty_pages > self.dirty_limit_pages:
                # Over its dirty limit the writer writes its own oldest back first (see ``write``).
                c.throttled_writes += 1
                wb_done = self.write_back_oldest(self.dirty_pages - self.dirty_background_pages, start)
                if wb_done > done:
                    done = wb_done
        self._touch_cluster(cl, float(vt_us))
        if writethrough:
            self._inflight_done_us.append(done)     # ``_hold``
            self._inflight_frames.append(_NO_FRAMES)
        if hit:
            c.cache_hit_pages += 1
        else:
            c.cache_miss_pages += 1
        return done

    def _load(self, blocks: np.ndarray, start_us: float) -> float:
        """Read ``blocks`` (whole clusters' missing parts) from the device into cache frames; one request each."""
        self._cache_in(blocks)
        cp = self.cluster_pages
        done = float(start_us)
        b0 = int(blocks[0])
        if b0 // cp == int(blocks[-1]) // cp:     # the usual case: one cluster, one request
            n_clusters = 1
            done = max(done, self.device.submit(self.guest_id, start_us, int(blocks.size), write=False,
                                                offset=self.offset_base + b0))
        else:
            clusters, first, n = np.unique(blocks // cp, return_index=True, return_counts=True)
            n_clusters = int(clusters.size)
            for b0, k in zip(blocks[first].tolist(), n.tolist()):
                done = max(done, self.device.submit(self.guest_id, start_us, k, write=False,
                                                    offset=self.offset_base + b0))
        self.counters.cluster_loads += n_clusters
        self.counters.cluster_load_pages += int(blocks.size)
        self.counters.device_read_pages += int(blocks.size)
        self.fill_pages_tick += int(blocks.size)
        return done

    def _device(self, start_us: float, blocks: np.ndarray, *, write: bool) -> float:
        """One uncached request straight to the device (mode "none")."""
        if write:
            self.counters.device_write_pages += int(blocks.size)
        else:
            self.counters.device_read_pages += int(blocks.size)
        return self.device.submit(self.guest_id, start_us, int(blocks.size), write=write,
                                  offset=self.offset_base + int(blocks[0]) if blocks.size else -1)

    # -- write-back ---------------------------------------------------------------

    def write_back_oldest(self, want_pages: int, vt_us: float) -> float:
        """Write back the dirty clusters dirtied longest ago until ``want_pages`` are clean; returns when done."""
        dirty_c = np.flatnonzero(self.cluster_dirty > 0)
        if want_pages <= 0 or dirty_c.size == 0:
            return float(vt_us)
        first_dirty = np.full(self.cluster_cached.size, np.inf)
        d = np.flatnonzero(self.dirty)
        np.minimum.at(first_dirty, d // self.cluster_pages, self.dirty_since_us[d])
        order = dirty_c[np.lexsort((dirty_c, first_dirty[dirty_c]))]
        upto = int(np.searchsorted(np.cumsum(self.cluster_dirty[order]), want_pages)) + 1
        return self._write_back_clusters(order[:upto], vt_us)

    def flush(self, vt_us: float, expire_us: float, background_pages: int) -> int:
        """The flusher at a tick boundary: write back expired dirty pages, then down to ``background_pages``."""
        if self.dirty_pages == 0:
            return 0
        before = self.dirty_pages
        d = np.flatnonzero(self.dirty)
        expired = d[self.dirty_since_us[d] <= vt_us - expire_us]
        if expired.size:
            self._write_back_clusters(unique_pages(expired // self.cluster_pages), vt_us)
        if self.dirty_pages > background_pages:
            self.write_back_oldest(self.dirty_pages - background_pages, vt_us)
        return before - self.dirty_pages

    def _write_back_clusters(self, clusters: np.ndarray, vt_us: float) -> float:
        """Each cluster's dirty blocks go to the device in one request, on this guest's lane; they become clean."""
        done = float(vt_us)
        blocks = self._cluster_blocks(clusters)
        blocks = blocks[self.dirty[blocks]]
        if blocks.size == 0:
            return done
        _, first, n = np.unique(blocks // self.cluster_pages, return_index=True, return_counts=True)
        for b0, k in zip(blocks[first].tolist(), n.tolist()):
            done = max(done, self.device.submit(self.guest_id, vt_us, k, write=True, offset=self.offset_base + b0))
        self.image[blocks] = self.tokens[blocks]
        self.dirty[blocks] = False
        self.cluster_dirty[clusters] = 0
        self.dirty_pages -= int(blocks.size)
        self.counters.writeback_pages += int(blocks.size)
        self.counters.writeback_requests += int(first.size)
        self.counters.device_write_pages += int(blocks.size)
        return done

    # -- cache mechanics -------------------------------------------------------

    def _cache_in(self, blocks: np.ndarray) -> None:
        """Cache frames for uncached ``blocks``, holding their current content."""
        frames = self.pool.alloc(blocks.size, FrameKind.CACHE, owner_guest=self.guest_id, owner_index=blocks,
                                 tokens=self.tokens[blocks])
        if frames.size != blocks.size:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few cache frames")
        self.pool.pinned[frames] = self.pinned[blocks]
        if blocks.size == 1:
            c = int(blocks[0]) // self.cluster_pages
            if not self.cluster_cached[c]:
                self._lru_push(float(self.cluster_stamp_us[c]), c)
            self.cluster_cached[c] += 1
        else:
            clusters = unique_pages(blocks // self.cluster_pages)
            for c in clusters[self.cluster_cached[clusters] == 0].tolist():
                self._lru_push(float(self.cluster_stamp_us[c]), c)
            np.add.at(self.cluster_cached, blocks // self.cluster_pages, 1)
        self.cached_pages += int(blocks.size)
        self.cache_state[blocks] = _FRAME
        self.cache_loc[blocks] = frames

    def _cache_block(self, block: int, cl: int, stamp: float | None = None) -> int:
        """``_cache_in_one`` of ``block`` (in cluster ``cl``) through the memoryviews, ``_lru_push`` inline:
        the one-block read and write paths' cache-in; returns the frame. ``stamp``: the cluster is touched
        at it first (``_touch_cluster``, for a caller whose next step would touch it anyway).

        A heap entry whose stamp is not its cluster's is stale and skipped (``drop_clean``), so which
        clusters are dropped depends only on the live entries; a stale one only costs a push and a pop.
        """
        f = self.pool.alloc_one(_CACHE_KIND, self.guest_id, block, self._v_tokens[block])
        if f < 0:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few cache frames")
        self.pool.pinned_mv[f] = self._v_pinned[block]
        cached = self._v_cached
        if stamp is not None:
            self._v_stamp[cl] = stamp
        if not cached[cl]:
            heappush(self._lru, (self._v_stamp[cl], cl))
            if len(self._lru) > 2 * self.cached_pages + 256:
                self._lru_rebuild()
        cached[cl] += 1
        self.cached_pages += 1
        self._v_state[block] = _FRAME
        self._v_loc[block] = f
        return f

    def _cache_in_run(self, b0: int, n: int) -> None:
        """``_cache_in`` of the ``n`` uncached blocks from ``b0`` (one cluster's): the same frames, one pass."""
        if not self.pool.alloc_run(_CACHE_KIND, self.guest_id, b0, n, self.tokens, self.pinned, self.cache_loc,
                                   self.cache_state, _FRAME):
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few cache frames")
        c = b0 // self.cluster_pages
        cached = self._v_cached
        if not cached[c]:
            self._lru_push(self._v_stamp[c], c)
        cached[c] += n
        self.cached_pages += n

    def _cache_in_one(self, block: int) -> int:
        """``_cache_in`` of one block, in scalars (the same frame); returns the frame."""
        pool = self.pool
        f = pool.alloc_one(_CACHE_KIND, self.guest_id, block, self._v_tokens[block])
        if f < 0:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few cache frames")
        pool.pinned_mv[f] = self._v_pinned[block]
        c = block // self.cluster_pages
        cached = self._v_cached
        if not cached[c]:
            self._lru_push(self._v_stamp[c], c)
        cached[c] += 1
        self.cached_pages += 1
        self._v_state[block] = _FRAME
        self._v_loc[block] = f
        return f

    def _touch(self, blocks: np.ndarray, vt_us: float) -> None:
        s = float(vt_us)
        if blocks.size == 1:
            self._touch_cluster(int(blocks[0]) // self.cluster_pages, s)
            return
        clusters = unique_pages(blocks // self.cluster_pages)
        moved = clusters[(self.cluster_stamp_us[clusters] != s) & (self.cluster_cached[clusters] > 0)]
        self.cluster_stamp_us[clusters] = s
        for c in moved.tolist():
            self._lru_push(s, c)

    def _touch_cluster(self, cluster: int, stamp: float) -> None:
        """A use of a cached cluster at ``stamp``: its LRU stamp and (if it moved) its heap entry."""
        stamps = self._v_stamp
        if stamps[cluster] != stamp:
            stamps[cluster] = stamp
            if self._v_cached[cluster]:
                self._lru_push(stamp, cluster)

    def take_double_faults(self) -> tuple[list[DoubleFault], int]:
        """The double faults recorded since the last call, and how many requests were not recorded."""
        records, dropped = self.double_fault_records, self.double_fault_records_dropped
        self.double_fault_records, self.double_fault_records_dropped = [], 0
        return records, dropped

    # -- I/O buffers and backpressure ------------------------------------------

    def _admit(self, vt_us: float) -> float:
        """Virtual start time of a new request, after the earliest in-flight ones complete."""
        held = self._inflight_done_us
        if len(held) < self.max_inflight_requests:
            return float(vt_us)
        self._forget_done(vt_us)
        held = self._inflight_done_us
        active = [d for d in held if d > vt_us]
        if len(active) < self.max_inflight_requests:
            return float(vt_us)
        active.sort()
        start = active[len(active) - self.max_inflight_requests]
        self.counters.backpressure_waits += 1
        self.counters.backpressure_wait_us += start - vt_us
        return start

    def _forget_done(self, vt_us: float) -> None:
        """Drop the completed requests that hold no frames (they only counted against the queue depth)."""
        keep = [(d, f) for d, f in zip(self._inflight_done_us, self._inflight_frames) if d > vt_us or f.size]
        self._inflight_done_us = [d for d, _ in keep]
        self._inflight_frames = [f for _, f in keep]

    def _iobufs(self, blocks: np.ndarray) -> np.ndarray:
        frames = self.pool.alloc(blocks.size, FrameKind.IOBUF, owner_guest=self.guest_id, owner_index=blocks)
        if frames.size != blocks.size:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few I/O buffers")
        return frames

    def _hold(self, frames: np.ndarray | None, done_us: float) -> None:
        self._inflight_done_us.append(float(done_us))
        self._inflight_frames.append(_NO_FRAMES if frames is None else frames)

    def retire(self, vt_us: float) -> int:
        """Forget the requests completed by ``vt_us`` and free their I/O buffers; returns pages freed."""
        held = self._inflight_done_us
        if not held or min(held) > vt_us:
            return 0
        if self.mode != "none":
            # A cached disk's requests hold no I/O buffers (their frames are all _NO_FRAMES): only their
            # place in the queue depth is forgotten. Every guest's disk, at every boundary.
            keep = [d for d in held if d > vt_us]
            self._inflight_done_us = keep
            self._inflight_frames = [_NO_FRAMES] * len(keep)
            return 0
        keep_done: list[float] = []
        keep_frames: list[np.ndarray] = []
        freed: list[np.ndarray] = []
        for done, frames in zip(self._inflight_done_us, self._inflight_frames):
            if done <= vt_us:
                freed.append(frames)
            else:
                keep_done.append(done)
                keep_frames.append(frames)
        self._inflight_done_us, self._inflight_frames = keep_done, keep_frames
        frames = np.concatenate(freed) if len(freed) > 1 else freed[0]
        self.pool.free(frames)
        self.counters.iobuf_retired_pages += int(frames.size)
        return int(frames.size)

    @property
    def inflight_requests(self) -> int:
        return len(self._inflight_done_us)

    def iobuf_frames(self) -> np.ndarray:
        if not self._inflight_frames:
            return np.zeros(0, np.int64)
        return np.concatenate(self._inflight_frames)

    # -- pinning ----------------------------------------------------------------

    def _check_range(self, first_block: int, n_blocks: int) -> slice:
        if n_blocks < 0:
            raise BadBatch(f"guest {self.guest_id}: n_blocks must be >= 0, got {n_blocks}")
        if first_block < 0 or (n_blocks and first_block >= self.n_blocks):
            raise OutOfRange(self.guest_id, "block", first_block, self.n_blocks)
        if first_block + n_blocks > self.n_blocks:
            raise OutOfRange(self.guest_id, "block", first_block + n_blocks - 1, self.n_blocks)
        return slice(first_block, first_block + n_blocks)

    def set_pinned(self, first_block: int, n_blocks: int, pinned: bool) -> None:
        """Pinned blocks' clusters stay cached: never dropped (budget, allowance or host pressure)."""
        sl = self._check_range(first_block, n_blocks)
        self.pinned[sl] = pinned
        self._kept_clusters()
        blocks = np.arange(sl.start, sl.stop)
        in_frame = blocks[self.cache_state[sl] == _FRAME]
        self.pool.pinned[self.cache_loc[in_frame]] = pinned

    def set_swap_exempt(self, first_block: int, n_blocks: int, exempt: bool) -> None:
        """Keep these blocks' clusters cached (never dropped), without pinning their frames.

        The pinning monitor's "exempt" mode. The cache is never host-swapped
        any more, so being exempt from host swapping means nothing; what the
        cure needs is that the area stays cached, as ``set_pinned`` does.
        """
        self.swap_exempt[self._check_range(first_block, n_blocks)] = exempt
        self._kept_clusters()

    def _kept_clusters(self) -> None:
        kept = np.flatnonzero(self.pinned | self.swap_exempt)
        self.cluster_pinned = np.bincount(kept // self.cluster_pages, minlength=self.cluster_cached.size) > 0
        self._v_cpinned = memoryview(self.cluster_pinned)

    def drop_swapped(self, first_block: int, n_blocks: int) -> int:
        """Cache copies in host swap: there are none any more (the cache is never host-swapped); returns 0.

        Kept for the pinning monitor, which called it to clear the swapped
        copies of an area before pinning it.
        """
        return 0

    # -- the guest's swap area (what the host's monitors watch) ----------------------

    def set_swap_area(self, first_block: int, n_blocks: int) -> None:
        """Tell the disk where the guest keeps its swap, so I/O to it is counted apart."""
        if n_blocks < 0 or first_block < 0 or first_block + n_blocks > self.n_blocks:
            raise OutOfRange(self.guest_id, "block", first_block + max(n_blocks, 1) - 1, self.n_blocks)
        self.swap_area = (int(first_block), int(first_block) + int(n_blocks))

    def _in_swap_area(self, blocks: np.ndarray) -> int:
        lo, hi = self.swap_area
        if hi <= lo:
            return 0
        if blocks.size == 1:
            return int(lo <= int(blocks[0]) < hi)
        return int(np.count_nonzero((blocks >= lo) & (blocks < hi)))

    def counts(self) -> dict[str, int]:
        return {"cache_frame_pages": self.cached_pages,
                "cache_dirty_pages": self.dirty_pages,
                "cache_allowance_pages": self.allowance_pages,
                "iobuf_pages": sum(int(f.size) for f in self._inflight_frames),
                "inflight_requests": self.inflight_requests,
                "pinned_blocks": int(np.count_nonzero(self.pinned))}


_NO_FRAMES = np.zeros(0, np.int64)

"""One guest's virtual disk, served through host memory.

Authoritative content is one ``uint64`` token per block in ``tokens``; a
block never written holds ``0``, which the guest reads as the block's
initial content (for a file block: the file page at version 0). The host
never interprets tokens.

Host memory holds two things for the disk, both frames of the shared pool:

- a cluster cache (``cluster_pages`` blocks per cluster, 64 KiB by default)
  in CACHE frames. A read that misses loads every uncached block of its
  cluster (one disk request per cluster); a hit costs ``page_copy_us`` per
  page. Writes are write-through (completion = the disk write) and
  write-allocate the written blocks. The cache is trimmed LRU by cluster when
  it exceeds ``cache_max_pages`` (pages in frames or in host swap), down to
  1/16 below it; trimming is free
  because write-through pages are clean. Clusters holding a pinned block
  are never trimmed.
- I/O buffers: each request holds ``n`` IOBUF frames from submit until the
  host's virtual time passes its completion (``retire``, each tick). When
  host memory is short, it also retires buffers of requests complete by the
  virtual time of the request that needs frames, instead of swapping.

Host swapping may take cache frames (it is blind): the block's cache state
becomes SWAPPED, and the next request touching it first swaps it back in: a
double fault (nested swapping), counted with the added latency.

At most ``max_inflight_requests`` requests are in service at once; a
request beyond that starts, in virtual time, when the earliest in-flight
one completes (backpressure without a queue).

The call order, driven by ``HostMemory`` which owns the frames::

    check_blocks -> frames_needed_{read,write} -> [host makes room] -> read|write
    swap_out (host reclaim)   retire, trim (each tick)

``read``/``write`` assume the pool has ``frames_needed_*`` free frames and
do not await: host memory makes room first, then calls them. ``read_one``,
``write_one`` and ``frames_needed_*_one`` are the same for a request of one
block, in scalars (most requests carry one page, and numpy's cost per call
dominates on arrays of one); they change the books exactly as the array
versions do, down to which frame is taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from balloonlab.proto.costs import CostModel, DiskModel, DiskProfile, disk_profile

from .errors import BadBatch, InvariantViolation, OutOfRange
from .framepool import FrameKind, FramePool
from .hostswap import HostSwap
from .p2m import NO_LOC, as_page_numbers, unique_pages

__all__ = ["CacheState", "VirtualDisk", "VdiskCounters", "IoResult", "DoubleFault", "CLUSTER_PAGES_DEFAULT",
           "MAX_INFLIGHT_REQUESTS_DEFAULT", "DOUBLE_FAULT_RECORDS_MAX"]

CLUSTER_PAGES_DEFAULT = 16          # 64 KiB clusters of 4 KiB pages
MAX_INFLIGHT_REQUESTS_DEFAULT = 32  # the disk's queue depth
DOUBLE_FAULT_RECORDS_MAX = 256      # kept for the host's monitor between two drains; the counters see all


class CacheState(IntEnum):
    NOT_CACHED = 0
    FRAME = 1
    SWAPPED = 2


# Plain ints for the per-request paths: an IntEnum attribute lookup costs
# about a microsecond, and a one-page read made two dozen of them.
_NOT_CACHED = int(CacheState.NOT_CACHED)
_FRAME = int(CacheState.FRAME)
_SWAPPED = int(CacheState.SWAPPED)
_CACHE_KIND = int(FrameKind.CACHE)
_IOBUF_KIND = int(FrameKind.IOBUF)
_NO_TOKENS = np.zeros(0, np.uint64)


@dataclass(slots=True)
class VdiskCounters:
    read_requests: int = 0
    write_requests: int = 0
    read_pages: int = 0
    write_pages: int = 0
    cache_hit_pages: int = 0
    cache_miss_pages: int = 0        # requested pages that were not cached
    cluster_loads: int = 0           # disk reads of (the uncached part of) a cluster
    cluster_load_pages: int = 0
    double_faults: int = 0           # cache pages swapped back in from host swap
    double_fault_wait_us: float = 0.0
    trimmed_pages: int = 0
    iobuf_retired_pages: int = 0
    backpressure_waits: int = 0
    backpressure_wait_us: float = 0.0
    swap_area_read_pages: int = 0    # pages read from / written to the guest's swap area, as the host
    swap_area_write_pages: int = 0   # sees them (``set_swap_area``); 0 until the area is known
    swap_area_dropped_pages: int = 0  # swapped-out cache copies of the area dropped by ``drop_swapped``


@dataclass(frozen=True, slots=True)
class DoubleFault:
    """One request's double faults: its blocks that had to come back from host swap first."""

    op: str                     # "read" or "write"
    blocks: np.ndarray          # the guest's disk blocks (int64)
    start_vt_us: float          # when the request started
    done_vt_us: float           # when the host swap-in read was done

    @property
    def added_us(self) -> float:
        """Virtual time the host swap-in added to the request."""
        return self.done_vt_us - self.start_vt_us


@dataclass(frozen=True, slots=True)
class IoResult:
    tokens: np.ndarray          # per requested block (reads); empty for writes
    done_vt_us: float
    swapped_in_pages: int       # host swap-ins this request caused (double faults)


class VirtualDisk:
    def __init__(self, guest_id: int, n_blocks: int, pool: FramePool, swap: HostSwap,
                 costs: CostModel, *, profile: DiskProfile | str = "ssd",
                 cluster_pages: int = CLUSTER_PAGES_DEFAULT, cache_max_pages: int = 0,
                 max_inflight_requests: int = MAX_INFLIGHT_REQUESTS_DEFAULT) -> None:
        if n_blocks < 0 or cluster_pages < 1 or cache_max_pages < 0 or max_inflight_requests < 1:
            raise ValueError(
                f"vdisk of guest {guest_id}: n_blocks={n_blocks}, cluster_pages={cluster_pages}, "
                f"cache_max_pages={cache_max_pages}, max_inflight_requests={max_inflight_requests}")
        self.guest_id = guest_id
        self.n_blocks = int(n_blocks)
        self.cluster_pages = int(cluster_pages)
        self.cache_max_pages = int(cache_max_pages)
        self.max_inflight_requests = int(max_inflight_requests)
        self.pool = pool
        self.swap = swap
        self.costs = costs
        self.disk = DiskModel(disk_profile(profile) if isinstance(profile, str) else profile)
        self.tokens = np.zeros(self.n_blocks, np.uint64)
        self.cache_state = np.zeros(self.n_blocks, np.uint8)
        self.cache_loc = np.full(self.n_blocks, NO_LOC, np.int64)
        self.pinned = np.zeros(self.n_blocks, bool)
        # Exempt from host swapping but trimmed like any cache page (``set_swap_exempt``).
        self.swap_exempt = np.zeros(self.n_blocks, bool)
        n_clusters = -(-self.n_blocks // self.cluster_pages)
        self.cluster_used = np.zeros(n_clusters, np.int64)    # LRU stamp per cluster
        self.cluster_cached = np.zeros(n_clusters, np.int64)  # blocks FRAME or SWAPPED per cluster
        self.cluster_pinned = np.zeros(n_clusters, bool)      # holds a pinned block: never trimmed
        self._use_stamp = 0
        self.cached_pages = 0                                  # blocks FRAME or SWAPPED
        self._inflight_done_us: list[float] = []
        self._inflight_frames: list[np.ndarray | int] = []    # a request's IOBUF frames (an int: one frame)
        self.counters = VdiskCounters()
        # The guest's swap area, once the host knows it: [first, end) blocks.
        self.swap_area: tuple[int, int] = (0, 0)
        # Double faults since the host's monitor last drained them (bounded; counters see all).
        self.double_fault_records: list[DoubleFault] = []
        self.double_fault_records_dropped = 0

    def set_profile(self, profile: DiskProfile | str) -> None:
        self.disk = DiskModel(disk_profile(profile) if isinstance(profile, str) else profile)

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

    def _cluster_fill(self, blocks_u: np.ndarray) -> np.ndarray:
        """Uncached blocks of every cluster that a requested uncached block falls in."""
        missing = blocks_u[self.cache_state[blocks_u] == _NOT_CACHED]
        if missing.size == 0:
            return missing
        clusters = unique_pages(missing // self.cluster_pages)
        cand = (clusters[:, None] * self.cluster_pages + np.arange(self.cluster_pages)).ravel()
        cand = cand[cand < self.n_blocks]
        return cand[self.cache_state[cand] == _NOT_CACHED]

    def frames_needed_read(self, blocks: np.ndarray) -> int:
        blocks_u = unique_pages(blocks)
        swapped = np.count_nonzero(self.cache_state[blocks_u] == _SWAPPED)
        return int(blocks.size + self._cluster_fill(blocks_u).size + swapped)

    def frames_needed_write(self, blocks: np.ndarray) -> int:
        uncached = np.count_nonzero(self.cache_state[blocks] != _FRAME)
        return int(blocks.size + uncached)

    def frames_needed_read_one(self, block: int) -> int:
        """``frames_needed_read`` of one block."""
        state = self.cache_state[block]
        if state == _FRAME:
            return 1
        if state == _SWAPPED:
            return 2
        return 1 + self._uncached_in_cluster(block)

    def frames_needed_write_one(self, block: int) -> int:
        return 1 if self.cache_state[block] == _FRAME else 2

    def _uncached_in_cluster(self, block: int) -> int:
        """Blocks of ``block``'s cluster that are neither in a frame nor in host swap."""
        c = block // self.cluster_pages
        size = min(self.cluster_pages, self.n_blocks - c * self.cluster_pages)
        return size - int(self.cluster_cached[c])

    # -- I/O (synchronous: the pool must already have the frames) ---------------

    def read(self, blocks: np.ndarray, vt_us: float) -> IoResult:
        c = self.counters
        start = self._admit(vt_us)
        blocks_u = unique_pages(blocks)
        state = self.cache_state[blocks_u]
        hits = int(np.count_nonzero(state == _FRAME))
        done = start + hits * self.costs.page_copy_us

        fill = self._cluster_fill(blocks_u)
        if fill.size:
            self._cache_in(fill, self.tokens[fill])
            # One disk request per cluster: the clusters of one request are
            # served in parallel over the disk's channels.
            per_cluster = np.bincount(fill // self.cluster_pages)
            for n_pages in per_cluster[per_cluster > 0]:
                done = max(done, self.disk.submit(start, int(n_pages)))
            c.cluster_loads += int(np.count_nonzero(per_cluster))
            c.cluster_load_pages += int(fill.size)

        swapped = blocks_u[state == _SWAPPED]
        if swapped.size:
            done = max(done, self._double_fault(swapped, start, None, "read"))

        self._touch(blocks_u)
        tokens = self.pool.token[self.cache_loc[blocks]]
        self._hold_iobufs(blocks, done)
        c.read_requests += 1
        c.read_pages += int(blocks.size)
        c.swap_area_read_pages += self._in_swap_area(blocks)
        c.cache_hit_pages += hits
        c.cache_miss_pages += int(blocks_u.size) - hits
        self.trim()
        return IoResult(tokens, done, int(swapped.size))

    def read_one(self, block: int, vt_us: float) -> IoResult:
        """``read`` of one block."""
        c = self.counters
        start = self._admit(vt_us)
        state = self.cache_state[block]
        hit = state == _FRAME
        done = start + self.costs.page_copy_us if hit else start
        swapped = 0
        if state == _NOT_CACHED:
            # The uncached blocks of its cluster, loaded by one disk request.
            if self.cluster_pages == 1:
                self._cache_in_one(block, int(self.tokens[block]))
                n_fill = 1
            else:
                lo = block - block % self.cluster_pages
                fill = lo + np.flatnonzero(self.cache_state[lo:lo + self.cluster_pages] == _NOT_CACHED)
                self._cache_in(fill, self.tokens[fill])
                n_fill = int(fill.size)
            done = max(done, self.disk.submit(start, n_fill))
            c.cluster_loads += 1
            c.cluster_load_pages += n_fill
        elif state == _SWAPPED:
            done = max(done, self._double_fault(np.array((block,), np.int64), start, None, "read"))
            swapped = 1
        self._touch_one(block)
        token = self.pool.token[self.cache_loc[block]]
        self._hold_iobuf_one(block, done)
        c.read_requests += 1
        c.read_pages += 1
        lo, hi = self.swap_area
        c.swap_area_read_pages += lo <= block < hi
        c.cache_hit_pages += int(hit)
        c.cache_miss_pages += int(not hit)
        self.trim()
        return IoResult(np.array((token,), np.uint64), done, swapped)

    def write_one(self, block: int, token: int, vt_us: float) -> IoResult:
        """``write`` of one block."""
        c = self.counters
        start = self._admit(vt_us)
        state = self.cache_state[block]
        write_start = start
        swapped = 0
        if state == _SWAPPED:
            # The host caches whole clusters: it must bring the page back first (nested swapping).
            write_start = self._double_fault(np.array((block,), np.int64), start, np.array((token,), np.uint64),
                                             "write")
            swapped = 1
        elif state == _NOT_CACHED:
            self._cache_in_one(block, token)
        else:
            self.pool.token[self.cache_loc[block]] = token
        self.tokens[block] = token
        done = self.disk.submit(write_start, 1)
        self._touch_one(block)
        self._hold_iobuf_one(block, done)
        c.write_requests += 1
        c.write_pages += 1
        lo, hi = self.swap_area
        c.swap_area_write_pages += lo <= block < hi
        hit = state == _FRAME
        c.cache_hit_pages += int(hit)
        c.cache_miss_pages += int(not hit)
        self.trim()
        return IoResult(_NO_TOKENS, done, swapped)

    def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> IoResult:
        """Write-through of distinct ``blocks``; the cache copy is updated or allocated."""
        c = self.counters
        start = self._admit(vt_us)
        state = self.cache_state[blocks]
        swapped = blocks[state == _SWAPPED]
        write_start = start
        if swapped.size:
            # The host caches whole clusters: it must bring the page back
            # before the write can land in it (nested swapping).
            write_start = self._double_fault(swapped, start, tokens[state == _SWAPPED], "write")
        uncached = state == _NOT_CACHED
        if np.any(uncached):
            self._cache_in(blocks[uncached], tokens[uncached])
        cached = state == _FRAME
        self.pool.token[self.cache_loc[blocks[cached]]] = tokens[cached]
        self.tokens[blocks] = tokens
        done = self.disk.submit(write_start, int(blocks.size))
        self._touch(blocks)
        self._hold_iobufs(blocks, done)
        c.write_requests += 1
        c.write_pages += int(blocks.size)
        c.swap_area_write_pages += self._in_swap_area(blocks)
        c.cache_hit_pages += int(np.count_nonzero(cached))
        c.cache_miss_pages += int(blocks.size - np.count_nonzero(cached))
        self.trim()
        return IoResult(np.zeros(0, np.uint64), done, int(swapped.size))

    # -- cache mechanics -------------------------------------------------------

    def _cache_in(self, blocks: np.ndarray, tokens: np.ndarray) -> None:
        frames = self.pool.alloc(blocks.size, FrameKind.CACHE, self.guest_id, blocks, tokens)
        if frames.size != blocks.size:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few cache frames")
        self.pool.pinned[frames] = self.pinned[blocks] | self.swap_exempt[blocks]
        new = blocks[self.cache_state[blocks] == _NOT_CACHED]
        if new.size:
            of = new // self.cluster_pages
            if of[0] == of[-1] and np.all(of == of[0]):   # the usual case: one cluster's fill
                self.cluster_cached[of[0]] += of.size
            else:
                clusters, n_new = np.unique(of, return_counts=True)
                self.cluster_cached[clusters] += n_new
            self.cached_pages += int(new.size)
        self.cache_state[blocks] = _FRAME
        self.cache_loc[blocks] = frames

    def _cache_in_one(self, block: int, token: int) -> None:
        """``_cache_in`` of one block that is not cached."""
        f = self.pool.alloc_one(_CACHE_KIND, self.guest_id, block, token)
        if f < 0:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few cache frames")
        self.pool.pinned[f] = self.pinned[block] or self.swap_exempt[block]
        self.cluster_cached[block // self.cluster_pages] += 1
        self.cached_pages += 1
        self.cache_state[block] = _FRAME
        self.cache_loc[block] = f

    def _double_fault(self, blocks: np.ndarray, start_us: float, new_tokens: np.ndarray | None,
                      op: str = "read") -> float:
        """Swap cache pages back in from host swap; returns when the swap-in read is done."""
        slots = self.cache_loc[blocks]
        tokens = self.swap.load(slots) if new_tokens is None else new_tokens
        self.swap.free(slots)
        self._cache_in(blocks, tokens)
        done = self.swap.lane(self.guest_id).submit(start_us, int(blocks.size))
        self.counters.double_faults += int(blocks.size)
        self.counters.double_fault_wait_us += done - start_us
        if len(self.double_fault_records) < DOUBLE_FAULT_RECORDS_MAX:
            self.double_fault_records.append(DoubleFault(op, blocks.astype(np.int64), float(start_us), float(done)))
        else:
            self.double_fault_records_dropped += 1
        return done

    def take_double_faults(self) -> tuple[list[DoubleFault], int]:
        """The double faults recorded since the last call, and how many requests were not recorded."""
        records, dropped = self.double_fault_records, self.double_fault_records_dropped
        self.double_fault_records, self.double_fault_records_dropped = [], 0
        return records, dropped

    def swap_out(self, frames: np.ndarray, slots: np.ndarray) -> None:
        """Host swapping took these CACHE frames of this disk: move their content to ``slots``."""
        blocks = self.pool.owner_index[frames]
        self.swap.store(slots, self.pool.token[frames], FrameKind.CACHE, self.guest_id, blocks)
        self.cache_state[blocks] = _SWAPPED
        self.cache_loc[blocks] = slots
        self.pool.free(frames)

    def _touch(self, blocks: np.ndarray) -> None:
        self._use_stamp += 1
        self.cluster_used[blocks // self.cluster_pages] = self._use_stamp

    def _touch_one(self, block: int) -> None:
        self._use_stamp += 1
        self.cluster_used[block // self.cluster_pages] = self._use_stamp

    def trim(self) -> int:
        """Once over ``cache_max_pages``, drop least recently used clusters down to 1/16 below it.

        Trimming in batches, not one cluster per request: a scan of every
        cluster on each read of a full cache was a quarter of the host's time.
        """
        over = self.cached_pages - self.cache_max_pages
        if over <= 0:
            return 0
        over += self.cache_max_pages // 16
        cand = np.flatnonzero((self.cluster_cached > 0) & ~self.cluster_pinned)
        if cand.size == 0:
            return 0
        # Every candidate holds at least one page, so the `over` oldest suffice:
        # partition for them instead of sorting every cluster.
        k = min(cand.size, over)
        if k < cand.size:
            cand = cand[np.argpartition(self.cluster_used[cand], k - 1)[:k]]
        order = cand[np.argsort(self.cluster_used[cand], kind="stable")]
        upto = int(np.searchsorted(np.cumsum(self.cluster_cached[order]), over)) + 1
        return self._drop_clusters(order[:upto])

    def _drop_clusters(self, victims: np.ndarray) -> int:
        """Uncache every block of these clusters (frames and swapped copies freed); returns blocks dropped."""
        blocks = (victims[:, None] * self.cluster_pages + np.arange(self.cluster_pages)).ravel()
        blocks = blocks[blocks < self.n_blocks]
        state = self.cache_state[blocks]
        blocks, state = blocks[state != _NOT_CACHED], state[state != _NOT_CACHED]
        self.pool.free(self.cache_loc[blocks[state == _FRAME]])
        self.swap.free(self.cache_loc[blocks[state == _SWAPPED]])
        self.cache_state[blocks] = _NOT_CACHED
        self.cache_loc[blocks] = NO_LOC
        self.cluster_cached[victims] = 0
        self.cached_pages -= int(blocks.size)
        self.counters.trimmed_pages += int(blocks.size)
        return int(blocks.size)

    def drop_clean_lru(self, n_frames: int) -> int:
        """Drop least recently used unpinned clusters until at least ``n_frames`` frames are free; returns frames freed.

        The guest's grant ran out: its own cache gives way before its
        pages are host-swapped. Every cached page is clean (write-through),
        so dropping costs nothing; ties in the LRU stamp go by cluster index.
        """
        if n_frames <= 0 or self.cached_pages == 0:
            return 0
        cand = np.flatnonzero((self.cluster_cached > 0) & ~self.cluster_pinned)
        if cand.size == 0:
            return 0
        order = cand[np.lexsort((cand, self.cluster_used[cand]))]
        freed = 0
        victims: list[int] = []
        cp = self.cluster_pages
        for c in order.tolist():
            blocks = np.arange(c * cp, min((c + 1) * cp, self.n_blocks))
            in_frame = blocks[self.cache_state[blocks] == _FRAME]
            if in_frame.size == 0:
                continue   # only swapped copies: dropping it frees no frame
            victims.append(c)
            freed += int(in_frame.size)
            if freed >= n_frames:
                break
        if not victims:
            return 0
        self._drop_clusters(np.asarray(victims, np.int64))
        return freed

    # -- I/O buffers and backpressure ------------------------------------------

    def _admit(self, vt_us: float) -> float:
        """Virtual start time of a new request, after the earliest in-flight ones complete."""
        held = self._inflight_done_us   # requests whose buffers are not retired yet: a superset of those in flight
        if len(held) < self.max_inflight_requests:
            return float(vt_us)
        active = [d for d in held if d > vt_us]
        if len(active) < self.max_inflight_requests:
            return float(vt_us)
        active.sort()   # only when the queue is full: the usual request needs no sort
        start = active[len(active) - self.max_inflight_requests]
        self.counters.backpressure_waits += 1
        self.counters.backpressure_wait_us += start - vt_us
        return start

    def _hold_iobufs(self, blocks: np.ndarray, done_us: float) -> None:
        frames = self.pool.alloc(blocks.size, FrameKind.IOBUF, self.guest_id, blocks)
        if frames.size != blocks.size:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few I/O buffers")
        self._inflight_done_us.append(float(done_us))
        self._inflight_frames.append(frames)

    def _hold_iobuf_one(self, block: int, done_us: float) -> None:
        f = self.pool.alloc_one(_IOBUF_KIND, self.guest_id, block)
        if f < 0:
            raise InvariantViolation(f"vdisk {self.guest_id}: host memory made room for too few I/O buffers")
        self._inflight_done_us.append(float(done_us))
        self._inflight_frames.append(f)

    def retire(self, vt_us: float) -> int:
        """Free the I/O buffers of every request completed by ``vt_us``; returns pages freed."""
        if not self._inflight_done_us or min(self._inflight_done_us) > vt_us:
            return 0
        keep_done: list[float] = []
        keep_frames: list[np.ndarray | int] = []
        freed: list[np.ndarray | int] = []
        for done, frames in zip(self._inflight_done_us, self._inflight_frames):
            if done <= vt_us:
                freed.append(frames)
            else:
                keep_done.append(done)
                keep_frames.append(frames)
        self._inflight_done_us, self._inflight_frames = keep_done, keep_frames
        frames = _in_order(freed)
        self.pool.free(frames)
        self.counters.iobuf_retired_pages += int(frames.size)
        return int(frames.size)

    @property
    def inflight_requests(self) -> int:
        return len(self._inflight_done_us)

    def iobuf_frames(self) -> np.ndarray:
        if not self._inflight_frames:
            return np.zeros(0, np.int64)
        return _in_order(self._inflight_frames)

    # -- pinning ----------------------------------------------------------------

    def set_pinned(self, first_block: int, n_blocks: int, pinned: bool) -> None:
        if n_blocks < 0:
            raise BadBatch(f"guest {self.guest_id}: n_blocks must be >= 0, got {n_blocks}")
        if first_block < 0 or (n_blocks and first_block >= self.n_blocks):
            raise OutOfRange(self.guest_id, "block", first_block, self.n_blocks)
        if first_block + n_blocks > self.n_blocks:
            raise OutOfRange(self.guest_id, "block", first_block + n_blocks - 1, self.n_blocks)
        sl = slice(first_block, first_block + n_blocks)
        self.pinned[sl] = pinned
        self.cluster_pinned = np.bincount(np.flatnonzero(self.pinned) // self.cluster_pages,
                                          minlength=self.cluster_used.size) > 0
        blocks = np.arange(first_block, first_block + n_blocks)
        in_frame = blocks[self.cache_state[sl] == _FRAME]
        self.pool.pinned[self.cache_loc[in_frame]] = pinned | self.swap_exempt[in_frame]

    def set_swap_exempt(self, first_block: int, n_blocks: int, exempt: bool) -> None:
        """Make the cache frames of these blocks never host-swap victims (now and when cached later).

        Unlike ``set_pinned`` the blocks are still trimmed with the rest of
        the cache (LRU, to ``cache_max_pages``): a trimmed block is read from
        the disk when next needed, which costs one I/O, not a host swap-in
        first. The host memory this holds stays within the cache's bound.
        """
        if n_blocks < 0:
            raise BadBatch(f"guest {self.guest_id}: n_blocks must be >= 0, got {n_blocks}")
        if first_block < 0 or (n_blocks and first_block >= self.n_blocks):
            raise OutOfRange(self.guest_id, "block", first_block, self.n_blocks)
        if first_block + n_blocks > self.n_blocks:
            raise OutOfRange(self.guest_id, "block", first_block + n_blocks - 1, self.n_blocks)
        sl = slice(first_block, first_block + n_blocks)
        self.swap_exempt[sl] = exempt
        blocks = np.arange(first_block, first_block + n_blocks)
        in_frame = blocks[self.cache_state[sl] == _FRAME]
        self.pool.pinned[self.cache_loc[in_frame]] = self.pinned[in_frame] | exempt

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
        return int(np.count_nonzero((blocks >= lo) & (blocks < hi)))

    def drop_swapped(self, first_block: int, n_blocks: int) -> int:
        """Forget the cache copies of these blocks that sit in host swap; returns how many.

        Writes are write-through, so such a copy is clean: the disk holds the
        same content. Dropping it frees its swap slot, and the next access to
        the block is an ordinary cache miss instead of a host swap-in (a
        double fault). Pinning uses this so that nothing it pins is in swap.
        """
        if n_blocks <= 0:
            return 0
        lo = max(0, int(first_block))
        hi = min(self.n_blocks, int(first_block) + int(n_blocks))
        blocks = lo + np.flatnonzero(self.cache_state[lo:hi] == _SWAPPED)
        if blocks.size == 0:
            return 0
        self.swap.free(self.cache_loc[blocks])
        self.cache_state[blocks] = _NOT_CACHED
        self.cache_loc[blocks] = NO_LOC
        clusters, n = np.unique(blocks // self.cluster_pages, return_counts=True)
        self.cluster_cached[clusters] -= n
        self.cached_pages -= int(blocks.size)
        self.counters.swap_area_dropped_pages += int(blocks.size)
        return int(blocks.size)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.cache_state, minlength=len(CacheState))
        return {"cache_frame_pages": int(c[_FRAME]),
                "cache_swapped_pages": int(c[_SWAPPED]),
                "iobuf_pages": sum(1 if type(f) is int else int(f.size) for f in self._inflight_frames),
                "inflight_requests": self.inflight_requests,
                "pinned_blocks": int(np.count_nonzero(self.pinned))}


def _in_order(parts: list[np.ndarray | int]) -> np.ndarray:
    """Frames of several requests as one array, in request order (ints: one-frame requests).

    The order is the order they go back on the free stack, so it decides
    which frame later requests get: it must not depend on how they were held.
    """
    arrays: list[np.ndarray] = []
    run: list[int] = []
    for p in parts:
        if type(p) is int:
            run.append(p)
            continue
        if run:
            arrays.append(np.array(run, np.int64))
            run = []
        arrays.append(p)  # type: ignore[arg-type]
    if run:
        arrays.append(np.array(run, np.int64))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

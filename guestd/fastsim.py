"""Fast offline simulators for trace replay: same counts as the policy definitions, far fewer steps.

The kernel path (``guestd.kernel`` + ``guestd.replacement``) is the
definition; these simulators are for replaying long traces and are proven
equal to it by tests/test_paging_fastsim.py. Supported: ``fifo``, ``lru``,
``opt``, ``clock``, ``clock-r0``, ``esc``.

The trick: a hit only ever *sets* bits, so hits need not be visited at all.
With every page's reference positions sorted (one radix sort), a frame's R
bit at time m is "the page was referenced after the last time R was
cleared", i.e. ``pending_r[f] < m`` where ``pending_r[f]`` is the first
reference after the clear (or -1 when the load set R). Clearing R is a
binary search for the next reference after now. M likewise with the write
positions. The misses themselves are known without visiting hits too: the
first reference of each page (cold misses), and for each evicted page its
next reference after the eviction (a min-heap). So the work is
O(misses x log) plus one sort, not O(references).

``esc`` needs one more idea to stay O(misses): R=0 frames only arise from
step 2 clears, which visit frames in circle order from the hand, so the
clean ones form a FIFO queue that is already in circle order from the
hand; step 1 pops stale entries (referenced since) off its front.

These loops are Python per miss (3-17 M references/s); the guest kernel's
compiled core runs every reference in C at 30-180 M/s on the same traces
(scripts/bench.py traces). So ``simulate_fast`` runs the compiled kernel for
``clock``, ``clock-r0`` and ``esc`` (``engine="auto"``) and these loops for
``fifo``, ``lru`` and ``opt`` (the compiled core finds a FIFO or LRU victim
with a scan of every frame, slower than the heaps here past a few thousand
frames), and keeps them all as a second, independent implementation
(``engine="python"``).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import asdict, dataclass
from heapq import heappop, heappush

import numpy as np

from .errors import GuestConfigError, UnknownPolicy

__all__ = ["SimResult", "FAST_POLICIES", "KERNEL_FASTER", "simulate_fast", "TraceIndex", "stable_argsort",
           "dense_page_ids"]

_MASK32 = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    frames: int
    refs: int
    faults: int
    writebacks: int

    @property
    def hits(self) -> int:
        return self.refs - self.faults

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _check_trace_pages(pages: np.ndarray) -> np.ndarray:
    """Page numbers as uint64; a non-integer or negative trace is an error."""
    keys = np.asarray(pages)
    if keys.dtype.kind not in "ui":
        raise GuestConfigError(f"trace pages must be integers, got dtype {keys.dtype}")
    if keys.dtype.kind == "i" and keys.size and int(keys.min()) < 0:
        raise GuestConfigError("trace pages must be non-negative")
    return keys.astype(np.uint64, copy=False)


def dense_page_ids(pages: np.ndarray) -> np.ndarray:
    """Page ids 0..k-1 in increasing page-number order, one per reference (int64).

    A lookup table when the page numbers are small (O(n)), else a sort.
    """
    keys = _check_trace_pages(pages)
    n = keys.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    hi = int(keys.max())
    if hi < max(4 * n, 1 << 16):
        present = np.zeros(hi + 1, bool)
        present[keys] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return rank[keys]
    _, inv = np.unique(keys, return_inverse=True)
    return inv.astype(np.int64, copy=False).reshape(n)


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integers by LSD radix over 16-bit digits.

    numpy's stable sort is a radix sort for 16-bit keys, several times
    faster than its 64-bit merge sort; a few passes of it beat one of those.
    """
    keys = np.asarray(keys)
    n = keys.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    hi = int(keys.max())
    order: np.ndarray | None = None
    shift = 0
    while True:
        cur = keys if order is None else keys[order]
        digit = ((cur >> shift) & 0xFFFF).astype(np.uint16)
        o = np.argsort(digit, kind="stable")
        order = o if order is None else order[o]
        shift += 16
        if (hi >> shift) == 0:
            return order.astype(np.int64, copy=False)


class TraceIndex:
    """Every page's reference (and write) positions, grouped by page, for binary search.

    Pages get dense ids 0..n_pages-1 in increasing page-number order.
    ``occ[start[p]:end[p]]`` are the positions of page p, increasing;
    ``wocc[wstart[p]:wend[p]]`` its write positions; ``cold_pos`` the first
    reference of every page in time order and ``cold_page`` its page id.
    """

    def __init__(self, pages: np.ndarray, writes: np.ndarray) -> None:
        keys = _check_trace_pages(pages)
        writes = np.asarray(writes, dtype=bool)
        n = keys.shape[0]
        if writes.shape != (n,):
            raise GuestConfigError(f"writes has shape {writes.shape}, pages has {n} entries")
        self.n = n
        if n and int(keys.max()) < max(4 * n, 1 << 16):
            # a small page range: a lookup table makes the ids dense in O(n + range)
            present = np.zeros(int(keys.max()) + 1, bool)
            present[keys] = True
            rank = np.cumsum(present, dtype=np.int64) - 1
            ids = rank[keys]
            order = stable_argsort(ids)          # one radix pass when <= 65536 pages
        else:
            order = stable_argsort(keys)
            sk = keys[order]
            new = np.empty(n, bool)
            if n:
                new[0] = True
                np.not_equal(sk[1:], sk[:-1], out=new[1:])
            ids = np.empty(n, np.int64)
            ids[order] = np.cumsum(new, dtype=np.int64) - 1
        self.n_pages = int(ids.max()) + 1 if n else 0
        bounds = np.zeros(self.n_pages + 1, np.int64)
        np.cumsum(np.bincount(ids, minlength=self.n_pages), out=bounds[1:])
        self._ids = ids
        self._order = order                      # keeps the memoryview's buffer alive
        self._bounds = bounds
        # memoryview: zero-copy, and bisect reads it as fast as a list
        self.occ = memoryview(order)
        self.start = bounds[:-1].tolist()
        self.end = bounds[1:].tolist()
        ws = writes[order]
        self._worder = order[ws]
        self.wocc = memoryview(self._worder)
        cws = np.zeros(n + 1, np.int64)
        np.cumsum(ws, out=cws[1:])
        wb = cws[bounds]
        self.wstart = wb[:-1].tolist()
        self.wend = wb[1:].tolist()
        first = order[bounds[:-1]]               # first reference of page id 0, 1, ...
        by_time = np.argsort(first)
        self.cold_pos = first[by_time].tolist()
        self.cold_page = by_time.tolist()

    def next_use(self) -> np.ndarray:
        """For each position, the next position of the same page (n if none)."""
        order = self._order
        last = np.zeros(self.n, bool)            # in sorted order: the last reference of its page
        last[self._bounds[1:] - 1] = True
        nxt = np.full(self.n, self.n, np.int64)
        more = ~last[:-1]
        nxt[order[:-1][more]] = order[1:][more]
        return nxt

    def page_ids(self) -> np.ndarray:
        """Dense page id of every position."""
        return self._ids


def _pend_write(ix: TraceIndex, p: int, m: int, inf: int) -> int:
    """M as a pending time: -1 if the reference at m writes, else the first write after m (inf if none)."""
    s = ix.wstart[p]
    e = ix.wend[p]
    if s == e:
        return inf
    j = bisect_left(ix.wocc, m, s, e)
    if j == e:
        return inf
    x = ix.wocc[j]
    return -1 if x == m else x


def _sim_clock(ix: TraceIndex, k: int, r_on_load: bool) -> tuple[int, int]:
    occ, start, end = ix.occ, ix.start, ix.end
    wocc, wstart, wend = ix.wocc, ix.wstart, ix.wend
    inf = ix.n
    fpage = [0] * k
    pr = [inf] * k          # R=1 at time m iff pr[f] < m
    pw = [inf] * k          # M=1 at time m iff pw[f] < m
    heap: list[int] = []
    cold_pos, cold_page = ix.cold_pos, ix.cold_page
    nc = len(cold_pos)
    ci = 0
    next_cold = cold_pos[0] if nc else inf
    faults = wb = 0
    hand = 0
    filled = 0
    while True:
        if heap and (heap[0] >> 32) < next_cold:
            key = heappop(heap)
            m = key >> 32
            p = key & _MASK32
        elif next_cold < inf:
            m = next_cold
            p = cold_page[ci]
            ci += 1
            next_cold = cold_pos[ci] if ci < nc else inf
        else:
            break
        faults += 1
        if filled < k:
            f = filled
            filled += 1
        else:
            while pr[hand] < m:                 # R=1: clear it (next reference after now) and advance
                q = fpage[hand]
                e = end[q]
                j = bisect_right(occ, m, start[q], e)
                pr[hand] = occ[j] if j < e else inf
                hand += 1
                if hand == k:
                    hand = 0
            f = hand
            hand += 1
            if hand == k:
                hand = 0
            if pw[f] < m:
                wb += 1
            nx = pr[f]                          # R=0, so this is the victim's next reference
            if nx < inf:
                heappush(heap, (nx << 32) | fpage[f])
        fpage[f] = p
        s = wstart[p]
        e = wend[p]
        if s == e:
            pw[f] = inf
        else:
            j = bisect_left(wocc, m, s, e)
            pw[f] = inf if j == e else (-1 if wocc[j] == m else wocc[j])
        if r_on_load:
            pr[f] = -1
        else:
            e = end[p]
            j = bisect_right(occ, m, start[p], e)
            pr[f] = occ[j] if j < e else inf
    return faults, wb


def _sim_esc(ix: TraceIndex, k: int) -> tuple[int, int]:
    occ, start, end = ix.occ, ix.start, ix.end
    wocc, wstart, wend = ix.wocc, ix.wstart, ix.wend
    inf = ix.n
    fpage = [0] * k
    pr = [inf] * k
    pw = [inf] * k
    c01 = [False] * k       # R was last cleared while M=1: (0,1) while pr[f] > now
    c00: deque[int] = deque()   # frames cleared while clean, in circle order from the hand
    heap: list[int] = []
    cold_pos, cold_page = ix.cold_pos, ix.cold_page
    nc = len(cold_pos)
    ci = 0
    next_cold = cold_pos[0] if nc else inf
    faults = wb = 0
    hand = 0
    filled = 0
    while True:
        if heap and (heap[0] >> 32) < next_cold:
            key = heappop(heap)
            m = key >> 32
            p = key & _MASK32
        elif next_cold < inf:
            m = next_cold
            p = cold_page[ci]
            ci += 1
            next_cold = cold_pos[ci] if ci < nc else inf
        else:
            break
        faults += 1
        if filled < k:
            v = filled
            filled += 1
        else:
            v = -1
            while c00:                          # step 1: first (0,0) from the hand
                f = c00.popleft()
                if pr[f] > m:
                    v = f
                    break
            if v < 0:                           # step 2: first (0,1), clearing R on the way
                f = hand
                for _ in range(k):
                    if c01[f] and pr[f] > m:
                        v = f
                        break
                    q = fpage[f]                # R=1 here (no (0,0) is left anywhere)
                    e = end[q]
                    j = bisect_right(occ, m, start[q], e)
                    pr[f] = occ[j] if j < e else inf
                    if pw[f] < m:
                        c01[f] = True
                    else:
                        c01[f] = False
                        c00.append(f)
                    f += 1
                    if f == k:
                        f = 0
                if v < 0:                       # all R now 0: step 1 again, else step 2 at the hand
                    v = c00.popleft() if c00 else hand
            hand = v + 1
            if hand == k:
                hand = 0
            if pw[v] < m:
                wb += 1
            nx = pr[v]
            if nx < inf:
                heappush(heap, (nx << 32) | fpage[v])
        fpage[v] = p
        pr[v] = -1
        c01[v] = False
        s = wstart[p]
        e = wend[p]
        if s == e:
            pw[v] = inf
        else:
            j = bisect_left(wocc, m, s, e)
            pw[v] = inf if j == e else (-1 if wocc[j] == m else wocc[j])
    return faults, wb


def _sim_fifo(ix: TraceIndex, k: int) -> tuple[int, int]:
    occ, start, end = ix.occ, ix.start, ix.end
    inf = ix.n
    fpage = [0] * k
    pw = [inf] * k
    heap: list[int] = []
    cold_pos, cold_page = ix.cold_pos, ix.cold_page
    nc = len(cold_pos)
    ci = 0
    next_cold = cold_pos[0] if nc else inf
    faults = wb = 0
    ptr = 0         # frames are refilled in load order, so FIFO's victim just cycles
    filled = 0
    while True:
        if heap and (heap[0] >> 32) < next_cold:
            key = heappop(heap)
            m = key >> 32
            p = key & _MASK32
        elif next_cold < inf:
            m = next_cold
            p = cold_page[ci]
            ci += 1
            next_cold = cold_pos[ci] if ci < nc else inf
        else:
            break
        faults += 1
        if filled < k:
            f = filled
            filled += 1
        else:
            f = ptr
            ptr += 1
            if ptr == k:
                ptr = 0
            if pw[f] < m:
                wb += 1
            q = fpage[f]
            e = end[q]
            j = bisect_right(occ, m, start[q], e)
            if j < e:
                heappush(heap, (occ[j] << 32) | q)
        fpage[f] = p
        pw[f] = _pend_write(ix, p, m, inf)
    return faults, wb


def _sim_lru(ix: TraceIndex, k: int) -> tuple[int, int]:
    occ, start, end = ix.occ, ix.start, ix.end
    inf = ix.n
    fpage = [0] * k
    pw = [inf] * k
    lru: list[int] = []     # one entry per frame: last use * k + frame, possibly stale (too old)
    heap: list[int] = []
    cold_pos, cold_page = ix.cold_pos, ix.cold_page
    nc = len(cold_pos)
    ci = 0
    next_cold = cold_pos[0] if nc else inf
    faults = wb = 0
    filled = 0
    while True:
        if heap and (heap[0] >> 32) < next_cold:
            key = heappop(heap)
            m = key >> 32
            p = key & _MASK32
        elif next_cold < inf:
            m = next_cold
            p = cold_page[ci]
            ci += 1
            next_cold = cold_pos[ci] if ci < nc else inf
        else:
            break
        faults += 1
        if filled < k:
            f = filled
            filled += 1
        else:
            while True:
                s, f = divmod(heappop(lru), k)
                q = fpage[f]
                e = end[q]
                j = bisect_left(occ, m, start[q], e)
                last = occ[j - 1]               # q's last reference before m (at least its load)
                if last == s:
                    break
                heappush(lru, last * k + f)     # it was hit since: refresh and look again
            if pw[f] < m:
                wb += 1
            if j < e:
                heappush(heap, (occ[j] << 32) | q)
        fpage[f] = p
        heappush(lru, m * k + f)
        pw[f] = _pend_write(ix, p, m, inf)
    return faults, wb


def _sim_opt(ix: TraceIndex, k: int) -> tuple[int, int]:
    # Next uses are refreshed only when a victim is needed, for the pages hit
    # since the last time, with one numpy pass: position j is the last hit of
    # its page before now (m) iff its next use nxt[j] is after m.
    inf = ix.n
    nxt = ix.next_use()
    ids = ix.page_ids()
    fpage = [0] * k
    pw = [inf] * k
    cur = [inf] * ix.n_pages     # next use of each resident page
    fof = [-1] * ix.n_pages      # its frame (-1: not resident)
    far: list[int] = []          # (inf - next use) << 32 | page: the farthest finite next use on top
    never: list[int] = []        # frames whose page is never used again: the lowest one goes first
    heap: list[int] = []
    cold_pos, cold_page = ix.cold_pos, ix.cold_page
    nc = len(cold_pos)
    ci = 0
    next_cold = cold_pos[0] if nc else inf
    faults = wb = 0
    filled = 0
    applied = 0                  # hits before this position are reflected in cur
    while True:
        if heap and (heap[0] >> 32) < next_cold:
            key = heappop(heap)
            m = key >> 32
            p = key & _MASK32
        elif next_cold < inf:
            m = next_cold
            p = cold_page[ci]
            ci += 1
            next_cold = cold_pos[ci] if ci < nc else inf
        else:
            break
        faults += 1
        if filled < k:
            f = filled
            filled += 1
        else:
            if m > applied:
                seg = nxt[applied:m]
                sel = np.flatnonzero(seg > m)
                if sel.size:
                    for v, q in zip(seg[sel].tolist(), ids[sel + applied].tolist()):
                        if cur[q] != v:
                            cur[q] = v
                            if v < inf:
                                heappush(far, ((inf - v) << 32) | q)
                            else:
                                heappush(never, fof[q])
            applied = m + 1
            f = -1
            while never:
                g = heappop(never)
                if cur[fpage[g]] == inf:
                    f = g
                    break
            if f < 0:
                while True:
                    key = heappop(far)
                    q = key & _MASK32
                    if fof[q] >= 0 and cur[q] == inf - (key >> 32):
                        f = fof[q]
                        break
            q = fpage[f]
            fof[q] = -1
            if pw[f] < m:
                wb += 1
            if cur[q] < inf:
                heappush(heap, (cur[q] << 32) | q)
        fpage[f] = p
        fof[p] = f
        v = int(nxt[m])
        cur[p] = v
        if v < inf:
            heappush(far, ((inf - v) << 32) | p)
        else:
            heappush(never, f)
        pw[f] = _pend_write(ix, p, m, inf)
    return faults, wb


FAST_POLICIES = {
    "fifo": _sim_fifo,
    "lru": _sim_lru,
    "opt": _sim_opt,
    "clock": lambda ix, k: _sim_clock(ix, k, True),
    "clock-r0": lambda ix, k: _sim_clock(ix, k, False),
    "esc": _sim_esc,
}


KERNEL_FASTER = frozenset({"clock", "clock-r0", "esc"})
"""Policies ``simulate_fast`` runs on the compiled kernel by default (scripts/bench.py paging measures why)."""

_SIM_ENGINES = ("auto", "python", "kernel")


def simulate_fast(policy: str, frames: int, pages: np.ndarray, writes: np.ndarray | None = None,
                  index: TraceIndex | None = None, engine: str = "auto") -> SimResult:
    """Fault and write-back counts of ``policy`` with ``frames`` frames on a trace (all frames start free).

    ``engine``: ``kernel`` runs the guest kernel's compiled core over the
    trace; ``python`` the O(misses) loops of this module (over ``index``,
    prebuilt to run several policies or sizes over one trace); ``auto`` the
    kernel for ``KERNEL_FASTER`` unless an ``index`` is given.
    """
    try:
        sim = FAST_POLICIES[policy]
    except KeyError:
        raise UnknownPolicy(policy, FAST_POLICIES) from None
    if frames < 1:
        raise GuestConfigError(f"frames must be >= 1, got {frames}")
    if engine not in _SIM_ENGINES:
        raise GuestConfigError(f"unknown simulator engine {engine!r}; known: {', '.join(_SIM_ENGINES)}")
    if engine == "kernel" or (engine == "auto" and index is None and policy in KERNEL_FASTER):
        return _simulate_kernel(policy, frames, pages, writes)
    if index is None:
        pages = np.asarray(pages)
        index = TraceIndex(pages, np.zeros(pages.shape[0], bool) if writes is None else writes)
    faults, wb = sim(index, frames) if index.n else (0, 0)
    return SimResult(policy, frames, index.n, faults, wb)


def _simulate_kernel(policy: str, frames: int, pages: np.ndarray, writes: np.ndarray | None) -> SimResult:
    """The guest kernel (compiled engine, in-process disk) over the trace in large batches."""
    import asyncio

    from balloonlab.proto.costs import CostModel

    from .blockdev import LocalBlockDevice
    from .hypervisor import NullHypervisor
    from .kernel import GuestKernel
    from .kernel_config import KernelConfig
    from .workload.layout import Layout

    dense = dense_page_ids(pages)
    n = dense.shape[0]
    w = np.zeros(n, bool) if writes is None else np.asarray(writes, bool)
    if w.shape != (n,):
        raise GuestConfigError(f"writes has shape {w.shape}, pages has {n} entries")
    if n == 0:
        return SimResult(policy, frames, 0, 0, 0)
    cfg = KernelConfig(ram_pages=frames, layout=Layout.single_anon(int(dense.max()) + 1), policy=policy,
                       ws_sample_pages=0)
    k = GuestKernel(cfg, np.random.default_rng(0), LocalBlockDevice(cfg.disk_blocks), NullHypervisor(), CostModel(),
                    engine="compiled")
    batch = 1 << 20

    async def run() -> None:
        for i in range(0, n, batch):
            await k.access(dense[i:i + batch], w[i:i + batch])

    asyncio.run(run())
    c = k.counters
    return SimResult(policy, frames, c.refs, c.major_faults + c.minor_faults, c.writebacks)

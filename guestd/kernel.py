"""The guest's paging OS: references, faults, reclaim, balloon frames, host backing.

``GuestKernel`` is what the vCPU loop drives. One ``access`` call is one
batch of references, optionally bounded in virtual time (``deadline_us``).

Two engines run a batch, with the same results to the last counter, bit and
clock tick (tests/test_paging_engines.py):

- ``compiled`` (the default): ``guestd/_paging.c`` runs the references,
  faults, policy scans (clock, clock-r0, esc, fifo, lru; the others' Python
  ``select_victim``/``on_load`` are called from it on a miss), evictions,
  page-table updates and counters over the numpy arrays below. With the
  in-process ``LocalBlockDevice`` and ``NullHypervisor`` a whole batch runs
  there; with remote ones it returns to Python only for each disk read,
  write, EPT fault or OOM hook it must await, and goes on after.
- ``reference``: the Python below (``_run_reference`` and what it calls):
  hits in numpy over windows of the batch, each miss in order. It is the
  executable definition the compiled core is held to.

``BALLOONLAB_PAGING_ENGINE=reference`` (or ``engine=``) selects the second.

Call order and concurrency::

    access*  |  reclaim  |  balloon_alloc        (async; serialised by ``mm_lock``)
    invalidate | take_ad_bits | balloon_pick | balloon_release | stats   (sync, any time)
    share_peek | share_protect   (sync; the host's page sharing, at tick boundaries)

The async operations hold ``mm_lock`` for their whole duration, so a batch
never sees a page half-evicted by the balloon. The sync ones may run while
an async one is suspended (e.g. the host's TLB shootdown arrives while a
fault waits for the disk); the async code re-checks backing after every
await for that reason. ``on_oom`` runs under ``mm_lock``: it may call the
sync methods (``balloon_pick``/``balloon_release``) but not ``access``,
``reclaim`` or ``balloon_alloc``.

Page sharing: the host reads what frames hold (``share_peek``) and
write-protects the ones it merged (``share_protect``, ``Frames.wp``). A
write to a write-protected frame, or a fill of one, is an EPT fault first:
the host's copy-on-write break (``cow_faults``), which answers
``KEEP_TOKEN`` (the content stands) after its copy.

Virtual time: every reference costs ``costs.mem_ref_us`` plus the
workload's own ``cpu_us_per_ref``; a minor fault ``minor_fault_us``, and a
zero-filled one ``page_zero_us`` on top; a major fault, a write-back or an
EPT fault waits until the block device or the hypervisor says it is done.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
from typing import Any, Awaitable, Callable, ContextManager

import numpy as np
import structlog

from balloonlab.proto.costs import CostModel
from balloonlab.proto.tokens import KEEP_TOKEN, LATER_TOKEN

from .blockdev import BlockDevice, LocalBlockDevice
from .gate import VcpuStopped
from .errors import (BadFrames, BadPages, BlockOutOfRange, GuestConfigError, OutOfMemory, ReadChainDiverged,
                     SwapExhausted)
from .hypervisor import Hypervisor, NullHypervisor
from .kernel_config import KernelConfig
from .kswapd import BG_PERIOD_US, Watermarks, watermarks
from .memory import FrameKind, Frames
from .pagetable import PageTable
from .replacement import ReplacementPolicy, make_policy
from .replacement.base import PolicyBase
from .replacement.clock import ClockPolicy
from .replacement.clock_r0 import ClockR0Policy
from .replacement.esc import EscPolicy
from .replacement.fifo import FifoPolicy
from .replacement.lru import LruPolicy

try:    # at import, so a pre-imported template process shares it with the guests it forks
    from . import _paging
    _PAGING_IMPORT_ERROR: ImportError | None = None
except ImportError as _e:  # pragma: no cover - the install builds it
    _paging = None
    _PAGING_IMPORT_ERROR = _e
from .readahead import Readahead
from .stats import BackgroundCounters, PagingCounters, PffMeter, WorkingSetSampler
from .swap import SwapArea

__all__ = ["GuestKernel", "OomHook", "EV_PAGE_LOST", "ENGINES", "default_engine", "STAT_KEYS"]

OomHook = Callable[[int], Awaitable[Any]]

EV_PAGE_LOST = "page_lost"   # log event: a page came back with the wrong content token

# Hits are looked up in windows that grow while references keep hitting and
# start small again after a miss, so a thrashing batch does not rescan long tails.
_WIN_MIN = 256
_WIN_MAX = 8192

_FREE = int(FrameKind.FREE)
_KEEP = np.uint64(KEEP_TOKEN)
_FULL_WRITE = 2     # write code of a write that stores the whole page (guestd.workload.FULL_WRITE)
# what the compiled core hands back (guestd/_paging.c)
_OP_DONE, _OP_EPT, _OP_READ, _OP_WRITE, _OP_NO_VICTIM, _OP_SWAP_FULL, _OP_BAD_BLOCK, _OP_COW = range(8)
# a read chain's program (_paging.c, hostd/readchain.py): a read, an EPT fault of the pages named before it
_RC_READ, _RC_EPT, _RC_EPT_PAGE = 3.0, 4.0, 5.0


# a request answered ahead or chained: (its block or a fault's gpfns, start, completion, its tokens)
_Answer = tuple[Any, float, float, Any]


def _asked(prog: bytes) -> list[Any]:
    """Each request of a read chain's program, in order: a block, or a fault's gpfns (a tuple)."""
    pairs = np.frombuffer(prog, "<f8")[2:]
    ops = pairs[0::2]
    if not (ops >= _RC_EPT).any():       # reads only (most programs): their blocks in one pass
        return pairs[1::2][ops == _RC_READ].astype(np.int64).tolist()
    asked: list[Any] = []
    pages: list[int] = []
    for op, x in pairs.reshape(-1, 2).tolist():
        if op == _RC_READ:
            asked.append(int(x))
        elif op == _RC_EPT_PAGE:
            pages.append(int(x))
        elif op == _RC_EPT:
            asked.append(tuple(pages))
            pages = []
    return asked

_ANON = int(FrameKind.ANON)
_FILE = int(FrameKind.FILE)
_BALLOON = int(FrameKind.BALLOON)
_KERNEL = int(FrameKind.KERNEL)
_N_KINDS = len(FrameKind)
_C_EVICTIONS = PagingCounters.FIELDS.index("evictions")
_C_SOFT_RECLAIMED = PagingCounters.FIELDS.index("soft_reclaimed")
_C_BALLOON_RECLAIMED = PagingCounters.FIELDS.index("balloon_reclaimed")
_U64 = np.dtype(np.uint64)
# stats(): the counters, the background counters, then the gauges (a new key goes where stats() computes it)
_STAT_KEYS = PagingCounters.FIELDS + BackgroundCounters.FIELDS + (
    "pgsteal_direct", "free", "total", "available", "caches", "anon_pages", "file_pages", "balloon_pages",
    "kernel_pages", "soft_cached_pages", "discarded_pages", "unbacked_pages", "shared_pages", "cow_faults",
    "share_protected", "swap_used", "swap_total", "pff", "pff_last", "working_set_pages", "working_set_fraction",
    "vt_us")
STAT_KEYS = _STAT_KEYS     # the keys of ``GuestKernel.stats()``, in order (``stat_values()``)
_I64 = np.dtype(np.int64)

# GuestKernel._ks: the kernel's scalar state, shared with the compiled core (its KS_NAMES)
_KS_NAMES = ("free_lo", "n_free", "soft_head", "soft_tail")
_KS_FREE_LO, _KS_N_FREE, _KS_SOFT_HEAD, _KS_SOFT_TAIL = range(4)
_SOFT_OUT = -2          # soft_prev/soft_next of a frame that is not on the soft list

ENGINES = ("compiled", "reference")


def default_engine() -> str:
    """``compiled`` unless ``BALLOONLAB_PAGING_ENGINE`` says otherwise."""
    return os.environ.get("BALLOONLAB_PAGING_ENGINE", "compiled")


def _takes_fresh(hypervisor: Any) -> bool:
    """Does this hypervisor's ``ept_fault`` take ``fresh=`` (EptFault.fresh)? A subclass may not."""
    if not getattr(hypervisor, "accepts_fresh", False):
        return False
    try:
        return "fresh" in inspect.signature(hypervisor.ept_fault).parameters
    except (TypeError, ValueError):
        return False


# who started a write-back that the clock does not wait for
_WB_FLUSHER = 0
_WB_KSWAPD = 1
# policies whose victims kswapd can hand back (a dirty one stays resident while it is written):
# their state is the hand, R/M and per-frame stamps, none of which picking a victim changes
_KSWAPD_POLICIES = ("clock", "clock-r0", "esc", "fifo", "lru")

# what _evict does with the freed frames
_TO_CALLER = 0    # the caller takes them (fault path, balloon)
_SOFT = 1         # they go to the free pool but keep their (clean) page until reused


class GuestKernel:
    """One guest's paging OS over its frames, its block device and its hypervisor."""

    def __init__(self, config: KernelConfig, rng: np.random.Generator, blockdev: BlockDevice,
                 hypervisor: Hypervisor, costs: CostModel, *, mm_lock: Any = None,
                 log: Any = None, engine: str | None = None) -> None:
        self.config = config
        self.rng = rng
        self.blockdev = blockdev
        self.hypervisor = hypervisor
        self.costs = costs
        # one page-level reference: the memory access plus the workload's compute around it
        self.ref_us = float(costs.mem_ref_us) + float(costs.cpu_us_per_ref)
        self.zero_fill_us = float(costs.minor_fault_us) + float(costs.page_zero_us)
        self._hyp_fresh = _takes_fresh(hypervisor)
        self.log = log if log is not None else structlog.get_logger("guestd.kernel")
        if blockdev.n_blocks < config.disk_blocks:
            raise GuestConfigError(
                f"block device has {blockdev.n_blocks} blocks; the layout needs {config.disk_blocks} "
                f"({config.layout.n_file_blocks} file + {config.swap_slots} swap)")
        backed = config.initially_backed
        if backed is None:
            backed = bool(getattr(hypervisor, "backs_all_initially", False))
        self.frames = Frames(config.ram_pages, config.kernel_pages, backed)
        self.pt = PageTable(config.layout)
        self.swap = SwapArea(config.swap_base_block, config.swap_slots)
        self.policy: ReplacementPolicy = make_policy(config.policy, config.ram_pages, **config.policy_params)
        self.policy.attach(self.frames)
        # most policies need nothing beyond R/M on a hit: skip the call for them
        self._policy_sees_hits = type(self.policy).on_hits is not PolicyBase.on_hits
        self.counters = PagingCounters()
        self.cow_faults = 0             # copy-on-write breaks of shared frames (page sharing)
        self.share_protected = 0        # frames the host write-protected (merged into shared frames)
        self._vt = np.zeros(1, np.float64)           # the vCPU clock (``vt_us``), shared with the compiled core
        # OOM hook: awaited with the number of frames needed when nothing is reclaimable
        self.on_oom: OomHook | None = None
        self.mm_lock = mm_lock if mm_lock is not None else asyncio.Lock()
        n = config.ram_pages
        # empty free frames, taken lowest gpfn first: a mask, with ``_ks`` holding their
        # number and a floor below which none is free
        self._free_mask = np.zeros(n, bool)
        self._free_mask[config.kernel_pages:] = True
        self._ks = np.zeros(len(_KS_NAMES), np.int64)
        self._ks[_KS_FREE_LO] = config.kernel_pages
        self._ks[_KS_N_FREE] = n - config.kernel_pages
        # when each frame last became empty and free (free page reporting waits for it to stay free)
        self.free_since_us = np.zeros(n, np.float64)
        self.discarded_pages = 0          # pages the workload freed (``discard``)
        # soft-reclaimed frames, oldest first: a doubly linked list through two arrays
        self._ks[_KS_SOFT_HEAD] = self._ks[_KS_SOFT_TAIL] = -1
        self._soft_prev = np.full(n, _SOFT_OUT, np.int64)
        self._soft_next = np.full(n, _SOFT_OUT, np.int64)
        # balloon frames in inflation order (dict as an ordered set)
        self._balloon: dict[int, None] = {}
        # bumped by every invalidate, so an EPT fault that raced a shootdown is not trusted
        self._inval_gen = np.zeros(config.ram_pages, np.int64)
        self.ws = WorkingSetSampler(config.ws_sample_pages, rng)
        self.pff = PffMeter(config.pff_alpha)
        self._next_period_us = config.ws_period_us
        # the flusher's write-backs in flight: frame, page, token written, completion time
        self._wb_g = np.zeros(0, np.int64)
        self._wb_page = np.zeros(0, np.int64)
        self._wb_tok = np.zeros(0, np.uint64)
        self._wb_done = np.zeros(0, np.float64)
        self._wb_src = np.zeros(0, np.int8)
        self._wb_hand = 0
        # background work beside the references: kswapd between watermarks, the readahead mark
        self.bg = BackgroundCounters()
        self.wmark: Watermarks | None = None
        if config.watermark_scale_factor:
            if config.policy not in _KSWAPD_POLICIES:
                raise GuestConfigError(
                    f"watermark_scale_factor: kswapd runs with the policies {', '.join(_KSWAPD_POLICIES)}, "
                    f"not {config.policy!r} (set watermark_scale_factor = 0)")
            self.wmark = watermarks(config.ram_pages - config.kernel_pages, config.watermark_scale_factor)
        self._kswapd_awake = False
        self._ra = Readahead(config.layout, config.read_ahead_pages) if config.read_ahead_pages else None
        self._block_page = np.full(config.layout.n_file_blocks, -1, np.int64)   # file block -> vpage
        fb = config.layout.file_block
        self._block_page[fb[fb >= 0]] = np.flatnonzero(fb >= 0)
        # pages read ahead into free frames, not yet used or dropped: vpage, frame
        self._ra_page = np.zeros(0, np.int64)
        self._ra_g = np.zeros(0, np.int64)
        # asynchronous readahead windows in flight: (vpages, tokens, completion)
        self._ra_inflight: list[tuple[np.ndarray, np.ndarray, float]] = []
        self._bg_on = self.wmark is not None or self._ra is not None
        # the compiled core hands every disk read back (readahead, full-page writes must see them)
        self._reads_in_python = self._ra is not None
        self._next_bg_us = BG_PERIOD_US
        self._deadline_us = math.inf         # the running batch's deadline (the gate)
        # file reads chained onto one remote read when they certainly follow it (the host's offer,
        # ``enable_read_chain``); 0: one round trip per read
        self.read_chain = 0
        # requests of the next batch answered before it runs (``ahead_program``, ``answered_ahead``), last first
        self._ahead: list[_Answer] = []
        # background requests are not the vCPU's stalls: the process layer pauses its PSI meter here
        self.bg_quiet: Callable[[], ContextManager[Any]] = contextlib.nullcontext
        self._gauges = np.zeros(_N_KINDS + 3, np.int64)   # stats(): frames per kind, backed, wp; soft-cached pages
        self._resize_policy()
        self.engine = engine if engine is not None else default_engine()
        if self.engine not in ENGINES:
            raise GuestConfigError(f"engine: unknown paging engine {self.engine!r}; known: {', '.join(ENGINES)}")
        self._core: Any = self._build_core() if self.engine == "compiled" else None

    @property
    def vt_us(self) -> float:
        """The vCPU's virtual clock (µs)."""
        return float(self._vt[0])

    @vt_us.setter
    def vt_us(self, value: float) -> None:
        self._vt[0] = value

    def _build_core(self) -> Any:
        """The compiled core over this kernel's arrays (``guestd/_paging.c``)."""
        if _paging is None:
            raise GuestConfigError(
                f"the compiled paging core (balloonlab.guestd._paging) is not built: {_PAGING_IMPORT_ERROR}; reinstall "
                "the project (scripts/test or pip install -e .) or run with BALLOONLAB_PAGING_ENGINE=reference")
        fr, pt, pol = self.frames, self.pt, self.policy
        kind, pol_state, pol_frames, esc_bits = _paging.P_PY, None, None, None
        if type(pol) in (ClockPolicy, ClockR0Policy):
            kind, pol_state = _paging.P_CLOCK, pol.state
        elif type(pol) is EscPolicy:
            kind, pol_state, esc_bits = _paging.P_ESC, pol.state, pol.zero_zero_bits
        elif type(pol) is FifoPolicy:
            kind, pol_state, pol_frames = _paging.P_FIFO, pol.state, pol.load_seq
        elif type(pol) is LruPolicy:
            kind, pol_frames = _paging.P_LRU, pol.last_ref
        n = fr.n
        self._ept_gs = np.zeros(n, np.uint64)
        self._ept_gen = np.zeros(n, np.int64)
        self._hit_g = np.zeros(_paging.WIN_MAX, np.int64)
        self._hit_w = np.zeros(_paging.WIN_MAX, bool)
        spec: dict[str, Any] = dict(
            counter_names=PagingCounters.FIELDS, ks_names=_KS_NAMES, n_frames=n, n_pages=pt.n,
            kind=fr.kind, resident=fr.resident, R=fr.R, touched=fr.touched, A=fr.ad_accessed, M=fr.M,
            D=fr.ad_dirty, backed=fr.backed, host_took=fr.host_took, wp=fr.wp, vpage=fr.vpage, token=fr.token,
            gpfn=pt.gpfn, cached=pt.cached, version=pt.version, block=pt.block, is_file=pt.is_file,
            on_disk=pt.on_disk, evicted=pt.evicted, expect=pt.expect,
            free_mask=self._free_mask, ks=self._ks, soft_prev=self._soft_prev, soft_next=self._soft_next,
            inval_gen=self._inval_gen, counters=self.counters.array, vt=self._vt,
            swap_used=self.swap.used_array, swap_base=self.swap.base_block, swap_slots=self.swap.n_slots,
            fault_around=self.config.fault_around_pages, mem_ref_us=self.ref_us,
            minor_fault_us=float(self.costs.minor_fault_us), zero_fill_us=self.zero_fill_us,
            ept_gs=self._ept_gs, ept_gen=self._ept_gen, hit_g=self._hit_g, hit_w=self._hit_w,
            policy_kind=kind, load_sets_r=int(bool(getattr(pol, "load_sets_r", True))),
            py_hits=int(kind == _paging.P_PY and self._policy_sees_hits), policy=pol,
            lost_cb=self._core_lost, hits_cb=self._core_hits,
            # reads come back to Python when readahead must see them
            disk_local=int(type(self.blockdev) is LocalBlockDevice and not self._reads_in_python),
            hyp_local=int(type(self.hypervisor) is NullHypervisor),
        )
        if pol_state is not None:
            spec["pol_state"] = pol_state
        if pol_frames is not None:
            spec["pol_frames"] = pol_frames
        if esc_bits is not None:
            spec["esc_bits"] = esc_bits
        if spec["disk_local"]:
            bd = self.blockdev
            assert isinstance(bd, LocalBlockDevice)
            spec.update(n_blocks=bd.n_blocks, disk_tokens=bd.tokens, disk_io=bd.io_counts,
                        disk_chan_free=bd.model.free_at_us, disk_acct=bd.model.acct,
                        disk_queue_depth=bd.model.profile.queue_depth,
                        disk_latency_us=float(bd.model.profile.latency_us),
                        disk_bandwidth_bps=float(bd.model.profile.bandwidth_bps))
        return _paging.Core(spec)

    # ------------------------------------------------------------------ references

    async def access(self, pages: np.ndarray, writes: np.ndarray | None = None,
                     deadline_us: float | None = None) -> int:
        """Run one batch of references (``pages`` virtual page numbers, ``writes`` bools).

        ``writes`` may also be write codes (``uint8``, ``workload.FULL_WRITE``
        = 2 for a write that stores the whole page): such a write fault on a
        page in guest swap needs no swap-in read.

        Returns the number of references completed: all of them, unless
        ``deadline_us`` is given. Then a reference starts only while the
        clock ``vt_us`` is below it, and the batch stops before the first
        that would start at or past it (a fault started in time completes,
        whenever its I/O does); the caller runs the rest later.
        """
        p = self._check_pages(pages)
        n = p.shape[0]
        full: np.ndarray | None = None
        if writes is None:
            w = np.zeros(n, bool)
        else:
            codes = np.asarray(writes)
            w = codes.astype(bool, copy=False)
            if w.shape != (n,):
                raise BadPages(f"writes has shape {w.shape}, pages has {n} entries")
            if codes.dtype == np.uint8 and n:
                full = codes == _FULL_WRITE
                if not full.any():
                    full = None
                elif not self._reads_in_python:
                    self._reads_in_python = True      # from now on the core hands its reads back
                    if self._core is not None:
                        self._core = self._build_core()
        # (the vCPU's gate: a float, not NaN, passes at once)
        if deadline_us is not None and (type(deadline_us) is not float or deadline_us != deadline_us):
            if isinstance(deadline_us, bool) or not isinstance(deadline_us, (int, float, np.floating, np.integer)) \
                    or math.isnan(deadline_us):
                raise BadPages(f"deadline_us must be a number of virtual µs or None, got {deadline_us!r}")
            deadline_us = float(deadline_us)
        done = 0
        if n:
            async with self.mm_lock:
                self._deadline_us = math.inf if deadline_us is None else deadline_us
                if self._bg_on:
                    done = await self._run_with_background(p, w, deadline_us, full)
                elif self._core is not None:      # (``_run``, one coroutine less on every request's way)
                    done = await self._run_compiled(p, w, deadline_us, full)
                else:
                    done = await self._run_reference(p, w, deadline_us, full)
        self._maybe_end_period()
        return done

    async def _run(self, p: np.ndarray, w: np.ndarray, deadline_us: float | None,
                   full: np.ndarray | None) -> int:
        if self._core is not None:
            return await self._run_compiled(p, w, deadline_us, full)
        return await self._run_reference(p, w, deadline_us, full)

    async def _run_with_background(self, p: np.ndarray, w: np.ndarray, deadline_us: float | None,
                                   full: np.ndarray | None) -> int:
        """The batch cut at every background point (a multiple of ``BG_PERIOD_US``) it crosses.

        Each cut is a deadline like the gate's (a fault started before it
        completes), so the references run exactly as in one call; between two
        pieces kswapd and the readahead mark get their turn, at virtual times
        that depend only on this guest's run. Past the gate nothing runs:
        its requests would belong to the next tick (it runs at the tick start).
        """
        n = p.shape[0]
        done = 0
        while done < n:
            if deadline_us is not None and self.vt_us >= deadline_us:
                break
            stop = self._next_bg_us
            cut = stop if deadline_us is None else min(deadline_us, stop)
            done += await self._run(p[done:], w[done:], cut, None if full is None else full[done:])
            if self.vt_us >= self._next_bg_us:
                self._next_bg_us = (self.vt_us // BG_PERIOD_US + 1) * BG_PERIOD_US
                if deadline_us is None or self.vt_us < deadline_us:
                    await self._background()
        return done

    @property
    def has_background(self) -> bool:
        """kswapd or readahead is on: ``background`` has work to look at."""
        return self._bg_on

    async def background(self, deadline_us: float | None = None) -> None:
        """Background work now (the process layer calls it at each tick start): kswapd, readahead.

        Nothing runs with the clock at or past ``deadline_us`` (the gate):
        its requests would belong to the next tick.
        """
        if not self._bg_on or (deadline_us is not None and self.vt_us >= deadline_us):
            return
        async with self.mm_lock:
            await self._background()

    async def _background(self) -> None:
        with self.bg_quiet():
            self.complete_writeback()
            if self._ra is not None:
                await self._ra_poll()
            if self.wmark is not None:
                await self._kswapd_pass()

    def _check_pages(self, pages: np.ndarray) -> np.ndarray:
        p = np.asarray(pages)
        if p.ndim != 1:
            raise BadPages(f"pages must be a 1-d array, got shape {p.shape}")
        if p.size == 0:
            return p.astype(np.int64)
        dt = p.dtype
        if dt.kind not in "ui":
            raise BadPages(f"pages must be integers, got dtype {p.dtype}")
        if (dt is _U64 or dt is _I64) and _paging is not None and p.flags.c_contiguous:
            # every batch of every tick: one pass for both bounds, and the workload's uint64 pages
            # read in place (below the layout's size they are the same int64s), not copied
            lo, hi = _paging.page_range(p, dt is _I64)
            if lo < 0:
                raise BadPages(f"page {lo} is negative")
            if hi >= self.pt.n:
                raise BadPages(f"page {hi} outside the layout's {self.pt.n} pages")
            return p if dt is _I64 else p.view(np.int64)
        if dt.kind == "i" and int(p.min()) < 0:
            raise BadPages(f"page {int(p.min())} is negative")
        hi = int(p.max())
        if hi >= self.pt.n:
            raise BadPages(f"page {hi} outside the layout's {self.pt.n} pages")
        return p.astype(np.int64, copy=False)

    async def _run_compiled(self, p: np.ndarray, w: np.ndarray, deadline_us: float | None,
                            full: np.ndarray | None = None) -> int:
        """The batch in the compiled core; here only what it hands back to be awaited."""
        core = self._core
        refs0 = self.counters.refs      # the reference a fault is for: refs0 + those completed since
        read_one: Any = False           # (looked up at the first read: most batches are all hits)
        # requests answered ahead by a read chain, last first: (block or gpfns, start, done, tokens)
        chained: list[_Answer] = []
        if self._ahead:
            chained, self._ahead = self._ahead, []
        try:
            op, a, b = core.start(np.ascontiguousarray(p), np.ascontiguousarray(w), deadline_us)
            while op != _OP_DONE:
                if chained and (op == _OP_READ or op == _OP_EPT):
                    replayed = self._replay_compiled(core, chained)
                    if replayed is not None:
                        op, a, b = replayed
                        continue
                if chained and op == _OP_READ:     # not the answer's: _replayed says how
                    start, done, toks = self._replayed(chained, int(a))
                    op, a, b = core.resume_read(int(toks[0]), done)
                    continue
                if chained and op != _OP_EPT:
                    raise self._diverged(chained, f"op {op}")
                if op == _OP_EPT:
                    gs = self._ept_gs[:a].copy()
                    if chained:
                        tokens, done = self._replayed_ept(gs, chained, core)
                        if KEEP_TOKEN not in tokens:    # (a first touch's answers: zeros, LATER past the gate)
                            op, a, b = core.resume_ept(np.array(tokens, np.uint64), float(done))
                            continue
                    else:
                        tokens, done = await self._ept_fault(gs)
                    tokens = np.ascontiguousarray(tokens, np.uint64)     # the core only reads them
                    keep = tokens == _KEEP
                    if keep.any():   # already backed at the host: it never took the frame, our content stands
                        tokens = tokens.copy()
                        tokens[keep] = self.frames.token[gs[keep].astype(np.int64)]
                    op, a, b = core.resume_ept(tokens, float(done))
                elif op == _OP_COW:
                    tok, done = await self._cow_fault(a)
                    op, a, b = core.resume_cow(tok, float(done))
                elif op == _OP_READ:
                    if full is not None and full[self.counters.refs - refs0] and a >= self.swap.base_block:
                        page = int(p[self.counters.refs - refs0])
                        evicted = bool(self.pt.evicted[page])
                        op, a, b = core.resume_read(self._overwrite_token(page), self.vt_us + self.costs.minor_fault_us)
                        # the core booked a swap-in, a major fault (and a refault read): it was none of those
                        c = self.counters
                        c.swap_in -= 1
                        c.major_faults -= 1
                        c.minor_faults += 1
                        c.refault_reads -= evicted
                        continue
                    if read_one is False:
                        read_one = self._plain_read_one()
                    if read_one is not None:
                        prog = core.lookahead(self.read_chain) if self.read_chain else None
                        if prog is not None:
                            tok, done = await self._read_chain(int(a), prog, chained)
                        else:
                            tok, done = await read_one(int(a), self.vt_us)
                    else:
                        tok, done = await self._disk_read(int(a))
                    op, a, b = core.resume_read(tok, done)
                elif op == _OP_WRITE:
                    done = await self.blockdev.write(np.array([a], np.int64), np.array([b], np.uint64), self.vt_us)
                    op, a, b = core.resume_write(float(done))
                elif op == _OP_NO_VICTIM:
                    if self.on_oom is None or a:
                        raise OutOfMemory(1, self.config.ram_pages, self.config.kernel_pages, len(self._balloon))
                    self.counters.oom_calls += 1
                    await self.on_oom(1)
                    op, a, b = core.resume_oom()
                elif op == _OP_SWAP_FULL:
                    raise SwapExhausted(self.swap.n_slots)
                elif op == _OP_BAD_BLOCK:
                    raise BlockOutOfRange(a, b)
                else:  # pragma: no cover - the core returns only the ops above
                    raise RuntimeError(f"paging core returned unknown op {op}")
            if chained:
                raise self._diverged(chained, "the batch's end")
        except BaseException:
            core.abort()
            raise
        return int(a)

    async def _read_chain(self, blk: int, prog: bytes, chained: list[_Answer]
                          ) -> tuple[int, float]:
        """The read with the requests the core says follow it (``_paging.c``, "read chains"): its own
        answer; the chained ones go into ``chained``, last first."""
        dev = self.blockdev
        vt = self.vt_us
        tok, done, rest, times = await dev.read_chain(blk, vt, prog)
        if times:
            # the program's requests and their answers paired in one compiled pass, as for answers ahead
            # (a cold tick's programs run to hundreds of pairs: ~90 us of Python each, per guest and read)
            more = _paging.ahead_answers(prog, rest, times)
            if more is None:
                from .remote import chain_mismatch
                raise chain_mismatch(len(rest) + 1, len(times) + 1, len(_asked(prog)))
            chained.extend(more)
        dev.link.took(vt, done)
        return tok, done

    def ahead_program(self, pages: np.ndarray, writes: np.ndarray, deadline_us: float) -> bytes | None:
        """The requests the batch ``access(pages, writes, deadline_us)`` certainly makes first, as a read
        chain's program from its first reference (``_paging.c``, "read chains"), for a host to serve
        before the batch runs; None when there is none to offer.

        Valid only if that call comes next with nothing changed in between;
        the caller (the vCPU, at its park) makes sure of that, and the
        replay of the answers (``answered_ahead``) stops the run if not.
        """
        if not self.read_chain or self._core is None or self._bg_on or self._reads_in_python:
            return None
        p = self._check_pages(pages)
        codes = np.asarray(writes)
        if codes.shape != p.shape or (codes.dtype == np.uint8 and bool(np.any(codes == _FULL_WRITE))):
            return None
        w = np.ascontiguousarray(codes.astype(bool, copy=False))
        return self._core.lookahead_batch(np.ascontiguousarray(p), w, float(deadline_us), self.read_chain)

    def answered_ahead(self, prog: bytes, tokens: np.ndarray, times: list[float]) -> int:
        """The host's answers to ``ahead_program``'s requests: ``tokens`` of each request served, in order
        (1 per read, n per fault of n pages), ``times`` a start and a completion each. The next batch
        replays them as it would a chain's; returns how many requests they answer."""
        if _paging is not None and type(tokens) is np.ndarray and tokens.dtype == _U64 \
                and tokens.flags.c_contiguous and type(times) is list:
            out = _paging.ahead_answers(prog, tokens, times)    # the list below, in one compiled pass
            if out is not None:
                self._ahead = out
                return len(out)
        asked = _asked(prog)
        m = len(times) // 2
        sizes = [len(q) if type(q) is tuple else 1 for q in asked[:m]]
        if len(times) % 2 or m > len(asked) or len(tokens) != sum(sizes):
            raise ReadChainDiverged(f"answers ahead: {len(tokens)} tokens and {len(times)} times for a program "
                                    f"of {len(asked)} requests (want a start and a completion per request "
                                    "served, and its tokens)")
        out, at = [], 0
        toks = tokens.tolist()      # plain ints, as a chain's answers (``_paging.ahead_answers``)
        for k in range(m):
            out.append((asked[k], times[2 * k], times[2 * k + 1], toks[at:at + sizes[k]]))
            at += sizes[k]
        out.reverse()
        self._ahead = out
        return m

    def _replayed(self, chained: list[_Answer], key: Any) -> tuple[float, float, Any]:
        """The next answer ahead, if it is for request ``key`` (a block, or a fault's gpfns) at this clock
        inside the gate; else the run stops."""
        want, start, done, toks = chained[-1]
        vt = self.vt_us
        link = self.blockdev.link
        if link.gate_requests and link.gate.stopped is not None:
            # the run ended while the answers were on their way: the request would stop at the gate
            raise VcpuStopped(link.gate.stopped)
        if want != key or vt != start or not self._gate_open(vt):
            what = f"an EPT fault of gpfns {list(key)[:4]}..." if type(key) is tuple else f"a read of block {key}"
            raise self._diverged(chained, f"{what} at {vt!r} µs")
        chained.pop()
        self.blockdev.link.took(start, done)
        return start, done, toks

    def _replay_compiled(self, core: Any, chained: list[_Answer]) -> tuple[int, int, int] | None:
        """The answers ahead the core's reads and faults match, replayed in the core (``Core.replay``) as
        ``_replayed`` and ``_replayed_ept`` would replay them one by one; the answers used are taken off
        ``chained`` and their stalls booked in order. The op the core is at then, or None if it used none
        (the request is not the next answer's, or needs the Python path: ``_replayed`` says which)."""
        link = self.blockdev.link
        if link.gate_requests:
            if link.gate.stopped is not None:
                return None             # the run ended while the answers were on their way: _replayed stops
            gate = link.gate.gate_us
        else:
            gate = math.inf
        op, a, b, used = core.replay(chained, float(gate), self._hyp_fresh)
        if not used:
            return None
        took = link.took
        for _ in range(used):
            _, start, d, _ = chained.pop()
            took(start, d)
        return op, a, b

    def _replayed_ept(self, gs: np.ndarray, chained: list[_Answer], core: Any) -> tuple[Any, float]:
        """``_ept_fault`` answered ahead: the same books (every page fresh, as the chain's fault said).
        ``core``: the compiled core that handed the fault back, which counts its fresh pages itself."""
        n = int(gs.size)
        n_fresh = core.count_fresh(n) if self._hyp_fresh else -1
        if n_fresh != n:
            raise self._diverged(chained, f"an EPT fault of {n} pages, {n_fresh} of them fresh")
        _, done, toks = self._replayed(chained, tuple(gs.tolist()))
        self.counters.ept_fresh_pages += n_fresh
        return toks, done

    def _gate_open(self, vt_us: float) -> bool:
        """Whether the vCPU's link would send a request at ``vt_us`` now (not park it at the gate)."""
        link = self.blockdev.link
        return not link.gate_requests or link.gate.is_open(vt_us)

    def _diverged(self, chained: list[_Answer], got: str) -> ReadChainDiverged:
        want, start, _, _ = chained[-1]
        what = f"an EPT fault of gpfns {list(want)[:4]}..." if type(want) is tuple else f"a read of block {want}"
        return ReadChainDiverged(f"read chain: the host answered {what} at {start!r} µs "
                                 f"({len(chained)} answered ahead), and the paging core came to {got}; "
                                 "this is a bug: report it, and run with [host] read_chain = 0 meanwhile")

    def enable_read_chain(self, max_reads: int) -> None:
        """Chain up to ``max_reads`` file reads onto one read (the host offered it; ``hostd.readchain``).

        Only with the compiled core, a compiled policy and a block device
        that chains (the remote disk): elsewhere every read stays its own
        request. The counts are the same either way.
        """
        if max_reads > 0 and self._core is not None and callable(getattr(self.blockdev, "read_chain", None)) \
                and self._plain_read_one() is not None:
            self.read_chain = int(max_reads)

    def _core_lost(self, page: int, gpfn: int, got: int, want: int, where: str) -> None:
        """The compiled core found a page with the wrong token (it counted and repaired it): log it."""
        self.log.error(EV_PAGE_LOST, where=where, count=1, vpages=[page], gpfns=[gpfn],
                       got_token=got, want_token=want, vt_us=self.vt_us)

    def _core_hits(self, k: int, first_ref: int) -> None:
        """A run of hits, for a Python policy that watches them (``on_hits``)."""
        self.policy.on_hits(self._hit_g[:k].copy(), self._hit_w[:k].copy(), first_ref)

    def _overwrite_token(self, page: int) -> int:
        """A write fault that stores the whole swapped-out page: no swap-in, the page is rewritten whole.

        Its old content is never looked at, so the fault takes the token the
        page has now (the write then bumps it) without reading the slot; the
        slot's stale copy is rewritten when the page is next swapped out.
        """
        self.bg.overwrite_reads_avoided += 1
        return int(self.pt.expect[page])

    async def _run_reference(self, p: np.ndarray, w: np.ndarray, deadline_us: float | None,
                             full: np.ndarray | None = None) -> int:
        fr = self.frames
        where = self.pt.gpfn
        backed = fr.backed
        wp = fr.wp
        mem_ref_us = self.ref_us
        pl = p.tolist()
        wl = w.tolist()
        fl = full.tolist() if full is not None else None
        n = p.shape[0]
        i = 0
        started = -1        # the reference whose fault or backing began (it completes past the deadline)
        win = _WIN_MIN
        while i < n:
            if win == 0:
                # right after a miss, one scalar probe (cheaper than numpy when misses come
                # in runs); on a hit, go back to numpy windows
                if deadline_us is not None and i != started and self.vt_us >= deadline_us:
                    return i
                page = pl[i]
                g = int(where[page])
                if g >= 0 and backed[g] and not (wl[i] and wp[g]):
                    self._hit_one(page, wl[i], g)
                    i += 1
                    win = _WIN_MIN
                elif g >= 0 and backed[g]:
                    started = i
                    await self._cow(g)
                elif g >= 0:
                    started = i
                    await self._back_window(p[i:i + _WIN_MAX], where, backed)
                else:
                    started = i
                    await self._fault(page, wl[i], fl is not None and fl[i])
                    i += 1
                continue
            end = min(n, i + win)
            cut = end - i
            if deadline_us is not None:
                # reference i + k of this run starts at vt + k * mem_ref_us
                late = self.vt_us + np.arange(end - i) * mem_ref_us >= deadline_us
                if started == i:
                    late[0] = False
                if late.any():
                    cut = int(late.argmax())
            g = where[p[i:end]]
            ok = g >= 0
            ok &= backed[g]          # g = -1 reads some frame's bit; masked by ok anyway
            ok &= ~(wp[g] & w[i:end])   # a write to a shared frame breaks it first
            if ok[:cut].all():
                if cut:
                    self._hits(p[i:i + cut], w[i:i + cut], g[:cut])
                if cut < end - i:
                    return i + cut
                i = end
                win = min(win * 4, _WIN_MAX)
                continue
            j = int(ok.argmin())
            if j:
                self._hits(p[i:i + j], w[i:i + j], g[:j])
                i += j
            started = i
            if g[j] >= 0 and backed[g[j]]:
                await self._cow(int(g[j]))
            elif g[j] >= 0:
                await self._back_window(p[i:i + _WIN_MAX], where, backed)
            else:
                await self._fault(pl[i], wl[i], fl is not None and fl[i])
                i += 1
                win = 0
        return n

    async def _back_window(self, p: np.ndarray, where: np.ndarray, backed: np.ndarray) -> None:
        """The next reference is resident but the host took its frame: back every such frame ahead at once.

        Its own frame first (the host may stop a fault at the tick's end), then the others in order.
        """
        g = where[p]
        g = g[g >= 0]
        g = np.unique(g[~backed[g]])
        first = where[p[0]]
        if g.size > 1 and g[0] != first:
            g = np.concatenate(([first], g[g != first]))
        await self._back(g)

    def _hit_one(self, page: int, write: bool, g: int) -> None:
        fr = self.frames
        pt = self.pt
        c = self.counters
        exp = int(pt.expect[page])
        if int(fr.token[g]) != exp:
            self._lost_one(page, g, int(fr.token[g]), exp, "read")
            fr.token[g] = exp
        fr.ref_bits[:, g] = True
        if write:
            fr.token[g] = pt.bump_one(page)
            fr.write_bits[:, g] = True
        if self._policy_sees_hits:
            self.policy.on_hits(np.array([g], np.int64), np.array([write]), c.refs)
        c.refs += 1
        c.hits += 1
        self.vt_us += self.ref_us

    def _hits(self, p: np.ndarray, w: np.ndarray, g: np.ndarray) -> None:
        fr = self.frames
        c = self.counters
        exp = self.pt.expect[p]
        tok = fr.token[g]
        if (tok != exp).any():
            self._lost_batch(p, g, tok, exp, "read")
        fr.ref_bits[:, g] = True          # R, touched, A
        if w.any():
            wg = g[w]
            fr.write_bits[:, wg] = True   # M, D
            fr.token[wg] = self.pt.bump(p[w])
        if self._policy_sees_hits:
            self.policy.on_hits(g, w, c.refs)
        k = p.shape[0]
        c.refs += k
        c.hits += k
        self.vt_us += k * self.ref_us

    async def _fault(self, page: int, write: bool, full: bool = False) -> None:
        fr = self.frames
        pt = self.pt
        c = self.counters
        ref = c.refs
        is_file = bool(pt.is_file[page])
        if pt.evicted[page]:
            c.refaults += 1
        g = int(pt.cached[page])
        if g >= 0:
            # soft-reclaimed: the page is still in a free frame, take it back (minor fault)
            pt.cached[page] = -1
            self._soft_remove(g)
            if not fr.backed[g]:
                await self._ensure_backed(np.array([g], np.int64))
            if write and fr.backed[g] and fr.wp[g]:
                await self._cow(g)                # taken back by a write: a shared frame is broken first
                if not fr.backed[g]:              # shot down while it waited
                    await self._ensure_backed(np.array([g], np.int64))
            tok = int(fr.token[g])
            c.minor_faults += 1
            self.vt_us += self.costs.minor_fault_us
        else:
            g = await self._alloc_frame()
            if pt.on_disk[page] and full and not is_file:
                tok = self._overwrite_token(page)
                c.minor_faults += 1
                self.vt_us = self.vt_us + self.costs.minor_fault_us
            elif pt.on_disk[page]:
                tok, done = await self._disk_read(int(pt.block[page]))
                self.vt_us = max(self.vt_us, done)
                if is_file:
                    c.file_reads += 1
                    if tok == 0:
                        tok = pt.initial_token(page)   # a block never written holds the file's initial content
                else:
                    c.swap_in += 1
                c.major_faults += 1
                if pt.evicted[page]:
                    c.refault_reads += 1
                    c.refault_file_reads += is_file
            else:
                tok = 0                           # a fresh anonymous page: zero fill
                c.minor_faults += 1
                self.vt_us += self.zero_fill_us
            if fr.backed[g] and fr.wp[g]:
                await self._cow(g)                # the fill writes it: a shared frame is broken first
            if not fr.backed[g]:
                await self._ensure_backed(np.array([g], np.int64))
        # nothing awaits from here on: the frame stays backed while we fill it
        exp = pt.expected_token(page)
        if tok != exp:
            self._lost_one(page, g, tok, exp, "fault")
            tok = exp
        fr.kind[g] = _FILE if is_file else _ANON
        fr.vpage[g] = page
        fr.resident[g] = True
        fr.ad_accessed[g] = True
        fr.ad_dirty[g] = True          # loading stored into the frame
        fr.touched[g] = True
        pt.gpfn[page] = g
        if write:
            tok = pt.bump_one(page)
        fr.M[g] = write
        fr.token[g] = tok
        self.policy.on_load(g, write, ref)
        c.refs += 1
        self.vt_us += self.ref_us

    # ------------------------------------------------------------------ frames

    def _take_free(self) -> int:
        """Lowest-numbered empty free frame, else the oldest soft-reclaimed one (its page dropped); -1 if none."""
        ks = self._ks
        if ks[_KS_N_FREE] > 0:
            lo = int(ks[_KS_FREE_LO])
            g = lo + int(self._free_mask[lo:].argmax())
            self._free_mask[g] = False
            ks[_KS_N_FREE] -= 1
            ks[_KS_FREE_LO] = g + 1
            return g
        g = int(ks[_KS_SOFT_HEAD])
        if g >= 0:
            fr = self.frames
            self._soft_remove(g)
            self.pt.cached[fr.vpage[g]] = -1
            fr.vpage[g] = -1
            return g
        return -1

    def _take_free_many(self, n: int) -> np.ndarray:
        """``_take_free`` up to ``n`` times, in one go for the empty free frames."""
        ks = self._ks
        lo = int(ks[_KS_FREE_LO])
        empty = lo + np.flatnonzero(self._free_mask[lo:])[:n]
        if empty.size:
            self._free_mask[empty] = False
            ks[_KS_N_FREE] -= empty.size
            ks[_KS_FREE_LO] = int(empty[-1]) + 1
        got = [empty]
        k = int(empty.size)
        while k < n:
            g = self._take_free()
            if g < 0:
                break
            got.append(np.array([g], np.int64))
            k += 1
        return np.concatenate(got).astype(np.int64, copy=False)

    def _push_free(self, gs: np.ndarray) -> None:
        """Empty frames ``gs`` (not free yet) back into the free set."""
        if gs.size:
            self._free_mask[gs] = True
            self.free_since_us[gs] = self.vt_us
            self._ks[_KS_N_FREE] += gs.size
            self._ks[_KS_FREE_LO] = min(int(self._ks[_KS_FREE_LO]), int(gs.min()))

    def _soft_remove(self, g: int) -> None:
        prev, nxt = int(self._soft_prev[g]), int(self._soft_next[g])
        if prev >= 0:
            self._soft_next[prev] = nxt
        else:
            self._ks[_KS_SOFT_HEAD] = nxt
        if nxt >= 0:
            self._soft_prev[nxt] = prev
        else:
            self._ks[_KS_SOFT_TAIL] = prev
        self._soft_prev[g] = self._soft_next[g] = _SOFT_OUT

    def _soft_append(self, gs: np.ndarray) -> None:
        """Frames ``gs``, in order, become the newest soft-reclaimed ones."""
        if not gs.size:
            return
        tail = int(self._ks[_KS_SOFT_TAIL])
        if tail >= 0:
            self._soft_next[tail] = gs[0]
        else:
            self._ks[_KS_SOFT_HEAD] = gs[0]
        self._soft_prev[gs[0]] = tail
        self._soft_prev[gs[1:]] = gs[:-1]
        self._soft_next[gs[:-1]] = gs[1:]
        self._soft_next[gs[-1]] = -1
        self._ks[_KS_SOFT_TAIL] = gs[-1]

    async def _alloc_frame(self) -> int:
        oom_tried = False
        while True:
            g = self._take_free()
            if g >= 0:
                return g
            v = self.policy.select_victim()
            if v >= 0:
                self.frames.resident[v] = False
                await self._evict_one(v)
                return v
            if self.on_oom is not None and not oom_tried:
                oom_tried = True
                self.counters.oom_calls += 1
                await self.on_oom(1)
                continue
            raise OutOfMemory(1, self.config.ram_pages, self.config.kernel_pages, len(self._balloon))

    def _pick_victims(self, n: int) -> np.ndarray:
        """Up to ``n`` victims from the policy, each taken out of the pool at once.

        The policy picks them in one call: one ``select_victim`` per page costs
        a scan of every frame for some policies, quadratic for a balloon of
        262,144 pages.
        """
        if n <= 0:
            return np.zeros(0, np.int64)
        return np.asarray(self.policy.select_victims(n), np.int64)

    async def _evict_one(self, g: int) -> None:
        """``_evict`` of one frame for the caller, with scalar steps (the fault path)."""
        fr = self.frames
        pt = self.pt
        c = self.counters
        dirty = bool(fr.M[g])
        if dirty and not fr.backed[g]:
            c.double_paging_pages += 1
            await self._ensure_backed(np.array([g], np.int64))   # double paging: read it back first
        page = int(fr.vpage[g])
        if dirty:
            blk = int(pt.block[page])
            if blk < 0:
                if self.swap.used >= self.swap.n_slots:
                    fr.resident[g] = True     # stays in memory; the run cannot go on without more swap
                    raise SwapExhausted(self.swap.n_slots)
                blk = self.swap.alloc_block()
                pt.block[page] = blk
            pt.on_disk[page] = True
            tok = fr.token[g]
            if pt.is_file[page]:
                c.file_writes += 1
            else:
                c.swap_out += 1
            c.writebacks += 1
        pt.gpfn[page] = -1
        pt.evicted[page] = True
        if not dirty and pt.is_file[page]:
            c.evicted_clean_file += 1
        fr.kind[g] = _FREE
        fr.R[g] = False
        fr.M[g] = False
        fr.vpage[g] = -1
        c.evictions += 1
        if dirty:
            done = await self.blockdev.write(np.array([blk], np.int64), np.array([tok], np.uint64), self.vt_us)
            self.vt_us = max(self.vt_us, float(done))

    async def _evict(self, gs: np.ndarray, mode: int) -> None:
        """Evict the pages of frames ``gs`` (already out of ``resident``), writing dirty ones back first."""
        fr = self.frames
        pt = self.pt
        c = self.counters
        dirty = gs[fr.M[gs]]
        clean = gs[~fr.M[gs]]
        c.evicted_clean_file += int(np.count_nonzero(pt.is_file[fr.vpage[clean]]))
        if dirty.size:
            # the write-back reads the frame: one the host swapped out must come back first (double paging)
            c.double_paging_pages += int(np.count_nonzero(~fr.backed[dirty]))
            await self._ensure_backed(dirty)
            dp = fr.vpage[dirty]
            blocks = pt.block[dp].copy()
            anon = ~pt.is_file[dp]
            need = np.flatnonzero(blocks < 0)
            if self.swap.used + need.size > self.swap.n_slots:
                fr.resident[gs] = True      # left in memory; the run cannot go on without more swap
                raise SwapExhausted(self.swap.n_slots)
            for k in need:
                blocks[k] = self.swap.alloc_block()
            pt.block[dp] = blocks
            pt.on_disk[dp] = True
            toks = fr.token[dirty].copy()
            n_anon = int(anon.sum())
            c.swap_out += n_anon
            c.file_writes += dirty.size - n_anon
            c.writebacks += dirty.size
        pages = fr.vpage[gs]
        pt.gpfn[pages] = -1
        pt.evicted[pages] = True
        fr.kind[gs] = _FREE
        fr.R[gs] = False
        fr.M[gs] = False
        c.evictions += gs.size
        if mode == _SOFT:
            pt.cached[pages] = gs
            self._soft_append(gs)
            c.soft_reclaimed += gs.size
        else:
            fr.vpage[gs] = -1
        if dirty.size:
            done = await self.blockdev.write(blocks, toks, self.vt_us)
            self.vt_us = max(self.vt_us, float(done))

    async def _ensure_backed(self, gs: np.ndarray) -> None:
        while True:
            need = gs[~self.frames.backed[gs]]
            if not need.size:
                return
            await self._back(need)

    async def _back(self, gs: np.ndarray) -> None:
        """EPT fault ``gs`` in; a single free target brings its upcoming free neighbours along."""
        fr = self.frames
        c = self.counters
        if gs.size == 1 and fr.kind[gs[0]] == _FREE:
            g0 = int(gs[0])
            hi = min(fr.n, g0 + self.config.fault_around_pages)
            near = np.arange(g0, hi)
            near = near[(fr.kind[g0:hi] == _FREE) & ~fr.backed[g0:hi]]
            gs = np.union1d(gs, near)
        gen = self._inval_gen[gs].copy()
        tokens, done = await self._ept_fault(gs.astype(np.uint64))
        self.vt_us = max(self.vt_us, float(done))
        tokens = np.asarray(tokens, dtype=np.uint64).copy()
        keep = tokens == np.uint64(KEEP_TOKEN)
        if keep.any():   # already backed at the host: it never took the frame, our content stands
            tokens[keep] = fr.token[gs[keep]]
        reached = tokens != np.uint64(LATER_TOKEN)  # the rest: the host stopped at the tick's end first
        c.ept_faults += int(np.count_nonzero(reached))
        c.ept_fault_calls += 1
        stable = (self._inval_gen[gs] == gen) & reached   # not shot down again while we waited
        gs, tokens = gs[stable], tokens[stable]
        held = fr.vpage[gs] >= 0                   # resident or soft-reclaimed: content must come back intact
        took = gs[held & fr.host_took[gs]]
        if took.size:
            c.host_refaults += int(took.size)
            c.host_refaults_clean_file += int(np.count_nonzero(self.pt.is_file[fr.vpage[took]] & ~fr.M[took]))
        fr.host_took[gs] = False
        bad = held & (tokens != fr.token[gs])
        if bad.any():
            self._lost_batch(fr.vpage[gs[bad]], gs[bad], tokens[bad], fr.token[gs[bad]], "ept_fault")
            tokens[bad] = fr.token[gs[bad]]
        fr.token[gs] = tokens
        fr.backed[gs] = True
        fr.wp[gs] = False

    async def _cow(self, g: int) -> None:
        """Break the sharing of frame ``g`` before writing it (the reference engine's OP_COW)."""
        if type(self.hypervisor) is NullHypervisor:
            self.frames.wp[g] = False       # no host shares anything (the compiled core does the same)
            return
        gen = int(self._inval_gen[g])
        tok, done = await self._cow_fault(g)
        self.vt_us = max(self.vt_us, float(done))
        if int(self._inval_gen[g]) != gen:
            return                          # shot down while we waited: not backed, nor protected
        fr = self.frames
        held = fr.vpage[g] >= 0
        if held and fr.host_took[g]:
            self.counters.host_refaults += 1
            self.counters.host_refaults_clean_file += int(bool(self.pt.is_file[fr.vpage[g]]) and not fr.M[g])
        fr.host_took[g] = False
        if held and tok != int(fr.token[g]):
            self._lost_one(int(fr.vpage[g]), g, tok, int(fr.token[g]), "ept_fault")
            tok = int(fr.token[g])
        fr.token[g] = tok
        fr.backed[g] = True
        fr.wp[g] = False

    async def _cow_fault(self, g: int) -> tuple[int, float]:
        """The EPT fault that is the host's copy-on-write break of frame ``g``: (its token, done time)."""
        self.cow_faults += 1
        tokens, done = await self._ept_fault(np.array([g], np.uint64))
        tok = int(np.asarray(tokens, np.uint64)[0])
        if tok == KEEP_TOKEN:      # the host kept (copied) the content: ours stands
            tok = int(self.frames.token[g])
        return tok, float(done)

    async def _ept_fault(self, gs: np.ndarray) -> tuple[np.ndarray, float]:
        """Ask the hypervisor to back ``gs``, saying which frames hold no page (``fresh``).

        A frame that holds no page, resident or soft-reclaimed, is about to be
        filled from scratch (zero fill, a disk read, or it is simply free): the
        host need not bring its old content back (EptFault.fresh).
        """
        if not self._hyp_fresh:
            return await self.hypervisor.ept_fault(gs, self.vt_us)
        fresh = self._fresh(gs)
        n_fresh = int(np.count_nonzero(fresh))
        if not n_fresh:
            return await self.hypervisor.ept_fault(gs, self.vt_us)
        self.counters.ept_fresh_pages += n_fresh
        return await self.hypervisor.ept_fault(gs, self.vt_us, fresh=fresh)

    def _fresh(self, gs: np.ndarray) -> np.ndarray:
        """Which of frames ``gs`` hold no page (free, not soft-reclaimed): the host restores nothing for them."""
        g = gs.astype(np.int64, copy=False)
        fr = self.frames
        fresh = fr.vpage[g] < 0
        fresh &= fr.kind[g] == _FREE
        return fresh

    def _resize_policy(self) -> None:
        self.policy.resize(self.config.ram_pages - self.config.kernel_pages - len(self._balloon))

    # ------------------------------------------------------------------ reclaim and balloon

    async def reclaim(self, n: int) -> int:
        """Soft-reclaim up to ``n`` pages (kswapd-like); returns how many.

        Victims come from the policy; dirty ones are written back first; each
        keeps its page in its now-free frame until the allocator reuses it,
        so touching it again before then is a minor fault.
        """
        async with self.mm_lock:
            victims = self._pick_victims(n)
            if victims.size:
                await self._evict(victims, _SOFT)
            return int(victims.size)

    async def balloon_alloc(self, n: int) -> np.ndarray:
        """Allocate up to ``n`` frames for the balloon through the normal allocator.

        Free frames first, then soft-reclaimed ones, then victims chosen by
        the replacement policy (dirty file pages written back, anonymous
        pages swapped, clean cache dropped for free). The frames become
        BALLOON and unbacked. Partial progress is normal: fewer than ``n``
        come back when nothing else is reclaimable. Never calls ``on_oom``.
        """
        async with self.mm_lock:
            free = self._take_free_many(max(n, 0))
            got: list[int] = free.tolist()
            if len(got) < n:
                victims = self._pick_victims(n - len(got))
                if victims.size:
                    vp = self.frames.vpage[victims]
                    self.counters.balloon_reclaimed += int(victims.size)
                    self.counters.balloon_reclaimed_clean_file += int(
                        np.count_nonzero(self.pt.is_file[vp] & ~self.frames.M[victims]))
                    try:
                        await self._evict(victims, _TO_CALLER)
                    except BaseException:
                        # taken, not used: back where they were (soft ones are plain free frames now)
                        self._push_free(free)
                        raise
                    got.extend(victims.tolist())
            g = np.array(got, np.int64)
            fr = self.frames
            fr.kind[g] = FrameKind.BALLOON
            fr.backed[g] = False
            fr.wp[g] = False
            fr.vpage[g] = -1
            fr.token[g] = 0
            fr.R[g] = False
            fr.M[g] = False
            fr.touched[g] = False
            self._inval_gen[g] += 1
            for x in got:
                self._balloon[x] = None
            self.counters.balloon_inflated += g.size
            self._resize_policy()
            return g.astype(np.uint64)

    async def flush_dirty_cache(self, background_ratio_pct: float, max_pages: int = 1024) -> int:
        """The flusher: start writing back dirty page cache above ``background_ratio_pct`` of available memory.

        As Linux's background write-back (``vm.dirty_background_ratio``, at
        most ``MAX_WRITEBACK_PAGES`` = 1024 pages a pass): the writes are sent
        but the vCPU's clock does not wait for them. A page stays dirty until
        its write is complete (``complete_writeback``), so reclaim never reuses
        a frame whose write-back is in flight: one evicted before then is
        written again, synchronously, as any dirty page. Pages are taken in
        frame order from a hand that moves on, so every dirty page gets its turn.
        Returns how many writes were started.
        """
        self.complete_writeback()
        fr = self.frames
        dirty_file = fr.resident & fr.M & (fr.kind == _FILE) & fr.backed
        if self._wb_tok.size:
            dirty_file[self._wb_g] = False            # already in flight
        n_dirty = int(np.count_nonzero(dirty_file))
        kinds = np.bincount(fr.kind, minlength=len(FrameKind))
        limit = background_ratio_pct / 100.0 * float(kinds[FrameKind.FREE] + kinds[FrameKind.FILE])
        n = min(int(n_dirty - limit), max_pages)
        if n <= 0:
            return 0
        async with self.mm_lock:
            cand = np.flatnonzero(dirty_file)
            start = int(np.searchsorted(cand, self._wb_hand))
            gs = np.concatenate([cand[start:], cand[:start]])[:n]
            self._wb_hand = (int(gs[-1]) + 1) % fr.n
            await self._start_writeback(gs, _WB_FLUSHER)
            self.counters.flusher_writes += int(gs.size)
        return int(gs.size)

    async def discard(self, pages: np.ndarray) -> int:
        """The workload frees these anonymous pages (``munmap``, ``free`` of a large block, MADV_DONTNEED).

        Their content is gone: a resident or soft-reclaimed page's frame
        becomes an empty free frame (it still holds the old bytes, and the
        host may still back it or hold it in host swap: only free page
        reporting tells the host), a page in guest swap leaves it (its slot
        stays its own, as every anonymous page keeps its slot), and the next
        touch of the page is a fresh zero fill. Returns the frames freed.
        """
        p = self._check_pages(pages)
        p = np.unique(p)
        if p.size and np.any(self.pt.is_file[p]):
            raise BadPages(f"discard: page {int(p[np.flatnonzero(self.pt.is_file[p])[0]])} is a file page; "
                           "only anonymous memory is freed")
        async with self.mm_lock:
            fr, pt = self.frames, self.pt
            res = p[pt.gpfn[p] >= 0]
            g_res = pt.gpfn[res]
            soft = p[pt.cached[p] >= 0]
            g_soft = pt.cached[soft]
            for g in g_soft.tolist():
                self._soft_remove(g)
            pt.gpfn[res] = -1
            pt.cached[soft] = -1
            pt.on_disk[p] = False          # a copy in guest swap is garbage now
            pt.expect[p] = 0               # freed memory is the zero page when it is touched again
            pt.evicted[p] = False          # a later touch is a new allocation, not a refault
            gs = np.concatenate((g_res, g_soft)).astype(np.int64)
            fr.resident[g_res] = False
            fr.kind[gs] = _FREE
            fr.vpage[gs] = -1
            fr.R[gs] = False
            fr.M[gs] = False
            if isinstance(self.policy, EscPolicy):
                self.policy.state[1] = 1      # the compiled core's (0,0) bitmap is stale
            self._push_free(np.sort(gs))
            self.discarded_pages += int(p.size)
            return int(gs.size)

    def reportable_frames(self, delay_us: float, block_pages: int) -> np.ndarray:
        """Free page reporting's candidates: frames the host may still hold something for, in free blocks.

        A block is ``block_pages`` aligned frames (the buddy allocator's
        blocks: Linux reports whole free blocks of order >= pageblock_order)
        every one of them empty and free for at least ``delay_us``; of those
        blocks, the frames the host backs or holds content for (it took the
        frame while it held a page) are the ones to report. A soft-reclaimed
        frame still holds a page the guest may take back: it is not free here.
        """
        fr = self.frames
        nb = fr.n // block_pages
        if nb == 0:
            return np.zeros(0, np.int64)
        end = nb * block_pages
        ok = self._free_mask[:end] & (self.vt_us - self.free_since_us[:end] >= delay_us)
        whole = ok.reshape(nb, block_pages).all(axis=1)
        if not whole.any():
            return np.zeros(0, np.int64)
        held = (fr.backed[:end] | fr.host_took[:end]).reshape(nb, block_pages) & whole[:, None]
        return np.flatnonzero(held.reshape(-1)).astype(np.int64)

    def reported(self, gpfns: np.ndarray) -> None:
        """The host discarded these free frames: the next touch is an EPT fault for a fresh zero page."""
        g = self._check_gpfns(gpfns)
        if g.size and np.any(~self._free_mask[g]):
            raise BadFrames(f"reported: gpfn {int(g[np.flatnonzero(~self._free_mask[g])[0]])} is not free")
        fr = self.frames
        fr.backed[g] = False
        fr.host_took[g] = False
        fr.token[g] = 0
        fr.wp[g] = False                 # a shared frame the host discarded comes back private
        self._inval_gen[g] += 1

    async def _start_writeback(self, gs: np.ndarray, source: int) -> None:
        """Send the pages of frames ``gs`` (resident, dirty, backed) to disk; the clock does not wait.

        An anonymous page gets its swap slot now (as add_to_swap before
        pageout). Each stays dirty until its write completes (``complete_writeback``).
        """
        pt = self.pt
        pages = self.frames.vpage[gs].copy()
        blocks = pt.block[pages].copy()
        for k in np.flatnonzero(blocks < 0).tolist():
            blocks[k] = pt.block[pages[k]] = self.swap.alloc_block()
        toks = self.frames.token[gs].copy()
        done = await self.blockdev.write(blocks, toks, self.vt_us)     # the clock does not wait for it
        pt.on_disk[pages] = True
        self._wb_g = np.concatenate([self._wb_g, gs])
        self._wb_page = np.concatenate([self._wb_page, pages])
        self._wb_tok = np.concatenate([self._wb_tok, toks])
        self._wb_done = np.concatenate([self._wb_done, np.full(gs.size, float(done))])
        self._wb_src = np.concatenate([self._wb_src, np.full(gs.size, source, np.int8)])

    def complete_writeback(self) -> int:
        """Write-backs complete by now: their pages, still holding what was written, become clean."""
        if not self._wb_tok.size:
            return 0
        due = self._wb_done <= self.vt_us
        if not due.any():
            return 0
        g, page, tok = self._wb_g[due], self._wb_page[due], self._wb_tok[due]
        fr = self.frames
        same = (fr.vpage[g] == page) & (fr.token[g] == tok) & fr.resident[g] & fr.M[g]
        fr.M[g[same]] = False
        if isinstance(self.policy, EscPolicy):
            self.policy.state[1] = 1      # new clean frames: the compiled core's (0,0) bitmap is stale
        by_kswapd = self._wb_src[due] == _WB_KSWAPD
        keep = ~due
        self._wb_g, self._wb_page = self._wb_g[keep], self._wb_page[keep]
        self._wb_tok, self._wb_done = self._wb_tok[keep], self._wb_done[keep]
        self._wb_src = self._wb_src[keep]
        n = int(np.count_nonzero(same))
        n_kswapd = int(np.count_nonzero(same & by_kswapd))
        self.counters.flusher_cleaned += n - n_kswapd
        self.bg.kswapd_cleaned += n_kswapd
        return n

    # ------------------------------------------------------------------ kswapd

    def _free_frames(self) -> int:
        """Free frames: empty ones and soft-reclaimed ones (whose page may still be taken back)."""
        return int(np.count_nonzero(self.frames.kind == _FREE))

    async def _kswapd_pass(self) -> None:
        """Reclaim ahead of demand: below the low watermark, wake; reclaim toward the high one; sleep there.

        As ``balance_pgdat``: victims come from the policy, in its order.
        Clean ones are soft-reclaimed at once (no I/O: their frames are free,
        their pages still there until reused). A dirty one stays resident
        and its write-back starts (``pageout``), the clock not waiting; once
        clean it is reclaimed by a later pass. A frame the host took is left
        alone (writing it back would EPT-fault it in).
        """
        wm = self.wmark
        assert wm is not None
        free = self._free_frames()
        if not self._kswapd_awake:
            if free >= wm.low_pages:
                return
            self._kswapd_awake = True
            self.bg.kswapd_wakeups += 1
        want = wm.high_pages - free
        if want <= 0:
            self._kswapd_awake = False
            return
        self._ra_resolve()       # before a read-ahead page used since could go back to the soft list
        victims = self._pick_victims(want)
        if not victims.size:
            return
        fr = self.frames
        self.bg.pgscan_kswapd += int(victims.size)
        dirty_m = fr.M[victims]
        dirty, clean = victims[dirty_m], victims[~dirty_m]
        if dirty.size:
            fr.resident[dirty] = True         # handed back: reclaimed once its write-back made it clean
            if isinstance(self.policy, EscPolicy):
                self.policy.state[1] = 1
        if clean.size:
            await self._evict(clean, _SOFT)
            self.bg.pgsteal_kswapd += int(clean.size)
        if dirty.size:
            start = dirty[fr.backed[dirty] & ~np.isin(dirty, self._wb_g)]
            if start.size:
                no_slot = self.pt.block[fr.vpage[start]] < 0
                room = self.swap.n_slots - self.swap.used
                if int(no_slot.sum()) > room:   # no swap left for them: the fault path will say so
                    start = np.concatenate([start[~no_slot], start[no_slot][:room]])
                if start.size:
                    await self._start_writeback(start, _WB_KSWAPD)
                    self.bg.kswapd_writes += int(start.size)
        if free + int(clean.size) >= wm.high_pages:
            self._kswapd_awake = False

    # ------------------------------------------------------------------ readahead

    def _plain_read_one(self) -> Callable[[int, float], Awaitable[tuple[int, float]]] | None:
        """The device's one-block read when a fault's read is nothing more (no readahead), bound; else None.

        ``_disk_read`` without readahead is exactly this call; the compiled
        path awaits it directly, one coroutine fewer per request.
        """
        if self._ra is not None:
            return None
        bd = self.blockdev
        read_one = getattr(type(bd), "read_one", None)
        return None if read_one is None else read_one.__get__(bd)

    async def _disk_read(self, blk: int) -> tuple[int, float]:
        """A fault's read of block ``blk``: the token and the completion; with readahead, its window too."""
        ra = self._ra
        if ra is not None:
            page = int(self._block_page[blk]) if blk < self._block_page.size else -1
            hit = None
            if page >= 0:
                self._ra_resolve()
                hit = self._ra_take_inflight(page)
                if hit is not None:      # waits for it; the rest of its window is then in memory too
                    self.vt_us = max(self.vt_us, hit[1])
            if self.vt_us < self._deadline_us:     # past the gate it would belong to the next tick
                with self.bg_quiet():
                    await self._ra_poll()    # a mark used since the last look: its window goes first
            if page >= 0:
                if hit is None:              # the mark's window may start at this very page
                    hit = self._ra_take_inflight(page)
                if hit is not None:
                    return hit
                return await self._read_file_page(page)
        bd = self.blockdev
        # a device with a one-block read of its own (the remote disk: nearly every request a guest
        # sends); looked up on the class, so a wrapper that forwards attributes is not bypassed
        read_one = getattr(type(bd), "read_one", None)
        if read_one is not None:
            return await read_one(bd, blk, self.vt_us)
        toks, done = await bd.read(np.array([blk], np.int64), self.vt_us)
        return int(toks[0]), float(done)

    def _ra_busy(self, pages: np.ndarray) -> np.ndarray:
        """Which of ``pages`` need no read: in a frame, soft-reclaimed, or in an asynchronous read in flight."""
        pt = self.pt
        busy = (pt.gpfn[pages] >= 0) | (pt.cached[pages] >= 0)
        for wp, _, _ in self._ra_inflight:
            busy |= np.isin(pages, wp)
        return busy

    def _ra_room(self) -> int:
        """Frames readahead may fill: free ones not holding pages it read ahead itself, less kswapd's
        low watermark (readahead does not reclaim, and must not wake kswapd)."""
        reserve = self.wmark.low_pages if self.wmark is not None else 0
        return max(0, self._free_frames() - int(self._ra_page.size) - reserve)

    def _ra_frames(self, n: int) -> np.ndarray:
        """Up to ``n`` free frames for pages read ahead: empty ones first, then the oldest
        soft-reclaimed ones, passing over those that hold read-ahead pages not used yet."""
        n = min(n, self._ra_room())
        gs = self._take_free_many(min(n, int(self._ks[_KS_N_FREE])))
        if gs.size >= n:
            return gs
        got = [gs]
        k = int(gs.size)
        mine = np.zeros(self.frames.n, bool)
        mine[self._ra_g] = True
        g = int(self._ks[_KS_SOFT_HEAD])
        while g >= 0 and k < n:
            nxt = int(self._soft_next[g])
            if not mine[g]:
                self._soft_remove(g)
                self.pt.cached[self.frames.vpage[g]] = -1
                self.frames.vpage[g] = -1
                got.append(np.array([g], np.int64))
                k += 1
            g = nxt
        return np.concatenate(got).astype(np.int64, copy=False)

    async def _read_file_page(self, page: int) -> tuple[int, float]:
        """A file page must come from disk: the readahead window around it, in one request."""
        assert self._ra is not None
        first, n, mark = self._ra.on_sync_miss(page)
        pt = self.pt
        if n <= 1:                  # a random read: the page alone
            toks, done = await self.blockdev.read(np.array([pt.block[page]], np.int64), self.vt_us)
            return int(toks[0]), float(done)
        ahead = np.arange(first, first + n, dtype=np.int64)
        ahead = ahead[ahead != page]
        ahead = ahead[~self._ra_busy(ahead)][:self._ra_room()]
        gs = self._ra_frames(ahead.size)     # the pages to read into, as the kernel allocates them first
        ahead = ahead[:gs.size]
        pages = np.concatenate([np.array([page], np.int64), ahead])
        toks, done = await self.blockdev.read(pt.block[pages], self.vt_us)
        toks = np.asarray(toks, np.uint64)
        if ahead.size:
            self.bg.readahead_requests += 1
            self.bg.readahead_pages += int(ahead.size)
            await self._ensure_backed(gs)        # the host may have taken them while the read ran
            self._ra_fill(gs, ahead, toks[1:])
        if mark >= 0 and not np.isin(mark, ahead):
            self._ra.marker[self._ra.region_of[page]] = -1
        return int(toks[0]), float(done)

    def _ra_take_inflight(self, page: int) -> tuple[int, float] | None:
        """The page is in an asynchronous read in flight: wait for it there (as for a locked page)."""
        for i, (wp, wt, done) in enumerate(self._ra_inflight):
            k = np.flatnonzero(wp == page)
            if k.size:
                j = int(k[0])
                tok = int(wt[j])
                self._ra_inflight[i] = (np.delete(wp, j), np.delete(wt, j), done)
                self.bg.readahead_hits += 1
                self.bg.readahead_waited += 1
                return tok, float(done)
        return None

    async def _ra_place(self, pages: np.ndarray, toks: np.ndarray) -> None:
        """An asynchronous window whose read completed: into free frames, those that find one."""
        gs = self._ra_frames(pages.size)
        if gs.size < pages.size:
            self.bg.readahead_wasted += int(pages.size - gs.size)
        if gs.size:
            await self._ensure_backed(gs)
            self._ra_fill(gs, pages[:gs.size], toks[:gs.size])

    def _ra_fill(self, gs: np.ndarray, pages: np.ndarray, toks: np.ndarray) -> None:
        """Pages read ahead go into frames ``gs`` as page cache not yet used (soft-reclaimed, R=0).

        The first reference takes one back at a minor fault; the allocator
        reuses their frames oldest first when no empty frame is left, before
        the policy evicts anything (they are the inactive list's tail).
        """
        fr, pt = self.frames, self.pt
        toks = toks.copy()
        never = toks == 0       # a block never written holds the file's initial content
        toks[never] = (pages[never].astype(np.uint64) + np.uint64(1)) << np.uint64(32)
        exp = pt.expect[pages]
        if (toks != exp).any():
            self._lost_batch(pages, gs, toks, exp, "readahead")
            toks = exp.copy()
        fr.kind[gs] = _FREE
        fr.vpage[gs] = pages
        fr.token[gs] = toks
        fr.resident[gs] = False
        fr.R[gs] = False
        fr.M[gs] = False
        fr.touched[gs] = False
        fr.ad_accessed[gs] = True
        fr.ad_dirty[gs] = True        # the read stored into the frame
        pt.cached[pages] = gs
        pt.evicted[pages] = False     # its first use is no refault (and tells a later drop from a use)
        self._soft_append(gs)
        self._ra_page = np.concatenate([self._ra_page, pages])
        self._ra_g = np.concatenate([self._ra_g, gs])

    def _ra_resolve(self) -> None:
        """Read-ahead pages whose fate is known: used (taken back, or evicted after) or wasted (dropped)."""
        if not self._ra_page.size:
            return
        pt = self.pt
        p, g = self._ra_page, self._ra_g
        waiting = pt.cached[p] == g
        used = ~waiting & ((pt.gpfn[p] == g) | pt.evicted[p])
        self.bg.readahead_hits += int(np.count_nonzero(used))
        self.bg.readahead_wasted += int(np.count_nonzero(~waiting & ~used))
        self._ra_page, self._ra_g = p[waiting], g[waiting]

    async def _ra_poll(self) -> None:
        """Readahead's background part: finished asynchronous reads placed; a used mark starts the next."""
        assert self._ra is not None
        self._ra_resolve()
        marked = np.flatnonzero(self._ra.marker >= 0)
        if not self._ra_inflight and not marked.size:
            return
        ready = [x for x in self._ra_inflight if x[2] <= self.vt_us]
        if ready:
            self._ra_inflight = [x for x in self._ra_inflight if x[2] > self.vt_us]
            for wp, wt, _ in ready:
                if wp.size:
                    await self._ra_place(wp, wt)
        ra, pt = self._ra, self.pt
        for r in marked.tolist():
            if pt.gpfn[ra.marker[r]] < 0:
                continue                     # the marked page not used yet
            first, n, _ = ra.on_marker(r)
            ahead = np.arange(first, first + n, dtype=np.int64)
            ahead = ahead[~self._ra_busy(ahead)][:self._ra_room()]
            if not ahead.size:
                ra.marker[r] = -1
                continue
            toks, done = await self.blockdev.read(pt.block[ahead], self.vt_us)    # not waited for
            self._ra_inflight.append((ahead, np.asarray(toks, np.uint64).copy(), float(done)))
            self.bg.readahead_requests += 1
            self.bg.readahead_async += 1
            self.bg.readahead_pages += int(ahead.size)
            if not np.isin(ra.marker[r], ahead):
                ra.marker[r] = -1

    def balloon_pick(self, n: int) -> np.ndarray:
        """Up to ``n`` balloon frames to give back, most recently inflated first (state unchanged)."""
        if n <= 0 or not self._balloon:
            return np.zeros(0, np.uint64)
        keys = list(self._balloon)
        return np.array(keys[-n:][::-1], np.uint64)

    def balloon_release(self, gpfns: np.ndarray) -> None:
        """Deflate: balloon frames ``gpfns`` become FREE (and stay unbacked until touched)."""
        g = self._check_gpfns(gpfns)
        if np.unique(g).size != g.size:
            raise BadFrames("balloon_release: duplicate gpfns in one call")
        fr = self.frames
        wrong = g[fr.kind[g] != FrameKind.BALLOON]
        if wrong.size:
            raise BadFrames(f"balloon_release: gpfn(s) {wrong[:8].tolist()} are not balloon frames")
        fr.kind[g] = FrameKind.FREE
        fr.backed[g] = False
        fr.vpage[g] = -1
        for x in g.tolist():
            del self._balloon[x]
        self._push_free(g)
        self.counters.balloon_deflated += g.size
        self._resize_policy()

    # ------------------------------------------------------------------ host side

    def invalidate(self, gpfns: np.ndarray) -> np.ndarray:
        """Host TLB shootdown: the gpfns lose their backing; returns the tokens they held."""
        return self.invalidate_labelled(gpfns)[0]

    def invalidate_labelled(self, gpfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``invalidate``, plus which of the gpfns held clean page cache at that moment (bools).

        Clean page cache: a file page not written since it was loaded or
        written back, in a resident frame or a soft-reclaimed one (the guest
        could drop it at no I/O). InvalidateReply.labels carries it, for the
        host's accounting only.
        """
        g = self._check_gpfns(gpfns)
        fr = self.frames
        tokens = fr.token[g].copy()
        vp = fr.vpage[g]
        clean_cache = (vp >= 0) & ~fr.M[g]
        clean_cache[clean_cache] = self.pt.is_file[vp[clean_cache]]
        c = self.counters
        held = g[fr.backed[g] & (fr.vpage[g] >= 0)]
        if held.size:
            c.host_took_pages += int(held.size)
            c.host_took_clean_file += int(np.count_nonzero(self.pt.is_file[fr.vpage[held]] & ~fr.M[held]))
            fr.host_took[held] = True
        fr.backed[g] = False
        fr.wp[g] = False
        self._inval_gen[g] += 1
        c.invalidations += g.size
        return tokens, clean_cache

    def share_peek(self, gpfns: np.ndarray) -> np.ndarray:
        """Page sharing's scanner reads these frames: their tokens, ``KEEP_TOKEN`` where no page of ours is.

        Only frames holding a resident page count (ANON or FILE): a free
        frame's leftovers, balloon and kernel frames are not the scanner's.
        """
        g = self._check_gpfns(gpfns)
        fr = self.frames
        has = fr.resident[g] & fr.backed[g] & ((fr.kind[g] == _ANON) | (fr.kind[g] == _FILE))
        return np.where(has, fr.token[g], np.uint64(KEEP_TOKEN)).astype(np.uint64)

    def share_protect(self, gpfns: np.ndarray) -> int:
        """The host shares these frames now: write-protect them; returns how many."""
        g = self._check_gpfns(gpfns)
        fr = self.frames
        if np.any(~fr.backed[g]):
            bad = int(g[np.flatnonzero(~fr.backed[g])[0]])
            raise BadFrames(f"share_protect: gpfn {bad} is not backed by the host")
        fr.wp[g] = True
        self.share_protected += int(g.size)
        return int(g.size)

    def take_ad_bits(self) -> tuple[np.ndarray, np.ndarray]:
        """EPT accessed and dirty bits of every gpfn (np.packbits), cleared after."""
        fr = self.frames
        a = np.packbits(fr.ad_accessed)
        d = np.packbits(fr.ad_dirty)
        fr.ad_accessed[:] = False
        fr.ad_dirty[:] = False
        return a, d

    def take_ad_bytes(self) -> tuple[bytes, bytes]:
        """``take_ad_bits`` as the bytes TickDone carries (one compiled pass at every tick end)."""
        fr = self.frames
        if _paging is not None:
            return _paging.take_ad_bits(fr.ad_accessed, fr.ad_dirty)
        a, d = self.take_ad_bits()   # pragma: no cover - the install builds it
        return a.tobytes(), d.tobytes()

    def _check_gpfns(self, gpfns: np.ndarray) -> np.ndarray:
        g = np.asarray(gpfns)
        if g.ndim != 1 or (g.size and g.dtype.kind not in "ui"):
            raise BadFrames(f"gpfns must be a 1-d integer array, got {g.dtype} shape {g.shape}")
        g = g.astype(np.int64)
        if g.size:
            lo, hi = int(g.min()), int(g.max())
            if lo < 0 or hi >= self.frames.n:
                bad = lo if lo < 0 else hi
                raise BadFrames(f"gpfn {bad} outside guest memory 0..{self.frames.n - 1}")
        return g

    # ------------------------------------------------------------------ time and stats

    def advance_to(self, vt_us: float) -> None:
        """Move the clock forward while idle (no references), closing finished periods."""
        if vt_us > self.vt_us:
            self.vt_us = float(vt_us)
        self._maybe_end_period()

    def _maybe_end_period(self) -> None:
        if self.vt_us < self._next_period_us:
            return
        c = self.counters
        self.ws.end_period(self.frames)
        self.pff.end_period(c.major_faults + c.minor_faults, self.vt_us)
        period = self.config.ws_period_us
        self._next_period_us = (self.vt_us // period + 1) * period

    def stats(self) -> dict[str, int | float]:
        """Cumulative counters and current gauges (virtio-balloon's, plus ours); JSON-serialisable."""
        return dict(zip(_STAT_KEYS, self.stat_values()))    # a new dict

    def stat_values(self) -> list[int | float]:
        """``stats()``'s values alone, in ``STAT_KEYS`` order (a new list): every tick end of every guest."""
        fr = self.frames
        g = self._gauges
        if _paging is not None:     # every tick of every guest: one pass, not four numpy calls
            _paging.frame_gauges(fr.kind, fr.backed, fr.wp, self.pt.cached, g)
        else:  # pragma: no cover - the install builds it
            g[:_N_KINDS] = np.bincount(fr.kind, minlength=_N_KINDS)
            g[_N_KINDS:] = (np.count_nonzero(fr.backed), np.count_nonzero(fr.wp),
                            np.count_nonzero(self.pt.cached >= 0))
        kinds = g.tolist()
        free = kinds[_FREE]
        file_pages = kinds[_FILE]
        counts = self.counters.array.tolist()
        self._ra_resolve()
        ws = self.ws
        # one list in _STAT_KEYS' order: this runs at every tick end of every guest
        counts += self.bg.values()
        counts += (
            # direct reclaim: the faults' own evictions (everything not kswapd's, reclaim()'s or the balloon's)
            counts[_C_EVICTIONS] - counts[_C_SOFT_RECLAIMED] - counts[_C_BALLOON_RECLAIMED],
            free, self.config.ram_pages, free + file_pages, file_pages, kinds[_ANON], file_pages,
            kinds[_BALLOON], kinds[_KERNEL], kinds[_N_KINDS + 2], self.discarded_pages, fr.n - kinds[_N_KINDS],
            kinds[_N_KINDS + 1], self.cow_faults, self.share_protected, self.swap.used, self.swap.n_slots,
            float(self.pff.pff), float(self.pff.last_rate), int(ws.estimate_pages), float(ws.last_fraction),
            float(self._vt[0]),
        )
        return counts

    # ------------------------------------------------------------------ integrity

    def _lost_batch(self, pages: np.ndarray, gpfns: np.ndarray, got: np.ndarray, want: np.ndarray, where: str) -> None:
        bad = got != want
        bad_pages = np.unique(pages[bad])
        self.counters.lost_pages += int(bad_pages.size)
        self.log.error(EV_PAGE_LOST, where=where, count=int(bad_pages.size), vpages=bad_pages[:8].tolist(),
                       gpfns=np.unique(gpfns[bad])[:8].tolist(), vt_us=self.vt_us)
        # repair, so one loss is counted once rather than on every later read
        self.frames.token[gpfns[bad]] = want[bad]

    def _lost_one(self, page: int, gpfn: int, got: int, want: int, where: str) -> None:
        self.counters.lost_pages += 1
        self.log.error(EV_PAGE_LOST, where=where, count=1, vpages=[page], gpfns=[gpfn],
                       got_token=got, want_token=want, vt_us=self.vt_us)

"""Host memory: frames, per-guest p2m, host swap, virtual disks, and the invariant.

``HostMemory`` is socket-free. Its collaborators come in its constructor,
or, for the two that need host memory themselves, in one ``wire`` call
(``hostd.assembly`` does both; nothing else sets them):

- ``victim``: the blind victim policy (``hostd.victim``);
- ``shootdown``: an ``async (guest_id, gpfns uint64) -> tokens uint64`` that
  sends the guest the TLB-shootdown (invalidate) RPC and returns the content
  tokens the guest held for those gpfns (``hostd.shootdown``). The host
  waits for it before it reuses the frames;
- ``observer``: the host's monitors, told of swap-ins and disk writes as they
  happen (``MemoryObserver``);
- ``callout``: see "Concurrency" below.

Concurrency: every method may be called from many session tasks at once.
State changes happen only in synchronous stretches; the only awaits are the
shootdowns (inside ``reclaim``) and waits for someone else's shootdown. A
frame whose shootdown is pending is ``busy``: not free, not a victim, not
freed by balloon inflation or guest death (it is released when the
acknowledgement arrives). A caller that needs ``n`` frames makes room, then
re-checks everything it planned, and allocates with no await in between.
No internal lock: the lock protocols of the design wrap these calls, and
``callout`` (an async context manager factory) runs around every wait for a
guest (the shootdowns) or for another caller's shootdown, so a protocol can
drop its lock there (hostd.locks, no-callback-under-lock).

Call order for one guest::

    add_guest -> (ept_fault | balloon_inflate | balloon_deflate | set_ad_bits
                  | vdisk_read | vdisk_write | pin_* | unpin_*)* -> remove_guest
    each tick, from the tick loop: tick(vt_us) [-> await balance(vt_us)] -> snapshot()

The books are read through ``guest_ids``, ``p2m``, ``vdisk``, ``pool`` and
``swap`` (the audit and the invariant look at the raw state); the frame
invariant itself is ``hostd.invariant``.

Every allocation (EPT fault, disk cache, I/O buffers) first tries to keep
``low_watermark_frames`` free beyond what it takes, by host swapping in
batches of at least ``reclaim_batch_frames``; ``balance`` (the tick loop's
kswapd) refills to twice the watermark in the background.

Costs in virtual time: an EPT fault costs ``ept_fault_us`` per page asked
for; if the pool could not serve it without reclaiming, it also waits for
those swap-out writes (direct reclaim); swapped pages add a read on the
guest's lane of the swap device. Refilling the watermark alone costs the
vCPU nothing.

Host swap is one file per guest with a swap cache (``hostd.hostswap``);
it holds guest pages only. The virtual disks' cache (``hostd.vdisk``,
``hostd.hostcache``) is dropped or written back, never host-swapped: the
victim policies only see guest frames. Under pressure a request first
drops its own guest's clean cache clusters, then host-swaps.

Partitions (the deterministic discipline): while the pool's grants are
open, an allocation for a guest with a grant takes only from that grant
(``FramePool``), and when the grant is short the guest reclaims from its
own partition only, in this order: retire its own I/O buffers of requests
complete by the request's virtual time; drop its own clean disk-cache
clusters, least recently used first (``VirtualDisk.drop_clean``, the same
cluster LRU the cache's own budget uses); host-swap its own pages (random
victims from its own stream, ``guest_rng``), if ``self_swap_allowed``
says so; else the request is held (``hold``, from the discipline) until a
refill round or the next tick. Nothing in that path reads or changes
another guest's state, so the order in which guests' requests arrive
cannot change any count. Every device has one lane per guest
(``hostd.devices``) for the same reason: its share is set at tick
boundaries only.

**Labels** (instrumentation only): a guest's shootdown reply marks the
pages that were clean page cache in the guest (``record_labels``). The
host counts its real swap writes of those pages and their later swap-in
reads (``clean_cache_*`` counters), so the report can show the I/O clean
page cache costs under blind host swapping. Nothing here decides anything
from a label: victims, reclaim and controllers never read them.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Awaitable, Callable, NamedTuple, Protocol

import numpy as np

from balloonlab.proto.content import ContentMap
from balloonlab.proto.costs import CostModel
from balloonlab.proto.tokens import KEEP_TOKEN, LATER_TOKEN

from .errors import (BadBatch, BalloonLimit, ContentMapTaken, DuplicateGuest, HostOutOfMemory, InvalidState,
                     InvariantViolation, UnknownGuest)
from .devices import Device, DeviceProfile, device_profile
from .framepool import FrameKind, FramePool
from .compress import ReclaimZip, ZipConfig
from .hostcache import CACHE_MODE_DEFAULT, CacheConfig, HostCache
from .hostswap import PENDING_TOKEN, HostSwap
from .invariant import check_full
from .p2m import P2M, PageState, as_page_numbers, one_page_number, one_token, unique_pages
from .vdisk import CLUSTER_PAGES_DEFAULT, MAX_INFLIGHT_REQUESTS_DEFAULT, VirtualDisk
from .memstate import MemoryStates, MemState, VmAllocation, may_compress, plan_boundary_swap, state_of
from .victim import VictimPolicy, make_victim_policy
from .victim.per_vm import PerVmVictims
from .sharing import PageSharing

__all__ = ["HostMemory", "HostCounters", "GuestCounters", "Reclaimed", "Shootdown", "MemoryObserver",
           "MAX_BALLOON_FRACTION_DEFAULT", "default_max_balloon_pages"]

Shootdown = Callable[[int, np.ndarray], Awaitable[np.ndarray]]
"""``async (guest_id, gpfns) -> tokens``: invalidate the guest's mappings, return what it held."""

Hold = Callable[[int, int, float], Awaitable[float]]
"""``async (guest_id, need_frames, vt_us) -> resume_vt_us``: park a request whose grant ran out
(the discipline's refill rounds; ``hostd.discipline.deterministic``)."""

SELF_SWAP_BELOW_WATERMARKS = 3
"""Host swapping inside a guest's partition is allowed by default when the free frames at the last
tick boundary, after its reclaim and beyond what requests held across it need, were below this many
low watermarks. The boundary's kswapd refills to two watermarks (plus the held requests' needs), so
whenever the host had to reclaim this holds; with memory to spare the guest holds instead and a
refill round hands it frames others did not use."""


def default_self_swap_allowed(mem: "HostMemory", guest_id: int) -> bool:
    """May ``guest_id`` host-swap its own pages when its grant runs out? (The memory states replace this.)

    Decided from the state at the tick's start only (deterministic): the
    free frames at the last boundary, beyond the held requests' needs, below
    ``SELF_SWAP_BELOW_WATERMARKS`` low watermarks.
    """
    return mem.boundary_free_frames < SELF_SWAP_BELOW_WATERMARKS * mem.low_watermark_frames


class MemoryObserver(Protocol):
    """What the host's monitors want to see as it happens (``HostMemory.observer``).

    Called synchronously, after the state change; must not call back into
    host memory.
    """

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
        """An EPT fault read these guest pages back from host swap (their content tokens)."""

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        """The guest wrote these blocks of its virtual disk (the content tokens written)."""


MAX_BALLOON_FRACTION_DEFAULT = 0.65   # ESX Mem.CtlMaxPercent
_FRAME = int(PageState.FRAME)         # plain ints for the one-page paths (an IntEnum lookup costs ~1 us)
_SWAPPED = int(PageState.SWAPPED)
_BALLOONED = int(PageState.BALLOONED)
_COMPRESSED = int(PageState.COMPRESSED)
_ZERO = int(PageState.ZERO)
_SHARED = int(PageState.SHARED)
_GUEST_KIND = int(FrameKind.GUEST)
_CACHED = 1                           # vdisk.CacheState.FRAME
_ZERO_PROGRESS_ROUNDS = 3             # reclaim rounds that free nothing before giving up
_BALANCE_ROUNDS = 8                   # tick-end reclaim passes at most (compression frees part of a frame a page)
_GUEST_STREAM_DEFAULT = 0x6F5         # per-guest streams when no seed is given (tests); assembly seeds them


@contextlib.asynccontextmanager
async def _no_callout() -> Any:
    yield


def default_max_balloon_pages(guest_pages: int) -> int:
    return int(guest_pages * MAX_BALLOON_FRACTION_DEFAULT)


class Reclaimed(NamedTuple):
    freed_frames: int
    done_vt_us: float     # when the swap-out writes are on disk


_COUNTER_NAMES: dict[type, tuple[str, ...]] = {}


def _counts_of(counters: Any) -> dict[str, Any]:
    """A counters dataclass as a dict, as ``asdict`` gives it but without its deep copies (every field is a
    number): the snapshot runs every tick, for every guest."""
    names = _COUNTER_NAMES.get(type(counters))
    if names is None:
        names = _COUNTER_NAMES[type(counters)] = tuple(f.name for f in fields(counters))
    return {name: getattr(counters, name) for name in names}


@dataclass(slots=True)
class GuestCounters:
    ept_fault_calls: int = 0
    ept_faults: int = 0              # pages the host had to back
    ept_fault_swapins: int = 0       # ... of which read back from host swap
    swap_out_pages: int = 0
    swap_in_pages: int = 0
    swap_write_pages: int = 0        # swap-outs that wrote (the others were in the swap cache)
    fresh_swapins_avoided: int = 0   # swapped pages a fresh fault took back without a read
    shootdown_pages: int = 0
    balloon_inflated_pages: int = 0
    balloon_deflated_pages: int = 0
    clean_cache_evicted_pages: int = 0     # labels: host-swapped pages the guest had as clean page cache
    clean_cache_swap_write_pages: int = 0  # ... of which written to host swap (a real write)
    clean_cache_swap_read_pages: int = 0   # ... read back from host swap later (a real read)
    grant_pages: int = 0             # frames granted to it at tick starts and refill rounds
    grant_exhausted: int = 0         # requests that found its grant short
    self_retired_iobuf_pages: int = 0   # ... and freed its own completed I/O buffers
    self_dropped_cache_pages: int = 0   # ... dropped its own clean cache
    self_swap_pages: int = 0            # ... host-swapped its own pages
    held_requests: int = 0              # ... and were held for a refill round
    balloon_freed_frames: int = 0    # host frames inflation freed (a never-backed or host-swapped page frees none)
    free_reports: int = 0            # free page reports it sent (virtio-balloon free page reporting)
    pages_reported: int = 0          # gpfns in them
    frames_discarded: int = 0        # host frames those reports freed


@dataclass(slots=True)
class HostCounters:
    ept_fault_calls: int = 0
    ept_faults: int = 0
    ept_fault_spurious_pages: int = 0   # asked for but already backed
    ept_faults_cut: int = 0             # faults of several pages that reached the tick's end (open_tick)
    ept_fault_later_pages: int = 0      # ... the pages they left for the next tick (LATER_TOKEN)
    swap_out_pages: int = 0             # guest pages taken to host swap
    swap_out_cache_pages: int = 0       # disk-cache pages: always 0 (the cache is never host-swapped)
    swap_in_pages: int = 0              # guest pages read back
    swap_in_cache_pages: int = 0        # always 0, as swap_out_cache_pages
    swap_write_pages: int = 0           # swap-outs that wrote; the rest the swap cache held already
    swap_writes_avoided: int = 0        # swap-outs whose content was in the swap cache
    fresh_swapins_avoided: int = 0      # swapped pages a fresh fault took back without a read
    clean_cache_evicted_pages: int = 0     # labels: see the module docstring
    clean_cache_swap_write_pages: int = 0
    clean_cache_swap_read_pages: int = 0
    bad_labels: int = 0                 # shootdown replies whose labels had the wrong length (ignored)
    reclaim_calls: int = 0
    reclaim_frames: int = 0
    direct_reclaims: int = 0            # a request waited for swap-out writes
    shootdowns: int = 0
    shootdown_pages: int = 0
    shootdown_failures: int = 0
    dropped_evictions: int = 0          # frames ballooned or orphaned while their shootdown was pending
    balloon_inflated_pages: int = 0
    balloon_deflated_pages: int = 0
    balloon_freed_frames: int = 0       # host frames freed by inflation (reclaimed by the balloon)
    oom_refusals: int = 0
    early_retired_iobuf_pages: int = 0  # completed I/O buffers freed before the tick under pressure
    pressure_dropped_cache_pages: int = 0  # clean disk-cache pages a short request dropped from its own cache
    grant_pages: int = 0                # frames handed to guests as grants
    grant_exhausted: int = 0            # requests whose guest's grant was short
    self_reclaim_pages: int = 0         # frames guests freed inside their own partitions
    free_reports: int = 0               # free page reports from the guests (see report_free)
    pages_reported: int = 0             # gpfns reported free
    frames_discarded: int = 0           # host frames freed by them (the rest held nothing, or swap)
    reported_slots_dropped: int = 0     # host swap slots (or cache and zero entries) dropped by them


@dataclass(slots=True)
class _Guest:
    guest_id: int
    p2m: P2M
    max_balloon_pages: int
    vdisk: VirtualDisk
    labels: np.ndarray                  # bool per gpfn: clean page cache in the guest when last invalidated
    rng: np.random.Generator             # its own host stream: victims inside its partition
    balloon_pages: int = 0
    counters: GuestCounters = field(default_factory=GuestCounters)
    # What its pages hold (proto.content), from its ContentReport; the empty map until then
    # (everything private, "mixed" compressibility): a guest that never reports still runs.
    content: ContentMap = field(default_factory=ContentMap)
    content_reported: bool = False


class HostMemory:
    def __init__(self, total_frames: int, swap_slots: int, victim: VictimPolicy | str,
                 rng: np.random.Generator, costs: CostModel | None = None,
                 swap_profile: DeviceProfile | str = "ssd", shootdown: Shootdown | None = None, *,
                 observer: MemoryObserver | None = None, callout: Callable[[], Any] | None = None,
                 low_watermark_frames: int | None = None, reclaim_batch_frames: int = 32,
                 cluster_pages: int = CLUSTER_PAGES_DEFAULT, vdisk_cache_max_pages: int | None = None,
                 max_inflight_requests: int = MAX_INFLIGHT_REQUESTS_DEFAULT, cache: CacheConfig | None = None,
                 expected_guests: int = 1, shared_disk: DeviceProfile | str | None = None,
                 tick_us: float = 10_000.0, hold: Hold | None = None,
                 guest_rng: Callable[[int], np.random.Generator] | None = None,
                 states: MemoryStates | None = None, vm_victims: PerVmVictims | None = None,
                 zip: ZipConfig | None = None) -> None:
        self.pool = FramePool(total_frames)
        # Zero-page detection and compression on the way to host swap (hostd.compress); None: off.
        self.zip: ReclaimZip | None = ReclaimZip(zip, self.pool) if zip is not None and zip.enabled else None
        self.swap = HostSwap(swap_slots, swap_profile, expected_guests=expected_guests)
        # [disk] shared: every virtual disk and the swap files on one device, one lane per guest.
        self.shared_device: Device | None = None
        if shared_disk is not None:
            prof = device_profile(shared_disk) if isinstance(shared_disk, str) else shared_disk
            self.shared_device = Device(prof, "shared", expected_guests)
            self.swap.use_device(self.shared_device)
        self.tick_us = float(tick_us)
        self._victim: VictimPolicy = make_victim_policy(victim) if isinstance(victim, str) else victim
        self.rng = rng
        self.costs = costs or CostModel()
        self._shootdown_fn: Shootdown | None = shootdown
        self._placeholders_settled: Callable[[int], Awaitable[None]] | None = None
        self._early_answers: dict[int, dict[int, int]] = {}   # gid -> gpfn -> token (see fill_placeholders)
        self._observer: MemoryObserver | None = observer    # the host's monitors, if any
        self._callout: Callable[[], Any] = callout or _no_callout   # see the module docstring
        self.low_watermark_frames = (max(1, total_frames // 100) if low_watermark_frames is None
                                     else int(low_watermark_frames))
        self.reclaim_batch_frames = max(1, int(reclaim_batch_frames))
        self.cluster_pages = cluster_pages
        if cache is None:
            cache = CacheConfig(max(cluster_pages, total_frames // 16) if vdisk_cache_max_pages is None
                                else int(vdisk_cache_max_pages), CACHE_MODE_DEFAULT)
        self.cache = HostCache(cache, expected_guests)
        self.vdisk_cache_max_pages = cache.max_pages
        self.max_inflight_requests = max_inflight_requests
        self.counters = HostCounters()
        self._guests: dict[int, _Guest] = {}
        self._departed_vdisk: dict[str, float] = {}   # disk counters of guests that are gone
        self._evictions_pending = 0
        self._eviction_settled = asyncio.Event()
        # ESX memory states: with them, the tick-end reclaim runs by state (``balance``); with
        # ``vm_victims`` too, it swaps from the VMs furthest above their allocation targets.
        self.states = states
        self._vm_victims = vm_victims
        self._hold: Hold | None = hold
        self._guest_rng = guest_rng or (lambda gid: np.random.default_rng([_GUEST_STREAM_DEFAULT, gid]))
        self.boundary_free_frames = total_frames    # free at the last tick start, before its grants, less held needs
        self.self_swap_allowed: Callable[[HostMemory, int], bool] = default_self_swap_allowed
        self.sharing: PageSharing | None = None     # page sharing, when the scenario turns it on
        # The end of the tick now running, when the guests park at it (``open_tick``); None: faults unbounded.
        self.fault_gate_us: float | None = None

    def enable_sharing(self, scan_pages_per_s: float) -> PageSharing:
        """Turn page sharing on (``hostd.sharing``), before any guest joins."""
        if self._guests:
            raise RuntimeError("page sharing must be on before guests join")
        self.sharing = PageSharing(self, scan_pages_per_s)
        return self.sharing

    def wire(self, *, shootdown: Shootdown | None = None, observer: MemoryObserver | None = None,
             placeholders_settled: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Connect the collaborators that are built on host memory themselves (once each).

        The shootdown module and the monitors need host memory to exist
        first, so they cannot be constructor arguments; this is the one
        place they are connected, and each only once.
        """
        if shootdown is not None:
            if self._shootdown_fn is not None:
                raise RuntimeError("host memory's shootdown is connected already")
            self._shootdown_fn = shootdown
        if placeholders_settled is not None:
            # gid -> until every deferred shootdown to it is answered (its placeholders hold content again)
            self._placeholders_settled = placeholders_settled
        if observer is not None:
            if self._observer is not None:
                raise RuntimeError("host memory's observer is connected already")
            self._observer = observer

    @property
    def victim(self) -> VictimPolicy:
        return self._victim

    # -- guests ---------------------------------------------------------------

    def add_guest(self, guest_id: int, guest_pages: int, max_balloon_pages: int | None = None, *,
                  disk_blocks: int = 0, disk_profile: DeviceProfile | str = "ssd") -> None:
        if guest_id in self._guests:
            raise DuplicateGuest(guest_id)
        max_balloon = default_max_balloon_pages(guest_pages) if max_balloon_pages is None else int(max_balloon_pages)
        if not 0 <= max_balloon <= guest_pages:
            raise ValueError(f"guest {guest_id}: max_balloon_pages {max_balloon} not in [0, {guest_pages}]")
        self.swap.add_file(guest_id, guest_pages)
        # On a shared device each guest's disk gets its own range of offsets (sequential within it).
        vdisk = VirtualDisk(guest_id, disk_blocks, self.pool, self.costs, device=self.shared_device,
                            profile=disk_profile, offset_base=(guest_id + 1) << 40 if self.shared_device else 0,
                            mode=self.cache.cfg.mode, cluster_pages=self.cluster_pages,
                            allowance_pages=self.cache.initial_allowance(
                                {g: x.vdisk for g, x in self._guests.items()}),
                            max_inflight_requests=self.max_inflight_requests)
        self.cache.set_limits(vdisk, vdisk.allowance_pages)
        self._guests[guest_id] = _Guest(guest_id, P2M(guest_pages), max_balloon, vdisk,
                                        np.zeros(guest_pages, bool), self._guest_rng(guest_id))
        if self.zip is not None:
            self.zip.add_guest(guest_id, guest_pages)
        if self.sharing is not None:
            self.sharing.add_guest(guest_id, guest_pages)
        # In id order, not in the order guests happened to connect: every loop over the
        # guests (retiring I/O buffers frees frames onto the free stack) must be reproducible.
        self._guests = dict(sorted(self._guests.items()))

    def remove_guest(self, guest_id: int) -> None:
        """Release everything a dead guest held: frames, swap slots, disk cache and buffers.

        Frames with a shootdown pending stay busy until it settles, then are freed.
        """
        g = self._guest(guest_id)
        del self._guests[guest_id]
        for k, v in asdict(g.vdisk.counters).items():
            self._departed_vdisk[k] = self._departed_vdisk.get(k, 0) + v
        frames = self.pool.frames_owned_by(guest_id)
        self.pool.free(frames[~self.pool.busy[frames]])
        if self.sharing is not None:
            self.sharing.remove_guest(guest_id, g.p2m.loc[g.p2m.state == _SHARED])
        self.swap.remove_file(guest_id)
        if self.zip is not None:
            self.zip.remove_guest(guest_id)
        self._early_answers.pop(guest_id, None)
        if self.shared_device is not None:
            self.shared_device.remove_lane(guest_id)
        if self._vm_victims is not None:
            self._vm_victims.forget(guest_id)
        if self.states is not None:
            self.states.guest_gone(guest_id)

    def guest_ids(self) -> list[int]:
        return sorted(self._guests)

    def set_content(self, guest_id: int, raw: Any) -> ContentMap:
        """Take the guest's content map (``ContentMap.to_wire`` form); a malformed one is refused
        (``BadBatch``, naming the guest and the entry) and the guest keeps the map it had."""
        g = self._guest(guest_id)
        if g.content_reported:
            # Shared frames were merged under the map it had: another would make their keys a lie.
            raise ContentMapTaken(guest_id)
        try:
            cmap = ContentMap.from_wire(raw)
        except ValueError as exc:
            raise BadBatch(f"guest {guest_id}: malformed content map: {exc}") from None
        g.content = cmap
        g.content_reported = True
        return cmap

    def content(self, guest_id: int) -> ContentMap:
        """The guest's content map (``proto.content``)."""
        return self._guest(guest_id).content

    def p2m(self, guest_id: int) -> P2M:
        """The guest's physical-to-machine map (read it; only host memory changes it)."""
        return self._guest(guest_id).p2m

    def max_balloon_pages(self, guest_id: int) -> int:
        return self._guest(guest_id).max_balloon_pages

    @property
    def evictions_pending(self) -> int:
        """Evictions waiting for their shootdowns: their reserved swap slots have no owner yet."""
        return self._evictions_pending

    def _guest(self, guest_id: int) -> _Guest:
        try:
            return self._guests[guest_id]
        except KeyError:
            raise UnknownGuest(guest_id) from None

    def _same_guest(self, g: _Guest) -> _Guest:
        """After an await: the guest may have died (or died and come back)."""
        if self._guests.get(g.guest_id) is not g:
            raise UnknownGuest(g.guest_id)
        return g

    # -- EPT faults -------------------------------------------------------------

    async def ept_fault(self, guest_id: int, gpfns: np.ndarray | bytes, vt_us: float,
                        fresh: bytes = b"") -> tuple[np.ndarray, float]:
        """Back ``gpfns``; returns their content tokens (0 = fresh zero page) and the completion time.

        A gpfn already backed gets ``KEEP_TOKEN``: its frame was never taken,
        so its content is what the guest last wrote, which the host does not
        know (the token stored when it backed the frame is stale). The same
        gpfn twice is refused (``BAD_FIELD``), as is a ballooned one: the
        guest must deflate it first. ``fresh`` (``np.packbits`` over ``gpfns``, or empty) marks pages the
        guest overwrites whole before reading: one in host swap comes back
        as token 0 without a swap-in read, and its slot's content is dropped.
        The pages are served one after another in the order sent, as one vCPU
        takes them; in a tick with a gate (``open_tick``) those whose turn
        comes after it get ``LATER_TOKEN`` and stay as they were.
        """
        g = self._guest(guest_id)
        one = one_page_number(gpfns, guest_id, "gpfn", g.p2m.guest_pages)
        if one is not None:
            return await self._ept_fault_one(g, one, vt_us, bool(fresh) and self._fresh_bits(g, fresh, 1)[0])
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        n = int(gpfns.size)
        fresh_bits = self._fresh_bits(g, fresh, n) if fresh else np.zeros(n, bool)
        any_fresh = bool(fresh_bits.any())
        # The pages in gpfn order (as they are backed and their frames taken): ``order`` maps them back
        # to their places in the message. gpfns are distinct, so no np.unique and no np.isin is needed.
        order_all = np.argsort(gpfns, kind="stable")
        order = order_all
        uniq = gpfns[order]
        # A SHARED gpfn faults on a write (it is write-protected): the copy-on-write break. It takes
        # a frame like an unbacked page; its content is the guest's (KEEP_TOKEN), copied unless fresh.
        start_us = float(vt_us)
        tried = False
        served = n                   # how many of gpfns, in the order sent, this fault backs (see _fault_fit)
        costs = None                 # the last fit's per-page costs, while no await has changed the books
        while True:
            g = self._same_guest(g)
            gate_us = self._fault_gate(vt_us)
            if gate_us is not None and n > 1:
                served, costs = self._fault_fit(g, gpfns, fresh_bits, start_us, gate_us)
                order = order_all if served == n else np.argsort(gpfns[:served], kind="stable")
                uniq = gpfns[order]
            state = g.p2m.state[uniq]
            self._refuse_ballooned(g, uniq, state)
            backed = state == _FRAME
            if backed.any() and self.pool.busy[g.p2m.loc[uniq[backed]]].any():
                # Its eviction is in flight: the guest may already have dropped it.
                await self._wait_eviction_settled()
                continue
            swapped_u = uniq[state == _SWAPPED]
            if self._placeholders_pending(g, swapped_u):
                costs = None
                if await self._placeholders_wait(g, swapped_u):
                    continue
            need = int(uniq.size - np.count_nonzero(backed))
            if self._room_ok(need, tried, g):
                break
            start_us = max(start_us, await self._make_room(need, vt_us, g))
            tried = True

        chain_us = None
        if gate_us is not None and n > 1:
            # Bounded by the tick's end: the pages in the order sent, one after another, the last one
            # started before the gate; the rest are answered LATER_TOKEN (the guest faults them again).
            if costs is not None:
                costs = (costs[0][:served], costs[1][:served])
            served, chain_us = self._fault_chain(g, gpfns[:served], fresh_bits[:served], start_us, gate_us, costs)
            if served < uniq.size:
                order = np.argsort(gpfns[:served], kind="stable")
                uniq = gpfns[order]
                state = g.p2m.state[uniq]
                backed = state == _FRAME
            self.counters.ept_fault_later_pages += int(n - served)
            self.counters.ept_faults_cut += int(served < n)
        unbacked = ~backed
        todo = uniq[unbacked]
        todo_state = state[unbacked]
        was_swapped = todo_state == _SWAPPED
        was_zip = None
        if self.zip is not None:
            was_zip = (todo_state == _COMPRESSED) | (todo_state == _ZERO)
        is_fresh = np.zeros(todo.size, bool) if was_zip is not None else None
        was_shared = todo_state == _SHARED
        n_cow = int(np.count_nonzero(was_shared))
        cow_from = g.p2m.loc[todo[was_shared]] if n_cow else None
        if any_fresh:
            is_fresh = fresh_bits[order][unbacked]
            dropped = todo[was_swapped & is_fresh]
            if dropped.size:
                # The guest overwrites it whole: no read; the old content goes.
                self.swap.drop(g.p2m.loc[dropped])
                g.labels[dropped] = False
                self.counters.fresh_swapins_avoided += int(dropped.size)
                g.counters.fresh_swapins_avoided += int(dropped.size)
                self.swap.fresh_drops += int(dropped.size)
            was_swapped &= ~is_fresh
        swapped = todo[was_swapped]
        slots = g.p2m.loc[swapped]
        tokens = np.zeros(todo.size, np.uint64)
        if swapped.size:
            tokens[was_swapped] = self.swap.swap_in(slots)
        zip_us = 0.0
        if was_zip is not None and was_zip.any():
            # Decompressed (CPU, no I/O) or a fresh zero page; a fresh one drops its old swap-cache copy too.
            zp = todo[was_zip]
            zfresh = is_fresh[was_zip]  # type: ignore[index]
            tokens[was_zip], zip_us = self.zip.take_out(guest_id, zp, todo_state[was_zip], zfresh)  # type: ignore[union-attr]
            if zfresh.any():
                self.swap.drop(self.swap.slots_of(guest_id, zp[zfresh]))
        if swapped.size:
            self._count_labelled_reads(g, swapped)
            if self._observer is not None:
                self._observer.guest_pages_swapped_in(guest_id, swapped, tokens[was_swapped])
        frames = self.pool.alloc(todo.size, _GUEST_KIND, guest_id, todo, tokens)
        self.pool.accessed[frames] = True          # the guest is touching it right now
        self.pool.pinned[frames] = g.p2m.pinned[todo]
        g.p2m.set(todo, _FRAME, frames)  # type: ignore[arg-type]
        n_fresh = 0
        if n_cow:
            n_fresh = int(np.count_nonzero(is_fresh[was_shared])) if any_fresh else 0  # type: ignore[index]
            assert self.sharing is not None
            self.sharing.cow(guest_id, cow_from, n_fresh)  # type: ignore[arg-type]

        if start_us > vt_us:
            self.counters.direct_reclaims += 1
        if chain_us is not None:
            done_us = chain_us
        else:
            done_us = start_us
            if swapped.size:
                # One vCPU faults its pages one at a time, however many one message carries.
                done_us = self.swap.disk.submit_serial(guest_id, start_us, slots)
            done_us += self.costs.ept_fault_us * uniq.size + zip_us
            if n_cow:
                done_us += self.costs.page_copy_us * (n_cow - n_fresh)

        c, gc = self.counters, g.counters
        c.ept_fault_calls += 1
        gc.ept_fault_calls += 1
        c.ept_faults += int(todo.size - n_cow)
        gc.ept_faults += int(todo.size - n_cow)
        c.ept_fault_spurious_pages += int(uniq.size - todo.size)
        c.swap_in_pages += int(swapped.size)
        gc.swap_in_pages += int(swapped.size)
        gc.ept_fault_swapins += int(swapped.size)
        if served < n:
            tokens = np.full(n, LATER_TOKEN, np.uint64)
            tokens[:served] = self.pool.token[g.p2m.loc[gpfns[:served]]]
        else:
            tokens = self.pool.token[g.p2m.loc[gpfns]]
        # Backed already: the guest holds their content, not us; so were the shared ones, now copied.
        if todo.size != uniq.size:
            tokens[order[backed]] = KEEP_TOKEN
        if n_cow:
            tokens[order[unbacked][was_shared]] = KEEP_TOKEN
        return tokens, done_us

    async def _ept_fault_one(self, g: _Guest, gpfn: int, vt_us: float,
                             fresh: bool = False) -> tuple[np.ndarray, float]:
        """``ept_fault`` of one gpfn, in scalars: the same books, the same frame, the same times."""
        start_us = float(vt_us)
        tried = False
        while True:
            g = self._same_guest(g)
            p2m = g.p2m
            state = p2m.state[gpfn]
            if state == _BALLOONED:
                raise InvalidState(g.guest_id, "gpfn", gpfn, "BALLOONED", "deflate it before touching it")
            backed = state == _FRAME
            if backed and self.pool.busy[p2m.loc[gpfn]]:
                # Its eviction is in flight: the guest may already have dropped it.
                await self._wait_eviction_settled()
                continue
            if state == _SWAPPED and await self._placeholders_wait(g, np.array((gpfn,), np.int64)):
                continue
            need = 0 if backed else 1
            if self._room_ok(need, tried, g):
                break
            start_us = max(start_us, await self._make_room(need, vt_us, g))
            tried = True

        swapped = state == _SWAPPED
        zip_us = 0.0
        shared_from = int(p2m.loc[gpfn]) if state == _SHARED else -1
        if not backed:
            token = 0
            if state == _COMPRESSED or state == _ZERO:
                gp = np.array((gpfn,), np.int64)
                toks, zip_us = self.zip.take_out(g.guest_id, gp, np.array((state,), np.uint8),  # type: ignore[union-attr]
                                                 np.array((fresh,), bool))
                token = int(toks[0])
                if fresh:
                    self.swap.drop_one(int(self.swap.slots_of(g.guest_id, gp)[0]))
            if swapped and fresh:
                # The guest overwrites it whole: no read; the old content goes.
                self.swap.drop_one(int(p2m.loc[gpfn]))
                g.labels[gpfn] = False
                self.counters.fresh_swapins_avoided += 1
                g.counters.fresh_swapins_avoided += 1
                self.swap.fresh_drops += 1
                swapped = False
            if swapped:
                slot = int(p2m.loc[gpfn])
                token = self.swap.swap_in_one(slot)
                if g.labels[gpfn]:
                    self._count_labelled_reads(g, np.array((gpfn,), np.int64))
                if self._observer is not None:
                    self._observer.guest_pages_swapped_in(g.guest_id, np.array((gpfn,), np.int64),
                                                          np.array((token,), np.uint64))
            f = self.pool.alloc_one(_GUEST_KIND, g.guest_id, gpfn, token)
            if f < 0:
                raise InvariantViolation(f"guest {g.guest_id}: host memory made room for too few frames")
            self.pool.accessed[f] = True          # the guest is touching it right now
            self.pool.pinned[f] = p2m.pinned[gpfn]
            p2m.state[gpfn] = _FRAME
            p2m.loc[gpfn] = f
            if shared_from >= 0:                  # the copy-on-write break (see ept_fault)
                assert self.sharing is not None
                self.sharing.cow(g.guest_id, np.array((shared_from,), np.int64), int(fresh))

        if start_us > vt_us:
            self.counters.direct_reclaims += 1
        done_us = start_us
        if swapped:
            done_us = self.swap.disk.submit(g.guest_id, start_us, 1, write=False, offset=slot)
        done_us += self.costs.ept_fault_us * 1 + zip_us
        if shared_from >= 0 and not fresh:
            done_us += self.costs.page_copy_us

        c, gc = self.counters, g.counters
        c.ept_fault_calls += 1
        gc.ept_fault_calls += 1
        if backed:
            c.ept_fault_spurious_pages += 1
        elif shared_from < 0:
            c.ept_faults += 1
            gc.ept_faults += 1
        if swapped:
            c.swap_in_pages += 1
            gc.swap_in_pages += 1
            gc.ept_fault_swapins += 1
        if backed or shared_from >= 0:   # the guest holds its content, not us (see ept_fault)
            return np.array((KEEP_TOKEN,), np.uint64), done_us
        f = int(p2m.loc[gpfn])
        return self.pool.token[f:f + 1].copy(), done_us

    def _placeholders_pending(self, g: _Guest, swapped_gpfns: np.ndarray) -> bool:
        """Whether a slot of these (SWAPPED) gpfns holds a deferred shootdown's placeholder."""
        return bool(swapped_gpfns.size) and bool((self.swap.token[g.p2m.loc[swapped_gpfns]] == PENDING_TOKEN).any())

    async def _placeholders_wait(self, g: _Guest, swapped_gpfns: np.ndarray) -> bool:
        """Wait if a slot of these gpfns still holds a deferred shootdown's placeholder; True if it waited.

        The fault handler lets deferred shootdowns settle before it starts,
        but one can begin while this fault waits for room (a silent guest's
        memory is reclaimed at tick ends): a placeholder must never be handed
        back as content, so the check is made here, where the slot is read.
        """
        if not self._placeholders_pending(g, swapped_gpfns):
            return False
        if self._placeholders_settled is None:
            raise InvariantViolation(f"guest {g.guest_id}: a swap slot holds a placeholder and nothing settles it")
        await self._placeholders_settled(g.guest_id)
        if np.any(self.swap.token[g.p2m.loc[swapped_gpfns[g.p2m.state[swapped_gpfns] == PageState.SWAPPED]]]
                  == PENDING_TOKEN):
            # Settled, but the answer did not fill it (the guest failed the shootdown): the page is lost;
            # hand it over as it is and let the guest's check say so, rather than wait for ever.
            return False
        return True

    # -- faults bounded by the tick's end ------------------------------------------

    def open_tick(self, tick_end_us: float | None) -> None:
        """The tick now running ends at ``tick_end_us``, where the guests park (None: they do not).

        A fault of several pages is then served as the vCPU would take them,
        one after another in the order sent, and stops at the gate: every page
        whose service starts before ``tick_end_us`` is backed (the last may
        end past it: the one request in flight), the rest are answered
        ``LATER_TOKEN`` and the guest faults them again in the next tick. One
        message of hundreds of host-swapped pages used to read them all, one
        after another, 10-40 virtual ms past the tick's end.
        """
        self.fault_gate_us = None if tick_end_us is None else float(tick_end_us)

    def _fault_gate(self, vt_us: float) -> float | None:
        """The gate a fault sent at ``vt_us`` stops at; None: unbounded (no ticks, or sent past the gate:
        the run's last tick lets a fault in flight finish whole)."""
        gate = self.fault_gate_us
        return gate if gate is not None and vt_us < gate else None

    def _fault_costs(self, g: _Guest, gpfns: np.ndarray, fresh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per page of a fault, in the order sent: its swap slot when it needs a read (else -1), and the
        CPU time it costs on top (the exit, a decompression, a copy-on-write copy)."""
        state = g.p2m.state[gpfns]
        kept = ~fresh
        slot = np.where((state == _SWAPPED) & kept, g.p2m.loc[gpfns], -1)
        extra = np.full(gpfns.size, self.costs.ept_fault_us)
        if self.zip is not None:
            extra[(state == _COMPRESSED) & kept] += self.zip.cfg.decompress_page_us
        shared = (state == _SHARED) & kept
        if shared.any():
            extra[shared] += self.costs.page_copy_us
        return slot, extra

    def _fault_fit(self, g: _Guest, gpfns: np.ndarray, fresh: np.ndarray, start_us: float,
                   gate_us: float) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        """How many of ``gpfns`` can start before the gate: at least as many as ``_fault_chain`` will serve.

        Each read costs its service time at the lane's speed with no wait
        for a channel, so the estimate never falls short; the fault makes
        room for these only, not for pages the next tick will fault. Also
        returns ``_fault_costs``, which the chain reuses while the books
        have not changed.
        """
        slot, extra = self._fault_costs(g, gpfns, fresh)
        io = slot >= 0
        cost = extra
        if io.any():
            cost = extra.copy()
            cost[io] += self.swap.disk.chain_read_us(g.guest_id, slot[io])
        starts = np.empty(cost.size)
        starts[0] = 0.0
        np.cumsum(cost[:-1], out=starts[1:])
        starts += start_us
        return max(1, int(np.searchsorted(starts, gate_us, side="left"))), (slot, extra)

    def _fault_chain(self, g: _Guest, gpfns: np.ndarray, fresh: np.ndarray, start_us: float,
                     gate_us: float, costs: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, float]:
        """Serve ``gpfns`` one after another from ``start_us``, up to the gate: (pages served, done_vt_us).

        The first page is always served (a fault makes progress); a later one
        only if its turn comes before ``gate_us``. Reads go on the guest's
        lane of the swap device one at a time, each after the page before.
        Loops over the pages that read only; the others advance by their CPU
        time, found in a cumulative sum.
        """
        slot, extra = self._fault_costs(g, gpfns, fresh) if costs is None else costs
        n = int(gpfns.size)
        cum = np.empty(n + 1)
        cum[0] = 0.0
        np.cumsum(extra, out=cum[1:])
        disk, gid = self.swap.disk, g.guest_id
        t = float(start_us)
        i = 0
        for j in [*np.flatnonzero(slot >= 0).tolist(), n]:
            if j > i:     # pages i .. j-1 read nothing: page p starts at t + cum[p] - cum[i]
                starts = t + (cum[i:j] - cum[i])
                first = 1 if i == 0 else 0
                late = np.flatnonzero(starts[first:] >= gate_us)
                if late.size:
                    k = i + first + int(late[0])
                    return k, t + float(cum[k] - cum[i])
                t += float(cum[j] - cum[i])
            if j == n:
                break
            if j > 0 and t >= gate_us:
                return j, t
            t = disk.submit(gid, t, 1, write=False, offset=int(slot[j])) + float(extra[j])
            i = j + 1
        return n, t

    def _fresh_bits(self, g: _Guest, fresh: bytes, n: int) -> np.ndarray:
        raw = np.frombuffer(fresh, np.uint8)
        if raw.size != -(-n // 8):
            raise BadBatch(f"guest {g.guest_id}: fresh bits have {raw.size} bytes for {n} gpfns, "
                           f"expected {-(-n // 8)} (or none)")
        return np.unpackbits(raw, count=n).astype(bool)

    def _refuse_ballooned(self, g: _Guest, gpfns: np.ndarray, state: np.ndarray) -> None:
        ballooned = state == _BALLOONED
        if ballooned.any():
            raise InvalidState(g.guest_id, "gpfn", int(gpfns[np.flatnonzero(ballooned)[0]]), "BALLOONED",
                               "deflate it before touching it")

    # -- reclaim (host swapping) -------------------------------------------------

    def _room_ok(self, need: int, tried: bool, g: _Guest | None = None) -> bool:
        """Can an allocation of ``need`` frames go ahead now?

        Every allocation first tries to keep ``low_watermark_frames`` free
        beyond what it takes (``tried`` says it did); it only has to have
        ``need``. Inside a partition, the guest's grant must hold ``need``.
        """
        if need == 0:
            return True
        if g is not None and self.pool.has_grant(g.guest_id):
            return self.pool.granted(g.guest_id) >= need
        free = self.pool.free_frames
        return free >= need and (tried or free >= need + self.low_watermark_frames)

    async def _make_room(self, need: int, vt_us: float, g: _Guest | None = None) -> float:
        """Reclaim towards ``need`` + the low watermark free frames.

        Returns when the allocation may go ahead in virtual time: ``vt_us``
        if the pool already had ``need`` frames (the refill of the watermark
        costs the vCPU nothing, like a woken kswapd), else when the swap-out
        writes it had to wait for are done (direct reclaim). Raises
        ``HostOutOfMemory`` when fewer than ``need`` can be had and no one
        else's eviction is pending.
        """
        if g is not None and self.pool.has_grant(g.guest_id):
            return await self._make_room_own(g, need, vt_us)
        fruitless = 0
        done_us = float(vt_us)
        must_wait = self.pool.free_frames < need
        # I/O buffers of requests complete by now are only waiting for the
        # tick to free them: free them rather than swap guest pages for them.
        for other in self._guests.values():
            self.counters.early_retired_iobuf_pages += other.vdisk.retire(vt_us)
        target = min(need + self.low_watermark_frames, self.pool.total_frames)
        if g is not None and self.pool.free_frames < target:
            # The requester's own clean disk cache goes before anyone's pages are host-swapped.
            self.counters.pressure_dropped_cache_pages += g.vdisk.drop_clean(target - self.pool.free_frames)
        while self.pool.free_frames < target:
            want = max(target - self.pool.free_frames, self.reclaim_batch_frames)
            got = await self.reclaim(want, vt_us, self._state_after(need))
            done_us = max(done_us, got.done_vt_us)
            if got.freed_frames:
                fruitless = 0
                continue
            if self.pool.free_frames >= need:
                break            # the watermark is out of reach, the allocation is not
            if self._evictions_pending:
                await self._wait_eviction_settled()
                continue
            fruitless += 1
            if fruitless >= _ZERO_PROGRESS_ROUNDS:
                self.counters.oom_refusals += 1
                raise HostOutOfMemory(need, self.pool.free_frames,
                                      "no evictable frame (all pinned, busy, disk cache or I/O buffers)")
        if self.pool.free_frames < need and not self._evictions_pending:
            self.counters.oom_refusals += 1
            raise HostOutOfMemory(need, self.pool.free_frames, f"the host has only {self.pool.total_frames} frames")
        return done_us if must_wait else float(vt_us)

    async def _make_room_own(self, g: _Guest, need: int, vt_us: float) -> float:
        """Make ``need`` frames available in ``g``'s grant from ``g``'s own partition (module docstring).

        Returns when the allocation may go ahead in virtual time: ``vt_us``,
        or later when it waited for its own swap-out writes, or the next
        tick's start when it was held across the boundary.
        """
        pool, gid, gc = self.pool, g.guest_id, g.counters
        gc.grant_exhausted += 1
        self.counters.grant_exhausted += 1
        start_us = float(vt_us)
        fruitless = 0
        while pool.has_grant(gid) and pool.granted(gid) < need:
            short = need - pool.granted(gid)
            freed = g.vdisk.retire(vt_us)               # 1. its own finished I/O buffers
            gc.self_retired_iobuf_pages += freed
            self.counters.early_retired_iobuf_pages += freed
            if freed:
                self.counters.self_reclaim_pages += freed
                continue
            freed = g.vdisk.drop_clean(short)           # 2. its own clean cache, least recently used first
            if freed:
                gc.self_dropped_cache_pages += freed
                self.counters.pressure_dropped_cache_pages += freed
                self.counters.self_reclaim_pages += freed
                continue
            if self.self_swap_allowed(self, gid):       # 3. host swapping of its own pages
                got = await self._reclaim_own(g, max(short, self.reclaim_batch_frames), vt_us)
                g = self._same_guest(g)
                if got.freed_frames:
                    start_us = max(start_us, got.done_vt_us)
                    fruitless = 0
                    continue
                fruitless += 1
                if fruitless < _ZERO_PROGRESS_ROUNDS and np.any(pool.busy[g.p2m.loc[g.p2m.state == PageState.FRAME]]):
                    await self._wait_eviction_settled()
                    continue
            if self._hold is None:                      # 4. held until a refill round or the next tick
                self.counters.oom_refusals += 1
                raise HostOutOfMemory(need, pool.granted(gid), f"guest {gid}'s grant is spent and nothing of its "
                                      "own can be reclaimed")
            gc.held_requests += 1
            start_us = max(start_us, await self._hold(gid, need, vt_us))
            g = self._same_guest(g)
            vt_us = max(float(vt_us), start_us)
        return start_us

    async def _reclaim_own(self, g: _Guest, n_frames: int, vt_us: float) -> Reclaimed:
        """Host-swap up to ``n_frames`` of ``g``'s own pages: random victims from ``g``'s own stream."""
        self.counters.reclaim_calls += 1
        p2m = g.p2m
        frames = p2m.loc[p2m.state == PageState.FRAME]
        pool = self.pool
        frames = frames[~pool.pinned[frames] & ~pool.busy[frames]]
        n = min(int(n_frames), int(frames.size))
        if n <= 0:
            return Reclaimed(0, float(vt_us))
        victims = g.rng.choice(frames, size=n, replace=False).astype(np.int64)
        # Compression runs on every host swap-out (RECLAIM_BY_STATE): a guest whose grant ran out is, for its
        # own partition, out of memory -- ESX's low state (MemoryStates.may_self_swap) -- whatever the host's.
        freed, done_us = await self._evict_guest_frames(victims, vt_us, compress=True)
        self.counters.reclaim_frames += freed
        self.counters.self_reclaim_pages += freed
        g.counters.self_swap_pages += freed
        if self.states is not None:
            self.states.count_swap_out(freed, self.states.state)
        return Reclaimed(freed, done_us)

    def count_grant(self, guest_id: int, frames: int) -> None:
        """The discipline granted ``frames`` to the guest (its books for the metrics)."""
        self.counters.grant_pages += frames
        g = self._guests.get(guest_id)
        if g is not None:
            g.counters.grant_pages += frames

    def _state_after(self, need: int) -> MemState | None:
        """The memory state an allocation of ``need`` frames would leave the host in (None: no states).

        In-tick swapping is counted under it: the allocation is what drives
        free memory below the watermark (the low state's threshold, with states).
        """
        if self.states is None:
            return None
        return state_of(max(self.pool.free_frames - need, 0), self.states.min_free_frames)

    async def reclaim(self, n_frames: int, vt_us: float, state: MemState | None = None) -> Reclaimed:
        """Host swapping of up to ``n_frames``: the victim policy picks, blind.

        Victims are grouped by guest; each guest gets one shootdown for its
        gpfns and the tokens it returns go to its swap file (a write unless
        the swap cache holds that content already). All shootdowns of one
        call run concurrently; results are applied in guest-id order, so the
        outcome does not depend on who answers first.
        """
        n = int(n_frames)        # every guest page has its slot in its own swap file: swap is never short
        victims = self._victim.pick(self.pool, n, self.rng) if n > 0 else np.zeros(0, np.int64)
        return await self.reclaim_victims(victims, vt_us, state)

    async def reclaim_victims(self, victims: np.ndarray, vt_us: float, state: MemState | None = None) -> Reclaimed:
        """Host-swap these frames (evictable guest frames, distinct: never disk cache).

        ``state`` is the memory state the swapping is counted under
        (``MemoryStates.swap_out_pages_by_state``); None: the state that the
        free frames right now put the host in.
        """
        self.counters.reclaim_calls += 1
        victims = np.asarray(victims, np.int64)
        if victims.size == 0:
            return Reclaimed(0, float(vt_us))
        if np.any(self.pool.kind[victims] != FrameKind.GUEST):
            raise InvariantViolation("a victim policy picked a frame that is not a guest page")
        if self.states is not None and state is None:
            state = state_of(self.pool.free_frames, self.states.min_free_frames)
        # the memory states' table decides whether pages on their way to swap are compressed (hard, low)
        freed, done_us = await self._evict_guest_frames(victims, vt_us,
                                                        compress=state is None or may_compress(state))
        self.counters.reclaim_frames += freed
        if self.states is not None:
            self.states.count_swap_out(freed, state)
        return Reclaimed(freed, done_us)

    async def _evict_guest_frames(self, frames: np.ndarray, vt_us: float,
                                  compress: bool = True) -> tuple[int, float]:
        """Shoot the frames down and take their pages; ``compress``: the memory state lets compression run."""
        if self._shootdown_fn is None:
            raise InvariantViolation("host memory has no shootdown callback: cannot evict guest frames")
        owners = self.pool.owner_guest[frames]
        groups = [(gid, owners == gid) for gid in np.unique(owners).tolist()]
        self.pool.busy[frames] = True
        self._evictions_pending += 1
        results: list[Any] = [None] * len(groups)
        try:
            async with self._callout():
                results = await asyncio.gather(
                    *(self._shootdown(gid, self.pool.owner_index[frames[mine]]) for gid, mine in groups),
                    return_exceptions=True)
        finally:
            # Also on cancellation: un-busy what was not evicted.
            freed, done_us = self._settle_evictions(groups, results, frames, vt_us, compress)
            self._evictions_pending -= 1
            self._eviction_settled.set()
            self._eviction_settled = asyncio.Event()
        return freed, done_us

    async def _shootdown(self, guest_id: int, gpfns: np.ndarray) -> np.ndarray:
        assert self._shootdown_fn is not None
        self.counters.shootdowns += 1
        self.counters.shootdown_pages += int(gpfns.size)
        tokens = await self._shootdown_fn(guest_id, gpfns.astype(np.uint64))
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size != gpfns.size:
            raise BadBatch(f"guest {guest_id}: shootdown of {gpfns.size} gpfns returned {tokens.size} tokens")
        return tokens.astype(np.uint64, copy=False)

    def _settle_evictions(self, groups: list[tuple[int, np.ndarray]], results: list[Any],
                          frames: np.ndarray, vt_us: float, compress: bool = True) -> tuple[int, float]:
        freed = 0
        done_us = float(vt_us)
        for (gid, mine), result in zip(groups, results):
            g_frames = frames[mine]
            gpfns = self.pool.owner_index[g_frames]
            g = self._guests.get(gid)
            # Still the guest's mapping? Balloon inflation or guest death while
            # the shootdown was pending leaves the frame an orphan: drop it.
            live = np.zeros(g_frames.size, bool)
            if g is not None:
                live = (g.p2m.state[gpfns] == PageState.FRAME) & (g.p2m.loc[gpfns] == g_frames)
            if isinstance(result, np.ndarray):
                n_live = int(np.count_nonzero(live))
                zipped = False
                if g is not None and n_live:
                    out = gpfns[live]
                    tokens = result[live]
                    early = self._early_answers.get(gid)
                    if early:
                        tokens = tokens.copy()
                        for i in np.flatnonzero(tokens == PENDING_TOKEN).tolist():
                            tokens[i] = early.pop(int(out[i]), PENDING_TOKEN)
                    to_swap = np.ones(out.size, bool)
                    if self.zip is not None:
                        # Zero pages dropped, compressible ones into the VM's cache (hostd.compress):
                        # the request waits for that CPU work as it would for its swap writes.
                        taken, cpu = self.zip.absorb(gid, g.p2m, out, tokens, self._content(g), compress)
                        to_swap = ~taken
                        zipped = bool(np.any(taken))
                        done_us = max(done_us, vt_us + cpu)
                    write = np.zeros(out.size, bool)
                    if np.any(to_swap):
                        write[to_swap], w_done = self._to_swap(g, out[to_swap], tokens[to_swap], vt_us)
                        done_us = max(done_us, w_done)
                    self._count_evicted(g, out, write, n_live, int(np.count_nonzero(to_swap)))
                if g is not None:
                    g.counters.shootdown_pages += int(gpfns.size)
                self.pool.free(g_frames)
                freed += int(g_frames.size)
                if zipped and g is not None:
                    # The cache's frames come out of the frames just freed (the same partition).
                    before = self.pool.free_frames
                    spill, spill_tok, cpu = self.zip.fit(gid, g.p2m)   # type: ignore[union-attr]
                    freed -= before - self.pool.free_frames
                    if spill.size:
                        write, w_done = self._to_swap(g, spill, spill_tok, vt_us + cpu)
                        done_us = max(done_us, w_done)
                        self._count_spilled(g, spill, write)
                self.counters.swap_out_pages += n_live
                self.counters.dropped_evictions += int(g_frames.size) - n_live
            else:
                # No answer (guest gone, timed out, bad reply, or we were
                # cancelled): the mapping stays; orphans can go.
                if result is not None or g is None:
                    self.counters.shootdown_failures += 1
                early = self._early_answers.get(gid)
                for gp in (gpfns.tolist() if early else ()):
                    early.pop(gp, None)      # an answer to a failed eviction must not fill a later one
                self.pool.busy[g_frames[live]] = False
                self.pool.free(g_frames[~live])
                self.counters.dropped_evictions += int(np.count_nonzero(~live))
                freed += int(np.count_nonzero(~live))
        return freed, done_us

    def _content(self, g: "_Guest") -> ContentMap:
        """The guest's content map (its ContentReport; the empty map until then)."""
        return g.content

    def _to_swap(self, g: "_Guest", gpfns: np.ndarray, tokens: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        """Pages go to their slots in the guest's swap file: SWAPPED; returns the write mask and when written."""
        slots = self.swap.slots_of(g.guest_id, gpfns)
        write = self.swap.store(slots, tokens)
        g.p2m.set(gpfns, PageState.SWAPPED, slots)
        n_write = int(np.count_nonzero(write))
        done_us = float(vt_us)
        if n_write:
            # One request: the slots of one guest's victims, in gpfn order.
            done_us = self.swap.disk.submit(g.guest_id, vt_us, n_write, write=True, offset=int(slots[write][0]))
        return write, done_us

    def _count_spilled(self, g: "_Guest", gpfns: np.ndarray, write: np.ndarray) -> None:
        """The compression cache's oldest pages went to swap: real writes (labelled ones counted as such)."""
        n_write = int(np.count_nonzero(write))
        c, gc = self.counters, g.counters
        gc.swap_write_pages += n_write
        c.swap_write_pages += n_write
        c.swap_writes_avoided += int(gpfns.size) - n_write
        labelled = g.labels[gpfns] & write
        if np.any(labelled):
            n_lab = int(np.count_nonzero(labelled))
            c.clean_cache_swap_write_pages += n_lab
            gc.clean_cache_swap_write_pages += n_lab

    def _count_evicted(self, g: "_Guest", gpfns: np.ndarray, write: np.ndarray, n_live: int,
                       n_to_swap: int | None = None) -> None:
        """``n_to_swap``: the pages that went to swap (the rest were dropped as zero or compressed)."""
        n_write = int(np.count_nonzero(write))
        c, gc = self.counters, g.counters
        gc.swap_out_pages += n_live
        gc.swap_write_pages += n_write
        c.swap_write_pages += n_write
        c.swap_writes_avoided += (n_live if n_to_swap is None else n_to_swap) - n_write
        labelled = g.labels[gpfns]
        if np.any(labelled):
            n_lab = int(np.count_nonzero(labelled))
            n_lab_w = int(np.count_nonzero(labelled & write))
            c.clean_cache_evicted_pages += n_lab
            gc.clean_cache_evicted_pages += n_lab
            c.clean_cache_swap_write_pages += n_lab_w
            gc.clean_cache_swap_write_pages += n_lab_w

    def _count_labelled_reads(self, g: "_Guest", gpfns: np.ndarray) -> None:
        """Swap-in reads of pages labelled clean cache when they went out (the label is used up)."""
        labelled = gpfns[g.labels[gpfns]]
        if labelled.size:
            self.counters.clean_cache_swap_read_pages += int(labelled.size)
            g.counters.clean_cache_swap_read_pages += int(labelled.size)
            g.labels[labelled] = False

    def record_labels(self, guest_id: int, gpfns: np.ndarray, labels: bytes) -> bool:
        """A shootdown reply's labels (``np.packbits`` over ``gpfns``; set = clean page cache in the guest).

        Instrumentation only (see the module docstring). Empty labels mean
        none set. Labels of the wrong length are counted and ignored: a
        guest's oddity must not fail an eviction. Returns whether they were taken.
        """
        g = self._guests.get(guest_id)
        if g is None:
            return False
        gpfns = np.asarray(gpfns, np.int64)
        if gpfns.size == 0 or (gpfns.size and (gpfns.min() < 0 or gpfns.max() >= g.p2m.guest_pages)):
            return False
        if not labels:
            g.labels[gpfns] = False
            return True
        raw = np.frombuffer(labels, np.uint8)
        if raw.size != -(-gpfns.size // 8):
            self.counters.bad_labels += 1
            return False
        g.labels[gpfns] = np.unpackbits(raw, count=gpfns.size).astype(bool)
        return True

    async def _wait_eviction_settled(self) -> None:
        async with self._callout():
            await self._eviction_settled.wait()

    async def balance(self, vt_us: float, extra_frames: int = 0) -> Reclaimed:
        """The tick-end reclaim; charged to no vCPU.

        Without memory states (kswapd): bring free frames up to twice the
        low watermark, blind. With them (ESX, ``hostd.memstate``): only in
        the hard and low states, host-swap until free frames reach the soft
        threshold, from the VMs furthest above their allocation targets
        (random victims within each VM, from its own stream), or blind over
        the whole host when there are no per-VM victims
        (``[host] victim_scope = "global"``). ``extra_frames``: frames
        requests held across the boundary still need, on top (in any state:
        they must be served at the next tick's start).

        With compression on, a page taken frees only part of a frame (the
        cache keeps its compressed bytes), so one pass falls short of the
        goal: the reclaim goes on, at most ``_BALANCE_ROUNDS`` passes, while
        it is short and each pass freed something. (Each compressed page
        frees at least half a frame, so the shortfall halves every pass.)
        """
        got = await self._balance_once(vt_us, extra_frames)
        if self.zip is None:
            return got
        freed, done = got.freed_frames, got.done_vt_us
        for _ in range(_BALANCE_ROUNDS - 1):
            if got.freed_frames <= 0:
                break
            got = await self._balance_once(vt_us, extra_frames)
            freed, done = freed + got.freed_frames, max(done, got.done_vt_us)
        return Reclaimed(freed, done)

    async def _balance_once(self, vt_us: float, extra_frames: int) -> Reclaimed:
        extra = max(0, int(extra_frames))
        if self.states is None:
            high = min(2 * self.low_watermark_frames + extra, self.pool.total_frames)
            want = high - self.pool.free_frames
            if want <= 0:
                return Reclaimed(0, float(vt_us))
            return await self.reclaim(want, vt_us)
        state = self.states.state
        want = max(self.states.swap_goal_frames(self.pool.free_frames - extra), extra - self.pool.free_frames)
        if want <= 0:
            return Reclaimed(0, float(vt_us))
        if self._vm_victims is None:
            return await self.reclaim(want, vt_us, state)
        plan = plan_boundary_swap(min(want, self.swap.free_slots), self.vm_allocations(),
                                  {gid: self._vm_victims.evictable_count(self.pool, g.p2m)
                                   for gid, g in self._guests.items()})
        picked = [self._vm_victims.pick(self.pool, self._guests[gid].p2m, gid, n)
                  for gid, n in sorted(plan.items()) if n > 0]
        victims = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        return await self.reclaim_victims(victims, vt_us, state)

    def consumed_frames(self, guest_id: int) -> int:
        """Host frames the VM consumes: those backing its gpfns and its compression cache's (ESX counts both)."""
        g = self._guest(guest_id)
        n = int(np.count_nonzero(g.p2m.state == _FRAME))
        return n + (int(self.zip.frames_of(guest_id).size) if self.zip is not None else 0)

    def vm_allocations(self) -> list[VmAllocation]:
        """Every guest's host frames against its allocation target (its consumption when it has none yet)."""
        out = []
        for gid, g in self._guests.items():
            consumed = self.consumed_frames(gid)
            a = self.states.allocation(gid, consumed) if self.states is not None else None
            out.append(a if a is not None else VmAllocation(gid, consumed, consumed))
        return out

    # -- balloon -------------------------------------------------------------------

    def balloon_inflate(self, guest_id: int, gpfns: np.ndarray | bytes) -> int:
        """The guest gives ``gpfns`` to the host: free their frames/slots now; returns frames freed.

        Refused as a whole (nothing changes) on a bad, duplicate or already
        ballooned gpfn, or beyond ``max_balloon_pages``.
        """
        g = self._guest(guest_id)
        gpfns, state = self._unballooned(g, gpfns, "already BALLOONED", "inflate each page once")
        if g.balloon_pages + gpfns.size > g.max_balloon_pages:
            raise BalloonLimit(guest_id, g.balloon_pages, int(gpfns.size), g.max_balloon_pages)
        n_freed = self._release(g, gpfns, state)
        g.p2m.set(gpfns, PageState.BALLOONED)
        g.p2m.pinned[gpfns] = False
        g.balloon_pages += int(gpfns.size)
        g.counters.balloon_inflated_pages += int(gpfns.size)
        self.counters.balloon_inflated_pages += int(gpfns.size)
        g.counters.balloon_freed_frames += n_freed
        self.counters.balloon_freed_frames += n_freed
        return n_freed

    def _unballooned(self, g: _Guest, gpfns: np.ndarray | bytes, found: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
        """``gpfns`` checked (in range, each once, none in the balloon) and their p2m states."""
        gpfns = as_page_numbers(gpfns, g.guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        state = g.p2m.state[gpfns]
        if np.any(state == PageState.BALLOONED):
            raise InvalidState(g.guest_id, "gpfn", int(gpfns[np.flatnonzero(state == PageState.BALLOONED)[0]]),
                               found, hint)
        return gpfns, state

    def _release(self, g: _Guest, gpfns: np.ndarray, state: np.ndarray) -> int:
        """Whatever holds these gpfns' content goes (the guest gave them away); returns frames freed.

        Their frames (a busy one's shootdown is pending: it is freed when that
        settles), swap slots and swap-cache copies, compressed and zero copies.
        The caller sets their new p2m state.
        """
        frames = g.p2m.loc[gpfns[state == PageState.FRAME]]
        frames = frames[~self.pool.busy[frames]]
        self.pool.free(frames)
        shared = g.p2m.loc[gpfns[state == _SHARED]]
        if shared.size:            # one sharer less; the frame goes when the last one does
            assert self.sharing is not None
            self.sharing.ballooned(g.guest_id, shared)
        n_freed = int(frames.size) + self._drop_zipped(g, gpfns, state)
        self.swap.drop(self.swap.slots_of(g.guest_id, gpfns))    # in swap or in the swap cache: gone
        g.labels[gpfns] = False
        return n_freed

    def _drop_zipped(self, g: _Guest, gpfns: np.ndarray, state: np.ndarray) -> int:
        """COMPRESSED and ZERO gpfns among ``gpfns`` leave the compression books; returns cache frames freed."""
        if self.zip is None:
            return 0
        z = (state == _COMPRESSED) | (state == _ZERO)
        if not np.any(z):
            return 0
        return self.zip.drop(g.guest_id, gpfns[z], state[z])

    def report_free(self, guest_id: int, gpfns: np.ndarray | bytes) -> int:
        """Free page reporting: the guest says these gpfns are free; discard what backs them. Returns frames freed.

        virtio-balloon's VIRTIO_BALLOON_F_REPORTING: the device discards
        the reported ranges (QEMU: ``ram_block_discard_range``, madvise
        DONTNEED); the next touch is an ordinary EPT fault that maps a fresh
        zero page, exactly as for a page never backed. A frame, a swap slot
        (and its swap-cache copy), a compressed or zero-dropped page: all
        go; the gpfn becomes UNBACKED. Refused as a whole (nothing changes)
        on a bad or duplicate gpfn or a ballooned one (the balloon holds
        it, it is not free). A frame whose eviction is pending (busy) is
        freed when its shootdown settles, as for balloon inflation.
        """
        g = self._guest(guest_id)
        gpfns, state = self._unballooned(g, gpfns, "BALLOONED",
                                         "a ballooned page is the balloon's, not free: deflate it first")
        n_slots = int(np.count_nonzero((state == _SWAPPED) | (state == _ZERO) | (state == _COMPRESSED)))
        n_freed = self._release(g, gpfns, state)
        g.p2m.set(gpfns, PageState.UNBACKED)
        c, gc = self.counters, g.counters
        c.free_reports += 1
        gc.free_reports += 1
        c.pages_reported += int(gpfns.size)
        gc.pages_reported += int(gpfns.size)
        c.frames_discarded += n_freed
        gc.frames_discarded += n_freed
        c.reported_slots_dropped += n_slots
        return n_freed

    def host_copy(self, guest_id: int, gpfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For gpfns the host took from the guest: which hold a copy and the content held (for the audit).

        A copy is a host swap slot (SWAPPED), a compressed page (COMPRESSED)
        or a zero-dropped page (ZERO: the token the guest had; a fault maps zeros).
        """
        g = self._guest(guest_id)
        gpfns = np.asarray(gpfns, np.int64)
        state = g.p2m.state[gpfns]
        tokens = np.zeros(gpfns.size, np.uint64)
        sw = state == _SWAPPED
        tokens[sw] = self.swap.token[g.p2m.loc[gpfns[sw]]]
        z = (state == _COMPRESSED) | (state == _ZERO)
        if self.zip is not None and np.any(z):
            tokens[z] = self.zip.tokens_of(guest_id, gpfns[z])
        return sw | (z if self.zip is not None else np.zeros_like(z)), tokens

    def balloon_deflate(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        """The guest takes ``gpfns`` back: they become UNBACKED (a fault gives a zero page)."""
        g = self._guest(guest_id)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages, unique=True)
        state = g.p2m.state[gpfns]
        if np.any(state != PageState.BALLOONED):
            i = int(np.flatnonzero(state != PageState.BALLOONED)[0])
            raise InvalidState(guest_id, "gpfn", int(gpfns[i]), PageState(state[i]).name,
                               "only BALLOONED pages can be deflated")
        g.p2m.set(gpfns, PageState.UNBACKED)
        g.balloon_pages -= int(gpfns.size)
        g.counters.balloon_deflated_pages += int(gpfns.size)
        self.counters.balloon_deflated_pages += int(gpfns.size)

    def balloon_pages(self, guest_id: int) -> int:
        return self._guest(guest_id).balloon_pages

    # -- accessed/dirty bits and pinning ----------------------------------------

    def set_ad_bits(self, guest_id: int, accessed_packbits: np.ndarray | bytes,
                    dirty_packbits: np.ndarray | bytes) -> None:
        """OR the guest's EPT A/D bits (``np.packbits`` over its gpfns) into the frames backing them.

        Empty bit strings mean "nothing to report".
        """
        g = self._guest(guest_id)
        backed = g.p2m.state == PageState.FRAME
        for name, packed, target in (("accessed", accessed_packbits, self.pool.accessed),
                                     ("dirty", dirty_packbits, self.pool.dirty)):
            if len(packed) == 0:
                continue
            bits = self._unpack(g, name, packed)
            hit = bits & backed
            target[g.p2m.loc[hit]] = True
            if name == "dirty" and self.sharing is not None:
                self.sharing.note_dirty(guest_id, bits)

    def _unpack(self, g: _Guest, name: str, packed: np.ndarray | bytes) -> np.ndarray:
        raw = np.frombuffer(packed, np.uint8) if isinstance(packed, (bytes, bytearray, memoryview)) \
            else np.asarray(packed, np.uint8).reshape(-1)
        want = -(-g.p2m.guest_pages // 8)
        if raw.size != want:
            raise BadBatch(f"guest {g.guest_id}: {name} bits have {raw.size} bytes, expected {want}")
        return np.unpackbits(raw, count=g.p2m.guest_pages).astype(bool)

    def pin_gpfns(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        """Their frames are never host-swap victims (now and whenever faulted in again)."""
        self._set_pinned(guest_id, gpfns, True)

    def unpin_gpfns(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        self._set_pinned(guest_id, gpfns, False)

    def _set_pinned(self, guest_id: int, gpfns: np.ndarray | bytes, pinned: bool) -> None:
        g = self._guest(guest_id)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages)
        g.p2m.pinned[gpfns] = pinned
        backed = gpfns[g.p2m.state[gpfns] == PageState.FRAME]
        self.pool.pinned[g.p2m.loc[backed]] = pinned

    def pin_vdisk_range(self, guest_id: int, first_block: int, n_blocks: int) -> None:
        """Pin the cache frames of these blocks (e.g. the guest's swap area) and keep them cached.

        Blocks that are in host swap right now become pinned when next touched.
        """
        self._guest(guest_id).vdisk.set_pinned(first_block, n_blocks, True)

    def unpin_vdisk_range(self, guest_id: int, first_block: int, n_blocks: int) -> None:
        self._guest(guest_id).vdisk.set_pinned(first_block, n_blocks, False)

    # -- virtual disks ---------------------------------------------------------------

    async def vdisk_read(self, guest_id: int, blocks: np.ndarray | bytes, vt_us: float) -> tuple[np.ndarray, float]:
        """Read blocks through the host cache; returns their tokens and the completion time."""
        g = self._guest(guest_id)
        vd = g.vdisk
        one = one_page_number(blocks, guest_id, "block", vd.n_blocks)
        if one is not None and vd.cached:
            if vd.cache_state[one] == _CACHED:
                res = vd.read_one(one, vt_us)      # a hit takes no frame and no room
                return res.tokens, res.done_vt_us
            # The usual request, in scalars: the same drops, frames and times as the array path below.
            start_us = vd.fit_allowance_one(one, vt_us)
            if not self._room_ok(vd.frames_needed_one(one), False, g):   # else _room_for_io returns at once
                start_us = await self._room_for_io(g, lambda: vd.frames_needed_one(one), start_us)
            res = vd.read_one(one, start_us)
            return res.tokens, res.done_vt_us
        blocks = np.array((one,), np.int64) if one is not None else vd.check_blocks(blocks)
        start_us = vd.fit_allowance(blocks, vt_us, write=False)
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_read(blocks), start_us)
        res = vd.read(blocks, start_us)
        return res.tokens, res.done_vt_us

    async def vdisk_write(self, guest_id: int, blocks: np.ndarray | bytes, tokens: np.ndarray | bytes,
                          vt_us: float) -> float:
        """Write distinct blocks in the disk's cache mode; returns the completion time."""
        g = self._guest(guest_id)
        vd = g.vdisk
        one = one_page_number(blocks, guest_id, "block", vd.n_blocks)
        token = one_token(tokens) if one is not None and vd.cached else None
        if token is not None:
            # The usual request, in scalars: the same drops, frames and times as the array path below.
            start_us = vd.fit_allowance_one(one, vt_us)
            if not self._room_ok(vd.frames_needed_one(one), False, g):   # else _room_for_io returns at once
                start_us = await self._room_for_io(g, lambda: vd.frames_needed_one(one), start_us)
            done_us = vd.write_one(one, token, start_us).done_vt_us
            if self._observer is not None:
                self._observer.disk_written(guest_id, np.array((one,), np.int64), np.array((token,), np.uint64))
            return done_us
        blocks = np.array((one,), np.int64) if one is not None else vd.check_blocks(blocks, unique=True)
        tokens = vd.check_tokens(blocks, tokens)
        start_us = vd.fit_allowance(blocks, vt_us, write=True)
        start_us = await self._room_for_io(g, lambda: vd.frames_needed_write(blocks), start_us)
        res = vd.write(blocks, tokens, start_us)
        if self._observer is not None:
            self._observer.disk_written(guest_id, blocks, tokens)
        return res.done_vt_us

    async def _room_for_io(self, g: _Guest, need: Callable[[], int], vt_us: float) -> float:
        start_us = float(vt_us)
        tried = False
        while True:
            g = self._same_guest(g)
            n = need()
            if self._room_ok(n, tried, g):
                if start_us > vt_us:
                    self.counters.direct_reclaims += 1
                return start_us
            start_us = max(start_us, await self._make_room(n, vt_us, g))
            tried = True

    def set_vdisk_profile(self, guest_id: int, profile: DeviceProfile | str) -> None:
        """Give the guest's disk a device of its own with this profile (not on a shared device)."""
        if self.shared_device is not None:
            raise ValueError("the virtual disks are on the shared device: set its profile in [disk.vdisk]")
        vd = self._guest(guest_id).vdisk
        vd.device = Device(device_profile(profile) if isinstance(profile, str) else profile, f"vdisk{guest_id}")
        vd.device.add_lane(guest_id)

    def set_swap_profile(self, profile: DeviceProfile | str) -> None:
        """A new swap device with this profile, lanes for the live guests (not on a shared device)."""
        if self.shared_device is not None:
            raise ValueError("the swap files are on the shared device: set its profile in [disk.vdisk]")
        old = self.swap.disk
        self.swap.disk = Device(device_profile(profile) if isinstance(profile, str) else profile, "swap",
                                old.expected_lanes)
        for gid in self._guests:
            self.swap.disk.add_lane(gid)

    def vdisk(self, guest_id: int) -> VirtualDisk:
        return self._guest(guest_id).vdisk

    # -- tick ----------------------------------------------------------------------

    def tick(self, vt_us: float) -> None:
        """Once per tick, every guest parked: retire I/O buffers, the disk cache's boundary work, device shares.

        The cache's boundary work (``hostd.hostcache``): the flusher, the
        budget, and clean clusters dropped when free frames are below the
        refill level (twice the low watermark) -- before anything is
        host-swapped. Then each device's lanes get their shares for the
        next tick from this tick's demand.
        """
        for g in self._guests.values():
            g.vdisk.retire(vt_us)
        want = min(2 * self.low_watermark_frames, self.pool.total_frames) - self.pool.free_frames
        self.cache.boundary({gid: g.vdisk for gid, g in self._guests.items()}, vt_us, want)
        for dev in self._devices():
            dev.rebalance(vt_us, self.tick_us)

    def _devices(self) -> list[Device]:
        """Every device once: the swap device (or the shared one), then each disk's own, by guest id."""
        out: list[Device] = [self.swap.disk]
        for g in self._guests.values():
            if all(g.vdisk.device is not d for d in out):
                out.append(g.vdisk.device)
        return out

    # -- observation ---------------------------------------------------------------

    def guest_counts(self, guest_id: int) -> dict[str, int]:
        """Gauges of one guest, in pages: resident, swapped, ballooned, unbacked, disk cache."""
        g = self._guest(guest_id)
        p = g.p2m.counts()
        # ESX's "consumed": its private frames plus its share of the shared ones (1/r of a frame of r sharers)
        consumed = p["frame"] + (self.sharing.frames_attributed(guest_id) if self.sharing is not None else 0)
        out = {"guest_pages": g.p2m.guest_pages,
               "resident_pages": p["frame"], "shared_pages": p["shared"], "consumed_pages": consumed,
               "swapped_pages": p["swapped"],
               "ballooned_pages": p["ballooned"], "unbacked_pages": p["unbacked"],
               "max_balloon_pages": g.max_balloon_pages,
               **g.vdisk.counts()}
        if self.zip is not None:
            out.update(zcache_pages=p["compressed"], zero_held_pages=p["zero"],
                       **self.zip.guest_snapshot(guest_id, g.p2m))
        return out

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges, JSON-serialisable; per-guest under ``guests`` keyed by str(guest_id).

        Host-wide counters (``vdisk_*`` included) cover guests that are gone too.
        """
        kinds = self.pool.counts()
        out: dict[str, Any] = {
            "total_frames": self.pool.total_frames,
            "free_frames": kinds["free"],
            "guest_frames": kinds["guest"],
            "cache_pages": kinds["cache"],
            "iobuf_pages": kinds["iobuf"],
            "busy_frames": int(np.count_nonzero(self.pool.busy)),
            # shared frames are pinned in the pool only so no victim policy picks them
            "pinned_frames": int(np.count_nonzero(self.pool.pinned))
            - (int(np.count_nonzero(self.sharing.shared)) if self.sharing is not None else 0),
            "swap_slots": self.swap.n_slots,
            "swap_used_slots": self.swap.used_slots,
            "swap_cached_slots": self.swap.cached_slots,
            "cache_dirty_pages": sum(g.vdisk.dirty_pages for g in self._guests.values()),
            **self.cache.metrics(),
            **{f"swap_device_{k}": v for k, v in self.swap.disk.counters().items()},
            **_counts_of(self.counters),
            "zcache_frames": kinds["zcache"],
            "compression": self.zip is not None and self.zip.cfg.compression,
            "zero_page_detection": self.zip is not None and self.zip.cfg.zero_pages,
            **(self.zip.snapshot() if self.zip is not None else {}),
        }
        vd_totals = dict(self._departed_vdisk)
        guests: dict[str, Any] = {}
        for gid in sorted(self._guests):
            g = self._guests[gid]
            vd = _counts_of(g.vdisk.counters)
            for k, v in vd.items():
                vd_totals[k] = vd_totals.get(k, 0) + v
            guests[str(gid)] = {**self.guest_counts(gid), **_counts_of(g.counters),
                                **{f"vdisk_{k}": v for k, v in vd.items()}}
            if self.sharing is not None:
                guests[str(gid)].update(self.sharing.guest_metrics(gid))
        out.update({f"vdisk_{k}": v for k, v in vd_totals.items()})
        if self.sharing is not None:
            out.update(self.sharing.metrics())
        out["double_faults"] = int(vd_totals.get("double_faults", 0))
        out["guests"] = guests
        return out

    # -- deferred shootdowns: placeholders in host swap ---------------------------

    def fill_placeholders(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> int:
        """A late shootdown answer: put its tokens into the guest's slots that still wait for them.

        Returns how many slots were filled (a gpfn faulted back in or
        ballooned meanwhile holds no placeholder any more).
        """
        g = self._guests.get(guest_id)
        if g is None:
            return 0
        gpfns = np.asarray(gpfns, np.int64)
        tokens = np.asarray(tokens, np.uint64)
        filled = self.swap.fill_placeholders(guest_id, gpfns, tokens)
        # The answer can come before its eviction is applied: an eviction's groups are applied
        # together, in guest-id order, once every guest's shootdown returned. Keep the answer for
        # the pages whose frames are still being evicted; the eviction takes it instead of a placeholder.
        early = (g.p2m.state[gpfns] == PageState.FRAME) & self.pool.busy[g.p2m.loc[gpfns]]
        if np.any(early):
            book = self._early_answers.setdefault(guest_id, {})
            book.update(zip(gpfns[early].tolist(), tokens[early].tolist()))
        return filled + int(np.count_nonzero(early))

    def placeholder_slots(self, guest_id: int) -> int:
        """Host swap slots of ``guest_id`` still waiting for their content."""
        return self.swap.placeholders(guest_id)

    # -- the invariant ------------------------------------------------------------

    def check_invariant(self) -> None:
        """The full frame invariant (``hostd.invariant.check_full``); raises ``InvariantViolation``."""
        check_full(self)

"""What host memory holds: its state (``MemoryBooks``), one guest's record, its collaborators' types.

``MemoryBooks`` is the base of every part of ``HostMemory``: its
constructor builds the state every part reads and changes (the frame pool,
host swap, the disk cache, compression, the per-guest records, the
counters), and its readers are how others read the books (``guest_ids``,
``p2m``, ``vdisk``, ``content``, ``balloon_pages``, ``pool``, ``swap``).
The collaborators' types are here too: ``Shootdown``, ``Hold``,
``MemoryObserver`` and the callout (``hostd.memory`` tells when each is
called).
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from balloonlab.proto.content import ContentMap
from balloonlab.proto.costs import CostModel

from ..compress import ReclaimZip, ZipConfig
from ..devices import Device, DeviceProfile, device_profile
from ..errors import UnknownGuest
from ..framepool import FramePool
from ..hostcache import CACHE_MODE_DEFAULT, CacheConfig, HostCache
from ..hostswap import HostSwap
from ..memstate import MemoryStates
from ..p2m import P2M, PageState
from ..vdisk import CLUSTER_PAGES_DEFAULT, MAX_INFLIGHT_REQUESTS_DEFAULT, VirtualDisk
from ..victim import VictimPolicy, make_victim_policy
from ..victim.per_vm import PerVmVictims
from .counters import GuestCounters, HostCounters

__all__ = ["MemoryBooks", "Shootdown", "Hold", "MemoryObserver", "SELF_SWAP_BELOW_WATERMARKS",
           "default_self_swap_allowed"]


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


def default_self_swap_allowed(mem: "MemoryBooks", guest_id: int) -> bool:
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


_FRAME = int(PageState.FRAME)         # plain ints for the one-page paths (an IntEnum lookup costs ~1 us)
_SWAPPED = int(PageState.SWAPPED)
_BALLOONED = int(PageState.BALLOONED)
_COMPRESSED = int(PageState.COMPRESSED)
_ZERO = int(PageState.ZERO)
_SHARED = int(PageState.SHARED)
_GUEST_STREAM_DEFAULT = 0x6F5         # per-guest streams when no seed is given (tests); assembly seeds them


@contextlib.asynccontextmanager
async def _no_callout() -> Any:
    yield


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


class MemoryBooks:
    """Host memory's state and its readers; every part of ``HostMemory`` builds on it."""

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
        self._callout: Callable[[], Any] = callout or _no_callout   # see hostd.memory, "Concurrency"
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
        self.self_swap_allowed: Callable[[MemoryBooks, int], bool] = default_self_swap_allowed
        # hostd.sharing.PageSharing when the scenario turns it on (enable_sharing); it is built on these books
        self.sharing: Any = None
        # The end of the tick now running, when the guests park at it (``open_tick``); None: faults unbounded.
        self.fault_gate_us: float | None = None
        # Where read chains stop: the tick's end, also in the run's last tick (where faults are unbounded).
        self.chain_gate_us: float | None = None
        # Reads a guest may chain onto one DiskRead (hostd.readchain); 0: none. Assembly sets it.
        self.read_chain = 0
        self.ahead_chain = False    # TickDone.ahead answered at the next tick's start (hostd.readchain)

    @property
    def victim(self) -> VictimPolicy:
        return self._victim

    def note_boundary(self, held_frames: int) -> None:
        """A tick starts: what the boundary left free beyond ``held_frames`` (the needs of requests held across
        it) is the pressure the tick runs under (``boundary_free_frames``, read by ``self_swap_allowed``)."""
        self.boundary_free_frames = self.pool.free_frames - int(held_frames)

    def guest_ids(self) -> list[int]:
        return sorted(self._guests)

    def content(self, guest_id: int) -> ContentMap:
        """The guest's content map (``proto.content``)."""
        return self._guest(guest_id).content

    def p2m(self, guest_id: int) -> P2M:
        """The guest's physical-to-machine map (read it; only host memory changes it)."""
        return self._guest(guest_id).p2m

    def max_balloon_pages(self, guest_id: int) -> int:
        return self._guest(guest_id).max_balloon_pages

    def balloon_pages(self, guest_id: int) -> int:
        return self._guest(guest_id).balloon_pages

    def vdisk(self, guest_id: int) -> VirtualDisk:
        return self._guest(guest_id).vdisk

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

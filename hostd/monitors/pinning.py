"""The cure of nested swapping: pin a swapping guest's swap area in host memory.

The trigger is the seed's page-fault frequency (PFF; Chu and Opderbeck,
"The page fault frequency replacement algorithm", AFIPS 1972): a guest
whose PFF stays at or above ``pff_high`` for ``pin_after_ticks`` ticks in a
row (and whose swap I/O, as the host sees it on its swap area, is at least
``swap_pages_per_s``; 0: any) gets its swap area pinned. PFF here is the
guest's major faults (those that went to its disk) per guest virtual
second over ``window_ticks``: minor faults (zero-fills, soft-reclaimed
pages) cost no I/O and no pin can help them. ``pff_high`` = 1000 faults
per virtual second is Chu and Opderbeck's rule with a critical inter-fault
time T = 1 ms of virtual time (at an SSD's ~0.1 ms per fault, a guest
faulting more often than that waits on its disk at least a tenth of its
time); it is also the threshold at which the working-set controller backs
off. Pinned, the disk-cache frames of the area are never host-swap victims,
and their copies already in host swap are dropped (writes are
write-through, so the disk has them), so no access to the area needs a
host swap-in: no double fault. Two modes: ``exempt`` (the default) keeps
the area's cache pages out of host swapping but trims them with the rest
of the disk cache, so the pins cost at most the cache's bound (a trimmed
block costs one disk read when next needed, not two); ``resident`` is
``HostMemory.pin_vdisk_range``: never trimmed either, the whole used swap
area stays in host memory (the seed's "always present"), which costs as
much host memory as the guest has swapped. The guest is unpinned after
``calm_ticks`` ticks in a row with its PFF below ``pff_low``. Each change
is logged with the pages it pins or releases; the host memory the pins
cost is the pinned cache frames (``pinned_pages``, and its peak in the
metrics).

The cure is judged by throughput as well as by its own counter: the
summary's ``pinning`` has, per pinned guest, its references per virtual
second before and after its pin, next to the double faults after the pin
(report.md shows both).

Its table (off by default; every key optional)::

    [monitors.pinning]
    enabled = false
    pff_high = 1000.0           # major faults per guest virtual s at or above which a guest is thrashing
    pff_low = 500.0             # ... and below which it is calm
    swap_pages_per_s = 0.0      # ... if its swap-area I/O is also at least this (0: any)
    pin_after_ticks = 1         # thrashing for this many ticks in a row pins its swap area
    calm_ticks = 100            # calm for this many ticks in a row unpins it
    window_ticks = 5            # PFF and the swap rate are taken over this many ticks
    mode = "exempt"             # "exempt": its cache pages are never host-swap victims, the cache stays
                                # bounded; "resident": pinned and never trimmed (pin_vdisk_range)

In summary.json, under ``host``: ``pinned_pages_peak``, ``swap_area_pins``,
``swap_area_unpins``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from balloonlab.proto import events as ev

from ..vdisk import CacheState
from .base import (Headline, MonitorBase, MonitorSpec, ReportFormat, SummaryKeys, TickContext, at_least_one,
                   choice, count_events)
from .window import History

__all__ = ["SwapAreaPinner", "PinningConfig", "SPEC"]


PFF_HIGH_DEFAULT = 1000.0
"""Major faults per virtual second: Chu and Opderbeck's PFF with a critical inter-fault time of 1 ms."""


@dataclass(frozen=True, slots=True)
class PinningConfig:
    enabled: bool = False
    pff_high: float = PFF_HIGH_DEFAULT
    pff_low: float = PFF_HIGH_DEFAULT / 2
    swap_pages_per_s: float = 0.0
    pin_after_ticks: int = at_least_one(1)
    calm_ticks: int = at_least_one(100)
    window_ticks: int = at_least_one(5)
    mode: str = choice("exempt", ("exempt", "resident"))


@dataclass(slots=True)
class _Area:
    first_block: int
    n_blocks: int
    pinned_since_tick: int | None = None
    swapping_ticks: int = 0     # in a row
    calm_ticks: int = 0         # in a row, while pinned
    pins: int = 0
    pinned_pages_peak: int = 0


class SwapAreaPinner(MonitorBase):
    def __init__(self, cfg: PinningConfig, mem: Any, log: Any) -> None:
        self.cfg = cfg
        self.mem = mem              # hostd.memory.HostMemory
        self.log = log
        self.areas: dict[int, _Area] = {}
        self.pins = 0
        self.unpins = 0
        self.pinned_pages_peak = 0  # host frames pinned for swap areas, all guests, at a tick's end

    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None:
        """``spec`` is the guest's run config; ``swap_base_block``/``swap_blocks`` locate its swap area."""
        first, n = spec.get("swap_base_block"), spec.get("swap_blocks")
        if isinstance(first, int) and isinstance(n, int) and n > 0:
            self.areas[guest_id] = _Area(first, n)

    def guest_gone(self, guest_id: int) -> None:
        self.areas.pop(guest_id, None)

    def is_pinned(self, guest_id: int) -> bool:
        a = self.areas.get(guest_id)
        return a is not None and a.pinned_since_tick is not None

    def pinned_pages(self, guest_id: int) -> int:
        """Host frames holding this guest's pinned swap area now."""
        a = self.areas.get(guest_id)
        if a is None or a.pinned_since_tick is None:
            return 0
        vd = self.mem.vdisk(guest_id)
        state = vd.cache_state[a.first_block:a.first_block + a.n_blocks]
        return int(np.count_nonzero(state == CacheState.FRAME))

    def end_tick(self, tick: TickContext) -> None:
        self.check(tick.history)

    def check(self, hist: History) -> None:
        """Pin the swap areas of guests swapping for long enough, unpin those calm for long enough."""
        if not self.cfg.enabled:
            return
        cfg = self.cfg
        now = hist.now
        total = 0
        for gid, g in sorted(now.guests.items()):
            a = self.areas.get(gid)
            if a is None:
                continue
            rate = hist.guest_rate(gid, "swap_pages", cfg.window_ticks)
            pff = hist.guest_rate(gid, "major_faults", cfg.window_ticks)
            thrashing = pff >= cfg.pff_high and rate >= cfg.swap_pages_per_s and rate > 0
            calm = pff < cfg.pff_low
            a.swapping_ticks = a.swapping_ticks + 1 if thrashing else 0
            if a.pinned_since_tick is None:
                if a.swapping_ticks >= cfg.pin_after_ticks:
                    self._pin(gid, a, now.tick, rate, pff)
            else:
                a.calm_ticks = a.calm_ticks + 1 if calm else 0
                if a.calm_ticks >= cfg.calm_ticks:
                    self._unpin(gid, a, now.tick, rate, pff)
            pages = self.pinned_pages(gid)
            a.pinned_pages_peak = max(a.pinned_pages_peak, pages)
            total += pages
        self.pinned_pages_peak = max(self.pinned_pages_peak, total)

    def _pin(self, gid: int, a: _Area, tick: int, rate: float, pff: float) -> None:
        vd = self.mem.vdisk(gid)
        dropped = vd.drop_swapped(a.first_block, a.n_blocks)
        if self.cfg.mode == "resident":
            self.mem.pin_vdisk_range(gid, a.first_block, a.n_blocks)
        else:
            vd.set_swap_exempt(a.first_block, a.n_blocks, True)
        a.pinned_since_tick = tick
        a.calm_ticks = 0
        a.pins += 1
        self.pins += 1
        self.log.info(ev.SWAP_AREA_PINNED, guest=gid, tick=tick, mode=self.cfg.mode, first_block=a.first_block,
                      blocks=a.n_blocks,
                      pinned_pages=self.pinned_pages(gid), dropped_swapped_pages=dropped,
                      swap_pages_per_s=round(rate, 1), pff=round(pff, 1), pff_high=self.cfg.pff_high)

    def _unpin(self, gid: int, a: _Area, tick: int, rate: float, pff: float) -> None:
        pages = self.pinned_pages(gid)
        if self.cfg.mode == "resident":
            self.mem.unpin_vdisk_range(gid, a.first_block, a.n_blocks)
        else:
            self.mem.vdisk(gid).set_swap_exempt(a.first_block, a.n_blocks, False)
        since = a.pinned_since_tick if a.pinned_since_tick is not None else tick
        a.pinned_since_tick = None
        a.swapping_ticks = 0
        self.unpins += 1
        self.log.info(ev.SWAP_AREA_UNPINNED, guest=gid, tick=tick, first_block=a.first_block, blocks=a.n_blocks,
                      unpinned_pages=pages, pinned_ticks=tick - since, swap_pages_per_s=round(rate, 1),
                      pff=round(pff, 1))

    def metrics(self) -> dict[str, Any]:
        return {"pins": self.pins, "unpins": self.unpins, "pinned_pages_peak": self.pinned_pages_peak,
                "guests": {str(gid): {"pins": a.pins, "pinned": a.pinned_since_tick is not None,
                                      "pinned_since_tick": a.pinned_since_tick,
                                      "pinned_pages_peak": a.pinned_pages_peak,
                                      "swap_area": [a.first_block, a.n_blocks]}
                           for gid, a in sorted(self.areas.items())}}

    def finished_keys(self) -> dict[str, Any]:
        return {"pinning": self.metrics()}


def summarize(monitors: Mapping[str, Any], host_events: Sequence[Mapping[str, Any]],
              finished: Mapping[str, Any]) -> SummaryKeys:
    pin = monitors.get("pinning") or {}
    return SummaryKeys(host={
        "pinned_pages_peak": int(pin.get("pinned_pages_peak", 0)),
        "swap_area_pins": int(pin.get("pins", 0)),
        "swap_area_unpins": int(pin.get("unpins", 0)),
    })


def report(v: Mapping[str, Any], fmt: ReportFormat) -> list[str]:
    """The cure judged twice: by its own counter and by the pinned guests' throughput."""
    cure = v.get("pinning")
    if not isinstance(cure, dict):
        return []
    h = v.get("host") or {}
    rows = [{"guest": gid, "pinned at tick": g.get("pinned_tick"),
             "refs/vs before the pin": g.get("refs_per_vsec_before_pin"),
             "refs/vs after the pin": g.get("refs_per_vsec_after_pin")}
            for gid, g in sorted((cure.get("guests") or {}).items(), key=lambda kv: int(kv[0]))]
    before, after = cure.get("pinned_guests_refs_per_vsec_before_pin"), cure.get("pinned_guests_refs_per_vsec_after_pin")
    change = f" ({after / before:.2f}x)" if isinstance(before, (int, float)) and before and isinstance(after, (int, float)) else ""
    return [f"- swap-area pins, judged by their counter: {fmt.cell(h.get('double_faults_after_pin', 0))} double "
            f"faults after the pin (of {fmt.cell(h.get('double_faults', 0))}); by throughput: the pinned guests "
            f"ran {fmt.cell(before)} refs/vs before their pins and {fmt.cell(after)} after{change}; what the pins "
            f"cost: {fmt.cell(h.get('pinned_pages_peak', 0))} host frames at the peak. Compare the variants' "
            f"throughput in the table above.", "", fmt.table(rows), ""]


SPEC = MonitorSpec(
    name="pinning",
    config=PinningConfig,
    make=lambda cfg, ctx: SwapAreaPinner(cfg, ctx.mem, ctx.log),
    history_ticks=lambda cfg: cfg.window_ticks,
    summarize=summarize,
    headline=(Headline("swap_areas_pinned", "swap areas pinned", lambda v: count_events(v, ev.SWAP_AREA_PINNED)),),
    table_fragment=lambda v: f"pinned_pages_peak={v.get('host', {}).get('pinned_pages_peak', 0)}",
    report=report,
)

"""Nested swapping, counted and logged with its evidence.

Two cases:

- A **double fault** (the seed's nested swapping): a guest reads or writes
  a block of its virtual disk whose host cache copy the host has swapped
  out; the host must swap it back in before the request can go on. The
  virtual disk counts every one and records them per request; each tick
  this monitor drains the records and logs one ``double_fault`` event per
  guest that had any: how many pages, the blocks and clusters (a sample of
  ``samples``), which were in its swap area, and the virtual latency the
  host swap-ins added. ``count`` summed over the events is the disks'
  ``double_faults`` counter. Double faults on a guest while its swap area
  is pinned are counted apart (``after_pin``): the cure promises 0.
- **Double paging** (ESX's name): the host swapped out a guest page that
  the guest then picks to page out itself; to write it to its disk the
  guest must first fault it back in from host swap, only to write it out
  again. The host sees a page come back from host swap (an EPT fault) and,
  within the same or the next tick, the same content (token) written to
  the guest's disk. Logged as ``double_paging_detected`` per guest and tick.

Its table::

    [monitors.double_faults]
    samples = 8                 # blocks named per double_fault event (the count covers all)

In summary.json, under ``host``: ``double_faults_after_pin``,
``double_faults_in_swap_area``, ``double_fault_added_us``,
``double_fault_events`` and ``double_fault_logged_pages`` (the events and
the pages they name), ``double_paging_pages``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from balloonlab.proto import events as ev

from .base import Headline, MonitorBase, MonitorContext, MonitorSpec, SummaryKeys, TickContext, count_events

__all__ = ["DoubleFaultMonitor", "DoubleFaultConfig", "SPEC"]


@dataclass(frozen=True, slots=True)
class DoubleFaultConfig:
    samples: int = 8


@dataclass(slots=True)
class _GuestCounts:
    double_faults: int = 0
    after_pin: int = 0
    in_swap_area: int = 0
    added_us: float = 0.0
    events: int = 0
    double_paging_pages: int = 0
    double_paging_swap_area_pages: int = 0


class DoubleFaultMonitor(MonitorBase):
    def __init__(self, cfg: DoubleFaultConfig, mem: Any, is_pinned: Callable[[int], bool], log: Any) -> None:
        self.cfg = cfg
        self.mem = mem                  # hostd.memory.HostMemory
        self.is_pinned = is_pinned      # guest id -> bool: its swap area is pinned now
        self.log = log
        self.guests: dict[int, _GuestCounts] = {}
        self.departed = _GuestCounts()  # counts of guests that are gone
        # Content of guest pages read back from host swap, this tick and the last.
        self._swapped_in: dict[int, list[np.ndarray]] = {}
        self._swapped_in_before: dict[int, np.ndarray] = {}
        self._paging_tick: dict[int, list[np.ndarray]] = {}   # blocks written by double paging this tick

    def guest_gone(self, guest_id: int) -> None:
        c = self.guests.pop(guest_id, None)
        if c is not None:
            for name in c.__slots__:
                setattr(self.departed, name, getattr(self.departed, name) + getattr(c, name))
        self._swapped_in.pop(guest_id, None)
        self._swapped_in_before.pop(guest_id, None)
        self._paging_tick.pop(guest_id, None)

    def _counts(self, guest_id: int) -> _GuestCounts:
        c = self.guests.get(guest_id)
        if c is None:
            c = self.guests[guest_id] = _GuestCounts()
        return c

    # -- double paging: what host memory reports as it happens ---------------------------

    def guest_pages_swapped_in(self, guest_id: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, np.uint64)
        tokens = tokens[tokens != 0]      # a zero page carries no content to recognise
        if tokens.size:
            self._swapped_in.setdefault(guest_id, []).append(tokens.copy())

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        recent = self._swapped_in.get(guest_id, [])
        before = self._swapped_in_before.get(guest_id)
        if not recent and before is None:
            return
        known = np.concatenate(recent + ([before] if before is not None else []))
        hit = np.isin(np.asarray(tokens, np.uint64), known)
        if not hit.any():
            return
        c = self._counts(guest_id)
        c.double_paging_pages += int(np.count_nonzero(hit))
        lo, hi = self.mem.vdisk(guest_id).swap_area
        written = np.asarray(blocks, np.int64)[hit]
        c.double_paging_swap_area_pages += int(np.count_nonzero((written >= lo) & (written < hi)))
        self._paging_tick.setdefault(guest_id, []).append(written)

    # -- each tick ------------------------------------------------------------------------

    def record_tick(self, tick: TickContext) -> None:
        # Judged against the pins this tick ran under: before the pinning monitor's end_tick.
        self.drain(tick.tick)

    def drain(self, tick: int) -> None:
        """Log this tick's double faults (from the disks' records) and double paging; roll the window."""
        k = self.cfg.samples
        for gid in self.mem.guest_ids():
            vd = self.mem.vdisk(gid)
            records, unrecorded = vd.take_double_faults()
            if records or unrecorded:
                self._log_double_faults(gid, tick, records, unrecorded, vd, k)
        for gid, written in self._paging_tick.items():
            blocks = np.concatenate(written)
            self.log.warning(ev.DOUBLE_PAGING_DETECTED, guest=gid, tick=tick, pages=int(blocks.size),
                             blocks=blocks[:k].tolist(), total_pages=self.guests[gid].double_paging_pages)
        self._paging_tick = {}
        self._swapped_in_before = {gid: np.concatenate(v) for gid, v in self._swapped_in.items() if v}
        self._swapped_in = {}

    def _log_double_faults(self, gid: int, tick: int, records: list[Any], unrecorded: int, vd: Any,
                           k: int) -> None:
        c = self._counts(gid)
        blocks = np.concatenate([r.blocks for r in records]) if records else np.zeros(0, np.int64)
        # The counter is exact; the records may miss requests beyond the disk's bound.
        count = int(vd.counters.double_faults) - self._seen(gid)
        lo, hi = vd.swap_area
        in_area = int(np.count_nonzero((blocks >= lo) & (blocks < hi)))
        pinned = self.is_pinned(gid)
        added = [r.added_us for r in records]
        c.double_faults += count
        c.in_swap_area += in_area
        c.after_pin += count if pinned else 0
        c.added_us += float(sum(added))
        c.events += 1
        uniq = np.unique(blocks)
        self.log.warning(ev.DOUBLE_FAULT, guest=gid, tick=tick, count=count, requests=len(records),
                         unrecorded_requests=unrecorded,
                         reads=sum(int(r.blocks.size) for r in records if r.op == "read"),
                         writes=sum(int(r.blocks.size) for r in records if r.op == "write"),
                         blocks=uniq[:k].tolist(), clusters=np.unique(uniq // vd.cluster_pages)[:k].tolist(),
                         swap_slots=(uniq[(uniq >= lo) & (uniq < hi)] - lo)[:k].tolist(),
                         in_swap_area=in_area, swap_area_pinned=pinned,
                         added_us=round(float(sum(added)), 1), max_added_us=round(max(added, default=0.0), 1),
                         total=c.double_faults)

    def _seen(self, gid: int) -> int:
        return self._counts(gid).double_faults

    def metrics(self) -> dict[str, Any]:
        tot = _GuestCounts()
        for c in [self.departed, *self.guests.values()]:
            for name in c.__slots__:
                setattr(tot, name, getattr(tot, name) + getattr(c, name))
        return {"double_faults": tot.double_faults, "double_faults_after_pin": tot.after_pin,
                "double_faults_in_swap_area": tot.in_swap_area, "double_fault_added_us": round(tot.added_us, 1),
                "double_fault_events": tot.events, "double_paging_pages": tot.double_paging_pages,
                "double_paging_swap_area_pages": tot.double_paging_swap_area_pages,
                "guests": {str(gid): {"double_faults": c.double_faults, "after_pin": c.after_pin,
                                      "in_swap_area": c.in_swap_area, "double_paging_pages": c.double_paging_pages}
                           for gid, c in sorted(self.guests.items())}}

    def finished_keys(self) -> dict[str, Any]:
        return {"double_faults": self.metrics()}


# --- the analysis ---------------------------------------------------------------------------------


def _num(e: Mapping[str, Any], key: str) -> float:
    v = e.get(key, 0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def summarize(monitors: Mapping[str, Any], host_events: Sequence[Mapping[str, Any]],
              finished: Mapping[str, Any]) -> SummaryKeys:
    df = monitors.get("double_faults") or {}
    df_events = [e for e in host_events if e.get("event") == ev.DOUBLE_FAULT]
    return SummaryKeys(host={
        "double_faults_after_pin": int(df.get("double_faults_after_pin", 0)),
        "double_faults_in_swap_area": int(df.get("double_faults_in_swap_area", 0)),
        "double_fault_added_us": df.get("double_fault_added_us", 0.0),
        "double_fault_events": len(df_events),
        "double_fault_logged_pages": sum(int(_num(e, "count")) for e in df_events),
        "double_paging_pages": int(df.get("double_paging_pages", 0)),
    })


def _double_faults(v: dict[str, Any]) -> float | None:
    n = (v.get("host") or {}).get("double_faults")
    return float(n) if isinstance(n, (int, float)) else count_events(v, ev.DOUBLE_FAULT)


def _fragment(v: Mapping[str, Any]) -> str:
    h = v.get("host", {})
    return (f"double_faults={h.get('double_faults', 0)} (after pin {h.get('double_faults_after_pin', 0)})  "
            f"double_paging_pages={h.get('double_paging_pages', 0)}")


def _make(cfg: DoubleFaultConfig, ctx: MonitorContext) -> DoubleFaultMonitor:
    def is_pinned(guest_id: int) -> bool:
        pinning = ctx.peers("pinning")
        return pinning is not None and pinning.is_pinned(guest_id)

    return DoubleFaultMonitor(cfg, ctx.mem, is_pinned, ctx.log)


SPEC = MonitorSpec(
    name="double_faults",
    config=DoubleFaultConfig,
    make=_make,
    summarize=summarize,
    headline=(Headline("double_paging_pages", "double paging: pages the host swapped in only for the guest to "
                       "write them to its disk", lambda v: (v.get("host") or {}).get("double_paging_pages"), "lower"),
              Headline("double_faults", "double faults (nested swapping)", _double_faults, "lower")),
    table_fragment=_fragment,
)

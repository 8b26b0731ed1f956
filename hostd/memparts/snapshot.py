"""Reading host memory out: the per-tick snapshot, one guest's gauges, the audit's look at host copies.

Nothing here changes the books. ``snapshot`` runs every tick (the
machine logs it and the monitors read it); its keys are the counters of
``memparts.counters`` and the gauges of the pool, host swap, the disk
cache, compression and page sharing.
"""
from __future__ import annotations

from dataclasses import fields
from operator import attrgetter
from typing import Any, Callable

import numpy as np

from .books import _COMPRESSED, _SWAPPED, _ZERO, MemoryBooks
from .counters import GuestCounters

__all__ = ["Readout"]

# Per counters dataclass: its field names, a getter of all of them at once, and the names prefixed "vdisk_".
_READERS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]], tuple[str, ...]]] = {}


def _reader(cls: type) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]], tuple[str, ...]]:
    r = _READERS.get(cls)
    if r is None:
        names = tuple(f.name for f in fields(cls))
        get = attrgetter(*names)
        r = _READERS[cls] = (names, get if len(names) > 1 else lambda c: (get(c),),
                             tuple(f"vdisk_{n}" for n in names))
    return r


def _counts_of(counters: Any) -> dict[str, Any]:
    """A counters dataclass as a dict, as ``asdict`` gives it but without its deep copies (every field is a
    number): the snapshot runs every tick, for every guest."""
    names, get, _ = _reader(type(counters))
    return dict(zip(names, get(counters)))


class Readout(MemoryBooks):
    """Part of ``HostMemory``: what it reports."""

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

    def guest_counters(self, guest_id: int) -> GuestCounters:
        """The guest's counters as they stand (read them; only host memory changes them)."""
        return self._guest(guest_id).counters

    def snapshot(self, per_guest: bool = True) -> dict[str, Any]:
        """Counters and gauges, JSON-serialisable; per-guest under ``guests`` keyed by str(guest_id).

        Host-wide counters (``vdisk_*`` included) cover guests that are gone too.
        ``per_guest=False`` leaves ``guests`` out: the rows cost most of the
        snapshot with many guests, and are wanted only in the ticks that are logged.
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
        disks: list[tuple[Any, ...]] = []   # each guest's disk counters, summed per counter below
        names: tuple[str, ...] = ()
        for gid in sorted(self._guests):
            g = self._guests[gid]
            names, get, prefixed = _reader(type(g.vdisk.counters))   # one type for every guest's disk
            values = get(g.vdisk.counters)
            disks.append(values)
            if per_guest:
                row = guests[str(gid)] = {**self.guest_counts(gid), **_counts_of(g.counters),
                                          **dict(zip(prefixed, values))}
                if self.sharing is not None:
                    row.update(self.sharing.guest_metrics(gid))
        for k, column in zip(names, zip(*disks)):
            total = vd_totals.get(k, 0)   # departed first, then by guest id, one by one: float totals as ever
            for v in column:              # (not sum(): Python 3.12's compensates float rounding)
                total += v
            vd_totals[k] = total
        out.update({f"vdisk_{k}": v for k, v in vd_totals.items()})
        if self.sharing is not None:
            out.update(self.sharing.metrics())
        out["double_faults"] = int(vd_totals.get("double_faults", 0))
        if per_guest:
            out["guests"] = guests
        return out

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

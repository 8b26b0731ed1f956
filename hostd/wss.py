"""The host's working-set estimate of each VM, sampled the way ESX samples it.

Waldspurger, "Memory Resource Management in VMware ESX Server" (OSDI 2002),
section 5.2 ("Measuring Idle Memory"): at the start of each sampling period
the host picks a small number of the VM's "physical" pages uniformly at
random, invalidates their cached mappings, and counts at the period's end
how many the VM touched. The touched fraction ``f`` times the VM's memory is
the estimate; to respond fast to a growing working set and slowly to a
shrinking one, ESX takes the maximum of a slow and a fast exponentially
weighted moving average of ``f``.

Here, per guest and per sampling period:

- ``sample_pages`` gpfns are drawn (without replacement, from the guest's
  own seeded stream) among its **non-balloon** gpfns: resident, host-swapped
  or never backed alike, not only the resident set. So a thrashing guest
  whose pages the host swapped out still counts the pages it touches (its
  touch faults them back in and sets the accessed bit), and its estimate
  does not collapse to what the host left resident.
- At every tick end the guest reports its EPT accessed bits
  (``TickDone.accessed``, every gpfn it touched in the tick); the sampled
  gpfns among them are marked touched. That is the host's view of the
  invalidated mappings: a touched sample page would have faulted.
- A period lasts ``period_exec_us`` of the guest's **execution** time, as
  ESX's does ("successive periods of virtual machine execution time",
  vSphere resource management guide): the references it completed times
  what one costs (``mem_ref_us + cpu_us_per_ref``), not the time it spent
  stalled on faults. A thrashing guest's period therefore stretches over
  more virtual time and still sees as many of its references as a healthy
  guest's: its estimate does not collapse because it is stalled. A period
  also ends after ``max_period_ticks`` ticks whatever ran (a guest with
  nothing to run is idle, not stalled).
- At the period's end ``f`` = touched / sampled (sample pages ballooned in
  the meantime are left out), ``fast += fast_gain * (f - fast)``,
  ``slow += slow_gain * (f - slow)``, and the estimate is
  ``max(fast, slow) * (RAM - balloon)`` pages. Both averages start at the
  first period's ``f``; before the first period ends there is no estimate
  (``None``) and controllers fall back on the guest's own.

Defaults: ESX samples 100 pages per period (paper, section 5.2); its period
is 30 s (``Mem.SamplePeriod``, 60 s in vSphere 6), far longer than these
runs. Here a period is 20 ms of execution: at 1 µs per reference, 20,000
references, three per page of a 6,000-page working set, so a page in use is
almost surely touched in it. The paper does not publish its gains; 0.5
(fast: a rise is followed within three periods) and 0.1 (slow: a fall is
forgotten over about ten) are ours.

Its table (on by default; every key optional)::

    [monitors.wss]
    enabled = true
    sample_pages = 100      # gpfns sampled per guest and period (ESX: 100)
    period_exec_us = 20000  # a period: this much of the guest's execution time (its references' cost)
    max_period_ticks = 100  # ... or this many ticks, whichever comes first
    fast_gain = 0.5         # EWMA gain of the fast average, per period
    slow_gain = 0.1         # ... of the slow one

Controllers see it as the stat ``host_working_set_pages`` (``STAT_HOST_WSS``)
in each guest's view; it is logged per guest in the host's
``tick_completed`` (``wss_pages``, ``wss_fraction``) and summarised under
``host.working_set`` in summary.json.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ._books import gather_or, sample_touched
from .p2m import PageState

__all__ = ["HostWorkingSet", "GuestWss", "STAT_HOST_WSS", "WSS_STREAM"]

STAT_HOST_WSS = "host_working_set_pages"
"""The key under which a controller's ``GuestView.stats`` carries the host's estimate."""

WSS_STREAM = 0x555   # seeds the sampling apart from the host's other generators

_BALLOONED = int(PageState.BALLOONED)


class GuestWss:
    """One guest's sample, its touched bits and its two averages."""

    def __init__(self, ram_pages: int, rng: np.random.Generator) -> None:
        self.ram_pages = int(ram_pages)
        self.rng = rng
        self.sample = np.zeros(0, np.int64)
        self.touched = np.zeros(0, bool)
        self.ticks = 0
        self.exec_us = 0.0                     # execution time in this period
        self.refs = 0.0                        # the guest's cumulative references at its last report (0 at its start)
        self.periods = 0
        self.fast: float | None = None
        self.slow: float | None = None
        self.last_fraction: float | None = None
        self.estimate_pages: int | None = None

    def draw(self, state: np.ndarray, n: int, ballooned: int = -1) -> None:
        """A fresh sample among the gpfns not ballooned (``state``: the guest's p2m states; ``ballooned``:
        how many are, when known: host memory's counter, which its invariant holds to the states)."""
        if ballooned == 0:
            # every gpfn: ``Generator.choice`` of a count draws what it draws of arange(count), without
            # making that list at every period of every guest
            candidates: np.ndarray | int = self.ram_pages
            k = min(int(n), self.ram_pages)
        else:
            candidates = np.flatnonzero(state != _BALLOONED)
            k = min(int(n), int(candidates.size))
        self.sample = np.sort(self.rng.choice(candidates, size=k, replace=False)) if k else np.zeros(0, np.int64)
        self.touched = np.zeros(self.sample.size, bool)
        self.ticks = 0
        self.exec_us = 0.0

    def executed(self, refs: float, us_per_ref: float) -> None:
        """The guest's cumulative references at a tick's end: its execution time in the period grows."""
        if refs > self.refs:
            self.exec_us += (refs - self.refs) * us_per_ref
        self.refs = refs

    def accessed(self, packed: bytes) -> None:
        """OR in the tick's accessed bits (``np.packbits`` over every gpfn) for the sampled gpfns."""
        if not packed or not self.sample.size:
            return
        if len(packed) * 8 < self.ram_pages:
            return   # host memory refused these bits already (wrong size)
        gather_or(packed, self.sample, self.touched)

    def close(self, state: np.ndarray, balloon_pages: int, fast_gain: float, slow_gain: float) -> None:
        """End the period: update the averages and the estimate (sample pages ballooned since do not count)."""
        kept, hit = sample_touched(state, self.sample, self.touched, _BALLOONED) if self.sample.size else (0, 0)
        if kept:
            f = float(hit) / float(kept)
            self.last_fraction = f
            self.fast = f if self.fast is None else self.fast + fast_gain * (f - self.fast)
            self.slow = f if self.slow is None else self.slow + slow_gain * (f - self.slow)
            self.periods += 1
        if self.fast is not None and self.slow is not None:
            self.estimate_pages = int(round(max(self.fast, self.slow) * max(self.ram_pages - balloon_pages, 0)))

    @property
    def estimate_fraction(self) -> float | None:
        return None if self.fast is None or self.slow is None else max(self.fast, self.slow)


class HostWorkingSet:
    """Every live guest's sampler; fed the accessed bits, closed at tick ends, read by the controllers.

    ``cfg`` has the table's keys (``hostd.monitors.wss.WssConfig``); the
    monitor of that name is this class with its spec.
    """

    def __init__(self, cfg: Any, mem: Any, seed: int) -> None:
        self.cfg = cfg
        self.mem = mem              # hostd.memory.HostMemory
        self.seed = int(seed)
        self.guests: dict[int, GuestWss] = {}
        self.peak: dict[int, int] = {}
        self._due: list[int] = []   # closed periods whose next sample is still to draw (``close_tick(draw=False)``)

    def guest_joined(self, guest_id: int, ram_pages: int, spec: Mapping[str, Any]) -> None:
        if not self.cfg.enabled:
            return
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, WSS_STREAM, int(guest_id)]))
        g = self.guests[guest_id] = GuestWss(ram_pages, rng)
        g.draw(self.mem.p2m(guest_id).state, self.cfg.sample_pages, self.mem.balloon_pages(guest_id))

    def guest_gone(self, guest_id: int) -> None:
        self.guests.pop(guest_id, None)

    def accessed(self, guest_id: int, packed: bytes, stats: Mapping[str, Any] | None = None) -> None:
        """A guest's tick: its accessed bits, and its cumulative ``refs`` (its execution time) from its stats."""
        g = self.guests.get(guest_id)
        if g is None:
            return
        g.accessed(bytes(packed))
        refs = (stats or {}).get("refs")
        if isinstance(refs, (int, float)) and not isinstance(refs, bool):
            costs = self.mem.costs
            g.executed(float(refs), float(costs.mem_ref_us) + float(getattr(costs, "cpu_us_per_ref", 0.0)))

    def close_tick(self, draw: bool = True) -> None:
        """Count the tick; close the periods that are due and draw their next samples (guest-id order).

        With ``draw=False`` the samples are drawn at ``draw_due`` instead: the
        machine closes the tick at the boundary, where the guests wait for it,
        and draws once their next ``TickStart`` is out (its observations),
        before it reads any request of theirs. A draw reads only which pages
        are ballooned, which nothing but those requests changes, and each
        guest's own generator: the same samples either way.
        """
        self.draw_due()
        for gid in sorted(self.guests):
            g = self.guests[gid]
            g.ticks += 1
            if g.exec_us < self.cfg.period_exec_us and g.ticks < self.cfg.max_period_ticks:
                continue
            g.close(self.mem.p2m(gid).state, self.mem.balloon_pages(gid), self.cfg.fast_gain, self.cfg.slow_gain)
            if g.estimate_pages is not None:
                self.peak[gid] = max(self.peak.get(gid, 0), g.estimate_pages)
            self._due.append(gid)
        if draw:
            self.draw_due()

    def draw_due(self) -> None:
        """The next samples of the periods ``close_tick`` closed."""
        for gid in self._due:
            g = self.guests.get(gid)
            if g is not None:
                g.draw(self.mem.p2m(gid).state, self.cfg.sample_pages, self.mem.balloon_pages(gid))
        self._due = []

    def estimate(self, guest_id: int) -> int | None:
        g = self.guests.get(guest_id)
        return None if g is None else g.estimate_pages

    def row(self, guest_id: int) -> dict[str, Any]:
        """What the host's ``tick_completed`` carries for this guest."""
        g = self.guests.get(guest_id)
        if g is None or g.estimate_pages is None:
            return {}
        return {"wss_pages": g.estimate_pages, "wss_fraction": round(float(g.estimate_fraction or 0.0), 4),
                "wss_last_fraction": round(float(g.last_fraction or 0.0), 4)}

    def finished_keys(self) -> dict[str, Any]:
        return {"wss": {"sample_pages": self.cfg.sample_pages, "period_exec_us": self.cfg.period_exec_us,
                        "max_period_ticks": self.cfg.max_period_ticks,
                        "fast_gain": self.cfg.fast_gain, "slow_gain": self.cfg.slow_gain,
                        "guests": {str(gid): {"estimate_pages": g.estimate_pages, "periods": g.periods,
                                              "fast": g.fast, "slow": g.slow, "peak_pages": self.peak.get(gid)}
                                   for gid, g in sorted(self.guests.items())}}}


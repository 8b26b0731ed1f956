"""The swap-storm detector: the seed's chain of failures, link by link.

"When the Balloon Bursts": guests pushed below their working sets thrash;
their swap I/O floods the host's virtual-disk path; the host's I/O buffers
and disk cache grow in host frames; host free memory falls; the host starts
swapping, pages of healthy guests too. Over a window of ticks the detector
checks each link against its threshold, and a storm needs all four:

1. ``guests_thrashing``: **several** guests thrash: at least ``min_guests``
   (2: one thrashing guest is that guest's problem, not a storm), or
   ``min_guest_share`` of the live guests if that is more. A guest thrashes
   (Denning, "Thrashing: its causes and prevention", AFIPS 1968: it spends
   more time paging than computing) when, with PSI in its stats, its memory
   stall time (``psi_some_us``) is at least ``stall_share`` (0.5) of its
   virtual time over the window; without PSI, when it reads pages back from
   its swap faster than ``guest_swap_in_pages_per_s`` (per guest virtual
   second) or more often than ``guest_swap_in_per_kref`` per 1000
   references, or when its balloon left it less memory than its working
   set and it swaps faster than ``guest_swap_pages_per_s``. (A guest giving
   cold pages to its balloon writes swap but reads none back.)
2. ``host_io_memory``: the host's I/O memory (I/O buffers + disk cache)
   **grew** over the window by at least ``io_growth_fraction`` of its RAM
   **and** reached ``io_fraction`` of it. The 10 % default is Linux's
   ``vm.dirty_background_ratio`` (Documentation/admin-guide/sysctl/vm.rst):
   the share of memory at which the kernel itself starts pushing I/O out in
   the background; I/O memory beyond it is more than a host lets pile up.
3. ``host_free_low``: the host's memory state was **hard or low** at some
   tick of the window (ESX: free memory below 32 % of minFree, where it
   swaps; vSphere 6 resource management guide). The host's own
   ``memory_state`` when it logs one; otherwise the state is derived here
   from the fewest free frames seen in each tick (sampled at every disk
   write and host swap-in, and at the tick's end) and ESX's minFree (6 % of the first 4 GiB, 4 % of the
   next 8, 2 % of the next 16, 1 % of the rest), or ``free_fraction`` of
   RAM if that is larger (the frames this engine's reclaim keeps free).
4. ``host_swapping``: the host swapped out guest or cache pages within the
   window (more than ``swap_out_fraction`` of its RAM; 0: any).

When every link holds, one storm is counted and ``swap_storm_detected`` is
logged with the whole chain (value and threshold of each link) and every
guest's rates. The storm ends (``swap_storm_ended``) once the chain has been
broken for ``quiet_ticks`` ticks; only then can another one be counted.

Its table (on by default; every key optional)::

    [monitors.swap_storm]
    enabled = true
    window_ticks = 10           # rates and peaks are taken over this many ticks
    min_guests = 2              # at least this many guests thrash ...
    min_guest_share = 0.0       # ... and at least this share of the live guests (0: not used)
    stall_share = 0.5           # with PSI: a guest stalled on memory this share of its time thrashes
    guest_swap_in_pages_per_s = 500.0  # without PSI: reading back swapped pages faster than this,
    guest_swap_in_per_kref = 2.0       # ... or more of them than this per 1000 references (a slow disk),
    guest_swap_pages_per_s = 200.0     # ... or below its working set and swapping faster than this
    io_fraction = 0.10          # host I/O memory reached this share of host RAM (dirty_background_ratio) ...
    io_growth_fraction = 0.01   # ... after growing by this share within the window
    free_fraction = 0.0         # without a host memory state: free frames at or below this share also count
    swap_out_fraction = 0.0     # the host swapped out more than this share of its RAM within the window
    quiet_ticks = 20            # the chain must stay broken this long before a new storm counts

In summary.json: ``swap_storms`` (``swap_storm_detected`` events) and
``swap_storm`` (the first storm's tick, every episode); in report.md, the
storms and a table of their episodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from balloonlab.proto import events as ev

from .base import (Headline, MonitorBase, MonitorSpec, ReportFormat, SummaryKeys, TickContext,
                   at_least_one, count_events, fraction)
from .window import History

__all__ = ["SwapStormDetector", "SwapStormConfig", "SPEC", "esx_min_free_pages", "HARD_STATES"]


@dataclass(frozen=True, slots=True)
class SwapStormConfig:
    enabled: bool = True
    window_ticks: int = at_least_one(10)
    min_guests: int = at_least_one(2)
    min_guest_share: float = fraction(0.0)
    stall_share: float = fraction(0.5)
    guest_swap_in_pages_per_s: float = 500.0
    guest_swap_in_per_kref: float = 2.0
    guest_swap_pages_per_s: float = 200.0
    io_fraction: float = fraction(0.10)
    io_growth_fraction: float = fraction(0.01)
    free_fraction: float = fraction(0.0)
    swap_out_fraction: float = fraction(0.0)
    quiet_ticks: int = 20


HARD_STATES = ("hard", "low")
"""ESX memory states in which the host swaps (vSphere 6 resource management guide)."""
HARD_SHARE_OF_MIN_FREE = 0.32
"""ESX's hard state: free memory below 32 % of minFree."""


def esx_min_free_pages(total_pages: int) -> int:
    """ESX's minFree for a host of ``total_pages`` 4 KiB pages: 6 % of the first 4 GiB, 4 % of the next 8,
    2 % of the next 16, 1 % of the rest (vSphere 6 resource management guide)."""
    gib = 262_144
    out, left = 0.0, float(total_pages)
    for span, share in ((4 * gib, 0.06), (8 * gib, 0.04), (16 * gib, 0.02), (float("inf"), 0.01)):
        part = min(left, span)
        out += part * share
        left -= part
        if left <= 0:
            break
    return int(out)

_WS_DECAY = 0.98   # per tick: how fast a larger earlier working-set estimate is forgotten
_RATE_KEYS = ("swap_pages", "swap_in_pages", "refs", "major_faults")   # each guest's rates, every tick


class _Judged(NamedTuple):
    guest: int
    sample: Any              # its GuestSample at the window's end
    swap_rate: float
    swap_in_rate: float
    major_rate: float
    per_kref: float
    stall: float | None
    memory: int
    ws: float
    host_took: int
    thrashing: bool


class SwapStormDetector(MonitorBase):
    def __init__(self, cfg: SwapStormConfig, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.storms = 0                 # storms detected
        self.active = False             # inside a storm now
        self._broken_ticks = 0          # ticks in a row with the chain broken, during a storm
        self._started_tick = 0
        self.episodes: list[dict[str, Any]] = []
        self.thrashing_ticks: dict[int, int] = {}   # per guest: ticks it was seen thrashing
        self._ws: dict[int, float] = {}             # per guest: largest recent working-set estimate

    def guest_rates(self, hist: History) -> list[dict[str, Any]]:
        """Each guest's rates and its thrashing verdict over the window (the rows a detected storm logs)."""
        return [self._row(j) for j in self._judge_guests(hist)]

    def _judge_guests(self, hist: History) -> list[_Judged]:
        """Each guest's numbers and verdict over the window, by guest id; updates the decaying working sets.

        Every tick, so only numbers: the rows with their rounding are built
        when a storm is logged (``_row``).
        """
        w = self.cfg.window_ticks
        cfg = self.cfg
        out = []
        first = hist._window(w)[0]
        inf = float("inf")
        for gid, g in sorted(hist.now.guests.items()):
            swap_rate, swap_in_rate, refs_rate, major_rate = hist.guest_rates(gid, _RATE_KEYS, w)
            per_kref = swap_in_rate * 1000.0 / refs_rate if refs_rate > 0 else (inf if swap_in_rate else 0.0)
            stall = self._stall_share(hist, gid, w)
            ws = max(float(g.working_set_pages), self._ws.get(gid, 0.0) * _WS_DECAY)
            self._ws[gid] = ws
            memory = g.ram_pages - g.kernel_pages - g.actual_pages
            below = memory < ws and swap_rate >= cfg.guest_swap_pages_per_s
            before = first.guests.get(gid)
            host_took = g.host_swap_out_pages - (before.host_swap_out_pages if before else 0)
            thrashing = (stall >= cfg.stall_share if stall is not None else
                         (swap_in_rate >= cfg.guest_swap_in_pages_per_s
                          or (swap_in_rate > 0 and per_kref >= cfg.guest_swap_in_per_kref)
                          or below))
            out.append(_Judged(gid, g, swap_rate, swap_in_rate, major_rate, per_kref, stall, memory, ws,
                               host_took, thrashing))
        return out

    @staticmethod
    def _row(judged: _Judged) -> dict[str, Any]:
        gid, g, swap_rate, swap_in_rate, major_rate, per_kref, stall, memory, ws, host_took, thrashing = judged
        return {"guest": gid, "swap_pages_per_s": round(swap_rate, 1),
                "swap_in_pages_per_s": round(swap_in_rate, 1),
                "swap_in_per_kref": round(per_kref, 3) if per_kref != float("inf") else None,
                "major_faults_per_s": round(major_rate, 1),
                "pff": round(g.pff, 1), "host_swapped_out_pages": int(host_took),
                "balloon_target_pages": g.target_pages, "balloon_pages": g.actual_pages,
                "working_set_pages": g.working_set_pages, "memory_pages": memory,
                "below_working_set": memory < ws,
                "stall_share": None if stall is None else round(stall, 3),
                "thrashing": thrashing}

    @staticmethod
    def _stall_share(hist: History, gid: int, w: int) -> float | None:
        """Share of the guest's virtual time over the window it was stalled on memory (PSI some); None without PSI."""
        ends = hist.ends(gid, w)
        if ends is None:
            return None
        first, last = ends
        if first.psi_some_us is None or last.psi_some_us is None:
            return None
        dt = last.vt_us - first.vt_us
        return (last.psi_some_us - first.psi_some_us) / dt if dt > 0 else None

    def hard_frames(self, total: int) -> int:
        """Free frames at or below which the host counts as hard/low when it logs no memory state."""
        return max(int(HARD_SHARE_OF_MIN_FREE * esx_min_free_pages(total)), int(self.cfg.free_fraction * total))

    def end_tick(self, tick: TickContext) -> None:
        self.check(tick.history)

    def check(self, hist: History) -> None:
        """Judge the chain over the window that ends at ``hist.now``; count and log a new storm."""
        cfg = self.cfg
        if not cfg.enabled or len(hist.samples) < 2:
            return
        now = hist.now
        w = cfg.window_ticks
        total = now.total_frames
        judged = self._judge_guests(hist)
        thrashing = [j.guest for j in judged if j.thrashing]
        for gid in thrashing:
            self.thrashing_ticks[gid] = self.thrashing_ticks.get(gid, 0) + 1
        io_peak = hist.host_max("io_pages", w)
        window = hist._window(w)
        io_grew = io_peak - window[0].io_pages
        need_guests = max(cfg.min_guests, math.ceil(cfg.min_guest_share * len(judged)))
        states = [s.memory_state for s in window if s.memory_state is not None]
        hard = self.hard_frames(total)
        free_min = hist.host_min("free_frames_min", w)
        swapped = hist.host_delta("swap_out_pages", w)
        oks = (len(thrashing) >= need_guests,
               io_peak >= cfg.io_fraction * total and io_grew >= max(1.0, cfg.io_growth_fraction * total),
               any(st in HARD_STATES for st in states) if states else free_min <= hard,
               swapped > cfg.swap_out_fraction * total)
        whole = all(oks)
        if whole and not self.active:
            # Only a storm that is logged needs the chain and the rows, with their rounding.
            guests = [self._row(j) for j in judged]
            healthy_hit = [j.guest for j in judged if not j.thrashing and j.host_took > 0]
            if states:
                free_link = {"link": "host_free_low", "value": states[-1], "threshold": "hard or low",
                             "states": sorted(set(states)), "free_frames_min": int(free_min), "ok": oks[2]}
            else:
                free_link = {"link": "host_free_low", "value": int(free_min), "threshold": hard,
                             "min_free_pages": esx_min_free_pages(total), "ok": oks[2]}
            chain = [
                {"link": "guests_thrashing", "value": len(thrashing), "threshold": need_guests,
                 "guests": thrashing, "stall_share_threshold": cfg.stall_share,
                 "guest_swap_in_pages_per_s_threshold": cfg.guest_swap_in_pages_per_s,
                 "guest_swap_in_per_kref_threshold": cfg.guest_swap_in_per_kref,
                 "guest_swap_pages_per_s_threshold": cfg.guest_swap_pages_per_s,
                 "guests_swap_pages_per_s": round(sum(g["swap_pages_per_s"] for g in guests), 1),
                 "ok": oks[0]},
                {"link": "host_io_memory", "value": int(io_peak), "threshold": int(cfg.io_fraction * total),
                 "cache_pages": now.cache_pages, "iobuf_pages": now.iobuf_pages,
                 "grew_pages": int(io_grew), "growth_threshold": int(cfg.io_growth_fraction * total),
                 "vdisk_pages_per_s": round(hist.host_rate("vdisk_pages", w), 1), "ok": oks[1]},
                free_link,
                {"link": "host_swapping", "value": int(swapped), "threshold": int(cfg.swap_out_fraction * total),
                 "pages_per_s": round(hist.host_rate("swap_out_pages", w), 1), "healthy_guests_hit": healthy_hit,
                 "ok": oks[3]},
            ]
            self.storms += 1
            self.active = True
            self._broken_ticks = 0
            self._started_tick = now.tick
            episode = {"storm": self.storms, "tick": now.tick, "vt_us": now.vt_us, "thrashing_guests": thrashing,
                       "healthy_guests_hit": healthy_hit}
            self.episodes.append(episode)
            self.log.warning(ev.SWAP_STORM_DETECTED, storm=self.storms, tick=now.tick, window_ticks=w,
                             total_frames=total, free_frames=now.free_frames, chain=chain, guests=guests)
        elif self.active:
            self._broken_ticks = 0 if whole else self._broken_ticks + 1
            if self._broken_ticks >= cfg.quiet_ticks:
                self.active = False
                self.episodes[-1]["ended_tick"] = now.tick
                self.log.info(ev.SWAP_STORM_ENDED, storm=self.storms, tick=now.tick,
                              lasted_ticks=now.tick - self._started_tick, quiet_ticks=cfg.quiet_ticks)

    def metrics(self) -> dict[str, Any]:
        return {"swap_storms": self.storms, "storm_active_at_end": self.active, "episodes": self.episodes,
                "thrashing_ticks": {str(k): v for k, v in sorted(self.thrashing_ticks.items())}}

    def finished_keys(self) -> dict[str, Any]:
        return {"swap_storm": self.metrics()}


# --- the analysis ---------------------------------------------------------------------------------


def summarize(monitors: Mapping[str, Any], host_events: Sequence[Mapping[str, Any]],
              finished: Mapping[str, Any]) -> SummaryKeys:
    storms = [e for e in host_events if e.get("event") == ev.SWAP_STORM_DETECTED]
    return SummaryKeys(variant={
        "swap_storms": len(storms),
        "swap_storm": {"first_tick": storms[0].get("tick") if storms else None,
                       "episodes": (monitors.get("swap_storm") or {}).get("episodes", [])},
    })


def report(v: Mapping[str, Any], fmt: ReportFormat) -> list[str]:
    if not v.get("swap_storms"):
        return []
    storm = v.get("swap_storm")
    first = storm.get("first_tick") if isinstance(storm, dict) else None
    out = [f"- swap storms: {v['swap_storms']}, the first at tick {fmt.cell(first)}"]
    episodes = storm.get("episodes") if isinstance(storm, dict) else None
    if isinstance(episodes, list) and episodes:
        out += ["", "Swap storm episodes:", "", fmt.table(episodes), ""]
    return out


SPEC = MonitorSpec(
    name="swap_storm",
    config=SwapStormConfig,
    make=lambda cfg, ctx: SwapStormDetector(cfg, ctx.log),
    history_ticks=lambda cfg: cfg.window_ticks,
    summarize=summarize,
    headline=(Headline("swap_storms", "swap storms detected",
                       lambda v: count_events(v, ev.SWAP_STORM_DETECTED, summary_key="swap_storms"), "lower"),),
    table_fragment=lambda v: f"swap_storms={v.get('swap_storms', 0)}",
    report=report,
)

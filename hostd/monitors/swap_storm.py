"""The swap-storm detector: the seed's chain of failures, link by link.

"When the Balloon Bursts": guests pushed below their working sets thrash;
their swap I/O floods the host's virtual-disk path; the host's I/O buffers
and disk cache grow in host frames; host free memory falls; the host starts
swapping, pages of healthy guests too. Over a window of ticks the detector
checks each link against its threshold:

1. ``guests_thrashing``: at least ``min_guests`` guests read pages back
   from their swap faster than ``guest_swap_in_pages_per_s`` (per guest
   virtual second) or more often than ``guest_swap_in_per_kref`` per 1000
   references (on a slow disk a thrashing guest cannot fault fast, but
   it faults often): they need what they just gave up. (A guest giving up
   cold pages to its balloon writes swap but reads none back.) A guest
   whose balloon leaves it less memory than its working set (its largest
   recent estimate: a stalled guest's estimate drops) and that swaps
   faster than ``guest_swap_pages_per_s`` counts too: on a slow disk the
   inflation's own swap-outs can take longer than the run.
2. ``host_io_memory``: the host's I/O buffers + disk cache reached
   ``io_fraction`` of its RAM;
3. ``host_free_low``: its free frames fell to ``free_fraction`` of its RAM;
4. ``host_swapping``: it swapped out ``swap_out_fraction`` of its RAM.

When every link holds, one storm is counted and ``swap_storm_detected`` is
logged with the whole chain (value and threshold of each link) and every
guest's rates. The storm ends (``swap_storm_ended``) once the chain has been
broken for ``quiet_ticks`` ticks; only then can another one be counted.

Its table (on by default; every key optional)::

    [monitors.swap_storm]
    enabled = true
    window_ticks = 10           # rates and peaks are taken over this many ticks
    guest_swap_in_pages_per_s = 500.0  # a guest reading back swapped pages faster than this thrashes,
    guest_swap_in_per_kref = 2.0       # ... or more of them than this per 1000 references (a slow disk),
    guest_swap_pages_per_s = 200.0     # ... or its balloon left it less than its working set and it
                                       #     swaps (in or out) faster than this
    min_guests = 1              # ... and at least this many must
    io_fraction = 0.05          # host I/O buffers + disk cache reached this share of host RAM
    free_fraction = 0.05        # host free frames fell to this share of host RAM
    swap_out_fraction = 0.01    # the host swapped out this share of its RAM within the window
    quiet_ticks = 20            # the chain must stay broken this long before a new storm counts

In summary.json: ``swap_storms`` (``swap_storm_detected`` events) and
``swap_storm`` (the first storm's tick, every episode); in report.md, the
storms and a table of their episodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from balloonlab.proto import events as ev

from .base import (Headline, MonitorBase, MonitorSpec, ReportFormat, SummaryKeys, TickContext,
                   at_least_one, count_events, fraction)
from .window import History

__all__ = ["SwapStormDetector", "SwapStormConfig", "SPEC"]


@dataclass(frozen=True, slots=True)
class SwapStormConfig:
    enabled: bool = True
    window_ticks: int = at_least_one(10)
    guest_swap_in_pages_per_s: float = 500.0
    guest_swap_in_per_kref: float = 2.0
    guest_swap_pages_per_s: float = 200.0
    min_guests: int = at_least_one(1)
    io_fraction: float = fraction(0.05)
    free_fraction: float = fraction(0.05)
    swap_out_fraction: float = fraction(0.01)
    quiet_ticks: int = 20

_WS_DECAY = 0.98   # per tick: how fast a larger earlier working-set estimate is forgotten


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
        w = self.cfg.window_ticks
        out = []
        first = hist._window(w)[0]
        for gid, g in sorted(hist.now.guests.items()):
            swap_rate = hist.guest_rate(gid, "swap_pages", w)
            swap_in_rate = hist.guest_rate(gid, "swap_in_pages", w)
            refs_rate = hist.guest_rate(gid, "refs", w)
            per_kref = swap_in_rate * 1000.0 / refs_rate if refs_rate > 0 else (float("inf") if swap_in_rate else 0.0)
            ws = max(float(g.working_set_pages), self._ws.get(gid, 0.0) * _WS_DECAY)
            self._ws[gid] = ws
            memory = g.ram_pages - g.kernel_pages - g.actual_pages
            below = memory < ws and swap_rate >= self.cfg.guest_swap_pages_per_s
            before = first.guests.get(gid)
            host_took = g.host_swap_out_pages - (before.host_swap_out_pages if before else 0)
            out.append({"guest": gid, "swap_pages_per_s": round(swap_rate, 1),
                        "swap_in_pages_per_s": round(swap_in_rate, 1),
                        "swap_in_per_kref": round(per_kref, 3) if per_kref != float("inf") else None,
                        "major_faults_per_s": round(hist.guest_rate(gid, "major_faults", w), 1),
                        "pff": round(g.pff, 1), "host_swapped_out_pages": int(host_took),
                        "balloon_target_pages": g.target_pages, "balloon_pages": g.actual_pages,
                        "working_set_pages": g.working_set_pages, "memory_pages": memory,
                        "below_working_set": memory < ws,
                        "thrashing": (swap_in_rate >= self.cfg.guest_swap_in_pages_per_s
                                      or (swap_in_rate > 0 and per_kref >= self.cfg.guest_swap_in_per_kref)
                                      or below)})
        return out

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
        guests = self.guest_rates(hist)
        thrashing = [g["guest"] for g in guests if g["thrashing"]]
        for gid in thrashing:
            self.thrashing_ticks[gid] = self.thrashing_ticks.get(gid, 0) + 1
        healthy_hit = [g["guest"] for g in guests if not g["thrashing"] and g["host_swapped_out_pages"] > 0]
        io_peak = hist.host_max("io_pages", w)
        free_min = hist.host_min("free_frames", w)
        swapped = hist.host_delta("swap_out_pages", w)
        chain = [
            {"link": "guests_thrashing", "value": len(thrashing), "threshold": cfg.min_guests,
             "guests": thrashing, "guest_swap_in_pages_per_s_threshold": cfg.guest_swap_in_pages_per_s,
             "guest_swap_in_per_kref_threshold": cfg.guest_swap_in_per_kref,
             "guest_swap_pages_per_s_threshold": cfg.guest_swap_pages_per_s,
             "guests_swap_pages_per_s": round(sum(g["swap_pages_per_s"] for g in guests), 1),
             "ok": len(thrashing) >= cfg.min_guests},
            {"link": "host_io_memory", "value": int(io_peak), "threshold": int(cfg.io_fraction * total),
             "cache_pages": now.cache_pages, "iobuf_pages": now.iobuf_pages,
             "grew_pages": int(io_peak - hist.host_min("io_pages", w)),
             "vdisk_pages_per_s": round(hist.host_rate("vdisk_pages", w), 1),
             "ok": io_peak >= cfg.io_fraction * total},
            {"link": "host_free_low", "value": int(free_min), "threshold": int(cfg.free_fraction * total),
             "ok": free_min <= cfg.free_fraction * total},
            {"link": "host_swapping", "value": int(swapped), "threshold": int(cfg.swap_out_fraction * total),
             "pages_per_s": round(hist.host_rate("swap_out_pages", w), 1), "healthy_guests_hit": healthy_hit,
             "ok": swapped >= max(1.0, cfg.swap_out_fraction * total)},
        ]
        whole = all(link["ok"] for link in chain)
        if whole and not self.active:
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

"""``senpai``: Meta's senpai, memory.high driven by PSI memory pressure, with memory.high as the balloon.

Follows facebookincubator/senpai ``senpai.py`` (commit c51e8e2, 2019),
``Senpai.tick`` line for line, per guest. Every ``tick_s`` (1 s) it reads
the cumulative ``some`` memory stall total, adds the change to an
integral, and:

- if ``integral > pressure_us`` (10,000 µs): loosen,
  ``adj = min((integral / pressure / coeff_backoff)^2 * max_backoff,
  max_backoff)``, ``limit += limit * adj``, integral reset, then
  ``interval - 1`` ticks of grace;
- else, during grace, wait;
- else tighten, ``adj = min((pressure / max(integral, 1) /
  coeff_probe)^2 * max_probe, max_probe)``, ``limit -= limit * adj``,
  integral reset, ``interval - 1`` ticks of grace.

Defaults from senpai's argument parser: ``interval`` 6, ``pressure_us``
10,000 (10 ms), ``max_probe`` 0.01, ``max_backoff`` 1.0, ``coeff_probe``
10, ``coeff_backoff`` 20. ``time_scale`` (1) scales the clock: 0.1 reads
every 0.1 virtual s and targets 1 ms per integral, the same stall share,
for runs of a few virtual seconds. ``--min-size`` / ``--max-size`` (100 MiB
/ 100 GiB) are larger than these guests: the limit lives in the guest's
own range, [``min_fraction`` x RAM but at least ``ram - max_balloon``,
``max_fraction`` x RAM].

The limit (memory.high) is the guest's memory: balloon target = ``ram -
limit``. As senpai does at start and whenever someone else changed
memory.high, the limit is reset to memory.current, here the guest's
memory in use (``ram - balloon - free``).

The stall total is ``memory_stall_us`` below: the guest's PSI
``psi_some_us`` when it reports it; until then, the virtual time its
vCPU spent not executing references (``vt_us - refs x ref_cost_us``, with
``ref_cost_us = mem_ref_us + cpu_us_per_ref`` of the run's cost model):
every fault, disk wait and balloon operation the guest's clock was charged
for. That also counts host-side stalls a real guest's PSI would see as
steal time, and a vCPU idling after its trace ran out; PSI is preferred.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from balloonlab.proto.costs import CostModel

from ..errors import PolicyConfigError
from .decision import Decision, hold
from .policy import ControllerBase, Param, fraction, non_negative, parse_params
from .view import STAT_FREE, STAT_REFS, GuestView, HostView

__all__ = ["SenpaiBalloon", "memory_stall_us", "STALL_PSI", "STALL_DERIVED", "backoff_factor", "probe_factor"]

STAT_PSI_SOME = "psi_some_us"
STALL_PSI = "psi_some_us"
STALL_DERIVED = "vt_us - refs x ref_cost_us"


def memory_stall_us(stats: Mapping[str, Any], ref_cost_us: float) -> tuple[float | None, str]:
    """The guest's cumulative memory stall in virtual µs and where it came from (None when it cannot tell)."""
    psi = stats.get(STAT_PSI_SOME)
    if psi is not None:
        return float(psi), STALL_PSI
    vt, refs = stats.get("vt_us"), stats.get(STAT_REFS)
    if vt is None or refs is None:
        return None, "none"
    return max(0.0, float(vt) - float(refs) * ref_cost_us), STALL_DERIVED


def backoff_factor(integral_us: float, pressure_us: float, coeff_backoff: float, max_backoff: float) -> float:
    err = integral_us / pressure_us
    return min((err / coeff_backoff) ** 2 * max_backoff, max_backoff)


def probe_factor(integral_us: float, pressure_us: float, coeff_probe: float, max_probe: float) -> float:
    err = pressure_us / max(integral_us, 1.0)
    return min((err / coeff_probe) ** 2 * max_probe, max_probe)


@dataclass
class _Cgroup:
    limit_pages: int
    last_total_us: float
    integral_us: float
    grace_ticks: int


class SenpaiBalloon(ControllerBase):
    name = "senpai"

    def __init__(self, interval: int, pressure_us: float, max_probe: float, max_backoff: float, coeff_probe: float,
                 coeff_backoff: float, tick_s: float, time_scale: float, min_fraction: float, max_fraction: float,
                 ref_cost_us: float | None = None) -> None:
        self.interval = interval
        self.pressure_us = pressure_us * time_scale
        self.max_probe = max_probe
        self.max_backoff = max_backoff
        self.coeff_probe = coeff_probe
        self.coeff_backoff = coeff_backoff
        self.tick_s = tick_s * time_scale
        self.min_fraction = min_fraction
        self.max_fraction = max_fraction
        self.ref_cost_us = ref_cost_us
        self._cg: dict[int, _Cgroup] = {}
        self._next_s: float | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SenpaiBalloon":
        def positive(doc: str, default: float) -> Param:
            return Param(float, default, doc, 0.0, lo_open=True)
        p = parse_params(cls.name, params, {
            "interval": Param(int, 6, "senpai --interval: ticks of grace before tightening", 1.0),
            "pressure_us": positive("senpai --pressure: stall (virtual us) per interval it aims for", 10_000.0),
            "max_probe": fraction("senpai --max-probe: largest tightening step (share of the limit)", 0.01),
            "max_backoff": fraction("senpai --max-backoff: largest loosening step (share of the limit)", 1.0),
            "coeff_probe": positive("senpai --coeff-probe", 10.0),
            "coeff_backoff": positive("senpai --coeff-backoff", 20.0),
            "tick_s": positive("senpai's tick (virtual s): time.sleep(1)", 1.0),
            "time_scale": positive("scales tick_s and pressure_us together (0.1: every 0.1 s, 1 ms)", 1.0),
            "min_fraction": fraction("senpai --min-size as a share of the guest's RAM", 0.0),
            "max_fraction": fraction("senpai --max-size as a share of the guest's RAM", 1.0),
            "ref_cost_us": non_negative(float, "one reference's cost (virtual us) when the guest reports no PSI; "
                                               "default: the run's mem_ref_us + cpu_us_per_ref", None)})
        if p["min_fraction"] > p["max_fraction"]:
            raise PolicyConfigError(f"balloon policy 'senpai': min_fraction {p['min_fraction']} is above "
                                    f"max_fraction {p['max_fraction']}")
        if p["ref_cost_us"] is not None and p["ref_cost_us"] < 0:
            raise PolicyConfigError(f"balloon policy 'senpai': ref_cost_us must be >= 0, got {p['ref_cost_us']}")
        return cls(**p)

    def bind_costs(self, costs: CostModel) -> None:
        """The run's cost model: what one reference costs when it does not stall (unless given as a parameter)."""
        if self.ref_cost_us is None:
            self.ref_cost_us = costs.mem_ref_us + costs.cpu_us_per_ref

    def _ref_cost_us(self) -> float:
        if self.ref_cost_us is None:
            default = CostModel()
            return default.mem_ref_us + default.cpu_us_per_ref
        return self.ref_cost_us

    def bounds(self, g: GuestView) -> tuple[int, int]:
        """[min, max] of the limit in pages: the guest's range, never beyond the host's largest balloon."""
        floor = g.ram_pages - g.max_balloon_pages
        hi = max(int(self.max_fraction * g.ram_pages), floor)
        lo = min(max(int(self.min_fraction * g.ram_pages), floor), hi)
        return lo, hi

    def _set_limit(self, g: GuestView, pages: float) -> int:
        lo, hi = self.bounds(g)
        return int(max(lo, min(hi, int(pages))))

    def decide(self, view: HostView) -> dict[int, Decision] | None:
        now_s = view.vt_us / 1e6
        if not view.guests or (self._next_s is not None and now_s < self._next_s):
            return None
        self._next_s = now_s + self.tick_s
        live = {g.guest_id for g in view.guests}
        for gone in set(self._cg) - live:
            del self._cg[gone]
        return {g.guest_id: self._tick(g) for g in view.guests}

    def _tick(self, g: GuestView) -> Decision:
        total, source = memory_stall_us(g.stats, self._ref_cost_us())
        if total is None:
            return hold(g, "no_stall_stat", "the guest reports neither psi_some_us nor vt_us and refs: no pressure "
                        "to read")
        cg = self._cg.get(g.guest_id)
        current = g.ram_pages - g.actual_pages - int(g.stat(STAT_FREE))
        base = {"stall_total_us": total, "pressure_us": self.pressure_us, "memory_current_pages": current}
        if cg is None:
            # Senpai.__init__ -> set_limit(None): memory.high starts at memory.current.
            limit = self._set_limit(g, current)
            self._cg[g.guest_id] = _Cgroup(limit, total, 0.0, self.interval)
            return Decision(g.ram_pages - limit, "reset_to_current", (
                f"senpai starts: limit set to memory.current = {current} pages in use (stall from {source})"),
                {**base, "limit_pages": limit})
        delta = total - cg.last_total_us
        cg.last_total_us = total
        cg.integral_us += delta
        inputs = {**base, "stall_delta_us": delta, "integral_us": cg.integral_us, "grace_ticks": cg.grace_ticks}
        if cg.integral_us > self.pressure_us:
            adj = backoff_factor(cg.integral_us, self.pressure_us, self.coeff_backoff, self.max_backoff)
            return self._adjust(g, cg, adj, "loosen", (
                f"memory stall {cg.integral_us:.0f} µs (from {source}) above the target {self.pressure_us:g} µs: "
                f"back off by {adj:.4f}"), inputs)
        if cg.grace_ticks:
            cg.grace_ticks -= 1
            return hold(g, "grace", (f"stall {cg.integral_us:.0f} µs within {self.pressure_us:g} µs; "
                                     f"{cg.grace_ticks + 1} tick(s) to probe"), **inputs, limit_pages=cg.limit_pages)
        adj = probe_factor(cg.integral_us, self.pressure_us, self.coeff_probe, self.max_probe)
        return self._adjust(g, cg, -adj, "tighten", (
            f"memory stall {cg.integral_us:.0f} µs (from {source}) below the target {self.pressure_us:g} µs "
            f"over the interval: probe by {adj:.4f}"), inputs)

    def _adjust(self, g: GuestView, cg: _Cgroup, factor: float, code: str, why: str,
                inputs: dict[str, float]) -> Decision:
        before = cg.limit_pages
        cg.integral_us = 0.0
        cg.grace_ticks = self.interval - 1
        if g.target_pages != g.ram_pages - before:
            # import_limit: memory.high is not what senpai wrote (the host limited the target): memory.current.
            cg.limit_pages = self._set_limit(g, inputs["memory_current_pages"])
            return Decision(g.ram_pages - cg.limit_pages, "reset_to_current", (
                f"{why}, but the target is {g.target_pages} pages, not the {g.ram_pages - before} senpai set: limit "
                f"reset to memory.current = {cg.limit_pages} pages"), {**inputs, "limit_pages": cg.limit_pages})
        cg.limit_pages = self._set_limit(g, before + before * factor)
        return Decision(g.ram_pages - cg.limit_pages, code, f"{why}: limit {before} -> {cg.limit_pages} pages",
                        {**inputs, "factor": factor, "limit_before_pages": before, "limit_pages": cg.limit_pages})

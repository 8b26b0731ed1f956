"""The guests' clocks against the host's at tick ends, read from a run's logs.

Time-bounded guests (proto/README.md, "The overshoot bound"): a guest's
vCPU parks at the end of each tick, and its clock there (``TickDone.vt_us``)
is at least the tick's end and past it by at most one reference plus the
one request that was in flight at the gate, sent in that tick::

    0 <= guest_vt - host_tick_end <= inflight_us + ref_us + zero_fill_us + 256 * balloon_page_us

with ``ref_us = mem_ref_us + cpu_us_per_ref``, ``zero_fill_us =
minor_fault_us + page_zero_us`` (a fault's own work between two of its
requests) and the last term one balloon hypercall's per-page work.
``inflight_us`` is what the guest reports with the tick
(``tick_inflight_us``: how far past the tick's end the last request it sent
before the gate completed). A request counts only in the tick it was sent
in: when one overran by more than a tick, the guest's clock is still past
the next tick's end with nothing in flight, and that tick end is late (the
host counts it so too); such tick ends are also counted as ``ahead``. (The
request that did so was an EPT fault of a window of hundreds of
host-swapped pages, read one after another; the host now stops a fault at
the tick's end, ``HostMemory.open_tick``, so the one request in flight is
at most one page's read.) In the run's last tick a guest lets its fault in
flight finish whole (guestd/gate.py): the logs' bound still holds there,
because ``tick_inflight_us`` covers it, and the host does not count it.

Two readings, both per variant:

- **the logs**: every guest's ``tick_completed`` line (``tick_vt_us``,
  ``tick_inflight_us``; guests log every ``metrics_every_ticks`` ticks, so
  run with ``--set metrics_every_ticks=1`` to see every tick end) against the
  host's end of that tick (its ``tick_completed`` ``vt_us`` for the same
  tick, else ``(tick + 1) * tick_us``);
- **the host's own count** over every ``TickDone`` of every guest
  (``tick_done_late``, ``tick_done_max_over_us`` in summary.json's host
  section: over = ``vt_us - max(tick end, the guest's last reply's
  completion)`` beyond one reference plus the zero-fill and balloon terms;
  every tick but the run's last).

A run under a lock model (``[locks]`` enabled) is reported but exempt: its
guests do not hold requests at the gate (proto/README.md says why).
``balloonlab-validate --clocks RUN_DIR ...`` prints the table.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["ClockCheck", "check_clocks", "format_clocks", "variant_dirs"]

_EPS_US = 1e-3   # the logs round clocks to 3 decimals


@dataclass
class ClockCheck:
    """One variant's guests against its host."""

    run: str
    variant: str
    tick_us: float
    bound_us: float                 # the bound's fixed part (reference + zero fill + balloon round)
    ticks_checked: int = 0          # guest tick ends read from the logs
    guests: int = 0
    late: int = 0                   # past the bound
    early: int = 0                  # before the tick's end
    ahead: int = 0                  # tick ends the guest's clock had already passed at the previous one
    max_over_us: float = 0.0        # the largest guest_vt - tick end
    max_inflight_us: float = 0.0    # the largest in-flight part the guests reported
    max_excess_us: float = 0.0      # the largest amount past the bound
    worst: list[dict[str, Any]] = field(default_factory=list)   # up to 5 offending tick ends
    host_late: int | None = None    # the host's count over every TickDone (None: not in the summary)
    host_max_over_us: float | None = None
    exempt: str = ""                # why the bound does not apply (a lock model)

    @property
    def ok(self) -> bool:
        if self.exempt:
            return True
        return self.ticks_checked > 0 and self.late == 0 and self.early == 0 and not self.host_late

    def row(self) -> list[str]:
        host = "-" if self.host_late is None else f"{self.host_late} (max {self.host_max_over_us or 0:,.0f} µs)"
        status = f"exempt ({self.exempt})" if self.exempt else "pass" if self.ok else "FAIL"
        return [self.run, self.variant, str(self.guests), str(self.ticks_checked), f"{self.max_over_us:,.1f}",
                f"{self.max_inflight_us:,.1f}", f"{self.bound_us:,.1f}", str(self.late), str(self.early), host,
                status]


def variant_dirs(run_dir: Path) -> Iterator[tuple[str, Path]]:
    """(variant, directory with host.jsonl) of a run directory, a sweep's or a validation's parent too."""
    run_dir = Path(run_dir)
    if (run_dir / "host.jsonl").exists():
        yield run_dir.name, run_dir
        return
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if (sub / "host.jsonl").exists():
            yield sub.name, sub
        else:
            for name, d in variant_dirs(sub):
                yield f"{sub.name}/{name}", d


def _lines(path: Path, event: str) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            if event not in line:
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e.get("event") == event:
                yield e


def _num(x: Any, default: float = 0.0) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else default


def _host_counts(vdir: Path, variant: str) -> tuple[int | None, float | None]:
    for path in (vdir / "summary.json", vdir.parent / "summary.json"):
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        variants = s.get("variants") or {}
        v = variants.get(variant) or (next(iter(variants.values())) if len(variants) == 1 else s)
        for where in (v.get("host") or {}, v):
            if "tick_done_late" in where:
                return int(where["tick_done_late"]), _num(where.get("tick_done_max_over_us"))
    return None, None


def check_variant(vdir: Path, variant: str, run: str = "") -> ClockCheck:
    from balloonlab.proto.costs import CostModel

    cfg = json.loads((vdir / "host-config.json").read_text())
    tick_us = _num(cfg.get("tick_us"), 10_000.0)
    costs = CostModel.from_mapping(cfg.get("costs") or {})
    ref_us = float(costs.mem_ref_us) + float(getattr(costs, "cpu_us_per_ref", 0.0))
    fixed = (ref_us + float(costs.minor_fault_us) + float(getattr(costs, "page_zero_us", 0.0))
             + 256 * float(getattr(costs, "balloon_page_us", 0.0)))
    out = ClockCheck(run=run, variant=variant, tick_us=tick_us, bound_us=fixed)
    locks = cfg.get("locks") or {}
    if locks.get("enabled") or locks.get("protocol") not in (None, "", "none"):
        out.exempt = "lock model"
    host_end = {int(e["tick"]): _num(e.get("vt_us"))
                for e in _lines(vdir / "host.jsonl", "tick_completed") if isinstance(e.get("tick"), int)}
    for path in sorted(vdir.glob("guest-*.jsonl")):
        gid = path.stem.split("-", 1)[1]
        seen = 0
        prev: tuple[int, float] | None = None
        for e in _lines(path, "tick_completed"):
            tick = e.get("tick")
            if not isinstance(tick, int):
                continue
            vt = _num(e.get("tick_vt_us", e.get("vt_us")), math.nan)
            if math.isnan(vt):
                continue
            end = host_end.get(tick) or (tick + 1) * tick_us
            inflight = _num(e.get("tick_inflight_us"))
            # A request in flight explains the overshoot only in the tick it was sent in: a guest whose clock
            # was already past this tick's end at the previous one ran nothing in this tick (the host counts
            # that TickDone late too).
            carried = prev is not None and prev[0] == tick - 1 and prev[1] >= end - _EPS_US
            prev = (tick, vt)
            if carried:
                out.ahead += 1
                inflight = 0.0
            over = vt - end
            excess = over - (inflight + fixed)
            seen += 1
            out.max_over_us = max(out.max_over_us, over)
            out.max_inflight_us = max(out.max_inflight_us, inflight)
            bad = ""
            if over < -_EPS_US:
                out.early += 1
                bad = "before the tick's end"
            elif excess > _EPS_US:
                out.late += 1
                out.max_excess_us = max(out.max_excess_us, excess)
                bad = ("still past the tick's end from a request of an earlier tick" if carried
                       else "past the bound")
            if bad and len(out.worst) < 5:
                out.worst.append({"guest": gid, "tick": tick, "guest_vt_us": vt, "host_end_us": end,
                                  "over_us": round(over, 3), "inflight_us": inflight, "what": bad})
        out.ticks_checked += seen
        out.guests += 1 if seen else 0
    out.host_late, out.host_max_over_us = _host_counts(vdir, variant)
    return out


def check_clocks(run_dir: Path) -> list[ClockCheck]:
    """Every variant of a run directory (or of every run below it)."""
    run_dir = Path(run_dir)
    checks = [check_variant(d, name.rsplit("/", 1)[-1], f"{run_dir.name}/{name.rsplit('/', 1)[0]}"
                            if "/" in name else run_dir.name)
              for name, d in variant_dirs(run_dir)]
    if not checks:
        raise FileNotFoundError(f"{run_dir}: no run here (no host.jsonl in it or below it)")
    return checks


def format_clocks(checks: list[ClockCheck]) -> str:
    head = ["run", "variant", "guests", "tick ends", "max over µs", "max in flight µs", "bound µs (+ in flight)",
            "late", "early", "host-counted late", "result"]
    rows = [head, *(c.row() for c in checks)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for c in checks:
        for w in c.worst:
            lines.append(f"  {c.run}/{c.variant}: guest {w['guest']} tick {w['tick']}: {w['what']} "
                         f"(guest {w['guest_vt_us']:,.1f} µs, host's end {w['host_end_us']:,.1f}, "
                         f"in flight {w['inflight_us']:,.1f})")
    return "\n".join(lines)


def as_dict(c: ClockCheck) -> Mapping[str, Any]:
    return {**asdict(c), "ok": c.ok}

"""Re-measure the numbers the README quotes for the shipped scenarios: ``bench.py readme [NAME ...]``.

Each README section measured a scenario with a command (its sizes and seed);
this runs the same commands and prints one table, scenario / variant / metric
/ value, with the command that measured it, so the numbers can be re-read
after any change (and pasted into the README). The guests' clocks are checked
against the host's on every run too (``balloonlab.analysis.clocks``).

    python scripts/bench.py readme                      # every scenario below (~10 min on 2 cores)
    python scripts/bench.py readme swap-storm nested-swap
    python scripts/bench.py readme --from runs/readme-TIME   # re-read finished runs, run nothing
    python scripts/bench.py readme --json
    python scripts/bench.py readme policies --variants none,static,mom --out runs/readme-X   # a long scenario
                                                  # in parts (one lock hold each), then --from runs/readme-X

Run it under the suite lock, a few scenarios at a time if the whole set would
hold it too long. The validations (``validate-*``) run through
``balloonlab-validate`` and print each check's measured value.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["main", "SCENARIOS", "metrics_of"]


@dataclass(frozen=True)
class Measured:
    """What a README section quotes for one scenario, and how it was measured."""

    scenario: str
    section: str
    guests: int | None = None
    seed: int | None = None
    ticks: int | None = None
    extra: Callable[[Mapping[str, Any]], list[tuple[str, Any]]] | None = None
    args: Sequence[str] = field(default_factory=tuple)

    @property
    def command(self) -> str:
        parts = [f".venv/bin/balloonlab-launch --scenario {self.scenario}"]
        if self.guests is not None:
            parts.append(f"--guests {self.guests}")
        if self.seed is not None:
            parts.append(f"--seed {self.seed}")
        if self.ticks is not None:
            parts.append(f"--ticks {self.ticks}")
        return " ".join(parts)


def _get(d: Mapping[str, Any], path: str, default: Any = None) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _refs(v: Mapping[str, Any]) -> float:
    return float(sum(float(g.get("refs_per_vsec") or 0.0) for g in v.get("guests") or []))


def _common(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    host = v.get("host") or {}
    rows: list[tuple[str, Any]] = [
        ("status", v.get("status", v.get("reason"))),
        ("refs/vs (all guests)", round(_refs(v))),
        ("host swap-outs", host.get("swap_out_pages")),
        ("host swap-ins", host.get("swap_in_pages")),
        ("host swap writes avoided (swap cache)", host.get("swap_writes_avoided")),
        ("guest evictions", sum(int(g.get("evictions") or 0) for g in v.get("guests") or [])),
        ("lost pages", v.get("lost_pages")),
    ]
    return [(k, x) for k, x in rows if x is not None]


def _ioamp(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    r = v.get("reclaimed_by_mechanism") or {}
    return [("host I/O per clean-cache page", v.get("clean_cache_host_io_per_page")),
            *((f"reclaimed: {k}", x) for k, x in r.items())]


def _storm(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    t = v.get("throughput") or {}
    host = v.get("host") or {}
    peaks = host.get("peaks") or {}
    io = (peaks.get("iobuf_pages") or 0) + (peaks.get("cache_pages") or 0) if peaks else None
    return [("swap_storms", v.get("swap_storms")), ("I/O buffer peak (pages)", host.get("io_buffer_pages_peak")),
            ("host I/O memory peak (I/O buffers + cache, pages)", io),
            ("first inflation tick", t.get("first_inflation_tick")),
            ("refs/vs before first inflation", _round(t.get("before_inflation_refs_per_vsec"))),
            ("refs/vs after first inflation", _round(t.get("after_inflation_refs_per_vsec")))]


def _nested(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    host = v.get("host") or {}
    return [("double faults", host.get("double_faults")),
            ("double faults after the pin", host.get("double_faults_after_pin")),
            ("pinned pages peak", host.get("pinned_pages_peak")),
            ("double paging pages", host.get("double_paging_pages")),
            ("swap_storms", v.get("swap_storms"))]


def _banker(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    steps = _get(v, "convergence.steps", []) or []
    out: list[tuple[str, Any]] = []
    for i, s in enumerate(steps[:2]):
        out.append((f"step {i + 1}: tick / demand rise / settled after / overshoot / PFF-above ticks",
                    f"{s.get('step_tick')} / +{s.get('demand_rise_pages')} / "
                    f"{s.get('convergence_ticks') if s.get('settled') else 'never'} / "
                    f"{s.get('overshoot_pages')} / {s.get('pff_above_ticks')}"))
    return out


def _sweep(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    s = _get(v, "balloon_sweep.0", {}) or {}
    return [("knee at guest free (pages)", s.get("knee_guest_free_pages")),
            ("last good guest free (pages)", s.get("last_good_guest_free_pages")),
            ("true working set (pages)", s.get("true_working_set_pages")),
            ("guest's estimate at the knee (pages)", s.get("working_set_estimate_at_knee_pages")),
            ("throughput at the knee (refs/vs)", _round(s.get("knee_refs_per_vsec"))),
            ("throughput before the sweep (refs/vs)", _round(s.get("baseline_refs_per_vsec")))]


def _states(v: Mapping[str, Any]) -> list[tuple[str, Any]]:
    host = v.get("host") or {}
    ticks = host.get("memory_state_ticks") or {}
    return [("high/clear/soft/hard/low ticks", " / ".join(str(ticks.get(k, 0)) for k in
                                                          ("high", "clear", "soft", "hard", "low")) if ticks else None),
            ("first tick by state", host.get("memory_state_first_tick")),
            ("host swap-out by state", host.get("swap_out_pages_by_state"))]


def _round(x: Any) -> Any:
    return round(x) if isinstance(x, float) and math.isfinite(x) else x


SCENARIOS: tuple[Measured, ...] = (
    Measured("io-amplification", "Running scenarios / Benchmarks (ioamp)", guests=4, seed=3, extra=_ioamp),
    Measured("swap-storm", "The pathologies: swap-storm", guests=4, seed=7, extra=_storm),
    Measured("nested-swap", "The pathologies: nested-swap", guests=2, ticks=50, extra=_nested),
    Measured("central-banker", "The pathologies: central-banker", guests=4, seed=5, extra=_banker),
    Measured("balloon-sweep", "The pathologies: balloon-sweep", seed=3, extra=_sweep),
    Measured("memory-states", "Host memory states (ESX)", seed=11, extra=_states),
    Measured("policies", "Benchmarks / docs/policies.md: the controllers side by side"),
)
VALIDATIONS = ("fig7", "fig6", "esx41", "seed-claim")


def metrics_of(m: Measured, summary: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """(variant, metric, value) rows of one scenario's summary."""
    rows: list[tuple[str, str, Any]] = []
    for name, v in (summary.get("variants") or {}).items():
        for metric, value in [*_common(v), *(m.extra(v) if m.extra else [])]:
            if value is not None:
                rows.append((name, metric, value))
    return rows


def _clock_rows(run_dir: Path) -> list[tuple[str, str, Any]]:
    from balloonlab.analysis.clocks import check_clocks

    rows = []
    for c in check_clocks(run_dir):
        rows.append((c.variant, "clocks: tick ends / late / early / host-counted late",
                     f"{c.ticks_checked} / {c.late} / {c.early} / {c.host_late}"))
    return rows


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    if isinstance(x, Mapping):
        return json.dumps(x, separators=(",", ":"))
    return str(x)


def main(argv: Sequence[str] | None = None) -> int:
    names = [m.scenario for m in SCENARIOS] + [f"validate-{v}" for v in VALIDATIONS]
    ap = argparse.ArgumentParser(prog="bench.py readme", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"scenarios to measure (default: all of {names})")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default runs/readme-TIME)")
    ap.add_argument("--from", dest="src", type=Path, default=None,
                    help="re-read the runs of an earlier `readme` (its --out) instead of running")
    ap.add_argument("--variants", default=None, metavar="V1,V2",
                    help="only these variants of the named scenario(s), each its own run in OUT/NAME/variant-V "
                         "(a scenario too long for one lock hold measured in parts; --from reads the parts)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        print(f"bench.py readme: unknown scenario(s) {unknown}; known: {names}", file=sys.stderr)
        return 2
    chosen = args.names or names
    out = args.src or args.out or Path("runs") / f"readme-{time.strftime('%Y%m%d-%H%M%S')}"
    import balloonlab
    from balloonlab.validate import VALIDATIONS as VALS, validate

    out.mkdir(parents=True, exist_ok=True)
    table: list[dict[str, Any]] = []
    status = 0
    for name in chosen:
        t0 = time.monotonic()
        if name.startswith("validate-"):
            val = next(v for v in VALS if v.name == name[len("validate-"):])
            cmd = f".venv/bin/balloonlab-validate {val.name}"
            if args.src:
                print(f"bench.py readme: {name}: --from re-reads launch runs only; run it again", file=sys.stderr)
                continue
            checks, run_dir = validate(val, out / "validate")
            for c in checks:
                table.append({"scenario": name, "variant": "-", "metric": c.check, "value": c.measured,
                              "note": c.status, "command": cmd})
            status = status or int(any(c.status == "FAIL" for c in checks))
        else:
            m = next(s for s in SCENARIOS if s.scenario == name)
            run_dir = out / name
            parts = [run_dir / f"variant-{v}" for v in args.variants.split(",")] if args.variants else [run_dir]
            if args.src:
                if not args.variants and not (run_dir / "summary.json").exists():
                    parts = sorted(run_dir.glob("variant-*"))     # measured in parts
                summaries = [json.loads((p / "summary.json").read_text()) for p in parts]
            else:
                summaries = []
                if args.variants:
                    run_dir.mkdir(exist_ok=True)      # the parts' parent (a run directory's must exist)
                for part in parts:
                    variant = part.name[len("variant-"):] if part != run_dir else None
                    r = balloonlab.run(m.scenario, guests=m.guests, seed=m.seed, ticks=m.ticks, run_dir=part,
                                       variant=variant, report=False, verbose=False)
                    summaries.append(r.summary)
                    if not r.ok:
                        status = 1
            summary = {"variants": {k: v for s in summaries for k, v in (s.get("variants") or {}).items()}}
            for variant, metric, value in [*metrics_of(m, summary), *(row for p in parts for row in _clock_rows(p))]:
                table.append({"scenario": name, "variant": variant, "metric": metric, "value": value, "note": "",
                              "command": m.command})
        print(f"bench.py readme: {name}: {time.monotonic() - t0:.0f} s wall ({run_dir})", file=sys.stderr)
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return status
    head = ["scenario", "variant", "metric", "value", "note"]
    rows = [head, *([r["scenario"], r["variant"], r["metric"], _fmt(r["value"]), r["note"]] for r in table)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\ncommands:")
    for cmd in dict.fromkeys(r["command"] for r in table):
        print(f"  {cmd}")
    return status


if __name__ == "__main__":
    sys.exit(main())

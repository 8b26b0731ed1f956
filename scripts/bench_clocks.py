"""Every shipped scenario at small sizes, its guests' clocks against the host's at every tick end.

    python scripts/bench.py clocks                       # all of scripts/scenarios/*.toml
    python scripts/bench.py clocks swap-storm nested-swap --ticks 60 --guests 3

Each scenario runs with ``metrics_every_ticks = 1`` (every guest logs every
tick end) for ``--ticks`` ticks with at most ``--guests`` guests; then
``balloonlab.analysis.clocks`` reads the logs: a guest's clock at a tick end
is at or past the host's end of that tick, by at most one reference, a zero
fill and a balloon round plus the request in flight at the gate; the host's
own count over every TickDone is printed beside it. A lock model's runs are
exempt (proto/README.md, "The overshoot bound"). Exit status 1 when a
scenario's clocks fail.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main", "shipped_scenarios"]


def shipped_scenarios() -> list[str]:
    from balloonlab.scenario import find_scenario

    here = find_scenario("basic").parent
    return sorted(p.stem for p in here.glob("*.toml"))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py clocks", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="SCENARIO", help="scenarios (default: every shipped one)")
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--guests", type=int, default=2, help="at most this many guests (a scenario with fewer keeps them)")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default runs/clocks-TIME)")
    args = ap.parse_args(argv)
    import balloonlab
    from balloonlab.analysis.clocks import check_clocks, format_clocks
    from balloonlab.scenario import find_scenario, load_scenario
    from balloonlab.validate import VALIDATIONS

    names = args.names or shipped_scenarios()
    out = args.out or Path("runs") / f"clocks-{time.strftime('%Y%m%d-%H%M%S')}"
    checks = []
    status = 0
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        sc = load_scenario(find_scenario(name))
        guests = min(args.guests, int(sc.raw.get("scenario", {}).get("guests", args.guests)))
        sets: dict[str, object] = {"scenario.metrics_every_ticks": 1}
        val = next((v for v in VALIDATIONS if v.scenario == name), None)
        run_dir = out / name
        if val is not None and val.prepare is not None:
            sets.update(val.prepare(run_dir, int(sc.raw.get("scenario", {}).get("seed", 1))))
        t0 = time.monotonic()
        r = balloonlab.run(name, guests=guests, ticks=args.ticks, overrides=sets, run_dir=run_dir, report=False,
                           verbose=False)
        got = check_clocks(run_dir)
        checks += got
        bad = [c for c in got if not c.ok]
        status = status or int(bool(bad))
        print(f"bench.py clocks: {name}: {len(got)} variant(s), {sum(c.ticks_checked for c in got)} tick ends, "
              f"{'FAIL' if bad else 'ok'}, run {'ok' if r.ok else 'not ok'}, {time.monotonic() - t0:.0f} s wall",
              file=sys.stderr, flush=True)
    print(format_clocks(checks))
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The engine's speed and memory targets in one table, each against its anchor measured in the same run.

    python scripts/bench.py targets --anchor DIR [--only traces,ioamp,scale] [--rounds N] [--json FILE]

Runs, one after the other, as separate processes (their own output is
shown as they go):

- ``traces``: the guest kernel path on lackey traces of real programs at
  about 2 % and 10 % misses, against libCacheSim's Clock (needs the
  ``bench`` extra and valgrind). Target: every ratio >= 0.5x.
- ``ioamp --anchor DIR``: the io-amplification demo here and in ``DIR``
  (another checkout with its own ``.venv``), virtual s per wall s as a
  ratio (target >= 5x), and the host's CPU per EPT fault or disk request
  against a bare framed uvloop echo's server CPU per round trip measured in
  the same run (target <= 2x).
- ``scale --guests 4,16,64,256 --ticks 100 --modes fork --anchor DIR
  --anchor-guests 64``: the scaling curve; 64 guests' wall time as a ratio
  of the anchor's (target >= 10x); 256 guests run every tick with no page
  lost, each guest's private memory (``Private_Clean + Private_Dirty`` of
  smaps_rollup, its peak) under 20 MiB.

``DIR`` is the code the targets are measured against: an export of the
code as it was when they were set (``git archive bf5efbc``, which has its
own ``scripts/launch.py`` layout; ``scripts/bench_checkout.py``), installed
with its own ``.venv``. Without ``--anchor`` the ratios that need it are
printed as not measured. The table ends the output; it is a measurement,
never a pass/fail: the exit status is 0 unless a benchmark could not run.

``--rounds N``: the speed of this machine drifts (on the shared 2-vCPU VM
the same run takes 1.5-2x longer at one hour than at another), so a ratio
is only fair between runs taken back to back. Each round runs the anchor
and then this checkout (ioamp, and 64 guests of scale); the table shows
the median of the rounds' ratios and each round's. Three by default: on
this VM single 64-guest rounds taken within minutes of each other spread
by ~10 % (9.93-11.13x around a median of 10.46x), their median by much less.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent

__all__ = ["main", "Target", "PARTS"]

PARTS = ("traces", "ioamp", "scale")


class Target:
    """One line of the table: what, the goal, what was measured (None: not measured) and how it compares."""

    def __init__(self, what: str, goal: str, value: float | None, shown: str, met: bool | None) -> None:
        self.what, self.goal, self.value, self.shown, self.met = what, goal, value, shown, met

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "goal": self.goal, "value": self.value, "shown": self.shown, "met": self.met}


def _run(argv: list[str]) -> int:
    print(f"\n$ {' '.join(argv)}", flush=True)
    return subprocess.run(argv, cwd=REPO).returncode


def _bench(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "bench.py"), name, *args]


def traces_targets(out: Path) -> list[Target]:
    """The kernel path against libCacheSim's Clock: the smallest ratio over programs, miss ratios and policies."""
    argv = _bench("traces", "--json")
    print(f"\n$ {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        rows = json.loads(last)
    except ValueError:
        rows = []
    (out / "traces.json").write_text(json.dumps(rows))
    # kernel_<policy>_ratio is refs/s against libCacheSim's; kernel_<policy>_miss_ratio is a miss ratio.
    ratios = [(v, r["program"], k) for r in rows for k, v in r.items()
              if k.startswith("kernel_") and k.endswith("_ratio") and not k.endswith("_miss_ratio")]
    if proc.returncode != 0 or not ratios:
        return [Target("guest kernel path vs libCacheSim Clock (refs/s)", ">= 0.5x", None,
                       f"not measured (bench traces exit {proc.returncode})", None)]
    low, prog, key = min(ratios)
    programs = sorted({r["program"] for r in rows})
    return [Target("guest kernel path vs libCacheSim Clock (refs/s)", ">= 0.5x", low,
                   f"min {low:.2f}x ({prog}, {key.removeprefix('kernel_').removesuffix('_ratio')}) over "
                   f"{len(rows)} runs of {', '.join(programs)}", low >= 0.5)]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _over_rounds(ratios: list[float], unit: str = "x") -> str:
    """How a ratio taken in several back-to-back rounds is shown: its median, then every round's."""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}{unit}"
    return (f"median {_median(ratios):.2f}{unit} over {len(ratios)} rounds ("
            + ", ".join(f"{r:.2f}" for r in ratios) + ")")


def ioamp_targets(out: Path, anchor: Path | None, rounds: int = 1) -> list[Target]:
    """Each round runs the anchor, then this checkout, then the echo: the ratios are taken within a round."""
    speed, speed_shown, cpu_ratio, cpu_shown = [], [], [], []
    for i in range(rounds):
        path = out / f"ioamp-{i}.json"
        rc = _run(_bench("ioamp", "--json", str(path), *(["--anchor", str(anchor)] if anchor else [])))
        res = json.loads(path.read_text()) if rc == 0 and path.exists() else {}
        vs = sum(v["virtual_s"] for v in res.get("variants", {}).values()) / res["total_wall_s"] if res else None
        a_vs = res.get("anchor_vs_per_ws")
        if vs and a_vs:
            speed.append(vs / a_vs)
            speed_shown.append(f"{vs:.3f} vs {a_vs:.3f}")
        cpu, echo = res.get("host_cpu_us_per_request"), res.get("echo_server_cpu_us_per_round_trip")
        if cpu and echo:
            cpu_ratio.append(cpu / echo)
            cpu_shown.append(f"{cpu:.0f} vs {echo:.1f} µs")
    targets = []
    if speed:
        r = _median(speed)
        detail = speed_shown[0] if len(speed) == 1 else "; ".join(speed_shown)
        targets.append(Target("io-amplification: virtual s per wall s vs the anchor", ">= 5x", r,
                              f"{_over_rounds(speed)} ({detail})", r >= 5.0))
    else:
        targets.append(Target("io-amplification: virtual s per wall s vs the anchor", ">= 5x", None,
                              "not measured" + ("" if anchor else " (no --anchor)"), None))
    if cpu_ratio:
        r = _median(cpu_ratio)
        detail = cpu_shown[0] if len(cpu_ratio) == 1 else "; ".join(cpu_shown)
        targets.append(Target("host CPU per request vs the echo's server CPU per round trip", "<= 2x", r,
                              f"{_over_rounds(cpu_ratio)} ({detail})", r <= 2.0))
    else:
        targets.append(Target("host CPU per request vs the echo's server CPU per round trip", "<= 2x", None,
                              "not measured", None))
    return targets


def scale_targets(out: Path, anchor: Path | None, counts: str, rounds: int = 1) -> list[Target]:
    """The curve once; with ``rounds`` > 1, 64 guests here and in the anchor again, back to back, per round."""
    path = out / "scale.json"
    argv = _bench("scale", "--guests", counts, "--ticks", "100", "--modes", "fork", "--json", str(path))
    if anchor:
        argv += ["--anchor", str(anchor), "--anchor-guests", "64"]
    _run(argv)
    res = json.loads(path.read_text()) if path.exists() else {"rows": [], "anchor": {}}
    by = {r["guests"]: r for r in res["rows"] if r["mode"] == "fork"}
    targets = []
    pairs = [(by.get(64), res["anchor"].get("64"))]
    for i in range(1, rounds if anchor else 1):
        extra = out / f"scale-64-{i}.json"
        _run(_bench("scale", "--guests", "64", "--ticks", "100", "--modes", "fork", "--json", str(extra),
                    "--anchor", str(anchor), "--anchor-guests", "64"))
        more = json.loads(extra.read_text()) if extra.exists() else {"rows": [], "anchor": {}}
        pairs.append((next((r for r in more["rows"] if r["mode"] == "fork" and r["guests"] == 64), None),
                      more["anchor"].get("64")))
    ratios, shown = [], []
    for here, there in pairs:
        if here and there and here["wall_s"] and there["wall_s"] and here["exit"] == 0:
            ratios.append(there["wall_s"] / here["wall_s"])
            shown.append(f"{here['wall_s']:.1f} vs {there['wall_s']:.1f} s")
    if ratios:
        r = _median(ratios)
        targets.append(Target("scale, 64 guests, 100 ticks: speed vs the anchor", ">= 10x", r,
                              f"{_over_rounds(ratios)} ({'; '.join(shown)} wall)", r >= 10.0))
    else:
        targets.append(Target("scale, 64 guests, 100 ticks: speed vs the anchor", ">= 10x", None,
                              "not measured" + ("" if anchor else " (no --anchor)"), None))
    big = by.get(max(by)) if by else None
    if big is not None:
        ok = big["exit"] == 0 and big["ticks_done"] == 100 and big["lost_pages"] in (0, None)
        priv = big["guest_private_mib"]["max"]
        targets.append(Target(f"{big['guests']} guests run 100 ticks, nothing lost", "completed", None,
                              f"{big['status']}, {big['ticks_done']} ticks, lost {big['lost_pages']}", ok))
        targets.append(Target(f"{big['guests']} guests: private memory per guest (peak, max)", "< 20 MiB", priv,
                              f"{priv:.1f} MiB (median {big['guest_private_mib']['median']:.1f})"
                              if priv is not None else "not read", priv is not None and priv < 20.0))
    curve = [by[n] for n in sorted(by) if by[n]["wall_s_per_vs"]]
    if curve:
        shown = ", ".join(f"{r['guests']}: {r['wall_s_per_vs']:.1f}" for r in curve)
        targets.append(Target("scaling curve: wall s per virtual s by guest count", "printed", None, shown, None))
    return targets


def print_table(targets: list[Target]) -> None:
    print("\nTargets (each against its anchor in this run):")
    w = max(len(t.what) for t in targets)
    for t in targets:
        verdict = {True: "met", False: "MISSED", None: "-"}[t.met]
        print(f"  {t.what:<{w}}  {t.goal:>9}  {verdict:>6}  {t.shown}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py targets", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--anchor", type=Path, help="the checkout (with its own .venv) the ratios are taken against")
    ap.add_argument("--only", default=",".join(PARTS), help=f"which of {','.join(PARTS)} (default all)")
    ap.add_argument("--scale-guests", default="4,16,64,256", help="guest counts of the scale curve")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the anchor-against-here runs of ioamp and of 64 guests; each ratio is taken "
                         "within its round and the table shows their median (default 3: one round alone reads "
                         "the machine's drift as much as the code)")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.anchor is not None and not (args.anchor / ".venv" / "bin" / "python").exists():
        ap.error(f"--anchor {args.anchor}: no .venv/bin/python there (install the checkout into its own .venv)")
    anchor = args.anchor.resolve() if args.anchor else None
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="bl-targets-") as tmp:
        out = Path(tmp)
        if "traces" in parts:
            targets += traces_targets(out)
        if "ioamp" in parts:
            targets += ioamp_targets(out, anchor, args.rounds)
        if "scale" in parts:
            targets += scale_targets(out, anchor, args.scale_guests, args.rounds)
    print_table(targets)
    if args.json:
        args.json.write_text(json.dumps([t.as_dict() for t in targets], indent=1) + "\n")
    failed = [t for t in targets if t.met is None and t.goal != "printed" and "no --anchor" not in t.shown]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

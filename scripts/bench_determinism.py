"""Same seed, same counts, on every shipped scenario: quiet vs loaded vs exec-started guests.

    python scripts/bench.py determinism                     # every scripts/scenarios/*.toml, every variant
    python scripts/bench.py determinism swap-storm deadlock --ticks 30 --guests 2
    python scripts/bench.py determinism --runs quiet,loaded  # skip the exec-started run
    python scripts/bench.py determinism --from runs/determinism-TIME   # re-read finished runs, run nothing
    python scripts/bench.py determinism policies --ticks 0 --guests 0  # at the scenario's own length and guests

Each scenario (its variants, its seed) runs at ``--ticks`` ticks with at
most ``--guests`` guests (0: the scenario's own length, its own guest
count: the run an outside checker makes), up to three times:

- ``quiet``: the machine as it is (the reference; other users' load is
  whatever it is, and its load average is printed);
- ``loaded``: the same while ``--hogs`` busy-loop processes (one per CPU by
  default) keep every core busy, so the host and guests are descheduled at
  arbitrary points;
- ``exec``: quiet again, but each guest started as its own interpreter
  (``--guest-start exec``) instead of forked from the fork server;
- ``against`` (with ``--against DIR``): quiet, but run by another checkout
  of the project (its own ``DIR/.venv``): a change that must not move any
  count (a faster path, a refactoring) is checked against the code before
  it, scenario by scenario, variant by variant.

``--other DIR`` compares every quiet run with the quiet run of another
sweep: the same command's ``--out`` on another machine (a different CPU,
another load), copied here; the sizes must match. Same seed, same counts
across machines: ``--out A`` there, ``--out B --other A`` here.

Then every deterministic value of each variant's summary.json is compared
with the quiet run's (``deterministic_counts``): everything but wall-clock
and machine facts (see ``NOT_DETERMINISTIC``). Variants served in arrival
order on purpose (the lock-model ``deadlock`` scenario: the real
interleaving of lock requests is the point) are compared on what they
promise instead (``promised_counts``): how the run ended, whether it
deadlocked, no lock-order violation where the protocol rules them out, no
page lost, the audit clean. Prints a table scenario x variant -> same /
DIFFERENT (the first differing keys with both values); exit status 1 on any
difference or failed run. Run it under the suite lock, a few scenarios per
hold (``--out`` the same directory each time, then ``--from`` it for the
whole table).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["main", "deterministic_counts", "promised_counts", "compare_summaries", "run_size", "toml_value",
           "NOT_DETERMINISTIC", "RUNS"]

RUNS = ("quiet", "loaded", "exec", "against")
"""The runs of one scenario; ``quiet`` is the reference the others are compared with."""

NOT_DETERMINISTIC = re.compile(
    r"(^|_)wall($|_)|_wall_s$|^wall_s$|(^|_)wait(ed)?_s$|(^|_)cpu(_s|_seconds|_time)?$|(^|_)pid(s)?$|"
    r"(^|_)path(s)?$|(^|_)dir$|(^|_)date$|timestamp|(^|_)time$|run_id|(^|_)rss|loadavg|hostname|python|"
    r"(^|_)version$|started_at|finished_at|^stalled_ticks$|^tick_stalled$")
"""Summary keys (any component of a value's path) whose values come from the machine, not the model.

Wall seconds (``wall_s``, ``refs_per_wall_s``, the lock model's
``hostmem_wait_s`` and a deadlock cycle's ``waited_s``: by the naming rule
``*_s`` is wall time, ``*_us`` virtual time; ``virtual_s`` is the one
exception, and compared), CPU seconds (``cpu``, ``cpu_s``: *not*
``compress_cpu_us`` or ``share_scan_cpu_us``, the host CPU the model
charges in virtual µs), process ids, file paths and directories, dates and
timestamps, run ids, memory sizes of processes, load averages, and the
watchdog's wall-clock reports (``stalled_ticks``, ``event_counts.tick_stalled``:
a tick that took longer than ``watchdog_s`` wall seconds; it changes nothing
in the model). Whole words only: ``share_candidates`` is a count, not a
date. Everything else in summary.json is a count, a page count, a virtual
time, a rate per virtual second, a state name or a configuration value, and
must be equal, bit for bit, run to run.
"""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def _deterministic_key(path: str) -> bool:
    parts = re.split(r"[.\[\]]+", path)
    return not any(NOT_DETERMINISTIC.search(p) for p in parts if p)


def _arrival(variant: Mapping[str, Any]) -> bool:
    return variant.get("request_order") == "arrival" or variant.get("lock_protocol") is not None


def deterministic_counts(variant: Mapping[str, Any]) -> dict[str, Any]:
    """One variant's summary as ``{"host.swap_out_pages": 12, "guests[0].refs": ...}``, machine facts left out."""
    flat: dict[str, Any] = {}
    _flatten(variant, "", flat)
    return {k: v for k, v in flat.items() if _deterministic_key(k)}


def promised_counts(variant: Mapping[str, Any]) -> dict[str, Any]:
    """What an arrival-order (lock-model) variant promises run to run; its counts may differ.

    How it ended (status), whether it deadlocked, whether any deadlock was
    detected (a broken cycle counts), its lock protocol, whether the order
    was violated (never under ``ordered`` and ``no-callback-under-lock``), lost
    pages (none), the audit and the frame invariant.
    """
    host = variant.get("host") or {}
    return {"status": variant.get("status"), "lock_protocol": variant.get("lock_protocol"),
            "deadlocked": variant.get("deadlocked"), "any_deadlock": bool(variant.get("deadlocks")),
            "any_lock_order_violation": bool(variant.get("lock_order_violations")),
            "lost_pages": variant.get("lost_pages"), "lost_pages_host": variant.get("lost_pages_host"),
            "audit_ok": variant.get("audit_ok"), "host.invariant_violations": host.get("invariant_violations")}


def _same(a: Any, b: Any) -> bool:
    # NaN is a value here (a rate over nothing): equal to itself.
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b   # 1 vs 1.0 or True vs 1: a different value in summary.json


def compare_summaries(ref: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, list[tuple[str, Any, Any]]]:
    """Per variant, every (key, value in ``ref``, value in ``other``) that differs; [] where all agree.

    ``ref`` and ``other`` are two summary.json dicts of one scenario. A
    variant in only one of them is reported as the key ``(variant)``; a key
    in only one as that key with ``<missing>`` on the other side.
    """
    out: dict[str, list[tuple[str, Any, Any]]] = {}
    va, vb = ref.get("variants") or {}, other.get("variants") or {}
    for name in [*va, *(n for n in vb if n not in va)]:
        if name not in va or name not in vb:
            out[name] = [("(variant)", "present" if name in va else "<missing>",
                          "present" if name in vb else "<missing>")]
            continue
        view = promised_counts if _arrival(va[name]) or _arrival(vb[name]) else deterministic_counts
        a, b = view(va[name]), view(vb[name])
        out[name] = [(k, a.get(k, "<missing>"), b.get(k, "<missing>"))
                     for k in [*a, *(k for k in b if k not in a)] if k not in a or k not in b or not _same(a[k], b[k])]
    for key in ("scenario", "seed"):
        if ref.get(key) != other.get(key):
            for diffs in out.values():
                diffs.insert(0, (key, ref.get(key), other.get(key)))
    return out


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_size(sc: Any, ticks: int, guests_cap: int) -> tuple[int, int]:
    """(ticks, guests) a run of scenario ``sc`` makes: ``ticks`` (0: its own length), at most ``guests_cap`` guests
    (0: its own count)."""
    own = sc.run_config(next(iter(sc.variants)), "size")
    return (ticks or int(own["ticks"]),
            len(own["guests"]) if guests_cap == 0 else min(guests_cap, len(own["guests"])))


def toml_value(value: Any) -> str:
    """``value`` as a TOML inline value, as ``--set KEY=VALUE`` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)   # a JSON number or string is a TOML one too
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} has no TOML inline form: {value!r:.80}")


def _run_other(checkout: Path, name: str, run_dir: Path, ticks: int, guests: int, sets: Mapping[str, Any]) -> int:
    """The quiet run by another checkout's own launcher and interpreter; its exit status."""
    import subprocess

    cmd = [str(checkout / ".venv" / "bin" / "python"), "-m", "balloonlab.launch", "--scenario", name,
           "--ticks", str(ticks), "--guests", str(guests), "--run-dir", str(run_dir), "--force", "--no-report"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={toml_value(value)}"]
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(checkout), OPENBLAS_NUM_THREADS="1"))
    if proc.returncode not in (0, 1):
        print(f"bench.py determinism: {checkout} {name}: exit {proc.returncode}: {proc.stderr[-1000:]}",
              file=sys.stderr, flush=True)
    return proc.returncode


def _run_one(name: str, mode: str, run_dir: Path, ticks: int, guests_cap: int, hogs: int,
             against: Path | None = None) -> dict[str, Any]:
    import balloonlab
    from balloonlab.scenario import find_scenario, load_scenario
    from balloonlab.validate import VALIDATIONS
    from scripts.bench_hog import Hogs

    sc = load_scenario(find_scenario(name))
    raw = sc.raw.get("scenario", {})
    ticks, guests = run_size(sc, ticks, guests_cap)
    sets: dict[str, Any] = {}
    val = next((v for v in VALIDATIONS if v.scenario == name), None)
    if val is not None and val.prepare is not None:
        # e.g. a trace file the scenario reads; written per run, the same bytes each time (seeded)
        sets.update(val.prepare(run_dir, int(raw.get("seed", 1))))
    kw = dict(guests=guests, ticks=ticks, overrides=sets, run_dir=run_dir, report=False, verbose=False,
              guest_start="exec" if mode == "exec" else "fork")
    t0 = time.monotonic()
    if mode == "against":
        assert against is not None
        load0, alive = _loadavg(), True
        exit_status = _run_other(against, name, run_dir, ticks, guests, sets)
    elif mode == "loaded":
        with Hogs(hogs) as h:
            load0 = _loadavg()
            exit_status = balloonlab.run(name, **kw).exit_status
            alive = all(p.poll() is None for p in h.procs)
    else:
        load0, alive = _loadavg(), True
        exit_status = balloonlab.run(name, **kw).exit_status
    info = {"scenario": name, "mode": mode, "guests": guests, "ticks": ticks, "exit": exit_status,
            "wall_s": round(time.monotonic() - t0, 1), "loadavg_at_start": load0,
            "hogs": hogs if mode == "loaded" else 0, "hogs_alive_to_the_end": alive}
    (run_dir / "determinism-run.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _cell(variant: str, diffs_by_variant: Mapping[str, list] | None, shown: int) -> str:
    if diffs_by_variant is None:
        return "not run"
    diffs = diffs_by_variant.get(variant)
    if diffs is None:
        return "not run"
    if not diffs:
        return "same"
    return "DIFFERENT: " + "; ".join(f"{k} {_short(a)} vs {_short(b)}" for k, a, b in diffs[:shown]) + \
        (f" (+{len(diffs) - shown} more)" if len(diffs) > shown else "")


def _short(x: Any) -> str:
    s = json.dumps(x, default=str) if not isinstance(x, str) else x
    return s if len(s) <= 40 else s[:37] + "..."


def _other_sweep(other: Path, name: str, size: tuple[int, int]) -> tuple[dict[str, Any] | None, str | None]:
    """The quiet summary of ``name`` in another machine's sweep (its ``--out``), or why it cannot be compared."""
    info_p, summ_p = other / name / "quiet" / "determinism-run.json", other / name / "quiet" / "summary.json"
    if not info_p.exists() or not summ_p.exists():
        return None, "not in the other sweep"
    info = json.loads(info_p.read_text())
    if (info.get("guests"), info.get("ticks")) != size:
        return None, f"other sweep ran {info.get('guests')}g x {info.get('ticks')}t"
    return json.loads(summ_p.read_text()), None


def table(out: Path, names: Sequence[str], runs: Sequence[str], shown: int = 3,
          other: Path | None = None) -> tuple[list[list[str]], bool]:
    """Rows scenario / variant / mode(s) / one cell per compared run, from the runs under ``out``; ok?

    ``other``: another sweep's ``--out`` (e.g. run on another machine): its
    quiet runs are compared with these, one more column.
    """
    rows: list[list[str]] = []
    ok = True
    others = [m for m in runs if m != "quiet"] + (["other"] if other is not None else [])
    for name in names:
        ref_dir = out / name / "quiet"
        infos = {m: json.loads((out / name / m / "determinism-run.json").read_text())
                 for m in runs if (out / name / m / "determinism-run.json").exists()}
        if "quiet" not in infos:
            continue
        ref = json.loads((ref_dir / "summary.json").read_text()) if (ref_dir / "summary.json").exists() else {}
        compared: dict[str, dict[str, list] | None] = {}
        why_not: dict[str, str] = {}
        for m in others:
            if m == "other":
                assert other is not None
                theirs, why = _other_sweep(other, name, (infos["quiet"]["guests"], infos["quiet"]["ticks"]))
                compared[m] = compare_summaries(ref, theirs) if theirs is not None else None
                if why:
                    why_not[m] = why
                continue
            p = out / name / m / "summary.json"
            compared[m] = compare_summaries(ref, json.loads(p.read_text())) if p.exists() else None
        size = f"{infos['quiet']['guests']}g x {infos['quiet']['ticks']}t"
        for variant, v in (ref.get("variants") or {"(no summary)": {}}).items():
            kind = "promises" if _arrival(v) else "counts"
            cells = [why_not.get(m) or _cell(variant, compared.get(m), shown) for m in others]
            fails = [f"{m} exit {i['exit']}" for m, i in infos.items() if i["exit"] != 0]
            ok = ok and not fails and all(c in ("same", "not run") for c in cells) and bool(ref) \
                and not any(m in why_not for m in others)
            rows.append([name, variant, size, kind, *cells, ", ".join(fails) or "-"])
    return [["scenario", "variant", "size", "compared",
             *("other sweep's quiet vs quiet" if m == "other" else f"{m} vs quiet" for m in others), "failed runs"],
            *rows], ok


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py determinism", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="SCENARIO", help="scenarios (default: every shipped one)")
    ap.add_argument("--ticks", type=int, default=15, help="ticks per run (default 15; 0: each scenario's own)")
    ap.add_argument("--guests", type=int, default=3, help="at most this many guests (default 3; 0: each "
                    "scenario's own)")
    ap.add_argument("--runs", default="quiet,loaded,exec",
                    help=f"which of {','.join(RUNS)} (default quiet,loaded,exec; quiet is always run)")
    ap.add_argument("--against", type=Path, default=None, metavar="DIR",
                    help="also run each scenario with another checkout (its own DIR/.venv) and compare it "
                    "with the quiet run (the 'against' run; --runs quiet,against for only that)")
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy loops for the loaded run (one per CPU)")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default runs/determinism-TIME); "
                    "a scenario already run there is not run again")
    ap.add_argument("--from", dest="src", type=Path, default=None, help="re-read the runs in this directory")
    ap.add_argument("--other", type=Path, default=None, metavar="DIR",
                    help="also compare each quiet run with the quiet run of another sweep, e.g. the --out of the "
                    "same command on another machine (copied here): same sizes, every count the same")
    ap.add_argument("--show", type=int, default=3, help="differing keys shown per cell")
    ap.add_argument("--json", type=Path, default=None, help="also write every difference here")
    args = ap.parse_args(argv)
    runs = ["quiet", *(m for m in args.runs.split(",") if m and m != "quiet")]
    bad = [m for m in runs if m not in RUNS]
    if bad:
        ap.error(f"--runs: unknown {bad}; known: {list(RUNS)}")
    if args.against is not None:
        if not (args.against / ".venv" / "bin" / "python").exists():
            ap.error(f"--against {args.against}: no .venv/bin/python there (make it with scripts/test in that "
                     "checkout, or python -m venv .venv && .venv/bin/pip install -e .)")
        args.against = args.against.resolve()
        if "against" not in runs:
            runs.append("against")
    elif "against" in runs:
        ap.error("--runs against needs --against DIR")
    if args.ticks < 0 or args.guests < 0 or args.hogs < 1:
        ap.error("--ticks and --guests must be >= 0 (0: the scenario's own), --hogs >= 1")
    from scripts.bench_clocks import shipped_scenarios

    known = shipped_scenarios()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; shipped: {known}")
    # Absolute: an --against run starts the other checkout in its own directory.
    out = (args.src or args.out or Path("runs") / f"determinism-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    names = args.names or known
    if args.src is None:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            for mode in runs:
                run_dir = out / name / mode
                if (run_dir / "determinism-run.json").exists():
                    continue
                if run_dir.exists():
                    import shutil
                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                info = _run_one(name, mode, run_dir, args.ticks, args.guests, args.hogs, args.against)
                print(f"bench.py determinism: {name} {mode}: exit {info['exit']}, {info['wall_s']} s wall, "
                      f"load average {info['loadavg_at_start']:.1f} at the start"
                      + (f", {info['hogs']} hogs" if info["hogs"] else ""), file=sys.stderr, flush=True)
    else:
        names = args.names or [n for n in known if (out / n / "quiet").is_dir()]
    if args.other is not None and not args.other.is_dir():
        ap.error(f"--other {args.other}: no such directory (the --out of a sweep run elsewhere)")
    rows, ok = table(out, names, runs, args.show, args.other)
    _print_table(rows)
    if args.json:
        full = {}
        for name in names:
            ref = out / name / "quiet" / "summary.json"
            for m in runs[1:]:
                p = out / name / m / "summary.json"
                if ref.exists() and p.exists():
                    full[f"{name}/{m}"] = compare_summaries(json.loads(ref.read_text()), json.loads(p.read_text()))
        args.json.write_text(json.dumps(full, indent=1, default=str) + "\n")
    print(f"\ndeterminism: {'same counts everywhere' if ok else 'DIFFERENCES (or failed runs) above'} ({out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Same scenario + same seed gives the same counts (DESIGN.md "Time").

Time is virtual and every random choice comes from seeded generators, so
two runs of one scenario with one seed must count exactly the same
references, faults, disk reads and writes, however busy the machine is.
The scenario below has two guests under their own memory pressure (page
cache and heap larger than their RAM: evictions, write-backs, guest swap,
re-reads) on a host with room for both. A different seed must give
different counts. The second test puts the host under pressure, where
served in arrival order the order of the guests' requests would decide what
each of them sees; under the deterministic discipline (guests served in
parallel, each inside its own grant of host memory) it must not, and that
run is repeated while other processes load both cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.procs import dump_logs, procs_mentioning, run_launcher
from tests.test_launch import events_named, read_jsonl

pytestmark = pytest.mark.multiprocess

SCENARIO = """\
[scenario]
name = "determinism"
seed = 5
guests = 2
ticks = 20

[host]
overcommit = 0.5          # the host has twice the guests' RAM: it never reclaims

[guest]
ram_mib = 3
kernel_mib = 0.25
policy = "esc"
batch_refs = 1024
regions = [
  { name = "db", kind = "file", mib = 2.5 },
  { name = "heap", kind = "anon", mib = 1.5 },
  { name = "logs", kind = "file", mib = 1 },
]
workload = [
  { kind = "db", region = "db", weight = 3, write_frac = 0.05 },
  { kind = "anon-hot", region = "heap", weight = 2 },
  { kind = "scan", region = "logs", weight = 1 },
]

[costs]
mem_ref_us = 10.0
"""

COUNTS = ("refs", "hits", "major_faults", "minor_faults", "file_reads", "file_writes", "swap_in", "swap_out",
          "writebacks", "evictions", "ept_faults", "refault_reads", "vt_us")


def determinism_run(tmp_path: Path, name: str, *args: str, guest_start: str = "fork") -> dict[str, Any]:
    """One run of SCENARIO; its guests' and host's final counts."""
    scenario = tmp_path / "determinism.toml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / name
    res = run_launcher("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report", "--guest-start",
                       guest_start, *args, timeout_s=90)
    assert res.returncode == 0, f"stderr:\n{res.stderr}\n{dump_logs(run_dir)}"
    assert not procs_mentioning(str(run_dir))
    guests = {}
    for gid in (0, 1):
        fin = events_named(read_jsonl(run_dir / f"guest-{gid}.jsonl"), "guest_finished")
        assert len(fin) == 1
        guests[gid] = fin[0]["stats"]
    host = events_named(read_jsonl(run_dir / "host.jsonl"), "run_finished")[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"guests": guests, "host": host, "summary": summary, "run_dir": run_dir}


@pytest.mark.timeout(240)
def test_same_seed_same_counts_other_seed_other_counts(tmp_path: Path, determinism_seed5: dict[str, Any]) -> None:
    first = determinism_seed5          # (test_forkserver compares the same run with exec'd guests)
    again = determinism_run(tmp_path, "again")
    other = determinism_run(tmp_path, "other", "--seed", "6")
    for gid in (0, 1):
        a, b, c = first["guests"][gid], again["guests"][gid], other["guests"][gid]
        # The run really pages: evictions, write-backs to guest swap and file, re-reads.
        assert a["evictions"] > 100 and a["swap_out"] > 0 and a["file_writes"] > 0 and a["refault_reads"] > 0, a
        assert a["lost_pages"] == 0 and b["lost_pages"] == 0 and c["lost_pages"] == 0
        print(f"guest {gid} seed 5: " + " ".join(f"{k}={a[k]}" for k in COUNTS))
        print(f"guest {gid} seed 6: " + " ".join(f"{k}={c[k]}" for k in COUNTS))
        assert {k: a[k] for k in COUNTS} == {k: b[k] for k in COUNTS}
        assert a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}   # every stat, not only the headline
        assert [a[k] for k in COUNTS] != [c[k] for k in COUNTS]
        assert a["refs"] != c["refs"] and a["major_faults"] != c["major_faults"]
    # No host pressure, and the host's books agree run to run as well.
    assert first["host"]["memory"]["swap_out_pages"] == 0
    assert first["host"]["guests_memory"] == again["host"]["guests_memory"]
    sa, sb = first["summary"]["variants"]["default"], again["summary"]["variants"]["default"]
    assert sa["request_order"] == "deterministic"
    for key in ("grant_pages", "grant_exhausted", "held_requests", "refill_rounds", "tick_done_late"):
        assert sa["host"][key] == sb["host"][key], key
    assert [g["refs_per_vsec"] for g in sa["guests"]] == [g["refs_per_vsec"] for g in sb["guests"]]


def test_batch_victim_pick_is_the_one_at_a_time_pick() -> None:
    """The balloon takes its victims from the policy in one call (``select_victims``).

    For every policy that call must give the same victims, in the same
    order, and leave the same R bits, resident set and hand as ``n`` calls
    of ``select_victim`` with each victim evicted before the next (the
    definition). ESC resolves whole runs at once; this checks it on random
    frame states, hands and batch sizes.
    """
    import copy

    import numpy as np

    from balloonlab.guestd.memory import Frames
    from balloonlab.guestd.replacement import POLICIES
    from balloonlab.guestd.replacement.base import PolicyBase

    rng = np.random.default_rng(2024)
    for name in ("esc", "clock", "fifo"):
        for trial in range(400):
            n = int(rng.integers(1, 80))
            fr = Frames(n, 0, True)
            fr.resident[:] = rng.random(n) < rng.random()
            fr.R[:] = rng.random(n) < rng.random()
            fr.M[:] = rng.random(n) < rng.random()
            one = POLICIES[name](n)
            one.attach(fr)
            if hasattr(one, "hand"):
                one.hand = int(rng.integers(0, n))
            fr2 = copy.deepcopy(fr)
            batch = copy.deepcopy(one)
            batch.attach(fr2)
            k = int(rng.integers(0, n + 3))
            want = PolicyBase.select_victims(one, k)     # the definition: one call per victim
            got = batch.select_victims(k)
            where = f"{name} trial {trial}: n={n} k={k}"
            assert got.tolist() == want.tolist(), where
            assert np.array_equal(fr.R, fr2.R) and np.array_equal(fr.resident, fr2.resident), where
            assert getattr(one, "hand", None) == getattr(batch, "hand", None), where


def _host_pressure_run(tmp_path: Path, name: str) -> dict[str, Any]:
    run_dir = tmp_path / name
    # Overcommitted 1.4x, the two guests' touched memory does not fit: the host swaps both from the start
    # (at swap-storm's own 1.16x the host's bounded disk cache leaves it enough memory).
    res = run_launcher("--scenario", "swap-storm", "--variant", "aggressive", "--guests", "2", "--ticks", "45",
                       "--set", "host.overcommit=1.4", "--run-dir", str(run_dir), "--no-report", timeout_s=90)
    assert res.returncode == 0, f"stderr:\n{res.stderr}\n{dump_logs(run_dir)}"
    assert not procs_mentioning(str(run_dir))
    host_log = read_jsonl(run_dir / "host.jsonl")
    ticks = [{k: v for k, v in e.items() if k not in ("timestamp", "run_id")}
             for e in events_named(host_log, "tick_completed")]
    return {"guests": {gid: events_named(read_jsonl(run_dir / f"guest-{gid}.jsonl"), "guest_finished")[0]["stats"]
                       for gid in (0, 1)},
            "host": events_named(host_log, "run_finished")[0], "ticks": ticks}


class _CpuLoad:
    """Processes spinning on every core, so the host and guests are descheduled at arbitrary points."""

    def __init__(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                      for _ in range(max(2, os.cpu_count() or 2))]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


HELD_AND_GRANT_KEYS = ("grant_pages", "grant_exhausted", "held_requests", "held_across_boundary", "refill_rounds",
                       "tick_done_late", "requests_past_tick_end")


@pytest.mark.timeout(200)
def test_same_seed_same_counts_under_host_swapping_with_guests_in_parallel_and_the_cpu_loaded(tmp_path: Path) -> None:
    """Two guests share a host that swaps from the start, and the second run shares the CPU with spinners.

    Guests are served in parallel, each inside its grant of free frames;
    when a grant runs out the guest reclaims from itself (its I/O buffers,
    its cache, host swapping of its own pages) or is held until every guest
    is parked. Served that way, which guest's request the machine happens
    to run first cannot change anything: every count, tick by tick, is the
    same, with or without other processes taking the cores.
    """
    first = _host_pressure_run(tmp_path, "first")
    loaded_by = _CpuLoad()
    try:
        loaded = _host_pressure_run(tmp_path, "loaded")
        assert all(p.poll() is None for p in loaded_by.procs), "the load ended before the run did"
    finally:
        loaded_by.close()
    h1 = first["host"]
    mem = h1["memory"]
    print({k: mem[k] for k in ("swap_out_pages", "swap_in_pages", "shootdowns", "direct_reclaims", "double_faults",
                               "self_reclaim_pages")},
          {k: h1[k] for k in HELD_AND_GRANT_KEYS})
    assert h1["request_order"] == "deterministic"
    # The host really swapped both guests' memory, some of it from inside a guest's own partition,
    # (256 pages in 2 shootdowns since the memory states: the boundary swaps only in hard/low, a guest its
    # own pages from clear on)
    assert mem["swap_out_pages"] > 100 and mem["shootdowns"] >= 2, mem
    assert all(g["swap_out_pages"] > 0 for g in h1["guests_memory"].values()), h1["guests_memory"]
    assert sum(g["self_swap_pages"] for g in h1["guests_memory"].values()) > 0, h1["guests_memory"]
    # (no request held here since the memory states: a guest whose grant runs out swaps its own pages)
    assert h1["grant_exhausted"] > 0, h1
    for other in (loaded,):
        h2 = other["host"]
        for gid in (0, 1):
            a, b = first["guests"][gid], other["guests"][gid]
            assert a["lost_pages"] == 0 and b["lost_pages"] == 0
            assert a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        assert h1["memory"] == h2["memory"], {k: (v, h2["memory"][k]) for k, v in mem.items() if v != h2["memory"][k]}
        assert h1["guests_memory"] == h2["guests_memory"]
        assert {k: h1[k] for k in HELD_AND_GRANT_KEYS} == {k: h2[k] for k in HELD_AND_GRANT_KEYS}
        assert len(first["ticks"]) == len(other["ticks"]) > 0
        for t1, t2 in zip(first["ticks"], other["ticks"]):
            assert t1 == t2, {k: (v, t2.get(k)) for k, v in t1.items() if v != t2.get(k)}

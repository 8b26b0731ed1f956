"""A guest killed mid-inflate: the host releases everything it held and runs on.

``tests-inflate``: three 48 MiB guests full of dirty anonymous memory on a
host that has already swapped part of it; at the end of tick 15 a static balloon asks
each for 60 % of its RAM. Inflating that makes a guest write ~6500 pages to
its swap through the host's disk buffers (reading back first what the host
had swapped) before it hands ~7400 gpfns to the host: a few hundred wall
milliseconds during which the host holds frames, swap slots, disk-cache
pages and I/O buffers for it. The test SIGKILLs guest 1 as soon as the host
logs its balloon target, i.e. in that window (the host then has not yet
seen its inflate hypercall), and checks what is left.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Launched, dump_logs, wait_until
from tests.test_launch import assert_no_leftovers, events_named, guest_pid, read_jsonl, read_jsonl_partial

pytestmark = pytest.mark.multiprocess

SCENARIO = "tests-inflate"
VICTIM = 1
# [balloon.params] start_tick = 15: the host sets the target as tick 15 ends, the guest inflates
# at the start of tick 16.
INFLATE_TICK = 16
TARGET_PAGES = round(0.6 * 48 * 256)   # fraction = 0.6 of 48 MiB, in pages
ATTEMPTS = 3               # a kill that lands after the inflation (a starved test process) is retried


def _target_set(run_dir: Path) -> bool:
    return any(e.get("guest") == VICTIM
               for e in events_named(read_jsonl_partial(run_dir / "host.jsonl"), "balloon_target_set"))


def _kill_mid_inflate(run_dir: Path) -> tuple[int, Launched]:
    run = Launched("--scenario", SCENARIO, "--run-dir", str(run_dir), "--no-report",
                   "--expect-guests-lost", str(VICTIM))
    try:
        # Poll fast: the window is a few hundred wall milliseconds.
        wait_until(lambda: _target_set(run_dir), 60.0, interval_s=0.002, what="the balloon target of the victim")
        pid = guest_pid(run_dir, VICTIM)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        return run.wait(90.0), run
    finally:
        run.close()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run until the victim was killed while inflating; every attempt must keep the invariant."""
    base = tmp_path_factory.mktemp("guest-death")
    for attempt in range(ATTEMPTS):
        run_dir = base / f"run{attempt}"
        rc, run = _kill_mid_inflate(run_dir)
        assert rc == 0, f"stderr:\n{run.err}\n{dump_logs(run_dir)}"
        assert_no_leftovers(run_dir)
        host = read_jsonl(run_dir / "host.jsonl")
        fin = events_named(host, "run_finished")[0]
        gone = events_named(host, "guest_disconnected")
        assert fin["invariant_violations"] == 0 and not events_named(host, "invariant_violated"), gone
        assert [e["guest"] for e in gone] == [VICTIM]
        # Died during the inflating tick, before the host saw its balloon: mid-inflate.
        mid_inflate = gone[0]["tick"] == INFLATE_TICK and fin["memory"]["balloon_inflated_pages"] < 3 * TARGET_PAGES
        print(f"attempt {attempt}: victim died at tick {gone[0]['tick']}, released {gone[0]}, "
              f"host inflated {fin['memory']['balloon_inflated_pages']} pages in all; mid-inflate: {mid_inflate}")
        if mid_inflate:
            summary = json.loads((run_dir / "summary.json").read_text())
            return {"run_dir": run_dir, "host": host, "fin": fin, "gone": gone[0], "summary": summary}
    pytest.fail(f"no kill landed mid-inflate in {ATTEMPTS} attempts (the test process was starved?)")


@pytest.mark.timeout(300)
def test_invariant_holds_and_the_others_finish(killed_run: dict[str, Any]) -> None:
    fin, summary = killed_run["fin"], killed_run["summary"]
    assert fin["reason"] == "completed" and fin["invariant_violations"] == 0
    v = summary["variants"]["default"]
    assert list(v["guests_lost"]) == [str(VICTIM)]
    assert v["lost_pages"] == 0
    for g in v["guests"]:
        assert g["lost_pages"] == 0, g
        if g["id"] != VICTIM:
            assert g["finished"] and g["balloon_pages"] == TARGET_PAGES, g
    for gid in (0, 2):
        done = events_named(read_jsonl(killed_run["run_dir"] / f"guest-{gid}.jsonl"), "guest_finished")
        # A tick in which the host held a request of its across the boundary owes no TickDone.
        assert done and fin["ticks"] - fin.get("held_across_boundary", 0) <= done[0]["ticks"] <= fin["ticks"], \
            (done[0]["ticks"], fin["ticks"], fin.get("held_across_boundary"))
        assert done[0]["stats"]["lost_pages"] == 0


@pytest.mark.timeout(300)
def test_a_dead_guest_leaves_nothing_behind(killed_run: dict[str, Any]) -> None:
    """Its frames, host swap slots, disk-cache pages and I/O buffers all go back to the host."""
    gone, fin = killed_run["gone"], killed_run["fin"]
    # It held memory in every place when it died ...
    assert gone["released_frames"] > 0 and gone["released_swap_pages"] > 0, gone
    # ... and at the end the host's gauges are exactly the survivors' holdings.
    mem, guests = fin["memory"], fin["guests_memory"]
    assert sorted(guests) == ["0", "2"]

    def total(key: str) -> int:
        return sum(int(g[key]) for g in guests.values())

    assert mem["guest_frames"] == total("resident_pages")
    assert mem["cache_pages"] == total("cache_frame_pages")
    assert mem["iobuf_pages"] == total("iobuf_pages")
    assert mem["swap_used_slots"] == total("swapped_pages")   # the disk cache is never in host swap
    assert mem["busy_frames"] == 0
    assert mem["free_frames"] + mem["guest_frames"] + mem["cache_pages"] + mem["iobuf_pages"] == mem["total_frames"]

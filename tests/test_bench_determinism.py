"""``bench.py determinism``: its comparison catches a count that differs, ignores wall time, and the sweep runs.

The comparison is what "same seed, same counts on every shipped scenario"
is judged with, so it is tested here on summaries that differ in one value
at a time, and the benchmark itself runs one tiny shipped scenario twice
(fork- and exec-started guests) and must find the counts the same, then
find the one count this test changes in the second run's summary.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from balloonlab.overrides import parse_value
from scripts.bench_determinism import (compare_summaries, deterministic_counts, promised_counts, run_size,
                                      toml_value)

REPO = Path(__file__).resolve().parent.parent


def _summary() -> dict[str, Any]:
    guest = {"id": 0, "refs": 14184, "major_faults": 1535, "vt_us": 200093.564, "refs_per_vsec": 70886.8,
             "pff": 10542.907937064247}
    return {"scenario": "x", "seed": 5, "variants": {
        "a": {"ticks": 20, "virtual_s": 0.2, "wall_s": 9.4, "refs_per_wall_s": 2996.9, "status": "completed",
              "request_order": "deterministic", "lock_protocol": None,
              "host": {"swap_out_pages": 12, "memory_state_ticks": {"high": 20, "clear": 0},
                       "working_set": {"guests": {"0": {"estimate_pages": 2007}}}},
              "guests": [guest, dict(guest, id=1, refs=9000)],
              "deadlock_cycle": None},
        "naive": {"ticks": 6, "wall_s": 3.7, "status": "deadlocked", "request_order": "arrival",
                  "lock_protocol": "naive", "deadlocked": True, "deadlocks": 1, "lock_order_violations": 2,
                  "lost_pages": 0, "audit_ok": False, "host": {"invariant_violations": 0, "swap_out_pages": 40},
                  "guests": [dict(guest, refs=500)], "deadlock_cycle": [{"since_wall_s": 1.25, "guest": 2}]}}}


def test_identical_summaries_compare_the_same_and_machine_facts_are_ignored() -> None:
    a, b = _summary(), _summary()
    assert compare_summaries(a, b) == {"a": [], "naive": []}
    b["variants"]["a"]["wall_s"] = 31.0
    b["variants"]["a"]["refs_per_wall_s"] = 1.0
    b["variants"]["naive"]["deadlock_cycle"][0]["since_wall_s"] = 9.0
    assert compare_summaries(a, b) == {"a": [], "naive": []}
    view = deterministic_counts(a["variants"]["a"])
    assert "wall_s" not in view and "refs_per_wall_s" not in view
    assert view["guests[1].refs"] == 9000 and view["host.working_set.guests.0.estimate_pages"] == 2007
    assert view["virtual_s"] == 0.2 and view["guests[0].vt_us"] == 200093.564


@pytest.mark.parametrize("path, value", [
    (("guests", 1, "refs"), 9001),                       # a count in the second guest
    (("host", "swap_out_pages"), 13),                    # a host page count
    (("host", "memory_state_ticks", "clear"), 1),        # a nested count
    (("guests", 0, "vt_us"), 200093.565),                # a virtual time
    (("guests", 0, "pff"), 10542.907937064248),          # a float off in its last digit
    (("ticks",), 20.0),                                  # the same number, another type in the JSON
    (("status",), "failed"),
])
def test_one_differing_value_is_reported_with_both_values(path: tuple, value: Any) -> None:
    a, b = _summary(), _summary()
    cur = b["variants"]["a"]
    for p in path[:-1]:
        cur = cur[p]
    old = cur[path[-1]]
    cur[path[-1]] = value
    key = ".".join(str(p) for p in path).replace(".0.", "[0].").replace(".1.", "[1].")
    diffs = compare_summaries(a, b)
    assert diffs["naive"] == []
    assert diffs["a"] == [(key, old, value)]


@pytest.mark.parametrize("path, value", [
    (("host", "compress_cpu_us"), 200115.5),             # host CPU the model charges, in virtual µs
    (("host", "share_scan_cpu_us"), 12.5),
    (("scan_cpu_share_of_a_core",), 0.0002),
    (("host", "share_candidates"), 41),                  # "date" inside a word: a count all the same
    (("host", "stale_candidates"), 3),
    (("guests", 0, "virtual_s"), 1.5002),                # the one *_s that is virtual time
])
def test_model_values_whose_names_look_like_machine_facts_are_compared(path: tuple, value: Any) -> None:
    a = _summary()
    cur = a["variants"]["a"]
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    b = copy.deepcopy(a)
    cur = b["variants"]["a"]
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value * 2
    key = ".".join(str(p) for p in path).replace(".0.", "[0].")
    assert compare_summaries(a, b)["a"] == [(key, value, value * 2)]


@pytest.mark.parametrize("path", [
    ("stalled_ticks",),                                  # the watchdog's wall-clock reports
    ("event_counts", "tick_stalled"),
    ("lock_stats", "hostmem_wait_s"),                    # wall seconds waited for a lock
    ("lock_stats", "vmem_wait_s"),
    ("deadlock_cycle", "waited_s"),
    ("host", "cpu_s"),
])
def test_wall_clock_values_are_not_compared(path: tuple) -> None:
    a = _summary()
    cur = a["variants"]["a"]
    for p in path[:-1]:
        cur[p] = cur.get(p) or {}
        cur = cur[p]
    cur[path[-1]] = 1
    b = copy.deepcopy(a)
    cur = b["variants"]["a"]
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = 2
    assert compare_summaries(a, b)["a"] == []


@pytest.mark.parametrize("name, ticks, guests, want", [
    ("scale", 0, 0, (100, 64)),                # the scenario's own length and guest count
    ("io-amplification", 0, 0, (400, 4)),      # its own length from duration_s (4 s of 10 ms ticks)
    ("scale", 60, 16, (60, 16)),
    ("validate-fig6", 15, 3, (15, 1)),         # at most the scenario's guests
])
def test_run_size_is_the_scenario_s_own_when_asked_for_0(name: str, ticks: int, guests: int,
                                                        want: tuple[int, int]) -> None:
    from balloonlab.scenario import find_scenario, load_scenario

    assert run_size(load_scenario(find_scenario(name)), ticks, guests) == want


def test_missing_keys_and_variants_are_differences() -> None:
    a, b = _summary(), _summary()
    del b["variants"]["a"]["host"]["swap_out_pages"]
    b["variants"]["a"]["guests"].append({"id": 2, "refs": 1})
    diffs = compare_summaries(a, b)["a"]
    assert ("host.swap_out_pages", 12, "<missing>") in diffs and ("guests[2].refs", "<missing>", 1) in diffs
    del b["variants"]["naive"]
    assert compare_summaries(a, b)["naive"] == [("(variant)", "present", "<missing>")]


def test_an_arrival_order_variant_is_held_to_what_it_promises_not_to_its_counts() -> None:
    a, b = _summary(), _summary()
    nb = b["variants"]["naive"]
    nb["guests"][0]["refs"] = 777            # arrival order: counts may differ run to run
    nb["ticks"], nb["host"]["swap_out_pages"], nb["lock_order_violations"], nb["deadlocks"] = 7, 41, 3, 2
    assert compare_summaries(a, b)["naive"] == []
    for key, value, name in (("deadlocked", False, "deadlocked"), ("status", "completed", "status"),
                             ("lost_pages", 3, "lost_pages"), ("deadlocks", 0, "any_deadlock"),
                             ("lock_order_violations", 0, "any_lock_order_violation")):
        c = copy.deepcopy(a)
        c["variants"]["naive"][key] = value
        got = compare_summaries(a, c)["naive"]
        assert [d[0] for d in got] == [name], (key, got)
    assert promised_counts(a["variants"]["naive"])["host.invariant_violations"] == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_the_benchmark_finds_a_tiny_scenario_the_same_and_a_changed_count_different(tmp_path: Path) -> None:
    out = tmp_path / "det"
    argv = [sys.executable, "scripts/bench.py", "determinism", "tests-tiny", "--ticks", "3", "--guests", "2",
            "--runs", "quiet,exec", "--out", str(out)]

    def bench(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        proc = subprocess.Popen(list(args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            so, se = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            so, se = proc.communicate()
            raise AssertionError(f"bench did not finish\n{so}\n{se}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, so, se)

    res = bench(*argv)
    assert res.returncode == 0, res.stdout + res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("tests-tiny"))
    assert row.split()[1:5] == ["default", "2g", "x", "3t"] and " same " in row, res.stdout
    ref = json.loads((out / "tests-tiny" / "quiet" / "summary.json").read_text())
    assert ref["variants"]["default"]["guests"][0]["refs"] > 0 and ref["variants"]["default"]["ticks"] == 3
    # One count changed in the exec run's summary: the benchmark re-reads the runs and must name it.
    path = out / "tests-tiny" / "exec" / "summary.json"
    other = json.loads(path.read_text())
    refs = other["variants"]["default"]["guests"][1]["refs"]
    other["variants"]["default"]["guests"][1]["refs"] = refs + 1
    path.write_text(json.dumps(other))
    res = bench(sys.executable, "scripts/bench.py", "determinism", "--from", str(out), "--runs", "quiet,exec")
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"DIFFERENT: guests[1].refs {refs} vs {refs + 1}" in res.stdout, res.stdout


@pytest.mark.parametrize("value", [
    3, 1.5, True, False, "a path/with \"quotes\"", [1, 2.5, "x"],
    [{"kind": "trace", "region": "heap", "path": "/tmp/x.npz"}], {"a": {"b": [1, {"c": False}]}}])
def test_a_setting_passed_to_another_checkout_reads_back_as_the_same_value(value: Any) -> None:
    assert parse_value(toml_value(value)) == value


def test_counts_against_another_checkout_and_its_errors(tmp_path: Path) -> None:
    """``--against``: this checkout stands in for the other one (its own .venv): the same counts."""
    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/bench.py", "determinism", *args], cwd=REPO, text=True,
                              capture_output=True, timeout=120, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))

    out = tmp_path / "det"
    res = bench("tests-tiny", "--ticks", "3", "--guests", "2", "--runs", "quiet", "--against", str(REPO),
                "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("tests-tiny"))
    assert " same " in row and "against vs quiet" in res.stdout, res.stdout
    assert json.loads((out / "tests-tiny" / "against" / "summary.json").read_text())["variants"]["default"]["ticks"] == 3
    res = bench("tests-tiny", "--runs", "quiet,against", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "needs --against" in res.stderr, res.stderr
    res = bench("tests-tiny", "--against", str(tmp_path), "--out", str(tmp_path / "y"))
    assert res.returncode == 2 and "no .venv/bin/python" in res.stderr, res.stderr


def test_another_machine_s_sweep_is_compared_run_for_run(tmp_path: Path) -> None:
    """``--other``: a sweep's ``--out`` from elsewhere; its quiet runs against these, sizes checked."""
    from scripts.bench_determinism import table

    def sweep(root: Path, summary: dict[str, Any], guests: int = 2, ticks: int = 15) -> Path:
        d = root / "swap-storm" / "quiet"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "determinism-run.json").write_text(json.dumps({"guests": guests, "ticks": ticks, "exit": 0}))
        return root

    here = sweep(tmp_path / "here", _summary())
    rows, ok = table(here, ["swap-storm"], ["quiet"], other=sweep(tmp_path / "there", _summary()))
    assert ok and rows[0][-2] == "other sweep's quiet vs quiet" and all(r[-2] == "same" for r in rows[1:]), rows
    changed = _summary()
    variant = next(iter(changed["variants"]))
    changed["variants"][variant]["ticks"] += 1
    rows, ok = table(here, ["swap-storm"], ["quiet"], other=sweep(tmp_path / "changed", changed))
    assert not ok and any(r[-2].startswith("DIFFERENT: ticks") for r in rows[1:]), rows
    rows, ok = table(here, ["swap-storm"], ["quiet"], other=sweep(tmp_path / "bigger", _summary(), guests=4))
    assert not ok and "other sweep ran 4g x 15t" in rows[1][-2], rows
    rows, ok = table(here, ["swap-storm"], ["quiet"], other=tmp_path / "empty")
    assert not ok and rows[1][-2] == "not in the other sweep", rows

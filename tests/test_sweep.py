"""Sweeps: the grid and its cells, the tables and plots, and real runs on Dask.

The multi-process tests run tiny cells (tests-tiny, 2 guests, a few ticks)
on the embedded LocalCluster and through a ``dask scheduler`` and two
``dask worker`` processes started here on 127.0.0.1; every process they
start is reaped and checked for.
"""
from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from balloonlab.proto.errors import ConfigError
from balloonlab.sweep.api import load_sweep, make_spec, sweep
from balloonlab.sweep.cell import launcher_argv
from balloonlab.sweep.results import plot_sweep, runs_table, summary_table
from balloonlab.sweep.spec import Axis, Cell, SweepSpec, parse_grid, parse_seeds
from tests.procs import REPO, procs_mentioning, wait_until

TINY = "tests-tiny"


# --- the grid -------------------------------------------------------------------------------


def test_grid_seeds_and_cells() -> None:
    axes = parse_grid(["host.overcommit=1.2,1.5,2.0", "balloon.policy=none,working-set"])
    assert axes == (Axis("host.overcommit", (1.2, 1.5, 2.0)), Axis("balloon.policy", ("none", "working-set")))
    assert axes[0].numeric and not axes[1].numeric
    assert parse_seeds("3") == (1, 2, 3) and parse_seeds("5,9") == (5, 9) and parse_seeds([4]) == (4,)
    spec = SweepSpec(TINY, axes, (1, 2))
    cells = spec.cells()
    assert len(cells) == 12 and len({c.key for c in cells}) == 12
    assert cells[0].key.startswith("overcommit-1.2_policy-none_s1_")
    assert Cell((("host.overcommit", 1.2),), 1).key == Cell((("host.overcommit", 1.2),), 1).key   # stable


@pytest.mark.parametrize("grid, message", [
    (["host.overcommit"], "expected KEY=V1,V2"),
    (["hots.overcommit=1,2"], "unknown table 'hots'"),
    (["host.overcommit=1,1"], "repeats a value"),
    (["host.overcommit=1", "host.overcommit=2"], "given twice"),
])
def test_a_bad_grid_is_named(grid: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_grid(grid)


def test_every_grid_point_is_checked_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"grid point host.overcomit=1.5: override 'host.overcomit'"):
        make_spec(TINY, grid={"host.overcomit": [1.5]}, seeds=1)
    with pytest.raises(ConfigError, match=r"balloon.policy='greedy'.*'greedy' is unknown"):
        make_spec(TINY, grid={"balloon.policy": ["none", "greedy"]}, seeds=1)
    with pytest.raises(ConfigError, match="unknown sweep metric"):
        make_spec(TINY, grid={"host.overcommit": [1.5]}, metrics=["speed"])


def test_the_scenarios_sweep_table(tmp_path: Path) -> None:
    text = (REPO / "scripts/scenarios/tests-tiny.toml").read_text()
    path = tmp_path / "s.toml"
    path.write_text(text + '\n[sweep]\ngrid = { "host.overcommit" = [1.0, 1.2] }\nseeds = [4, 5]\n'
                           'metrics = ["refs_per_vsec"]\n')
    spec = make_spec(path)
    assert spec.axes == (Axis("host.overcommit", (1.0, 1.2)),) and spec.seeds == (4, 5)
    assert spec.metrics == ("refs_per_vsec",) and spec.scenario == str(path)
    assert make_spec(path, seeds=2, grid={"guest.ram_mib": [4, 5]}).axes[0].path == "guest.ram_mib"
    path.write_text(text + "\n[sweep]\ngrids = 1\n")
    with pytest.raises(ConfigError, match=r"\[sweep\].grids: unknown key"):
        make_spec(path)


def test_a_cell_is_the_launchers_command_line() -> None:
    argv = launcher_argv({"scenario": TINY, "seed": 3, "run_dir": "/x/r", "ticks": 5, "guests": None,
                          "settings": [["balloon.policy", "none"], ["host.overcommit", 1.5]]})
    assert argv[1:] == ["-m", "balloonlab.launch", "--scenario", TINY, "--seed", "3", "--run-dir", "/x/r",
                        "--no-report", "--ticks", "5", "--set", 'balloon.policy="none"', "--set", "host.overcommit=1.5"]


# --- tables and plots from records ------------------------------------------------------------


def _record(key: str, overcommit: float, policy: str, seed: int, refs: float | None, status: str = "ok") -> dict:
    summary = None if refs is None else {"variants": {"default": {
        "reason": "completed", "refs_per_vsec": refs, "host": {"swap_out_pages": 10 * seed}, "guests": []}}}
    return {"key": key, "values": [["host.overcommit", overcommit], ["balloon.policy", policy]], "seed": seed,
            "status": status, "attempts": 1 if status == "ok" else 2, "wall_s": 1.0, "worker": "w",
            "error": None if status == "ok" else "boom", "summary": summary}


@pytest.mark.timeout(120)
def test_a_cell_with_a_dashboard_publishes_its_url_beside_the_sweeps_runs(tmp_path: Path) -> None:
    from balloonlab.sweep.cell import run_cell
    run_dir = tmp_path / "runs" / "c1"
    task = {"key": "c1", "dashboard": True, "scenario": TINY, "seed": 1, "guests": 2, "ticks": 20, "duration_s": None,
            "variant": None, "settings": [], "run_dir": str(run_dir), "timeout_s": 100}
    assert "--dashboard" in launcher_argv(task)
    rec = run_cell(task)
    assert rec["ok"], rec["error"]
    (line,) = (tmp_path / "dashboards.jsonl").read_text().splitlines()
    published = json.loads(line)
    assert published["cell"] == "c1" and published["run_dir"] == str(run_dir), published
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/[A-Za-z0-9_-]{16,}/", published["url"]), published   # its secret
    assert not procs_mentioning(str(run_dir))


def test_runs_summary_and_plots(tmp_path: Path) -> None:
    spec = SweepSpec(TINY, (Axis("host.overcommit", (1.2, 1.5)), Axis("balloon.policy", ("none", "ws"))), (1, 2, 3),
                     metrics=("refs_per_vsec",))
    recs = [_record(f"k{i}", oc, pol, s, 100.0 * s + (50 if pol == "ws" else 0) - 10 * oc)
            for i, (oc, pol, s) in enumerate((oc, pol, s) for oc in (1.2, 1.5) for pol in ("none", "ws")
                                              for s in (1, 2, 3))]
    recs[-1] = _record("k11", 1.5, "ws", 3, None, status="failed")
    runs = runs_table(spec, recs)
    assert len(runs) == 12 and list(runs.columns[:5]) == ["cell", "seed", "host.overcommit", "balloon.policy", "variant"]
    assert runs.loc[runs["cell"] == "k11", "status"].item() == "failed"
    assert math.isnan(runs.loc[runs["cell"] == "k11", "refs_per_vsec"].item())
    summary = summary_table(spec, runs, ["refs_per_vsec", "host_swap_out_pages"])
    row = summary[(summary["host.overcommit"] == 1.2) & (summary["balloon.policy"] == "none")
                  & (summary["metric"] == "refs_per_vsec")].iloc[0]
    # seeds 1..3: 88, 188, 288 -> mean 188, sd 100, t(0.975, 2) = 4.3027
    assert (row["n"], row["mean"], row["std"]) == (3, pytest.approx(188.0), pytest.approx(100.0))
    assert row["ci95_high"] - row["mean"] == pytest.approx(4.302653 * 100 / math.sqrt(3), rel=1e-5)
    failed_cell = summary[(summary["host.overcommit"] == 1.5) & (summary["balloon.policy"] == "ws")
                          & (summary["metric"] == "refs_per_vsec")].iloc[0]
    assert failed_cell["n"] == 2   # the failed run is left out, not counted as zero
    plots = plot_sweep(spec, summary, ["refs_per_vsec"], tmp_path)
    assert sorted(p.name for p in plots) == ["refs_per_vsec-vs-host_overcommit.png",
                                             "refs_per_vsec-vs-host_overcommit.svg"]
    assert all(p.stat().st_size > 1000 for p in plots)


# --- real runs -------------------------------------------------------------------------------------

BOOM = '''
from balloonlab.hostd.balloon import ControllerBase, hold


class Boom(ControllerBase):
    """Fails at tick 3: the host exits with an error, the run fails."""

    def decide(self, view):
        if view.tick >= 3:
            raise RuntimeError(f"boom at tick {view.tick}")
        return {g.guest_id: hold(g, "waiting", "not yet") for g in view.guests}
'''


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_a_sweep_on_the_embedded_cluster_retries_a_failure_and_resumes(tmp_path: Path) -> None:
    boom = tmp_path / "boom.py"
    boom.write_text(BOOM)
    out = tmp_path / "sweep"
    grid = {"balloon.policy": ["none", f"{boom}:Boom"]}
    result = sweep(TINY, grid=grid, seeds=2, guests=2, ticks=6, out=out, workers=2, timeout_s=60, progress=False)
    runs = result.runs
    assert len(runs) == 4 and result.failed == 2 and not result.ok
    good = runs[runs["balloon.policy"] == "none"]
    assert list(good["status"]) == ["ok", "ok"] and list(good["seed"]) == [1, 2]
    assert (good["refs_per_vsec"] > 0).all() and (good["lost_pages"] == 0).all()
    bad = runs[runs["balloon.policy"] != "none"]
    assert list(bad["status"]) == ["failed", "failed"] and list(bad["attempts"]) == [2, 2]
    assert bad["error"].str.contains("boom at tick 3").all()
    # Files: the tidy tables, the statistics, the plots, a record and a run directory per cell.
    assert len(pd.read_csv(out / "runs.csv")) == 4
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["balloon.policy"]) == {"none"} and (summary["n"] == 2).all()
    assert (out / "summary.md").read_text().count("| none | default | 2 |") == 1
    assert len(list((out / "cells").glob("*.json"))) == 4
    for key in runs["cell"]:
        assert (out / "runs" / key / "host.jsonl").exists()
    # Resumed: the finished cells are not run again (their records and run directories stay as they were).
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    again = sweep(TINY, grid={"balloon.policy": ["none"]}, seeds=2, guests=2, ticks=6, out=out, workers=2,
                  progress=False)
    assert again.ok and len(again.runs) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == before
    assert load_sweep(out).runs.equals(again.runs)
    with pytest.raises(ConfigError, match="holds another sweep"):
        sweep(TINY, grid={"balloon.policy": ["none"]}, seeds=2, guests=2, ticks=7, out=out, progress=False)
    assert not procs_mentioning(str(tmp_path))


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1",
                                                                 PYTHONPATH=str(REPO)))


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_a_sweep_through_a_dask_scheduler_and_two_workers(tmp_path: Path) -> None:
    dask = str(Path(sys.executable).parent / "dask")
    sched_file = tmp_path / "scheduler.json"
    procs = [_start([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(sched_file)], tmp_path / "scheduler.log")]
    try:
        wait_until(lambda: sched_file.exists() and "address" in sched_file.read_text(), 30.0,
                   what="the scheduler's address")
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for name in ("w1", "w2"):
            procs.append(_start([dask, "worker", address, "--name", name, "--nthreads", "1", "--no-dashboard",
                                 "--host", "127.0.0.1", "--local-directory", str(tmp_path / name)],
                                tmp_path / f"{name}.log"))
        from distributed import Client
        with Client(address, timeout="20s") as client:
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "sweep"
        res = subprocess.run([sys.executable, "-m", "balloonlab.sweep.cli", TINY, "--grid", "host.overcommit=1.0,1.2",
                              "--seeds", "2", "--guests", "2", "--ticks", "6", "--scheduler", address,
                              "--out", str(out), "--cell-timeout", "60"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env=dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO)))
        assert res.returncode == 0, res.stderr + (tmp_path / "w1.log").read_text()[-2000:]
        assert f"cell(s) to run on {address}" in res.stderr and "4/4 cells" in res.stderr and "ETA" in res.stderr
        runs = pd.read_csv(out / "runs.csv")
        assert len(runs) == 4 and (runs["status"] == "ok").all() and (runs["lost_pages"] == 0).all()
        assert sorted(runs["host.overcommit"].unique()) == [1.0, 1.2]
        assert {w.split("@")[0] for w in runs["worker"]} == {"w1", "w2"}   # both workers ran cells
        assert "| 1.2 | default | 2 |" in res.stdout   # the summary table: mean and CI over 2 seeds
        assert (out / "plots" / "refs_per_vsec-vs-host_overcommit.svg").exists()
    finally:
        _stop(procs)
    assert not procs_mentioning(str(tmp_path))

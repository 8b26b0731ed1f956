"""The README's notebook example, run as a script exactly as written, and the API's edges.

The example (README "The Python API", the block after ``<!-- example: api -->``)
runs two guests of the swap storm, loads it back, exports Parquet, and runs a
2 x 2 sweep on the embedded cluster; bounded in time, nothing left running.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import balloonlab
from tests.procs import REPO, procs_mentioning

pytestmark = pytest.mark.multiprocess


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- example: api -->\n```python\n(.*?)```", text, re.S)
    assert m, "the README has no example block marked <!-- example: api -->"
    return m.group(1)


@pytest.mark.timeout(150)
def test_the_readme_example_runs_as_a_script(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=140,
                         env=dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "pff_above_high" in res.stdout or "host_short" in res.stdout   # the decisions were printed
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").exists()
    tables = {p.name for p in (tmp_path / "tables").iterdir()}
    assert tables == {"guests.parquet", "host.parquet", "events.parquet", "decisions.parquet"}
    guests = pd.read_parquet(tmp_path / "tables" / "guests.parquet")
    assert set(guests["guest"]) == {0, 1} and (guests["variant"] == "working-set").all()
    summary = pd.read_csv(tmp_path / "sweeps" / "example" / "summary.csv")
    assert sorted(summary["host.overcommit"].unique()) == [1.1, 1.3] and (summary["n"] == 2).all()
    assert not procs_mentioning(str(tmp_path))


def test_the_api_inside_a_running_event_loop_and_its_errors(tmp_path: Path) -> None:
    """A notebook already runs an event loop: the run gets a thread of its own. Bad arguments raise first."""
    async def notebook_cell() -> balloonlab.Run:
        return balloonlab.run("tests-tiny", guests=2, ticks=8, seed=2, run_dir=tmp_path / "run", report=False,
                              verbose=False, overrides={"balloon.policy": "working-set",
                                                        "balloon.params.pff_high": 1.0,
                                                        "guest.ws_period_us": 20000.0})
    run = asyncio.run(notebook_cell())
    assert run.ok and run.exit_status == 0 and run.summary["seed"] == 2
    g = run.guests
    assert list(g.columns[:5]) == ["variant", "guest", "tick", "t_s", "vt_us"]
    assert sorted(set(g["guest"])) == [0, 1] and (g.groupby("guest")["refs"].is_monotonic_increasing).all()
    assert run.host["tick"].iloc[-1] == 7 and run.host["t_s"].iloc[-1] == pytest.approx(0.08)
    assert {"run_started", "run_finished", "guest_started"} <= set(run.events["event"])
    # Every guest faults more than pff_high = 1/s once its PFF is measured (every 2 ticks): the controller
    # never inflates, and its decisions say why, with the numbers.
    d = run.decisions
    assert not (d["decision"] == "inflate").any()
    last = d.groupby("guest").tail(1)
    assert list(last["code"]) == ["pff_above_high"] * 2 and (last["in_pff"] > last["in_pff_high"]).all()
    counts = run.summary["variants"]["default"]["balloon_decisions"]
    assert all(g["decisions"] == 8 and g["counts"]["pff_above_high"] >= 5 for g in counts.values()), counts
    again = balloonlab.load(tmp_path / "run")
    assert again.exit_status is None and again.ok
    pd.testing.assert_frame_equal(again.guests, run.guests)
    with pytest.raises(balloonlab.ConfigError, match="override 'host.overcomit'"):
        balloonlab.run("tests-tiny", overrides={"host.overcomit": 2}, run_dir=tmp_path / "never")
    with pytest.raises(balloonlab.ConfigError, match="ticks must be an integer >= 1"):
        balloonlab.run("tests-tiny", ticks=0, run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no host.jsonl"):
        balloonlab.load(tmp_path / "empty")
    assert not procs_mentioning(str(tmp_path))

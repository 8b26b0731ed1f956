"""``pace``: a run slow enough to watch, whose counts are those of the same run unpaced."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from balloonlab.proto.errors import ConfigError
from hostd.config import RunConfig
from tests.procs import run_launcher

SCENARIO = """
[scenario]
name = "tests-pace"
seed = 3
guests = 2
ticks = 12
tick_us = 50000
metrics_every_ticks = 1

[host]
overcommit = 1.3

[guest]
ram_mib = 4
kernel_mib = 0.25
batch_refs = 512
regions = [{ name = "db", kind = "file", mib = 2.0 }, { name = "heap", kind = "anon", mib = 1.5 }]
workload = [{ kind = "db", region = "db", weight = 2 }, { kind = "anon-hot", region = "heap", weight = 1 }]
"""


def _tick_walls(run_dir: Path) -> list[float]:
    walls = []
    for line in (run_dir / "host.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "tick_completed":
            walls.append(datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp())
    return walls


def _counts(run_dir: Path) -> dict:
    (v,) = json.loads((run_dir / "summary.json").read_text())["variants"].values()
    return {"events": v["event_counts"], "host": v["host"], "lost": v["lost_pages"],
            "guests": [{k: g[k] for k in ("refs", "major_faults", "balloon_pages")} for g in v["guests"]]}


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_paced_run_waits_for_the_wall_clock_and_counts_the_same(tmp_path: Path) -> None:
    path = tmp_path / "pace.toml"
    path.write_text(SCENARIO)
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    res = run_launcher("--scenario", str(path), "--run-dir", str(fast), "--no-report", timeout_s=100)
    assert res.returncode == 0, res.stderr[-3000:]
    # 12 ticks of 50 ms at 0.4 virtual s per wall s: tick k may not start before k * 0.125 wall s
    res = run_launcher("--scenario", str(path), "--run-dir", str(slow), "--no-report", "--pace", "0.4",
                       timeout_s=100)
    assert res.returncode == 0, res.stderr[-3000:]
    walls = _tick_walls(slow)
    assert len(walls) == 12
    # tick 0 completed before tick 1 could start (0.125 s in), tick 11 after it started (1.375 s in)
    assert walls[-1] - walls[0] >= 10 * 0.125, walls
    assert json.loads((slow / "overrides.json").read_text()) == {"scenario.pace": 0.4}
    assert _counts(slow) == _counts(fast)
    assert _counts(slow)["lost"] == 0


def test_pace_is_checked_where_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SCENARIO.replace("metrics_every_ticks = 1", "metrics_every_ticks = 1\npace = -1"))
    res = run_launcher("--scenario", str(path), "--run-dir", str(tmp_path / "r"), "--no-report", timeout_s=60)
    assert res.returncode != 0 and "pace" in res.stderr and ">= 0" in res.stderr, res.stderr[-2000:]
    res = run_launcher("--scenario", str(path), "--pace", "0", timeout_s=60)
    assert res.returncode == 2 and "--pace must be > 0" in res.stderr, res.stderr[-2000:]
    raw = {"run_id": "r", "scenario": "s", "variant": "v", "seed": 1, "ticks": 1,
           "guests": [{"id": 0, "ram_pages": 64}], "pace": -0.5}
    with pytest.raises(ConfigError, match="pace must be >= 0"):
        RunConfig.from_mapping(raw)
    assert RunConfig.from_mapping(dict(raw, pace=2)).pace == 2.0

"""``BALLOONLAB_PROFILE_DIR``: the host and every guest of a real run leave cProfile stats pstats can read."""
from __future__ import annotations

import pstats
from pathlib import Path

import pytest

from tests.procs import run_launcher


def test_a_run_leaves_one_readable_profile_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prof_dir = tmp_path / "prof"
    prof_dir.mkdir()
    monkeypatch.setenv("BALLOONLAB_PROFILE_DIR", str(prof_dir))
    res = run_launcher("--scenario", "tests-tiny", "--guests", "2", "--ticks", "5", "--run-dir",
                       str(tmp_path / "run"), "--no-report", timeout_s=120)
    assert res.returncode == 0, res.stderr
    names = sorted(p.name.rsplit("-", 1)[0] for p in prof_dir.glob("*.prof"))
    assert names == ["guest-0", "guest-1", "host-default"], names
    for path in prof_dir.glob("*.prof"):
        stats = pstats.Stats(str(path))
        assert stats.total_calls > 1000, path.name   # the whole process ran under the profiler

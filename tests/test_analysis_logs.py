"""The log reader: damaged lines are counted, long runs are sampled evenly, nothing that matters is lost.

Pure tests on synthetic logs shaped like real ones (scripts/bench_analyze.py
writes them); no processes except one interpreter for the lazy-import check.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from balloonlab.proto import events as ev
from balloonlab.analysis.logs import guest_series, load_variant, read_log
from balloonlab.analysis.plots import rate_per_s
from scripts.bench_analyze import write_synthetic_run
from tests.procs import REPO


def _tick_line(tick: int, **fields: object) -> str:
    return json.dumps({"refs": 100 * tick, **fields, "event": ev.TICK_COMPLETED, "guest": 0, "proc": "guest",
                       "tick": tick, "level": "info", "timestamp": "2026-01-01T00:00:00Z"})


def test_every_line_is_kept_in_file_order_when_the_run_is_short(tmp_path: Path) -> None:
    path = tmp_path / "guest-0.jsonl"
    lines = [json.dumps({"event": ev.GUEST_STARTED, "guest": 0})]
    for t in range(9, 100, 10):
        lines.append(_tick_line(t))
        if t == 49:
            lines.append(json.dumps({"event": ev.PAGE_LOST, "guest": 0, "tick": t, "vpage": 7}))
    path.write_text("\n".join(lines) + "\n")
    lf = read_log(path)
    assert lf.bad_lines == 0 and lf.tick_stride == 1 and lf.tick_lines == 10
    assert [e["event"] for e in lf.events] == [json.loads(x)["event"] for x in lines]


def test_truncated_and_garbage_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "guest-0.jsonl"
    good = [_tick_line(t) for t in range(9, 60, 10)]
    cut = good[-1][: len(good[-1]) // 2]
    nested_cut = _tick_line(99, nested={"a": 1})
    nested_cut = nested_cut[: nested_cut.index("}") + 1]           # ends in a brace, yet cut short
    tail_cut = good[0][:-3]                                        # lost only its closing characters
    path.write_bytes(("\n".join(good[:-1]) + "\n" + cut + "\n" + "garbage\n" + nested_cut + "\n"
                      + tail_cut + "\n" + "[1, 2]\n" + "\n").encode() + b"\xff\xfe{\n" + good[-1].encode())
    lf = read_log(path)
    assert lf.bad_lines == 6
    assert [e["tick"] for e in lf.events] == [9, 19, 29, 39, 49, 59]   # the last line has no newline: still read


def test_long_runs_keep_an_even_sample_the_last_line_and_every_other_event(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_synthetic_run(run, lines=6_000, guests=2)
    host_lines = (run / "host.jsonl").read_text().splitlines()
    notable = [json.loads(x) for x in host_lines if ev.TICK_COMPLETED not in x]
    lf = read_log(run / "host.jsonl", max_tick_samples=100)
    ticks = [e for e in lf.events if e["event"] == ev.TICK_COMPLETED]
    assert lf.tick_lines == 2_000 and lf.tick_stride == 16
    assert 100 <= len(ticks) <= 201
    gaps = np.diff([e["tick"] for e in ticks[:-1]])
    assert (gaps == gaps[0]).all(), "the sample is evenly spaced"
    assert ticks[-1]["tick"] == json.loads([x for x in host_lines if ev.TICK_COMPLETED in x][-1])["tick"]
    assert [e for e in lf.events if e["event"] != ev.TICK_COMPLETED] == notable
    # the merge keeps file order: virtual time never goes backwards
    vts = [e["vt_us"] for e in lf.events if "vt_us" in e]
    assert vts == sorted(vts)


def test_load_variant_warns_with_the_count(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    write_synthetic_run(run, lines=400, guests=2)   # guest-0 ends with a truncated line and a garbage line
    v = load_variant("default", run)
    assert v.bad_lines == 2 and v.bad_by_file == {"guest-0.jsonl": 2}
    err = capsys.readouterr().err
    assert "skipped 2 malformed log line(s)" in err and "guest-0.jsonl: 2" in err


def test_rates_come_from_cumulative_counters_over_virtual_time(tmp_path: Path) -> None:
    path = tmp_path / "guest-0.jsonl"
    path.write_text("\n".join(_tick_line(t, vt_us=(t + 1) * 10_000.0) for t in (9, 19, 39)) + "\n")
    g = guest_series(read_log(path).events, 10_000, ["refs"])
    assert g["t_s"].tolist() == [0.1, 0.2, 0.4]
    # refs 900, 1900, 3900 at 0.1, 0.2, 0.4 virtual s
    assert np.allclose(rate_per_s(g["refs"], g["vt_us"]), [9_000, 10_000, 10_000])


def test_importing_the_launcher_and_the_analysis_does_not_import_matplotlib() -> None:
    code = ("import sys, balloonlab.launch, balloonlab.analyze, balloonlab.analysis.report, balloonlab.analysis.plots, "
            "balloonlab.analysis.compare; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

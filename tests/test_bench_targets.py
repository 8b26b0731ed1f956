"""bench.py targets turns the benchmarks' JSON into the targets table (the benchmarks themselves faked here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import bench_targets as bt


def _row(guests: int, wall: float, priv: float, lost: int = 0, ticks: int = 100) -> dict:
    return {"guests": guests, "mode": "fork", "exit": 0, "wall_s": wall, "ticks_done": ticks, "status": "completed",
            "lost_pages": lost, "wall_s_per_vs": wall, "guest_private_mib": {"max": priv, "median": priv - 0.2}}


def test_scale_targets_ratio_memory_and_completion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(argv: list[str]) -> int:
        assert "--anchor-guests" in argv
        out = Path(argv[argv.index("--json") + 1])
        out.write_text(json.dumps({"rows": [_row(64, 5.0, 10.0), _row(256, 20.0, 21.5, lost=0)],
                                   "anchor": {"64": _row(64, 40.0, 24.0)}}))
        return 0
    monkeypatch.setattr(bt, "_run", fake_run)
    got = {t.what: t for t in bt.scale_targets(tmp_path, Path("/anchor"), "64,256")}
    speed = got["scale, 64 guests, 100 ticks: speed vs the anchor"]
    assert speed.value == pytest.approx(8.0) and speed.met is False
    assert got["256 guests run 100 ticks, nothing lost"].met is True
    mem = got["256 guests: private memory per guest (peak, max)"]
    assert mem.value == 21.5 and mem.met is False


def test_a_lost_page_fails_the_run_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(argv: list[str]) -> int:
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"rows": [_row(4, 1.0, 9.0, lost=3)],
                                                                    "anchor": {}}))
        return 0
    monkeypatch.setattr(bt, "_run", fake_run)
    got = {t.what: t for t in bt.scale_targets(tmp_path, None, "4")}
    assert got["4 guests run 100 ticks, nothing lost"].met is False
    assert "no --anchor" in got["scale, 64 guests, 100 ticks: speed vs the anchor"].shown


def test_ioamp_targets_from_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(argv: list[str]) -> int:
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({
            "total_wall_s": 8.0, "variants": {"a": {"virtual_s": 4.0}, "b": {"virtual_s": 4.0}},
            "anchor_vs_per_ws": 0.25, "host_cpu_us_per_request": 45.0, "echo_server_cpu_us_per_round_trip": 25.0}))
        return 0
    monkeypatch.setattr(bt, "_run", fake_run)
    vs, cpu = bt.ioamp_targets(tmp_path, Path("/anchor"))
    assert vs.value == pytest.approx(4.0) and vs.met is False
    assert cpu.value == pytest.approx(1.8) and cpu.met is True


def test_a_benchmark_that_did_not_run_is_not_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bt, "_run", lambda argv: 2)
    vs, cpu = bt.ioamp_targets(tmp_path, Path("/anchor"))
    assert vs.value is None and vs.met is None and cpu.met is None


def test_traces_targets_take_the_speed_ratios_not_the_miss_ratios(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"program": "sort", "miss_ratio": 0.02, "kernel_clock_mrefs_s": 30.0, "kernel_clock_miss_ratio": 0.02,
             "kernel_clock_ratio": 0.9, "kernel_esc_miss_ratio": 0.01, "kernel_esc_ratio": 0.6},
            {"program": "ls", "miss_ratio": 0.1, "kernel_clock_miss_ratio": 0.1, "kernel_clock_ratio": 1.4}]

    class Done:
        returncode = 0
        stdout = "table\n" + json.dumps(rows) + "\n"
    monkeypatch.setattr(bt.subprocess, "run", lambda *a, **k: Done())
    (t,) = bt.traces_targets(tmp_path)
    assert t.value == pytest.approx(0.6) and t.met is True and "sort, esc" in t.shown


def test_rounds_take_each_ratio_within_its_round_and_show_the_median(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine drifts between rounds: a ratio pairs the anchor with the run right after it, never across."""
    walls = iter([(8.0, 0.25), (16.0, 0.125), (10.0, 0.25)])     # (our wall, the anchor's vs/ws), per round

    def fake_ioamp(argv: list[str]) -> int:
        ours, anchor_vs = next(walls)
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({
            "total_wall_s": ours, "variants": {"a": {"virtual_s": 8.0}}, "anchor_vs_per_ws": anchor_vs,
            "host_cpu_us_per_request": 40.0 + ours, "echo_server_cpu_us_per_round_trip": 25.0}))
        return 0
    monkeypatch.setattr(bt, "_run", fake_ioamp)
    vs, cpu = bt.ioamp_targets(tmp_path, Path("/anchor"), rounds=3)
    assert vs.value == pytest.approx(4.0)          # rounds 4.0, 4.0, 3.2: the median, not 8/11.3 / mean anchor
    assert "median 4.00x over 3 rounds (4.00, 4.00, 3.20)" in vs.shown and vs.met is False
    assert cpu.value == pytest.approx(50.0 / 25.0)

    scale_walls = iter([(5.0, 40.0), (10.0, 60.0), (4.0, 44.0)])

    def fake_scale(argv: list[str]) -> int:
        here, there = next(scale_walls)
        guests = [int(g) for g in argv[argv.index("--guests") + 1].split(",")]
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({
            "rows": [_row(g, here if g == 64 else 20.0, 9.0) for g in guests], "anchor": {"64": _row(64, there, 24.0)}}))
        return 0
    monkeypatch.setattr(bt, "_run", fake_scale)
    got = {t.what: t for t in bt.scale_targets(tmp_path, Path("/anchor"), "64,256", rounds=3)}
    speed = got["scale, 64 guests, 100 ticks: speed vs the anchor"]
    assert speed.value == pytest.approx(8.0) and "(8.00, 6.00, 11.00)" in speed.shown
    assert got["256 guests run 100 ticks, nothing lost"].met is True     # the curve is run once, in round 1

"""The dashboard's reading of a run directory as it grows (balloonlab.dashboard.model), on logs written here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from balloonlab.dashboard.model import RunModel, VariantModel
from balloonlab.dashboard.tail import LogTail
from tests.dashlogs import HOST_FRAMES, RAM_PAGES, FakeRun


def test_a_tail_returns_whole_lines_only_and_counts_damage(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    tail = LogTail(path)
    assert tail.read_new() == []                       # not there yet
    path.write_text('{"event": "a"}\n{"event": "b", "x"')
    assert [e["event"] for e in tail.read_new()] == ["a"]
    with open(path, "a") as f:
        f.write(': 1}\nnot json\n[1, 2]\n{"no_event": 1}\n{"event": "c"}\n')
    assert [e["event"] for e in tail.read_new()] == ["b", "c"]
    assert tail.bad_lines == 3
    assert tail.read_new() == []


def test_one_frame_per_host_tick_with_each_guests_own_stats_and_rates(tmp_path: Path) -> None:
    run = FakeRun(tmp_path, guests=3)
    run.tick(4)
    run.tick(9)
    m = RunModel(tmp_path)
    m.poll()
    v = m.variants["v1"]
    assert [f["tick"] for f in v.frames] == [4, 9]
    assert v.meta["scenario"] == "fake" and v.meta["seed"] == 11 and v.meta["guest_ram_pages_total"] == 3 * RAM_PAGES
    f = v.frames[1]
    assert f["vt_s"] == pytest.approx(0.1)
    assert f["host"]["total_frames"] == HOST_FRAMES
    # host rates over the interval: 15 swap-outs in 0.05 virtual s
    assert f["host"]["swap_out_per_vsec"] == pytest.approx(300.0)
    for g in range(3):
        e = f["guests"][str(g)]
        assert e["guest"]["balloon_pages"] == 100 * g + 9          # the guest's own line of tick 9
        assert e["balloon_target_pages"] == 100 * g + 10            # the host's balloon_targets map
        assert e["host"]["swapped_pages"] == 5 * g                  # the host's table
        assert e["rates"]["refs_per_vsec"] == pytest.approx(1000 * (g + 1) * 5 / 0.05)
        assert e["rates"]["faults_per_vsec"] == pytest.approx(15 / 0.05)
        assert e["rates"]["host_swap_out_per_vsec"] == pytest.approx(g * 5 / 0.05)
    # the first frame's rates run from 0 at time 0
    assert v.frames[0]["guests"]["1"]["rates"]["refs_per_vsec"] == pytest.approx(2000 * 5 / 0.05)


def test_lines_are_taken_as_they_are_written_even_half_written(tmp_path: Path) -> None:
    run = FakeRun(tmp_path, guests=2)
    m = RunModel(tmp_path)
    m.poll()
    v = m.variants["v1"]
    assert v.frames == []
    host = run.host_line(4)
    run.write("host", host, partial=True)
    assert not [c for c in m.poll() if c[0] == "frame"]
    run.finish_line("host", host)
    changes = [c for c in m.poll() if c[0] == "frame"]
    assert [(c[2], c[3]["tick"]) for c in changes] == [(0, 4)]
    assert v.frames[0]["guests"]["0"]["guest"] is None          # the guests have not logged tick 4 yet
    run.write(0, run.guest_stats(0, 4))
    changes = [c for c in m.poll() if c[0] == "frame"]
    assert [c[2] for c in changes] == [0]                       # the same frame, rebuilt with the guest's line
    assert v.frames[0]["guests"]["0"]["guest"]["balloon_pages"] == 4
    assert v.bad_lines == 0


def test_events_are_counted_listed_and_balloon_targets_of_a_tick_folded(tmp_path: Path) -> None:
    run = FakeRun(tmp_path, guests=3)
    for g in range(3):
        run.write("host", {"event": "balloon_target_set", "guest": g, "target_pages": 50 + g, "previous_pages": 0,
                           "policy": "static", "tick": 2, "vt_us": 20000})
    chain = [{"link": "guests_thrashing", "value": 3, "threshold": 1, "ok": True},
             {"link": "host_free_low", "value": 10, "threshold": 20, "ok": True}]
    run.write("host", {"event": "swap_storm_detected", "storm": 1, "tick": 3, "chain": chain, "level": "warning"})
    cycle = [{"owner": "guest-0/vcpu", "holds_lock": "L_vmem@guest-0", "waits_for_lock": "L_hostmem@host",
              "holds": "L_vmem", "waits_for": "L_hostmem", "since_vt_us": 44000.0},
             {"owner": "host/reclaim", "holds_lock": "L_hostmem@host", "waits_for_lock": "L_vmem@guest-0",
              "holds": "L_hostmem", "waits_for": "L_vmem", "since_vt_us": 40000.0}]
    run.write("host", {"event": "deadlock_detected", "cycle": cycle, "length": 2, "recent_events": [1] * 500})
    run.write(1, {"event": "some_guest_trouble", "level": "error", "tick": 3, "what": "x"})
    run.write("host", {"event": "run_finished", "reason": "completed", "ticks": 5, "vt_us": 50000, "ram_pages": 3072})
    with open(tmp_path / "host.jsonl", "a") as f:
        f.write("garbage\n")
    m = RunModel(tmp_path)
    m.poll()
    v = m.variants["v1"]
    assert v.counts["balloon_target_set"] == 3
    names = [e["name"] for e in v.events]
    assert names == ["balloon_target_set", "swap_storm_detected", "deadlock_detected", "some_guest_trouble"]
    targets = v.events[0]
    assert targets["data"]["targets"] == {"0": 50, "1": 51, "2": 52} and "guest 2 → 52 pages" in targets["text"]
    assert v.events[1]["data"]["chain"] == chain
    dl = v.events[2]
    assert dl["vt_s"] == pytest.approx(0.044) and not dl["approx"]   # when the cycle closed
    assert "recent_events" not in dl["data"]
    assert v.events[3]["src"] == "guest 1"
    assert v.finished["reason"] == "completed" and v.meta["host_ram_pages"] == 3072
    assert v.bad_lines == 1


def test_fields_a_later_engine_adds_are_carried_generically(tmp_path: Path) -> None:
    run = FakeRun(tmp_path, guests=2)
    run.tick(4, extra={"memory_state": "soft", "alloc_targets": {"0": 700, "1": 800}},
             guest_extra={"alloc_target_pages": 640})
    m = RunModel(tmp_path)
    m.poll()
    f = m.variants["v1"].frames[0]
    assert f["host"]["memory_state"] == "soft"
    assert f["guests"]["1"]["alloc_targets"] == 800                 # a per-guest map at the top of the line
    assert f["guests"]["1"]["host"]["alloc_target_pages"] == 640    # a field of the host's table


def test_a_guest_that_left_is_marked_from_then_on(tmp_path: Path) -> None:
    run = FakeRun(tmp_path, guests=2)
    run.tick(4)
    run.write("host", {"event": "guest_disconnected", "guest": 1, "reason": "killed", "tick": 6, "vt_us": 65000})
    run.tick(9)
    m = RunModel(tmp_path)
    m.poll()
    frames = m.variants["v1"].frames
    assert "left" not in frames[0]["guests"]["1"]
    assert frames[1]["guests"]["1"]["left"] == {"vt_s": 0.065, "reason": "killed"}


def test_variants_are_found_as_they_appear_in_the_scenarios_order(tmp_path: Path) -> None:
    (tmp_path / "scenario.toml").write_text("[variants.zeta]\n[variants.alpha]\n")
    m = RunModel(tmp_path)
    assert m.poll() == [] and m.current_variant() is None
    FakeRun(tmp_path / "alpha", variant="alpha").tick(4)
    FakeRun(tmp_path / "zeta", variant="zeta")
    changes = m.poll()
    assert [c[1] for c in changes if c[0] == "variant"] == ["zeta", "alpha"]
    assert m.current_variant() == "alpha"                 # the one with frames
    (tmp_path / "summary.json").write_text(json.dumps({"scenario": "fake"}))
    assert ("summary", {"scenario": "fake"}) in m.poll()


def test_a_missing_run_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        RunModel(tmp_path / "nowhere")


def test_a_variant_snapshot_is_json(tmp_path: Path) -> None:
    run = FakeRun(tmp_path)
    run.tick(4)
    v = VariantModel("v1", tmp_path)
    v.poll()
    assert json.loads(json.dumps(v.snapshot()))["frames"][0]["tick"] == 4

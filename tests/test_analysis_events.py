"""The report's notable events: found by name, in virtual-time order, with their evidence, capped fairly.

Pure tests: hand-made logs in a run directory, no processes, no plots.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from balloonlab.proto import events as ev
from balloonlab.analysis.logs import load_variant
from balloonlab.analysis.report import MAX_EVENTS_SHOWN, notable_events, write_report
from balloonlab.analysis.summary import summarize

TS = "2026-01-01T00:00:{:09.6f}Z"


def _line(event: str, wall_s: float, level: str = "info", **fields: object) -> str:
    return json.dumps({**fields, "event": event, "proc": "host", "level": level, "timestamp": TS.format(wall_s)})


def _write_run(run: Path, host: list[str], guest0: list[str] | None = None) -> Path:
    run.mkdir(parents=True)
    start = _line(ev.RUN_STARTED, 0.0, scenario="hand-made", seed=9, tick_us=10_000, ticks=100)
    ticks = [_line(ev.TICK_COMPLETED, 1.0 + t / 100, tick=t, vt_us=(t + 1) * 10_000, free_frames=10)
             for t in range(9, 100, 10)]
    end = _line(ev.RUN_FINISHED, 3.0, ticks=100, vt_us=1_000_000, reason="completed")
    (run / "host.jsonl").write_text("\n".join([start, *host, *ticks, end]) + "\n")
    (run / "guest-0.jsonl").write_text("\n".join(guest0 or []) + "\n")
    return run


def test_events_are_listed_by_name_in_virtual_time_order_with_their_evidence(tmp_path: Path) -> None:
    cycle = [{"owner": "guest-1/vcpu", "holds": "L_vmem", "holds_lock": "L_vmem@guest-1", "waits_for": "L_hostmem",
              "waits_for_lock": "L_hostmem@host", "site": "disk_read", "since_vt_us": 45_000.0},
             {"owner": "host/reclaim", "holds": "L_hostmem", "holds_lock": "L_hostmem@host", "waits_for": "L_vmem",
              "waits_for_lock": "L_vmem@guest-1", "site": "shootdown", "since_vt_us": 40_000.0}]
    host = [
        _line(ev.SWAP_STORM_DETECTED, 2.0, tick=50, vt_us=500_000, level="warning", storm=1,
              chain=[{"link": "guests_thrashing", "value": 2, "threshold": 1, "ok": True}]),
        *(_line(ev.BALLOON_TARGET_SET, 1.0, guest=g, tick=3, vt_us=30_000, target_pages=100, previous_pages=0)
          for g in range(3)),
        _line(ev.DEADLOCK_DETECTED, 1.945, protocol="naive", cycle=cycle),   # no vt: placed by wall clock
        _line("something_odd_happened", 1.2, tick=20, level="error", why="a warning or an error is always news"),
        _line("routine_chatter", 1.3, tick=21),                            # info and not in proto.events: not news
    ]
    run = _write_run(tmp_path / "run", host)
    v = load_variant("default", run)
    events = notable_events(v, 10_000)
    assert [e["event"] for e in events] == [ev.BALLOON_TARGET_SET] * 3 + [
        "something_odd_happened", ev.SWAP_STORM_DETECTED, ev.DEADLOCK_DETECTED]
    deadlock = events[5]
    # logged between the host's tick 89 (vt 0.9 s) and tick 99 (vt 1.0 s), 55 % of the way
    assert deadlock["_vt_approx"] and deadlock["_vt_us"] == pytest.approx(955_000)
    text = write_report(run, plots=False).read_text()
    # one row for the same target set for three guests at once
    assert "| 0.030 | 3 | host, guests 0, 1, 2 | `balloon_target_set` | target_pages=100, previous_pages=0 |" in text
    assert ("cycle: guest-1/vcpu holds L_vmem@guest-1, waits for L_hostmem@host in disk_read since 0.0450 s → "
            "host/reclaim holds L_hostmem@host, waits for L_vmem@guest-1 in shootdown since 0.0400 s") in text
    assert "chain: guests_thrashing 2 (threshold 1: yes)" in text
    assert "`something_odd_happened` (error)" in text and "routine_chatter" not in text
    assert "| `balloon_target_set` | 3 | 0.030 | 0.030 | host |" in text
    assert "| ≈0.955 | — | host | `deadlock_detected` |" in text   # its placement is marked approximate


def test_an_event_added_to_proto_events_later_shows_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _write_run(tmp_path / "run", [_line("balloon_popped", 1.5, tick=40, vt_us=400_000, guest=2, pages=7)])
    v = load_variant("default", run)
    assert notable_events(v, 10_000) == []
    monkeypatch.setattr(ev, "BALLOON_POPPED", "balloon_popped", raising=False)
    (e,) = notable_events(v, 10_000)
    assert e["event"] == "balloon_popped" and e["_src"] == "host, guest 2"
    assert summarize(run)["variants"]["default"]["event_counts"] == {
        ev.RUN_FINISHED: 1, ev.RUN_STARTED: 1, "balloon_popped": 1}


def test_the_list_is_capped_fairly_between_kinds_with_counts_of_all(tmp_path: Path) -> None:
    many = [_line(ev.BALLOON_TARGET_SET, 1.0 + t / 1000, guest=0, tick=t, vt_us=t * 10_000, target_pages=t)
            for t in range(300)]
    rare = [_line(ev.SWAP_AREA_PINNED, 2.9, guest=1, tick=299, vt_us=2_990_000, pinned_pages=64)]
    run = _write_run(tmp_path / "run", many + rare)
    text = write_report(run, plots=False).read_text()
    assert "| `balloon_target_set` | 300 |" in text and "| `swap_area_pinned` | 1 |" in text
    listed = [ln for ln in text.splitlines() if ln.startswith("| ") and "`balloon_target_set`" in ln
              and "target_pages=" in ln]
    assert len(listed) == MAX_EVENTS_SHOWN - 1
    assert "pinned_pages=64" in text   # the rare kind is not crowded out
    assert f"Listed below: {MAX_EVENTS_SHOWN} of 301 rows" in text

"""A host monitor is one module and one registry line: its table, its run keys, its summary keys, its report section.

A monitor made here (counting disk writes, with a table of its own) is
added to ``registry.MONITORS`` and nowhere else; the scenario parser, the
host's monitors and the analysis (summary.json, the text summary, the
report) must all pick it up.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytest

from balloonlab.analysis.logs import VariantLogs
from balloonlab.analysis.pathologies import pathology_lines, pathology_metrics
from balloonlab.analysis.report import _pathology_details
from balloonlab.hostd.monitors import HostMonitors, monitors_config, registry
from balloonlab.hostd.monitors.base import (MonitorBase, MonitorSpec, ReportFormat, SummaryKeys, TickContext,
                                            at_least_one)
from balloonlab.proto.errors import ConfigError

from .test_host_fakes import FakeGuests, make_memory


@dataclass(frozen=True, slots=True)
class WritesConfig:
    enabled: bool = True
    every_ticks: int = at_least_one(1)


class WriteCounter(MonitorBase):
    def __init__(self, cfg: WritesConfig) -> None:
        self.cfg = cfg
        self.writes = 0
        self.ticks: list[tuple[str, int]] = []

    def disk_written(self, guest_id: int, blocks: np.ndarray, tokens: np.ndarray) -> None:
        self.writes += int(np.asarray(blocks).size)

    def record_tick(self, tick: TickContext) -> None:
        self.ticks.append(("record", tick.tick))

    def end_tick(self, tick: TickContext) -> None:
        assert tick.history.now.tick == tick.tick   # the history holds the tick before anyone acts on it
        self.ticks.append(("end", tick.tick))

    def finished_keys(self) -> dict[str, Any]:
        return {"writes": {"pages": self.writes}}


def summarize(monitors: Mapping[str, Any], host_events: Sequence[Mapping[str, Any]],
              finished: Mapping[str, Any]) -> SummaryKeys:
    return SummaryKeys(host={"written_pages_seen": (monitors.get("writes") or {}).get("pages", 0)},
                       variant={"writes_seen": True})


def report(v: Mapping[str, Any], fmt: ReportFormat) -> list[str]:
    return [f"- pages written, as the host saw them: {fmt.cell(v['host']['written_pages_seen'])}"]


SPEC = MonitorSpec(name="writes", config=WritesConfig, make=lambda cfg, ctx: WriteCounter(cfg),
                   summarize=summarize, table_fragment=lambda v: f"written={v['host']['written_pages_seen']}",
                   report=report)


@pytest.fixture
def with_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "MONITORS", (*registry.MONITORS, SPEC))


def test_its_table_is_parsed_with_its_defaults_and_checks(with_writes: None) -> None:
    cfg = monitors_config({"writes": {"every_ticks": 3}})
    assert cfg["writes"] == WritesConfig(every_ticks=3) and cfg.swap_storm.enabled
    assert monitors_config({})["writes"] == WritesConfig()
    with pytest.raises(ConfigError, match=r"monitors.writes.every_ticks: must be >= 1, got 0"):
        monitors_config({"writes": {"every_ticks": 0}})
    with pytest.raises(ConfigError, match="unknown key; known: \\['enabled', 'every_ticks'\\]"):
        monitors_config({"writes": {"often": True}})


def test_without_it_the_table_is_unknown() -> None:
    with pytest.raises(ConfigError, match="unknown monitor; known: \\['convergence', 'double_faults', 'pinning', "
                                          "'swap_storm', 'wss'\\]"):
        monitors_config({"writes": {}})


async def test_the_host_drives_it_and_reports_its_keys(with_writes: None) -> None:
    hm = make_memory(total_frames=64, swap_slots=64)
    FakeGuests(hm).add(1, 16, disk_blocks=32)
    mon = HostMonitors({"writes": {"every_ticks": 2}}, hm, 10_000)
    hm.wire(observer=mon)
    mon.guest_joined(1, 16, {})
    await hm.vdisk_write(1, np.array([3], np.uint64), np.array([9], np.uint64), 0.0)
    await hm.vdisk_write(1, np.array([4, 5], np.uint64), np.array([9, 9], np.uint64), 0.0)
    for t in range(2):
        mon.end_tick(t, (t + 1) * 10_000, hm.snapshot(), {1: {"vt_us": (t + 1) * 10_000.0}}, {1: 0})
    writes = mon["writes"]
    assert writes.cfg.every_ticks == 2 and writes.writes == 3
    assert writes.ticks == [("record", 0), ("end", 0), ("record", 1), ("end", 1)]
    metrics = mon.metrics()
    assert metrics["writes"] == {"pages": 3} and "swap_storm" in metrics and "iobuf_pages_peak" in metrics


def test_the_analysis_iterates_the_registry(with_writes: None, tmp_path: Path) -> None:
    finished = {"monitors": {"writes": {"pages": 7}}, "peaks": {}}
    v = VariantLogs("v", tmp_path, host=[], guests={}, config={})
    host: dict[str, Any] = {}
    keys = pathology_metrics(v, finished, host)
    assert host["written_pages_seen"] == 7 and keys["writes_seen"] is True
    assert "swap_storms" in keys and "io_buffer_pages_peak" in host       # the shipped monitors are still there
    summary = {"host": host, **keys}
    (line,) = [x for x in pathology_lines(summary) if x.startswith("   pathologies:")]
    assert "  io_buffer_pages_peak=0  written=7  refs/vs before/after" in line
    assert "- pages written, as the host saw them: 7" in _pathology_details(summary)

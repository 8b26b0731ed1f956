"""The swap storm of the seed, reproduced and avoided, over real processes.

``swap-storm`` with four guests (three busy, one with cold memory to spare)
for 0.6 virtual seconds: ``aggressive`` inflates all at once from tick 30
and the chain of the seed unfolds (several guests thrash, the host's I/O
buffers and cache grow, its free memory falls into ESX's hard state, it
swaps); ``working-set`` takes only the cold memory, and the detector, with
its default thresholds, stays quiet. Orderings with wide margins, never
exact counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balloonlab.proto import events as ev
from tests.pathology_runs import headline, host_events, run_scenario

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("swap-storm") / "run"
    variants = run_scenario(run_dir, "swap-storm", "--guests", "4", "--ticks", "60")
    assert sorted(variants) == ["aggressive", "working-set"]
    for name, v in variants.items():
        print(headline(name, v))
    return run_dir, variants


@pytest.mark.timeout(90)
def test_aggressive_inflation_unfolds_the_storm_and_the_detector_names_the_chain(storm: tuple[Path, dict]) -> None:
    run_dir, variants = storm
    agg, ws = variants["aggressive"], variants["working-set"]
    msg = headline("aggressive", agg) + "\n" + headline("working-set", ws)
    assert agg["swap_storms"] >= 1, msg
    first = host_events(run_dir, "aggressive", ev.SWAP_STORM_DETECTED)[0]
    links = {link["link"]: link for link in first["chain"]}
    assert set(links) == {"guests_thrashing", "host_io_memory", "host_free_low", "host_swapping"}
    assert all(link["ok"] and "value" in link and "threshold" in link for link in links.values()), first
    assert len(links["guests_thrashing"]["guests"]) >= 2                       # several guests, not one
    assert links["host_io_memory"]["grew_pages"] > 0
    assert first["tick"] >= 30                                   # after the inflation, not before
    ram = agg["host"]["ram_pages"]
    # Host swap-outs and I/O-buffer pages rise sharply; throughput falls by more than half.
    assert agg["host"]["swap_out_pages"] >= 0.02 * ram, msg
    # (At 1.3x overcommit working-set host-swaps too, before its balloons catch up: the storm is told
    # apart by the detector's chain and by throughput, below, not by the swap-out count alone.)
    # Host I/O memory: I/O buffers and the disk cache (with writeback the swap-outs pile up as dirty cache),
    # across the detector's own I/O threshold (Linux's dirty_background_ratio, 10 % of RAM) in the storm only.
    assert _io_peak(agg) >= _IO_FRACTION * ram > _io_peak(ws), msg
    tp = agg["throughput"]
    assert tp["first_inflation_tick"] >= 30, msg
    # Throughput falls once the balloon squeezes both guests. Under the deterministic discipline a guest
    # short of frames first retires its own finished I/O buffers and drops its own clean cache, and
    # only then host-swaps its own pages, so the fall is milder than with mid-tick global blind
    # reclaim (measured 0.56x, with 1,138 pages host-swapped, against 0.13x and 2,135 before).
    assert tp["after_inflation_refs_per_vsec"] < 0.7 * tp["before_inflation_refs_per_vsec"], msg


@pytest.mark.timeout(90)
def test_the_working_set_controller_has_no_storm_and_keeps_throughput(storm: tuple[Path, dict]) -> None:
    run_dir, variants = storm
    agg, ws = variants["aggressive"], variants["working-set"]
    msg = headline("aggressive", agg) + "\n" + headline("working-set", ws)
    assert ws["swap_storms"] == 0 and not host_events(run_dir, "working-set", ev.SWAP_STORM_DETECTED), msg
    # No I/O pile-up: below the detector's I/O threshold, where the storm's is above it. (The peaks were
    # 1,024 and 4,032 pages; with faults stopped at the tick's end working-set's guests run 26 % faster and
    # write more through the writeback cache: 1,776 and 4,048, of 2,521 at the threshold.)
    assert _io_peak(ws) < _IO_FRACTION * agg["host"]["ram_pages"] <= _io_peak(agg), msg
    assert sum(g["balloon_pages"] for g in ws["guests"]) > 1000, msg                 # it did reclaim
    # (1.37x under the deterministic discipline, where the aggressive variant's guests drop their own
    # clean cache before anything is host-swapped; 2.6x with mid-tick global blind reclaim)
    assert ws["refs_per_vsec"] >= 1.3 * agg["refs_per_vsec"], msg
    tp = ws["throughput"]
    assert tp["after_inflation_refs_per_vsec"] >= 0.8 * tp["before_inflation_refs_per_vsec"], msg


_IO_FRACTION = 0.10   # swap-storm.toml [monitors.swap_storm] io_fraction


def _io_peak(v: dict) -> int:
    return int(v["host"]["io_buffer_pages_peak"]) + int(v["host"].get("cache_pages_peak", 0))

"""Nested swapping (double faults) and pinning as its cure, over real processes.

``nested-swap`` with two guests for 0.5 virtual seconds: each guest's
balloon leaves it short of its working set, so it swaps; the host, short
too, swaps guest pages and drops clean disk-cache clusters. A guest's
partial write into a cluster of its swap area that the host no longer
caches is a read-modify-write: a double fault. Without pinning they keep
coming; with pinning the area's clusters stay cached once cached, so after
the pin only a first write into a cluster never cached faults.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balloonlab.proto import events as ev
from tests.pathology_runs import headline, host_events, run_scenario

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("nested-swap") / "run"
    variants = run_scenario(run_dir, "nested-swap", "--guests", "2", "--ticks", "50", timeout_s=100)
    assert sorted(variants) == ["no-pinning", "pinning"]
    for name, v in variants.items():
        print(headline(name, v))
    return run_dir, variants


@pytest.mark.timeout(120)
def test_every_double_fault_is_logged_with_its_evidence(nested: tuple[Path, dict]) -> None:
    run_dir, variants = nested
    for name, v in variants.items():
        events = host_events(run_dir, name, ev.DOUBLE_FAULT)
        assert sum(e["count"] for e in events) == v["host"]["double_faults"], name
        assert v["host"]["double_fault_logged_pages"] == v["host"]["double_faults"], name
        for e in events:
            assert e["blocks"] and e["clusters"] and e["added_us"] > 0 and "swap_area_pinned" in e, e
    assert len(host_events(run_dir, "no-pinning", ev.DOUBLE_FAULT)) <= 50 * 2   # at most one per guest and tick


@pytest.mark.timeout(120)
def test_double_paging_is_counted_per_guest_and_headlined(nested: tuple[Path, dict]) -> None:
    from balloonlab.analysis.compare import HEADLINE, headline_value

    run_dir, variants = nested
    row = next(m for m in HEADLINE if m.key == "double_paging_pages")
    for name, v in variants.items():
        per_guest = [g["host_double_paging_pages"] for g in v["guests"]]
        assert sum(per_guest) == v["host"]["double_paging_pages"] == headline_value(row, v), (name, per_guest)
        logged = sum(e["pages"] for e in host_events(run_dir, name, ev.DOUBLE_PAGING_DETECTED))
        assert logged == v["host"]["double_paging_pages"], name
    # The guests page out pages the host had swapped: it happens here, on every guest.
    assert all(g["host_double_paging_pages"] > 0 for g in variants["no-pinning"]["guests"]), variants["no-pinning"]


@pytest.mark.timeout(120)
def test_without_pinning_double_faults_keep_coming_with_pinning_none_after_the_pin(nested: tuple[Path, dict]) -> None:
    run_dir, variants = nested
    off, on = variants["no-pinning"], variants["pinning"]
    msg = headline("no-pinning", off) + "\n" + headline("pinning", on)
    pins = host_events(run_dir, "pinning", ev.SWAP_AREA_PINNED)
    assert {e["guest"] for e in pins} == {0, 1}, pins
    assert all(e["blocks"] > 0 and "pinned_pages" in e for e in pins), pins
    # The trigger is the guest's page-fault frequency, above pff_high (1000 major faults per virtual s).
    assert all(e["pff"] >= e["pff_high"] == 1000.0 for e in pins), pins
    pinned_at = {e["guest"]: e["tick"] for e in pins}
    # The cure is judged by throughput too: each pinned guest's refs/vs before and after its pin.
    cure = on["pinning"]
    assert set(cure["guests"]) == {"0", "1"} and cure["first_pin_tick"] == min(pinned_at.values()), cure
    assert all(g["refs_per_vsec_before_pin"] > 0 and g["refs_per_vsec_after_pin"] > 0
               for g in cure["guests"].values()), cure
    assert "pinning" not in off
    # Without the pins double faults keep coming, long after the same point in the run ...
    later = sum(e["count"] for e in host_events(run_dir, "no-pinning", ev.DOUBLE_FAULT)
                if e["tick"] > max(pinned_at.values()) + 5)
    assert later >= 30, msg
    # ... with them, only first writes into clusters of the area never cached yet: far fewer.
    assert on["host"]["double_faults_after_pin"] <= later / 2, msg
    for e in host_events(run_dir, "pinning", ev.DOUBLE_FAULT):
        assert e["swap_area_pinned"] == (e["tick"] > pinned_at[e["guest"]]), e
    # What the cure costs: the area's clusters held in host memory, at most the whole areas.
    assert 0 < on["host"]["pinned_pages_peak"] <= sum(e["blocks"] for e in pins), msg
    assert off["host"]["pinned_pages_peak"] == 0, msg

"""Host storage over real processes: per-VM swap files with a swap cache, one disk-cache budget,
every virtual disk and the swap files on one shared device (``[disk] shared``)."""
from __future__ import annotations

import json

import pytest

from tests.procs import dump_logs, procs_mentioning, run_launcher

pytestmark = pytest.mark.multiprocess


@pytest.mark.timeout(120)
def test_a_shared_device_under_host_swapping_keeps_every_page_and_its_books(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", "tests-tiny", "--ticks", "40", "--set", "host.overcommit=1.6",
                       "--set", "disk.shared=true", "--set", "host.cache_max_mib=0.5",
                       "--run-dir", str(run_dir), "--no-report", timeout_s=110)
    assert res.returncode == 0, f"stderr:\n{res.stderr}\n{dump_logs(run_dir)}"
    assert not procs_mentioning(str(run_dir))
    v = json.loads((run_dir / "summary.json").read_text())["variants"]["default"]
    h = v["host"]
    assert v["reason"] == "completed" and v["lost_pages"] == 0 and v["audit_ok"], v.get("audit_problems")
    assert h["swap_out_pages"] > 100                                   # the host really swapped
    # The swap cache: pages that came back and went out unchanged were not written again.
    assert h["swap_writes_avoided"] > 0
    assert h["swap_write_pages"] + h["swap_writes_avoided"] == h["swap_out_pages"]
    # The disk cache is dropped, never host-swapped, and one budget bounds it for all four guests.
    assert h["swap_out_cache_pages"] == h["swap_in_cache_pages"] == 0
    assert h["cache_budget_pages"] == 128 and 0 < h["cache_pages_peak"] <= 128
    assert h["vdisk_dropped_clean_pages"] > 0
    # One device: its reads are the host's swap-ins plus the disks' reads, exactly; its writes the swap writes
    # plus the disks' write-backs.
    assert h["swap_device_read_pages"] == h["swap_in_pages"] + h["vdisk_device_read_pages"]
    assert h["swap_device_write_pages"] == h["swap_write_pages"] + h["vdisk_device_write_pages"]

"""Shared by the pathology tests: run a scenario's variants for real and read what they left."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.procs import dump_logs, procs_mentioning, run_launcher

__all__ = ["run_scenario", "host_events", "headline"]


def run_scenario(run_dir: Path, scenario: str, *args: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Run every variant of ``scenario`` to the end; returns ``summary.json``'s variants."""
    res = run_launcher("--scenario", scenario, "--run-dir", str(run_dir), "--no-report", *args, timeout_s=timeout_s)
    assert res.returncode == 0, f"stderr:\n{res.stderr}\n{dump_logs(run_dir)}"
    assert not procs_mentioning(str(run_dir)), "processes outlived the run"
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, v in summary["variants"].items():
        assert v["reason"] == "completed", (name, v["reason"])
        assert v["lost_pages"] == 0, (name, v["lost_pages"])
        assert v["host"].get("invariant_violations", 0) == 0, name
    return summary["variants"]


def host_events(run_dir: Path, variant: str, event: str) -> list[dict[str, Any]]:
    out = []
    with open(run_dir / variant / "host.jsonl") as f:
        for line in f:
            e = json.loads(line)
            if e.get("event") == event:
                out.append(e)
    return out


def headline(name: str, v: dict[str, Any]) -> str:
    h = v["host"]
    return (f"{name:>14}: refs_per_vsec={v['refs_per_vsec']} swap_storms={v.get('swap_storms')} "
            f"host.swap_out_pages={h.get('swap_out_pages')} host.io_buffer_pages_peak={h.get('io_buffer_pages_peak')} "
            f"host.double_faults={h.get('double_faults')} host.double_faults_after_pin={h.get('double_faults_after_pin')} "
            f"host.pinned_pages_peak={h.get('pinned_pages_peak')} throughput={v.get('throughput')} "
            f"wall_s={v.get('wall_s')}")



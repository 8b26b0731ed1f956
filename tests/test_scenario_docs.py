"""README "Scenario files": every key of the schema is documented, and the example creates memory pressure."""
from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from balloonlab.proto import schema
from tests.procs import REPO, run_launcher

SECTION = re.compile(r"^## Scenario files\n(.*?)^## (?!#)", re.S | re.M)


def scenario_docs() -> str:
    m = SECTION.search((REPO / "README.md").read_text())
    assert m, "README.md has no '## Scenario files' section"
    return m.group(1)


def example() -> str:
    m = re.search(r"<!-- example: scenario -->\n```toml\n(.*?)```", scenario_docs(), re.S)
    assert m, "README 'Scenario files' has no block marked <!-- example: scenario -->"
    return m.group(1)


def test_every_table_and_key_of_the_schema_is_documented() -> None:
    docs = scenario_docs()
    structs = [schema.ScenarioTable, schema.HostTable, schema.GuestTable, schema.GuestEntry, schema.Region, schema.DiskTable,
               schema.BalloonTable, schema.LocksTable, schema.CostsTable, schema.DiskDevice, schema.SweepTable,
               *schema.WORKLOAD_KINDS.values()]
    missing = [f"{s.__name__}.{f.encode_name}" for s in structs for f in msgspec.structs.fields(s)
               if f"`{f.encode_name}`" not in docs]
    assert not missing, f"keys the README does not document: {missing}"
    for table in schema.TOP_TABLES:
        assert f"[{table}" in docs or f"[[{table}" in docs, table
    for kind in schema.WORKLOAD_KINDS:
        assert f"`{kind}`" in docs, kind


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_the_readme_example_creates_memory_pressure(tmp_path: Path) -> None:
    path = tmp_path / "first.toml"
    path.write_text(example())
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", str(path), "--run-dir", str(run_dir), "--no-report", timeout_s=140)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    swap, balloon = summary["variants"]["host-swap"], summary["variants"]["ballooning"]
    for v in (swap, balloon):
        assert v["lost_pages"] == 0
        assert all(g["major_faults"] > 0 for g in v["guests"])          # the guests wait for their disks
    # host-swap: the guests' memory does not fit, so the host swaps some of it out behind their backs
    assert swap["host"]["swap_out_pages"] > 0
    assert all(g["balloon_pages"] == 0 for g in swap["guests"])
    # ballooning: the guests give memory back, and the host swaps out less
    assert all(g["balloon_pages"] > 0 for g in balloon["guests"])
    assert balloon["host"]["swap_out_pages"] < swap["host"]["swap_out_pages"]

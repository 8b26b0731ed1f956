"""The seed's claim, measured: "file cache first" evicts a hot database cache; ESC and CAR keep it.

A guest has a database file read with a zipf-skewed hot set and a large
anonymous region that is allocated (written once) and then left idle. After
the cold region is allocated, memory is too small for both. ``file-first``
keeps reclaiming page cache "whatever its recency", so the database's hot
pages are thrown out while cold anonymous memory sits untouched; ``esc`` and
``car`` (the working-set policy) let the cold anonymous pages go to swap
instead. Fault counts are for the database phase after the allocation.
"""
from __future__ import annotations

import logging

import numpy as np

from balloonlab.proto.costs import CostModel
from balloonlab.guestd.blockdev import LocalBlockDevice
from balloonlab.guestd.hypervisor import NullHypervisor
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.kernel_config import KernelConfig
from balloonlab.guestd.workload import Layout, Region, build_workload, run_workload

log = logging.getLogger(__name__)

DB_PAGES = 2000
COLD_PAGES = 900
RAM_PAGES = 1000
DB_REFS = 40_000


async def db_faults_under_pressure(policy: str) -> dict[str, int]:
    layout = Layout([Region("db", "file", DB_PAGES), Region("cold", "anon", COLD_PAGES)])
    cfg = KernelConfig(ram_pages=RAM_PAGES, layout=layout, policy=policy)
    k = GuestKernel(cfg, np.random.default_rng(1), LocalBlockDevice(cfg.disk_blocks), NullHypervisor(), CostModel())
    rng = np.random.default_rng(7)
    db = build_workload([{"kind": "db", "region": "db", "theta": 1.0, "write_frac": 0.0}], layout, rng)
    cold = build_workload([{"kind": "anon-cold", "region": "cold"}], layout, rng)
    await run_workload(k, db, DB_REFS // 4)          # warm the database cache
    await run_workload(k, cold, COLD_PAGES)          # then allocate and touch the cold region once
    before = k.stats()
    await run_workload(k, db, DB_REFS)
    after = k.stats()
    assert after["lost_pages"] == 0
    return {"db_faults": after["major_faults"] - before["major_faults"],
            "swap_out": after["swap_out"], "anon_resident": after["anon_pages"]}


async def test_file_first_evicts_the_hot_cache_and_faults_far_more() -> None:
    res = {p: await db_faults_under_pressure(p) for p in ("file-first", "esc", "car")}
    for p, r in res.items():
        log.warning("seed claim: %-10s db faults %6d  swap-out %4d  cold anon still resident %4d",
                    p, r["db_faults"], r["swap_out"], r["anon_resident"])
    ff = res["file-first"]
    # file-first never touches the cold anonymous pages...
    assert ff["swap_out"] == 0 and ff["anon_resident"] == COLD_PAGES
    # ...so the database faults at least twice as often as under ESC or the working-set policy
    for p in ("esc", "car"):
        assert ff["db_faults"] >= 2 * res[p]["db_faults"], res
        assert res[p]["swap_out"] > COLD_PAGES // 2       # they gave up the cold memory instead

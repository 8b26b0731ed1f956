"""The tick-end gauges, counted in one compiled pass, equal numpy's counts of the same arrays.

``GuestKernel.stats`` runs at every tick of every guest; its frame and page
counts come from ``_paging.frame_gauges``. After a seeded run of references,
reclaim, balloon and host shootdowns (so every kind, soft-reclaimed pages,
unbacked and write-protected frames occur), each gauge must be what numpy
counts directly.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from balloonlab.guestd.memory import FrameKind
from balloonlab.proto.costs import CostModel

from .test_paging_engines import build, drive, script


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stats_gauges_equal_numpy_counts(seed: int) -> None:
    k, hv = build("compiled", "clock", 64, [("f", "file", 60), ("a", "anon", 70)], kernel_pages=3,
                  host="null", remote_disk=False, meddle_seed=None, future=None, costs=CostModel())

    async def run() -> None:
        ops = script(seed, 130, 40)
        for i in range(len(ops)):
            await drive(k, hv, ops[i:i + 1])
            if i % 10 == 0:
                k.share_protect(np.flatnonzero(k.frames.backed)[:: 7])
                await k.reclaim(3)
            check()

    seen: set[str] = set()

    def check() -> None:
        fr = k.frames
        s = k.stats()
        seen.update(key for key in ("balloon_pages", "soft_cached_pages", "shared_pages", "unbacked_pages") if s[key])
        kinds = np.bincount(fr.kind, minlength=len(FrameKind))
        assert (s["free"], s["anon_pages"], s["file_pages"], s["balloon_pages"], s["kernel_pages"]) == \
            tuple(int(kinds[x]) for x in (FrameKind.FREE, FrameKind.ANON, FrameKind.FILE, FrameKind.BALLOON,
                                          FrameKind.KERNEL))
        assert s["available"] == int(kinds[FrameKind.FREE] + kinds[FrameKind.FILE])
        assert s["soft_cached_pages"] == int(np.count_nonzero(k.pt.cached >= 0))
        assert s["unbacked_pages"] == fr.n - int(np.count_nonzero(fr.backed))
        assert s["shared_pages"] == int(np.count_nonzero(fr.wp))
        c = k.counters
        assert s["pgsteal_direct"] == c.evictions - c.soft_reclaimed - c.balloon_reclaimed
        assert all(type(v) in (int, float) for v in s.values())

    asyncio.run(run())
    assert seen == {"balloon_pages", "soft_cached_pages", "shared_pages", "unbacked_pages"}   # each was tested


def test_frame_gauges_refuses_an_unknown_kind() -> None:
    from balloonlab.guestd import _paging
    z = np.zeros(4, bool)
    with pytest.raises(ValueError):
        _paging.frame_gauges(np.array([0, 9, 0, 0], np.uint8), z, z, np.zeros(2, np.int64), np.zeros(8, np.int64))

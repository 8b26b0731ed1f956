"""The compiled batch steps of the workloads (guestd/_paging.c) give exactly numpy's references.

``Mix`` picks and places, and ``ZipfWorkload`` ranks, in one compiled pass
each; the draws stay numpy's. Every kind, mixed with others, with
components running dry mid-batch and with write codes, must yield the same
pages and writes, batch after batch, as the numpy path (``compiled = False``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from balloonlab.guestd.workload import build_workload
from balloonlab.guestd.workload.generators import Mix, ZipfWorkload
from balloonlab.guestd.workload.layout import Layout, Region

LAYOUT = Layout([Region("db", "file", 3000), Region("logs", "file", 70), Region("heap", "anon", 400),
                 Region("cold", "anon", 90), Region("b", "anon", 40)])

MIXES: list[list[dict[str, Any]]] = [
    [{"kind": "db", "region": "db", "weight": 1}, {"kind": "anon-hot", "region": "heap", "weight": 1}],
    [{"kind": "db", "region": "db", "weight": 4, "theta": 1.2},
     {"kind": "scan", "region": "logs", "weight": 1, "loop": False},
     {"kind": "anon-hot", "region": "heap", "weight": 1},
     {"kind": "anon-cold", "region": "cold", "weight": 1}],
    [{"kind": "zipf", "region": "heap", "theta": 0.0, "write_frac": 0.5, "overwrite_frac": 0.3},
     {"kind": "scan", "region": "logs"},
     {"kind": "phases", "region": "db", "ws_pages": 100, "phase_refs": 300, "weight": 2}],
    [{"kind": "burst", "region": "b", "hold_refs": 50, "idle_refs": 30, "cycles": 3},
     {"kind": "db", "region": "db", "theta": 2.5, "write_frac": 0.5}],
    [{"kind": "zipf", "region": "db", "theta": 0.6}],
]


def _both(specs: list[dict[str, Any]], seed: int) -> tuple[Any, Any]:
    fast = build_workload(specs, LAYOUT, np.random.default_rng(seed))
    slow = build_workload(specs, LAYOUT, np.random.default_rng(seed))
    for w in (slow, *getattr(slow, "components", ())):
        inner = getattr(w, "inner", w)
        if isinstance(inner, (Mix, ZipfWorkload)):
            inner.compiled = False
    if isinstance(slow, (Mix, ZipfWorkload)):
        slow.compiled = False
    return fast, slow


@pytest.mark.parametrize("specs", MIXES)
@pytest.mark.parametrize("seed", [0, 7])
def test_compiled_batches_equal_numpy_batches(specs: list[dict[str, Any]], seed: int) -> None:
    from balloonlab.guestd.workload import generators
    assert generators._mix_pick is not None and generators._zipf_pages is not None   # the install built it
    fast, slow = _both(specs, seed)
    sizes = np.random.default_rng(seed).integers(0, 1500, 60).tolist() + [1, 2, 3, 8192]
    for n in sizes:
        pf, wf = fast.next_batch(n)
        ps, ws = slow.next_batch(n)
        assert pf.dtype == ps.dtype and wf.dtype == ws.dtype
        assert np.array_equal(pf, ps) and np.array_equal(wf, ws), n
        ff, fs = getattr(fast, "take_frees", lambda: None)(), getattr(slow, "take_frees", lambda: None)()
        assert (ff is None) == (fs is None) and (ff is None or np.array_equal(ff, fs))
        assert fast.exhausted == slow.exhausted


def test_zipf_pages_agrees_with_searchsorted_at_the_cdf_edges() -> None:
    """Draws on the CDF's own entries and on the guide table's bucket edges, where a search decides."""
    z = ZipfWorkload(0, 5000, np.random.default_rng(3), theta=1.3)
    t = z._rank_of
    edges = np.arange(t.buckets, dtype=np.float64) / t.buckets
    u = np.concatenate([z._cdf[:-1], np.nextafter(z._cdf[:-1], 0), edges, np.nextafter(edges[1:], 0)])
    u = u[(u >= 0) & (u < 1)]
    from balloonlab.guestd import _paging
    got = np.empty(u.size, np.uint64)
    _paging.zipf_pages(u, t._answer, t.cdf, z._page_of_rank, got)
    want = z._page_of_rank[np.minimum(np.searchsorted(z._cdf, u, side="right"), z.pages - 1)]
    assert np.array_equal(got, want)


def test_mix_steps_refuse_bad_arguments() -> None:
    from balloonlab.guestd import _paging
    with pytest.raises(ValueError):
        _paging.mix_pick(np.array([0.5]), np.array([0.2, 0.4]), np.empty(1, np.uint8), np.empty(2, np.int64))
    with pytest.raises(ValueError):
        _paging.mix_gather(np.array([3], np.uint8), (None,), np.empty(1, np.uint64), np.empty(1, bool))
    with pytest.raises(ValueError):
        _paging.zipf_pages(np.array([1.5]), np.zeros(4, np.int16), np.array([1.0]), np.zeros(1, np.uint64),
                           np.empty(1, np.uint64))

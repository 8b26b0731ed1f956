"""The guide table (guestd.workload.cdf) against the searchsorted it stands in for."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.guestd.workload.cdf import CdfTable


def _zipf_cdf(pages: int, theta: float) -> np.ndarray:
    w = np.arange(1, pages + 1, dtype=np.float64) ** -theta
    cdf = np.cumsum(w / w.sum())
    cdf[-1] = 1.0
    return cdf


def _weights_cdf(weights: list[float]) -> np.ndarray:
    w = np.array(weights)
    cdf = (w / w.sum()).cumsum()
    return cdf / cdf[-1]


def _keys(cdf: np.ndarray, table: CdfTable, rng: np.random.Generator) -> np.ndarray:
    """Random draws, plus the values where an answer changes: the CDF's entries, the buckets' edges,
    and their neighbours one ulp away (all inside [0, 1))."""
    edges = np.arange(table.buckets, dtype=np.float64) / table.buckets
    exact = np.concatenate([cdf, edges])
    near = np.concatenate([exact, np.nextafter(exact, 0.0), np.nextafter(exact, 1.0), [0.0, np.nextafter(1.0, 0.0)]])
    near = near[(near >= 0.0) & (near < 1.0)]
    return np.concatenate([rng.random(20_000), near])


CDFS = {
    "zipf-5120": _zipf_cdf(5120, 1.2),
    "zipf-99": _zipf_cdf(99, 0.99),
    "zipf-300000": _zipf_cdf(300_000, 0.99),     # more entries than buckets
    "uniform-1": _zipf_cdf(1, 0.0),
    "mix-4": _weights_cdf([4, 1, 1, 1]),
    "mix-2": _weights_cdf([4, 1]),
    "mix-odd": _weights_cdf([0.3, 1e-9, 7.0, 2.5, 2.5]),
}


@pytest.mark.parametrize("name", sorted(CDFS))
def test_table_agrees_with_searchsorted(name: str) -> None:
    cdf = CDFS[name]
    table = CdfTable(cdf)
    rng = np.random.default_rng(7)
    for _ in range(5):
        u = _keys(cdf, table, rng)
        got = table(u)
        assert got.dtype == np.intp
        np.testing.assert_array_equal(got, cdf.searchsorted(u, side="right"))


def test_table_with_plateaus_and_random_cdfs() -> None:
    """Random non-decreasing CDFs, repeated entries included."""
    rng = np.random.default_rng(11)
    for size in (1, 3, 17, 1000, 9000):
        w = rng.random(size) * (rng.random(size) < 0.7)     # some zero weights: equal entries
        w[-1] += 1e-3
        cdf = np.cumsum(w) / w.sum()
        cdf[-1] = 1.0
        table = CdfTable(cdf)
        u = _keys(cdf, table, rng)
        np.testing.assert_array_equal(table(u), cdf.searchsorted(u, side="right"))


def test_empty_draw() -> None:
    table = CdfTable(_weights_cdf([1, 2]))
    assert table(np.zeros(0)).size == 0

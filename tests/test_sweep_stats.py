"""Student's t quantiles against the printed tables, and the mean's confidence interval."""
from __future__ import annotations

import math

import numpy as np
import pytest

from balloonlab.sweep.stats import mean_ci, t_cdf, t_quantile

# Two-sided 95 % critical values (t at 0.975) from any statistics table.
TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042, 120: 1.980}


@pytest.mark.parametrize("df, t", sorted(TABLE.items()))
def test_quantiles_match_the_table(df: int, t: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(t, abs=6e-4)


def test_cdf_is_symmetric_and_inverts() -> None:
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    for df in (1, 2, 7, 50):
        for p in (0.6, 0.9, 0.995):
            q = t_quantile(p, df)
            assert t_cdf(q, df) == pytest.approx(p, abs=1e-9)
            assert t_quantile(1 - p, df) == pytest.approx(-q)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)   # the normal limit


def test_mean_ci_by_hand() -> None:
    ci = mean_ci([2.0, 4.0, 6.0, 8.0])
    sd = math.sqrt(20 / 3)
    half = 3.182446 * sd / 2
    assert (ci.n, ci.mean, ci.std) == (4, 5.0, pytest.approx(sd))
    assert (ci.ci_low, ci.ci_high) == (pytest.approx(5 - half, rel=1e-6), pytest.approx(5 + half, rel=1e-6))
    one = mean_ci([3.0, float("nan")])
    assert one.n == 1 and one.mean == 3.0 and math.isnan(one.ci_low)
    assert mean_ci([]).n == 0


def test_the_interval_covers_the_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(11)
    hits = sum(1 for _ in range(2000)
               if (ci := mean_ci(rng.normal(10.0, 3.0, size=5).tolist())).ci_low <= 10.0 <= ci.ci_high)
    assert 0.93 <= hits / 2000 <= 0.97

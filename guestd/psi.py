"""Pressure stall information for memory, in virtual time (Linux's PSI, one vCPU).

Linux (kernel/sched/psi.c, Documentation/accounting/psi.rst) reports for
memory the share of wall time in which *some* non-idle task was stalled on
memory and in which *all* non-idle tasks were (*full*), as a cumulative
total in µs and as running averages over 10, 60 and 300 s: every
``PSI_FREQ`` = 2 s the stall share of the last period (percent) is folded
in as ``avg = avg * e + pct * (1 - e)`` with ``e = exp(-2 s / window)``
(calc_avgs / calc_load there, in fixed point; here in floats).

Here the clock is the vCPU's virtual clock, and a stall is an interval in
which the vCPU waits for memory: an EPT fault the host serves, a disk read
or write of the paging path (swap-in, file page-in, the write-back of a
dirty victim), a request the host held. The guest has one vCPU running one
task, and the background work (balloon driver, write-back) runs inline on
that vCPU, so whenever any task is stalled on memory no task makes
progress: *full* equals *some* in this model. They would differ with more
runnable tasks per guest (one stalled while another computes), which this
model does not have; both are reported so that consumers (senpai) read the
same keys as on Linux.
"""
from __future__ import annotations

import math

__all__ = ["PsiMeter", "PSI_PERIOD_US", "PSI_WINDOWS_S"]

PSI_PERIOD_US = 2_000_000.0        # PSI_FREQ in kernel/sched/psi.c: averages are updated every 2 s
PSI_WINDOWS_S = (10, 60, 300)      # avg10, avg60, avg300


class PsiMeter:
    """Memory stall time of one vCPU: totals and Linux's exponential averages."""

    def __init__(self, period_us: float = PSI_PERIOD_US) -> None:
        if not period_us > 0:
            raise ValueError(f"PSI period must be > 0 µs, got {period_us!r}")
        self.period_us = float(period_us)
        self._decay = tuple(math.exp(-self.period_us / (w * 1e6)) for w in PSI_WINDOWS_S)
        self.total_us = 0.0            # cumulative stall (some = full here)
        self.avgs = [0.0, 0.0, 0.0]    # percent, avg10 avg60 avg300
        self.stalls = 0                # intervals recorded
        self.paused = False            # background work's requests are not the vCPU's stalls
        self._period_end_us = self.period_us
        self._in_period_us = 0.0       # stall so far in the open period
        self._last_us = 0.0            # nothing is recorded before this (intervals come in order)
        self._stats: dict[str, float] = {}      # stats() as of _stats_total and the avgs list _stats_avgs
        self._stats_total = math.nan
        self._stats_avgs: list[float] | None = None

    def stall(self, start_us: float, end_us: float) -> float:
        """Record that the vCPU waited on memory over [start_us, end_us); returns the µs counted.

        Intervals arrive in virtual-time order (one vCPU); a part that
        overlaps what is already counted is not counted twice.
        """
        if self.paused:
            return 0.0
        start_us = float(start_us)
        if start_us < self._last_us:
            start_us = self._last_us
        end_us = float(end_us)
        if start_us >= self._period_end_us:    # (``advance``; nearly every request stays inside its period)
            self.advance(start_us)
        if end_us <= start_us:
            self._last_us = start_us
            return 0.0
        counted = end_us - start_us
        while end_us >= self._period_end_us:
            self._in_period_us += self._period_end_us - start_us
            start_us = self._period_end_us
            self._close_period()
        self._in_period_us += end_us - start_us
        self.total_us += counted
        self.stalls += 1
        self._last_us = end_us
        return counted

    def advance(self, vt_us: float) -> None:
        """The clock reached ``vt_us``: close the 2 s periods that ended before it."""
        while vt_us >= self._period_end_us:
            self._close_period()
        self._last_us = max(self._last_us, float(vt_us))

    def _close_period(self) -> None:
        pct = min(100.0, 100.0 * self._in_period_us / self.period_us)
        self.avgs = [a * e + pct * (1.0 - e) for a, e in zip(self.avgs, self._decay)]
        self._in_period_us = 0.0
        self._period_end_us += self.period_us

    def stats(self) -> dict[str, float]:
        """TickDone's PSI keys: cumulative µs and averages in percent (``full`` = ``some``, see the module)."""
        total, avgs = self.total_us, self.avgs
        # every tick end asks; the rounded values change only with a stall or a period's close
        if total != self._stats_total or avgs is not self._stats_avgs:
            t = round(total, 3)
            a10, a60, a300 = (round(a, 4) for a in avgs)
            self._stats = {"psi_some_us": t, "psi_full_us": t,
                           "psi_some_avg10": a10, "psi_some_avg60": a60, "psi_some_avg300": a300,
                           "psi_full_avg10": a10, "psi_full_avg60": a60, "psi_full_avg300": a300}
            self._stats_total, self._stats_avgs = total, avgs
        return self._stats.copy()

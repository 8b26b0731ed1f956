"""The host's working-set sampler (ESX's, OSDI'02 section 5.2): tracks a known touched set, fast up, slow down."""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.hostd.monitors.wss import WssConfig
from balloonlab.hostd.p2m import PageState
from balloonlab.hostd.wss import HostWorkingSet

RAM = 8192


class FakeP2M:
    def __init__(self) -> None:
        self.state = np.full(RAM, int(PageState.FRAME), np.int8)


class FakeCosts:
    mem_ref_us = 1.0
    cpu_us_per_ref = 0.0


class FakeMem:
    def __init__(self) -> None:
        self.p = FakeP2M()
        self.costs = FakeCosts()

    def p2m(self, gid: int) -> FakeP2M:
        return self.p

    def balloon_pages(self, gid: int) -> int:
        return int(np.count_nonzero(self.p.state == PageState.BALLOONED))


def bits(touched: np.ndarray) -> bytes:
    a = np.zeros(RAM, bool)
    a[touched] = True
    return np.packbits(a).tobytes()


class Guest:
    """Guest 0's ticks: accessed bits and cumulative references (1 µs each)."""

    def __init__(self, est: HostWorkingSet) -> None:
        self.est = est
        self.refs = 0

    def tick(self, touched: np.ndarray, refs: int = 10_000) -> None:
        self.refs += refs
        self.est.accessed(0, bits(touched), {"refs": self.refs})
        self.est.close_tick()


def run_periods(g: Guest, touched: np.ndarray, periods: int, ticks_per_period: int = 2) -> list[int]:
    """With period_exec_us = 20 ms and 10,000 references of 1 µs per tick: two ticks per period."""
    out = []
    for _ in range(periods):
        for _ in range(ticks_per_period):
            g.tick(touched)
        out.append(g.est.estimate(0))
    return out


def test_the_estimate_tracks_a_known_working_set_fast_up_and_slow_down() -> None:
    cfg = WssConfig(sample_pages=400)
    mem = FakeMem()
    est = HostWorkingSet(cfg, mem, seed=3)
    est.guest_joined(0, RAM, {})
    assert est.estimate(0) is None                       # no period closed yet
    est = Guest(est)
    small, big = np.arange(0, 2048), np.arange(0, 6144)
    e = run_periods(est, small, 10)
    assert abs(e[-1] - 2048) < 0.15 * 2048, e
    e = run_periods(est, big, 3)                     # up: three periods are enough (the fast average)
    assert e[-1] > 0.85 * 6144, e
    e = run_periods(est, big, 20)
    assert abs(e[-1] - 6144) < 0.1 * 6144, e
    e = run_periods(est, small, 2)                   # down: still remembered two periods on (the slow one)
    assert e[-1] > 0.75 * 6144, e
    e = run_periods(est, small, 40)                  # ... forgotten after many
    assert abs(e[-1] - 2048) < 0.2 * 2048, e


def test_pages_the_host_swapped_out_are_sampled_and_ballooned_ones_are_not() -> None:
    cfg = WssConfig(sample_pages=400)
    mem = FakeMem()
    mem.p.state[:4096] = int(PageState.SWAPPED)         # the host took half of it: still the guest's memory
    mem.p.state[6144:] = int(PageState.BALLOONED)        # a quarter in the balloon
    est = HostWorkingSet(cfg, mem, seed=5)
    est.guest_joined(0, RAM, {})
    assert not np.any(mem.p.state[est.guests[0].sample] == PageState.BALLOONED)
    touched = np.arange(0, 3072)                          # all of it host-swapped when the period began
    e = run_periods(Guest(est), touched, 8)
    # fraction of the non-balloon memory (6144 pages) touched: 1/2 -> 3072 pages, not the resident set's share
    assert abs(e[-1] - 3072) < 0.15 * 3072, e


def test_a_stalled_guest_s_period_lasts_until_it_has_executed_enough() -> None:
    # A thrashing guest completes 1,000 references per tick and touches 300 new pages of its 6,144 each tick:
    # measured over ticks it would look small; over 20 ms of its own execution (20 ticks) it touches them all.
    cfg = WssConfig(sample_pages=400)
    est = HostWorkingSet(cfg, FakeMem(), seed=4)
    est.guest_joined(0, RAM, {})
    g = Guest(est)
    for t in range(19):
        g.tick(np.arange(300 * t, 300 * (t + 1)) % 6144, refs=1000)
        assert est.estimate(0) is None, t                # not executed 20 ms yet: the period goes on
    g.tick(np.arange(5700, 6144), refs=1000)
    assert abs(est.estimate(0) - 6144) < 0.15 * 6144, est.estimate(0)


def test_a_guest_with_nothing_to_run_closes_its_period_after_max_period_ticks() -> None:
    est = HostWorkingSet(WssConfig(sample_pages=100, max_period_ticks=5), FakeMem(), seed=4)
    est.guest_joined(0, RAM, {})
    g = Guest(est)
    for _ in range(4):
        g.tick(np.arange(0), refs=0)
    assert est.estimate(0) is None
    g.tick(np.arange(0), refs=0)
    assert est.estimate(0) == 0


def test_same_seed_same_samples_and_another_seed_others() -> None:
    cfg = WssConfig(sample_pages=50)
    a, b, c = (HostWorkingSet(cfg, FakeMem(), seed=s) for s in (1, 1, 2))
    for est in (a, b, c):
        est.guest_joined(0, RAM, {})
    assert np.array_equal(a.guests[0].sample, b.guests[0].sample)
    assert not np.array_equal(a.guests[0].sample, c.guests[0].sample)


@pytest.mark.parametrize("ram,n", [(RAM, 100), (RAM, 400), (5, 5), (3, 7), (2048, 2048)])
def test_a_guest_with_nothing_ballooned_draws_as_from_the_list_of_its_gpfns(ram: int, n: int) -> None:
    # The shortcut (no list of candidates when host memory counts no balloon page) draws the same
    # samples and leaves the generator where the list's draw leaves it.
    from balloonlab.hostd.wss import GuestWss
    state = np.full(ram, int(PageState.FRAME), np.int8)
    fast, listed = GuestWss(ram, np.random.default_rng(9)), GuestWss(ram, np.random.default_rng(9))
    for _ in range(3):
        fast.draw(state, n, ballooned=0)
        listed.draw(state, n)
        assert np.array_equal(fast.sample, listed.sample) and fast.sample.dtype == listed.sample.dtype
        assert fast.touched.size == listed.touched.size == min(n, ram)
    assert fast.rng.bit_generator.state == listed.rng.bit_generator.state


@pytest.mark.parametrize("bad", [{"sample_pages": 0}, {"fast_gain": 1.5}, {"max_period_ticks": 0}])
def test_bad_keys_are_refused_by_name(bad: dict) -> None:
    from balloonlab.hostd.monitors import monitors_config
    from balloonlab.proto.errors import ConfigError
    with pytest.raises(ConfigError, match=next(iter(bad))):
        monitors_config({"wss": bad})

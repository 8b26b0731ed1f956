"""The host's per-tick readers: the snapshot without its per-guest rows, the p2m counts, a window's rates.

The machine builds the snapshot's per-guest rows only in the ticks it
logs, and the monitors read a guest's gauges from host memory; these
check that the short forms say the same as the long ones.
"""
from __future__ import annotations

import numpy as np

from balloonlab.hostd.monitors import HostMonitors
from balloonlab.hostd.monitors.window import GuestSample, History, TickSample
from balloonlab.hostd.p2m import P2M, PageState

from tests.test_host_fakes import FakeGuests, make_memory


def test_p2m_counts_name_every_state_and_count_it() -> None:
    p = P2M(64)
    p.set(np.arange(0, 10), PageState.FRAME, np.arange(10))
    p.set(np.arange(10, 13), PageState.BALLOONED)
    p.set(np.arange(13, 20), PageState.SWAPPED, np.arange(7))
    counts = p.counts()
    assert counts == {s.name.lower(): p.count(s) for s in PageState}
    assert (counts["frame"], counts["ballooned"], counts["swapped"], counts["unbacked"]) == (10, 3, 7, 44)
    assert all(type(v) is int for v in counts.values())


async def test_the_snapshot_without_rows_is_the_snapshot_less_its_rows() -> None:
    hm = make_memory(total_frames=96, swap_slots=128)
    guests = FakeGuests(hm)
    guests.add(1, 32, disk_blocks=16)
    guests.add(2, 32, disk_blocks=16)
    await hm.ept_fault(1, np.arange(0, 20, dtype=np.uint64), 1.0)
    await hm.ept_fault(2, np.arange(0, 30, dtype=np.uint64), 2.0)
    hm.balloon_inflate(2, np.arange(30, 32, dtype=np.uint64))
    await hm.vdisk_write(1, np.arange(0, 4, dtype=np.uint64), np.arange(1, 5, dtype=np.uint64), 3.0)
    full = hm.snapshot()
    rows = full.pop("guests")
    assert hm.snapshot(per_guest=False) == full
    assert set(rows) == {"1", "2"} and rows["2"]["ballooned_pages"] == 2 and rows["1"]["vdisk_write_pages"] == 4
    # what the history monitor reads from host memory instead of the rows
    for gid in (1, 2):
        assert hm.balloon_pages(gid) == rows[str(gid)]["ballooned_pages"]
        assert hm.guest_counters(gid).swap_out_pages == rows[str(gid)]["swap_out_pages"]


async def test_the_history_sample_is_the_same_with_or_without_the_rows() -> None:
    def sample(per_guest: bool) -> GuestSample:
        hm = make_memory(total_frames=96, swap_slots=128)
        FakeGuests(hm).add(1, 32, disk_blocks=64)
        mon = HostMonitors({}, hm, 10_000)
        mon.guest_joined(1, 32, {"swap_base_block": 32, "swap_blocks": 32})
        hm.balloon_inflate(1, np.arange(0, 5, dtype=np.uint64))
        hm.vdisk(1).counters.swap_area_read_pages += 7
        mon.end_tick(0, 10_000, hm.snapshot(per_guest), {1: {"vt_us": 10_000.0, "refs": 50}}, {1: 5})
        return mon.history.now.guests[1]

    with_rows, without = sample(True), sample(False)
    assert with_rows == without
    assert (without.actual_pages, without.swap_in_pages, without.ram_pages, without.refs) == (5, 7, 32, 50)


def _tick(t: int, guests: dict[int, GuestSample]) -> TickSample:
    return TickSample(tick=t, vt_us=t * 10_000.0, total_frames=100, free_frames=50, cache_pages=0, iobuf_pages=0,
                      pinned_frames=0, swap_out_pages=0, vdisk_pages=0, guests=guests)


def _guest(gid: int, vt_us: float, refs: int, swap: int) -> GuestSample:
    return GuestSample(guest_id=gid, vt_us=vt_us, swap_pages=swap, swap_in_pages=swap // 2, major_faults=refs // 10,
                       faults=refs // 5, refs=refs, pff=0.0, host_swap_out_pages=0, target_pages=0, actual_pages=0,
                       working_set_pages=0, ram_pages=100)


def test_guest_rates_are_guest_rate_per_key_and_keep_the_last_rate_when_the_clock_stands() -> None:
    keys = ("swap_pages", "swap_in_pages", "refs", "major_faults")
    one, many = History(4), History(4)
    # guest 1 is missing from tick 1; its clock stands from tick 3 on: from tick 6 its window has no time in it
    clocks = {0: 0.0, 1: None, 2: 25_000.0, 3: 40_000.0, 4: 40_000.0, 5: 40_000.0, 6: 40_000.0, 7: 40_000.0}
    for t, vt in clocks.items():
        guests = {2: _guest(2, t * 10_000.0, 100 * t, 3 * t)}
        if vt is not None:
            guests[1] = _guest(1, vt, 70 * t, 9 * t)
        for h in (one, many):
            h.push(_tick(t, guests))
        for gid in (1, 2, 3):
            expected = [one.guest_rate(gid, k, 3) for k in keys]
            assert many.guest_rates(gid, keys, 3) == expected
    assert one.guest_rate(1, "refs", 3) == 70 * (5 - 2) * 1e6 / 15_000.0   # ticks 2-5: the last with time in it
    assert one.guest_rate(3, "refs", 3) == 0.0
    first, last = many.ends(2, 3) or (None, None)
    assert first is not None and last is not None and (first.vt_us, last.vt_us) == (40_000.0, 70_000.0)


def test_a_guests_stats_read_in_one_compiled_pass_as_the_python_rules_read_them() -> None:
    """``stat_numbers`` (the history monitor's per-guest read) against ``_int`` and ``_float``, the definition:
    the same values of the same types, and the same exceptions, on values no sanitised report holds."""
    import math

    import pytest

    from balloonlab.hostd._books import stat_numbers
    from balloonlab.hostd.monitors import history

    class F(float):
        pass

    class I(int):
        pass

    values = [0, 1, 2**53, 2**70, 10**400, -3, 3.7, -2.5, 0.0, math.nan, math.inf, -math.inf, True, False, None,
              "7", F(2.5), F(math.nan), I(9), 1e308]

    def by_python(stats: dict, kind: str) -> object:
        if kind == "i":
            return history._int(stats, "k")
        return history._float(stats, "k") if kind == "f" or "k" in stats else None

    for value in values:
        for kind in "ifo":
            for stats in ({"k": value}, {}):
                try:
                    want = ("value", by_python(stats, kind))
                except Exception as exc:  # noqa: BLE001 -- the exception is what is compared
                    want = ("raised", type(exc))
                if want[0] == "raised":
                    with pytest.raises(want[1]):
                        stat_numbers(stats, ("k",), kind)
                    continue
                got = stat_numbers(stats, ("k",), kind)[0]
                assert type(got) is type(want[1]) and got == want[1], (value, kind, stats, got, want)
    assert stat_numbers({"a": 3, "b": 2.5}, ("a", "b", "c", "c"), "ifio") == (3, 2.5, 0, None)
    # a report that is not a plain dict is read in Python, to the same values
    from types import MappingProxyType
    report = {"vt_us": 12.5, "major_faults": 3, "minor_faults": 4.0, "refs": True, "pff": "x", "kernel_pages": 7}
    got = history._numbers(MappingProxyType(report), history._SAMPLE_KEYS, history._SAMPLE_KINDS)
    assert got == history._numbers(report, history._SAMPLE_KEYS, history._SAMPLE_KINDS) == \
        (12.5, 3, 4, 0, 0.0, 0, 7, None)
    with pytest.raises(ValueError, match="kinds"):
        stat_numbers({}, ("a",), "ii")
    with pytest.raises(ValueError, match="kind"):
        stat_numbers({}, ("a",), "x")

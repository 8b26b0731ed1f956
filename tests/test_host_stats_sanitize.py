"""The host's check of a guest's TickDone.stats: exactly the plausible numbers kept, each bad one named."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from balloonlab.hostd.session import MAX_STAT_KEYS, MAX_STAT_VALUE, sanitize_stats


def _one_by_one(stats: dict) -> tuple[dict, int]:
    """The rule stated key by key: what is kept, and how many problems there are."""
    clean, problems = {}, 0
    for key, value in stats.items():
        if len(clean) >= MAX_STAT_KEYS:
            return clean, problems + 1
        if len(key) <= 64 and type(value) in (int, float) and 0 <= value <= MAX_STAT_VALUE and math.isfinite(value):
            clean[key] = value
        else:
            problems += 1
    return clean, problems


def test_all_plausible_kept_whole_in_order() -> None:
    stats = {f"stat_{i}": (i if i % 2 else i * 0.5) for i in range(70)}
    stats["at_bound"] = MAX_STAT_VALUE
    clean, problems = sanitize_stats(stats)
    assert problems == [] and clean == stats and list(clean) == list(stats)
    assert clean is not stats   # the session keeps it: not the message's own dict


def test_one_bad_value_anywhere_is_dropped_and_named() -> None:
    # NaN after the first key: min() and max() may pass over it, the check must not
    for bad, why in ((math.nan, "nan is not a finite number"), (math.inf, "inf is not a finite number"),
                     (-math.inf, "-inf is not a finite number"), (-1, "-1 is not a finite number"),
                     (2 ** 60, "is not a finite number"), (True, "expected a number, got bool"),
                     ("7", "expected a number, got str"), (None, "expected a number, got NoneType")):
        for pos in (0, 5, 9):
            stats = {f"s{i}": float(i) for i in range(10)}
            stats[f"s{pos}"] = bad
            clean, problems = sanitize_stats(stats)
            assert f"s{pos}" not in clean and len(clean) == 9, (bad, pos)
            assert len(problems) == 1 and problems[0].startswith(f"s{pos}: ") and why in problems[0], problems


def test_long_key_and_too_many_keys() -> None:
    clean, problems = sanitize_stats({"k" * 65: 1, "ok": 2})
    assert clean == {"ok": 2} and "longer than 64 characters" in problems[0]
    many = {f"s{i}": i for i in range(MAX_STAT_KEYS + 3)}
    clean, problems = sanitize_stats(many)
    assert len(clean) == MAX_STAT_KEYS and "more than 128 keys" in problems[0]
    assert sanitize_stats({}) == ({}, [])


def test_random_mixtures_match_the_rule_key_by_key() -> None:
    rng = np.random.default_rng(7)
    odd = [0, 1, 2.5, math.nan, math.inf, -math.inf, -1, -0.0, 2 ** 53, 2 ** 53 + 1, float(2 ** 53), True, None,
           "s", 1e300]
    for _ in range(800):
        n = int(rng.choice([1, 2, 5, 127, 128, 129, 200]))
        stats = {}
        for i in range(n):
            key = "k" * int(rng.choice([1, 63, 65])) + str(i)
            stats[key] = odd[int(rng.integers(len(odd)))] if rng.random() < 0.05 else float(rng.random() * 100)
        clean, problems = sanitize_stats(stats)
        want, n_problems = _one_by_one(stats)
        assert clean == want and list(clean) == list(want)
        assert len(problems) == min(n_problems, 8)


_BAD_VALUES: list = [-1, -0.5, math.nan, math.inf, MAX_STAT_VALUE * 2, 2**53 + 1, 2**70, True, "7", None, [1]]


def _random_stats(rng: np.random.Generator, min_keys: int) -> dict:
    """A stats map, most of it plausible; half the time one bad value of each kind (or ints past 64 bits,
    which only Python may judge) or a key too long."""
    from balloonlab.hostd.session import MAX_STAT_KEY_CHARS

    n = int(rng.integers(min_keys, 140))
    stats: dict = {f"k{i}": (int(rng.integers(0, 2**53)) if rng.random() < 0.5 else float(rng.random() * 1e6))
                   for i in range(n)}
    if n and rng.random() < 0.5:
        if rng.random() < 0.8:
            stats[f"k{int(rng.integers(0, n))}"] = _BAD_VALUES[int(rng.integers(0, len(_BAD_VALUES)))]
        else:
            stats["x" * int(rng.integers(MAX_STAT_KEY_CHARS, MAX_STAT_KEY_CHARS + 2))] = 1
    return stats


def test_the_compiled_common_case_agrees_with_the_python_check() -> None:
    """Random stats maps, most plausible, some with one bad key or value of each kind (and ints past 64
    bits, which only Python may judge): the compiled pass keeps exactly what the Python check keeps, as a
    copy, and takes every plausible map itself."""
    from balloonlab.hostd._books import plausible_stats
    from balloonlab.hostd.session import MAX_STAT_KEY_CHARS, _sanitize_in_python

    rng = np.random.default_rng(11)
    taken = 0
    for _ in range(3000):
        stats = _random_stats(rng, 0)
        if rng.random() < 0.05:
            stats["neg_zero"] = -0.0
        fast = plausible_stats(stats, MAX_STAT_KEYS, MAX_STAT_KEY_CHARS, MAX_STAT_VALUE)
        want = _sanitize_in_python(stats)
        got = sanitize_stats(stats)
        assert got == want and list(got[0]) == list(want[0])
        if fast is not None:
            taken += 1
            assert want[1] == [] and fast == want[0] and fast is not stats
        else:
            assert want[1] or not stats or any(type(v) is int and v > 2**63 for v in stats.values())
    assert taken > 1000


def test_stats_as_values_alone_are_the_map_they_stand_for() -> None:
    """An array of values with the keys of the guest's last map: the same clean stats and problems as the map
    itself, whether the compiled pass takes it or the Python check names what is wrong; a length that does
    not match names both counts."""
    from balloonlab.hostd._books import plausible_values
    from balloonlab.hostd.session import MAX_STAT_KEY_CHARS

    rng = np.random.default_rng(12)
    taken = 0
    for _ in range(3000):
        stats = _random_stats(rng, 1)
        keys, values = tuple(stats), list(stats.values())
        got = sanitize_stats(values, keys)
        want = sanitize_stats(stats)
        assert got == want and list(got[0]) == list(want[0])
        fast = plausible_values(keys, values, MAX_STAT_KEYS, MAX_STAT_KEY_CHARS, MAX_STAT_VALUE)
        if fast is not None:
            taken += 1
            assert want[1] == [] and fast == want[0]
    assert taken > 1000
    assert plausible_values(("a", "b"), [1], MAX_STAT_KEYS, MAX_STAT_KEY_CHARS, MAX_STAT_VALUE) is None
    clean, problems = sanitize_stats([1, 2], ("a",))
    assert clean == {} and "2 values" in problems[0] and "1 keys" in problems[0]
    clean, problems = sanitize_stats([1], None)
    assert clean == {} and "no keys" in problems[0]


def test_a_tick_done_array_needs_the_keys_of_a_map_before_it() -> None:
    from balloonlab.hostd.session import check_tick_done
    from balloonlab.proto.messages import TickDone

    def done(stats: Any) -> TickDone:
        return TickDone(0, 10_000.0, stats, b"", b"")

    assert check_tick_done(done({"refs": 1, "pff": 0.5}), 10_000, 16) is None
    assert check_tick_done(done([1, 0.5]), 10_000, 16, ("refs", "pff")) is None
    assert "before any map" in check_tick_done(done([1, 0.5]), 10_000, 16)
    assert "3 values" in check_tick_done(done([1, 0.5, 2]), 10_000, 16, ("refs", "pff"))
    assert "empty" in check_tick_done(done([]), 10_000, 16, ("refs",))


def test_a_guest_sends_its_keys_once_then_values_until_they_change() -> None:
    from balloonlab.guestd.statswire import StatsOnWire, StatsRow

    wire = StatsOnWire()
    keys = ("refs", "pff")
    assert wire(StatsRow(keys, [1, 0.5])) == {"refs": 1, "pff": 0.5}
    assert wire(StatsRow(keys, [2, 0.25])) == [2, 0.25]
    assert wire(StatsRow(("refs", "pff"), [3, 0.25])) == [3, 0.25]          # equal keys, another tuple
    assert wire(StatsRow(("pff", "refs"), [0.25, 3])) == {"pff": 0.25, "refs": 3}   # another order: a map again
    assert wire(StatsRow(("pff", "refs"), [0.5, 4])) == [0.5, 4]
    assert wire({"pff": 0.5, "refs": 5}) == [0.5, 5]                        # a plain map is as good
    assert wire({"pff": 0.5, "refs": 4, "free": 9}) == {"pff": 0.5, "refs": 4, "free": 9}
    assert StatsOnWire()(StatsRow(keys, [5, 0.5])) == {"refs": 5, "pff": 0.5}   # a new connection starts with a map
    row = StatsRow(keys, [6, 0.75])
    assert row["pff"] == 0.75 and row.get("free", 0) == 0 and len(row) == 2


def test_a_guests_stat_row_is_its_stats_map() -> None:
    """The row a TickDone reports is the map the guest's stats were before rows: the kernel's keys, then
    the balloon's, PSI's and the session's, the clock rounded in the kernel's place; the tuple of keys is
    the same object from one tick to the next."""
    from balloonlab.guestd import rehearsal

    rows = []
    done = rehearsal._StandIn.tick_done

    def keep(self: Any, tick: int, vt_us: float, stats: Any, *rest: Any) -> None:
        rows.append(stats)
        done(self, tick, vt_us, stats, *rest)

    rehearsal._StandIn.tick_done = keep   # type: ignore[method-assign]
    try:
        assert rehearsal.rehearse() == 0
    finally:
        rehearsal._StandIn.tick_done = done   # type: ignore[method-assign]
    assert len(rows) >= 2 and rows[0].keys is rows[-1].keys
    from balloonlab.guestd.kernel import STAT_KEYS
    keys = rows[-1].keys
    assert keys[:len(STAT_KEYS)] == STAT_KEYS and len(set(keys)) == len(keys)
    assert keys[-2:] == ("tick_vt_us", "tick_inflight_us") and "balloon_target_pages" in keys
    assert "psi_some_us" in keys and "refs_done" in keys
    last = rows[-1].as_dict()
    assert last["vt_us"] == round(last["vt_us"], 3) and last["refs"] >= last["refs_done"] > 0

"""A device's total busy time must not depend on how its lanes' requests interleaved.

Under the partitioned discipline each guest's requests reach its own lane
in its own order, but the guests' lanes interleave as the processes run.
Every per-lane number is then the same from run to run; the device's total
must be too, down to its last bit (the summary prints it), so it is the
lanes' sums added in lane-id order, not a float sum kept in arrival order.
"""
from __future__ import annotations

import numpy as np

from balloonlab.hostd.devices import Device, device_profile


def _requests(seed: int) -> dict[int, list[tuple[float, int, bool, int]]]:
    rng = np.random.default_rng(seed)
    return {g: [(float(t), int(rng.integers(1, 17)), bool(rng.random() < 0.4), int(rng.integers(0, 5000)))
                for t in np.sort(rng.uniform(0, 10_000, 60))] for g in range(4)}


def test_busy_time_is_the_same_for_every_interleaving_of_the_lanes() -> None:
    per_lane = _requests(3)
    rng = np.random.default_rng(4)
    totals = set()
    for _ in range(12):
        dev = Device(device_profile("ssd"), expected_lanes=4)
        for g in per_lane:
            dev.add_lane(g)
        # One interleaving: each lane's requests stay in their order, the lanes mix at random.
        picks = rng.permutation(np.repeat(np.arange(4), 60))
        nxt = {g: 0 for g in per_lane}
        for g in picks.tolist():
            t, n, write, off = per_lane[g][nxt[g]]
            nxt[g] += 1
            dev.submit(g, t, n, write=write, offset=off)
        totals.add(dev.busy_us)
    assert len(totals) == 1
    total = totals.pop()
    assert total > 0 and dev.counters()["busy_us"] == total
    dev.remove_lane(2)          # a guest that left: its lane's time stays counted
    assert abs(dev.busy_us - total) < 1e-9 * total


def test_the_order_of_a_float_sum_shows_in_its_last_bits() -> None:
    # Why the total is summed per lane: the same terms in two orders differ (the test above would catch it).
    dev = Device(device_profile("ssd"))
    terms = [dev.profile.service_us(n, w, s) for n in range(1, 17) for w in (False, True) for s in (False, True)]
    rng = np.random.default_rng(5)
    sums = {sum(rng.permutation(terms).tolist()) for _ in range(50)}
    assert len(sums) > 1

"""Device profiles (read/write costs, hdd seeks) and shared devices: lanes with max-min fair shares."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from balloonlab.hostd.devices import DEVICE_PROFILES, FLOOR_DIVISOR, Device, disk_topology, device_profile
from balloonlab.proto.costs import PAGE_BYTES
from balloonlab.proto.errors import ConfigError

from .test_host_fakes import FakeGuests, make_memory

TICK_US = 10_000.0


def test_every_profile_has_its_own_read_and_write_costs() -> None:
    for name in ("nvme", "ssd", "hdd"):
        p = DEVICE_PROFILES[name]
        assert p.service_us(1, write=False, sequential=False) != p.service_us(1, write=True, sequential=False)
    ssd = device_profile("ssd")
    assert ssd.service_us(1, write=False, sequential=True) == pytest.approx(100.0 + PAGE_BYTES * 1e6 / 550e6)
    assert device_profile("nvme").service_us(1, False, False) < ssd.service_us(1, False, False)


def test_an_hdd_seeks_for_a_random_access_and_not_for_the_next_sequential_block() -> None:
    dev = Device(device_profile("hdd"))
    t1 = dev.submit(0, 0.0, 1, write=False, offset=1000)             # first access: a seek
    t2 = dev.submit(0, t1, 1, write=False, offset=1001)              # the next block: transfer only
    t3 = dev.submit(0, t2, 1, write=False, offset=50)                # elsewhere: a seek again
    transfer = PAGE_BYTES * 1e6 / 160e6
    assert t1 == pytest.approx(12_660.0 + transfer)
    assert t2 - t1 == pytest.approx(transfer)
    assert t3 - t2 == pytest.approx(12_660.0 + transfer)
    assert dev.lanes[0].seeks == 2


def hammer(dev: Device, lanes: list[int], t0: float) -> dict[int, int]:
    """Each lane keeps its queue full for one tick (one-page random reads); returns requests done per lane."""
    done: dict[int, int] = {}
    for lane in lanes:
        t, n = t0, 0
        while True:
            t = dev.submit(lane, t0, 1, write=False, offset=-2)      # all submitted at once: a deep queue
            if t > t0 + TICK_US:
                break
            n += 1
        done[lane] = n
    return done


def test_a_guest_alone_gets_the_whole_device() -> None:
    dev = Device(device_profile("hdd"), expected_lanes=1)
    dev.add_lane(0)
    assert dev.share(0) == 1.0
    alone = hammer(dev, [0], 0.0)
    dev.rebalance(TICK_US, TICK_US)
    assert dev.share(0) == 1.0
    assert alone[0] == int(TICK_US // device_profile("hdd").service_us(1, False, False))


def test_n_guests_hammering_get_about_one_nth_each_and_capacity_is_conserved() -> None:
    for n in (2, 4):
        dev = Device(device_profile("ssd"), expected_lanes=n)
        for g in range(n):
            dev.add_lane(g)
        alone = Device(device_profile("ssd"))
        solo = hammer(alone, [0], 0.0)[0]
        t = 0.0
        for _ in range(3):
            got = hammer(dev, list(range(n)), t)
            t += TICK_US
            shares = dev.rebalance(t + TICK_US * 100, TICK_US)   # every lane still has a backlog: all want more
            assert sum(shares.values()) == pytest.approx(1.0)
            assert all(s == pytest.approx(1 / n) for s in shares.values())
        assert sum(got.values()) == pytest.approx(solo, rel=0.1)     # the device's throughput, no more
        assert max(got.values()) - min(got.values()) <= 1


def test_max_min_gives_a_light_lane_what_it_asked_and_the_rest_to_the_heavy_one() -> None:
    ssd = device_profile("ssd")
    dev = Device(ssd, expected_lanes=2)
    dev.add_lane(0)
    dev.add_lane(1)
    for i in range(200):                                             # 200 reads, all done within the tick
        assert dev.submit(0, float(i), 1, write=False) < TICK_US
    hammer(dev, [1], 0.0)
    shares = dev.rebalance(TICK_US, TICK_US)                         # lane 1 still busy: it wants it all
    cap = ssd.queue_depth * TICK_US
    assert shares[0] == pytest.approx(200 * ssd.service_us(1, False, False) / cap)
    assert shares[1] == pytest.approx(1 - shares[0])
    # An idle tick: what nobody asked for is split equally, so a lane can grow back.
    shares = dev.rebalance(TICK_US * 100, TICK_US)
    assert shares[0] == pytest.approx(0.5) and shares[1] == pytest.approx(0.5)


def test_shares_change_only_at_a_boundary_the_one_tick_lag() -> None:
    dev = Device(device_profile("hdd"), expected_lanes=2)
    dev.add_lane(0)
    dev.add_lane(1)
    hammer(dev, [0], 0.0)                                            # lane 1 idle this tick
    assert dev.share(0) == dev.share(1) == 0.5                      # the shares of the last boundary hold
    dev.rebalance(TICK_US * 10, TICK_US)
    assert dev.share(0) == pytest.approx(1 - 1 / (FLOOR_DIVISOR * 2))
    assert dev.share(1) == pytest.approx(1 / (FLOOR_DIVISOR * 2))   # the floor: slow, never stuck


def test_a_request_far_in_the_future_moves_only_its_own_lane() -> None:
    dev = Device(device_profile("ssd"), expected_lanes=2)
    dev.add_lane(0)
    dev.add_lane(1)
    dev.submit(0, 1e9, 1, write=True)
    t = dev.submit(1, 0.0, 1, write=False)
    assert t < 1000.0


def test_the_same_requests_in_any_arrival_order_finish_at_the_same_times() -> None:
    reqs = [(g, float(t), n) for g in (0, 1, 2) for t, n in ((0, 4), (50, 1), (120, 8))]
    finish = []
    for order in (reqs, reqs[::-1], sorted(reqs, key=lambda r: (r[1], -r[0]))):
        dev = Device(device_profile("hdd"), expected_lanes=3)
        for g in range(3):
            dev.add_lane(g)
        per_lane = {g: [r for r in order if r[0] == g] for g in range(3)}
        # Interleave lanes however; within a lane the guest's own order is kept (its serial lane).
        seq = [r for trio in zip(*(sorted(v, key=lambda r: r[1]) for v in per_lane.values())) for r in trio][::-1]
        seq = sorted(seq, key=lambda r: r[1])
        done = {(g, t): dev.submit(g, t, n, write=False, offset=int(t)) for g, t, n in seq}
        finish.append(done)
    assert finish[0] == finish[1] == finish[2]


def test_the_disk_table_parses_and_refuses_with_the_key() -> None:
    topo = disk_topology({"shared": True, "vdisk": {"profile": "hdd", "write_seek_us": 9000}})
    assert topo.shared and topo.swap is topo.vdisk and topo.vdisk.write_seek_us == 9000
    old = disk_topology({"vdisk": {"profile": "ssd", "latency_us": 50, "bandwidth_bps": 1e9}})
    assert old.vdisk.read_latency_us == old.vdisk.write_latency_us == 50
    assert not old.shared and old.swap == DEVICE_PROFILES["ssd"]
    with pytest.raises(ConfigError, match=r"^disk.shared: expected true or false"):
        disk_topology({"shared": "yes"})
    with pytest.raises(ConfigError, match=r"^disk.swap: with shared = true"):
        disk_topology({"shared": True, "swap": {"profile": "hdd"}})
    with pytest.raises(ConfigError, match=r"^disk.vdisk.profile: unknown disk profile 'tape'"):
        disk_topology({"vdisk": {"profile": "tape"}})
    with pytest.raises(ConfigError, match=r"^disk.vdisk.queue_depth: must be >= 1"):
        disk_topology({"vdisk": {"queue_depth": 0}})
    with pytest.raises(ConfigError, match=r"^disk.raid: unknown key"):
        disk_topology({"raid": {}})


async def test_shared_puts_disks_and_swap_files_on_one_device_in_per_guest_lanes() -> None:
    hm = make_memory(total_frames=24, swap_slots=64, low_watermark_frames=0, reclaim_batch_frames=1,
                     shared_disk="hdd", expected_guests=2, cluster_pages=1)
    guests = FakeGuests(hm)
    guests.add(0, 16, disk_blocks=32)
    guests.add(1, 16, disk_blocks=32)
    dev = hm.shared_device
    assert dev is not None and hm.swap.disk is dev
    assert hm.vdisk(0).device is dev and hm.vdisk(1).device is dev
    await hm.vdisk_read(0, np.arange(4, dtype=np.uint64), 0.0)
    for first in range(0, 16, 4):
        await guests.touch(1, np.arange(first, first + 4), write=True)
    await guests.touch(0, np.arange(0, 12), write=True)              # host swapping: on the same device
    assert dev.read_pages >= 4 and dev.write_pages > 0
    assert set(dev.lanes) == {0, 1} and dev.lanes[0].requests > 0
    hm.tick(TICK_US)
    assert sum(dev.share(g) for g in (0, 1)) == pytest.approx(1.0)
    assert guests.lost_pages == 0
    hm.check_invariant()


def test_a_lone_lanes_rebalance_is_the_general_one_to_the_last_bit() -> None:
    # Every guest's own disk has one lane and is rebalanced at every tick: its scalar path must give the
    # share, speed and channels the general path gives (completion times hang on the last bit).
    rng = np.random.default_rng(7)
    for k in range(400):
        prof = device_profile(("hdd", "ssd", "nvme")[k % 3])
        one = Device(prof, expected_lanes=1)
        one.add_lane(3)
        lane = one.lanes[3]
        # odd tick lengths too: there the share of a lone lane is 1.0 give or take its last bit
        tick_us = float(rng.choice([1000.0, 10000.0, rng.uniform(1.0, 20000.0)]))
        end = tick_us * int(rng.integers(1, 50))
        for _ in range(int(rng.integers(1, 4))):        # a few ticks: shares below 1 after the floor, and back
            lane.demand_us = float(rng.choice([0.0, rng.uniform(0, 2) * prof.queue_depth * tick_us,
                                               0.9 * lane.share * prof.queue_depth * tick_us]))
            lane.free_at_us = sorted(float(end + rng.uniform(-2, 1) * tick_us) for _ in lane.free_at_us)
            many = copy.deepcopy(one)
            got, want = one._rebalance_one(end, tick_us), many._rebalance_many(end, tick_us)
            assert got == want and type(got[3]) is float
            mine, theirs = one.lanes[3], many.lanes[3]
            assert (mine.share, mine.speed, mine.free_at_us, mine.demand_us) == \
                   (theirs.share, theirs.speed, theirs.free_at_us, theirs.demand_us)
            end += tick_us
    dev = Device(device_profile("ssd"), expected_lanes=1)
    dev.add_lane(0)
    calls = []
    dev._rebalance_many = lambda *a: calls.append(a) or {}      # type: ignore[method-assign]
    dev.rebalance(TICK_US, TICK_US)
    assert calls == [] and dev.rebalanced

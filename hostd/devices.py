"""The host's block devices in virtual time: profiles, per-guest lanes, fair shares.

A **profile** has separate read and write costs (latency per request and
bandwidth) and, for a disk with a head, a seek: a request that does not
continue where its lane's previous request ended pays a seek (``read_seek_us``/``write_seek_us``) first;
the next sequential block of the same stream pays none.

A **device** serves its guests in **lanes**, one per guest. At each tick
boundary (``rebalance``) the device divides its capacity (``queue_depth``
channels x the tick's length, in µs of service) among the lanes by
max-min fairness over what each lane asked for during the tick that just
ended; what nobody asked for is split equally, so a lane can grow. A lane
then runs, for the whole next tick, FCFS over its own share: ``m`` channels
of speed ``share * queue_depth / m`` (``m`` = ``ceil(share * queue_depth)``).
So the lanes' speeds always sum to the device's (capacity is conserved), a
guest alone on a device gets all of it, and N guests hammering it get about
1/N each. Within a tick no lane's requests move another lane's clock,
whatever order they arrive in: the result cannot depend on arrival order.

**The one-tick lag.** Shares follow demand one tick late: a guest that
starts hammering an idle-shared device gets its larger share from the
next boundary on. A lane whose channels were all still busy at the tick's
end (a backlog), or that used 90 % of its share, counts as wanting the
whole device, so a lane held back by a small share is not mistaken for a
lane that wants little. Every lane
keeps a floor of ``1 / (FLOOR_DIVISOR * lanes)`` of the device (like a
reservation in mClock), so an idle guest's first request after a busy
tick is slow, not stuck.

Topology (``[disk] shared``): by default each guest's virtual disk is a
device of its own (one lane: it gets the whole device) and the host swap
files share the swap device (one lane per guest). With ``shared = true``
every virtual disk and every swap file is on one device, and a guest's
disk and swap I/O share its one lane there.
"""
from __future__ import annotations

import math
from heapq import heapify, heapreplace
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import numpy as np

from balloonlab.proto.costs import PAGE_BYTES
from balloonlab.proto.errors import ConfigError

__all__ = ["DeviceProfile", "DEVICE_PROFILES", "Device", "DiskTopology", "disk_topology", "device_profile",
           "FLOOR_DIVISOR"]

FLOOR_DIVISOR = 16   # each lane keeps at least 1/(16 x lanes) of a device
SATURATED_FRACTION = 0.9   # a lane that used this much of its share in a tick wants more


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One device's costs. Latencies are per request; bandwidths in bytes per virtual second."""

    read_latency_us: float
    write_latency_us: float
    read_bandwidth_bps: float
    write_bandwidth_bps: float
    queue_depth: int
    read_seek_us: float = 0.0    # a request that does not continue its lane's last one (seek + rotation)
    write_seek_us: float = 0.0

    def service_us(self, n_pages: int, write: bool, sequential: bool) -> float:
        """Service time of one request of ``n_pages`` at full speed."""
        if write:
            base = self.write_latency_us + n_pages * PAGE_BYTES * 1e6 / self.write_bandwidth_bps
            return base if sequential else base + self.write_seek_us
        base = self.read_latency_us + n_pages * PAGE_BYTES * 1e6 / self.read_bandwidth_bps
        return base if sequential else base + self.read_seek_us

    @property
    def seeks(self) -> bool:
        return self.read_seek_us > 0 or self.write_seek_us > 0


# Defaults, from vendors' data sheets (rounded; a model's orders of magnitude, not one drive):
DEVICE_PROFILES: dict[str, DeviceProfile] = {
    # NVMe TLC flash, e.g. Samsung 970 EVO Plus data sheet: 3,500 MB/s sequential read, 3,300 MB/s
    # write; 4 KiB random at QD1 about 19k IOPS read (~53 µs) and 60k IOPS write (~17 µs: writes land
    # in the drive's SLC/DRAM buffer). 32 channels: ~600k IOPS at QD32 x 53 µs.
    "nvme": DeviceProfile(read_latency_us=53.0, write_latency_us=17.0, read_bandwidth_bps=3.5e9,
                          write_bandwidth_bps=3.3e9, queue_depth=32),
    # SATA flash, e.g. Samsung 860 EVO data sheet: 550 MB/s sequential read, 520 MB/s write; 4 KiB
    # random at QD1 about 10k IOPS read (~100 µs) and 42k IOPS write (~24 µs). NCQ depth 32 (AHCI).
    "ssd": DeviceProfile(read_latency_us=100.0, write_latency_us=24.0, read_bandwidth_bps=550e6,
                         write_bandwidth_bps=520e6, queue_depth=32),
    # 7,200 rpm disk, e.g. Seagate BarraCuda 7200.14 data sheet: average seek 8.5 ms read (9.5 ms
    # write) plus 4.16 ms average rotational latency (half a turn at 7,200 rpm); ~160 MB/s sustained
    # (210 MB/s outer tracks, about half that inner). One head: one request at a time. A random
    # access pays seek + rotation; a sequential one only the transfer.
    "hdd": DeviceProfile(read_latency_us=0.0, write_latency_us=0.0, read_bandwidth_bps=160e6,
                         write_bandwidth_bps=160e6, queue_depth=1, read_seek_us=8500.0 + 4160.0,
                         write_seek_us=9500.0 + 4160.0),
}


def device_profile(name: str) -> DeviceProfile:
    try:
        return DEVICE_PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown disk profile {name!r}; known: {sorted(DEVICE_PROFILES)}") from None


_BOTH = {"latency_us": ("read_latency_us", "write_latency_us"),
         "bandwidth_bps": ("read_bandwidth_bps", "write_bandwidth_bps")}


def profile_from_mapping(raw: Mapping[str, Any], where: str) -> DeviceProfile:
    """``profile = NAME`` and any field to override; ``latency_us``/``bandwidth_bps`` set both directions.

    The keys and their bounds are the schema's (``proto.schema.DiskDevice``);
    the profiles' names are this module's.
    """
    from balloonlab.proto.schema import DiskDevice, decode
    context, _, path = where.rpartition(": ")
    return _profile(decode(DiskDevice, dict(raw), path=path, where=context), path, context)


def _profile(t: Any, path: str, context: str) -> DeviceProfile:
    from balloonlab.proto.schema import SchemaError, unknown_name
    if t.profile not in DEVICE_PROFILES:
        raise SchemaError(f"{path}.profile", unknown_name("disk profile", t.profile, DEVICE_PROFILES), context)
    vals: dict[str, Any] = {}
    for key in (*_BOTH, *(f.name for f in fields(DeviceProfile))):   # a direction's own key wins over both
        value = getattr(t, key)
        if value is not None:
            vals.update({k: value for k in _BOTH.get(key, (key,))})
    return replace(DEVICE_PROFILES[t.profile], **vals)


@dataclass(frozen=True, slots=True)
class DiskTopology:
    """The ``[disk]`` table: the devices' profiles and whether everything shares one device."""

    vdisk: DeviceProfile
    swap: DeviceProfile
    shared: bool = False


def disk_topology(table: Mapping[str, Any], where: str = "") -> DiskTopology:
    """Parse ``[disk]`` through the schema (``proto.schema.DiskTable``): ``shared``, ``[disk.vdisk]``, ``[disk.swap]``."""
    from balloonlab.proto.schema import DiskDevice, DiskTable, decode, split_where
    context = split_where(where, "disk")
    t = decode(DiskTable, dict(table) if isinstance(table, Mapping) else table, path="disk", where=context)
    vdisk = _profile(t.vdisk or DiskDevice(), "disk.vdisk", context)
    swap = vdisk if t.shared else _profile(t.swap or DiskDevice(), "disk.swap", context)
    return DiskTopology(vdisk, swap, t.shared)


class _Lane:
    """One guest's FCFS queue on a device: ``free_at_us`` per channel, channel speed, demand this tick."""

    __slots__ = ("share", "speed", "free_at_us", "demand_us", "next_offset", "requests", "pages",
                 "busy_us", "seeks")

    def __init__(self, share: float, queue_depth: int, now_us: float) -> None:
        self.share = share
        self.speed = 1.0
        # A heap (a plain list): ``submit`` takes the earliest free channel and puts it back busy, in
        # O(log channels). The channels are a multiset of free times: which of two equally free ones
        # serves a request changes nothing, so the heap's order among ties does not matter.
        self.free_at_us: list[float] = []
        self.demand_us = 0.0          # service asked for this tick, at full speed
        self.next_offset = -1         # where a sequential request would start
        self.requests = 0
        self.pages = 0
        self.busy_us = 0.0
        self.seeks = 0
        self.resize(share, queue_depth, now_us)

    def resize(self, share: float, queue_depth: int, now_us: float) -> None:
        self.share = share
        width = share * queue_depth
        m = max(1, math.ceil(width - 1e-9))
        self.speed = width / m
        if m == len(self.free_at_us):
            return
        old = sorted(self.free_at_us)
        if m <= len(old):
            self.free_at_us = old[len(old) - m:]   # work already promised keeps its channels (sorted: a heap)
        else:
            self.free_at_us = old + [float(now_us)] * (m - len(old))
            heapify(self.free_at_us)


class Device:
    """One physical device shared by lanes (guest ids). See the module docstring.

    Call order: ``add_lane`` for each guest that uses it -> (``submit`` |
    ``submit_serial``)* within a tick -> ``rebalance`` at each boundary;
    ``remove_lane`` when the guest is gone.
    """

    def __init__(self, profile: DeviceProfile, name: str = "disk", expected_lanes: int = 1) -> None:
        self.profile = profile
        self.name = name
        self.expected_lanes = max(1, int(expected_lanes))
        self.lanes: dict[int, _Lane] = {}
        self.rebalanced = False
        self.requests = 0
        self.pages = 0
        self.read_pages = 0
        self.write_pages = 0
        self._gone_busy_us: dict[int, float] = {}   # lanes removed: their busy_us, by lane id
        # One page's service (the usual request), computed once by the same formula
        self._read_seq_us = profile.service_us(1, False, True)
        self._read_seek_us = profile.service_us(1, False, False)
        self._write_seq_us = profile.service_us(1, True, True)
        self._write_seek_us = profile.service_us(1, True, False)
        self._seeks = profile.seeks

    def add_lane(self, lane_id: int, now_us: float = 0.0) -> None:
        """A guest's lane: before the first boundary an equal share of ``expected_lanes``, after it the floor."""
        if lane_id in self.lanes:
            return
        n = max(self.expected_lanes, len(self.lanes) + 1)
        share = 1.0 / n if not self.rebalanced else 1.0 / (FLOOR_DIVISOR * n)
        self.lanes[lane_id] = _Lane(share, self.profile.queue_depth, now_us)

    def remove_lane(self, lane_id: int) -> None:
        lane = self.lanes.pop(lane_id, None)
        if lane is not None:
            self._gone_busy_us[lane_id] = self._gone_busy_us.get(lane_id, 0.0) + lane.busy_us

    @property
    def busy_us(self) -> float:
        """Service at full speed, all lanes.

        Summed lane by lane in lane-id order, not as requests arrive: lanes
        (guests) are served in parallel, and a float sum in arrival order
        differs in its last bits from run to run of one seed.
        """
        busy = dict(self._gone_busy_us)
        for lane_id, lane in self.lanes.items():
            busy[lane_id] = busy.get(lane_id, 0.0) + lane.busy_us
        return sum(busy[k] for k in sorted(busy))

    def share(self, lane_id: int) -> float:
        return self.lanes[lane_id].share

    def submit(self, lane_id: int, vt_us: float, n_pages: int, *, write: bool, offset: int = -2) -> float:
        """One request of ``n_pages`` starting at block ``offset`` of the device; returns its completion."""
        lane = self.lanes.get(lane_id)
        if lane is None:
            self.add_lane(lane_id, vt_us)
            lane = self.lanes[lane_id]
        sequential = offset == lane.next_offset
        if n_pages == 1:
            if write:
                full = self._write_seq_us if sequential else self._write_seek_us
            else:
                full = self._read_seq_us if sequential else self._read_seek_us
        else:
            full = self.profile.service_us(n_pages, write, sequential)
        if not sequential and self._seeks:
            lane.seeks += 1
        lane.next_offset = offset + n_pages if offset >= 0 else -1
        chans = lane.free_at_us
        start = float(vt_us)
        if chans[0] > start:            # the earliest free channel (a heap)
            start = chans[0]
        done = start + full / lane.speed
        heapreplace(chans, done)
        lane.demand_us += full
        lane.requests += 1
        lane.pages += n_pages
        lane.busy_us += full
        self.requests += 1
        self.pages += n_pages
        if write:
            self.write_pages += n_pages
        else:
            self.read_pages += n_pages
        return done

    def chain_read_us(self, lane_id: int, offsets: np.ndarray) -> np.ndarray:
        """Each one-page read of a chain at ``offsets`` (one after another), at the lane's speed, with no
        wait for a channel: a lower bound on what ``submit`` will make each take."""
        lane = self.lanes.get(lane_id)
        offs = np.asarray(offsets, np.int64)
        prev = np.empty_like(offs)
        if offs.size:
            prev[0] = lane.next_offset if lane is not None else -1
            prev[1:] = offs[:-1] + 1
        prof = self.profile
        seq_us = prof.service_us(1, False, True)
        cost = np.where(offs == prev, seq_us, seq_us + prof.read_seek_us)
        return cost / (lane.speed if lane is not None else 1.0)

    def submit_serial(self, lane_id: int, vt_us: float, offsets: np.ndarray, *, write: bool = False) -> float:
        """One page at each offset, each issued when the previous completed (one stalled vCPU's faults)."""
        done = float(vt_us)
        for off in np.asarray(offsets, np.int64).tolist():
            done = self.submit(lane_id, done, 1, write=write, offset=off)
        return done

    def rebalance(self, tick_end_us: float, tick_us: float) -> dict[int, float]:
        """New shares from the tick that ends at ``tick_end_us`` (max-min over demand); returns them."""
        self.rebalanced = True
        if not self.lanes:
            return {}
        if len(self.lanes) == 1:
            return self._rebalance_one(tick_end_us, tick_us)
        return self._rebalance_many(tick_end_us, tick_us)

    def _rebalance_many(self, tick_end_us: float, tick_us: float) -> dict[int, float]:
        ids = sorted(self.lanes)
        qd = self.profile.queue_depth
        cap = qd * float(tick_us)
        n = len(ids)
        floor = cap / (FLOOR_DIVISOR * n)
        if self._idle(tick_end_us):
            # No lane asked for anything and none has a queue left: every demand is 0.0, ``_max_min`` gives
            # each 0.0, and every lane gets the same share, the float the general path below computes.
            share = (floor + 0.0 + (cap - floor * n - 0.0) / n) / cap
            self._set_shares(share, qd, tick_end_us)
            return dict.fromkeys(ids, share)
        demand = []
        for gid in ids:
            lane = self.lanes[gid]
            # Held back by its share: a queue left at the tick's end, or its share (nearly) used up.
            saturated = (lane.free_at_us[0] > tick_end_us
                         or lane.demand_us >= SATURATED_FRACTION * lane.share * cap)
            demand.append(math.inf if saturated else max(0.0, lane.demand_us - floor))
        alloc = _max_min(demand, cap - floor * n)
        spare = (cap - floor * n - sum(alloc)) / n
        shares: dict[int, float] = {}
        for gid, a in zip(ids, alloc):
            lane = self.lanes[gid]
            share = (floor + a + spare) / cap
            lane.resize(share, qd, tick_end_us)
            lane.demand_us = 0.0
            shares[gid] = share
        return shares

    def _rebalance_one(self, tick_end_us: float, tick_us: float) -> dict[int, float]:
        """``rebalance`` of a device with one lane (every guest's own disk), in scalars: the same float
        operations as the general path with ``n = 1`` (``_max_min`` of one demand is ``min(demand, left / 1)``),
        so the same share to the last bit, without its lists and sort at every tick of every guest."""
        (gid, lane), = self.lanes.items()
        qd = self.profile.queue_depth
        cap = qd * float(tick_us)
        floor = cap / (FLOOR_DIVISOR * 1)
        if lane.demand_us == 0.0 and lane.free_at_us[0] <= tick_end_us:
            # idle (the usual tick of a guest's own disk): demand 0.0, give 0.0, the same float as below
            share = (floor + 0.0 + (cap - floor * 1 - (0 + 0.0)) / 1) / cap
            self._set_shares(share, qd, tick_end_us)
            return {gid: share}
        saturated = lane.free_at_us[0] > tick_end_us or lane.demand_us >= SATURATED_FRACTION * lane.share * cap
        demand = math.inf if saturated else max(0.0, lane.demand_us - floor)
        give = min(demand, max(0.0, cap - floor * 1) / 1)
        spare = (cap - floor * 1 - (0 + give)) / 1
        share = (floor + give + spare) / cap
        lane.resize(share, qd, tick_end_us)
        lane.demand_us = 0.0
        return {gid: share}

    def _idle(self, tick_end_us: float) -> bool:
        """No lane asked for service this tick and none has a queue left at its end."""
        return all(lane.demand_us == 0.0 and lane.free_at_us[0] <= tick_end_us for lane in self.lanes.values())

    def _set_shares(self, share: float, queue_depth: int, tick_end_us: float) -> None:
        """Every lane at ``share`` (each demand is 0.0 already); a lane already there is left as it is, which
        is what ``resize`` to the same share does."""
        for lane in self.lanes.values():
            if lane.share != share:
                lane.resize(share, queue_depth, tick_end_us)

    def counters(self) -> dict[str, float]:
        return {"requests": self.requests, "pages": self.pages, "read_pages": self.read_pages,
                "write_pages": self.write_pages, "busy_us": self.busy_us}


def _max_min(demand: list[float], capacity: float) -> list[float]:
    """Water-filling: each gets min(demand, level), the level chosen so the total is the capacity (or all fits)."""
    alloc = [0.0] * len(demand)
    left = max(0.0, capacity)
    todo = sorted(range(len(demand)), key=lambda i: (demand[i], i))
    k = len(todo)
    for pos, i in enumerate(todo):
        fair = left / (k - pos)
        give = min(demand[i], fair)
        alloc[i] = give
        left -= give
    return alloc

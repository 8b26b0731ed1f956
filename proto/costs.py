"""The cost model: what each operation costs in virtual time, and the disk model.

Both sides charge costs from the same model, so it lives in the contract.
A scenario may override any field (``[costs]`` and ``[disk.*]`` tables).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError

__all__ = ["PAGE_BYTES", "CostModel", "DiskProfile", "DISK_PROFILES", "DiskModel", "disk_profile"]

PAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class CostModel:
    """Virtual-time cost of the operations a vCPU performs (SSD-like defaults)."""

    mem_ref_us: float = 0.1        # one memory reference that hits
    minor_fault_us: float = 2.0    # page still in memory, only the mapping is rebuilt
    ept_fault_us: float = 5.0      # guest touches a gpfn the host has not backed
    hypercall_us: float = 2.0      # any other guest->host call
    page_copy_us: float = 1.0      # host copies one page from its disk cache
    # Not charged yet by every part (0 keeps today's behaviour): the engine's calibration sets them.
    page_zero_us: float = 0.0      # zero-filling a fresh page
    balloon_page_us: float = 0.0   # one page inflated or deflated (guest allocator + host unmap)
    cpu_us_per_ref: float = 0.0    # the workload's own CPU work per page-level reference

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "") -> "CostModel":
        """The ``[costs]`` table (its keys are this class's fields: ``proto.schema`` builds them from it)."""
        from .schema import CostsTable, decode, split_where
        t = decode(CostsTable, dict(raw), path="costs", where=split_where(where, "costs"))
        return cls(**{f.name: float(getattr(t, f.name)) for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class DiskProfile:
    """Service model of one block device: latency per request, bandwidth, queue depth."""

    latency_us: float       # fixed service time of one request
    bandwidth_bps: float    # bytes per (virtual) second once a request is served
    queue_depth: int        # requests served in parallel

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "disk") -> "DiskProfile":
        """A ``[disk.DEVICE]`` table: ``profile`` (ssd, hdd) and any field of this class to override.

        ``where`` is the table's path (``disk.vdisk``), after the file's name when there is one.
        """
        from .schema import DiskDevice, decode
        context, _, path = where.rpartition(": ")
        t = decode(DiskDevice, dict(raw), path=path.strip("[]"), where=context)
        given = {f.name: getattr(t, f.name) for f in fields(cls) if getattr(t, f.name) is not None}
        return replace(DISK_PROFILES[t.profile], **given)


DISK_PROFILES: dict[str, DiskProfile] = {
    "ssd": DiskProfile(latency_us=100.0, bandwidth_bps=500e6, queue_depth=32),
    "hdd": DiskProfile(latency_us=8000.0, bandwidth_bps=150e6, queue_depth=1),
}


def disk_profile(name: str) -> DiskProfile:
    try:
        return DISK_PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown disk profile {name!r}; known: {sorted(DISK_PROFILES)}") from None


class DiskModel:
    """FCFS queueing over ``queue_depth`` parallel channels, in virtual time.

    A request of ``n_pages`` submitted at ``vt_us`` starts when the earliest
    channel is free (never before ``vt_us``) and takes
    ``latency_us + n_pages * PAGE_BYTES / bandwidth``. Deterministic for a
    given order of submissions. The state lives in two float64 arrays
    (``free_at_us``: when each channel is next free; ``acct``: requests,
    pages, busy µs) so that compiled code (the guest's paging core, for its
    in-process disk) can run the same model over the same state.
    """

    __slots__ = ("profile", "free_at_us", "acct")

    def __init__(self, profile: DiskProfile) -> None:
        self.profile = profile
        self.free_at_us = np.zeros(profile.queue_depth, np.float64)
        self.acct = np.zeros(3, np.float64)

    @property
    def requests(self) -> int:
        return int(self.acct[0])

    @property
    def pages(self) -> int:
        return int(self.acct[1])

    @property
    def busy_us(self) -> float:
        return float(self.acct[2])

    def submit(self, vt_us: float, n_pages: int) -> float:
        """Account one request and return its completion time (virtual µs)."""
        chans = self.free_at_us
        i = int(chans.argmin())                    # the first of the earliest free
        start = max(float(vt_us), float(chans[i]))
        service = self.profile.latency_us + n_pages * PAGE_BYTES * 1e6 / self.profile.bandwidth_bps
        done = start + service
        chans[i] = done
        acct = self.acct
        acct[0] += 1
        acct[1] += n_pages
        acct[2] += service
        return done

    def submit_serial(self, vt_us: float, n_requests: int, pages_each: int = 1) -> float:
        """``n_requests`` issued one after another, each when the previous completed.

        This is what one stalled vCPU does: a batch of faults answered in one
        message still costs each fault its own latency.
        """
        done = float(vt_us)
        for _ in range(n_requests):
            done = self.submit(done, pages_each)
        return done

    def queue_delay_us(self, vt_us: float) -> float:
        """How long a request submitted now would wait before service starts."""
        return max(0.0, float(self.free_at_us.min()) - float(vt_us))

    def __repr__(self) -> str:
        return f"DiskModel({self.profile!r}, requests={self.requests}, pages={self.pages}, busy_us={self.busy_us})"

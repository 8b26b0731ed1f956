"""The cost model: what each operation costs in virtual time, and the disk model.

Both sides charge costs from the same model, so it lives in the contract.
A scenario may override any field (``[costs]`` and ``[disk.*]`` tables).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError

__all__ = ["PAGE_BYTES", "CostModel", "refs_per_vsec_ceiling", "DiskProfile", "DISK_PROFILES", "DiskModel", "disk_profile"]

PAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class CostModel:
    """Virtual-time cost of the operations a vCPU performs, calibrated on a current x86 server.

    Each default names where it comes from (README, "Model"). One page-level
    reference costs ``mem_ref_us + cpu_us_per_ref``: the memory access and
    the workload's own compute around it, so a guest that never waits runs
    at most ``1 / (mem_ref_us + cpu_us_per_ref)`` references per virtual µs.
    """

    # A DRAM reference: ~100 ns ("main memory reference", Dean & Norvig's latency
    # numbers; ~80-100 ns loaded latency on Intel Xeon / AMD EPYC, vendor tuning guides).
    mem_ref_us: float = 0.1
    # A minor fault (the page is in memory, only the mapping is rebuilt): kernel entry,
    # page-table walk and update, exit: ~0.5-1 us on Linux 6.x x86-64 (median ~1 us
    # measured with rdtsc for an anonymous zero-fill fault, of which ~0.25 us is the
    # clearing charged below as page_zero_us).
    minor_fault_us: float = 0.75
    # An EPT violation: VM exit + entry (~0.5-1 us round trip on Skylake-and-later, Agesen
    # et al., "Software techniques for avoiding hardware virtualization exits", USENIX
    # ATC 2012, and KVM's vmexit unit tests) plus KVM backing the gfn with a fresh host
    # page (get_user_pages fault-in, zeroing, EPT entry): ~2-3 us in all.
    ept_fault_us: float = 3.0
    # Any other hypercall (VMCALL round trip + the handler's bookkeeping): ~1 us (the
    # same exit/entry cost as above, no page to back).
    hypercall_us: float = 1.0
    # Copying one 4 KiB page in DRAM: ~0.4 us at ~10 GB/s single-core memcpy bandwidth.
    page_copy_us: float = 0.4
    # Zero-filling one 4 KiB page (clear_page, rep stosb): ~0.25 us at ~16 GB/s.
    page_zero_us: float = 0.25
    # One page inflated or deflated, besides the hypercall per 256 PFNs: the guest's
    # allocator (alloc_page + list insert, ~0.3 us) and the host's unmap
    # (MADV_DONTNEED on one page with its TLB flush, ~1 us). An estimate from the parts,
    # not a published end-to-end figure: ~0.75-1 GB/s of inflation per vCPU.
    balloon_page_us: float = 1.0
    # The workload's own CPU work per page-level reference. 0 = a pure memory toucher;
    # scenarios set it to what one reference stands for (a burst of work on that page).
    cpu_us_per_ref: float = 0.0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "") -> "CostModel":
        """The ``[costs]`` table (its keys are this class's fields: ``proto.schema`` builds them from it)."""
        from .schema import CostsTable, decode, split_where
        t = decode(CostsTable, dict(raw), path="costs", where=split_where(where, "costs"))
        return cls(**{f.name: float(getattr(t, f.name)) for f in fields(cls)})

    @property
    def ref_us(self) -> float:
        """One page-level reference: the memory access plus the workload's compute around it."""
        return self.mem_ref_us + self.cpu_us_per_ref


def refs_per_vsec_ceiling(raw: Mapping[str, Any] | None) -> float | None:
    """References per virtual second of a guest that never waits, from a ``[costs]`` table (None if unusable)."""
    try:
        ref_us = CostModel.from_mapping(raw or {}).ref_us
    except (ConfigError, TypeError):
        return None
    return 1e6 / ref_us if ref_us > 0 else None


@dataclass(frozen=True, slots=True)
class DiskProfile:
    """Service model of one block device: latency per request, bandwidth, queue depth."""

    latency_us: float       # fixed service time of one request
    bandwidth_bps: float    # bytes per (virtual) second once a request is served
    queue_depth: int        # requests served in parallel


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

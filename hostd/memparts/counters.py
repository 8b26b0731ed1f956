"""Host memory's named counters: host-wide (``HostCounters``) and per guest (``GuestCounters``).

Every count host memory keeps is a field here, with what it counts; the
snapshot (``memparts.snapshot``) reports them as they are, every tick.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GuestCounters", "HostCounters"]


@dataclass(slots=True)
class GuestCounters:
    ept_fault_calls: int = 0
    ept_faults: int = 0              # pages the host had to back
    ept_fault_swapins: int = 0       # ... of which read back from host swap
    swap_out_pages: int = 0
    swap_in_pages: int = 0
    swap_write_pages: int = 0        # swap-outs that wrote (the others were in the swap cache)
    fresh_swapins_avoided: int = 0   # swapped pages a fresh fault took back without a read
    shootdown_pages: int = 0
    balloon_inflated_pages: int = 0
    balloon_deflated_pages: int = 0
    clean_cache_evicted_pages: int = 0     # labels: host-swapped pages the guest had as clean page cache
    clean_cache_swap_write_pages: int = 0  # ... of which written to host swap (a real write)
    clean_cache_swap_read_pages: int = 0   # ... read back from host swap later (a real read)
    grant_pages: int = 0             # frames granted to it at tick starts and refill rounds
    grant_exhausted: int = 0         # requests that found its grant short
    self_retired_iobuf_pages: int = 0   # ... and freed its own completed I/O buffers
    self_dropped_cache_pages: int = 0   # ... dropped its own clean cache
    self_swap_pages: int = 0            # ... host-swapped its own pages
    held_requests: int = 0              # ... and were held for a refill round
    balloon_freed_frames: int = 0    # host frames inflation freed (a never-backed or host-swapped page frees none)
    free_reports: int = 0            # free page reports it sent (virtio-balloon free page reporting)
    pages_reported: int = 0          # gpfns in them
    frames_discarded: int = 0        # host frames those reports freed


@dataclass(slots=True)
class HostCounters:
    ept_fault_calls: int = 0
    ept_faults: int = 0
    ept_fault_spurious_pages: int = 0   # asked for but already backed
    ept_faults_cut: int = 0             # faults of several pages that reached the tick's end (open_tick)
    ept_fault_later_pages: int = 0      # ... the pages they left for the next tick (LATER_TOKEN)
    swap_out_pages: int = 0             # guest pages taken to host swap
    swap_out_cache_pages: int = 0       # disk-cache pages: always 0 (the cache is never host-swapped)
    swap_in_pages: int = 0              # guest pages read back
    swap_in_cache_pages: int = 0        # always 0, as swap_out_cache_pages
    swap_write_pages: int = 0           # swap-outs that wrote; the rest the swap cache held already
    swap_writes_avoided: int = 0        # swap-outs whose content was in the swap cache
    fresh_swapins_avoided: int = 0      # swapped pages a fresh fault took back without a read
    clean_cache_evicted_pages: int = 0     # labels: see the module docstring
    clean_cache_swap_write_pages: int = 0
    clean_cache_swap_read_pages: int = 0
    bad_labels: int = 0                 # shootdown replies whose labels had the wrong length (ignored)
    reclaim_calls: int = 0
    reclaim_frames: int = 0
    direct_reclaims: int = 0            # a request waited for swap-out writes
    shootdowns: int = 0
    shootdown_pages: int = 0
    shootdown_failures: int = 0
    dropped_evictions: int = 0          # frames ballooned or orphaned while their shootdown was pending
    balloon_inflated_pages: int = 0
    balloon_deflated_pages: int = 0
    balloon_freed_frames: int = 0       # host frames freed by inflation (reclaimed by the balloon)
    oom_refusals: int = 0
    early_retired_iobuf_pages: int = 0  # completed I/O buffers freed before the tick under pressure
    pressure_dropped_cache_pages: int = 0  # clean disk-cache pages a short request dropped from its own cache
    grant_pages: int = 0                # frames handed to guests as grants
    grant_exhausted: int = 0            # requests whose guest's grant was short
    self_reclaim_pages: int = 0         # frames guests freed inside their own partitions
    free_reports: int = 0               # free page reports from the guests (see report_free)
    pages_reported: int = 0             # gpfns reported free
    frames_discarded: int = 0           # host frames freed by them (the rest held nothing, or swap)
    reported_slots_dropped: int = 0     # host swap slots (or cache and zero entries) dropped by them

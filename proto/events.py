"""Log event names: part of the contract, read by ``scripts/analyze.py``.

Every process writes JSON lines with at least ``event``, ``level``,
``timestamp``, ``proc`` ("host" or "guest"), and where known ``guest``,
``tick`` and ``vt_us``. Event names are snake_case, past tense; values are
fields with units in their names.
"""
from __future__ import annotations

__all__ = [name for name in dir() if name.isupper()]

# run lifecycle (host)
RUN_STARTED = "run_started"              # scenario, variant, seed, guests, tick_us, ticks
RUN_FINISHED = "run_finished"            # ticks, vt_us, wall_s, reason, lost_pages, guests_lost
GUEST_CONNECTED = "guest_connected"      # guest, pid
GUEST_REFUSED = "guest_refused"          # code, reason (never the token)
GUEST_DISCONNECTED = "guest_disconnected"  # guest, reason, released_frames
TICK_STALLED = "tick_stalled"            # tick, waited_s, missing (guest ids)
TICK_COMPLETED = "tick_completed"        # host: host metrics; guest: the guest's stats
REQUEST_REJECTED = "request_rejected"    # guest, msg_type, code, reason
FRAME_REJECTED = "frame_rejected"        # peer, reason
INVARIANT_VIOLATED = "invariant_violated"  # what

# guest lifecycle
GUEST_STARTED = "guest_started"          # guest, pid, config
GUEST_FINISHED = "guest_finished"        # guest, reason, stats
HOST_LOST = "host_lost"                  # reason
PAGE_LOST = "page_lost"                  # guest, vpage, expected, found

# memory and ballooning
BALLOON_TARGET_SET = "balloon_target_set"  # guest, target_pages, previous_pages, policy
GUEST_UNCOOPERATIVE = "guest_uncooperative"  # guest, target_pages, actual_pages, ticks
SWAP_STORM_DETECTED = "swap_storm_detected"  # evidence
DOUBLE_FAULT = "double_fault"            # guest, block, cluster, added_us
SWAP_AREA_PINNED = "swap_area_pinned"    # guest, pinned_pages
SWAP_AREA_UNPINNED = "swap_area_unpinned"  # guest, unpinned_pages

# locks
DEADLOCK_DETECTED = "deadlock_detected"  # cycle: [{proc, task, holds, waits_for, since_vt_us}]
LOCK_ORDER_VIOLATION = "lock_order_violation"  # proc, task, held, acquiring

__all__ = [name for name in dir() if name.isupper()]

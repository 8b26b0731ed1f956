"""Log event names: part of the contract, read by ``scripts/analyze.py``.

Every process writes JSON lines with at least ``event``, ``level``,
``timestamp``, ``proc`` ("host" or "guest"), and where known ``guest``,
``tick`` and ``vt_us``. Event names are snake_case, past tense; values are
fields with units in their names.
"""
from __future__ import annotations

__all__ = [name for name in dir() if name.isupper()]

# run lifecycle (host)
RUN_STARTED = "run_started"              # scenario, variant, seed, guests, tick_us, ticks, host_sched, host_group_nice, host_start
RUN_FINISHED = "run_finished"            # ticks, vt_us, wall_s, reason, lost_pages, guests_lost
GUEST_CONNECTED = "guest_connected"      # guest, pid
GUEST_REFUSED = "guest_refused"          # code, reason (never the token)
GUEST_DISCONNECTED = "guest_disconnected"  # guest, reason, released_frames
TICK_STALLED = "tick_stalled"            # tick, waited_s, missing (guest ids)
TICK_COMPLETED = "tick_completed"        # host: host metrics; guest: the guest's stats
REQUEST_REJECTED = "request_rejected"    # guest, msg_type, code, reason
FRAME_REJECTED = "frame_rejected"        # peer, reason
INVARIANT_VIOLATED = "invariant_violated"  # what
CONFIG_DEPRECATED = "config_deprecated"  # key, value, resolved, reason (an old value still accepted)

# guest lifecycle
GUEST_STARTED = "guest_started"          # guest, pid, ram_pages, policy (the replacement policy)
CONTENT_MAP_TAKEN = "content_map_taken"  # guest, taken, ranges, image_pages, zero_write_pages (proto.content)
SHARE_FAILED = "share_failed"            # guest, step (peek | protect), reason: its pages stay private this boundary
GUEST_FINISHED = "guest_finished"        # guest, reason, stats
HOST_LOST = "host_lost"                  # reason
PAGE_LOST = "page_lost"                  # guest, vpage, expected, found

# memory and ballooning
BALLOON_TARGET_SET = "balloon_target_set"  # guest, target_pages, previous_pages, policy
# guest, decision (inflate|deflate|hold), code, reason (words, with the numbers), target_pages,
# previous_pages, actual_pages, alloc_target_pages (host frames the VM may consume; hostd.memstate), policy,
# inputs {name: number}: why a controller set, or kept, a target;
# a hold is logged when its reason changes ([balloon] log_decisions = "all": every one), and
# run_finished.balloon_decisions counts every decision by code
BALLOON_DECISION = "balloon_decision"
GUEST_UNCOOPERATIVE = "guest_uncooperative"  # guest, target_pages, actual_pages, ticks
SWAP_STORM_DETECTED = "swap_storm_detected"  # storm, chain [{link, value, threshold, ok, ...}], guests [rates]
SWAP_STORM_ENDED = "swap_storm_ended"    # storm, lasted_ticks, quiet_ticks
DOUBLE_FAULT = "double_fault"            # guest, count, blocks, clusters, swap_slots, added_us, swap_area_pinned (per tick)
DOUBLE_PAGING_DETECTED = "double_paging_detected"  # guest, pages, blocks (host swapped a page the guest then paged out)
SWAP_AREA_PINNED = "swap_area_pinned"    # guest, first_block, blocks, pinned_pages, swap_pages_per_s, pff
SWAP_AREA_UNPINNED = "swap_area_unpinned"  # guest, unpinned_pages, pinned_ticks
BALLOON_CONVERGED = "balloon_converged"  # step_tick, settled_tick, convergence_ticks, overshoot_pages, pff_above_ticks
# tick, vt_us, state (high|clear|soft|hard|low), previous, free_frames, min_free_frames, free_pct_of_min_free,
# reclaim [mechanisms the new state runs]: the host's ESX memory state changed (hostd.memstate)
MEMORY_STATE_CHANGED = "memory_state_changed"

# locks (host log; proto.locks, hostd.locks)
# cycle: [{owner, proc, task, holds, holds_lock, held_since_vt_us, waits_for, waits_for_lock, wait_proc,
#          wait_task, site, since_vt_us, since_wall_s, waited_s}], protocol, length, summary, action, recent_events
DEADLOCK_DETECTED = "deadlock_detected"
# owner, proc, task, site, held, held_lock, held_site, acquiring, acquiring_lock, vt_us, protocol
LOCK_ORDER_VIOLATION = "lock_order_violation"
LOCK_EVENT = "lock_event"                # debug level: op, lock, owner, task, site, vt_us (every transition)
LOCK_RELEASE_FAILED = "lock_release_failed"  # lock, owner, peer, reason (a remote release that got no answer)
TICK_RECLAIM_FAILED = "tick_reclaim_failed"  # reason: the host's in-tick reclaim task raised
LOCK_REVOKED = "lock_revoked"            # guest, owner, lock, levels: taken back from a guest gone unresponsive

# reliability (issue #8): the watchdog, the end-of-run audit, fault injection
GUEST_UNRESPONSIVE = "guest_unresponsive"  # guest, tick, waited_s: taken out of the tick barrier
GUEST_RESPONSIVE = "guest_responsive"    # guest, tick: answered again, back in the barrier next tick
GUEST_MEMORY_RECLAIMED = "guest_memory_reclaimed"  # guest, reclaimed_frames, resident_pages, reason
SHOOTDOWN_SETTLED = "shootdown_settled"  # guest, pages, pending_pages, ok: a deferred shootdown was answered
SHOOTDOWN_DEFERRED = "shootdown_deferred"  # guest, pages, reason: the host stopped waiting for an acknowledgement
AUDIT_COMPLETED = "audit_completed"      # host: ok, guests {id: {...}}, problems [str]
AUDIT_REPORTED = "audit_reported"        # guest: ram_pages, disk_pages, balloon_pages, problems
FAULT_POINT_REACHED = "fault_point_reached"  # point, occurrence, pid, mm_lock_held: the process stops itself here
FAULT_INJECTED = "fault_injected"        # target, pid, signal, tick: written to faults.jsonl by an injector
GUEST_THROTTLED = "guest_throttled"      # guest, send_buffer_bytes: it does not read; the host stops reading it
GUEST_CUT_OFF = "guest_cut_off"          # guest, reason, tick: alive but stuck, or holding what others need; disconnected

__all__ = [name for name in dir() if name.isupper()]

"""What happens to a silent guest's memory: it goes to host swap, first among victims, until it answers.

A guest the watchdog declares silent (``hostd.watchdog``) is not running,
so its memory is idle by definition: its frames are the preferred victims
of host swapping (``PreferVictims``), and at the end of every tick whatever
it still has resident is swapped out (``reclaim``). Host swapping, never
dropping: every page goes to a host swap slot, and the shootdowns that
need are deferred (``hostd.shootdown``).

This stops as soon as the guest answers a deferred shootdown
(``guest_answered``: it runs again), not only once its late tick is done:
whatever it faults back in for that tick would otherwise go at every tick
end, and the tick might never end. (It stays out of the tick barrier until
its tick is done.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.faultpoints import flush_log

from .framepool import FrameKind
from .victim import VictimPolicy
from .victim.prefer import PreferVictims

if TYPE_CHECKING:
    from .memory import HostMemory

__all__ = ["SilentGuestMemory", "MAX_RECLAIM_FRAMES_PER_TICK"]

log = structlog.get_logger("hostd.silent")

MAX_RECLAIM_FRAMES_PER_TICK = 65_536   # one Invalidate per tick end stays well inside a frame


class SilentGuestMemory:
    """The silent guests whose memory the host takes; ``victims`` (host memory's policy) prefers their frames.

    Call order::

        SilentGuestMemory(blind policy) -> HostMemory(victim=.victims) ;
        guest_silent(gid) -> [each tick end: await reclaim(mem, vt_us, ...)]* -> guest_answered | guest_back | forget
    """

    def __init__(self, blind: VictimPolicy) -> None:
        self.silent: set[int] = set()
        self.victims = PreferVictims(blind, self.silent)   # reads ``silent`` at every pick
        self.reclaimed_frames = 0
        self.woke = 0                                # silent guests that answered a deferred shootdown

    def guest_silent(self, guest_id: int) -> None:
        self.silent.add(guest_id)

    def guest_back(self, guest_id: int) -> None:
        """It finished its late tick."""
        self.silent.discard(guest_id)

    def guest_answered(self, guest_id: int) -> None:
        """It answered a deferred shootdown, so it runs again: stop taking its memory."""
        if guest_id in self.silent:
            self.silent.discard(guest_id)
            self.woke += 1

    def forget(self, guest_id: int) -> None:
        self.silent.discard(guest_id)

    async def reclaim(self, mem: "HostMemory", vt_us: float, pending_pages: Callable[[int], int]) -> int:
        """Swap out what silent guests still have resident in ``mem``; returns frames freed.

        ``pending_pages(gid)``: the guest's pages whose deferred shootdowns are
        not answered yet (logged with what was taken).
        """
        if not self.silent:
            return 0
        live = [gid for gid in sorted(self.silent) if gid in mem.guest_ids()]
        if not live:
            return 0
        n = min(int(self.victims.candidates(mem.pool).size), mem.swap.free_slots, MAX_RECLAIM_FRAMES_PER_TICK)
        if n <= 0:
            return 0
        before = {gid: int(mem.guest_counts(gid)["resident_pages"]) for gid in live}
        got = await mem.reclaim(n, vt_us)
        self.reclaimed_frames += got.freed_frames
        for gid in live:
            if gid in mem.guest_ids():
                after = int(mem.guest_counts(gid)["resident_pages"])
                if after < before[gid]:
                    # Frames still resident are pinned, or busy: an eviction already under way
                    # (a shootdown that was waiting for this guest's answer settles right after).
                    frames = mem.pool.frames_owned_by(gid, FrameKind.GUEST)
                    busy = int(np.count_nonzero(mem.pool.busy[frames]))
                    log.info(ev.GUEST_MEMORY_RECLAIMED, guest=gid, reclaimed_frames=before[gid] - after,
                             resident_pages=after, busy_pages=busy, reason="unresponsive",
                             pending_pages=pending_pages(gid))
                    flush_log()
        return got.freed_frames

    def metrics(self) -> dict[str, int]:
        return {"unresponsive_reclaimed_frames": self.reclaimed_frames, "woke": self.woke}

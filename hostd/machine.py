"""The host's machine: what a tick changes -- memory, balloon targets, monitors -- tick by tick.

The server owns connections and the clock; the machine owns what a tick
changes. It is told when a guest joins, finishes a tick, goes silent, comes
back or dies, and passes each on to the parts ``hostd.assembly`` built and
handed to it: host memory, the request discipline (it never asks which
mode runs), the shootdowns, silent-guest memory, the monitors, the
invariant checker. Refused requests are counted per reason and logged.

Call order (from the server)::

    guest_joined -> (tick_done | guest_silent | guest_back)* -> guest_gone
    each tick: tick_started(tick, vt_us) -> [the guests run] -> observe = await end_tick(tick, vt_us)
               -> [TickStart(tick + 1) sent] -> observe()      (before the next tick_started)
    at the end: observe() if the last boundary left one -> final_metrics()

``end_tick`` does the boundary's work that must finish before the guests
run again (reclaim with shootdowns, balloon targets); it returns the rest,
which only reads the boundary's state or changes the host's own books
(the invariant sample, the snapshot, the monitors, the tick's log line). The
server sends the next TickStart first and calls it then, without yielding
to the loop in between: no request of the next tick is read before it has
run, so it sees the state it would have seen before the TickStart went
out, while the guests already compute on the other core.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ErrorCode
from balloonlab.proto.messages import BalloonTarget, MsgType, TickDone

from .balloon import DecisionLog
from .balloon.noncoop import NonCooperationDetector
from .balloon.policy import BalloonController
from .balloon.view import GuestView, HostView
from .config import GuestSpec, RunConfig
from .devices import DeviceProfile
from .errors import HostdError
from .memconfig import BalloonConfig, HostMemConfig
from .memstate import VmAllocation, may_share
from .session import GuestSession, sanitize_stats
from .wss import STAT_HOST_WSS

if TYPE_CHECKING:
    from .discipline import RequestDiscipline
    from .invariant import InvariantChecker
    from .memory import HostMemory
    from .monitors import HostMonitors
    from .registry import SessionRegistry
    from .shootdown import Shootdowns
    from .silent import SilentGuestMemory

__all__ = ["Machine"]

log = structlog.get_logger("hostd.machine")

_LOG_FIRST_REJECTIONS = 10  # per guest and reason; then only at 100, 1000, ... (a flood must not flood the log)


class Machine:
    def __init__(self, cfg: RunConfig, *, mem_cfg: HostMemConfig, balloon_cfg: BalloonConfig, costs: CostModel,
                 vdisk_profile: DeviceProfile, mem: "HostMemory", sessions: "SessionRegistry",
                 discipline: "RequestDiscipline", shootdowns: "Shootdowns", silent: "SilentGuestMemory",
                 monitors: "HostMonitors", invariant: "InvariantChecker", controller: BalloonController) -> None:
        self.cfg = cfg
        self.mem_cfg = mem_cfg
        self.balloon_cfg = balloon_cfg
        self.costs = costs
        self.vdisk_profile = vdisk_profile
        self.mem = mem
        self.sessions = sessions
        self.discipline = discipline
        self.shootdowns = shootdowns
        self.silent = silent
        self.monitors = monitors
        self.invariant = invariant
        self.controller = controller
        self.decisions = DecisionLog(balloon_cfg.policy, balloon_cfg.log_decisions)
        self.ram_pages = mem.pool.total_frames
        self.specs: dict[int, GuestSpec] = {g.guest_id: g for g in cfg.guests}
        self.targets: dict[int, int] = {}           # last target sent, per guest
        self.noncoop = NonCooperationDetector(mem_cfg.uncooperative_ticks)
        self.uncooperative: set[int] = set()        # flagged once; host swapping covers their share
        self.peak: dict[str, int] = {}
        self.rejected: dict[str, int] = {}

    # --- guests -----------------------------------------------------------------

    def guest_joined(self, session: GuestSession) -> None:
        """Admitted after its handshake (before its handler table is built)."""
        gid = session.guest_id
        assert gid is not None
        spec = self.specs[gid]
        max_balloon = int(spec.ram_pages * self.balloon_cfg.max_percent / 100)
        self.mem.add_guest(gid, spec.ram_pages, max_balloon, disk_blocks=int(spec.config.get("disk_blocks", 0)),
                           disk_profile=self.vdisk_profile)
        self.targets[gid] = 0
        self.discipline.guest_joined(gid)
        self.monitors.guest_joined(gid, spec.ram_pages, spec.config)

    def guest_gone(self, session: GuestSession) -> dict[str, int]:
        gid = session.guest_id
        assert gid is not None
        if gid not in self.mem.guest_ids():
            return {}
        counts = self.mem.guest_counts(gid)
        self.mem.remove_guest(gid)
        self.targets.pop(gid, None)
        self.discipline.guest_left(gid)
        self.monitors.guest_gone(gid)
        self.shootdowns.forget(gid)
        self.silent.forget(gid)
        self.uncooperative.discard(gid)  # a guest restarted under this id starts with a clean slate
        self.invariant.after_guest_left()
        return {"released_frames": int(counts.get("resident_pages", 0)),
                "released_swap_pages": int(counts.get("swapped_pages", 0))}

    def guest_silent(self, guest_id: int) -> None:
        """The watchdog took it out of the barrier: its memory goes to host swap at the next tick ends."""
        self.silent.guest_silent(guest_id)
        self.shootdowns.guest_silent(guest_id)
        self.discipline.guest_silent(guest_id)

    def guest_back(self, guest_id: int) -> None:
        self.silent.guest_back(guest_id)

    def tick_done(self, session: GuestSession, msg: TickDone, excused: bool = False) -> None:
        """The guest's TickDone; ``excused``: for a tick the host had already counted done for it."""
        gid = session.guest_id
        assert gid is not None
        stats, problems = sanitize_stats(msg.stats, session.stats_keys)
        session.last_stats = stats
        if problems and hasattr(session.conn, "send_error"):
            # Counted and logged as a refusal; the tick itself still counts.
            session.conn.send_error(MsgType.TICK_DONE, ErrorCode.BAD_FIELD,
                                    "TickDone.stats: " + "; ".join(problems))
        try:
            self.mem.set_ad_bits(gid, msg.accessed, msg.dirty)
            self.monitors.tick_bits(gid, msg.accessed, stats)   # the host's working-set sample
        except HostdError as exc:
            self._rejected(session, "tick_done", exc)
        if not excused:
            self.discipline.tick_done(gid, msg.vt_us)

    # --- refusals ---------------------------------------------------------------

    def _rejected(self, session: GuestSession, msg_type: str, exc: HostdError) -> None:
        """A refusal that sends no error reply (e.g. bad A/D bits in a notification)."""
        self.count_rejection(session, msg_type, getattr(exc, "code", ErrorCode.INTERNAL), str(exc))

    def count_rejection(self, session: GuestSession | None, msg_type: str, code: int, message: str) -> None:
        """Count one refused request or notification by its error code, per guest and host-wide; log it.

        Logged for the first few of each reason per guest, then at 100, 1000,
        ...: the counts are complete in ``run_finished``; the log stays small
        under a flood.
        """
        reason = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        n = session.count_rejection(reason) if session is not None else self.rejected[reason]
        if n <= _LOG_FIRST_REJECTIONS or (n >= 100 and str(n).rstrip("0") == "1"):
            log.warning(ev.REQUEST_REJECTED, guest=None if session is None else session.guest_id,
                        msg_type=msg_type, code=reason, reason=message[:300], count=n)

    # --- the tick ------------------------------------------------------------------

    def tick_started(self, tick: int, vt_us: int) -> None:
        # Before the discipline releases requests held across the boundary: they run in this tick. In the
        # run's last tick the guests let a fault in flight finish whole (guestd/gate.py): so does the host.
        parks = self.discipline.guests_park_at_gate
        self.mem.open_tick(vt_us + self.cfg.tick_us if parks else None, bound_faults=tick < self.cfg.ticks - 1)
        self.discipline.tick_started(tick, vt_us, self.mem)

    async def end_tick(self, tick: int, vt_us: int) -> Callable[[], None] | None:
        """The boundary's work the guests wait for; returns the observations (see the module docstring)."""
        mem = self.mem
        if not await self.discipline.finish_tick():
            return None
        mem.tick(vt_us)
        await self.silent.reclaim(mem, vt_us, self.shootdowns.pending_pages)
        if mem.sharing is not None and (mem.states is None or may_share(mem.states.state)):
            # before the state is taken: what sharing frees is free memory for the state's decisions
            await mem.sharing.boundary(self.cfg.tick_us)
        # ENGINE.md 3.4: the state from free frames, then the controllers' targets, then reclaim by state.
        if mem.states is not None:
            mem.states.update(tick, vt_us, mem.pool.free_frames)
        self.monitors.close_wss_tick()      # the controllers read this tick's estimate
        self._set_targets(tick, vt_us)
        await self.discipline.balance(mem, vt_us)
        return lambda: self._observe(tick, vt_us)

    def _observe(self, tick: int, vt_us: int) -> None:
        """The boundary's invariant sample, snapshot, monitors and log line: synchronous, never awaits."""
        self.invariant.tick(tick)
        logged = (tick + 1) % self.cfg.metrics_every_ticks == 0 or tick + 1 == self.cfg.ticks
        snap = self._snapshot(per_guest=logged)   # the per-guest rows only for the log (the monitors read memory)
        self.monitors.end_tick(tick, vt_us, snap, {gid: s.last_stats for gid, s in self.sessions.items()},
                               self.targets)
        for key in ("iobuf_pages", "cache_pages", "pinned_frames", "swap_used_slots"):
            self.peak[key] = max(self.peak.get(key, 0), int(snap.get(key, 0)))
        self.peak["min_free_frames"] = min(self.peak.get("min_free_frames", snap["free_frames"]), snap["free_frames"])
        if logged:
            guests = snap.pop("guests")
            for gid, alloc in self.decisions.alloc_targets.items():
                if str(gid) in guests:
                    guests[str(gid)]["alloc_target_pages"] = alloc
            for gid_s, row in guests.items():
                row.update(self.monitors.wss_row(int(gid_s)))
            log.info(ev.TICK_COMPLETED, tick=tick, vt_us=vt_us, live_guests=len(self.sessions),
                     balloon_targets={str(k): v for k, v in sorted(self.targets.items())},
                     guests=guests, **snap)

    def _set_targets(self, tick: int, vt_us: int) -> None:
        mem = self.mem
        snap_guests = []
        for gid, session in self.sessions.items():
            spec = self.specs[gid]
            actual = mem.balloon_pages(gid)
            target = self.targets.get(gid, 0)
            stats = session.last_stats
            host_wss = self.monitors.wss_estimate(gid)
            if host_wss is not None:
                # the host's own sampled estimate, beside the guest's report: into the session's copy itself
                # (sanitize_stats made it for this session; only the history monitor reads it after, by key)
                # rather than a copy of its ~85 keys per guest at every boundary
                stats[STAT_HOST_WSS] = host_wss
            snap_guests.append(GuestView(
                guest_id=gid, ram_pages=spec.ram_pages, max_balloon_pages=int(mem.max_balloon_pages(gid)),
                target_pages=target, actual_pages=actual,
                # a shared page is backed too: controllers that look for unbacked memory must not
                # mistake sharing's savings for pages the guest lost
                resident_pages=mem.p2m(gid).resident_pages(),
                stats=stats, shares=int(spec.config.get("shares", 1000))))
        if not snap_guests:
            return
        pool = mem.pool.counts()
        states = mem.states
        view = HostView(tick=tick, vt_us=float(vt_us), total_frames=mem.pool.total_frames,
                        free_frames=pool["free"], cache_pages=pool["cache"], iobuf_pages=pool["iobuf"],
                        guests=snap_guests, memory_state=None if states is None else states.state.label,
                        min_free_frames=0 if states is None else states.min_free_frames)
        for gid in self.noncoop.update(view) - self.uncooperative:
            g = next(x for x in snap_guests if x.guest_id == gid)
            self.uncooperative.add(gid)
            log.warning(ev.GUEST_UNCOOPERATIVE, guest=gid, target_pages=g.target_pages, actual_pages=g.actual_pages,
                        ticks=self.noncoop.stall_ticks)
        # Clamped, an uncooperative guest not asked for more (host swapping covers it), every decision logged.
        wanted = self.decisions.decide(self.controller, view, self.uncooperative)
        if states is not None:
            states.set_alloc_targets({g.guest_id: VmAllocation(g.guest_id, g.resident_pages,
                                                               self.decisions.alloc_targets[g.guest_id])
                                      for g in snap_guests})
        for g in snap_guests:
            gid = g.guest_id
            new = wanted[gid]
            if new != self.targets.get(gid, 0):
                session = self.sessions.get(gid)
                assert session is not None
                log.info(ev.BALLOON_TARGET_SET, guest=gid, target_pages=new, previous_pages=self.targets.get(gid, 0),
                         actual_pages=g.actual_pages, policy=self.balloon_cfg.policy)
                self.targets[gid] = new
                if not session.conn.is_closing:
                    session.conn.notify(BalloonTarget(new))

    # --- reporting -------------------------------------------------------------------

    def _snapshot(self, final: bool = False, per_guest: bool = True) -> dict[str, Any]:
        """Host memory's snapshot with the memory state (each tick) and the states' summary (at the end)."""
        snap = self.mem.snapshot(per_guest)
        states = self.mem.states
        if states is not None:
            snap["memory_state"] = states.state.label
            snap["min_free_frames"] = states.min_free_frames
            if final:
                snap.update(states.summary())
        return snap

    def progress_metrics(self) -> dict[str, Any]:
        pool = self.mem.pool.counts()
        return {"free_frames": pool["free"], "host_swapped": self.mem.counters.swap_out_pages}

    def final_metrics(self) -> dict[str, Any]:
        """The machine's part of ``run_finished``; the run is over (the full invariant check runs here)."""
        self.invariant.finish()
        snap = self._snapshot(final=True)
        guests = snap.pop("guests")
        self.discipline.close()
        return {"memory": snap, "guests_memory": guests, "peaks": dict(self.peak),
                "invariant_violations": self.invariant.violations, "ram_pages": self.ram_pages,
                "rejected_requests": dict(self.rejected), "uncooperative_guests": sorted(self.uncooperative),
                "balloon_decisions": self.decisions.metrics(),
                "watchdog": {**self.shootdowns.metrics(), **self.silent.metrics()},
                "monitors": self.monitors.metrics(), **self.discipline.stats()}

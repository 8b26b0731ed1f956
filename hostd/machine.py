"""The host's machine: memory, balloon targets and monitors, tick by tick.

The server owns connections and the clock; the machine owns what a tick
changes. It is told when a guest joins, finishes a tick, goes silent or
dies, and it answers the guests' memory and disk requests by delegating to
``HostMemory``. Errors from host memory carry a wire ``code`` and go back to
the guest as error replies; each refusal is counted per reason and logged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.costs import CostModel, DiskProfile
from balloonlab.proto.errors import ErrorCode
from balloonlab.proto.locks import LockProtocol, lock_config_from_mapping
from balloonlab.proto.messages import (BalloonDeflate, BalloonInflate, BalloonReply, BalloonTarget, DiskRead, DiskReadReply,
                            DiskWrite, DiskWriteReply, EptFault, EptFaultReply, MsgType, TickDone)
from balloonlab.proto.rpc import RequestHandler

from .balloon import DecisionLog, make_controller
from .balloon.noncoop import NonCooperationDetector
from .balloon.view import GuestView, HostView
from .config import RunConfig
from .errors import HostdError
from .memconfig import balloon_config, host_memory_config
from .locks import HostLocks
from .memory import HostMemory
from .monitors import HostMonitors
from .sequencer import RequestSequencer
from .session import GuestSession, sanitize_stats
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .server import Host

__all__ = ["Machine"]

log = structlog.get_logger("hostd.machine")

_HOST_STREAM = 0x6F5  # seeds the host's generator apart from the guests'
_LOG_FIRST_REJECTIONS = 10  # per guest and reason; then only at 100, 1000, ... (a flood must not flood the log)


class Machine:
    def __init__(self, cfg: RunConfig, host: "Host") -> None:
        self.cfg = cfg
        self.host = host
        self.mem_cfg = host_memory_config(cfg.host)
        self.balloon_cfg = balloon_config(cfg.balloon)
        self.costs = CostModel.from_mapping(cfg.costs)
        disk = cfg.disk
        self.vdisk_profile = DiskProfile.from_mapping(disk.get("vdisk", {}), "[disk.vdisk]")
        swap_profile = DiskProfile.from_mapping(disk.get("swap", {}), "[disk.swap]")
        guest_ram = sum(g.ram_pages for g in cfg.guests)
        self.ram_pages = self.mem_cfg.host_ram_pages(guest_ram)
        swap_pages = self.mem_cfg.swap_pages if self.mem_cfg.swap_pages is not None else 2 * guest_ram
        self.mem = HostMemory(
            self.ram_pages, swap_pages, self.mem_cfg.victim,
            np.random.default_rng(np.random.SeedSequence([cfg.seed, _HOST_STREAM])), self.costs, swap_profile,
            self._shootdown,
            low_watermark_frames=max(1, int(self.ram_pages * self.mem_cfg.low_watermark_pct / 100)),
            reclaim_batch_frames=self.mem_cfg.reclaim_batch_pages, cluster_pages=self.mem_cfg.cluster_pages,
            vdisk_cache_max_pages=self.mem_cfg.cache_max_pages,
            max_inflight_requests=self.mem_cfg.max_inflight_requests)
        # Unresponsive guests: their frames go first to host swap, their shootdowns are deferred.
        self.watchdog = Watchdog(self.mem, host.sessions)
        self.controller = make_controller(self.balloon_cfg.policy, self.balloon_cfg.params)
        self.decisions = DecisionLog(self.balloon_cfg.policy, self.balloon_cfg.log_decisions)
        self.specs = {g.guest_id: g for g in cfg.guests}
        self.targets: dict[int, int] = {}           # last target sent, per guest
        self.noncoop = NonCooperationDetector(self.mem_cfg.uncooperative_ticks)
        self.uncooperative: set[int] = set()        # flagged once; host swapping covers their share
        self.invariant_violations = 0
        self.peak: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.locks = self._make_locks(cfg)          # the lock model, when [locks] names a protocol
        self.sequencer = self._make_sequencer()     # None: requests are served as they arrive
        self.monitors = HostMonitors(cfg.monitors, self.mem, cfg.tick_us)

    # --- guests -----------------------------------------------------------------

    def guest_joined(self, session: GuestSession) -> None:
        gid = session.guest_id
        assert gid is not None
        spec = self.specs[gid]
        max_balloon = int(spec.ram_pages * self.balloon_cfg.max_percent / 100)
        self.mem.add_guest(gid, spec.ram_pages, max_balloon, disk_blocks=int(spec.config.get("disk_blocks", 0)),
                           disk_profile=self.vdisk_profile)
        self.targets[gid] = 0
        if self.locks is not None:
            locks = self.locks  # the session is active by now: its lock events are welcome
            session.conn.notifications[MsgType.LOCK_EVENT] = lambda m: locks.on_guest_event(gid, m)
        self.monitors.guest_joined(gid, spec.ram_pages, spec.config)

    def guest_gone(self, session: GuestSession) -> dict[str, int]:
        gid = session.guest_id
        assert gid is not None
        if gid not in self.mem.guest_ids():
            return {}
        counts = self.mem.guest_counts(gid)
        self.mem.remove_guest(gid)
        self.targets.pop(gid, None)
        if self.locks is not None:
            self.locks.guest_gone(gid)
        self.monitors.guest_gone(gid)
        self.watchdog.forget(gid)
        if self.sequencer is not None:
            self.sequencer.leave(gid)
        self.uncooperative.discard(gid)  # a guest restarted under this id starts with a clean slate
        self._check_invariant("guest_gone")
        return {"released_frames": int(counts.get("resident_pages", 0)),
                "released_swap_pages": int(counts.get("swapped_pages", 0))}

    def guest_unresponsive(self, session: GuestSession) -> None:
        # Its memory goes to host swap at the next tick ends (hostd.watchdog).
        assert session.guest_id is not None
        self.watchdog.guest_unresponsive(session.guest_id)
        if self.sequencer is not None:   # out of the barrier: the others' requests must not wait for it
            self.sequencer.running_changed()
        if self.locks is not None:   # a stopped guest must not keep the host's lock (ordered)
            self.locks.guest_unresponsive(session.guest_id)

    def guest_responsive(self, session: GuestSession) -> None:
        assert session.guest_id is not None
        self.watchdog.guest_responsive(session.guest_id)

    def tick_done(self, session: GuestSession, msg: TickDone) -> None:
        gid = session.guest_id
        assert gid is not None
        stats, problems = sanitize_stats(msg.stats)
        session.last_stats = stats
        if problems and hasattr(session.conn, "send_error"):
            # Counted and logged as a refusal; the tick itself still counts.
            session.conn.send_error(MsgType.TICK_DONE, ErrorCode.BAD_FIELD,
                                    "TickDone.stats: " + "; ".join(problems))
        try:
            self.mem.set_ad_bits(gid, msg.accessed, msg.dirty)
        except HostdError as exc:
            self._rejected(session, "tick_done", exc)
        if self.sequencer is not None:
            self.sequencer.tick_done(gid, msg.vt_us)

    # --- requests ---------------------------------------------------------------

    def request_handlers(self, session: GuestSession) -> dict[MsgType, RequestHandler]:
        gid = session.guest_id
        assert gid is not None
        mem = self.mem
        hypercall_us = self.costs.hypercall_us

        watchdog = self.watchdog

        async def ept_fault(m: EptFault) -> EptFaultReply:
            if watchdog.pending(gid):
                # Never hand back a placeholder: let deferred shootdowns to this guest settle first.
                await watchdog.settled(gid)
            tokens, done = await mem.ept_fault(gid, m.gpfns, m.vt_us)
            return EptFaultReply(tokens, done)

        def inflate(m: BalloonInflate) -> BalloonReply:
            mem.balloon_inflate(gid, m.gpfns)
            return BalloonReply(mem.balloon_pages(gid), m.vt_us + hypercall_us)

        def deflate(m: BalloonDeflate) -> BalloonReply:
            mem.balloon_deflate(gid, m.gpfns)
            return BalloonReply(mem.balloon_pages(gid), m.vt_us + hypercall_us)

        async def disk_read(m: DiskRead) -> DiskReadReply:
            tokens, done = await mem.vdisk_read(gid, m.blocks, m.vt_us)
            return DiskReadReply(tokens, done)

        async def disk_write(m: DiskWrite) -> DiskWriteReply:
            return DiskWriteReply(await mem.vdisk_write(gid, m.blocks, m.tokens, m.vt_us))

        handlers: dict[MsgType, Callable[[Any], Any]] = {
            MsgType.EPT_FAULT: ept_fault, MsgType.BALLOON_INFLATE: inflate, MsgType.BALLOON_DEFLATE: deflate,
            MsgType.DISK_READ: disk_read, MsgType.DISK_WRITE: disk_write,
        }
        if self.locks is not None:   # every request runs under L_hostmem, held for the guest's vCPU
            locks = self.locks
            handlers = {t: locks.wrap(gid, t, h) for t, h in handlers.items()}
            handlers.update(locks.lock_handlers(gid))
        elif self.sequencer is not None:   # one at a time, in virtual-time order (hostd.sequencer)
            lane = self.sequencer.join(gid)
            handlers = {t: self.sequencer.wrap(lane, h) for t, h in handlers.items()}
        # A HostdError raised here goes back as an error reply with its code; the
        # guest's connection reports every error reply to count_rejection.
        return dict(handlers)

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

    async def _shootdown(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        session = self.host.sessions.get(gid)
        if session is None:
            raise HostdError(f"guest {gid} is gone; cannot invalidate its mappings")
        if self.sequencer is not None:
            # Only where the guest is parked, so the shootdown lands at the same point of its run every time.
            await self.sequencer.until_parked(gid)
            if self.host.sessions.get(gid) is not session:   # died meanwhile (maybe even came back)
                raise HostdError(f"guest {gid} is gone; cannot invalidate its mappings")
        if self.locks is not None and not session.unresponsive:
            # Under the guest's L_vmem, taken there for the owner the host acts for (hostd.locks).
            s, timeout_s = session, self.mem_cfg.shootdown_timeout_s
            return await self.locks.shootdown(session.conn, gid, gpfns, timeout_s,
                                              invalidate=lambda: self.watchdog.shootdown(s, gpfns, timeout_s))
        if session.unresponsive:
            # Its vCPU is not running: take the frames now, the content comes with its late reply.
            return self.watchdog.deferred_shootdown(session, gpfns)
        # Waits for the acknowledgement, unless the guest goes silent meanwhile (hostd.watchdog).
        return await self.watchdog.shootdown(session, gpfns, self.mem_cfg.shootdown_timeout_s)

    # --- locks (hostd.locks) ------------------------------------------------------

    def _make_locks(self, cfg: RunConfig) -> HostLocks | None:
        lock_cfg = lock_config_from_mapping(cfg.locks)
        if not lock_cfg.enabled:
            return None
        locks = HostLocks(lock_cfg, self.host.stop, lambda: float(self.host.vt_us), self.costs.hypercall_us)
        if lock_cfg.protocol is LockProtocol.NO_CALLBACK:
            self.mem.callout = locks.callout   # L_hostmem is dropped around every call into a guest
        return locks

    def _make_sequencer(self) -> RequestSequencer | None:
        if self.mem_cfg.resolved_request_order(self.locks is not None) == "arrival":
            return None
        host = self.host
        return RequestSequencer(lambda: host.running_guests)

    def tick_started(self, tick: int, vt_us: int) -> None:
        """The host starts a tick: under a lock model its reclaim task may run during it."""
        if self.sequencer is not None:
            self.sequencer.tick_started(vt_us)
        if self.locks is not None:
            self.locks.start()
            self.locks.tick_started(self.mem, vt_us)

    # --- the tick ------------------------------------------------------------------

    async def end_tick(self, tick: int, vt_us: int) -> None:
        mem = self.mem
        if self.locks is not None:
            if self.locks.deadlocked:
                return   # the run ends: this tick's tasks wait for each other and cannot finish it
            await self.locks.finish_tick()
        mem.tick(vt_us)
        await self.watchdog.reclaim_unresponsive(vt_us)
        await (mem.balance(vt_us) if self.locks is None else self.locks.balance(mem, vt_us))
        self._set_targets(tick, vt_us)
        if (tick + 1) % self.mem_cfg.invariant_every_ticks == 0:
            self._check_invariant("tick")
        snap = mem.snapshot()
        self.monitors.end_tick(tick, vt_us, snap, {gid: s.last_stats for gid, s in sorted(self.host.sessions.items())},
                               self.targets)
        for key in ("iobuf_pages", "cache_pages", "pinned_frames", "swap_used_slots"):
            self.peak[key] = max(self.peak.get(key, 0), int(snap.get(key, 0)))
        self.peak["min_free_frames"] = min(self.peak.get("min_free_frames", snap["free_frames"]), snap["free_frames"])
        every = self.cfg.metrics_every_ticks
        if (tick + 1) % every == 0 or tick + 1 == self.cfg.ticks:
            guests = snap.pop("guests")
            log.info(ev.TICK_COMPLETED, tick=tick, vt_us=vt_us, live_guests=len(self.host.sessions),
                     balloon_targets={str(k): v for k, v in sorted(self.targets.items())},
                     guests=guests, **snap)

    def _set_targets(self, tick: int, vt_us: int) -> None:
        mem = self.mem
        snap_guests = []
        for gid, session in sorted(self.host.sessions.items()):
            counts = mem.guest_counts(gid)
            spec = self.specs[gid]
            actual = mem.balloon_pages(gid)
            target = self.targets.get(gid, 0)
            snap_guests.append(GuestView(
                guest_id=gid, ram_pages=spec.ram_pages, max_balloon_pages=int(counts["max_balloon_pages"]),
                target_pages=target, actual_pages=actual, resident_pages=int(counts["resident_pages"]),
                stats=session.last_stats, shares=int(spec.config.get("shares", 1000))))
        if not snap_guests:
            return
        pool = mem.pool.counts()
        view = HostView(tick=tick, vt_us=float(vt_us), total_frames=mem.pool.total_frames,
                        free_frames=pool["free"], cache_pages=pool["cache"], iobuf_pages=pool["iobuf"],
                        guests=snap_guests)
        for gid in self.noncoop.update(view) - self.uncooperative:
            g = next(x for x in snap_guests if x.guest_id == gid)
            self.uncooperative.add(gid)
            log.warning(ev.GUEST_UNCOOPERATIVE, guest=gid, target_pages=g.target_pages, actual_pages=g.actual_pages,
                        ticks=self.noncoop.stall_ticks)
        # Clamped, an uncooperative guest not asked for more (host swapping covers it), every decision logged.
        wanted = self.decisions.decide(self.controller, view, self.uncooperative)
        for g in snap_guests:
            gid = g.guest_id
            new = wanted[gid]
            if new != self.targets.get(gid, 0):
                session = self.host.sessions[gid]
                log.info(ev.BALLOON_TARGET_SET, guest=gid, target_pages=new, previous_pages=self.targets.get(gid, 0),
                         actual_pages=g.actual_pages, policy=self.balloon_cfg.policy)
                self.targets[gid] = new
                if not session.conn.is_closing:
                    session.conn.notify(BalloonTarget(new))

    def _check_invariant(self, when: str) -> None:
        try:
            self.mem.check_invariant()
        except HostdError as exc:
            self.invariant_violations += 1
            log.error(ev.INVARIANT_VIOLATED, what=str(exc), when=when)

    # --- reporting -------------------------------------------------------------------

    def progress_metrics(self) -> dict[str, Any]:
        pool = self.mem.pool.counts()
        return {"free_frames": pool["free"], "host_swapped": self.mem.counters.swap_out_pages}

    def final_metrics(self) -> dict[str, Any]:
        out = self._final_metrics()
        if self.locks is not None:
            self.locks.close()
            out["locks"] = self.locks.final_metrics()
        return out

    def _final_metrics(self) -> dict[str, Any]:
        snap = self.mem.snapshot()
        guests = snap.pop("guests")
        return {"memory": snap, "guests_memory": guests, "peaks": dict(self.peak),
                "invariant_violations": self.invariant_violations, "ram_pages": self.ram_pages,
                "rejected_requests": dict(self.rejected), "uncooperative_guests": sorted(self.uncooperative),
                "balloon_decisions": self.decisions.metrics(),
                "watchdog": self.watchdog.metrics(), "monitors": self.monitors.metrics(),
                "request_order": "arrival" if self.sequencer is None else "virtual-time",
                **({} if self.sequencer is None else self.sequencer.stats())}

"""One guest's run under the host: kernel, workload, balloon, and the vCPU.

``build_guest`` turns the config the host sent in ``Welcome`` into a
running guest whose disk and hypervisor are the host's, over the socket.

The vCPU is one long-running coroutine (``GuestSessionState.run_vcpu``),
not one call per tick. It runs references while its clock is below the
gate (the end of the latest tick received, ``guestd.gate``); a batch stops
before the first reference that would start at or past the gate, and the
rest of the batch carries over to the next tick (it is never generated
again). At the park the next batch is drawn behind it, as many references
as reach the next tick's end (``batch_refs`` in all at most), and both run
in one call, so that a read chain can run from the one into the other; and
when the tick's start work will change nothing, the batch's first requests
go with ``TickDone`` (``ahead``) for the host to answer with the next
``TickStart``. At the gate the vCPU parks and ``TickDone`` goes out. Its
background work runs inside this coroutine, at virtual times that depend
only on the guest's own run:

- at each tick start: the balloon driver reconciles toward its target, the
  flusher starts its write-backs, kswapd and readahead get their turn;
- at each tick start, when free page reporting is on and its time has
  come: the reporter (``guestd.reporting``);
- inside a batch, whenever the clock passes a multiple of 1 ms (with kswapd
  or readahead on): kswapd and the readahead mark (``GuestKernel.background``);
- after every batch: the working-set and PFF period closes when the clock
  passed its end (``GuestKernel._maybe_end_period``), and PSI's 2 s
  averages are folded in (``guestd.psi``); memory the workload freed at
  the end of the batch is freed (``GuestKernel.discard``) once the batch
  has run to its end (a batch cut at the gate frees it when its rest has run).

Nothing runs as a separate asyncio task racing the vCPU in wall time; the
only other code on the loop is the host's synchronous callbacks
(``Invalidate``, ``BalloonTarget``, the end-of-run audit).
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ConfigError, ProtoError
from balloonlab.proto.locks import lock_config_from_mapping
from balloonlab.proto.rpc import RpcConnection

from .balloon import BalloonDriver
from .gate import VcpuGate
from .kernel import STAT_KEYS
from .locks import GuardedBlockDevice, GuardedHypervisor, GuestLocks
from .psi import PsiMeter
from .remote import RemoteBlockDevice, RemoteHypervisor, VcpuLink
from .reporting import FreePageReporter
from .statswire import StatsRow
from .workload.generators import take_frees

__all__ = ["GuestSessionState", "build_guest", "warm_up"]

log = structlog.get_logger("guestd")

MIN_BATCH_REFS = 64

_NO_HOLD = contextlib.nullcontext()     # reusable: no lock model, nothing held across the tick
_KERNEL_KEY_SET = frozenset(STAT_KEYS)
_K_REFS, _K_VT_US = STAT_KEYS.index("refs"), STAT_KEYS.index("vt_us")

TickDoneSender = Callable[..., None]    # (tick, vt_us, stats: StatsRow, accessed, dirty[, ahead])


class GuestSessionState:
    """Everything one guest process runs, between the socket and the paging model."""

    def __init__(self, guest_id: int, cfg: Any, kernel: Any, workload: Any, balloon: BalloonDriver,
                 costs: CostModel, metrics_every_ticks: int, batch_refs: int,
                 gate: VcpuGate | None = None, psi: PsiMeter | None = None) -> None:
        self.guest_id = guest_id
        self.cfg = cfg
        self.kernel = kernel
        self.workload = workload
        self.balloon = balloon
        self.costs = costs
        self.metrics_every_ticks = max(1, metrics_every_ticks)
        self.batch_refs = batch_refs
        self.gate = gate if gate is not None else VcpuGate()
        self.psi = psi if psi is not None else PsiMeter()
        self.ticks_run = 0
        self.locks: GuestLocks | None = None   # the lock model, when the host's [locks] names a protocol
        self.send_tick_done: TickDoneSender | None = None
        self._refs_at_park = 0
        self._rest_keys: tuple[str, ...] | None = None    # stat_row(): the keys after the kernel's, last time
        self._row_keys: tuple[str, ...] | None = None     # ... and all of them (None: merged as maps)
        self._carry: tuple[np.ndarray, np.ndarray] | None = None   # the rest of a batch cut at the gate
        self.carried_refs = 0          # references carried over a gate (cumulative)
        self.gate.on_park = self._parked
        self.link: VcpuLink | None = None   # the requests' path to the host (gate, PSI), when remote
        self.reporter: FreePageReporter | None = None   # free page reporting, when on
        self._frees: np.ndarray | None = None          # memory the workload frees once its batch is done
        self._dirty_ratio = float(getattr(cfg, "dirty_background_ratio", 0.0))   # the flusher's; 0: off
        # answers ahead (``TickDone.ahead``): offered when the host's Welcome says it serves them
        self.ahead_chain = False
        self.ahead_answered = 0        # requests the host answered before their batch ran (cumulative)
        self._ahead_prog: bytes | None = None      # offered at the last park; the host owes its TickAhead
        self._ahead_got: asyncio.Future[Any] | None = None

    @property
    def vt_us(self) -> float:
        return float(self.kernel.vt_us)

    @property
    def in_tick(self) -> bool:
        """The vCPU is running (not parked at its gate, and the run not over)."""
        return self.gate.tick >= 0 and not self.gate.parked

    async def run_vcpu(self) -> None:
        """Run the vCPU tick after tick until the run ends (``VcpuStopped`` from the gate)."""
        k = self.kernel
        gate = self.gate
        started = -1
        while True:
            await gate.wait_open(k.vt_us)            # parks at the end of each tick; raises VcpuStopped
            tick = gate.tick
            hold = self.locks.tick_hold() if self.locks is not None else _NO_HOLD
            async with hold:                          # hold_vmem = "tick": L_vmem across the tick
                if tick != started:
                    started = tick
                    if self._ahead_prog is not None:
                        await self._answers_ahead(tick)
                    if k.vt_us < gate.tick_start_us:    # idle since (a finite workload ran dry)
                        k.advance_to(gate.tick_start_us)
                    await self.balloon.reconcile()
                    # (only the work that is on: a coroutine that returns at once still costs its call)
                    if self._dirty_ratio > 0:
                        await self._flush()
                    if self.reporter is not None:
                        await self._report()
                    if k.has_background:
                        await k.background(gate.gate_us)
                # a TickStart that arrives while a held request is answered moves the gate: the
                # loop then goes round for that tick's start work
                while k.vt_us < gate.gate_us and gate.tick == tick:
                    await self._run_batch(gate.gate_us)
            self.psi.advance(k.vt_us)

    async def _flush(self) -> None:
        """The flusher, at each tick start: write-backs it started that are complete make their pages clean,
        then new ones start for the dirty page cache above the background ratio (the clock does not wait)."""
        ratio = self._dirty_ratio
        if ratio <= 0:
            return
        self.psi.paused = True
        try:
            await self.kernel.flush_dirty_cache(ratio)
        finally:
            self.psi.paused = False

    async def _report(self) -> None:
        """Free page reporting, when it is on and due (background work: not a memory stall)."""
        if self.reporter is None:
            return
        self.psi.paused = True
        try:
            await self.reporter.maybe_run()
        finally:
            self.psi.paused = False

    async def _run_batch(self, gate_us: float) -> None:
        k = self.kernel
        if self._carry is not None:
            pages, writes = self._carry
            self._carry = None
        else:
            per_ref = max(k.ref_us, 1e-6)
            n = int((gate_us - k.vt_us) / per_ref) + 1
            n = min(max(n, MIN_BATCH_REFS), self.batch_refs)
            pages, writes = self.workload.next_batch(n)
            self._frees = take_frees(self.workload)
            if pages.size == 0:  # a finite workload (a trace) ran dry, or it is idle: the vCPU idles to the gate
                await self._free_now()
                k.advance_to(gate_us)
                return
        done = await k.access(pages, writes, deadline_us=gate_us)
        if done < pages.size:
            self._carry = (pages[done:], None if writes is None else writes[done:])
            self.carried_refs += int(pages.size - done)
        elif self._frees is not None:
            await self._free_now()
        self.psi.advance(k.vt_us)

    def _topped_up(self, pages: np.ndarray, writes: np.ndarray | None,
                   gate_us: float) -> tuple[np.ndarray, np.ndarray | None]:
        """A carried rest, with the next batch drawn now (at the park) to run behind it in the same call.

        As many references as reach ``gate_us`` (the next tick's end) from the
        clock at the park at ``ref_us`` each, less the carried ones, and no
        more than ``batch_refs`` in all (a guest that pages hard would
        otherwise draw ever further ahead of what it runs). Run apart, the
        rest's last read chain stops at its end (the next batch's size
        depends on the clock there) and the new batch needs a round trip of
        its own; in one call a chain runs on into it, and drawn at the park
        the whole batch is known before the tick starts (``TickDone.ahead``).
        Not when the rest still has memory to free at its end (the new
        batch's frees would come first), nor for a workload that has run dry.
        """
        if self._frees is not None:
            return pages, writes
        k = self.kernel
        n = min(int((gate_us - k.vt_us) / max(k.ref_us, 1e-6)) + 1, self.batch_refs) - int(pages.size)
        if n <= 0:
            return pages, writes
        more, more_w = self.workload.next_batch(n)
        self._frees = take_frees(self.workload)
        if more.size == 0:
            return pages, writes
        pages = np.concatenate((pages, more.astype(pages.dtype, copy=False)))
        if writes is None or writes.dtype != more_w.dtype:   # write codes (uint8) beside bools: codes hold both
            writes = np.zeros(0, np.uint8) if writes is None else writes.astype(np.uint8)
            more_w = more_w.astype(np.uint8)
        return pages, np.concatenate((writes, more_w))

    async def _free_now(self) -> None:
        if self._frees is not None:
            frees, self._frees = self._frees, None
            await self.kernel.discard(frees)

    def _parked(self, tick: int, vt_us: float) -> None:
        """The vCPU reached the gate of ``tick`` at ``vt_us``: report the tick (TickDone)."""
        self.ticks_run += 1
        self.psi.advance(vt_us)
        stats = self.stat_row({
            "tick_vt_us": round(float(vt_us), 3),
            # the part of the overshoot past the tick's end that a request in flight at the gate explains
            "tick_inflight_us": round(self.link.inflight_us(self.gate.gate_us), 3) if self.link else 0.0})
        # (by position: ``stats["refs"]`` would build the row's key index, ~85 keys, at every park)
        self._refs_at_park = int(stats.values[_K_REFS] if stats.keys[_K_REFS] == "refs" else stats["refs"])
        accessed, dirty = self.kernel.take_ad_bytes()
        if tick % self.metrics_every_ticks == self.metrics_every_ticks - 1:
            log.info(ev.TICK_COMPLETED, tick=tick, **stats.as_dict())
        ahead = b""
        gate = self.gate
        if self._carry is not None and self._frees is None and tick != gate.last_tick:
            next_gate = gate.gate_us + (gate.gate_us - gate.tick_start_us)
            self._carry = pages, writes = self._topped_up(*self._carry, next_gate)
            if self.ahead_chain and self._start_work_is_none():
                ahead = self.kernel.ahead_program(pages, writes, next_gate) or b""
                if ahead:
                    self._ahead_prog = ahead
        if self.send_tick_done is not None:
            if ahead:
                self.send_tick_done(tick, float(vt_us), stats, accessed, dirty, ahead)
            else:
                self.send_tick_done(tick, float(vt_us), stats, accessed, dirty)

    def _start_work_is_none(self) -> bool:
        """The next tick's start work will change nothing unless the host sends us something first: no lock
        model, flusher, free page reporting, kswapd or readahead, and the balloon at its target."""
        return (self.locks is None and self._dirty_ratio <= 0 and self.reporter is None
                and not self.kernel.has_background and self.balloon.target_pages == self.balloon.actual_pages
                and self.link is not None and self.link.gate_requests)

    def take_ahead(self, tick: int, tokens: np.ndarray, times: bytes) -> None:
        """The host's ``TickAhead``: the answers to the program of the last park (maybe none)."""
        if self._ahead_prog is None or (self._ahead_got is not None and self._ahead_got.done()):
            raise ProtoError(f"TickAhead for tick {tick}, but no TickDone.ahead is waiting for its answers")
        if self._ahead_got is None:
            self._ahead_got = asyncio.get_running_loop().create_future()
        self._ahead_got.set_result((tick, tokens, times))

    async def _answers_ahead(self, tick: int) -> None:
        """The tick starts with a program offered at the park: its answers (the host's TickAhead, sent right
        after TickStart) go to the kernel before anything of the tick runs."""
        if self._ahead_got is None:
            self._ahead_got = asyncio.get_running_loop().create_future()
        await self.gate.wait_for(self._ahead_got)      # VcpuStopped if the run ends first
        prog, got = self._ahead_prog, self._ahead_got.result()
        self._ahead_prog = self._ahead_got = None
        if got is None:
            raise ProtoError(f"tick {tick} started again before the host's TickAhead came")
        t, tokens, times = got
        if t != tick:
            raise ProtoError(f"TickAhead for tick {t} at the start of tick {tick}")
        if times:
            assert prog is not None
            self.ahead_answered += self.kernel.answered_ahead(prog, tokens, np.frombuffer(times, "<f8").tolist())

    def stats(self) -> dict[str, Any]:
        """The stats a TickDone would report now, as a map."""
        return self.stat_row().as_dict()

    def stat_row(self, tail: dict[str, Any] | None = None) -> StatsRow:
        """The stats a TickDone reports (then ``tail``'s), as keys and values: the kernel's ~65 as one list,
        the rest from a small map; the keys one tuple for as long as they stay the same."""
        values = self.kernel.stat_values()
        values[_K_VT_US] = round(float(self.kernel.vt_us), 3)
        rest = self.balloon.stats()
        rest.update(self.psi.stats())
        if self.reporter is not None:
            rest.update(self.reporter.stats())
            rest["frames_discarded"] = int(getattr(self.reporter.hypervisor, "frames_discarded", 0))
        rest["refs_done"] = int(values[_K_REFS]) - self._refs_at_park      # completed since the last TickDone
        rest["carried_refs"] = self.carried_refs
        rest["ahead_answered"] = self.ahead_answered
        rest["gate_parks_in_request"] = self.gate.parks_in_request
        if self.locks is not None:
            rest.update(self.locks.stats())
        if tail:
            rest.update(tail)
        rest_keys = tuple(rest)
        if rest_keys != self._rest_keys:
            self._rest_keys = rest_keys
            # a key of the rest that the kernel reports too takes the kernel's place, as a map's update does
            self._row_keys = None if _KERNEL_KEY_SET.intersection(rest_keys) else STAT_KEYS + rest_keys
        if self._row_keys is None:
            merged = dict(zip(STAT_KEYS, values))
            merged.update(rest)
            return StatsRow(tuple(merged), list(merged.values()))
        values += rest.values()
        return StatsRow(self._row_keys, values)

    def invalidate(self, gpfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """TLB shootdown: the tokens the gpfns held and which were clean page cache (bools)."""
        return self.kernel.invalidate_labelled(gpfns)

    def set_balloon_target(self, target_pages: int) -> None:
        self.balloon.set_target(target_pages)

    def log_finished(self, reason: str) -> None:
        log.info(ev.GUEST_FINISHED, reason=reason, ticks=self.ticks_run, stats=self.stats())


@contextlib.contextmanager
def _psi_paused(psi: PsiMeter) -> Iterator[None]:
    was = psi.paused
    psi.paused = True
    try:
        yield
    finally:
        psi.paused = was


# A small guest of the common shape (a file and an anonymous region, two workload kinds, clock).
_WARM_UP_CONFIG: dict[str, Any] = {
    "ram_mib": 4, "kernel_mib": 1, "policy": "clock",
    "regions": [{"name": "db", "kind": "file", "mib": 1}, {"name": "heap", "kind": "anon", "mib": 1}],
    "workload": [{"kind": "db", "region": "db"}, {"kind": "anon-hot", "region": "heap"}],
}


def warm_up() -> None:
    """Validate a small config once, so that a process forked after this does not pay for it.

    msgspec builds each config class's type information (evaluating its
    annotations: ``typing``, ``compile``, ``inspect``) the first time it
    converts to it, and keeps it on the class: about 80 ms of CPU in every
    guest. The fork server calls this before it forks; its children inherit
    the caches copy-on-write. So too the check that the workloads' compiled
    draws are numpy's (a few ms in a fresh process), and the built-in
    replacement policies' parameters (``inspect.signature``).
    """
    from .config import guest_config_from_mapping
    from .replacement import warm_up_policies
    from .workload.generators import draws_as_numpy
    warm_up_policies()
    guest_config_from_mapping(_WARM_UP_CONFIG)
    CostModel.from_mapping({})
    lock_config_from_mapping(None)
    draws_as_numpy()


def build_guest(guest_id: int, config: dict[str, Any], conn: RpcConnection,
                gate: VcpuGate | None = None) -> GuestSessionState:
    from .config import build_checked_workload, guest_config_from_mapping
    from .kernel import GuestKernel

    where = f"guest {guest_id}"
    cfg = guest_config_from_mapping(config, where=where, check_workload=False)   # checked as it is built, below
    if cfg.ram_pages != config.get("ram_pages", cfg.ram_pages):
        raise ConfigError(f"guest {guest_id}: host thinks ram_pages={config['ram_pages']}, config says {cfg.ram_pages}")
    costs = CostModel.from_mapping(config.get("costs", {}))
    seed = int(config.get("seed", 1))
    # One independent stream per guest and purpose, all from the run's seed.
    root = np.random.SeedSequence([seed, guest_id])
    kernel_seed, workload_seed = root.spawn(2)
    lock_cfg = lock_config_from_mapping(config.get("locks"), where=f"guest {guest_id}: locks")
    locks = GuestLocks(guest_id, lock_cfg, conn) if lock_cfg.enabled else None
    gate = gate if gate is not None else VcpuGate()
    ticks = config.get("ticks")
    if isinstance(ticks, int) and not isinstance(ticks, bool) and ticks > 0:
        gate.last_tick = ticks - 1
    psi = PsiMeter()
    link = VcpuLink(conn, gate, psi, gate_requests=locks is None)
    hyp: Any = RemoteHypervisor(conn, link, balloon_page_us=costs.balloon_page_us)
    blockdev: Any = RemoteBlockDevice(conn, cfg.disk_blocks, link)
    if locks is not None:   # hypercalls follow the lock protocol; the kernel's mm_lock is L_vmem
        hyp, blockdev = GuardedHypervisor(hyp, locks), GuardedBlockDevice(blockdev, locks)
    kernel = GuestKernel(cfg.kernel, np.random.default_rng(kernel_seed), blockdev, hyp, costs,
                         mm_lock=None if locks is None else locks.mm_lock())
    if locks is not None:
        locks.attach(kernel)
    workload = build_checked_workload(cfg.workload, cfg.kernel.layout, np.random.default_rng(workload_seed), where)
    chain = config.get("read_chain", 0)
    if locks is None and type(chain) is int and chain > 0:
        kernel.enable_read_chain(chain)
    balloon = BalloonDriver(kernel, hyp)
    kernel.on_oom = balloon.deflate_on_oom
    kernel.bg_quiet = lambda: _psi_paused(psi)     # kswapd's and readahead's requests are no vCPU stall
    metrics_every = int(config.get("metrics_every_ticks", 10))
    if metrics_every < 1:
        raise ConfigError(f"guest {guest_id}: metrics_every_ticks must be >= 1")
    state = GuestSessionState(guest_id, cfg, kernel, workload, balloon, costs, metrics_every, cfg.batch_refs,
                              gate, psi)
    state.locks = locks
    state.link = link
    state.ahead_chain = config.get("ahead_chain") is True and kernel.read_chain > 0
    if cfg.reporting.enabled:
        if not hasattr(hyp, "report_free"):
            raise ConfigError(f"guest {guest_id}: free_page_reporting cannot go with a [locks] protocol "
                              "(its hypercalls are not in the lock model)")
        state.reporter = FreePageReporter(kernel, hyp, cfg.reporting)
    return state

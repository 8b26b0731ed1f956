"""One guest's run under the host: kernel, workload, balloon, the vCPU's tick.

``build_guest`` turns the config the host sent in ``Welcome`` into a
running guest whose disk and hypervisor are the host's, over the socket.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.locks import lock_config_from_mapping
from balloonlab.proto.messages import TickStart
from balloonlab.proto.rpc import RpcConnection

from .balloon import BalloonDriver
from .locks import GuardedBlockDevice, GuardedHypervisor, GuestLocks
from .remote import RemoteBlockDevice, RemoteHypervisor

__all__ = ["GuestSessionState", "build_guest"]

log = structlog.get_logger("guestd")

MIN_BATCH_REFS = 64


class GuestSessionState:
    """Everything one guest process runs, between the socket and the paging model."""

    def __init__(self, guest_id: int, cfg: Any, kernel: Any, workload: Any, balloon: BalloonDriver,
                 costs: CostModel, metrics_every_ticks: int, batch_refs: int) -> None:
        self.guest_id = guest_id
        self.cfg = cfg
        self.kernel = kernel
        self.workload = workload
        self.balloon = balloon
        self.costs = costs
        self.metrics_every_ticks = max(1, metrics_every_ticks)
        self.batch_refs = batch_refs
        self.ticks_run = 0
        self.locks: GuestLocks | None = None   # the lock model, when the host's [locks] names a protocol
        self.in_tick = False

    @property
    def vt_us(self) -> float:
        return float(self.kernel.vt_us)

    async def run_tick(self, tick: TickStart) -> tuple[dict[str, Any], bytes, bytes]:
        """Run the vCPU until its virtual clock reaches the end of this tick."""
        self.in_tick = True
        try:
            if self.locks is None:
                return await self._run_tick(tick)
            async with self.locks.tick_hold():   # hold_vmem = "tick": L_vmem across the whole tick
                return await self._run_tick(tick)
        finally:
            self.in_tick = False

    async def _run_tick(self, tick: TickStart) -> tuple[dict[str, Any], bytes, bytes]:
        k = self.kernel
        end_us = tick.vt_us + tick.tick_us
        if k.vt_us < tick.vt_us:
            k.vt_us = tick.vt_us
        await self.balloon.reconcile()
        per_ref = max(self.costs.mem_ref_us, 1e-6)
        while k.vt_us < end_us:
            n = int((end_us - k.vt_us) / per_ref) + 1
            n = min(max(n, MIN_BATCH_REFS), self.batch_refs)
            pages, writes = self.workload.next_batch(n)
            if pages.size == 0:  # a finite workload (a trace) ran dry: the vCPU idles
                k.advance_to(end_us)
                break
            await k.access(pages, writes)
        self.ticks_run += 1
        stats = self.stats()
        accessed, dirty = k.take_ad_bits()
        if tick.tick % self.metrics_every_ticks == self.metrics_every_ticks - 1:
            log.info(ev.TICK_COMPLETED, **stats)
        return stats, accessed.tobytes(), dirty.tobytes()

    def stats(self) -> dict[str, Any]:
        s = dict(self.kernel.stats())
        s.update(self.balloon.stats())
        s["vt_us"] = round(float(self.kernel.vt_us), 3)
        if self.locks is not None:
            s.update(self.locks.stats())
        return s

    def invalidate(self, gpfns: np.ndarray) -> np.ndarray:
        return self.kernel.invalidate(gpfns)

    def set_balloon_target(self, target_pages: int) -> None:
        self.balloon.set_target(target_pages)

    def log_finished(self, reason: str) -> None:
        log.info(ev.GUEST_FINISHED, reason=reason, ticks=self.ticks_run, stats=self.stats())


def build_guest(guest_id: int, config: dict[str, Any], conn: RpcConnection) -> GuestSessionState:
    from .config import guest_config_from_mapping
    from .kernel import GuestKernel
    from .workload import build_workload

    cfg = guest_config_from_mapping(config, where=f"guest {guest_id}")
    if cfg.ram_pages != config.get("ram_pages", cfg.ram_pages):
        raise ConfigError(f"guest {guest_id}: host thinks ram_pages={config['ram_pages']}, config says {cfg.ram_pages}")
    costs = CostModel.from_mapping(config.get("costs", {}))
    seed = int(config.get("seed", 1))
    # One independent stream per guest and purpose, all from the run's seed.
    root = np.random.SeedSequence([seed, guest_id])
    kernel_seed, workload_seed = root.spawn(2)
    lock_cfg = lock_config_from_mapping(config.get("locks"), where=f"guest {guest_id}: locks")
    locks = GuestLocks(guest_id, lock_cfg, conn) if lock_cfg.enabled else None
    hyp: Any = RemoteHypervisor(conn)
    blockdev: Any = RemoteBlockDevice(conn, cfg.disk_blocks)
    if locks is not None:   # hypercalls follow the lock protocol; the kernel's mm_lock is L_vmem
        hyp, blockdev = GuardedHypervisor(hyp, locks), GuardedBlockDevice(blockdev, locks)
    kernel = GuestKernel(cfg.kernel, np.random.default_rng(kernel_seed), blockdev, hyp, costs,
                         mm_lock=None if locks is None else locks.mm_lock())
    if locks is not None:
        locks.attach(kernel)
    workload = build_workload(cfg.workload, cfg.kernel.layout, np.random.default_rng(workload_seed))
    balloon = BalloonDriver(kernel, hyp)
    kernel.on_oom = balloon.deflate_on_oom
    metrics_every = int(config.get("metrics_every_ticks", 10))
    if metrics_every < 1:
        raise ConfigError(f"guest {guest_id}: metrics_every_ticks must be >= 1")
    state = GuestSessionState(guest_id, cfg, kernel, workload, balloon, costs, metrics_every, cfg.batch_refs)
    state.locks = locks
    return state

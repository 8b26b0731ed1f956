"""The guest's side of the lock model: ``L_vmem``, its memory-map lock, instrumented.

Active only when the host's ``[locks]`` table names a protocol (see
``proto.locks``). ``L_vmem`` is an ``OwnerLock``; every transition is
reported to the host in a ``LockEvent`` notification, sent before anything
that follows it (so the host's wait-for graph stays exact).

Owners of ``L_vmem``:

- the guest's vCPU (``guest-N/vcpu``): the kernel's ``mm_lock`` is a
  ``VmemLock``, so ``access``, ``reclaim`` and ``balloon_alloc`` take it for
  the vCPU; with ``hold_vmem = "tick"`` the vCPU holds it across a whole tick
  (``tick_hold``), the widest race window;
- a host task, remotely: the host's ``LockAcquire`` before a TLB shootdown
  (``on_lock_acquire``), on behalf of the owner the host acts for. When that
  owner is this vCPU (the host reclaims one of our own pages while serving our
  fault) the lock is re-entrant and the vCPU is not blocked by itself.

Per protocol, what the vCPU does around its lock:

    naive                   nothing: it makes hypercalls while holding L_vmem
    ordered                 its first level of L_vmem takes the host's L_hostmem first
                            (LockAcquire), its last release gives it back (LockRelease)
    no-callback-under-lock  every hypercall drops L_vmem for its duration (``GuardedCalls``)

A hypercall the host fails with ``DEADLOCK_BROKEN`` (the detector broke a
cycle through it) is retried after the vCPU yields ``L_vmem`` to whoever
waits for it.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np

from balloonlab.proto.errors import ErrorCode, PeerClosed, RemoteError
from balloonlab.proto.locks import (VCPU_TASK, LockClass, LockConfig, LockProtocol, LockTransition, OwnerLock, guest_proc,
                         owner_name, split_owner)
from balloonlab.proto.messages import LockAcquire, LockEvent, LockRelease, LockReply
from balloonlab.proto.rpc import RpcConnection

from .errors import GuestdError

__all__ = ["GuestLocks", "VmemLock", "GuardedHypervisor", "GuardedBlockDevice", "LockRequestError"]

MAX_DEADLOCK_RETRIES = 1000   # a request failed this often in a row is a bug, not bad luck


class LockRequestError(GuestdError, ValueError):
    """The host asked for a lock we do not have, or released one it does not hold."""

    code = ErrorCode.INVALID_STATE


@dataclass(slots=True)
class GuestLockCounters:
    lock_events_sent: int = 0
    vmem_waits: int = 0            # the vCPU waited for its own L_vmem (a host task held it)
    remote_vmem_acquisitions: int = 0  # L_vmem taken for a host task (shootdowns)
    hostmem_acquisitions: int = 0  # L_hostmem taken through LockAcquire (ordered)
    deadlock_retries: int = 0      # hypercalls retried after DEADLOCK_BROKEN
    dropped_for_calls: int = 0     # L_vmem dropped around a hypercall (no-callback-under-lock)
    hostmem_revoked: int = 0       # the host took L_hostmem back while we held it (we were unresponsive)


class GuestLocks:
    def __init__(self, guest_id: int, cfg: LockConfig, conn: RpcConnection) -> None:
        if cfg.protocol is None:
            raise ValueError("GuestLocks needs a lock protocol")
        self.cfg = cfg
        self.protocol: LockProtocol = cfg.protocol
        self.conn = conn
        self.proc = guest_proc(guest_id)
        self.vcpu = owner_name(self.proc, VCPU_TASK)
        self.vmem = OwnerLock(LockClass.L_VMEM, self.proc, self._report)
        self.counters = GuestLockCounters()
        self.kernel: Any = None          # for the virtual clock; set by attach()
        self._holds_hostmem = False      # ordered: the vCPU holds the host's L_hostmem

    def attach(self, kernel: Any) -> None:
        self.kernel = kernel

    def vt_us(self) -> float:
        return float(self.kernel.vt_us) if self.kernel is not None else 0.0

    def mm_lock(self, site: str = "vcpu") -> "VmemLock":
        return VmemLock(self, site)

    def _report(self, t: LockTransition) -> None:
        if t.owner == self.vcpu and t.op.value == "wait":
            self.counters.vmem_waits += 1
        if self.conn.is_closing:
            return   # the host is gone or going: nobody to tell
        self.counters.lock_events_sent += 1
        self.conn.notify(LockEvent(t.op.value, t.lock.label, t.owner, t.task, t.site, t.vt_us))

    # --- the vCPU's L_vmem ------------------------------------------------------------

    async def vcpu_acquire(self, site: str) -> None:
        first = not self.vmem.held_by(self.vcpu)
        if first and self.protocol is LockProtocol.ORDERED:
            await self._hostmem_call(LockAcquire(LockClass.L_HOSTMEM.label, self.vcpu, site, self.vt_us()))
            self._holds_hostmem = True
            self.counters.hostmem_acquisitions += 1
        try:
            granted = await self.vmem.acquire(self.vcpu, site=site, vt_us=self.vt_us())
        except BaseException:
            if first and self._holds_hostmem:
                await self._give_back_hostmem(site)
            raise
        self._advance(granted)

    def _advance(self, vt_us: float) -> None:
        """A wait for a lock held across virtual time stalls the vCPU in virtual time."""
        if self.kernel is not None and vt_us > self.kernel.vt_us:
            self.kernel.vt_us = float(vt_us)

    async def vcpu_release(self, site: str) -> None:
        if self.vmem.held_by(self.vcpu):
            self.vmem.release(self.vcpu, site=site, vt_us=self.vt_us())
        if self._holds_hostmem and not self.vmem.held_by(self.vcpu):
            await self._give_back_hostmem(site)

    async def _give_back_hostmem(self, site: str) -> None:
        self._holds_hostmem = False
        try:
            await self._hostmem_call(LockRelease(LockClass.L_HOSTMEM.label, self.vcpu, site, self.vt_us()))
        except PeerClosed:
            pass   # the host is gone, and its lock with it
        except RemoteError as exc:
            if exc.code != ErrorCode.INVALID_STATE:
                raise
            self.counters.hostmem_revoked += 1   # the host took it back (we were unresponsive)

    async def _hostmem_call(self, msg: LockAcquire | LockRelease) -> None:
        # An acquisition waits as long as the lock is held (no RPC timeout): a lock wait, not a lost host.
        reply = await self.conn.call(msg, timeout_s=0 if isinstance(msg, LockAcquire) else None)
        assert isinstance(reply, LockReply)
        self._advance(reply.done_vt_us)   # the hypercall's cost, and any wait behind another holder

    @asynccontextmanager
    async def dropped(self, site: str) -> AsyncIterator[None]:
        """The vCPU lets go of every level of L_vmem for the body (no-op if it holds none)."""
        async with self.vmem.suspended(self.vcpu, site=site, vt_us=self.vt_us):
            yield

    @asynccontextmanager
    async def tick_hold(self) -> AsyncIterator[None]:
        """``hold_vmem = "tick"``: the vCPU holds L_vmem across the whole tick."""
        if self.cfg.hold_vmem != "tick":
            yield
            return
        async with self.mm_lock("tick"):
            yield

    # --- the host's requests ----------------------------------------------------------

    async def on_lock_acquire(self, m: LockAcquire) -> LockReply:
        """The host takes our L_vmem for one of its owners (before a shootdown)."""
        self._check(m)
        granted = await self.vmem.acquire(m.owner, task="lock_acquire", site=m.site, vt_us=m.vt_us)
        self.counters.remote_vmem_acquisitions += 1
        return LockReply(granted)

    def on_lock_release(self, m: LockRelease) -> LockReply:
        self._check(m)
        if self.vmem.held_by(m.owner):
            self.vmem.release(m.owner, task="lock_release", site=m.site, vt_us=m.vt_us)
        elif not self.vmem.fail_waiter(m.owner, asyncio.CancelledError(f"{m.owner} gave up")):
            raise LockRequestError(f"{self.vmem.ref}: {m.owner} neither holds nor waits for it")
        return LockReply(m.vt_us)

    def _check(self, m: LockAcquire | LockRelease) -> None:
        if m.lock != LockClass.L_VMEM.label:
            raise LockRequestError(f"a guest has only {LockClass.L_VMEM.label}; the host asked for {m.lock!r}")
        try:
            split_owner(m.owner)
        except ValueError as exc:
            raise LockRequestError(str(exc)) from None

    # --- hypercalls -----------------------------------------------------------------------

    async def call(self, site: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """One hypercall under the protocol: dropped L_vmem if no-callback, retried if a deadlock was broken."""
        drop = self.protocol is LockProtocol.NO_CALLBACK
        for _ in range(MAX_DEADLOCK_RETRIES):
            try:
                if drop and self.vmem.held_by(self.vcpu):
                    self.counters.dropped_for_calls += 1
                    async with self.dropped(site):
                        return await fn(*args)
                return await fn(*args)
            except RemoteError as exc:
                if exc.code != ErrorCode.DEADLOCK_BROKEN:
                    raise
            self.counters.deadlock_retries += 1
            # Let whoever waits for L_vmem (the host's shootdown that closed the cycle) go first.
            async with self.dropped("deadlock_retry"):
                pass
        raise GuestdError(f"{site}: failed with DEADLOCK_BROKEN {MAX_DEADLOCK_RETRIES} times in a row")

    def stats(self) -> dict[str, int]:
        return {f"lock_{k}" if not k.startswith("lock_") else k: v for k, v in asdict(self.counters).items()}


class VmemLock:
    """The kernel's ``mm_lock``: ``async with`` takes L_vmem for the vCPU, under the protocol."""

    def __init__(self, locks: GuestLocks, site: str) -> None:
        self.locks = locks
        self.site = site

    def locked(self) -> bool:
        return self.locks.vmem.holder is not None

    async def __aenter__(self) -> None:
        await self.locks.vcpu_acquire(self.site)

    async def __aexit__(self, *exc: Any) -> None:
        await self.locks.vcpu_release(self.site)


class GuardedHypervisor:
    """``guestd.hypervisor.Hypervisor`` whose calls follow the lock protocol (``GuestLocks.call``)."""

    def __init__(self, inner: Any, locks: GuestLocks) -> None:
        self.inner = inner
        self.locks = locks
        self.backs_all_initially = bool(getattr(inner, "backs_all_initially", False))
        self.accepts_fresh = bool(getattr(inner, "accepts_fresh", False))

    def __getattr__(self, name: str) -> Any:   # e.g. host_balloon_pages
        return getattr(self.inner, name)

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float,
                        fresh: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        if fresh is None or not self.accepts_fresh:
            return await self.locks.call("ept_fault", self.inner.ept_fault, gpfns, vt_us)
        return await self.locks.call("ept_fault", self.inner.ept_fault, gpfns, vt_us, fresh)

    async def balloon_inflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return await self.locks.call("balloon_inflate", self.inner.balloon_inflate, gpfns, vt_us)

    async def balloon_deflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return await self.locks.call("balloon_deflate", self.inner.balloon_deflate, gpfns, vt_us)


class GuardedBlockDevice:
    """``guestd.blockdev.BlockDevice`` whose calls follow the lock protocol."""

    def __init__(self, inner: Any, locks: GuestLocks) -> None:
        self.inner = inner
        self.locks = locks
        self.n_blocks = inner.n_blocks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        return await self.locks.call("disk_read", self.inner.read, blocks, vt_us)

    async def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> float:
        return await self.locks.call("disk_write", self.inner.write, blocks, tokens, vt_us)

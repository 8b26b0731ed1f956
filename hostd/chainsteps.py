"""A read chain's usual steps over one guest's disk, compiled (``hostd/_chain.c``), for ``run_chain``.

``run_chain`` (``hostd.readchain``) serves a chain one step at a time in
Python; a one-block read there runs the disk's allowance, its LRU heap, the
frame pool's grant and books, the device's channels and the counters, about
fifteen functions per read. ``chain_steps`` gives it a ``fast`` that runs the
clock steps and the reads that hit, or that load a fresh cluster (after
dropping the disk's own oldest clean clusters), in one compiled pass over the
same books: the same frames, heap entries, times and counts. It hands back
to Python, before changing anything for it, every step it does not serve
itself: a read that would wait for the disk's queue depth, a miss in a partly
cached cluster, a drop that needs dirty clusters written back, and EPT faults
other than those of several pages none of which has content yet (a cold
tick's usual ones, served as ``HostMemory._ept_fault_first`` serves them,
when ``ept`` says how). ``tests/test_chain_steps.py`` runs chains both ways
side by side.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

from .devices import DeviceProfile
from .errors import InvariantViolation
from .vdisk import _NO_FRAMES, VirtualDisk
from ._chain import serve_reads

__all__ = ["ChainSteps", "chain_steps"]

_STOP, _WAITED = 1, 2


class ChainSteps:
    """``run_chain``'s ``fast`` for one program over one disk; ``faults``: the EPT faults it served."""

    __slots__ = ("vd", "gid", "lane", "svc", "prog", "limit", "gate_us", "ept", "can_fault", "faults")

    def __init__(self, vd: VirtualDisk, prog: list[float], limit: int, gate_us: float, ept: tuple | None,
                 can_fault: Callable[[], bool]) -> None:
        self.vd, self.gid, self.prog, self.limit, self.gate_us = vd, vd.guest_id, prog, limit, gate_us
        self.lane = vd.device.lanes.get(vd.guest_id)
        self.svc = _service(vd)
        self.ept, self.can_fault, self.faults = ept, can_fault, 0

    def __call__(self, k: int, vt: float, reads: int, toks: list[int], times: list[float]
                 ) -> tuple[int, float, int, bool]:
        vd = self.vd
        pool = vd.pool
        ept = self.ept
        try:
            k, vt, reads, status, faults = serve_reads(vd, pool, pool.grant_of(self.gid), self.lane, vd.device,
                                                       self.svc, _NO_FRAMES, self.prog, k, vt, reads, self.limit,
                                                       self.gate_us, toks, times, ept, self.can_fault)
        except RuntimeError as exc:     # books that contradict themselves, as the Python steps would find them
            raise InvariantViolation(f"guest {self.gid}: {exc}") from None
        self.faults += faults
        if status == _WAITED:
            blk = int(self.prog[k + 1])
            raise InvariantViolation(f"guest {self.gid}: chained read of block {blk} waited for room its grant "
                                     f"held ({vd.need_bound_one(blk)} frames)")
        return k, vt, reads, status == _STOP


def chain_steps(vd: VirtualDisk, prog: list[float], limit: int, gate_us: float, ept: tuple | None = None,
                can_fault: Callable[[], bool] = lambda: True) -> ChainSteps | None:
    """``run_chain``'s ``fast`` for ``prog`` over ``vd``; None where every step is Python's (an uncached
    disk). ``ept``: ``(p2m, host counters, guest counters, ept_fault_us, the fault gate or NaN, the guest
    frame kind, the p2m's FRAME state, LATER_TOKEN)`` to serve first touches too (``can_fault()``, asked
    only when a fault is reached, as ``run_chain``'s fault step asks: whether one may be served now);
    None leaves every EPT step to Python."""
    if vd.mode == "none":
        return None
    return ChainSteps(vd, prog, limit, gate_us, ept, can_fault)


def _service(vd: VirtualDisk) -> tuple[float, float, float, float]:
    """The device's service time at full speed of one read of a cluster, sequential and with a seek, then the
    same for the disk's last cluster (shorter when the disk is not a whole number of clusters)."""
    cp = vd.cluster_pages
    return _service_of(vd.device.profile, cp, vd.n_blocks - (-(-vd.n_blocks // cp) - 1) * cp)


@lru_cache(maxsize=64)
def _service_of(prof: DeviceProfile, cp: int, last: int) -> tuple[float, float, float, float]:
    # a disk's profile and shape never change: worked out once, not at every chain
    return (prof.service_us(cp, False, True), prof.service_us(cp, False, False),
            prof.service_us(last, False, True), prof.service_us(last, False, False))

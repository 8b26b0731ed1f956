"""A read chain's usual steps over one guest's disk, compiled (``hostd/_chain.c``), for ``run_chain``.

``run_chain`` (``hostd.readchain``) serves a chain one step at a time in
Python; a one-block read there runs the disk's allowance, its LRU heap, the
frame pool's grant and books, the device's channels and the counters, about
fifteen functions per read. ``chain_steps`` gives it a ``fast`` that runs the
clock steps and the reads that hit, or that load a fresh cluster (after
dropping the disk's own oldest clean clusters), in one compiled pass over the
same books: the same frames, heap entries, times and counts. It hands back
to Python, before changing anything for it, every step it does not serve
itself: EPT faults, a read that would wait for the disk's queue depth, a miss
in a partly cached cluster, a drop that needs dirty clusters written back.
``tests/test_chain_steps.py`` runs chains both ways side by side.
"""
from __future__ import annotations

from functools import lru_cache

from .devices import DeviceProfile
from .errors import InvariantViolation
from .readchain import Fast
from .vdisk import _NO_FRAMES, VirtualDisk
from ._chain import serve_reads

__all__ = ["chain_steps"]

_STOP, _WAITED = 1, 2


def chain_steps(vd: VirtualDisk, prog: list[float], limit: int, gate_us: float) -> Fast | None:
    """``run_chain``'s ``fast`` for ``prog`` over ``vd``; None where every step is Python's (an uncached
    disk)."""
    if vd.mode == "none":
        return None
    gid, pool, device = vd.guest_id, vd.pool, vd.device
    lane = device.lanes.get(gid)
    svc = _service(vd)

    def fast(k: int, vt: float, reads: int, toks: list[int], times: list[float]) -> tuple[int, float, int, bool]:
        try:
            k, vt, reads, status = serve_reads(vd, pool, pool.grant_of(gid), lane, device, svc, _NO_FRAMES, prog,
                                               k, vt, reads, limit, gate_us, toks, times)
        except RuntimeError as exc:     # books that contradict themselves, as the Python steps would find them
            raise InvariantViolation(f"guest {gid}: {exc}") from None
        if status == _WAITED:
            blk = int(prog[k + 1])
            raise InvariantViolation(f"guest {gid}: chained read of block {blk} waited for room its grant held "
                                     f"({vd.need_bound_one(blk)} frames)")
        return k, vt, reads, status == _STOP

    return fast


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

"""The guest's view of the host: EPT faults and balloon hypercalls.

``NullHypervisor`` is a machine with no overcommitment: every gpfn is
backed from the start and hypercalls are free. ``LocalHypervisor`` is a
small in-process host for tests and teaching: it takes a guest frame's
token when it "swaps the frame out" (through the kernel's ``invalidate``,
the TLB shootdown) and gives it back on the EPT fault, so a run proves that
host swapping lost nothing. #4 replaces both with the real host over the socket.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from balloonlab.proto.costs import CostModel
from balloonlab.proto.tokens import KEEP_TOKEN

if TYPE_CHECKING:
    from .memory import Frames

__all__ = ["Hypervisor", "NullHypervisor", "LocalHypervisor", "SwappableKernel"]


class SwappableKernel(Protocol):
    """What ``LocalHypervisor`` asks of a guest kernel (``GuestKernel`` has it): its frames, and the two
    shootdowns a host sends (take a frame's page away, or make it copy-on-write)."""

    frames: "Frames"

    def invalidate(self, gpfns: np.ndarray) -> np.ndarray: ...

    def share_protect(self, gpfns: np.ndarray) -> int: ...


@runtime_checkable
class Hypervisor(Protocol):
    async def ept_fault(self, gpfns: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        """Back ``gpfns``; returns their tokens (0 = fresh frame) and the virtual completion time.

        A hypervisor with ``accepts_fresh = True`` also takes ``fresh=`` (a bool
        per gpfn: the guest overwrites that page entirely, so its old content
        need not come back; ``EptFault.fresh`` on the wire).
        """
        ...

    async def balloon_inflate(self, gpfns: np.ndarray, vt_us: float) -> float: ...

    async def balloon_deflate(self, gpfns: np.ndarray, vt_us: float) -> float: ...


class NullHypervisor:
    """No host pressure: everything backed from the start, balloon calls cost nothing."""

    backs_all_initially = True

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        return np.zeros(len(gpfns), np.uint64), vt_us

    async def balloon_inflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return vt_us

    async def balloon_deflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return vt_us


class LocalHypervisor:
    """A toy host that swaps guest frames out and back in, keeping their tokens.

    ``swap_out(kernel, gpfns)`` is the host reclaiming frames: it calls
    ``kernel.invalidate`` and keeps the returned tokens. An EPT fault returns
    the kept token (0 for a frame never swapped) and costs ``ept_fault_us``
    plus ``swap_in_us`` per page that was swapped, unless the guest marked
    it fresh (it will overwrite it): then its kept content is dropped, no
    swap-in, token 0 (``fresh_pages`` counts them).

    ``share(kernel, gpfns)`` is the host merging those frames with others'
    (page sharing): the guest write-protects them, and an EPT fault on one
    is the copy-on-write break: ``KEEP_TOKEN`` (the content stands) for
    ``ept_fault_us`` plus ``page_copy_us`` unless fresh (``cow_breaks``).
    """

    backs_all_initially = True
    accepts_fresh = True

    def __init__(self, n_frames: int, costs: CostModel | None = None, swap_in_us: float = 100.0) -> None:
        self.costs = costs or CostModel()
        self.swap_in_us = swap_in_us
        self.kept = np.zeros(n_frames, np.uint64)
        self.swapped = np.zeros(n_frames, bool)
        self.shared = np.zeros(n_frames, bool)
        self.cow_breaks = 0
        self.ept_faults = 0
        self.fresh_pages = 0
        self.inflated = 0
        self.deflated = 0
        self.reported = 0

    def swap_out(self, kernel: SwappableKernel, gpfns: np.ndarray) -> None:
        g = np.asarray(gpfns, dtype=np.int64)
        g = g[kernel.frames.backed[g]]
        self.kept[g] = kernel.invalidate(g)
        self.swapped[g] = True
        self.shared[g] = False          # a real host never swaps a shared frame; this one unshares first

    def share(self, kernel: SwappableKernel, gpfns: np.ndarray) -> None:
        g = np.asarray(gpfns, dtype=np.int64)
        g = g[kernel.frames.backed[g]]
        kernel.share_protect(g)
        self.shared[g] = True

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float,
                        fresh: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        g = np.asarray(gpfns, dtype=np.int64)
        self.ept_faults += g.size
        cow = self.shared[g]
        copies = 0
        if cow.any():
            self.cow_breaks += int(cow.sum())
            copies = int(np.count_nonzero(cow & ~np.asarray(fresh, bool))) if fresh is not None else int(cow.sum())
            self.shared[g] = False
        if fresh is not None:
            f = g[np.asarray(fresh, bool)]
            self.fresh_pages += int(f.size)
            self.swapped[f] = False
            self.kept[f] = 0
        tokens = np.where(self.swapped[g], self.kept[g], np.uint64(0)).astype(np.uint64)
        tokens[cow] = np.uint64(KEEP_TOKEN)
        n_swapped = int(self.swapped[g].sum())
        self.swapped[g] = False
        self.kept[g] = 0
        return tokens, vt_us + self.costs.ept_fault_us + n_swapped * self.swap_in_us + copies * self.costs.page_copy_us

    async def balloon_inflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        g = np.asarray(gpfns, dtype=np.int64)
        self.inflated += g.size
        self.swapped[g] = False     # the host drops whatever it kept for these frames
        self.kept[g] = 0
        self.shared[g] = False
        return vt_us + self.costs.hypercall_us

    async def balloon_deflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        self.deflated += len(gpfns)
        return vt_us + self.costs.hypercall_us

    async def report_free(self, gpfns: np.ndarray, vt_us: float) -> float:
        """Free page reporting: drop whatever is kept for these frames (a later fault gives token 0)."""
        g = np.asarray(gpfns, dtype=np.int64)
        self.reported += g.size
        self.swapped[g] = False
        self.kept[g] = 0
        return vt_us + self.costs.hypercall_us

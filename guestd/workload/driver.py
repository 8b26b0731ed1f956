"""Drive a kernel with a workload: the minimal vCPU loop used by tests, benches and teaching."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .generators import Workload

if TYPE_CHECKING:
    from ..kernel import GuestKernel

__all__ = ["run_workload"]


async def run_workload(kernel: "GuestKernel", workload: Workload, refs: int, batch_pages: int = 4096) -> int:
    """Feed up to ``refs`` references in batches; returns how many were run (fewer if it ran dry)."""
    done = 0
    while done < refs and not workload.exhausted:
        pages, writes = workload.next_batch(min(batch_pages, refs - done))
        if pages.size == 0:
            break
        await kernel.access(pages, writes)
        done += pages.size
    return done

"""Replay a recorded trace through a replacement policy and count faults.

    python -m balloonlab.guestd.replay --policy NAME --frames N TRACE [--json] [--engine auto|fast|kernel]

TRACE is a file (``.npz`` with ``page``/``write`` arrays, or text: page
numbers one per line or comma-separated, ``W`` suffix or a second column
for writes; see ``guestd.workload.trace``) or ``-`` for standard input.
All frames start free; every page is treated as anonymous, so
``file-first`` behaves as ``clock`` here. A write-back is the eviction of a
page written since it was loaded.

``--json`` prints one object:
``{"policy": ..., "frames": ..., "refs": ..., "faults": ..., "writebacks": ...}``.

Engines: ``kernel`` runs the guest kernel itself (``guestd.kernel`` with
the policy module: the definition); ``fast`` runs ``guestd.fastsim``
(proven equal by the tests, for fifo/lru/opt/clock/clock-r0/esc); ``auto``
takes ``fast`` when it exists for the policy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Sequence

import numpy as np

from balloonlab.proto.costs import CostModel

from .blockdev import LocalBlockDevice
from .errors import GuestConfigError, GuestdError, UnknownPolicy
from .fastsim import FAST_POLICIES, SimResult, dense_page_ids, simulate_fast
from .hypervisor import NullHypervisor
from .kernel import GuestKernel
from .kernel_config import KernelConfig
from .replacement import POLICIES
from .workload.layout import Layout
from .workload.trace import read_trace

__all__ = ["replay", "replay_kernel", "main"]

ENGINES = ("auto", "fast", "kernel")


async def _run_kernel(kernel: GuestKernel, pages: np.ndarray, writes: np.ndarray, batch: int) -> None:
    for i in range(0, pages.shape[0], batch):
        await kernel.access(pages[i:i + batch], writes[i:i + batch])


def replay_kernel(policy: str, frames: int, pages: np.ndarray, writes: np.ndarray | None = None,
                  params: dict[str, Any] | None = None, batch: int = 4096, engine: str | None = None) -> SimResult:
    """Run the trace through ``GuestKernel`` with policy ``policy`` (the definition).

    ``engine``: the kernel's paging engine (``compiled`` or ``reference``; None: its default).
    """
    if policy not in POLICIES:
        raise UnknownPolicy(policy, POLICIES)
    if frames < 1:
        raise GuestConfigError(f"frames must be >= 1, got {frames}")
    pages = np.asarray(pages)
    n = pages.shape[0]
    w = np.zeros(n, bool) if writes is None else np.asarray(writes, bool)
    if n == 0:
        return SimResult(policy, frames, 0, 0, 0)
    dense = dense_page_ids(pages).astype(np.uint64)
    n_pages = int(dense.max()) + 1
    params = dict(params or {})
    if policy == "opt":
        params["future"] = dense
    cfg = KernelConfig(ram_pages=frames, layout=Layout.single_anon(n_pages), policy=policy,
                       policy_params=params, ws_sample_pages=0)
    kernel = GuestKernel(cfg, np.random.default_rng(0), LocalBlockDevice(cfg.disk_blocks), NullHypervisor(),
                         CostModel(), engine=engine)
    asyncio.run(_run_kernel(kernel, dense, w, batch))
    c = kernel.counters
    if c.lost_pages:
        raise GuestdError(f"replay lost {c.lost_pages} page(s): a bug in the kernel")
    return SimResult(policy, frames, c.refs, c.major_faults + c.minor_faults, c.writebacks)


def replay(policy: str, frames: int, pages: np.ndarray, writes: np.ndarray | None = None,
           engine: str = "auto") -> SimResult:
    if engine not in ENGINES:
        raise GuestConfigError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if policy not in POLICIES:
        raise UnknownPolicy(policy, POLICIES)
    if engine == "fast" or (engine == "auto" and policy in FAST_POLICIES):
        return simulate_fast(policy, frames, pages, writes)
    return replay_kernel(policy, frames, pages, writes)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m balloonlab.guestd.replay",
                                 description="Run a memory trace through a page replacement policy.")
    ap.add_argument("--policy", required=True, help=f"one of: {', '.join(sorted(POLICIES))}")
    ap.add_argument("--frames", required=True, type=int, help="number of page frames (all start free)")
    ap.add_argument("trace", help="trace file (.npz or text), or - for standard input")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--engine", choices=ENGINES, default="auto",
                    help="kernel = the guest kernel itself; fast = offline simulator; auto = fast if available")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.policy not in POLICIES:
            raise UnknownPolicy(args.policy, POLICIES)
        if args.frames < 1:
            raise GuestConfigError(f"--frames must be >= 1, got {args.frames}")
        pages, writes = read_trace(args.trace)
        r = replay(args.policy, args.frames, pages, writes, engine=args.engine)
    except GuestdError as e:
        print(f"guestd.replay: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"policy": r.policy, "frames": r.frames, "refs": r.refs,
                          "faults": r.faults, "writebacks": r.writebacks}))
    else:
        ratio = r.faults / r.refs if r.refs else 0.0
        print(f"policy       {r.policy}\n"
              f"frames       {r.frames}\n"
              f"references   {r.refs}\n"
              f"faults       {r.faults}\n"
              f"hits         {r.hits}\n"
              f"write-backs  {r.writebacks}\n"
              f"fault ratio  {ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

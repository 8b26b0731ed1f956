"""Read chains: the file reads a guest's paging core knows will follow a read, served with it.

A guest's page-cache misses are one-block ``DiskRead``s, each a round trip
the vCPU waits for. When the paging core hands a read back, it can tell
what the batch will do once the read is done as far as that does not depend
on when it is done: hits, zero-filled first touches and further file reads
into free frames that are backed (``guestd/_paging.c``, "read chains"). It
cannot tell *when* each further read starts, since that adds up the
completions the host is about to compute; and the clock decides where the
batch stops (the gate, a background point). So the guest sends, with the
read, a program of the clock steps and checks its core makes, in order, as
the same double operations; here the host runs it from the first read's
completion, serves each further read at the clock the core would send it
at, and stops at the first check that fails. What it serves is exactly what
the guest would have asked for one round trip at a time, at the same
virtual times; the guest replays its batch with the answers and checks each
read's block and start against its own clock.

The host stops early, never late: at the tick's end (``fault_gate_us``),
after ``limit`` reads, before a read that could have to wait for room (a
miss whose cluster the guest's grant may not hold: waiting could mean a
shootdown of this guest, which must find it where the read it waits for
left it), and on anything it does not understand. Stopping early only
means the guest sends the next read itself. Only the deterministic order
offers chains (``read_chain`` in Welcome's config): there a guest's reads
touch only its own partition, so serving them back to back, before other
guests' requests, changes nothing another guest sees.

Program: float64 ``[deadline, mem_ref_us]`` then ``(op, value)`` pairs:
``WIN k`` (a run of ``k`` hits: stop if ``vt + (k - 1) * mem_ref_us >=
deadline``, else ``vt += k * mem_ref_us``), ``CHECK`` (stop if ``vt >=
deadline``), ``ADD x`` (``vt += x``), ``READ block`` (read it at ``vt``;
then ``vt = max(vt, done)``).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import BadBatch

__all__ = ["check_program", "run_chain", "WIN", "CHECK", "ADD", "READ", "MAX_PAIRS"]

WIN, CHECK, ADD, READ = 0, 1, 2, 3
# (op, value) pairs a program may hold (guestd/_paging.c's RC_MAX_PAIRS): the host's work per request is
# bounded by it, not by the frame size
MAX_PAIRS = 4096
_OPS = frozenset((0.0, 1.0, 2.0, 3.0))
_F64 = np.dtype("<f8")


def check_program(guest_id: int, chain: bytes) -> list[float]:
    """The program as a list, or ``BadBatch`` before anything is served (a refused request changes nothing).

    In plain Python over the list: a program is a few dozen numbers, where
    numpy's calls would cost more than the read they come with.
    """
    if len(chain) % 16 or not 32 <= len(chain) <= 16 * (MAX_PAIRS + 1):
        raise BadBatch(f"guest {guest_id}: DiskRead.chain has {len(chain)} bytes; want [deadline, mem_ref_us] "
                       f"and 1 to {MAX_PAIRS} (op, value) pairs of float64")
    prog = np.frombuffer(chain, _F64).tolist()
    ops, values = prog[2::2], prog[3::2]
    if not _OPS.issuperset(ops):
        raise BadBatch(f"guest {guest_id}: DiskRead.chain has an unknown op {next(o for o in ops if o not in _OPS)!r}")
    total = math.fsum(values) + prog[1]     # NaN or inf anywhere makes it NaN or inf
    if not (math.isfinite(total) and min(values) >= 0 and prog[1] >= 0 and prog[0] == prog[0]):
        raise BadBatch(f"guest {guest_id}: DiskRead.chain has a value that is not a finite number >= 0")
    return prog


def run_chain(prog: list[float], vt_us: float, token0: int, done0: float, limit: int, gate_us: float,
              read: Callable[[int, float], tuple[int, float] | None]) -> tuple[list[int], list[float]]:
    """Run the program (``check_program``'s list) from the first read's completion: the tokens of every
    read served, the first's included, and [done0, start, done, start, done, ...]. ``read(block, vt)``
    serves one read, or says None: not now (the chain stops there)."""
    deadline, ref_us = prog[0], prog[1]
    vt = vt_us if vt_us > done0 else done0      # the core's max(vt, done)
    toks = [token0]
    times = [done0]
    for k in range(2, len(prog), 2):
        op, x = prog[k], prog[k + 1]
        if op == WIN:
            if vt + (x - 1.0) * ref_us >= deadline:
                break
            vt += x * ref_us
        elif op == CHECK:
            if vt >= deadline:
                break
        elif op == ADD:
            vt += x
        else:
            blk = int(x)
            if len(toks) > limit or vt >= gate_us or blk != x:
                break
            got = read(blk, vt)
            if got is None:
                break
            token, done = got
            toks.append(token)
            times += (vt, done)
            if done > vt:
                vt = done
    return toks, times

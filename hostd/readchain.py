"""Read chains: the file reads a guest's paging core knows will follow a read, served with it.

A guest's page-cache misses are one-block ``DiskRead``s, each a round trip
the vCPU waits for. When the paging core hands a read back, it can tell
what the batch will do once the read is done as far as that does not depend
on when it is done: hits, zero-filled first touches, further file reads
into free frames that are backed or into frames a clean page's eviction
frees (the policy picks it whatever the clock says), and the EPT fault that
backs a group of free frames holding no page (``guestd/_paging.c``, "read
chains"). It
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

The host stops early, never late: at the tick's end (``chain_gate_us``),
after ``limit`` reads, before a read or fault that could have to wait (for
room, or for a shootdown of this guest to settle: a wait could mean a
shootdown, which must find the guest where the request it waits for left
it), after a fault the gate cut short, and on anything it does not
understand. Stopping early only
means the guest sends the next read itself. Only the deterministic order
offers chains (``read_chain`` in Welcome's config): there a guest's reads
touch only its own partition, so serving them back to back, before other
guests' requests, changes nothing another guest sees.

Program: float64 ``[deadline, mem_ref_us]`` then ``(op, value)`` pairs:
``WIN k`` (a run of ``k`` hits: stop if ``vt + (k - 1) * mem_ref_us >=
deadline``, else ``vt += k * mem_ref_us``), ``CHECK`` (stop if ``vt >=
deadline``), ``ADD x`` (``vt += x``), ``READ block`` (read it at ``vt``;
then ``vt = max(vt, done)``), ``EPT_PAGE gpfn`` (one page of the next
fault) and ``EPT n`` (fault the ``n`` pages just named, all fresh, at
``vt``; then ``vt = max(vt, done)``).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import BadBatch

try:
    from ._chain import check_program as _checked
except ImportError:   # pragma: no cover - the install builds it
    _checked = None

__all__ = ["check_program", "run_chain", "WIN", "CHECK", "ADD", "READ", "EPT", "EPT_PAGE", "MAX_PAIRS"]

WIN, CHECK, ADD, READ, EPT, EPT_PAGE = 0, 1, 2, 3, 4, 5
# (op, value) pairs a program may hold (guestd/_paging.c's RC_MAX_PAIRS): the host's work per request is
# bounded by it, not by the frame size
MAX_PAIRS = 4096
_OPS = frozenset((0.0, 1.0, 2.0, 3.0, 4.0, 5.0))
_F64 = np.dtype("<f8")


def check_program(guest_id: int, chain: bytes) -> list[float]:
    """The program as a list, or ``BadBatch`` before anything is served (a refused request changes nothing).

    The compiled check (``hostd/_chain.c``) takes the programs this accepts
    in one pass (a cold tick's programs run to hundreds of pairs, every
    guest's at every tick); anything it leaves (a refusal to word, a sum
    near a float's edge) comes here, plain Python over the list.
    """
    if _checked is not None:
        prog = _checked(chain, MAX_PAIRS)
        if prog is not None:
            return prog
    return _check_program(guest_id, chain)


def _check_program(guest_id: int, chain: bytes) -> list[float]:
    """``check_program`` in Python: the definition the compiled check must agree with."""
    if len(chain) % 16 or not 32 <= len(chain) <= 16 * (MAX_PAIRS + 1):
        raise BadBatch(f"guest {guest_id}: DiskRead.chain has {len(chain)} bytes; want [deadline, mem_ref_us] "
                       f"and 1 to {MAX_PAIRS} (op, value) pairs of float64")
    prog = np.frombuffer(chain, _F64).tolist()
    ops, values = prog[2::2], prog[3::2]
    if not _OPS.issuperset(ops):
        raise BadBatch(f"guest {guest_id}: DiskRead.chain has an unknown op {next(o for o in ops if o not in _OPS)!r}")
    try:
        total = math.fsum(values) + prog[1]     # NaN or inf anywhere makes it NaN or inf
    except OverflowError:                       # finite values whose sum is not
        total = math.inf
    if not (math.isfinite(total) and min(values) >= 0 and prog[1] >= 0 and prog[0] == prog[0]):
        raise BadBatch(f"guest {guest_id}: DiskRead.chain has a value that is not a finite number >= 0")
    if EPT in ops or EPT_PAGE in ops:
        pages = 0
        for op, x in zip(ops, values):
            if op == EPT_PAGE:
                if x != int(x):
                    raise BadBatch(f"guest {guest_id}: DiskRead.chain has an EPT_PAGE of gpfn {x!r}")
                pages += 1
            elif op == EPT:
                if x != pages or not pages:
                    raise BadBatch(f"guest {guest_id}: DiskRead.chain has an EPT of {x!r} pages "
                                   f"after {pages} EPT_PAGEs")
                pages = 0
            elif pages:
                raise BadBatch(f"guest {guest_id}: DiskRead.chain has EPT_PAGEs without their EPT")
        if pages:
            raise BadBatch(f"guest {guest_id}: DiskRead.chain ends in EPT_PAGEs without their EPT")
    return prog


# ``fast(k, vt, reads, toks, times) -> (k, vt, reads, stopped)``: the steps from ``k`` it can serve itself
Fast = Callable[[int, float, int, list[int], list[float]], tuple[int, float, int, bool]]


def run_chain(prog: list[float], vt_us: float, token0: int | None, done0: float | None, limit: int,
              gate_us: float, read: Callable[[int, float], tuple[int, float] | None],
              fault: Callable[[list[int], float], tuple[list[int], float, bool] | None] | None = None,
              fast: Fast | None = None) -> tuple[list[int], list[float]]:
    """Run the program (``check_program``'s list) from the first read's completion.

    Returns the tokens of every request served (the first read's, one per
    read, ``n`` per fault) and ``[done0, start, done, start, done, ...]``,
    one pair per request after the first. ``read(block, vt)`` serves one
    read and ``fault(gpfns, vt)`` one fault (its tokens, completion, and
    whether it was cut short at the gate), or either says None: not now (the
    chain stops there, before it).

    With ``token0`` None the program is a batch's from its first reference
    at ``vt_us`` (``TickDone.ahead``): nothing is served before it, and the
    times are one pair per request served.

    ``fast`` (the host's compiled steps, ``hostd/_chain.c``) serves the
    steps it can from a step on, exactly as the loop below would, and hands
    back the first it cannot (an EPT fault, a read that might wait); the loop
    serves that one and calls it again.
    """
    deadline, ref_us = prog[0], prog[1]
    if token0 is None or done0 is None:
        vt = vt_us
        toks: list[int] = []
        times: list[float] = []
    else:
        vt = vt_us if vt_us > done0 else done0      # the core's max(vt, done)
        toks = [token0]
        times = [done0]
    reads = 0
    pages: list[int] = []
    k, n = 2, len(prog)
    while k < n:
        if fast is not None and not pages:
            k, vt, reads, stopped = fast(k, vt, reads, toks, times)
            if stopped or k >= n:
                break
        op, x = prog[k], prog[k + 1]
        k += 2
        if op == WIN:
            if vt + (x - 1.0) * ref_us >= deadline:
                break
            vt += x * ref_us
        elif op == CHECK:
            if vt >= deadline:
                break
        elif op == ADD:
            vt += x
        elif op == READ:
            blk = int(x)
            if reads >= limit or vt >= gate_us or blk != x:
                break
            got = read(blk, vt)
            if got is None:
                break
            token, done = got
            reads += 1
            toks.append(token)
            times += (vt, done)
            if done > vt:
                vt = done
        elif op == EPT_PAGE:
            pages.append(int(x))
        else:
            if fault is None or vt >= gate_us:
                break
            answer = fault(pages, vt)
            if answer is None:
                break
            tokens, done, cut = answer
            toks += tokens
            times += (vt, done)
            if cut:     # pages left unbacked: the core goes another way from here
                break
            if done > vt:
                vt = done
            pages = []
    return toks, times

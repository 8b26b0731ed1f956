"""The disk handlers answer a request that need not wait at once, with no coroutine; the rest as before.

Two host memories get the same seeded one-block reads and writes under
cache and memory pressure (drops, host swapping). One is
asked through the handlers the host installs (``memory_requests``): a
reply comes back as it is, or as a coroutine when the request must wait
for room. The other is asked through ``vdisk_read``/``vdisk_write``,
awaited. Every reply and the books must be the same, and both kinds of
answer must have happened.
"""
from __future__ import annotations

import types
from typing import Any

import numpy as np

from balloonlab.hostd.handlers import memory_requests
from balloonlab.hostd.memory import HostMemory
from balloonlab.proto.messages import DiskRead, DiskReadReply, DiskWrite, DiskWriteReply, MsgType

from .test_host_one_page import BLOCKS, GUESTS, PAGES, World


def _host() -> World:
    return World(False, 1)


async def _answer(result: Any) -> tuple[Any, bool]:
    """(the reply, whether it came at once)."""
    if type(result) is types.CoroutineType:
        return await result, False
    return result, True


async def test_disk_handlers_answer_at_once_when_nothing_waits_and_agree_with_host_memory() -> None:
    by_handler, by_memory = _host(), _host()
    handlers = {g: memory_requests(g, by_handler.hm, None, 1.0) for g in range(GUESTS)}   # type: ignore[arg-type]
    rng = np.random.default_rng(7)
    vt_us = 0.0
    at_once = later = 0
    for _ in range(800):
        gid = int(rng.integers(0, GUESTS))
        vt_us += float(rng.integers(0, 200))
        if rng.random() < 0.2:   # the guest's own faults take frames: disk requests must make room
            gpfns = rng.choice(PAGES, 2, replace=False).astype(np.uint64)
            for w in (by_handler, by_memory):
                await w.hm.ept_fault(gid, gpfns, vt_us)
            continue
        block = np.array([rng.integers(0, BLOCKS)], np.uint64)
        if rng.random() < 0.6:
            reply, now = await _answer(handlers[gid][MsgType.DISK_READ](DiskRead(block, vt_us)))
            assert type(reply) is DiskReadReply
            tokens, done = await by_memory.hm.vdisk_read(gid, block, vt_us)
            assert (reply.tokens.tolist(), reply.done_vt_us) == (tokens.tolist(), done)
        else:
            token = np.array([rng.integers(1, 2**62)], np.uint64)
            reply, now = await _answer(handlers[gid][MsgType.DISK_WRITE](DiskWrite(block, token, vt_us)))
            assert type(reply) is DiskWriteReply
            assert reply.done_vt_us == await by_memory.hm.vdisk_write(gid, block, token, vt_us)
        at_once += now
        later += not now
    assert by_handler.books() == by_memory.books()
    assert at_once > 100 and later > 0, (at_once, later)
    assert by_handler.hm.counters.swap_out_pages > 0   # under pressure: room was made by host swapping
    by_handler.hm.check_invariant()


async def test_a_request_the_handler_cannot_take_fails_as_it_did() -> None:
    hm: HostMemory = _host().hm
    read = memory_requests(0, hm, None, 1.0)[MsgType.DISK_READ]   # type: ignore[arg-type]
    try:
        read(DiskRead(np.array([BLOCKS], np.uint64), 0.0))
    except Exception as exc:   # raised at once, as the coroutine raised it at its first step
        assert "out of range" in str(exc)
    else:
        raise AssertionError("a block out of range was read")

"""The guest's block device and hypervisor, served by the host over the socket.

These replace the in-process ``LocalBlockDevice`` and ``NullHypervisor``
when the guest runs under ``hostd``: every call is one RPC carrying page
numbers as ``bin`` of little-endian u64, and the reply says when (in virtual
time) the operation completed.
"""
from __future__ import annotations

import numpy as np

from balloonlab.proto.messages import (BalloonDeflate, BalloonInflate, BalloonReply, DiskRead, DiskReadReply, DiskWrite,
                            DiskWriteReply, EptFault, EptFaultReply, MAX_PAGES_PER_MESSAGE)
from balloonlab.proto.rpc import RpcConnection

__all__ = ["RemoteBlockDevice", "RemoteHypervisor"]


def _u64(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<u8")


class RemoteBlockDevice:
    """The guest's virtual disk, served by the host through host memory."""

    def __init__(self, conn: RpcConnection, n_blocks: int) -> None:
        self.conn = conn
        self.n_blocks = n_blocks

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        blocks = _u64(blocks)
        if blocks.size <= MAX_PAGES_PER_MESSAGE:
            reply = await self.conn.call(DiskRead(blocks, float(vt_us)))
            assert isinstance(reply, DiskReadReply)
            return reply.tokens, reply.done_vt_us
        # One vCPU issues the parts one after another: each starts when the last is done,
        # so no request of ours is ever earlier than the reply before it (hostd.discipline.virtual_time).
        parts, done = [], float(vt_us)
        for i in range(0, blocks.size, MAX_PAGES_PER_MESSAGE):
            tokens, done = await self.read(blocks[i:i + MAX_PAGES_PER_MESSAGE], done)
            parts.append(tokens)
        return np.concatenate(parts), done

    async def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> float:
        blocks, tokens = _u64(blocks), _u64(tokens)
        done = float(vt_us)
        for i in range(0, blocks.size, MAX_PAGES_PER_MESSAGE // 2):
            j = i + MAX_PAGES_PER_MESSAGE // 2
            reply = await self.conn.call(DiskWrite(blocks[i:j], tokens[i:j], done))   # in sequence, as read
            assert isinstance(reply, DiskWriteReply)
            done = max(done, reply.done_vt_us)
        return done


class RemoteHypervisor:
    """EPT faults and balloon hand-over as hypercalls to the host."""

    backs_all_initially = False  # the host backs gpfns lazily, on EPT faults

    def __init__(self, conn: RpcConnection) -> None:
        self.conn = conn
        self.host_balloon_pages = 0  # the host's count, from the last balloon reply

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        reply = await self.conn.call(EptFault(_u64(gpfns), float(vt_us)))
        assert isinstance(reply, EptFaultReply)
        return reply.tokens, reply.done_vt_us

    async def balloon_inflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return await self._balloon(BalloonInflate, gpfns, vt_us)

    async def balloon_deflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return await self._balloon(BalloonDeflate, gpfns, vt_us)

    async def _balloon(self, cls: type, gpfns: np.ndarray, vt_us: float) -> float:
        gpfns = _u64(gpfns)
        done = float(vt_us)
        for i in range(0, gpfns.size, MAX_PAGES_PER_MESSAGE):
            reply = await self.conn.call(cls(gpfns[i:i + MAX_PAGES_PER_MESSAGE], done))   # in sequence, as read
            assert isinstance(reply, BalloonReply)
            self.host_balloon_pages = reply.balloon_pages
            done = max(done, reply.done_vt_us)
        return done

"""The guest's block device and hypervisor, served by the host over the socket.

These replace the in-process ``LocalBlockDevice`` and ``NullHypervisor``
when the guest runs under ``hostd``: every call is one RPC carrying page
numbers as ``bin`` of little-endian u64, and the reply says when (in virtual
time) the operation completed.

Every request passes the vCPU's gate first (``guestd.gate``): one whose
virtual time is at or past the end of the current tick waits there for the
next ``TickStart``, so the kernel above never needs to know about ticks.
The time between a paging request's virtual time and its completion is
the vCPU's memory stall, recorded in its PSI meter (``guestd.psi``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from balloonlab.proto.messages import (BalloonDeflate, BalloonInflate, BalloonReply, DiskRead, DiskReadReply, DiskWrite,
                            DiskWriteReply, EptFault, EptFaultReply, FreeReport, FreeReportReply,
                            MAX_PAGES_PER_MESSAGE)
from balloonlab.proto.errors import ProtoError
from balloonlab.proto.rpc import RpcConnection

from .gate import VcpuGate
from .psi import PsiMeter

__all__ = ["RemoteBlockDevice", "RemoteHypervisor", "VcpuLink", "BALLOON_PFNS_PER_CALL", "chain_mismatch"]

# virtio-balloon moves at most VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256 PFNs per request
# (drivers/virtio/virtio_balloon.c), each a hypercall the vCPU waits for.
BALLOON_PFNS_PER_CALL = 256


_U64 = np.dtype("<u8")   # a dtype object: a string would be parsed on every request


def _u64(x: np.ndarray) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype is _U64 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, dtype=_U64)


class VcpuLink:
    """One vCPU's way to the host: every request is admitted by the gate; paging waits are PSI stalls."""

    def __init__(self, conn: RpcConnection, gate: VcpuGate | None = None, psi: PsiMeter | None = None,
                 *, gate_requests: bool = True) -> None:
        self.conn = conn
        self.gate = gate if gate is not None else VcpuGate()
        # False under the lock model: a request parked at the gate would hold L_vmem across the
        # tick boundary, where the host's shootdowns need it (a deadlock the model does not describe)
        self.gate_requests = gate_requests
        self.psi = psi if psi is not None else PsiMeter()
        self.last_done_us = 0.0        # completion of the latest request (the one in flight at a gate)

    async def call(self, msg: Any, vt_us: float, *, stall: bool, extra_us: float = 0.0) -> Any:
        """Send ``msg`` (whose virtual time is ``vt_us``) once the gate admits it; the reply.

        ``extra_us``: what the vCPU spends on this request after the reply (per-page balloon work).
        """
        # The gate's test first: a request inside the open tick (nearly all) goes on without a
        # coroutine for admit.
        if self.gate_requests and not self.gate.is_open(vt_us):
            await self.gate.admit(vt_us)
        reply = await self.conn.call(msg)
        done = float(reply.done_vt_us)
        self.last_done_us = (vt_us if vt_us > done else done) + extra_us
        if stall:
            self.psi.stall(vt_us, done)
        return reply

    def took(self, vt_us: float, done_us: float) -> None:
        """A paging request at ``vt_us`` done at ``done_us`` whose answer came with another's (a read chain)."""
        self.last_done_us = vt_us if vt_us > done_us else done_us
        self.psi.stall(vt_us, done_us)

    def inflight_us(self, gate_us: float) -> float:
        """How far past ``gate_us`` the latest request completed (0: it completed before)."""
        return max(0.0, self.last_done_us - gate_us)


class RemoteBlockDevice:
    """The guest's virtual disk, served by the host through host memory."""

    def __init__(self, conn: RpcConnection, n_blocks: int, link: VcpuLink | None = None) -> None:
        self.conn = conn
        self.n_blocks = n_blocks
        self.link = link if link is not None else VcpuLink(conn)

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        blocks = _u64(blocks)
        if blocks.size <= MAX_PAGES_PER_MESSAGE:
            reply = await self.link.call(DiskRead(blocks, float(vt_us)), float(vt_us), stall=True)
            assert isinstance(reply, DiskReadReply)
            return reply.tokens, reply.done_vt_us
        # One vCPU issues the parts one after another: each starts when the last is done,
        # so no request of ours is ever earlier than the reply before it.
        parts, done = [], float(vt_us)
        for i in range(0, blocks.size, MAX_PAGES_PER_MESSAGE):
            tokens, done = await self.read(blocks[i:i + MAX_PAGES_PER_MESSAGE], done)
            parts.append(tokens)
        return np.concatenate(parts), done

    async def read_one(self, blk: int, vt_us: float) -> tuple[int, float]:
        """One block, a fault's read: ``read`` without its conversions and parts (the common request)."""
        vt = float(vt_us)
        reply = await self.link.call(DiskRead(np.array([blk], _U64), vt), vt, stall=True)
        assert isinstance(reply, DiskReadReply)
        return int(reply.tokens[0]), float(reply.done_vt_us)

    async def read_chain(self, blk: int, vt_us: float, chain: bytes) -> tuple[int, float, np.ndarray, list[float]]:
        """``read_one`` with the requests ``chain`` says follow it (``hostd.readchain``), the reply as it came:
        the first read's token and completion, then the chained requests' tokens (uint64, in order: 1 per
        read, n per EPT fault of n pages) and a start and a completion each (empty: none was served). The
        caller pairs them with the program's requests and books the first read's stall
        (``VcpuLink.took``) once they fit."""
        vt = float(vt_us)
        # the stall is the first read's (done_vt_us is the last request's): the caller's to record
        reply = await self.link.call(DiskRead(np.array([blk], _U64), vt, chain), vt, stall=False)
        assert isinstance(reply, DiskReadReply)
        tokens = reply.tokens
        if not reply.chain_vt_us:
            return int(tokens[0]), float(reply.done_vt_us), tokens[1:], []
        times = np.frombuffer(reply.chain_vt_us, "<f8")
        if times.size % 2 != 1 or times.size < 3 or len(tokens) < 1 or times[-1] != reply.done_vt_us:
            raise chain_mismatch(len(tokens), times.size, None)
        return int(tokens[0]), float(times[0]), tokens[1:], times[1:].tolist()

    async def write(self, blocks: np.ndarray, tokens: np.ndarray, vt_us: float) -> float:
        blocks, tokens = _u64(blocks), _u64(tokens)
        done = float(vt_us)
        for i in range(0, blocks.size, MAX_PAGES_PER_MESSAGE // 2):
            j = i + MAX_PAGES_PER_MESSAGE // 2
            reply = await self.link.call(DiskWrite(blocks[i:j], tokens[i:j], done), done, stall=True)
            assert isinstance(reply, DiskWriteReply)
            done = max(done, reply.done_vt_us)
        return done


class RemoteHypervisor:
    """EPT faults and balloon hand-over as hypercalls to the host."""

    backs_all_initially = False  # the host backs gpfns lazily, on EPT faults
    accepts_fresh = True         # ept_fault takes ``fresh`` (EptFault.fresh)

    def __init__(self, conn: RpcConnection, link: VcpuLink | None = None, balloon_page_us: float = 0.0) -> None:
        self.conn = conn
        self.link = link if link is not None else VcpuLink(conn)
        self.balloon_page_us = float(balloon_page_us)
        self.host_balloon_pages = 0  # the host's count, from the last balloon reply
        self.balloon_calls = 0
        self.free_reports = 0
        self.frames_discarded = 0    # host frames our reports freed (the host's replies)

    async def ept_fault(self, gpfns: np.ndarray, vt_us: float,
                        fresh: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        bits = b""
        if fresh is not None:
            fresh = np.asarray(fresh, bool)
            if fresh.any():
                bits = np.packbits(fresh).tobytes()
        reply = await self.link.call(EptFault(_u64(gpfns), float(vt_us), bits), float(vt_us), stall=True)
        assert isinstance(reply, EptFaultReply)
        return reply.tokens, reply.done_vt_us

    async def balloon_inflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return await self._balloon(BalloonInflate, gpfns, vt_us)

    async def balloon_deflate(self, gpfns: np.ndarray, vt_us: float) -> float:
        return await self._balloon(BalloonDeflate, gpfns, vt_us)

    async def report_free(self, gpfns: np.ndarray, vt_us: float) -> float:
        """Free page reporting: one request for these free gpfns; returns when the host has discarded them."""
        reply = await self.link.call(FreeReport(_u64(gpfns), float(vt_us)), float(vt_us), stall=False)
        assert isinstance(reply, FreeReportReply)
        self.free_reports += 1
        self.frames_discarded += reply.discarded_frames
        return reply.done_vt_us

    async def _balloon(self, cls: type, gpfns: np.ndarray, vt_us: float) -> float:
        """One hypercall per 256 PFNs, in sequence; each page costs ``balloon_page_us`` on top.

        The per-page cost (the guest allocator's work and the host's unmap) is
        charged here, by the guest; the host charges ``hypercall_us`` per call.
        """
        gpfns = _u64(gpfns)
        done = float(vt_us)
        for i in range(0, gpfns.size, BALLOON_PFNS_PER_CALL):
            part = gpfns[i:i + BALLOON_PFNS_PER_CALL]
            reply = await self.link.call(cls(part, done), done, stall=False,
                                         extra_us=part.size * self.balloon_page_us)
            assert isinstance(reply, BalloonReply)
            self.host_balloon_pages = reply.balloon_pages
            self.balloon_calls += 1
            done = max(done, reply.done_vt_us) + part.size * self.balloon_page_us
        return done


def chain_mismatch(n_tokens: int, n_times: int, n_requests: int | None) -> ProtoError:
    """A ``DiskReadReply`` whose chain answers do not fit the program it answers."""
    of = f"a chain of {n_requests} requests" if n_requests is not None else "a chain"
    return ProtoError(f"DiskReadReply: {n_tokens} tokens and {n_times} chain times for {of} "
                      "(want 2m + 1 times for m of them, and their tokens)")

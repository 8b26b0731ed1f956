"""The remote disk's one-block read sends what ``read`` of that block sends and returns what it returns,
and the kernel uses it only on a device whose class has it (not through a wrapper that forwards attributes)."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from balloonlab.guestd.remote import RemoteBlockDevice, VcpuLink
from balloonlab.proto.messages import DiskRead, DiskReadReply


class _Conn:
    """Answers every DiskRead with its block number plus 1000 as the token, done 7 µs later."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def call(self, msg: Any) -> DiskReadReply:
        self.sent.append(msg)
        assert isinstance(msg, DiskRead)
        return DiskReadReply(msg.blocks + np.uint64(1000), msg.vt_us + 7.0)


def _device() -> tuple[RemoteBlockDevice, _Conn]:
    conn = _Conn()
    return RemoteBlockDevice(conn, 64, VcpuLink(conn, gate_requests=False)), conn  # type: ignore[arg-type]


def test_read_one_sends_and_returns_what_read_does() -> None:
    one, conn_one = _device()
    many, conn_many = _device()
    got = asyncio.run(one.read_one(5, 12.5))
    toks, done = asyncio.run(many.read(np.array([5], np.int64), 12.5))
    assert got == (int(toks[0]), float(done)) == (1005, 19.5)
    assert type(got[0]) is int and type(got[1]) is float
    a, b = conn_one.sent[0], conn_many.sent[0]
    assert a.to_body() == b.to_body()
    assert one.link.psi.total_us == many.link.psi.total_us == 7.0
    assert one.link.last_done_us == many.link.last_done_us == 19.5


class _Forwarding:
    """A wrapper like the lock model's: attributes it lacks come from the device inside."""

    def __init__(self, inner: RemoteBlockDevice) -> None:
        self.inner = inner
        self.n_blocks = inner.n_blocks
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read(self, blocks: np.ndarray, vt_us: float) -> tuple[np.ndarray, float]:
        self.reads += 1
        return await self.inner.read(blocks, vt_us)


def test_kernel_reads_through_a_forwarding_wrapper_with_its_read() -> None:
    from balloonlab.guestd.kernel import GuestKernel

    dev, _ = _device()
    wrapped = _Forwarding(dev)

    class _K:
        _ra = None
        vt_us = 3.0
        blockdev: Any = None

    k = _K()
    k.blockdev = wrapped
    assert asyncio.run(GuestKernel._disk_read(k, 9)) == (1009, 10.0)   # type: ignore[arg-type]
    assert wrapped.reads == 1
    k.blockdev = dev
    assert asyncio.run(GuestKernel._disk_read(k, 9)) == (1009, 10.0)   # type: ignore[arg-type]
    assert wrapped.reads == 1


def test_compiled_path_reads_one_block_as_disk_read_does() -> None:
    """``_plain_read_one`` (what the compiled path awaits) is ``_disk_read``'s own choice without readahead."""
    from balloonlab.guestd.kernel import GuestKernel

    dev, _ = _device()
    wrapped = _Forwarding(dev)

    class _K:
        _ra: Any = None
        vt_us = 3.0
        blockdev: Any = None

    k = _K()
    k.blockdev = dev
    read_one = GuestKernel._plain_read_one(k)   # type: ignore[arg-type]
    assert read_one is not None
    assert asyncio.run(read_one(9, k.vt_us)) == asyncio.run(GuestKernel._disk_read(k, 9)) == (1009, 10.0)   # type: ignore[arg-type]
    k.blockdev = wrapped                     # the wrapper's class has no read_one: its read() is used
    assert GuestKernel._plain_read_one(k) is None   # type: ignore[arg-type]
    k.blockdev, k._ra = dev, object()        # readahead must see every read
    assert GuestKernel._plain_read_one(k) is None   # type: ignore[arg-type]

"""Framing: a 4-byte big-endian length, then a msgpack body.

The length is checked against the maximum *before* any of the body is
buffered, so an oversized frame costs the reader four bytes, not the frame.
"""
from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import FrameTooLarge, TruncatedFrame, UndecodableFrame

__all__ = ["HEADER_BYTES", "MAX_FRAME_BYTES_DEFAULT", "encode_frame", "FrameEncoder", "FrameDecoder"]

HEADER_BYTES = 4
MAX_FRAME_BYTES_DEFAULT = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")
_SLICE_MAX_BYTES = 64 * 1024


def encode_frame(obj: Any, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> bytes:
    """Pack ``obj`` and prefix its length; refuse bodies the peer would refuse."""
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame_bytes:
        raise FrameTooLarge(len(body), max_frame_bytes)
    return _HEADER.pack(len(body)) + body


class FrameEncoder:
    """``encode_frame`` with a reusable msgpack ``Packer``: one per connection.

    ``msgpack.packb`` builds a new Packer on every call, which costs more
    than packing a small envelope. A Packer is not thread-safe, hence one
    per connection rather than one per module.
    """

    __slots__ = ("max_frame_bytes", "_pack")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def encode(self, obj: Any) -> bytes:
        """Pack ``obj`` and prefix its length; ``FrameTooLarge`` if the peer would refuse it."""
        body = self._pack(obj)
        size = len(body)
        if size > self.max_frame_bytes:
            raise FrameTooLarge(size, self.max_frame_bytes)
        return _HEADER.pack(size) + body


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get whole bodies back.

    After a ``FrameTooLarge`` the stream cannot be resynchronised (the body
    was never read), so the decoder stays failed and the caller closes. An
    undecodable body was consumed whole, so decoding goes on after it.
    """

    __slots__ = ("max_frame_bytes", "_buf", "_failed")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._failed: FrameTooLarge | None = None

    def feed(self, data: bytes) -> list[Any]:
        """Append ``data``; return every complete frame, in order.

        Errors travel in band so that good frames around a bad one are not
        lost: an undecodable frame appears as an ``UndecodableFrame``
        instance in its place; an oversized one as a ``FrameTooLarge``
        instance, always last, after which every ``feed`` raises it.
        """
        if self._failed is not None:
            raise self._failed
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < HEADER_BYTES:
                return []
            (size,) = _HEADER.unpack_from(buf, 0)
            if size <= self.max_frame_bytes and HEADER_BYTES + size > len(buf):
                # Still inside one frame (a large one arriving in chunks):
                # copying nothing until it is complete keeps this linear.
                return []
            # At least one frame is complete (or oversized): decode from an
            # immutable copy, so views into it stay valid and the buffer
            # can be reset at once.
            data = bytes(buf)
            buf.clear()
        # Usually the buffer was empty and ``data`` holds whole frames: they
        # are decoded straight from it. A small body is sliced (a copy of a
        # few bytes is cheaper than a memoryview); a large one is viewed.
        view = memoryview(data) if len(data) > _SLICE_MAX_BYTES else data
        unpackb = msgpack.unpackb
        max_frame = self.max_frame_bytes
        out: list[Any] = []
        pos = 0
        n = len(data)
        while n - pos >= HEADER_BYTES:
            (size,) = _HEADER.unpack_from(data, pos)
            if size > max_frame:
                self._failed = FrameTooLarge(size, max_frame)
                out.append(self._failed)
                return out
            end = pos + HEADER_BYTES + size
            if end > n:
                break
            try:
                out.append(unpackb(view[pos + HEADER_BYTES:end], raw=False, strict_map_key=False))
            except Exception as exc:  # msgpack raises several unrelated types
                out.append(UndecodableFrame(f"frame of {size} bytes is not valid msgpack: {exc}"))
            pos = end
        if pos < n:
            buf += view[pos:]
        return out

    def pending_bytes(self) -> int:
        return len(self._buf)

    def check_eof(self) -> None:
        """At end of stream: raise ``TruncatedFrame`` if a frame was cut short."""
        if self._buf:
            if len(self._buf) < HEADER_BYTES:
                raise TruncatedFrame(bytes(self._buf), HEADER_BYTES)
            (size,) = _HEADER.unpack_from(self._buf, 0)
            raise TruncatedFrame(bytes(self._buf), HEADER_BYTES + size)

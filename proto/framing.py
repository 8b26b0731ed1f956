"""Framing: a 4-byte big-endian length, then a msgpack body.

The length is checked against the maximum *before* any of the body is
buffered, so an oversized frame costs the reader four bytes, not the frame.

What a frame may cost once decoded is bounded too (``DecodeLimits``): a
4 MiB body of one-byte empty maps would otherwise become four million
Python dicts (~300 MiB). A receiver that does not trust its peer caps the
maps and arrays per frame, their lengths and the length of each string.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import FrameTooLarge, TruncatedFrame, UndecodableFrame

__all__ = ["HEADER_BYTES", "MAX_FRAME_BYTES_DEFAULT", "DecodeLimits", "encode_frame", "FrameEncoder", "FrameDecoder"]

HEADER_BYTES = 4
MAX_FRAME_BYTES_DEFAULT = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")
_SLICE_MAX_BYTES = 64 * 1024
_ONE_MAX_BYTES = 4096   # the longest body the one-frame shortcut decodes (its reused Unpacker holds no more)


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one decoded frame may hold: a bound on memory, not only on bytes.

    ``max_containers`` counts maps and arrays in one frame (the envelope and
    its body are two); ``max_container_len`` is the most entries of one map
    or array; ``max_str_bytes`` the longest string. ``bin`` values are one
    object each, bounded by the frame size. So one frame decodes to at most
    ``max_containers * max_container_len`` scalars, whatever its bytes say.
    """

    max_containers: int = 1024
    max_container_len: int = 256
    max_str_bytes: int = 64 * 1024


class _TooManyContainers(Exception):
    pass


class _ContainerCount:
    """The hook msgpack calls for every map and array decoded: counts them against a budget."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = 0

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers()
        return obj


def encode_frame(obj: Any, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> bytes:
    """Pack ``obj`` and prefix its length; refuse bodies the peer would refuse."""
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > max_frame_bytes:
        raise FrameTooLarge(len(body), max_frame_bytes)
    return _HEADER.pack(len(body)) + body


_PACKER_BUF_BYTES = 4096         # a Packer's buffer to start with (msgpack's default is 256 KiB)
_PACKER_KEEP_BYTES = 64 * 1024   # after a bigger body the Packer is replaced: its buffer never shrinks


def _packer() -> Any:
    return msgpack.Packer(use_bin_type=True, buf_size=_PACKER_BUF_BYTES).pack


class FrameEncoder:
    """``encode_frame`` with a reusable msgpack ``Packer``: one per connection.

    ``msgpack.packb`` builds a new Packer on every call, which costs more
    than packing a small envelope. A Packer is not thread-safe, hence one
    per connection rather than one per module. Its buffer grows to the
    largest body it packed and stays that big, so after a big one it is
    replaced: an idle connection holds 4 KiB here, not what it once sent
    (a host with hundreds of connections, many of them short-lived, would
    otherwise keep megabytes per connection).
    """

    __slots__ = ("max_frame_bytes", "_pack")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._pack = _packer()

    def encode(self, obj: Any) -> bytes:
        """Pack ``obj`` and prefix its length; ``FrameTooLarge`` if the peer would refuse it."""
        body = self._pack(obj)
        size = len(body)
        if size > _PACKER_KEEP_BYTES:
            self._pack = _packer()
        if size > self.max_frame_bytes:
            raise FrameTooLarge(size, self.max_frame_bytes)
        return _HEADER.pack(size) + body


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get whole bodies back.

    After a ``FrameTooLarge`` the stream cannot be resynchronised (the body
    was never read), so the decoder stays failed and the caller closes. An
    undecodable body was consumed whole, so decoding goes on after it.
    """

    __slots__ = ("max_frame_bytes", "limits", "sizes", "_buf", "_failed", "_count", "_unpack", "_unpack_small",
                 "_small_max_bytes", "_one_max_bytes", "_unpacker", "_unpacker_kw", "_unpacked")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES_DEFAULT, limits: DecodeLimits | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._failed: FrameTooLarge | None = None
        self.sizes: list[int] = []   # body bytes of each frame the last ``feed`` returned, in order
        self._count = _ContainerCount()
        self.limits: DecodeLimits | None = None
        self._unpack: Any = None
        self._unpack_small: Any = None
        self._small_max_bytes = 0
        self._one_max_bytes = 0
        self._unpacker: Any = None
        self._unpacker_kw: dict[str, Any] = {}
        self._unpacked = 0
        self.set_limits(limits)

    def set_limits(self, limits: DecodeLimits | None) -> None:
        """Bound what a frame may decode to (None: only by its size)."""
        self.limits = limits
        kw: dict[str, Any] = {"raw": False, "strict_map_key": False}
        if limits is not None:
            kw.update(max_array_len=limits.max_container_len, max_map_len=limits.max_container_len,
                      max_str_len=limits.max_str_bytes, max_ext_len=0)
        self._unpack_small = functools.partial(msgpack.unpackb, **kw)
        self._unpacker_kw = dict(kw, max_buffer_size=_ONE_MAX_BYTES)
        self._new_unpacker()
        if limits is not None:
            kw.update(list_hook=self._count, object_hook=self._count)
        self._unpack = functools.partial(msgpack.unpackb, **kw)
        # Every map or array takes at least one byte of the body, so a body of at most
        # max_containers bytes cannot hold more of them: it is decoded without the
        # counting hooks (two Python calls per frame, on every request a guest sends).
        self._small_max_bytes = limits.max_containers if limits is not None else max(self.max_frame_bytes, 0)
        self._one_max_bytes = min(self._small_max_bytes, _ONE_MAX_BYTES)

    def _new_unpacker(self) -> None:
        self._unpacker = msgpack.Unpacker(**self._unpacker_kw)
        self._unpacked = 0   # bytes it has consumed

    def feed(self, data: bytes) -> list[Any]:
        """Append ``data``; return every complete frame, in order.

        Errors travel in band so that good frames around a bad one are not
        lost: an undecodable frame appears as an ``UndecodableFrame``
        instance in its place; an oversized one as a ``FrameTooLarge``
        instance, always last, after which every ``feed`` raises it.
        """
        n = len(data) - HEADER_BYTES
        if 0 < n <= self._one_max_bytes and not self._buf and self._failed is None:
            # The usual read on a request path with one request outstanding: exactly one
            # whole small frame. ``_feed_general`` would return the same, in more steps.
            # A reused Unpacker (with the same options) does what ``unpackb`` does without
            # parsing six keyword arguments per frame; it must consume the body exactly.
            # A body it does not decode is left to the general path, to say why in band.
            (size,) = _HEADER.unpack_from(data, 0)
            if size == n and size <= self.max_frame_bytes:
                unpacker = self._unpacker
                try:
                    unpacker.feed(data[HEADER_BYTES:])
                    obj = unpacker.unpack()
                except Exception:
                    pass
                else:
                    self._unpacked += size
                    if unpacker.tell() == self._unpacked:
                        self.sizes = [size]
                        return [obj]
                self._new_unpacker()   # whatever it holds now is not a frame's start
        return self._feed_general(data)

    def _feed_general(self, data: bytes) -> list[Any]:
        """``feed`` for any bytes: the path its one-frame shortcut must agree with."""
        if self._failed is not None:
            raise self._failed
        sizes = self.sizes = []
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
        unpackb = self._unpack
        unpack_small = self._unpack_small
        small_max = self._small_max_bytes
        count = self._count
        max_containers = self.limits.max_containers if self.limits is not None else 0
        max_frame = self.max_frame_bytes
        out: list[Any] = []
        pos = 0
        n = len(data)
        while n - pos >= HEADER_BYTES:
            (size,) = _HEADER.unpack_from(data, pos)
            if size > max_frame:
                self._failed = FrameTooLarge(size, max_frame)
                out.append(self._failed)
                sizes.append(size)
                return out
            end = pos + HEADER_BYTES + size
            if end > n:
                break
            try:
                if size <= small_max:
                    out.append(unpack_small(view[pos + HEADER_BYTES:end]))
                else:
                    count.left = max_containers
                    out.append(unpackb(view[pos + HEADER_BYTES:end]))
            except _TooManyContainers:
                out.append(UndecodableFrame(f"frame of {size} bytes holds more than {max_containers} maps and "
                                            f"arrays (the most this receiver decodes from one frame)"))
            except Exception as exc:  # msgpack raises several unrelated types
                out.append(UndecodableFrame(f"frame of {size} bytes is not valid msgpack: {exc}"))
            sizes.append(size)
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

"""``FrameDecoder.feed``'s one-frame shortcut returns what its general path returns.

A read that holds exactly one whole small frame (the usual one on the
request path) is decoded without the general loop; ``_feed_general`` is
the reference. On random reads -- one frame or not, valid msgpack or not,
at and around the size and container limits, after a buffered partial
frame or an oversized one -- both give the same items, sizes and state.
"""
from __future__ import annotations

import math
import struct

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonlab.proto.framing import DecodeLimits, FrameDecoder
from scripts.fuzz import Input

LIMITS = [None, DecodeLimits(), DecodeLimits(max_containers=3, max_container_len=4, max_str_bytes=8)]


def _plain(item: object) -> object:
    if isinstance(item, Exception):
        return (type(item), str(item))
    if isinstance(item, float) and math.isnan(item):
        return "nan"     # nan != nan: compared by name, also inside containers
    if isinstance(item, (list, tuple)):
        return [_plain(x) for x in item]
    if isinstance(item, dict):
        return {repr(k): _plain(v) for k, v in item.items()}
    return item


def _body(inp: Input) -> bytes:
    k = inp.below(4)
    if k == 0:
        return inp.take(inp.below(24))                         # anything, mostly not msgpack
    if k == 1:
        return msgpack.packb(inp.value(), use_bin_type=True)[:inp.below(40) or None]   # cut short, or whole
    if k == 2:
        return msgpack.packb(inp.value(), use_bin_type=True) + inp.take(inp.below(3))  # maybe extra bytes
    return msgpack.packb([0, inp.int(2), 40, {"blocks": b"\x00" * 8 * inp.below(200), "vt_us": 1.5}],
                         use_bin_type=True)


def _read(inp: Input) -> bytes:
    body = _body(inp)
    size = len(body)
    k = inp.below(8)
    if k == 0:
        size += inp.pick([-1, 1, 1 << 20])                      # header and bytes disagree
    out = struct.pack(">I", size & 0xFFFFFFFF) + body
    if k == 1:
        out = out[:inp.below(len(out) + 1)]                     # a partial frame
    if k == 2:
        out += struct.pack(">I", len(body)) + body              # two frames
    return out


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_feed_agrees_with_the_general_path(data: bytes) -> None:
    inp = Input(data)
    limits = inp.pick(LIMITS)
    max_frame = inp.pick([4096, 64, 20, 1 << 22])
    shortcut, general = FrameDecoder(max_frame, limits), FrameDecoder(max_frame, limits)
    for _ in range(1 + inp.below(4)):
        read = _read(inp)
        outcome = []
        for dec, feed in ((shortcut, shortcut.feed), (general, general._feed_general)):
            try:
                items = [_plain(item) for item in feed(read)]
            except Exception as exc:   # the oversized frame's decoder raises from then on
                items = [("raised", _plain(exc))]
            outcome.append((items, list(dec.sizes), dec.pending_bytes()))
        assert outcome[0] == outcome[1], read

"""Framing: 4-byte big-endian length + msgpack body, decoded incrementally.

Pure tests: no sockets. The decoder must hand back exactly the frames that
were sent however the byte stream is cut, report bad frames in band without
losing the good ones around them, and refuse an oversized frame from its
header alone.
"""
from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonlab.proto.errors import FrameTooLarge, TruncatedFrame, UndecodableFrame
from balloonlab.proto.framing import HEADER_BYTES, MAX_FRAME_BYTES_DEFAULT, FrameDecoder, encode_frame

FRAMES = [
    [0, 1, 60, {"payload": b""}],
    [1, 1, 60, {"payload": b"\x00" * 300}],
    {"a": [1, 2.5, "x", None, True]},
    "text",
    -1,
    [3, 0, 10, {"tick": 2**40, "vt_us": 1.5, "tick_us": 10_000}],
]


def _stream(objs: list) -> bytes:
    return b"".join(encode_frame(o) for o in objs)


def _raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_encode_frame_is_big_endian_length_then_msgpack() -> None:
    frame = encode_frame({"a": 1})
    body = msgpack.packb({"a": 1}, use_bin_type=True)
    assert frame == len(body).to_bytes(4, "big") + body
    assert HEADER_BYTES == 4 and MAX_FRAME_BYTES_DEFAULT == 4 * 1024 * 1024


def test_encode_frame_uses_bin_for_bytes_and_str_for_text() -> None:
    frame = encode_frame([b"\x01", "a"])
    assert frame[4:] == b"\x92\xc4\x01\x01\xa1a"  # array(2), bin8 len 1, fixstr "a"


def test_encode_frame_refuses_bodies_over_the_limit() -> None:
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(b"x" * 100, max_frame_bytes=50)
    assert info.value.size > 50 and info.value.limit == 50


def test_frames_fed_byte_by_byte_come_out_whole_and_in_order() -> None:
    dec = FrameDecoder()
    out = []
    for i, byte in enumerate(_stream(FRAMES)):
        got = dec.feed(bytes([byte]))
        out.extend(got)
    assert out == FRAMES
    assert dec.pending_bytes() == 0
    dec.check_eof()  # nothing left over


def test_a_frame_appears_only_once_its_last_byte_arrived() -> None:
    dec = FrameDecoder()
    frame = encode_frame([0, 7, 60, {"payload": b"abc"}])
    assert dec.feed(frame[:-1]) == []
    assert dec.pending_bytes() == len(frame) - 1
    assert dec.feed(frame[-1:]) == [[0, 7, 60, {"payload": b"abc"}]]


def test_several_frames_in_one_chunk() -> None:
    dec = FrameDecoder()
    data = _stream(FRAMES)
    assert dec.feed(data + encode_frame("tail")[:3]) == FRAMES
    assert dec.pending_bytes() == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_any_cut_of_the_stream_decodes_to_the_same_frames(cuts: list[int]) -> None:
    data = _stream(FRAMES)
    points = sorted({min(c * 7, len(data)) for c in cuts})
    dec = FrameDecoder()
    out, prev = [], 0
    for p in points + [len(data)]:
        out.extend(dec.feed(data[prev:p]))
        prev = p
    assert out == FRAMES


def test_oversized_header_is_rejected_before_the_body_arrives() -> None:
    """Only the 4-byte header of a 100 MiB frame is fed: the decoder must not wait for the body."""
    dec = FrameDecoder()
    good = encode_frame("ok")
    out = dec.feed(good + struct.pack(">I", 100 * 1024 * 1024))
    assert out[0] == "ok"
    assert len(out) == 2 and isinstance(out[1], FrameTooLarge)
    assert out[1].size == 100 * 1024 * 1024 and out[1].limit == MAX_FRAME_BYTES_DEFAULT
    # The stream cannot be resynchronised: every later feed raises.
    with pytest.raises(FrameTooLarge):
        dec.feed(encode_frame("later"))


def test_oversized_header_split_across_feeds_is_rejected() -> None:
    dec = FrameDecoder(max_frame_bytes=1024)
    header = struct.pack(">I", 100 * 1024 * 1024)
    assert dec.feed(encode_frame("ok") + header[:2]) == ["ok"]
    out = dec.feed(header[2:])
    assert len(out) == 1 and isinstance(out[0], FrameTooLarge)


def test_a_large_frame_in_small_chunks() -> None:
    dec = FrameDecoder()
    obj = [b"\x07" * (1 << 20), "end"]
    data = encode_frame(obj) + encode_frame("next")
    out = []
    for i in range(0, len(data), 4096):
        out.extend(dec.feed(data[i:i + 4096]))
    assert out == [obj, "next"] and dec.pending_bytes() == 0


def test_the_limit_is_inclusive_and_configurable() -> None:
    dec = FrameDecoder(max_frame_bytes=10)
    body = msgpack.packb(b"12345678")  # 10 bytes: bin8 header + 8
    assert len(body) == 10
    assert dec.feed(_raw_frame(body)) == [b"12345678"]
    out = dec.feed(struct.pack(">I", 11))
    assert len(out) == 1 and isinstance(out[0], FrameTooLarge)


def test_undecodable_body_is_reported_in_band_and_decoding_continues() -> None:
    dec = FrameDecoder()
    bad = _raw_frame(b"\xc1\xc1\xc1")          # 0xc1 is never used by msgpack
    extra = _raw_frame(b"\x01\x02")            # a valid value followed by extra bytes
    cut = _raw_frame(b"\x92\x01")              # an array of 2 with 1 element
    out = dec.feed(encode_frame(1) + bad + encode_frame(2) + extra + cut + encode_frame(3))
    assert [o for o in out if not isinstance(o, UndecodableFrame)] == [1, 2, 3]
    assert [type(o) for o in out] == [int, UndecodableFrame, int, UndecodableFrame, UndecodableFrame, int]
    assert "3 bytes" in str(out[1])
    assert dec.feed(encode_frame(4)) == [4]


def test_empty_body_is_undecodable_not_fatal() -> None:
    dec = FrameDecoder()
    out = dec.feed(_raw_frame(b"") + encode_frame("next"))
    assert isinstance(out[0], UndecodableFrame) and out[1] == "next"


def test_truncated_body_at_eof_raises_with_partial_and_expected() -> None:
    dec = FrameDecoder()
    frame = encode_frame({"k": b"x" * 20})
    dec.feed(frame[:10])
    with pytest.raises(TruncatedFrame) as info:
        dec.check_eof()
    assert isinstance(info.value, EOFError)
    assert info.value.partial == frame[:10]
    assert info.value.expected == len(frame)


def test_truncated_header_at_eof_raises() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x00\x00")
    with pytest.raises(TruncatedFrame) as info:
        dec.check_eof()
    assert info.value.partial == b"\x00\x00" and info.value.expected == HEADER_BYTES


def test_eof_between_frames_is_clean() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame("a") + encode_frame("b")) == ["a", "b"]
    dec.check_eof()


def test_decoded_bodies_do_not_alias_the_receive_buffer() -> None:
    """Bytes values must stay valid after the decoder reuses its buffer."""
    dec = FrameDecoder()
    (first,) = dec.feed(encode_frame(b"A" * 64))
    dec.feed(encode_frame(b"B" * 64) + encode_frame(b"C" * 64)[:10])
    assert first == b"A" * 64 and type(first) is bytes


def test_maps_with_integer_keys_decode() -> None:
    """Map keys are not restricted by framing; message validation rejects non-str keys later."""
    dec = FrameDecoder()
    assert dec.feed(encode_frame({1: "a"})) == [{1: "a"}]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_never_raise_from_feed(data: bytes, chunk: int) -> None:
    """Garbage is reported in band; only a stream already failed by an oversize frame raises."""
    dec = FrameDecoder(max_frame_bytes=256)
    failed = False
    for i in range(0, len(data), chunk):
        if failed:
            with pytest.raises(FrameTooLarge):
                dec.feed(data[i:i + chunk])
            continue
        out = dec.feed(data[i:i + chunk])
        if out and isinstance(out[-1], FrameTooLarge):
            failed = True
        assert not any(isinstance(o, FrameTooLarge) for o in out[:-1])

"""Typed messages: every class round-trips; decoding rejects anything off-spec.

Pure tests. The valid and invalid values are derived from each class's
``SPEC``, so a new message or field is covered without editing this file.
"""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from proto import messages as m
from proto.errors import BadField, ErrorCode, MessageError, UnknownMessageType

ALL_CLASSES: list[type[m.Message]] = sorted(
    {cls for pair in m.REQUESTS.values() for cls in pair} | set(m.NOTIFICATIONS.values()),
    key=lambda c: c.__name__)

# One valid wire value per field kind (what a peer in any language would send).
VALID = {
    "int": 7,
    "number": 12.5,
    "str": "abc",
    "bin": b"\x01\x02",
    "pages": np.array([0, 1, 2**63 + 5], dtype="<u8").tobytes(),
    "map": {"k": 1, "nested": {"x": [1, 2]}},
}

# Values of the wrong msgpack type or out of range, per field kind.
INVALID = {
    "int": [True, False, -1, 1.0, "1", b"\x01", None, [1]],
    "number": [True, -0.5, -1, math.nan, math.inf, -math.inf, "1.0", None],
    "str": [b"abc", 1, None, ["a"]],
    "bin": ["abc", 1, None, [1, 2]],
    "pages": ["abc", [1, 2], 1, None, b"\x00" * 7, b"\x00" * 12],
    "map": [[("k", 1)], "k", 1, None, {1: "int key"}, {b"k": "bin key"}],
}


def _valid_body(cls: type[m.Message]) -> dict:
    return {name: VALID[kind] for name, kind in cls.SPEC.items()}


def _wire(body: dict) -> dict:
    """What the peer receives: the body through msgpack and back."""
    return msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False, strict_map_key=False)


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return a == b


def test_every_message_class_is_in_a_table_and_exported() -> None:
    exported = [getattr(m, n) for n in m.__all__]
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, m.Message) and c is not m.Message}
    assert classes == set(ALL_CLASSES)
    assert set(m.REQUESTS) | set(m.NOTIFICATIONS) == set(m.MsgType)
    assert not set(m.REQUESTS) & set(m.NOTIFICATIONS)


def test_request_and_reply_types_match_the_table() -> None:
    for msg_type, (req, _reply) in m.REQUESTS.items():
        assert req.TYPE is msg_type
    for msg_type, cls in m.NOTIFICATIONS.items():
        assert cls.TYPE is msg_type


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_round_trip(cls: type[m.Message]) -> None:
    msg = cls.from_body(_wire(_valid_body(cls)))
    again = cls.from_body(_wire(msg.to_body()))
    for name, kind in cls.SPEC.items():
        assert _same(getattr(again, name), getattr(msg, name)), name
        if kind == "pages":
            arr = getattr(again, name)
            assert arr.dtype == np.dtype("<u8") and not arr.flags.writeable
            assert arr.tolist() == [0, 1, 2**63 + 5]
        if kind == "number":
            assert type(getattr(again, name)) is float


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_to_body_sends_pages_as_little_endian_u64_bin(cls: type[m.Message]) -> None:
    values = {}
    for name, kind in cls.SPEC.items():
        values[name] = [1, 258] if kind == "pages" else cls.from_body(_valid_body(cls)).__getattribute__(name)
    body = cls(**values).to_body()
    for name, kind in cls.SPEC.items():
        if kind == "pages":
            assert body[name] == b"\x01" + b"\x00" * 7 + b"\x02\x01" + b"\x00" * 6


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_unknown_field_is_rejected_and_named(cls: type[m.Message]) -> None:
    body = _valid_body(cls) | {"surprise": 1}
    with pytest.raises(BadField) as info:
        cls.from_body(body)
    assert info.value.field == "surprise" and info.value.code == ErrorCode.BAD_FIELD
    assert f"{cls.__name__}.surprise" in str(info.value)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_missing_field_is_rejected_and_named(cls: type[m.Message]) -> None:
    for name in cls.SPEC:
        body = _valid_body(cls)
        del body[name]
        with pytest.raises(BadField, match="missing field") as info:
            cls.from_body(body)
        assert info.value.field == name


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_wrong_value_is_rejected_and_named(cls: type[m.Message]) -> None:
    for name, kind in cls.SPEC.items():
        for bad in INVALID[kind]:
            body = _valid_body(cls) | {name: bad}
            with pytest.raises(BadField) as info:
                cls.from_body(body)
            assert info.value.field == name, (name, bad)
            assert info.value.code == ErrorCode.BAD_FIELD


@pytest.mark.parametrize("body", [[], "x", None, 1, b"map"])
def test_body_must_be_a_map(body: object) -> None:
    with pytest.raises(BadField, match="expected a map"):
        m.Ping.from_body(body)


def test_bool_is_not_an_int_on_the_wire() -> None:
    body = _wire({"tick": True, "vt_us": 0.0, "tick_us": 10_000})
    with pytest.raises(BadField, match="expected int, got bool"):
        m.TickStart.from_body(body)


def test_str_is_not_bin() -> None:
    with pytest.raises(BadField, match="Ping.payload: expected bin, got str"):
        m.Ping.from_body(_wire({"payload": "text"}))


def test_nan_infinite_and_negative_numbers_are_rejected() -> None:
    with pytest.raises(BadField, match=r"TickStart\.vt_us: must be finite and >= 0, got nan"):
        m.TickStart.from_body({"tick": 1, "vt_us": math.nan, "tick_us": 1})
    with pytest.raises(BadField, match=r"TickStart\.vt_us: must be finite and >= 0, got inf"):
        m.TickStart.from_body({"tick": 1, "vt_us": math.inf, "tick_us": 1})
    with pytest.raises(BadField, match=r"RunEnd\.tick: must be >= 0, got -3"):
        m.RunEnd.from_body({"reason": "x", "tick": -3})


def test_integers_decode_as_floats_for_number_fields() -> None:
    msg = m.TickStart.from_body({"tick": 1, "vt_us": 10, "tick_us": 1})
    assert msg.vt_us == 10.0 and type(msg.vt_us) is float


def test_pages_length_must_be_a_multiple_of_8() -> None:
    with pytest.raises(BadField, match=r"EptFault\.gpfns: length 12 is not a multiple of 8"):
        m.EptFault.from_body({"gpfns": b"\x00" * 12, "vt_us": 0.0})


def test_pages_count_is_limited() -> None:
    limit = m.MAX_PAGES_PER_MESSAGE
    ok = m.EptFault.from_body({"gpfns": b"\x00" * (8 * limit), "vt_us": 0.0})
    assert ok.gpfns.size == limit
    with pytest.raises(BadField, match=f"{limit + 1} pages exceed the limit of {limit}"):
        m.EptFault.from_body({"gpfns": b"\x00" * (8 * (limit + 1)), "vt_us": 0.0})


def test_a_full_page_batch_fits_in_a_default_frame_but_two_do_not() -> None:
    """The frame limit binds too: a DiskWrite carries at most half a batch in each field."""
    from proto.errors import FrameTooLarge
    from proto.framing import MAX_FRAME_BYTES_DEFAULT, encode_frame

    full = np.arange(m.MAX_PAGES_PER_MESSAGE, dtype="<u8")
    frame = encode_frame([0, 1, int(m.MsgType.EPT_FAULT), m.EptFault(full, 0.0).to_body()])
    assert len(frame) - 4 <= MAX_FRAME_BYTES_DEFAULT
    half = full[: m.MAX_PAGES_PER_MESSAGE // 2]
    encode_frame([0, 1, int(m.MsgType.DISK_WRITE), m.DiskWrite(half, half, 0.0).to_body()])
    with pytest.raises(FrameTooLarge):
        encode_frame([0, 1, int(m.MsgType.DISK_WRITE), m.DiskWrite(full, full, 0.0).to_body()])


def test_empty_page_batch_is_valid() -> None:
    assert m.Invalidate.from_body({"gpfns": b""}).gpfns.size == 0


def test_map_keys_must_be_strings() -> None:
    with pytest.raises(BadField, match=r"TickDone\.stats: map key 1 is not a string"):
        m.TickDone.from_body({"tick": 0, "vt_us": 0.0, "stats": {1: 2}, "accessed": b"", "dirty": b""})


@pytest.mark.parametrize("raw", [0, 2, 999, -1, "ping", None, 60.0, True])
def test_unknown_message_type(raw: object) -> None:
    with pytest.raises(UnknownMessageType) as info:
        m.msg_type_of(raw)
    assert info.value.code == ErrorCode.UNKNOWN_TYPE and info.value.msg_type == raw
    assert isinstance(info.value, MessageError)


def test_known_message_types() -> None:
    assert m.msg_type_of(60) is m.MsgType.PING
    assert m.msg_type_of(1) is m.MsgType.HELLO


def test_messages_are_frozen() -> None:
    msg = m.Ping(b"x")
    with pytest.raises(AttributeError):
        msg.payload = b"y"  # type: ignore[misc]

"""Typed messages: every class round-trips; decoding rejects anything off-spec.

Pure tests. The valid and invalid values are derived from each class's
``SPEC``, so a new message or field is covered without editing this file.
"""
from __future__ import annotations

import inspect
import math
import os
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from balloonlab.proto import messages as m
from balloonlab.proto.errors import BadField, ErrorCode, MessageError, UnknownMessageType

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
    "stats": {"refs": 1, "pff": 0.5},
    "list": [[0, 4, "img", 0, False, [0.25, 0.45]]],
}

# Values of the wrong msgpack type or out of range, per field kind.
INVALID = {
    "int": [True, False, -1, 1.0, "1", b"\x01", None, [1]],
    "number": [True, -0.5, -1, math.nan, math.inf, -math.inf, "1.0", None],
    "str": [b"abc", 1, None, ["a"]],
    "bin": ["abc", 1, None, [1, 2]],
    "pages": ["abc", [1, 2], 1, None, b"\x00" * 7, b"\x00" * 12],
    "map": [[("k", 1)], "k", 1, None, {1: "int key"}, {b"k": "bin key"}],
    "stats": ["k", 1, None, b"\x01", {1: "int key"}, {b"k": "bin key"}],
    "list": [{"k": 1}, "k", 1, None, b"\x01"],
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
        if name in cls._OPTIONAL:
            continue
        body = _valid_body(cls)
        del body[name]
        with pytest.raises(BadField, match="missing field") as info:
            cls.from_body(body)
        assert info.value.field == name


def test_a_field_added_later_may_be_omitted_and_takes_its_default() -> None:
    """Fields with a default came after version 1: an older peer's body without them still decodes."""
    assert m.EptFault._OPTIONAL == {"fresh"} and m.InvalidateReply._OPTIONAL == {"labels"}
    old = {"gpfns": m.pages_to_bytes([3, 4]), "vt_us": 1.0}
    fault = m.EptFault.from_body(old)
    assert fault.fresh == b"" and fault.gpfns.tolist() == [3, 4]
    assert m.EptFault.from_body(old | {"fresh": b"\x80"}).fresh == b"\x80"
    with pytest.raises(BadField, match="expected bin"):
        m.EptFault.from_body(old | {"fresh": [1]})
    assert m.InvalidateReply.from_body({"tokens": m.pages_to_bytes([9])}).labels == b""
    assert m.DiskRead._OPTIONAL == {"chain"} and m.DiskReadReply._OPTIONAL == {"chain_vt_us"}
    assert m.TickDone._OPTIONAL == {"ahead", "ahead_seen"}
    done = m.TickDone.from_body({"tick": 3, "vt_us": 1.0, "stats": {}, "accessed": b"", "dirty": b""})
    assert done.ahead == b"" and done.ahead_seen == 0
    assert set(m.TickDone(3, 1.0, {}, b"", b"").to_body()) == {"tick", "vt_us", "stats", "accessed", "dirty"}
    later = (m.EptFault, m.InvalidateReply, m.DiskRead, m.DiskReadReply, m.TickDone)
    assert all(not c._OPTIONAL for c in ALL_CLASSES if c not in later)


def test_an_optional_field_at_its_default_is_left_out() -> None:
    """So a peer that predates the field never sees it; the fast decoder still takes either form,
    and an unknown key in the place of the omitted one is still named."""
    read = m.DiskRead(np.array([7], np.uint64), 2.0)
    for body in (read.to_body(), read._to_body_general()):
        assert set(body) == {"blocks", "vt_us"}
    chained = m.DiskRead(np.array([7], np.uint64), 2.0, b"\0" * 16)
    assert chained.to_body() == chained._to_body_general() and chained.to_body()["chain"] == b"\0" * 16
    assert m.DiskRead.from_body(chained.to_body()).chain == b"\0" * 16
    assert m.DiskRead.from_body(read.to_body()).chain == b""
    with pytest.raises(BadField, match="unknown field") as info:
        m.DiskRead.from_body(read.to_body() | {"chian": b""})
    assert info.value.field == "chian"
    reply = m.DiskReadReply(np.array([1], np.uint64), 3.0)
    assert set(reply.to_body()) == {"tokens", "done_vt_us"}


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
    from balloonlab.proto.errors import FrameTooLarge
    from balloonlab.proto.framing import MAX_FRAME_BYTES_DEFAULT, encode_frame

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


# --- proto/README.md: the generated parts must match the code ------------------------
#
# The message tables, the error codes and the log events in proto/README.md
# are rendered from the code below. When they drift, this test fails; run
#   BALLOONLAB_UPDATE_README=1 scripts/test tests/test_proto_messages.py -k readme
# to rewrite those sections, then read the diff.

README = Path(m.__file__).with_name("README.md")

_WIRE = {  # SPEC kind -> (msgpack type, constraints)
    "int": ("int", "integer >= 0 (any msgpack int width; never bool)"),
    "number": ("float or int", "finite, >= 0 (NaN and inf refused); read as a 64-bit float"),
    "str": ("str", "UTF-8 text"),
    "bin": ("bin", "bytes"),
    "pages": ("bin", f"little-endian u64 each; length a multiple of 8; at most "
                     f"{m.MAX_PAGES_PER_MESSAGE:,} entries"),
    "map": ("map", "keys are str; values any msgpack value"),
    "stats": ("map or array", "a map (keys are str; values any msgpack value), or an array: the values of the "
                              "keys of the sender's last map, in that order (see the field's description)"),
    "list": ("array", "its entries are checked by the message (see its description)"),
}


def _enum_comments(cls: type) -> dict[str, str]:
    """``NAME = value  # comment`` lines of an enum's source -> {NAME: comment}."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+([A-Z_]+) = \d+\s*(?:#\s*(.*))?$", line)
        if match:
            out[match.group(1)] = (match.group(2) or "").strip()
    return out


def _md(text: str) -> str:
    """Docstring/comment text as table-safe Markdown (``x`` -> `x`, | escaped)."""
    return text.replace("``", "`").replace("|", "\\|")


def _doc(cls: type) -> str:
    """The first paragraph of a class's own docstring (not dataclass's generated signature)."""
    doc = inspect.getdoc(cls) if cls.__doc__ else ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return _md(" ".join(doc.split("\n\n")[0].split()))


def render_messages() -> str:
    comments = _enum_comments(m.MsgType)
    lines = ["| type | name | direction and role | body | reply body |", "|---:|---|---|---|---|"]
    for t in m.MsgType:
        if t in m.REQUESTS:
            req, rep = m.REQUESTS[t]
            lines.append(f"| {int(t)} | `{t.name}` | {_md(comments.get(t.name, ''))} | `{req.__name__}` | "
                         f"`{rep.__name__}` |")
        else:
            lines.append(f"| {int(t)} | `{t.name}` | {_md(comments.get(t.name, ''))} | "
                         f"`{m.NOTIFICATIONS[t].__name__}` | (notification: none) |")
    seen: set[type] = set()
    for t in m.MsgType:
        classes = m.REQUESTS[t] if t in m.REQUESTS else (m.NOTIFICATIONS[t],)
        for i, cls in enumerate(classes):
            role = ("request" if i == 0 else "reply") if t in m.REQUESTS else "notification"
            title = f"#### `{cls.__name__}`: {role} body of `{t.name}` ({int(t)})"
            if cls in seen:
                lines += ["", title, "", f"Same fields as `{cls.__name__}` above."]
                continue
            seen.add(cls)
            lines += ["", title, ""]
            if _doc(cls):
                lines += [_doc(cls), ""]
            lines += ["| field | msgpack type | constraints |", "|---|---|---|"]
            for name, kind in cls.SPEC.items():
                wire, rule = _WIRE[kind]
                if name in cls._OPTIONAL:
                    rule += "; optional (added later): omitted means empty"
                lines.append(f"| `{name}` | {wire} | {rule} |")
    return "\n".join(lines)


def render_error_codes() -> str:
    comments = _enum_comments(ErrorCode)
    lines = ["| code | name | meaning |", "|---:|---|---|"]
    lines += [f"| {int(c)} | `{c.name}` | {_md(comments.get(c.name, ''))} |" for c in ErrorCode]
    return "\n".join(lines)


def render_events() -> str:
    """proto/events.py as tables: a comment after a blank line titles a group; comment
    lines right before a constant, and the comment after it, list its fields."""
    from balloonlab.proto import events

    lines: list[str] = []
    leading: list[str] = []
    after_blank = True
    for line in inspect.getsource(events).splitlines():
        if not line.strip():
            after_blank, leading = True, []
            continue
        comment = re.match(r"#\s?(.*)$", line)
        if comment:
            if after_blank:
                lines += ["", f"**{_md(comment.group(1).strip())}**", "", "| event | fields |", "|---|---|"]
            else:
                leading.append(comment.group(1).strip())
            after_blank = False
            continue
        after_blank = False
        match = re.match(r'([A-Z_]+) = "([a-z_]+)"\s*(?:#\s*(.*))?$', line)
        if match:
            assert getattr(events, match.group(1)) == match.group(2)
            fields_ = " ".join(leading + [(match.group(3) or "").strip()]).strip()
            lines.append(f"| `{match.group(2)}` | {_md(' '.join(fields_.split()))} |")
        leading = []
    return "\n".join(lines).strip()


def test_every_event_constant_is_rendered() -> None:
    from balloonlab.proto import events

    rendered = render_events()
    names = [getattr(events, n) for n in events.__all__ if isinstance(getattr(events, n), str)]
    assert names and all(f"| `{name}` |" in rendered for name in names)


README_SECTIONS = {"messages": render_messages, "error-codes": render_error_codes, "events": render_events}


def _section_bounds(text: str, name: str) -> tuple[int, int]:
    begin, end = f"<!-- generated:{name} begin -->\n", f"\n<!-- generated:{name} end -->"
    i, j = text.find(begin), text.find(end)
    assert 0 <= i < j, f"proto/README.md has no generated section {name!r}"
    return i + len(begin), j


def test_readme_generated_sections_match_the_code() -> None:
    text = README.read_text()
    stale = []
    for name, render in README_SECTIONS.items():
        i, j = _section_bounds(text, name)
        want = render()
        if text[i:j] != want:
            stale.append(name)
            text = text[:i] + want + text[j:]
    if stale and os.environ.get("BALLOONLAB_UPDATE_README"):
        README.write_text(text)
        return
    assert not stale, (f"proto/README.md sections {stale} do not match the code; run "
                       "BALLOONLAB_UPDATE_README=1 scripts/test tests/test_proto_messages.py -k readme")


def test_readme_hello_example_is_a_valid_frame() -> None:
    """The worked example in hex decodes to the Hello the README says it is."""
    from balloonlab.proto.framing import FrameDecoder

    text = README.read_text()
    block = re.search(r"<!-- example:hello begin -->\n```\n(.*?)```", text, re.S)
    assert block, "proto/README.md has no hello example"
    hexdigits = "".join(re.findall(r"^([0-9a-f ]+?)(?:\s{2,}.*)?$", block.group(1), re.M))
    frame = bytes.fromhex(hexdigits)
    (envelope,) = FrameDecoder().feed(frame)
    assert envelope[:3] == [m.Kind.REQUEST, 1, m.MsgType.HELLO]
    hello = m.Hello.from_body(envelope[3])
    assert hello == m.Hello(1, 3, "0123456789abcdef0123456789abcdef", 4242)
    from balloonlab.proto.framing import encode_frame
    assert encode_frame([0, 1, 1, hello.to_body()]) == frame

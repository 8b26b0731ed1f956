"""Each message class's compiled ``from_body``/``to_body``/``__init__`` agree with the general ones.

``proto.messages._compile`` writes straight-line code per class for the
request path; ``Message._from_body_general`` and ``Message._to_body_general``
(and a dataclass's own ``__init__``) are the reference. On random bodies
(the fuzzer's, built from each class's spec with fields missing, unknown,
of the wrong type or out of range) both give the same message, or the same
error with the same words.
"""
from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonlab.proto import messages as m
from balloonlab.proto.errors import MessageError
from scripts.fuzz import Input, make_body

ALL_CLASSES: list[type[m.Message]] = sorted(
    {cls for pair in m.REQUESTS.values() for cls in pair} | set(m.NOTIFICATIONS.values()),
    key=lambda c: c.__name__)


def _outcome(decode, body):   # noqa: ANN001, ANN202
    try:
        msg = decode(body)
    except Exception as exc:  # the exception itself is what is compared
        return ("error", type(exc), str(exc), getattr(exc, "field", None), getattr(exc, "code", None))
    return ("message", type(msg), [_plain(getattr(msg, name)) for name in msg.SPEC])


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.flags.writeable, value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return (type(value), value)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=512))
def test_compiled_from_body_agrees_with_the_general_path(data: bytes) -> None:
    inp = Input(data)
    for _ in range(1 + inp.below(4)):
        cls = inp.pick(ALL_CLASSES)
        body = make_body(inp, cls)
        assert _outcome(cls.from_body, body) == _outcome(cls._from_body_general, body), (cls.__name__, body)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_compiled_from_body_agrees_on_every_edge_value(cls: type[m.Message]) -> None:
    """Values at each inline test's edges, field by field, in bodies that are otherwise valid."""
    valid = {"int": 7, "number": 12.5, "str": "abc", "bin": b"\x01", "pages": b"\x00" * 16,
             "map": {"k": 1}, "stats": [1], "list": [1]}
    edges = [0, -0.0, 0.0, -1, 1, 2**64 - 1, -2**63, True, False, None, math.nan, math.inf, -math.inf,
             1e308, 5e-324, "", "x", b"", b"\x00" * 7, b"\x00" * 8, b"\x00" * 8 * m.MAX_PAGES_PER_MESSAGE,
             b"\x00" * 8 * (m.MAX_PAGES_PER_MESSAGE + 1), bytearray(8), [], [1], {}, {"a": 1}, {1: 1}, (1,)]
    base = {name: valid[kind] for name, kind in cls.SPEC.items()}
    bodies = [base, {}, [], None, base | {"extra": 1}]
    bodies += [{k: v for k, v in base.items() if k != name} for name in cls.SPEC]
    bodies += [{k: v for k, v in base.items() if k != name} | {"other": 1} for name in cls.SPEC]
    bodies += [base | {name: value} for name in cls.SPEC for value in edges]
    for body in bodies:
        assert _outcome(cls.from_body, body) == _outcome(cls._from_body_general, body), (cls.__name__, body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_compiled_to_body_is_byte_for_byte_the_general_one(data: bytes) -> None:
    inp = Input(data)
    cls = inp.pick(ALL_CLASSES)
    try:
        msg = cls.from_body(make_body(inp, cls))
    except MessageError:
        return
    # Page fields as the senders hold them: decoded views, fresh arrays, lists, other dtypes.
    changes = {}
    for name in msg._PAGE_FIELDS:
        pages = getattr(msg, name).tolist()
        changes[name] = inp.pick([pages, np.array(pages, dtype=np.uint64), np.array(pages, dtype=">u8"),
                                  np.array(pages, dtype=np.uint64)[::-1][::-1], getattr(msg, name)])
    msg = dataclasses.replace(msg, **changes)
    body, general = msg.to_body(), msg._to_body_general()
    assert list(body) == list(general)
    assert msgpack.packb(body, use_bin_type=True) == msgpack.packb(general, use_bin_type=True)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_compiled_init_takes_what_the_dataclass_init_took(cls: type[m.Message]) -> None:
    values = [object() for _ in cls.SPEC]
    by_position, by_name = cls(*values), cls(**dict(zip(cls.SPEC, values)))
    for name, value in zip(cls.SPEC, values):
        assert getattr(by_position, name) is value and getattr(by_name, name) is value
    last = dataclasses.fields(cls)[-1]
    if last.default is not dataclasses.MISSING:   # fields added later, with a default, come last
        assert getattr(cls(*values[:-1]), last.name) == last.default
    with pytest.raises(TypeError):
        cls(*values, object())
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(by_position, next(iter(cls.SPEC)), 1)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_a_message_class_behaves_as_the_frozen_slotted_dataclass_it_replaces(cls: type[m.Message]) -> None:
    """Built without the dataclass decorator (its exec per method cost every process ~15 ms at start), a
    message is what ``dataclass(frozen=True, slots=True)`` made of it: repr, equality, hash, fields,
    ``replace``, match args, frozen fields, pickling."""
    import pickle
    fields = dataclasses.fields(cls)
    assert [f.name for f in fields] == list(cls.SPEC) and cls.__slots__ == tuple(cls.SPEC)
    ref = dataclasses.make_dataclass(cls.__name__, [(f.name, f.type, dataclasses.field(default=f.default))
                                                    for f in fields], frozen=True, slots=True)
    ref.__qualname__ = cls.__qualname__
    values = [i * 3 + 1 for i in range(len(fields))]
    msg, twin, other = cls(*values), cls(*values), cls(*values[:-1], -7) if values else cls()
    want = ref(*values)
    assert repr(msg) == repr(want)
    assert msg == twin and hash(msg) == hash(twin) == hash(want)
    assert (msg != other) == bool(values) and msg != want     # another class is never equal
    assert cls.__match_args__ == ref.__match_args__
    assert [(f.name, f.default) for f in fields] == [(f.name, f.default) for f in dataclasses.fields(ref)]
    if values:
        assert dataclasses.replace(msg, **{fields[0].name: 99}) == cls(99, *values[1:])
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field"):
            setattr(msg, fields[0].name, 5)
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field"):
            delattr(msg, fields[0].name)
    assert pickle.loads(pickle.dumps(msg)) == msg
    assert cls.__init__.__annotations__ == {f.name: f.type for f in fields} | {"return": None}

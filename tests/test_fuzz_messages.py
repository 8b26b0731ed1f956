"""Fuzzing the message decoders with well-formed-but-wrong bodies (``scripts/fuzz.py`` target ``messages``).

Every message class decodes bodies built from its own spec with fields
missing, unknown, of the wrong type or out of range, or anything at all:
it returns a message of that class that survives a round trip, or raises
``MessageError`` -- nothing else. ``msg_type_of`` accepts only msgpack ints
that name a type.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scripts.fuzz import fuzz_messages


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_bodies_from_every_spec_with_mutations(data: bytes) -> None:
    fuzz_messages(data)

"""Fuzzing the frame decoder: random byte streams in random chunks (``scripts/fuzz.py`` target ``framing``).

Property: ``feed`` raises only after an oversized frame was reported in
band; nothing is decoded after it; the decoder never buffers more than one
allowed frame (bounded memory); end of stream raises at most a
``FrameError``. ``scripts/fuzz.py --target framing`` runs it for longer.
"""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from scripts.fuzz import MAX_FRAME, fuzz_framing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_streams(data: bytes) -> None:
    fuzz_framing(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(0, 255))
def test_well_framed_garbage_interleaved_with_an_oversized_header(bodies: list[bytes], cut: int) -> None:
    """Whole frames of junk, then possibly an oversized header: the shape streams from a hostile guest take."""
    stream = b"".join(struct.pack(">I", len(b)) + b for b in bodies)
    stream += struct.pack(">I", MAX_FRAME + 1 + cut) if cut % 2 else b""
    fuzz_framing(bytes([cut]) + stream)

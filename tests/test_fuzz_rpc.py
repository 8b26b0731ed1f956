"""Fuzzing the host's end of a connection (``scripts/fuzz.py`` target ``rpc``).

Envelopes of every kind, id and type, valid or not, with well-formed-but-
wrong bodies, garbage and oversized headers, in random chunks, into a
``GuestConnection`` with sync, async, coded-error and buggy handlers and
calls of its own outstanding. Nothing escapes to the event loop; the
connection's own calls end only in a reply or a protocol error; pending
and incoming requests and the receive buffer stay within their limits;
every byte written back is a well-formed envelope, and every error reply
was reported to the host's refusal counter.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scripts.fuzz import fuzz_rpc


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_random_envelopes_into_a_guest_connection(data: bytes) -> None:
    fuzz_rpc(data)


def test_the_target_notices_an_uncounted_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The property has teeth: an error reply that bypasses the host's counter is caught."""
    from balloonlab.hostd.session import GuestConnection
    from balloonlab.proto.rpc import RpcConnection

    monkeypatch.setattr(GuestConnection, "_send_error", RpcConnection._send_error)
    rng = np.random.default_rng(8)
    with pytest.raises(AssertionError):
        for _ in range(200):   # most random inputs earn an error reply somewhere
            fuzz_rpc(rng.bytes(512))

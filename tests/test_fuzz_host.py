"""Fuzzing host memory with a hostile guest's requests (``scripts/fuzz.py`` target ``host``).

Two guests on a tiny host; EPT faults, inflates, deflates, disk reads and
writes with gpfns and blocks in range, out of range and repeated, A/D
bitmaps of any length, reclaims whose shootdowns sometimes fail, ticks.
Only ``HostdError`` (each with a wire code) may come back, and host
memory's invariant must hold after every single operation. Guest stats
from anywhere pass the host's sanitizer as finite, bounded numbers.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scripts.fuzz import fuzz_host, main


@settings(max_examples=120, deadline=None)
@given(st.binary(max_size=2048))
def test_random_requests_keep_the_invariant(data: bytes) -> None:
    fuzz_host(data)


def test_the_fuzz_script_runs_a_short_session(capsys) -> None:
    assert main(["--target", "framing", "--engine", "hypothesis", "--seconds", "0.5", "--examples", "20"]) == 0
    assert "framing:" in capsys.readouterr().out

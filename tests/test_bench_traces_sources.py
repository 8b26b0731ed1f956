"""``bench.py traces`` on traces of programs it does not ship: a lackey log, a text or .npz trace, a window.

The benchmark's claim (the guest kernel against libCacheSim on real
programs' traces) must hold for programs a user brings, so the sources it
accepts are tested here without valgrind: a log is recognised as lackey's
and converted, anything else is read as a trace, the window is applied,
and the result is cached.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from balloonlab.guestd.workload.trace import load_npz_trace, write_npz_trace
from scripts.bench_traces import is_lackey_log, load_trace_file

LOG = b"""==123== Lackey, an example Valgrind tool
==123== Command: demo
I  04016c7e,3
 S 7ff000a38,8
 L 04222cac,8
 M 0421e4c0,4
 L 00000ffc,8
==123==
"""


def test_a_lackey_log_is_converted_and_windowed(tmp_path: Path) -> None:
    log = tmp_path / "prog.lackey"
    log.write_bytes(LOG)
    assert is_lackey_log(log)
    out = load_trace_file(log, tmp_path / "cache", skip_refs=1, max_refs=2)
    pages, writes = load_npz_trace(out)
    # S, L, M, L after the instruction fetch; skip the store, keep the next two (the modify is a write).
    assert pages.tolist() == [0x04222cac >> 12, 0x0421e4c0 >> 12]
    assert writes.tolist() == [False, True]
    assert load_trace_file(log, tmp_path / "cache", skip_refs=1, max_refs=2) == out   # cached


def test_a_text_or_npz_trace_is_read_as_a_trace(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("1\n2W\n3\n4 W\n5\n")
    assert not is_lackey_log(text)
    pages, writes = load_npz_trace(load_trace_file(text, tmp_path / "c", skip_refs=1, max_refs=3))
    assert pages.tolist() == [2, 3, 4] and writes.tolist() == [True, False, True]
    npz = tmp_path / "t.npz"
    write_npz_trace(npz, np.arange(10, dtype=np.uint64), np.zeros(10, bool))
    assert not is_lackey_log(npz)
    pages, _ = load_npz_trace(load_trace_file(npz, tmp_path / "c", skip_refs=0, max_refs=None))
    assert pages.tolist() == list(range(10))


def test_a_missing_trace_is_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        load_trace_file(tmp_path / "absent.lackey", tmp_path, skip_refs=0, max_refs=None)

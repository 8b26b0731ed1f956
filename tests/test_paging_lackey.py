"""Lackey traces: the streamed parser, the window kept, the metadata, and a real recording."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from balloonlab.guestd.errors import GuestdError, TraceFormatError
from balloonlab.guestd.workload.lackey import LackeyParser, convert_lackey_log, record_lackey
from balloonlab.guestd.workload.trace import load_npz_trace, read_trace_meta

LOG = b"""==123== Lackey, an example Valgrind tool
==123== Command: demo
I  04016c7e,3
 S 7ff000a38,8
 L 04222cac,8
 M 0421e4c0,4
I  04016c81,5
 L 00000ffc,8
 S 1fff,1
==123==
"""


def test_parser_reads_loads_stores_modifies_and_page_crossings() -> None:
    """One reference per access, its first byte's page; a second one when it crosses into the next page."""
    p = LackeyParser()
    pages, writes = p.feed(LOG)
    assert pages.tolist() == [0x7ff000a38 >> 12, 0x04222cac >> 12, 0x0421e4c0 >> 12, 0, 1, 1]
    assert writes.tolist() == [True, False, True, False, False, True]
    with_instr = LackeyParser(instructions=True).feed(LOG)[0]
    assert with_instr.tolist()[:2] == [0x04016c7e >> 12, 0x7ff000a38 >> 12] and with_instr.size == 8


def test_parser_is_the_same_fed_in_any_pieces() -> None:
    whole = LackeyParser().feed(LOG)
    rng = np.random.default_rng(0)
    for _ in range(20):
        cuts = sorted(rng.integers(0, len(LOG), 4).tolist())
        p = LackeyParser()
        parts = [p.feed(LOG[a:b]) for a, b in zip([0] + cuts, cuts + [len(LOG)])] + [p.close()]
        assert np.concatenate([x[0] for x in parts]).tolist() == whole[0].tolist()
        assert np.concatenate([x[1] for x in parts]).tolist() == whole[1].tolist()


def test_bad_lines_are_named() -> None:
    with pytest.raises(TraceFormatError, match="bad hex address"):
        LackeyParser().feed(b" L 12zz4,8\n")


def test_convert_keeps_the_window_and_writes_metadata(tmp_path: Path) -> None:
    log = tmp_path / "lackey.log"
    log.write_bytes(LOG * 10)                   # 60 references
    tr = convert_lackey_log(log, tmp_path / "t.npz", skip_refs=7, max_refs=20)
    pages, writes = load_npz_trace(tmp_path / "t.npz")
    full = LackeyParser().feed(LOG * 10)
    assert pages.tolist() == full[0][7:27].tolist() and writes.tolist() == full[1][7:27].tolist()
    meta = read_trace_meta(tmp_path / "t.npz")
    assert meta["skip_refs"] == 7 and meta["max_refs"] == 20 and meta["kept_refs"] == 20
    assert meta["page_bytes"] == 4096 and meta["source"] == "lackey-log" and meta["extra"]["log"] == str(log)
    assert tr.total_refs >= 27
    with pytest.raises(TraceFormatError, match="no lackey reference lines"):
        (tmp_path / "empty.log").write_bytes(b"==1== nothing\n")
        convert_lackey_log(tmp_path / "empty.log")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_record_a_real_program_and_stop_at_the_cap(tmp_path: Path) -> None:
    """``sort`` under lackey: the trace holds the window asked for and says which command made it."""
    words = tmp_path / "w.txt"
    words.write_text("\n".join(f"{i * 7919 % 1000:04d}" for i in range(500)) + "\n")
    out = tmp_path / "sort.npz"
    tr = record_lackey(["sort", str(words)], out, max_refs=30_000, skip_refs=1_000)
    pages, writes = load_npz_trace(out)
    assert pages.size == 30_000 and 0.05 < writes.mean() < 0.95
    assert np.unique(pages).size > 10
    meta = read_trace_meta(out)
    assert meta["command"] == ["sort", str(words)] and meta["source"] == "valgrind-lackey"
    assert meta["total_refs"] >= 31_000 and meta["kept_refs"] == 30_000 and tr.pages.size == 30_000
    with pytest.raises(GuestdError, match="exited with status"):
        record_lackey(["sort", str(tmp_path / "missing.txt")], None, max_refs=None)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_command_line_writes_a_trace(tmp_path: Path) -> None:
    out = tmp_path / "t.npz"
    r = subprocess.run([sys.executable, "-m", "balloonlab.guestd.workload.lackey", "-o", str(out), "--max-refs",
                        "5000", "--", "true"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_npz_trace(out)[0].size == 5000

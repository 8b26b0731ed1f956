"""balloonlab-trace: record under lackey, convert lackey logs and perf mem dumps, the shipped traces in a scenario."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from balloonlab.guestd.config import guest_config_from_mapping
from balloonlab.guestd.errors import GuestConfigError, TraceFormatError
from balloonlab.guestd.workload import build_workload
from balloonlab.guestd.workload.perfmem import parse_perf_mem
from balloonlab.guestd.workload.recorded import shipped_traces
from balloonlab.guestd.workload.trace import read_trace, read_trace_meta
from balloonlab.tracecli import main

LACKEY = b"""==123== Lackey, an example Valgrind tool
I  04016c7e,3
 S 7ff000a38,8
 L 04222cac,8
 M 0421e4c0,4
 L 00000ffc,8
==123==
"""

# `perf mem report -D -x,` and the space-separated form (whose ADDR some perf versions print as 0x016 + the address)
PERF_CSV = """# PID, TID, IP, ADDR, LOCAL WEIGHT, DSRC, SYMBOL
4242,4242,0x5581a3c0d1e2,0x7ffd2a8c3f10,33,0x68100142,/usr/bin/sort:compare
4242,4242,0x5581a3c0d1e9,0x7ffd2a8c4010,0,0x68100144,/usr/bin/sort:compare
4242,4242,0x5581a3c0d1f0,0x0,0,0x68100142,/usr/bin/sort:compare
"""
PERF_SPACES = """# PID, TID, IP, ADDR, LOCAL WEIGHT, DSRC, SYMBOL
 4242  4242 0x00005581a3c0d1e2 0x0167ffd2a8c3f10    33 0x68100142 /usr/bin/sort:compare
 4242  4242 0x00005581a3c0d1e9 0x00007ffd2a8c4010     0 0x68100144 /usr/bin/sort:compare
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_convert_a_lackey_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "prog.log"
    log.write_bytes(LACKEY)
    out = run(capsys, "convert", str(log))
    assert out["from"] == "lackey" and out["refs"] == 5 and out["out"] == str(tmp_path / "prog.npz")
    pages, writes = read_trace(tmp_path / "prog.npz")
    assert pages.tolist() == [0x7ff000a38 >> 12, 0x04222cac >> 12, 0x0421e4c0 >> 12, 0, 1]
    assert writes.tolist() == [True, False, True, False, False]
    meta = read_trace_meta(tmp_path / "prog.npz")
    assert meta["source"] == "lackey-log" and meta["extra"]["log"] == str(log)


@pytest.mark.parametrize("text", [PERF_CSV, PERF_SPACES])
def test_convert_a_perf_mem_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    report = tmp_path / "perf.txt"
    report.write_text(text)
    out = run(capsys, "convert", str(report), "-o", str(tmp_path / "p.npz"))
    assert out["from"] == "perf-mem"
    pages, writes = read_trace(tmp_path / "p.npz")
    assert pages.tolist() == [0x7ffd2a8c3f10 >> 12, 0x7ffd2a8c4010 >> 12]    # the sample without an address is left out
    assert writes.tolist() == [False, True]                                  # DSRC op 0x2 load, 0x4 store
    meta = read_trace_meta(tmp_path / "p.npz")
    assert meta["sampled"] is True and meta["samples"] == text.count("\n4242") + text.count("\n 4242")


def test_perf_mem_with_extra_columns_and_bad_lines() -> None:
    text = ("# PID, TID, IP, ADDR, PHYS ADDR, LOCAL WEIGHT, DSRC, SYMBOL\n"
            "1,1,0x1,0x5000,0x99000,3,0x68100144,a:b\n")
    tr = parse_perf_mem(text)
    assert tr.pages.tolist() == [5] and tr.writes.tolist() == [True]
    with pytest.raises(TraceFormatError, match=r"perf.txt:2: bad ADDR or DSRC"):
        parse_perf_mem("# PID, TID, IP, ADDR, LOCAL WEIGHT, DSRC, SYMBOL\n1,1,0x1,zz,3,0x2,a:b\n", "perf.txt")
    with pytest.raises(TraceFormatError, match="no perf mem samples"):
        parse_perf_mem("# PID, TID, IP, ADDR, LOCAL WEIGHT, DSRC, SYMBOL\n")


def test_bad_input_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "nothere.log")]) == 2
    assert "nothere.log" in capsys.readouterr().err
    assert main(["program", "sqlite"]) == 2     # a recipe, not a shipped trace
    assert "did you mean 'sqlite3'" in capsys.readouterr().err
    assert main(["record"]) == 2
    assert "give the command after --" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_record_a_real_program(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("\n".join(f"w{(i * 7919) % 1000:04d}" for i in range(2000)) + "\n")
    out = tmp_path / "sort.npz"
    res = subprocess.run([sys.executable, "-m", "balloonlab.tracecli", "record", "-o", str(out), "--skip", "1000",
                          "--max-refs", "20000", "--", "sort", str(words)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["refs"] == 20000 and got["distinct_pages"] > 10 and 0 < got["write_frac"] < 1
    meta = read_trace_meta(out)
    assert meta["command"] == ["sort", str(words)] and meta["skip_refs"] == 1000 and meta["max_refs"] == 20000
    assert meta["extra"]["program"] == "sort" and meta["page_bytes"] == 4096


def test_shipped_traces_are_listed_and_run_as_a_workload(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = shipped_traces()
    assert len(shipped) >= 2, shipped
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for name, path in shipped.items():
        assert name in listing
        meta = read_trace_meta(path)
        assert meta["command"] and meta["source"] == "valgrind-lackey" and meta["extra"]["program"] == name
        pages, _ = read_trace(path)
        distinct = int(np.unique(pages).size)
        cfg = guest_config_from_mapping({"ram_mib": 8, "regions": [{"name": "prog", "kind": "anon",
                                                                     "pages": distinct}],
                                         "workload": [{"kind": "trace", "program": name, "region": "prog",
                                                       "loop": True}]})
        w = build_workload(cfg.workload, cfg.kernel.layout, np.random.default_rng(0))
        p, _ = w.next_batch(pages.size + 10)
        assert p.size == pages.size + 10 and int(np.unique(p).size) == distinct
    with pytest.raises(GuestConfigError, match=r"guest.workload\[0\].program: unknown shipped trace 'sortt'; "
                                               r"did you mean 'sort'\?"):
        guest_config_from_mapping({"workload": [{"kind": "trace", "program": "sortt", "region": "heap"}]})

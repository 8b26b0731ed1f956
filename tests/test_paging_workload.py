"""Workload generators, their composition, and trace readers."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from balloonlab.guestd.errors import GuestConfigError, TraceFormatError
from balloonlab.guestd.replay import main as replay_main
from balloonlab.guestd.workload import Layout, Region, build_workload, parse_text_trace, read_trace, write_npz_trace

LAYOUT = Layout([Region("db", "file", 1000), Region("heap", "anon", 500), Region("big", "anon", 3000)])


def gen(spec: dict, seed: int = 1):
    return build_workload([spec], LAYOUT, np.random.default_rng(seed))


def test_same_seed_same_batches_and_pages_stay_in_their_region() -> None:
    for kind, region in [("db", "db"), ("zipf", "big"), ("anon-hot", "heap"), ("scan", "db"),
                         ("phases", "big"), ("anon-cold", "heap")]:
        a, b = gen({"kind": kind, "region": region}), gen({"kind": kind, "region": region})
        pa, wa = a.next_batch(700)
        pb, wb = b.next_batch(700)
        assert np.array_equal(pa, pb) and np.array_equal(wa, wb), kind
        start, n = LAYOUT.span(region)
        assert pa.dtype == np.uint64 and wa.dtype == bool
        assert (pa >= start).all() and (pa < start + n).all(), kind


def test_db_is_zipf_skewed() -> None:
    p, w = gen({"kind": "db", "region": "db", "theta": 1.0, "write_frac": 0.05}).next_batch(100_000)
    counts = np.sort(np.bincount(p.astype(np.int64), minlength=1000))[::-1]
    assert counts[:100].sum() > 0.6 * p.size          # the hottest 10 % take most references
    assert 0.03 < w.mean() < 0.07


def test_anon_cold_touches_each_page_once_then_idles() -> None:
    w = gen({"kind": "anon-cold", "region": "heap"})
    p1, w1 = w.next_batch(300)
    p2, _ = w.next_batch(300)
    assert np.array_equal(np.concatenate([p1, p2]), np.arange(1000, 1500, dtype=np.uint64))
    assert w1.all() and w.exhausted and w.next_batch(10)[0].size == 0


def test_scan_is_sequential_and_loops_unless_told() -> None:
    p, w = gen({"kind": "scan", "region": "db"}).next_batch(1500)
    assert np.array_equal(p, np.arange(1500, dtype=np.uint64) % 1000) and not w.any()
    once = gen({"kind": "scan", "region": "db", "loop": False})
    assert once.next_batch(1500)[0].size == 1000 and once.exhausted


def test_phases_move_the_working_set() -> None:
    w = gen({"kind": "phases", "region": "big", "ws_pages": 100, "phase_refs": 1000, "shift_pages": 500})
    first, _ = w.next_batch(1000)
    second, _ = w.next_batch(1000)
    s = LAYOUT.span("big")[0]
    assert set((first - s).tolist()) <= set(range(100)) and set((second - s).tolist()) <= set(range(500, 600))


def test_mix_interleaves_by_weight_and_drops_exhausted_parts() -> None:
    w = build_workload([{"kind": "anon-hot", "region": "heap", "weight": 3},
                        {"kind": "db", "region": "db", "weight": 1},
                        {"kind": "anon-cold", "region": "big", "weight": 1}], LAYOUT, np.random.default_rng(3))
    p, _ = w.next_batch(10_000)
    heap = ((p >= 1000) & (p < 1500)).mean()
    assert 0.5 < heap < 0.7
    for _ in range(10):
        w.next_batch(10_000)
    p, _ = w.next_batch(10_000)
    assert p.size == 10_000 and not (p >= 1500).any()     # the cold region is done, the rest go on


def test_build_errors_name_the_problem() -> None:
    with pytest.raises(GuestConfigError, match=r"workload\[0\].kind: must be one of \['db', 'zipf', .*got 'dbx'; "
                                               r"did you mean 'db'\?"):
        gen({"kind": "dbx", "region": "db"})
    with pytest.raises(GuestConfigError, match=r"workload\[0\].region: unknown region 'nope'"):
        gen({"kind": "db", "region": "nope"})
    with pytest.raises(GuestConfigError, match=r"workload\[0\].thetta: unknown key; did you mean 'theta'\?"):
        gen({"kind": "db", "region": "db", "thetta": 1})
    with pytest.raises(GuestConfigError, match=r"workload\[0\].write_frac: must be <= 1, got 2"):
        gen({"kind": "anon-hot", "region": "heap", "write_frac": 2})


def test_trace_workload_replays_a_file_densely(tmp_path: Path) -> None:
    f = tmp_path / "t.npz"
    write_npz_trace(f, np.array([10, 99, 10, 5], np.uint64), np.array([0, 1, 0, 0], bool))
    w = gen({"kind": "trace", "region": "heap", "path": str(f)})
    p, wr = w.next_batch(10)
    assert p.tolist() == [1001, 1002, 1001, 1000] and wr.tolist() == [False, True, False, False]
    assert w.exhausted


def test_text_trace_formats() -> None:
    p, w = parse_text_trace("1\n2\n3\n")
    assert p.tolist() == [1, 2, 3] and not w.any()
    p, w = parse_text_trace("1, 2W,3,\n# comment\n\n0x10w\n5 W\n6 0\n7 r  # trailing\n8\t1\n")
    assert p.tolist() == [1, 2, 3, 16, 5, 6, 7, 8]
    assert w.tolist() == [False, True, False, True, True, False, False, True]
    p, w = parse_text_trace("5 1\n6 0\n")                  # the fast path's two-column form
    assert p.tolist() == [5, 6] and w.tolist() == [True, False]
    big = str((1 << 64) - 1)
    assert parse_text_trace(big + "\n")[0].tolist() == [(1 << 64) - 1]


@pytest.mark.parametrize("text,line,what", [
    ("1\n2\nfoo\n", 3, "bad page number 'foo'"),
    ("1\n2 3 4\n", 2, "bad entry"),
    ("1\n2 X\n", 2, "bad access flag 'X'"),
    ("1\n-3\n", 2, "page number -3 outside"),
    ("18446744073709551616\n", 1, "outside 0..2^64-1"),
])
def test_text_trace_errors_say_file_and_line(text: str, line: int, what: str) -> None:
    with pytest.raises(TraceFormatError, match=f"t.txt:{line}: .*{re.escape(what)}") as e:
        parse_text_trace(text, "t.txt")
    assert e.value.line == line and e.value.path == "t.txt"


def test_npz_trace_checks(tmp_path: Path) -> None:
    good = tmp_path / "g.npz"
    np.savez(good, page=np.array([3, 4], np.int32))
    p, w = read_trace(good)
    assert p.dtype == np.uint64 and p.tolist() == [3, 4] and not w.any()
    bad = tmp_path / "b.npz"
    np.savez(bad, pages=np.array([1]))
    with pytest.raises(TraceFormatError, match=r"b.npz: no array 'page'.*pages"):
        read_trace(bad)
    np.savez(bad, page=np.array([1, 2]), write=np.array([1]))
    with pytest.raises(TraceFormatError, match="'write' has shape"):
        read_trace(bad)
    with pytest.raises(TraceFormatError, match="cannot read"):
        read_trace(tmp_path / "missing.txt")


def test_replay_cli_reads_stdin_npz_and_reports(tmp_path: Path, monkeypatch, capsys) -> None:
    buf = io.BytesIO()
    np.savez(buf, page=np.array([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5], np.uint64))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(buf.getvalue())))
    assert replay_main(["--policy", "fifo", "--frames", "4", "-"]) == 0
    out = capsys.readouterr().out
    assert "faults       10" in out and "fault ratio  0.8333" in out
    trace = tmp_path / "t.txt"
    trace.write_text("1W\n2\n1\n3\n4\n")
    assert replay_main(["--policy", "car", "--frames", "2", str(trace), "--json"]) == 0
    assert capsys.readouterr().out.startswith('{"policy": "car", "frames": 2, "refs": 5')
    assert replay_main(["--policy", "lfu", "--frames", "2", str(trace)]) == 2
    assert "unknown replacement policy 'lfu'" in capsys.readouterr().err
    trace.write_text("1\nx\n")
    assert replay_main(["--policy", "lru", "--frames", "2", str(trace)]) == 2
    assert f"{trace}:2: bad page number 'x'" in capsys.readouterr().err

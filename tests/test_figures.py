"""The report's figures read as figures: on logs written here (tests.dashlogs), drawn as SVG and read back as text.

SVG keeps its text (``svg.fonttype = none``), so what a figure says can be
checked: a guest drawn leaving, the throughput ceiling, the baseline and a
deadlocked variant named on the bars, a lock-wait figure with its cycle, the
host's RAM by owner, a zero row instead of a symlog axis.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from balloonlab.analysis import plots as pl
from balloonlab.analysis.logs import load_variant
from balloonlab.analysis.report import baseline_variant, render_report
from tests.dashlogs import FakeRun


def _series(run: FakeRun) -> pl.VariantSeries:
    return pl.variant_series(load_variant(run.variant, run.dir, warn=False))


def _svg(path: Path) -> str:
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    return text


@pytest.fixture
def run(tmp_path: Path) -> FakeRun:
    r = FakeRun(tmp_path / "v1", guests=3)
    for t in range(4, 60, 5):
        r.tick(t)
        if t == 29:
            r.write("host", {"event": "guest_disconnected", "guest": 2, "reason": "killed", "tick": 31, "vt_us": 320000})
            r.guests = 2   # guest 2 logs no more; the host's table drops it
    r.write("host", {"event": "run_finished", "reason": "completed", "ticks": 60, "vt_us": 600000, "ram_pages": 3072})
    return r


def test_every_figure_in_every_format_asked_for(tmp_path: Path) -> None:
    r = FakeRun(tmp_path / "v1", guests=1)
    for t in range(4, 30, 5):
        r.tick(t)
    out = tmp_path / "out"
    out.mkdir()
    with pl.formats(("png", "svg", "pdf")):
        written = pl.plot_variant(_series(r), out)
    assert written
    for p in written:
        assert p.path.suffix == ".png" and [f.suffix for f in p.files] == [".png", ".svg", ".pdf"]
        assert all(f.exists() and f.stat().st_size > 1000 for f in p.files)
        assert p.files[2].read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="jpeg"):
        pl.parse_formats("png,jpeg")
    assert pl.parse_formats(" SVG, png ,svg") == ("svg", "png")


def test_a_guest_that_left_is_drawn_leaving_under_the_explained_ceiling(run: FakeRun, tmp_path: Path) -> None:
    with pl.formats(("svg",)):
        written = {p.path.stem: p for p in pl.plot_variant(_series(run), tmp_path)}
    thr = _svg(written["v1-guest-throughput"].path)
    assert "guest 2 left: killed" in thr
    assert "ceiling: 1M references per virtual s" in thr and "mem_ref_us" in thr
    mem = _svg(written["v1-guest-memory"].path)
    assert "left: killed" in mem


def test_identical_guests_are_drawn_once_and_named_together(tmp_path: Path) -> None:
    r = FakeRun(tmp_path / "v1", guests=3)
    for t in range(4, 30, 5):
        r.write("host", r.host_line(t))
        for g in range(3):
            st = r.guest_stats(0, t)   # every guest logs guest 0's numbers
            st["guest"] = g
            r.write(g, st)
    with pl.formats(("svg",)):
        path = pl._plot_guest_lines(_series(r), tmp_path / "wss.png", "ws", "pages", lambda g: g["working_set_pages"])
    assert "guests 0, 1, 2 (identical)" in _svg(path)


def test_many_guests_become_a_median_and_bands(tmp_path: Path) -> None:
    r = FakeRun(tmp_path / "v1", guests=pl.MAX_LINES + 3)
    for t in range(4, 30, 5):
        r.tick(t)
    with pl.formats(("svg",)):
        path = pl._plot_guest_lines(_series(r), tmp_path / "pff.png", "pff", "faults", lambda g: g["pff"])
    text = _svg(path)
    assert f"all {pl.MAX_LINES + 3} guests (min–max)" in text and "median guest" in text
    assert "guest 3" not in text   # no line per guest


def test_host_ram_is_drawn_by_owner_with_its_size_and_the_overcommit(run: FakeRun, tmp_path: Path) -> None:
    with pl.formats(("svg",)):
        path = pl._plot_host_memory(_series(run), tmp_path / "host.png")
    text = _svg(path)
    for owner in ("guest 0", "guest 1", "guest 2", "disk cache", "I/O buffers", "free", "host RAM"):
        assert f">{owner}<" in text, owner
    assert "12 MiB = 3,072 frames" in text and "guests' RAM 1.00x of it" in text


def test_a_rate_spanning_decades_gets_a_log_axis_with_a_zero_row_not_symlog() -> None:
    plt = pl._plt()
    fig, ax = plt.subplots()
    put = pl._log_zero_axis(ax, [np.array([0.0, 0.5, 3.0, 40.0, 5000.0])], below=1.0)
    assert put is not None and ax.get_yscale() == "log"
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "<1" and "1k" in labels and not any("^" in x or "10" == x[:2] and "$" in x for x in labels)
    assert np.allclose(put(np.array([0.0, 0.5, 3.0])), [0.1, 0.1, 3.0])
    fig2, ax2 = plt.subplots()
    assert pl._log_zero_axis(ax2, [np.array([10.0, 50.0, 200.0])]) is None   # two decades or less: linear
    plt.close("all")


def _summary(**variants: dict) -> dict:
    base = {"ticks": 60, "virtual_s": 0.6, "reason": "completed", "refs_per_vsec": 100.0, "io_per_reclaimed_page": 1.0,
            "guests_lost": {}, "deadlocked": False, "host": {"ram_pages": 3072}, "guests": []}
    return {"scenario": "fake", "seed": 1, "variants": {n: dict(base, **v) for n, v in variants.items()}}


def test_the_baseline_is_never_a_variant_that_deadlocked_or_lost_guests(tmp_path: Path) -> None:
    s = _summary(naive={"deadlocked": True, "ticks": 5, "reason": "deadlock", "refs_per_vsec": 400.0},
                 lossy={"guests_lost": {"1": "killed"}}, ordered={"refs_per_vsec": 50.0}, other={})
    names = list(s["variants"])
    assert baseline_variant(names, s["variants"]) == "ordered"
    with pl.formats(("svg",)):
        written = {p.path.stem: p for p in pl.plot_across(s, {}, tmp_path, names, baseline="ordered")}
    text = _svg(written["throughput"].path)
    assert "deadlocked after 5 ticks" in text and "1 guest lost" in text and "(baseline)" in text
    assert "(2.00x)" in text          # other against ordered
    assert "(8.00x)" not in text      # naive's 400 is never a ratio


def test_the_report_header_gives_host_ram_in_mib_and_the_overcommit_ratio(run: FakeRun, tmp_path: Path) -> None:
    (tmp_path / "scenario.toml").write_text("[variants.naive]\n[variants.v1]\n")
    s = _summary(naive={"deadlocked": True, "ticks": 5, "reason": "deadlock"}, v1={})
    logs = [load_variant("v1", run.dir, warn=False)]
    cfg = json.loads((run.dir / "host-config.json").read_text())
    cfg["guests"] = [{"id": g, "ram_pages": 1536} for g in range(3)]
    logs[0].config = cfg
    text = render_report(tmp_path, s, logs)
    assert "host RAM 12.0 MiB (3,072 frames), **overcommit 1.50x**" in text
    assert "Ratios in parentheses are against `v1`" in text and "`naive` deadlocked after 5 ticks" in text
    assert "naive (deadlocked after 5 ticks; no ratio)" in text


def test_a_deadlock_gets_its_lock_timeline_and_wait_for_graph(tmp_path: Path) -> None:
    r = FakeRun(tmp_path / "naive", variant="naive", guests=2)
    r.tick(4)
    r.write("host", {"event": "lock_order_violation", "vt_us": 100.0, "owner": "guest-0/vcpu", "level": "warning"})
    cycle = [{"owner": "guest-0/vcpu", "holds": "L_vmem", "holds_lock": "L_vmem@guest-0", "held_since_vt_us": 44100.0,
              "waits_for": "L_hostmem", "waits_for_lock": "L_hostmem@host", "site": "disk_read", "since_vt_us": 44200.0},
             {"owner": "host/reclaim", "holds": "L_hostmem", "holds_lock": "L_hostmem@host", "held_since_vt_us": 40000.0,
              "waits_for": "L_vmem", "waits_for_lock": "L_vmem@guest-0", "site": "shootdown", "since_vt_us": 40000.0}]
    r.write("host", {"event": "deadlock_detected", "cycle": cycle, "length": 2, "action": "ending the run"})
    r.write("host", {"event": "run_finished", "reason": "deadlock", "ticks": 5, "vt_us": 50000})
    with pl.formats(("svg",)):
        path = pl._plot_locks(_series(r), tmp_path / "naive-locks.png")
    text = _svg(path)
    for words in ("1 cycle, ended the run", "1 lock-order violation", "guest-0/vcpu", "host/reclaim",
                  "waits for L_hostmem@host", "waits for L_vmem@guest-0", "holds L_vmem@guest-0",
                  "deadlocked: the host ended the run here", "closed at 0.0442 s"):
        assert words in text, words
    quiet = FakeRun(tmp_path / "x", variant="x")
    quiet.tick(4)
    assert pl._plot_locks(_series(quiet), tmp_path / "x-locks.png") is None   # no lock model, no figure

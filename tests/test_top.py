"""balloonlab-top: the table from a run directory or a dashboard's URL, its sorting keys, in tmux as a person uses it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from balloonlab import top
from balloonlab.dashboard.server import Dashboard
from tests.dashlogs import FakeRun
from tests.procs import REPO, wait_until


def _text(latest: dict, **kw) -> str:
    console = Console(width=220, record=True, file=open(os.devnull, "w"))
    console.print(top.render(latest, **kw))
    return console.export_text()


def _rows(text: str) -> list[list[str]]:
    """The table's rows as cells (the lines between the header and the caption)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("GID"))
    out = []
    for ln in lines[start + 1:]:
        if ln.startswith("sorted by"):
            break
        out.append(ln.split())
    return out


@pytest.fixture
def run(tmp_path: Path) -> FakeRun:
    r = FakeRun(tmp_path, guests=3)
    r.tick(4)
    r.tick(9)
    return r


def test_one_row_per_guest_with_the_logs_numbers_and_the_host_header(run: FakeRun) -> None:
    text = _text(top.RunDirSource(run.dir).latest())
    assert "fake / v1" in text and "seed 11" in text and "tick 10/100" in text
    assert "overcommit 1.00x" in text          # 3 guests x 1024 pages on 3072 frames
    assert re.search(r"RAM 12\.0 MiB \(3,072 frames\)", text)
    header = text.splitlines()[next(i for i, ln in enumerate(text.splitlines()) if ln.lstrip().startswith("GID"))]
    cols = header.split()
    rows = _rows(text)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    for g, r in enumerate(rows):
        cell = dict(zip(cols, r))
        assert cell["MCTLSZ"] == f"{(100 * g + 9) / 256:.1f}"    # the guest's balloon, MiB
        assert cell["MCTLTGT"] == f"{(100 * g + 10) / 256:.1f}"  # the host's target
        assert cell["SWCUR"] == f"{5 * g / 256:.1f}"
        assert cell["PFF"] == f"{10 * (3 - g)}"
        assert cell["REFS/s"] == f"{1000 * (g + 1) * 5 / 0.05 / 1e3:.1f}k"


@pytest.mark.parametrize("sort,reverse,order", [("p", False, ["0", "1", "2"]), ("b", False, ["2", "1", "0"]),
                                                ("b", True, ["0", "1", "2"]), ("t", False, ["2", "1", "0"]),
                                                ("i", True, ["2", "1", "0"])])
def test_sorting_keys(run: FakeRun, sort: str, reverse: bool, order: list[str]) -> None:
    text = _text(top.RunDirSource(run.dir).latest(), sort=sort, reverse=reverse)
    assert [r[0] for r in _rows(text)] == order
    assert f"sorted by {top.SORT_KEYS[sort][0]}" in text


def test_a_guest_that_left_is_shown_as_gone(run: FakeRun) -> None:
    run.write("host", {"event": "guest_disconnected", "guest": 2, "reason": "killed", "tick": 10, "vt_us": 101000})
    run.tick(14)
    text = _text(top.RunDirSource(run.dir).latest())
    assert "left: killed" in [ln for ln in text.splitlines() if ln.lstrip().startswith("2 ")][0]


def test_once_from_the_command_line_and_bad_targets(run: FakeRun, capsys, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a terminal: the table is as wide as COLUMNS says, else 200 (pytest-xdist's workers set COLUMNS=80).
    monkeypatch.delenv("COLUMNS", raising=False)
    assert top.main([str(run.dir), "--once", "--sort", "balloon"]) == 0
    out = capsys.readouterr().out
    assert [r[0] for r in _rows(out)] == ["2", "1", "0"]
    assert top.main([str(tmp_path / "nope"), "--once"]) == 2
    assert "nope" in capsys.readouterr().err
    assert top.main(["http://127.0.0.1:9/none/", "--once"]) == 2


async def test_a_dashboards_url_gives_the_same_table(run: FakeRun) -> None:
    dash = Dashboard(run.dir, live=False)
    url = await dash.start()
    try:
        import asyncio
        from_url = await asyncio.to_thread(lambda: top.UrlSource(url).latest())
    finally:
        await dash.close()
    assert _text(from_url) == _text(top.RunDirSource(run.dir).latest())


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_in_tmux_it_redraws_sorts_on_a_key_and_quits(run: FakeRun, tmp_path: Path) -> None:
    session = f"bltop{os.getpid()}"
    env_prefix = f"PYTHONPATH={REPO} TERM=xterm-256color COLUMNS=200 LINES=40"
    cmd = f"{env_prefix} {sys.executable} -m balloonlab.top {run.dir} --interval 0.2"
    sock = ["-L", session]
    subprocess.run(["tmux", *sock, "new-session", "-d", "-s", session, "-x", "200", "-y", "40", cmd], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", *sock, "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout

    def order() -> list[str]:
        try:
            return [r[0] for r in _rows(screen())]
        except StopIteration:
            return []

    try:
        try:
            wait_until(lambda: order() == ["0", "1", "2"], 20, what="the first screen")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen:\n{screen()}") from None
        run.tick(14)   # the next tick is picked up without a key
        wait_until(lambda: "tick 15/100" in screen(), 10, what="the next tick redrawn")
        subprocess.run(["tmux", *sock, "send-keys", "-t", session, "b"], check=True)
        wait_until(lambda: order() == ["2", "1", "0"], 10, what="sorted by balloon size")
        assert "sorted by MCTLSZ" in screen()
        subprocess.run(["tmux", *sock, "send-keys", "-t", session, "r"], check=True)
        wait_until(lambda: order() == ["0", "1", "2"], 10, what="the order reversed")
        subprocess.run(["tmux", *sock, "send-keys", "-t", session, "q"], check=True)
        wait_until(lambda: subprocess.run(["tmux", *sock, "has-session", "-t", session],
                                          capture_output=True).returncode != 0, 10, what="q ends balloonlab-top")
    finally:
        subprocess.run(["tmux", *sock, "kill-server"], capture_output=True)
        time.sleep(0)

"""The dashboard in a real browser: headless Chromium on a live run, then on its replay.

A short run whose balloons step up every few ticks is launched with
``--dashboard`` and ``--pace`` (else it can be over before the page has drawn it); Chromium opens the URL the launcher prints as soon as it is
printed. A MutationObserver (installed by the test, not the page) records
what the page shows at each change, so the test sees every tick the page
drew even on a loaded machine. Then the page's last tick is checked against
the run's own summary.json: tick, each guest's balloon and references, the
event counts. The same run is then replayed with ``balloonlab-dashboard``:
played to the end, checked against summary.json again, and scrubbed back.

Skips without Chromium (``apt-get install chromium``; ``.ci/run`` installs it).
``BALLOONLAB_SCREENSHOTS=DIR`` keeps screenshots of both phases there.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cdp import Chromium, chromium_path
from tests.procs import REPO, dump_logs, procs_mentioning

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(chromium_path() is None,
                                 reason="no chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)")]

SCENARIO = """
[scenario]
name = "tests-dashboard"
description = "tests only: two tiny guests whose balloons step up every few ticks"
seed = 4
guests = 2
ticks = 150
metrics_every_ticks = 3

[host]
overcommit = 1.0

[guest]
ram_mib = 4
kernel_mib = 0.25
policy = "esc"
batch_refs = 1024
regions = [
  { name = "db", kind = "file", mib = 1.0 },
  { name = "heap", kind = "anon", mib = 1 },
]
workload = [
  { kind = "db", region = "db", weight = 3 },
  { kind = "anon-hot", region = "heap", weight = 1 },
]

[balloon]
policy = "sweep"
max_percent = 80
params = { start_tick = 6, step_ticks = 9, step_fraction = 0.05, max_fraction = 0.6 }

[costs]
mem_ref_us = 10.0
"""

# 1.5 virtual s at 0.3 virtual s per wall s: the run lasts 5 wall s or more however fast this machine runs it,
# so the page, polled every 0.25 s, has ticks to follow while it is live.
PACE = 0.3

# Records, at every change of the page, what it shows: status, tick, guest 0's balloon bar, the events listed.
OBSERVE = """
window.__seen = [];
(() => {
  const snap = () => {
    const b = document.querySelector('#guests tr[data-guest="0"] rect[data-kind="balloon_pages"]');
    window.__seen.push({status: document.body.dataset.status, tick: document.body.dataset.tick || "",
                        frame: document.body.dataset.frame || "", balloon: b ? b.getAttribute('width') : null,
                        events: document.querySelectorAll('#events li').length});
  };
  new MutationObserver(snap).observe(document.body, {subtree: true, childList: true, attributes: true});
  snap();
  return true;
})()
"""

PAGE_STATE = """
(() => ({
  status: document.body.dataset.status, tick: document.body.dataset.tick, frame: document.body.dataset.frame,
  frames: document.body.dataset.frames,
  guests: [...document.querySelectorAll('#guests tbody tr')].map(r => ({
    id: r.dataset.guest, balloon: r.dataset.balloonPages, refs: r.dataset.refs, lost: r.dataset.lostPages,
    target: r.dataset.targetPages})),
  counts: Object.fromEntries([...document.querySelectorAll('#event-counts span')].map(s => [s.dataset.event, +s.dataset.count])),
  events: document.querySelectorAll('#events li').length,
  summaryShown: !document.getElementById('summary-panel').hidden,
  summaryText: document.getElementById('summary').innerText,
}))()
"""


def _env() -> dict[str, str]:
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))


async def _read_url(stream: asyncio.StreamReader, marker: str, timeout_s: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        line = await asyncio.wait_for(stream.readline(), max(0.1, deadline - time.monotonic()))
        if not line:
            raise AssertionError(f"no {marker!r} line before the process closed its output:\n" + "".join(seen))
        text = line.decode(errors="replace")
        seen.append(text)
        if marker in text:
            return next(w for w in text.split() if w.startswith("http://"))


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode(errors="replace"))


def _check_against_summary(page: dict[str, Any], summary: dict[str, Any]) -> None:
    (v,) = summary["variants"].values()
    assert page["tick"] == str(v["ticks"] - 1), "the page's last tick is the run's last"
    by_id = {str(g["id"]): g for g in v["guests"]}
    assert sorted(g["id"] for g in page["guests"]) == sorted(by_id)
    for g in page["guests"]:
        s = by_id[g["id"]]
        assert int(g["balloon"]) == s["balloon_pages"], f"guest {g['id']}: balloon on the page vs summary.json"
        assert int(g["refs"]) == s["refs"], f"guest {g['id']}: references on the page vs summary.json"
        assert int(g["lost"]) == s["lost_pages"] == 0
    assert page["counts"], "the page lists event counts"
    for name, n in page["counts"].items():
        assert n == v["event_counts"].get(name), f"{name}: {n} on the page, {v['event_counts'].get(name)} in summary.json"
    assert page["counts"]["balloon_target_set"] >= 4
    assert page["summaryShown"] and f"{v['ticks']} · {v['virtual_s']:g} · completed" in page["summaryText"]


def _changes(seen: list[dict[str, Any]], status: str) -> tuple[set[str], set[Any], set[int]]:
    mine = [s for s in seen if s["status"] == status and s["tick"]]
    return {s["tick"] for s in mine}, {s["balloon"] for s in mine}, {s["events"] for s in mine}


async def test_a_live_run_and_its_replay_in_headless_chromium(tmp_path: Path) -> None:
    scenario = tmp_path / "tests-dashboard.toml"
    scenario.write_text(SCENARIO)
    run_dir = tmp_path / "run"
    shots = os.environ.get("BALLOONLAB_SCREENSHOTS")
    launcher = replay = None
    err: list[str] = []
    try:
        async with Chromium(width=1400, height=1000) as browser:
            # --- live: the page opens while the run starts, and follows it -----------------------
            launcher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "balloonlab.launch", "--scenario", str(scenario), "--run-dir", str(run_dir),
                "--dashboard", "--no-report", "--pace", str(PACE), cwd=REPO, env=_env(), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True)
            assert launcher.stderr is not None
            url = await _read_url(launcher.stderr, "dashboard at", 30, err)
            drain = asyncio.create_task(_drain(launcher.stderr, err))
            assert url.startswith("http://127.0.0.1:")
            await browser.navigate(url)
            await browser.wait_for("document.getElementById('guests') !== null", 15, "the page loaded")
            await browser.evaluate(OBSERVE)
            await browser.wait_for("document.body.dataset.status === 'live'", 30, "the page says LIVE")
            if shots:
                await browser.wait_for("+document.body.dataset.frames > 20", 60, "some ticks drawn")
                await browser.screenshot(Path(shots) / "dashboard-live.png")
            rc = await asyncio.wait_for(launcher.wait(), 150)
            await drain
            assert rc == 0, "".join(err) + dump_logs(run_dir)
            await browser.wait_for("document.body.dataset.status === 'finished'", 15, "the page says the run is over")
            seen = await browser.evaluate("window.__seen")
            ticks, balloons, events = _changes(seen, "live")
            assert len(ticks) >= 3, f"the page followed the run tick by tick while live: {sorted(ticks)}"
            assert len(balloons) >= 2, f"guest 0's balloon bar grew while live: {balloons}"
            assert len(events) >= 2, f"the event list grew while live: {sorted(events)}"
            summary = json.loads((run_dir / "summary.json").read_text())
            live_end = await browser.evaluate(PAGE_STATE)
            _check_against_summary(live_end, summary)
            assert procs_mentioning(str(run_dir)) == []

            # --- replay: the same page over the finished run, played, then scrubbed back -----------------
            replay = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "balloonlab.dashboard.cli", str(run_dir), cwd=REPO, env=_env(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
            assert replay.stdout is not None
            out: list[str] = []
            url = await _read_url(replay.stdout, "replay at", 30, out)
            await browser.navigate(url)
            await browser.wait_for("document.body.dataset.status === 'replay' && document.body.dataset.frame === '0'",
                                   15, "the replay opens at its first tick")
            await browser.evaluate(OBSERVE)
            frames = int(await browser.evaluate("document.body.dataset.frames"))
            assert frames == int(live_end["frames"])
            first = await browser.evaluate(PAGE_STATE)
            assert first["events"] < live_end["events"], "at the first tick only the events so far are listed"
            await browser.evaluate("(() => { const s = document.getElementById('speed'); s.value = '25';"
                                   " s.dispatchEvent(new Event('change')); document.getElementById('play').click();"
                                   " return true; })()")
            await browser.wait_for(f"document.body.dataset.frame === '{frames - 1}'", 60, "the replay played to its end")
            seen = await browser.evaluate("window.__seen")
            ticks, balloons, events = _changes(seen, "replay")
            # a loaded machine may draw fewer frames than the timer steps through: several, not all
            assert len(ticks) >= 5 and len(balloons) >= 2 and len(events) >= 2, (ticks, balloons, events)
            replay_end = await browser.evaluate(PAGE_STATE)
            _check_against_summary(replay_end, summary)
            assert replay_end["events"] == live_end["events"]
            if shots:
                await browser.screenshot(Path(shots) / "dashboard-replay-end.png")
            mid = frames // 2
            await browser.evaluate(f"(() => {{ const s = document.getElementById('slider'); s.value = '{mid}';"
                                   " s.dispatchEvent(new Event('input')); return true; })()")
            await browser.wait_for(f"document.body.dataset.frame === '{mid}'", 10, "the slider moves the page")
            middle = await browser.evaluate(PAGE_STATE)
            assert int(middle["tick"]) < int(replay_end["tick"]) and middle["events"] < replay_end["events"]
            assert int(middle["guests"][0]["balloon"]) < int(replay_end["guests"][0]["balloon"])
            if shots:
                await browser.screenshot(Path(shots) / "dashboard-replay-middle.png")
            assert not [c for c in browser.console if c.startswith("exception")], browser.console
            replay.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(replay.wait(), 15) == 0
    finally:
        for p in (launcher, replay):
            if p is not None and p.returncode is None:
                os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
    assert procs_mentioning(str(run_dir)) == []
    assert procs_mentioning("bl-chromium-") == []

"""The launcher as a user runs it: real host and guest processes over sockets.

Every test here starts ``python -m balloonlab.launch`` (which starts ``hostd``
and N ``guestd`` processes), bounds its own wall time, and checks that no
process of the run is left afterwards. The scenario is ``tests-tiny``: four
4 MiB guests and cheap ticks, so each run takes a few wall seconds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.procs import REPO, Launched, dump_logs, procs_mentioning, run_launcher, wait_until

pytestmark = pytest.mark.multiprocess

TINY = "tests-tiny"
RUN_TIMEOUT_S = 90.0


# --- helpers (also used by the other multi-process tests) ----------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines log; fails on a line that is not a JSON object."""
    events = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        obj = json.loads(line)  # raises on a broken line: that is the failure we want
        assert isinstance(obj, dict), f"{path}:{n} is not a JSON object: {line[:200]}"
        events.append(obj)
    return events


def read_jsonl_partial(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a log still being written (the last line may be half-written)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def host_tick(run_dir: Path) -> int:
    """The last tick the host logged as completed (-1 if none yet)."""
    ticks = [e["tick"] for e in events_named(read_jsonl_partial(run_dir / "host.jsonl"), "tick_completed")]
    return max(ticks, default=-1)


def guest_pid(run_dir: Path, guest_id: int) -> int | None:
    """The pid the host recorded when the guest connected."""
    for e in events_named(read_jsonl_partial(run_dir / "host.jsonl"), "guest_connected"):
        if e.get("guest") == guest_id:
            return int(e["pid"])
    return None


def assert_no_leftovers(run_dir: Path) -> None:
    left = procs_mentioning(str(run_dir))
    assert not left, f"processes left behind: {left}"


def _fail_msg(res: Any, run_dir: Path) -> str:
    out = getattr(res, "stdout", None) or getattr(res, "out", "")
    err = getattr(res, "stderr", None) or getattr(res, "err", "")
    return f"stdout:\n{out}\nstderr:\n{err}\n{dump_logs(run_dir)}"


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


# --- a whole run ------------------------------------------------------------------------------


def _check_complete_run(run_dir: Path, n_guests: int, ticks: int) -> dict[str, Any]:
    logs = sorted(p.name for p in run_dir.glob("*.jsonl"))
    assert logs == sorted(["host.jsonl", *(f"guest-{i}.jsonl" for i in range(n_guests))])
    for name in logs:
        events = read_jsonl(run_dir / name)
        assert events, f"{name} is empty"
        proc = "host" if name == "host.jsonl" else "guest"
        for e in events:
            assert {"event", "level", "timestamp"} <= e.keys(), e
            assert e["proc"] == proc, e
    for gid in range(n_guests):
        fin = events_named(read_jsonl(run_dir / f"guest-{gid}.jsonl"), "guest_finished")
        assert len(fin) == 1 and fin[0]["ticks"] == ticks, fin
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["scenario"] == TINY and summary["seed"] == 5
    assert list(summary["variants"]) == ["default"]
    v = summary["variants"]["default"]
    assert v["ticks"] == ticks and v["virtual_s"] == pytest.approx(ticks * 0.01)
    assert v["reason"] == "completed" and v["guests_lost"] == {}
    assert v["lost_pages"] == 0
    assert v["host"]["invariant_violations"] == 0 and v["host"]["total_frames"] > 0
    assert [g["id"] for g in v["guests"]] == list(range(n_guests))
    for g in v["guests"]:
        assert g["refs"] > 0 and g["refs_per_vsec"] > 0 and g["lost_pages"] == 0, g
        # refs_per_vsec is refs over the guest's own virtual seconds
        assert g["refs_per_vsec"] == pytest.approx(g["refs"] / g["virtual_s"], rel=1e-3)
    assert (run_dir / "scenario.toml").read_text() == (REPO / "scripts/scenarios/tests-tiny.toml").read_text()
    return summary


def test_host_and_four_guests_complete_a_run(tmp_path: Path) -> None:
    """Host + 4 guests run 30 ticks; every process leaves a JSON log; summary.json has the documented keys."""
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", TINY, "--ticks", "30", "--run-dir", str(run_dir), "--no-report",
                       timeout_s=RUN_TIMEOUT_S)
    assert res.returncode == 0, _fail_msg(res, run_dir)
    _check_complete_run(run_dir, 4, 30)
    assert "lost pages: 0" in res.stdout  # the summary table is printed at the end
    assert_no_leftovers(run_dir)


def test_tcp_transport(tmp_path: Path) -> None:
    """The same run over TCP on loopback."""
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", TINY, "--ticks", "20", "--transport", "tcp", "--run-dir", str(run_dir),
                       "--no-report", timeout_s=RUN_TIMEOUT_S)
    assert res.returncode == 0, _fail_msg(res, run_dir)
    _check_complete_run(run_dir, 4, 20)
    started = events_named(read_jsonl(run_dir / "host.jsonl"), "run_started")
    assert started[0]["address"].startswith("tcp://127.0.0.1:")
    assert_no_leftovers(run_dir)


def test_sixteen_guests_leave_seventeen_logs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", TINY, "--guests", "16", "--ticks", "50", "--run-dir", str(run_dir),
                       "--no-report", timeout_s=RUN_TIMEOUT_S)
    assert res.returncode == 0, _fail_msg(res, run_dir)
    logs = list(run_dir.glob("*.jsonl"))
    assert len(logs) == 17
    for p in logs:
        assert read_jsonl(p)
    summary = json.loads((run_dir / "summary.json").read_text())
    v = summary["variants"]["default"]
    assert len(v["guests"]) == 16 and all(g["finished"] for g in v["guests"])
    assert v["lost_pages"] == 0 and v["ticks"] == 50
    assert_no_leftovers(run_dir)


# --- failures -----------------------------------------------------------------------------------


def test_killed_guest_leaves_host_and_others_running(tmp_path: Path) -> None:
    """SIGKILL one guest mid-run: the host releases its frames and the others run to the end.

    The variant is not "completed": summary.json says it was degraded, and who was lost, and the
    launcher exits 1, since the scenario did not expect to lose that guest.
    """
    run_dir = tmp_path / "run"
    ticks = 300
    # paced (3 wall s at least): unpaced, 300 of these ticks can be over before the kill lands
    run = Launched("--scenario", TINY, "--ticks", str(ticks), "--run-dir", str(run_dir), "--no-report", "--pace", "1")
    try:
        wait_until(lambda: host_tick(run_dir) >= 9 and guest_pid(run_dir, 2), 60.0, what="tick 10 in host.jsonl")
        pid = guest_pid(run_dir, 2)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        rc = run.wait(RUN_TIMEOUT_S)
    finally:
        run.close()
    assert rc == 1, _fail_msg(run, run_dir)
    assert "[default] degraded: guest 2 lost" in run.err, run.err
    host = read_jsonl(run_dir / "host.jsonl")
    gone = events_named(host, "guest_disconnected")
    assert [e["guest"] for e in gone] == [2], gone
    assert 9 <= gone[0]["tick"] < ticks, "the guest was not killed mid-run"
    assert gone[0]["released_frames"] > 0
    assert not events_named(host, "invariant_violated")
    fin = events_named(host, "run_finished")[0]
    assert fin["reason"] == "completed" and fin["ticks"] == ticks
    assert fin["invariant_violations"] == 0
    assert "2" not in fin["guests_memory"]
    summary = json.loads((run_dir / "summary.json").read_text())
    v = summary["variants"]["default"]
    assert list(v["guests_lost"]) == ["2"]
    assert v["status"] == "degraded" and v["status_reasons"][0].startswith("guest 2 lost: "), v["status_reasons"]
    assert v["lost_pages"] == 0 and v["lost_pages_host"] == 0 and v["audit_ok"] is True
    for gid in (0, 1, 3):
        done = events_named(read_jsonl(run_dir / f"guest-{gid}.jsonl"), "guest_finished")
        assert done and done[0]["ticks"] == ticks, f"guest {gid} did not run to the end"
    assert "guest-2 was killed by SIGKILL" in run.err
    assert_no_leftovers(run_dir)


def test_bad_token_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """A guest started by hand with a wrong BALLOONLAB_TOKEN exits 4 and says why; the run goes on."""
    run_dir = tmp_path / "run"
    run = Launched("--scenario", TINY, "--ticks", "100000", "--run-dir", str(run_dir), "--no-report")
    try:
        wait_until(lambda: host_tick(run_dir) >= 0, 60.0, what="the first tick")
        address = events_named(read_jsonl_partial(run_dir / "host.jsonl"), "run_started")[0]["address"]
        intruder = subprocess.run([sys.executable, "-m", "balloonlab.guestd", "--address", address, "--guest-id", "1"],
                                  cwd=REPO, env=_env(BALLOONLAB_TOKEN="not-the-token"), capture_output=True,
                                  text=True, timeout=60)
        assert intruder.returncode == 4, intruder.stderr
        assert "refused guest 1" in intruder.stderr and "bad token" in intruder.stderr, intruder.stderr
        # Without --log the structured log goes to stderr too; the plain message is the guestd[1] line.
        said = [line for line in intruder.stderr.splitlines() if line.startswith("guestd[1]: ")]
        assert len(said) == 1 and said[0].count("BAD_TOKEN") == 1, intruder.stderr  # the code, said once
        assert "not-the-token" not in intruder.stderr
        refused = events_named(read_jsonl_partial(run_dir / "host.jsonl"), "guest_refused")
        assert refused and refused[0]["code"] == "BAD_TOKEN", refused
        # The real guests are untouched: ticks keep completing after the refusal.
        at = host_tick(run_dir)
        wait_until(lambda: host_tick(run_dir) > at, 30.0, what="ticks after the refusal")
        run.proc.send_signal(signal.SIGINT)
        rc = run.wait(RUN_TIMEOUT_S)
    finally:
        run.close()
    assert rc == 130, _fail_msg(run, run_dir)
    host = read_jsonl(run_dir / "host.jsonl")
    assert not events_named(host, "guest_disconnected")
    for e in host:  # the token never reaches a log
        assert "not-the-token" not in json.dumps(e)
    assert_no_leftovers(run_dir)


def test_sigint_to_the_launcher_stops_everything(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the launcher alone) mid-run: exit 130 and no process of the run is left."""
    run_dir = tmp_path / "run"
    run = Launched("--scenario", TINY, "--ticks", "100000", "--run-dir", str(run_dir), "--no-report")
    try:
        wait_until(lambda: host_tick(run_dir) >= 4, 60.0, what="tick 5 in host.jsonl")
        from balloonlab.runner import default_guest_start
        forked = default_guest_start() == "fork"
        assert len(procs_mentioning(str(run_dir))) == 6 + forked  # launcher, host, 4 guests (and the fork server)
        run.proc.send_signal(signal.SIGINT)
        rc = run.wait(RUN_TIMEOUT_S)
    finally:
        run.close()
    assert rc == 130, _fail_msg(run, run_dir)
    assert "interrupted" in run.err
    assert_no_leftovers(run_dir)
    # The host was stopped first and ended the run for its guests: nobody is reported lost, every
    # process closed its log, and the host's tick count matches its virtual time.
    host = read_jsonl(run_dir / "host.jsonl")
    fin = events_named(host, "run_finished")
    assert fin and fin[0]["reason"].startswith("signal"), fin
    assert fin[0]["guests_lost"] == {} and not events_named(host, "guest_disconnected")
    assert fin[0]["vt_us"] == fin[0]["ticks"] * 10_000
    for gid in range(4):
        done = events_named(read_jsonl(run_dir / f"guest-{gid}.jsonl"), "guest_finished")
        assert done and done[0]["reason"].startswith("signal"), done
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["variants"]["default"]["guests_lost"] == {}


@pytest.mark.parametrize("name, text, key", [
    ("unknown-key.toml", "[scenario]\nguests = 2\nticks = 3\nbogus_knob = 1\n", "bogus_knob"),
    ("wrong-type.toml", "[scenario]\nticks = 3\n[host]\nram_mib = \"lots\"\n", "ram_mib"),
    ("guest-key.toml", "[scenario]\nticks = 3\n[guest]\nram_mib = 4\nram_gib = 1\n", "ram_gib"),
    ("variant-type.toml", "[scenario]\nticks = 3\n[variants.v]\nballoon = { policy = \"static\", "
                          "params = { fraction = \"half\" } }\n", "fraction"),
    ("order.toml", "[scenario]\nticks = 3\n[host]\nrequest_order = \"random\"\n", "request_order"),
    ("order-locks.toml", "[scenario]\nticks = 3\n[host]\nrequest_order = \"virtual-time\"\n"
                         "[locks]\nprotocol = \"ordered\"\n", "request_order"),
])
def test_broken_scenario_exits_2_naming_file_and_key(tmp_path: Path, name: str, text: str, key: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    run_dir = tmp_path / "run"
    res = run_launcher("--scenario", str(path), "--run-dir", str(run_dir), timeout_s=60)
    assert res.returncode == 2, res.stderr
    assert name in res.stderr and key in res.stderr, res.stderr
    assert not run_dir.exists(), "no run directory for a scenario that never ran"


def test_missing_scenario_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "no-such-scenario.toml"
    res = run_launcher("--scenario", str(path), "--run-dir", str(tmp_path / "run"), timeout_s=60)
    assert res.returncode == 2
    assert str(path) in res.stderr and "no such file" in res.stderr, res.stderr
    res = run_launcher("--scenario", "no-such-scenario", "--run-dir", str(tmp_path / "run"), timeout_s=60)
    assert res.returncode == 2
    assert "no-such-scenario" in res.stderr and "known" in res.stderr, res.stderr

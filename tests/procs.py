"""Helpers for tests that run real processes: start, bound, reap, find leftovers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["REPO", "launcher_cmd", "run_launcher", "procs_mentioning", "wait_until", "dump_logs", "Launched",
           "run_started", "run_counts"]

REPO = Path(__file__).resolve().parent.parent


def launcher_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "balloonlab.launch", *args]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra or {})
    return env


def run_launcher(*args: str, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the launcher to the end (``env``: added to the environment); on timeout kill it and everything it started."""
    proc = subprocess.Popen(launcher_cmd(*args), cwd=REPO, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"launcher {args} did not finish in {timeout_s} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Launched:
    """A launcher running in the background; always reaped by ``close``."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(launcher_cmd(*args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out = ""
        self.err = ""

    def wait(self, timeout_s: float) -> int:
        try:
            self.out, self.err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"launcher did not finish in {timeout_s} s\nstderr:\n{self.err}")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.out, self.err = self.proc.communicate()


def python_prints(code: str, timeout_s: float = 60.0) -> str:
    """What ``python -c code`` prints (stripped), run from the repository in a fresh interpreter; it must exit 0."""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def procs_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (zombies excluded)."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if text in cmd and state != "Z":
            found.append((int(entry), cmd))
    return found


def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.05, what: str = "condition",
               detail: Callable[[], str] | None = None) -> None:
    """Poll ``pred`` until true; fail with ``what`` (and ``detail()``, e.g. the run's logs) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{more}")
        time.sleep(interval_s)


def dump_logs(run_dir: Path, max_lines: int = 40) -> str:
    """The tail of every log in a run directory, for failure messages."""
    parts = []
    for p in sorted(Path(run_dir).rglob("*")):
        if p.suffix in (".jsonl", ".stderr") and p.is_file():
            lines = p.read_text(errors="replace").splitlines()[-max_lines:]
            parts.append(f"--- {p}\n" + "\n".join(lines))
    return "\n".join(parts)


def run_started(run_dir: Path) -> dict:
    """The host's ``run_started`` event of a run directory."""
    for line in (run_dir / "host.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "run_started":
            return event
    raise AssertionError(f"no run_started in {run_dir / 'host.jsonl'}")


def _no_wall(value: object) -> object:
    if isinstance(value, dict):
        return {k: _no_wall(v) for k, v in value.items() if "wall" not in k}
    return value


def run_counts(run_dir: Path, variant: str = "default") -> object:
    """A run's summary of one variant without its wall-clock figures: what must not depend on how it ran."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return _no_wall({k: summary["variants"][variant][k] for k in ("host", "guests", "lost_pages", "ticks")})

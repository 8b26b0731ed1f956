"""One cell of a sweep, as a Dask task: ``balloonlab-launch`` in a child process, its summary back.

The run is a child process (the launcher, which starts the host and the
guests), not a call in the worker: a worker is a threaded process, and a
run's processes must not be forked from it; a run that hangs is killed
(its whole process group) after ``timeout_s`` without taking the worker
along. The worker must have balloonlab installed; a scenario or policy file
must be at the same path on every worker (a built-in scenario needs
nothing). The run directory is created on the worker's machine, at the
path the client chose (with a shared file system, in the sweep's
directory); the summary comes back in the result, and the client writes
the records.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["run_cell", "launcher_argv", "stop_running"]

_TAIL_CHARS = 2000
# Launchers running in this process (an embedded cluster's tasks): an interrupted sweep stops them.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def launcher_argv(task: dict[str, Any]) -> list[str]:
    """The ``balloonlab-launch`` command line of a task (values as TOML literals, so types survive)."""
    argv = [sys.executable, "-m", "balloonlab.launch", "--scenario", str(task["scenario"]),
            "--seed", str(task["seed"]), "--run-dir", str(task["run_dir"]), "--no-report"]
    if task.get("dashboard"):
        argv.append("--dashboard")
    for flag, key in (("--guests", "guests"), ("--ticks", "ticks"), ("--duration", "duration_s"),
                      ("--variant", "variant")):
        if task.get(key) is not None:
            argv += [flag, str(task[key])]
    for path, value in task.get("settings", []):
        argv += ["--set", f"{path}={json.dumps(value)}"]
    return argv


def run_cell(task: dict[str, Any]) -> dict[str, Any]:
    """Run one cell to its end; returns ``{ok, exit_status, summary, wall_s, worker, error}``."""
    run_dir = Path(task["run_dir"])
    if run_dir.exists():   # a failed earlier attempt: start clean, its logs would mix with these
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.launch.log"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    t0 = time.monotonic()
    error = None
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(launcher_argv(task), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        watcher = None
        if task.get("dashboard"):   # the run's URL, for whoever watches the sweep (dashboards.jsonl)
            watcher = threading.Thread(target=_publish_dashboard, args=(task, log_path, proc), daemon=True)
            watcher.start()
        try:
            rc = proc.wait(timeout=task.get("timeout_s"))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = proc.wait()
            error = f"timed out after {task.get('timeout_s')} s (killed)"
        except BaseException:
            _kill_group(proc)   # cancelled: nothing of the run may outlive the task
            proc.wait()
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
            if watcher is not None:
                watcher.join(5.0)
    wall_s = time.monotonic() - t0
    summary = None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    if rc != 0 and error is None:
        error = f"balloonlab-launch exited with {rc}"
    if error is not None:
        try:
            tail = log_path.read_text(errors="replace")[-_TAIL_CHARS:]
        except OSError:
            tail = ""
        error = f"{error}: {tail.strip()}" if tail.strip() else error
    return {"ok": rc == 0 and summary is not None, "exit_status": rc, "summary": summary,
            "wall_s": round(wall_s, 3), "worker": _worker_name(), "error": error}


_DASHBOARD_LINE = "balloonlab: dashboard at "


def _publish_dashboard(task: dict[str, Any], log_path: Path, proc: subprocess.Popen) -> None:
    """Append the run's dashboard URL to ``dashboards.jsonl`` beside the sweep's runs once the launcher prints it."""
    out = Path(task["run_dir"]).parent.parent / "dashboards.jsonl"
    while True:
        running = proc.poll() is None
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith(_DASHBOARD_LINE):
                record = {"cell": task["key"], "url": line[len(_DASHBOARD_LINE):].strip(), "run_dir": task["run_dir"],
                          "worker": _worker_name()}
                with _RUNNING_LOCK, open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                return
        if not running:
            return
        time.sleep(0.2)   # polling a log file another process writes; bounded by the run's life


def _worker_name() -> str:
    """The Dask worker's name and its machine (just the machine outside a worker)."""
    try:
        from distributed import get_worker
        return f"{get_worker().name}@{socket.gethostname()}"
    except (ImportError, ValueError):
        return socket.gethostname()


def stop_running() -> None:
    """Stop every launcher this process started (SIGTERM: each stops its run in order) and reap them."""
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

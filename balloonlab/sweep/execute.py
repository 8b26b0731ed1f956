"""Running a sweep's cells on Dask distributed: an embedded LocalCluster, or a scheduler's address.

The client submits every cell not yet finished (``cells/KEY.json`` with
status ``ok`` in the sweep's directory), as many at a time as the cluster
has worker threads; as each finishes it writes that cell's record at once,
so a sweep stopped at any point resumes where it was. A failed cell (the
run failed, timed out, or its worker died) is reported and submitted once
more; if it fails again its record says ``failed`` with the error, and the
sweep goes on. A resumed sweep tries failed cells again.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from balloonlab.proto.errors import ConfigError

from .cell import run_cell, stop_running
from .progress import SweepProgress
from .spec import Cell, SweepSpec

__all__ = ["default_workers", "run_cells", "read_records", "write_record", "SweepError", "MAX_ATTEMPTS"]

MAX_ATTEMPTS = 2   # a failed cell is retried once


class SweepError(ConfigError):
    """A sweep that cannot start: no scheduler at the address, another sweep in the directory, ..."""


def default_workers() -> int:
    """Runs side by side on the embedded cluster: half the cores, at least two where there are two.

    A run is a host and N guest processes, but they wait on each other much
    of the time (the tick barrier, requests in virtual-time order): on the
    2-core machine, six swap-storm runs took 25.5 s two at a time and 37.0 s
    one at a time (README, "Sweeps").
    """
    cores = os.cpu_count() or 1
    return min(cores, max(2, cores // 2))


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for path in sorted((Path(out) / "cells").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue   # a record cut short by a crash: the cell simply runs again
        if isinstance(rec, dict) and rec.get("key") == path.stem:
            records[path.stem] = rec
    return records


def write_record(out: Path, record: dict[str, Any]) -> Path:
    cells = Path(out) / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    path = cells / f"{record['key']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)   # a record is whole or absent, whenever the sweep is stopped
    return path


def _task(spec: SweepSpec, cell: Cell, out: Path, timeout_s: float | None, dashboard: bool = False) -> dict[str, Any]:
    return {"key": cell.key, "dashboard": dashboard, "scenario": spec.scenario, "seed": cell.seed, "guests": spec.guests,
            "ticks": spec.ticks, "duration_s": spec.duration_s, "variant": spec.variant,
            "settings": [list(s) for s in (*spec.settings, *cell.values)],
            "run_dir": str((Path(out) / "runs" / cell.key).absolute()), "timeout_s": timeout_s}


def _client(scheduler: str | None, workers: int | None) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster
    if scheduler:
        try:
            return Client(scheduler, timeout="15s"), None
        except (OSError, TimeoutError) as exc:
            raise SweepError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    # Threads, not processes: each task only supervises a launcher process, which does the work.
    cluster = LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=False,
                           dashboard_address=None, silence_logs=logging.ERROR)
    return Client(cluster), cluster


def run_cells(spec: SweepSpec, cells: Iterable[Cell], out: Path, *, scheduler: str | None = None,
              workers: int | None = None, timeout_s: float | None = None, resumed: int = 0, total: int | None = None,
              progress: bool = True, on_record: Callable[[dict[str, Any]], None] | None = None,
              dashboard: bool = False) -> list[dict[str, Any]]:
    """Run ``cells`` on the cluster; write and return each one's record (ok, or failed after a retry)."""
    from distributed import as_completed

    todo = list(cells)
    records: list[dict[str, Any]] = []
    if not todo:
        return records
    bar = SweepProgress(total if total is not None else len(todo) + resumed, resumed,
                        sys.stderr if progress else None)
    client, cluster = _client(scheduler, workers)
    try:
        where = scheduler or f"an embedded LocalCluster of {len(client.scheduler_info()['workers'])} worker(s)"
        bar.show(f"sweep: {len(todo)} cell(s) to run on {where}")
        pending: dict[Any, tuple[Cell, int]] = {}
        for cell in todo:
            fut = client.submit(run_cell, _task(spec, cell, out, timeout_s, dashboard), key=f"cell-{cell.key}-1",
                                pure=False)
            pending[fut] = (cell, 1)
        done_iter = as_completed(list(pending))
        for fut in done_iter:
            cell, attempt = pending.pop(fut)
            try:
                result = fut.result()
            except Exception as exc:  # noqa: BLE001 -- a worker that died, a task that raised: a failed cell
                result = {"ok": False, "exit_status": None, "summary": None, "wall_s": None, "worker": None,
                          "error": f"{type(exc).__name__}: {exc}"}
            if not result.get("ok") and attempt < MAX_ATTEMPTS:
                bar.retrying += 1
                bar.show(f"sweep: cell {cell.key} failed (attempt {attempt}): {_short(result.get('error'))}; "
                         f"retrying")
                again = client.submit(run_cell, _task(spec, cell, out, timeout_s, dashboard),
                                      key=f"cell-{cell.key}-{attempt + 1}", pure=False)
                pending[again] = (cell, attempt + 1)
                done_iter.add(again)
                continue
            if attempt > 1:
                bar.retrying -= 1
            record = {"key": cell.key, "values": [list(v) for v in cell.values], "seed": cell.seed,
                      "status": "ok" if result.get("ok") else "failed", "attempts": attempt,
                      "run_dir": _task(spec, cell, out, timeout_s, dashboard)["run_dir"], **result}
            record.pop("ok", None)
            write_record(out, record)
            records.append(record)
            bar.done += 1
            note = None
            if record["status"] != "ok":
                bar.failed += 1
                note = f"sweep: cell {cell.key} FAILED after {attempt} attempts: {_short(record.get('error'))}"
            bar.show(note)
            if on_record is not None:
                on_record(record)
    except KeyboardInterrupt:
        # The embedded cluster's tasks are threads of this process: their launchers must not outlive it.
        stop_running()
        raise
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return records


def _short(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= limit else s[:limit - 1] + "…"

"""Real programs to trace with lackey: small, deterministic workloads of installed tools.

Each ``TracedProgram`` knows how to prepare its input in a work folder and
the command to run there. ``record_program(name, cache_dir)`` records it
once (``guestd.workload.lackey``) and reuses the cached ``.npz`` after that;
the cache key includes the command and the window, so a changed recipe is
recorded afresh.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GuestdError
from .lackey import record_lackey

__all__ = ["TracedProgram", "PROGRAMS", "default_cache_dir", "record_program"]

_SQL = """\
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 40000)
  INSERT INTO t SELECT x, (x * 7919) % 100003, printf('%040d', x * x) FROM c;
CREATE INDEX tk ON t(k);
SELECT count(*), sum(length(v)) FROM t WHERE k BETWEEN 1000 AND 60000;
SELECT k % 97, count(*) FROM t GROUP BY k % 97 ORDER BY 2 DESC LIMIT 5;
UPDATE t SET v = upper(v) WHERE id % 3 = 0;
SELECT a.id, b.id FROM t a JOIN t b ON a.k = b.id WHERE a.id < 5000 ORDER BY a.v LIMIT 3;
"""

_JSON = ("import json\n"
         "d = [{'id': i, 'name': 'item%d' % i, 'tags': [i % 7, i % 11, 'x' * (i % 5)], 'score': i * 0.5}"
         " for i in range(40000)]\n"
         "s = json.dumps(d)\n"
         "e = json.loads(s)\n"
         "assert e == d\n")


def _sqlite(work: Path) -> tuple[list[str], Path | None]:
    (work / "load.sql").write_text(_SQL)
    return ["sqlite3", ":memory:"], work / "load.sql"


def _sort(work: Path) -> tuple[list[str], Path | None]:
    rng = np.random.default_rng(12345)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    words = letters[rng.integers(0, 26, (200_000, 12))]
    text = b"\n".join(bytes(row) for row in words) + b"\n"
    (work / "words.txt").write_bytes(text)
    return ["sort", "--parallel=1", "-S", "64M", str(work / "words.txt")], None


def _python_json(work: Path) -> tuple[list[str], Path | None]:
    (work / "roundtrip.py").write_text(_JSON)
    return [sys.executable, "-S", str(work / "roundtrip.py")], None


@dataclass(frozen=True)
class TracedProgram:
    name: str
    tool: str                       # the executable that must be installed
    prepare: Callable[[Path], tuple[list[str], Path | None]]   # work dir -> (command, stdin file)
    skip_refs: int = 1_000_000      # start-up (loader, libc init) left out
    max_refs: int = 10_000_000
    about: str = ""


PROGRAMS: dict[str, TracedProgram] = {
    "sqlite3": TracedProgram("sqlite3", "sqlite3", _sqlite,
                             about="sqlite3 in memory: 40k-row insert, an index, scans, a group-by, an update, a join"),
    "sort": TracedProgram("sort", "sort", _sort, about="GNU sort of 200k random 12-letter words"),
    "python-json": TracedProgram("python-json", sys.executable, _python_json,
                                 about="CPython: json.dumps and json.loads of 40k small records"),
}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "balloonlab" / "traces"


def record_program(name: str, cache_dir: Path | None = None, *, refresh: bool = False) -> Path:
    """The cached ``.npz`` trace of program ``name``, recorded under lackey if missing."""
    try:
        prog = PROGRAMS[name]
    except KeyError:
        raise GuestdError(f"unknown traced program {name!r}; known: {', '.join(sorted(PROGRAMS))}") from None
    if shutil.which(prog.tool) is None:
        raise GuestdError(f"traced program {name!r} needs {prog.tool!r}, which is not installed")
    cache_dir = cache_dir or default_cache_dir()
    work = cache_dir / f"{name}.work"
    work.mkdir(parents=True, exist_ok=True)
    command, stdin = prog.prepare(work)
    recipe = json.dumps({"cmd": command, "stdin": stdin.read_text() if stdin else None, "skip": prog.skip_refs,
                         "max": prog.max_refs, "v": 1}, sort_keys=True)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    out = cache_dir / f"{name}-{key}.npz"
    if out.exists() and not refresh:
        return out
    tmp = out.with_suffix(".tmp.npz")
    tr = record_lackey(command, None, max_refs=prog.max_refs, skip_refs=prog.skip_refs, stdin=stdin, cwd=work)
    tr.extra["program"] = name
    tr.save(tmp)
    tmp.replace(out)
    return out

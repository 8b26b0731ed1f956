"""Profiling a host or guest process in place (``BALLOONLAB_PROFILE_DIR``).

A process's per-request cost only shows under the real load of the other
processes, so the host and every guest can run under cProfile inside a real
run and leave their stats in one directory, one file each, for pstats.
"""
from __future__ import annotations

import os
from typing import Callable

__all__ = ["PROFILE_DIR_ENV", "run_profiled"]

PROFILE_DIR_ENV = "BALLOONLAB_PROFILE_DIR"


def run_profiled(main: Callable[[], int], stats_name: str) -> int:
    """``main()``; under cProfile when ``BALLOONLAB_PROFILE_DIR`` is set, its stats in ``DIR/NAME-PID.prof``."""
    profile_dir = os.environ.get(PROFILE_DIR_ENV)
    if not profile_dir:
        return main()
    import cProfile
    prof = cProfile.Profile()
    try:
        return prof.runcall(main)
    finally:
        prof.dump_stats(os.path.join(profile_dir, f"{stats_name}-{os.getpid()}.prof"))

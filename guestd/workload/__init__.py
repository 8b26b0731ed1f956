"""Workloads: the layout of a guest's pages, generators of reference batches, trace readers.

Nothing here knows about replacement policies.
"""
from __future__ import annotations

from .build import build_workload
from .driver import run_workload
from .generators import (WORKLOADS, AnonColdWorkload, AnonHotWorkload, DbWorkload, Mix, PhasesWorkload,
                         ScanWorkload, TraceWorkload, Workload, ZipfWorkload)
from .layout import ANON, FILE, Layout, Region
from .trace import load_npz_trace, parse_text_trace, read_trace, write_npz_trace

__all__ = [
    "ANON", "FILE", "Layout", "Region", "Workload", "WORKLOADS", "DbWorkload", "ZipfWorkload",
    "AnonColdWorkload", "AnonHotWorkload", "ScanWorkload", "PhasesWorkload", "TraceWorkload", "Mix",
    "build_workload", "run_workload", "read_trace", "parse_text_trace", "load_npz_trace", "write_npz_trace",
]

"""bench.py ioamp's CPU sampler: a process that ended keeps its last CPU; a pid the machine reused is not ours."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scripts.bench_ioamp import _CpuSampler


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_a_reused_pid_ends_the_process_we_knew_and_adds_nothing_of_the_new_one(tmp_path: Path) -> None:
    s = _CpuSampler(tmp_path)
    me = os.getpid()
    s.cpu_s[me] = ("host", 5.0, _start_time(me) + 1)      # "ours" was another process with this pid
    s._read(me, "host")
    assert me not in s.cpu_s and s.gone == [("host", 5.0)]
    assert s.total("host") == 5.0                          # not 5.0 plus this test's own CPU


def test_a_process_that_ended_keeps_its_last_read(tmp_path: Path) -> None:
    s = _CpuSampler(tmp_path)
    # it runs until its stdin closes: alive for the first read, gone for the second
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; sum(range(10**6)); print('ready', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = proc.pid
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    s._read(pid, "host")
    first = s.cpu_s[pid][1]
    assert first > 0.0
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=60)
    s._read(pid, "host")                                   # gone now
    assert pid not in s.cpu_s and s.total("host") == first
    s.cpu_s[os.getpid()] = ("host", 0.0, _start_time(os.getpid()))
    s._read(os.getpid(), "host")
    assert s.cpu_s[os.getpid()][1] > 0.0 and s.total("host") == first + s.cpu_s[os.getpid()][1]

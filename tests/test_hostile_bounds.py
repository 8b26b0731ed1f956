"""One bad guest or connection cannot stop, starve or bloat the others: a real host, raw attackers.

Each run has a real guest 0 (``python -m balloonlab.guestd``) that must run
every tick with nothing lost, next to attackers written from the wire
protocol alone (``tests/rawclient.py``):

1. *Memory in bytes, and a lock kept.* Before its handshake a connection
   sends a 4 MiB frame of empty maps; after it, a frame of 66,000 nested
   maps and arrays; then, under the ordered lock protocol, the attacker
   takes ``L_hostmem`` for a task of its own and sends 100 disk writes of
   4 MiB, each of which waits for that lock. The host's RSS (read from
   ``/proc/PID/status``) grows by far less than 48 MiB (it grew by ~300 MiB
   for the bomb and would hold 400 MiB of writes); the writes beyond the
   guest's 16 MiB are refused ``OVERLOADED``; after ``unresponsive_s`` with
   guest 0 waiting, the lock is revoked and the attacker cut off.
2. *Connections, floods, a stuck guest.* 600 idle connections hold at most
   the 256 pending-handshake fds; five wrong-token Hellos pipelined before a
   right one get one answer and a closed connection; 10,000 error frames
   and 10,000 garbage frames give a few log lines and complete counts; a
   guest that answers pings but never finishes its tick is cut off.
3. *A guest that stops reading.* At the end (it never answers the audit and
   floods pings without reading) the host still ends the run within its
   bounds; mid-run, SIGTERM ends the host within seconds.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest

from balloonlab.analysis.summary import summarize
from tests.rawclient import (BAD_FRAME, BAD_TOKEN, ERROR, HELLO, NOTIFY, OVERLOADED, PING, REPLY, REQUEST, RUN_END,
                             TICK_DONE, TICK_START, HostProcess, RawClient, guest_token, pages, run_config)

pytestmark = pytest.mark.multiprocess

LOCK_ACQUIRE = 70
DISK_WRITE = 41
WRITES = 100
WRITE_BLOCKS = 262_000          # 2 x 2 MiB of page numbers: a frame just under the 4 MiB limit
RSS_BOUND_MIB = 48


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class RssSampler:
    """The host's VmRSS every 20 ms, in a thread, until stopped."""

    def __init__(self, h: HostProcess) -> None:
        self.h = h
        self.samples: list[int] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.h.rss_kib())
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return
            self._stop.wait(0.02)

    def __enter__(self) -> "RssSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)


def _wait_tick_start(c: RawClient, timeout_s: float = 60.0) -> dict[str, Any]:
    frame = c.recv_until(lambda f: f[0] == NOTIFY and f[2] in (TICK_START, RUN_END), timeout_s)
    assert frame is not None and frame[2] == TICK_START, frame
    return frame[3]


# --- 1. memory in bytes, and a lock kept -----------------------------------------------------------

def _lock_attacker(h: HostProcess, out: dict[str, Any]) -> None:
    try:
        c = h.client()
        assert c.hello(1)[0] == REPLY
        # After the handshake: 66,000 maps and arrays in a 66 KB frame (would be 66,000 objects).
        c.send_bytes(msgpack.packb([[{}] * 256] * 256))
        err = c.recv_until(lambda f: f[0] == ERROR and f[1] == 0, 10)
        out["bomb_after_hello"] = err[3]["code"] if err else None
        # The 400 MB of writes are built first: on a loaded machine that alone can outlast the lock's bound.
        block = pages(*range(WRITE_BLOCKS))
        first = c.next_id + 1       # after the LockAcquire's id
        body = b"".join(_frame([REQUEST, first + i, DISK_WRITE, {"blocks": block, "tokens": block, "vt_us": 0.0}])
                        for i in range(WRITES))
        _wait_tick_start(c)
        reply = c.call(LOCK_ACQUIRE, {"lock": "L_hostmem", "owner": "guest-1/hog", "site": "attack", "vt_us": 0.0}, 30)
        out["lock"] = reply[0]
        out["locked_at"] = time.monotonic()
        assert c.next_id == first, (c.next_id, first)
        c.next_id += WRITES
        c.answer_pings = False   # one writer at a time on the socket: a Pong must not land inside a write

        def send_all() -> None:
            try:
                c.sock.sendall(body)
                out["all_sent"] = True
            except OSError:      # cut off before it was all read (a slow, loaded machine)
                out["all_sent"] = False

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        codes: Counter = Counter()
        end = None
        while True:
            f = c.recv(60)
            if f is None:
                break
            if f[0] == ERROR and first <= f[1] < first + WRITES:
                codes[f[3]["code"]] += 1
            elif f[0] == REPLY and first <= f[1] < first + WRITES:
                codes["ok"] += 1
            elif f[0] == NOTIFY and f[2] == RUN_END:
                end = f[3]
                out["cut_off_after_s"] = time.monotonic() - out["locked_at"]
        sender.join(10)
        out["codes"], out["end"] = codes, end
    except BaseException as exc:   # reported by the test
        out["error"] = exc


@pytest.mark.timeout(240)
def test_memory_is_bounded_in_bytes_and_a_kept_lock_is_revoked() -> None:
    cfg = run_config("tests-tiny", guests=2, ticks=60, connect_timeout_s=60.0, watchdog_s=1.0, unresponsive_s=2.0,
                     locks={"protocol": "ordered"})
    h = HostProcess(cfg)
    out: dict[str, Any] = {}
    try:
        base_kib = h.rss_kib()
        with RssSampler(h) as rss:
            # Before any handshake: a 4 MiB frame of four million empty maps. Refused from its header.
            c = h.client()
            try:
                c.sock.sendall(b"".join([struct.pack(">I", 4_000_005), b"\xdd", struct.pack(">I", 4_000_000),
                                         b"\x80" * 4_000_000]))
            except OSError:
                pass   # the host may close before it has all of it
            reply = c.recv(10)
            out["bomb_before_hello"] = (reply[3]["code"], c.closed()) if reply else None
            h.start_guest(0)
            attacker = threading.Thread(target=_lock_attacker, args=(h, out), daemon=True)
            attacker.start()
            attacker.join(120)
            rc = h.wait(120)
        events = h.events()
        summary = summarize(h.dir)["variants"]["default"]
        done = h.guest_events(0, "guest_finished")
    finally:
        h.close()
    assert "error" not in out, repr(out.get("error"))
    assert out.get("codes"), [e for e in events if e.get("guest") == 1 or e["event"] in ("guest_cut_off", "lock_revoked")]
    growth_mib = (max(rss.samples) - base_kib) / 1024
    print(f"host RSS {base_kib / 1024:.1f} MiB at the start, peak {max(rss.samples) / 1024:.1f} MiB "
          f"(+{growth_mib:.1f}) under a 4 MiB bomb and {WRITES} x 4 MiB writes; codes {dict(out['codes'])}")
    assert growth_mib < RSS_BOUND_MIB
    assert out["bomb_before_hello"] == (BAD_FRAME, True)
    assert out["bomb_after_hello"] == BAD_FRAME
    # At most 16 MiB of its requests in progress: 4 writes held, the rest refused at once (all of them, if
    # the host read them all before it cut the attacker off; on a loaded machine it may not have).
    assert set(out["codes"]) == {OVERLOADED} and sum(out["codes"].values()) <= WRITES, out["codes"]
    assert out["codes"][OVERLOADED] >= (WRITES - 4 if out["all_sent"] else 10), (out["codes"], out["all_sent"])
    assert out["end"] is not None and out["end"]["reason"].startswith("cut off: held L_hostmem@host for ")
    assert 2.0 <= out["cut_off_after_s"] < 20
    assert rc == 0
    fin = [e for e in events if e["event"] == "run_finished"][0]
    assert fin["reason"] == "completed" and fin["ticks"] == 60 and fin["invariant_violations"] == 0
    assert list(fin["guests_cut_off"]) == ["1"] and fin["rejected_requests"]["OVERLOADED"] >= out["codes"][OVERLOADED]
    assert [e["guest"] for e in events if e["event"] == "lock_revoked"] == [1]
    assert done and done[0]["ticks"] == 60 and done[0]["stats"]["lost_pages"] == 0
    assert summary["status"] == "degraded" and summary["status_reasons"][0].startswith("guest 1 cut off: held L_hostmem")
    assert summary["guests_cut_off"] == {"1": fin["guests_cut_off"]["1"]} and summary["audit_ok"] is True


# --- 2. connections, floods, a stuck guest -------------------------------------------------------------

def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stuck_guest(h: HostProcess, out: dict[str, Any]) -> None:
    """Answers pings (RawClient does), plays tick 0, never finishes tick 1: it only sends garbage and bad TickDones."""
    try:
        c = h.client()
        assert c.hello(1)[0] == REPLY
        ram = h.config["guests"][1]["ram_pages"]
        t = _wait_tick_start(c)
        # Its last sign of work: the host's idle clock starts when it reads this, so no earlier than now.
        t0 = time.monotonic()
        c.tick_done(t["tick"], t["vt_us"] + t["tick_us"], ram)
        t = _wait_tick_start(c)
        end = None
        out["stuck_garbage"] = 0
        while time.monotonic() - t0 < 60:
            c.send_bytes(b"\xc1")                                   # garbage is no sign of work
            out["stuck_garbage"] += 1
            c.notify(TICK_DONE, {"tick": t["tick"], "vt_us": t["vt_us"] + t["tick_us"], "stats": {},
                                 "accessed": b"", "dirty": b""})      # nor is a TickDone the host refuses
            try:
                end = c.recv_until(lambda f: f[0] == NOTIFY and f[2] == RUN_END, 0.3)
                break
            except AssertionError:   # nothing yet: keep pretending
                continue
        out["stuck_end"] = end[3] if end else None
        out["stuck_for_s"] = time.monotonic() - t0
        out["stuck_closed"] = c.closed(10)
    except BaseException as exc:
        out["error"] = exc


def _count_closed(socks: list[socket.socket], within_s: float) -> int:
    """How many of ``socks`` the other end has closed (EOF) within ``within_s``."""
    import selectors
    sel = selectors.DefaultSelector()   # epoll: no FD_SETSIZE limit
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    deadline = time.monotonic() + within_s
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            sel.unregister(key.fileobj)
            try:
                closed += key.fileobj.recv(1) == b""   # type: ignore[union-attr]
            except OSError:
                closed += 1
    sel.close()
    return closed


def _drain(sock: socket.socket) -> threading.Thread:
    def run() -> None:
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.timeout(240)
def test_idle_floods_pipelined_hellos_log_floods_and_a_stuck_guest() -> None:
    cfg = run_config("tests-tiny", guests=2, ticks=60, connect_timeout_s=60.0, watchdog_s=1.0, unresponsive_s=1.0)
    h = HostProcess(cfg)
    out: dict[str, Any] = {}
    try:
        pid = h.proc.pid
        base_fds = _fds(pid)
        # Five wrong tokens and then the right one, in one write: one answer, then the end.
        c = h.client()
        wrong = {"version": 1, "guest_id": 1, "token": guest_token(0), "pid": 1}   # guest 0's: not guest 1's
        right = dict(wrong, token=guest_token(1))
        c.sock.sendall(b"".join(_frame([REQUEST, i, HELLO, wrong]) for i in range(1, 6)) +
                       _frame([REQUEST, 6, HELLO, right]))
        first = c.recv(10)
        out["pipelined"] = (first[1], first[3]["code"], c.closed(10)) if first else None
        # 600 idle connections: beyond 256 waiting for their handshake, closed as soon as accepted.
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(600)]
        for s in idle:
            s.connect(h.sock)
        time.sleep(1.0)   # the host has accepted what it will; what it refused is closed by now
        out["fds_with_600_idle"] = _fds(pid) - base_fds
        out["idle_closed"] = _count_closed(idle, 2.0)
        for s in idle:
            s.close()
        deadline = time.monotonic() + 20   # until the host has seen them go (else the next is over the limit too)
        while _fds(pid) > base_fds + 8:
            assert time.monotonic() < deadline, f"the host still holds {_fds(pid) - base_fds} more fds"
            time.sleep(0.02)
        # 10,000 error frames and 10,000 garbage frames before any handshake.
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.connect(h.sock)
        reader = _drain(flood)
        flood.sendall(_frame([ERROR, 0, 0, {"code": 1, "message": "x"}]) * 10_000 + struct.pack(">IB", 1, 0xc1) * 10_000)
        flood.shutdown(socket.SHUT_WR)
        reader.join(30)
        flood.close()
        # The run: guest 0 real, guest 1 alive (it answers pings) and stuck in its first tick.
        h.start_guest(0)
        stuck = threading.Thread(target=_stuck_guest, args=(h, out), daemon=True)
        stuck.start()
        stuck.join(120)
        rc = h.wait(120)
        events = h.events()
        done = h.guest_events(0, "guest_finished")
    finally:
        h.close()
    assert "error" not in out, repr(out.get("error"))
    assert out["pipelined"] == (1, BAD_TOKEN, True), out   # the right Hello behind them was not read
    print(f"600 idle connections: +{out['fds_with_600_idle']} host fds, {out['idle_closed']} closed by the host")
    assert out["fds_with_600_idle"] <= 256 + 8 and 600 - 256 <= out["idle_closed"] < 600 - 200, out
    assert out["stuck_end"] is not None and out["stuck_end"]["reason"].startswith("cut off: alive (it answers pings)"), out
    assert 3.0 <= out["stuck_for_s"] < 30 and out["stuck_closed"], out
    assert rc == 0
    fin = [e for e in events if e["event"] == "run_finished"][0]
    assert fin["reason"] == "completed" and fin["ticks"] == 60 and list(fin["guests_cut_off"]) == ["1"]
    # Counts complete, log lines few.
    garbage = out["stuck_garbage"]   # the stuck guest's own garbage frames, one per 0.3 s
    assert fin["peer_events"]["peer_error"] == 10_000 and fin["peer_events"]["frame_rejected"] == 10_000 + garbage
    assert fin["rejected_requests"]["BAD_FRAME"] == 10_000 + garbage and garbage >= 5
    assert fin["refused_by_code"]["OVERLOADED"] >= 600 - 256 and fin["refused_by_code"]["BAD_TOKEN"] == 1
    logged = Counter(e["event"] for e in events)
    # One count over every connection: the flood's and the stuck guest's frames share their 1-10, 100, ...
    # (refusals of requests are logged per guest and reason: 10 each for the stuck guest's two kinds,
    # 13 for the flood's before any handshake, one for the refused Hello)
    assert logged["peer_error"] == 13 and logged["frame_rejected"] == 13 and logged["request_rejected"] <= 40
    assert logged["guest_refused"] <= 30
    assert done and done[0]["ticks"] == 60 and done[0]["stats"]["lost_pages"] == 0


# --- 3. a guest that stops reading --------------------------------------------------------------------

def _stops_reading(h: HostProcess, ticks: int, at_tick: int, out: dict[str, Any]) -> None:
    """Plays its ticks; at ``at_tick`` floods 256 KiB pings and never reads again."""
    try:
        c = h.client()
        c.hello(1)
        ram = h.config["guests"][1]["ram_pages"]
        while True:
            t = _wait_tick_start(c)
            if t["tick"] == at_tick:
                break
            c.tick_done(t["tick"], t["vt_us"] + t["tick_us"], ram)
        if at_tick == ticks - 1:
            c.tick_done(t["tick"], t["vt_us"] + t["tick_us"], ram)   # the last tick is done; the audit is next
        c.sock.setblocking(False)
        ping = _frame([REQUEST, 10_000, PING, {"payload": bytes(256 * 1024)}])
        sent, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 20 and h.proc.poll() is None:
            try:
                sent += c.sock.send(ping)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        out["flooded_bytes"] = sent
    except BaseException as exc:
        out["error"] = exc


@pytest.mark.timeout(240)
def test_a_guest_that_stops_reading_cannot_wedge_the_end_nor_outlast_sigterm() -> None:
    ticks = 30
    cfg = run_config("tests-tiny", guests=2, ticks=ticks, connect_timeout_s=60.0, watchdog_s=1.0, unresponsive_s=1.0)
    # At the end: it never answers the audit and fills the host's send buffer.
    h = HostProcess(cfg)
    out: dict[str, Any] = {}
    try:
        h.start_guest(0)
        bad = threading.Thread(target=_stops_reading, args=(h, ticks, ticks - 1, out), daemon=True)
        bad.start()
        t0 = time.monotonic()
        rc = h.wait(60)
        ended_s = time.monotonic() - t0
        events = h.events()
    finally:
        h.close()
    assert "error" not in out, repr(out.get("error"))
    fin = [e for e in events if e["event"] == "run_finished"][0]
    assert rc == 0 and fin["reason"] == "completed" and fin["ticks"] == ticks
    assert fin["audit_ok"] is False and any("guest 1: did not answer the audit" in p for p in fin["audit"]["problems"])
    audit_at = [e for e in events if e["event"] == "audit_completed"][0]["timestamp"]
    print(f"a guest that stops reading at the end: the run ended {ended_s:.1f} s after the host started; "
          f"audit {audit_at}, finished {fin['timestamp']}")

    # Mid-run: the guest stops reading at tick 5; SIGTERM ends the host promptly all the same.
    h = HostProcess(dict(cfg, ticks=10_000))
    out = {}
    try:
        h.start_guest(0)
        bad = threading.Thread(target=_stops_reading, args=(h, 10_000, 5, out), daemon=True)
        bad.start()
        deadline = time.monotonic() + 60
        while not out.get("flooded_bytes") and not h.events("guest_throttled"):
            assert time.monotonic() < deadline and h.proc.poll() is None
            time.sleep(0.05)
        t0 = time.monotonic()
        h.proc.send_signal(signal.SIGTERM)
        rc = h.wait(30)
        stopped_s = time.monotonic() - t0
        events = h.events()
    finally:
        h.close()
    print(f"SIGTERM with a guest that reads nothing: the host ended in {stopped_s:.1f} s (rc {rc})")
    assert stopped_s < 12
    fin = [e for e in events if e["event"] == "run_finished"]
    assert fin and fin[-1]["reason"].startswith("signal SIGTERM")


# --- 4. guests that come and go leave nothing behind ------------------------------------------------

@pytest.mark.timeout(240)
def test_restarted_guests_leave_no_memory_behind() -> None:
    """80 sessions of guest 1, each faulting pages, reading its disk and getting a 1 MiB Pong, then gone.

    A closed connection used to live on in a reference cycle (its session and handlers) until a full
    garbage collection, with its send buffer as big as the largest frame it ever sent: host RSS
    crept by ~0.2 MiB per restarted guest in the soak (1 MiB here).
    """
    cfg = run_config("tests-tiny", guests=2, ticks=1_000_000, connect_timeout_s=60.0, watchdog_s=5.0,
                     unresponsive_s=5.0)
    h = HostProcess(cfg)
    ram = cfg["guests"][1]["ram_pages"]
    rss: list[int] = []
    try:
        h.start_guest(0)
        for i in range(80):
            for _ in range(200):     # until the host has released the last session (else DUPLICATE_GUEST)
                c = h.client()
                if c.hello(1)[0] == REPLY:
                    break
                c.close()
                time.sleep(0.005)
            t = _wait_tick_start(c)
            c.call(21 - 1, {"gpfns": pages(*range(64)), "vt_us": t["vt_us"]})           # EPT_FAULT
            c.call(40, {"blocks": pages(*range(16)), "vt_us": t["vt_us"] + 1.0})         # DISK_READ
            c.call(PING, {"payload": bytes(1 << 20)})
            c.tick_done(t["tick"], t["vt_us"] + t["tick_us"], ram)
            c.close()
            if i in (20, 79):
                time.sleep(0.3)
                rss.append(h.rss_kib())
        assert h.proc.poll() is None
    finally:
        h.close()
    per_restart_kib = (rss[1] - rss[0]) / 59
    print(f"host RSS {rss[0] / 1024:.1f} MiB after 21 sessions, {rss[1] / 1024:.1f} MiB after 80: "
          f"{per_restart_kib:.0f} KiB per session")
    assert per_restart_kib < 100

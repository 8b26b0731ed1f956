"""A slow guest: it floods requests and stops reading the replies. Backpressure, bounded memory, nothing dropped.

Guest 2 is a raw client. After its first tick it sends 256 KiB ``Ping``
requests as fast as its socket takes them and reads nothing. The host
answers each with a 256 KiB ``Pong``; once its send buffer to that guest
passes the high-water mark it stops reading from it (``guest_throttled``),
so the guest's own socket fills and its sends stall: the host's memory for
that connection stays near the high-water mark, far below
``RpcLimits.hard_limit_bytes``, and it is not disconnected. The guest is
also late for its tick, so after ``unresponsive_s`` the others go on
without it. Then it reads slowly: every Ping it managed to send gets its
Pong, in order. Guests 0 and 1 (real guests) run every tick at the same
throughput as beside a well-behaved guest 2.
"""
from __future__ import annotations

import select
import struct
import threading
import time
from typing import Any

import msgpack
import pytest

from tests.rawclient import NOTIFY, PING, REPLY, REQUEST, TICK_START, HostProcess, RawClient, run_config
from tests.test_hostile_guest import RawGuest

pytestmark = pytest.mark.multiprocess

TICKS = 60
SLOW = 2
REAL = (0, 1)
PAYLOAD = 256 * 1024
FLOOD_MAX_S = 5.0
STALLED_S = 0.5           # no byte accepted for this long: the host has stopped reading us
HOST_GROWTH_BOUND_MIB = 24
HARD_LIMIT_MIB = 64       # RpcLimits.hard_limit_bytes, the host's default


def _ping(msg_id: int) -> bytes:
    body = msgpack.packb([REQUEST, msg_id, PING, {"payload": bytes(PAYLOAD)}], use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class SlowGuest(RawGuest):
    """Plays tick 0, then floods Pings without reading, then reads slowly; serves the audit at the end."""

    def run(self) -> None:
        try:
            assert self.c.hello(self.gid)[0] == REPLY
            t = self.c.recv_until(lambda f: f[0] == NOTIFY and f[2] == TICK_START, 60.0)
            assert t is not None
            self.c.tick_done(t[3]["tick"], t[3]["vt_us"] + t[3]["tick_us"], self.ram_pages)
            self.c.recv_until(lambda f: f[0] == NOTIFY and f[2] == TICK_START, 60.0)   # tick 1: we stall it
            self.results.update(self._flood_then_drain())
            # Whatever the host still sends (the audit, RunEnd) is served until the end.
            end = self.c.recv_until(lambda f: f[0] == NOTIFY and f[2] == 12, 120.0)
            self.results["end"] = end[3] if end else None
        except BaseException as exc:
            self.error = exc

    def _flood_then_drain(self) -> dict[str, Any]:
        sock = self.c.sock
        sock.setblocking(False)
        first_id = self.c.next_id
        n = 0
        pending = b""
        sent = 0
        t0 = last = time.monotonic()
        while time.monotonic() - t0 < FLOOD_MAX_S:
            if not pending:
                pending = _ping(first_id + n)
                n += 1
            try:
                k = sock.send(pending)
            except BlockingIOError:
                k = 0
            if k:
                sent += k
                pending = pending[k:]
                last = time.monotonic()
            elif time.monotonic() - last > STALLED_S:
                break
            else:
                select.select([], [sock], [], 0.01)
        throttled_after = sent
        stalled = time.monotonic() - last > STALLED_S
        self.c.next_id = first_id + n
        # Now read slowly (64 KiB at a time, a pause between reads), finishing the last Ping as the host reads again.
        pongs = 0
        in_order = True
        deadline = time.monotonic() + 60.0
        while pongs < n and time.monotonic() < deadline:
            if pending:
                try:
                    k = sock.send(pending)
                    pending = pending[k:]
                except BlockingIOError:
                    pass
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                chunk = sock.recv(64 * 1024)
                if not chunk:
                    break
                self.c.buf += chunk
            while len(self.c.buf) >= 4:
                (size,) = struct.unpack(">I", self.c.buf[:4])
                if len(self.c.buf) < 4 + size:
                    break
                frame = msgpack.unpackb(self.c.buf[4:4 + size], raw=False)
                self.c.buf = self.c.buf[4 + size:]
                if frame[0] == REPLY and frame[2] == PING:
                    in_order &= frame[1] == first_id + pongs and len(frame[3]["payload"]) == PAYLOAD
                    pongs += 1
                elif frame[0] == REQUEST and self._serve(frame):
                    pass
                else:
                    self.c.inbox.append(frame)
            time.sleep(0.002)   # the slow reader's pace
        sock.setblocking(True)
        return {"pings": n, "pongs": pongs, "in_order": in_order, "throttled_after_bytes": throttled_after,
                "stalled": stalled}


def _run(slow: bool) -> dict[str, Any]:
    cfg = run_config("tests-tiny", guests=3, ticks=TICKS, connect_timeout_s=60.0, watchdog_s=0.5,
                     unresponsive_s=1.0)
    sizes = {g["id"]: (g["ram_pages"], g["disk_blocks"]) for g in cfg["guests"]}
    h = HostProcess(cfg)
    try:
        for gid in REAL:
            h.start_guest(gid)
        cls = SlowGuest if slow else RawGuest
        g = cls(h.sock, SLOW, *sizes[SLOW], {})
        samples: list[int] = []
        thread = threading.Thread(target=g.run, daemon=True)
        thread.start()
        while thread.is_alive() and h.proc.poll() is None:
            samples.append(h.rss_kib())
            thread.join(0.05)
        thread.join(120)
        rc = h.wait(60)
        for gid in REAL:
            h.guests[gid].wait(30)
        fin = h.events("run_finished")
        return {"g": g, "rc": rc, "rss_kib": samples, "fin": fin[0] if fin else None, "h_events": h.events(),
                "refs_per_vsec": {gid: _rate(h, gid) for gid in REAL},
                "finished": {gid: h.guest_events(gid, "guest_finished") for gid in REAL}}
    finally:
        h.close()


def _rate(h: HostProcess, gid: int) -> float:
    fin = h.guest_events(gid, "guest_finished")
    stats = fin[0]["stats"] if fin else {}
    return stats.get("refs", 0) / (stats["vt_us"] / 1e6) if stats.get("vt_us") else 0.0


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    return {"slow": _run(True), "baseline": _run(False)}


@pytest.mark.timeout(300)
def test_the_slow_guest_is_throttled_not_dropped(runs: dict[str, Any]) -> None:
    r = runs["slow"]
    g = r["g"]
    assert g.error is None, repr(g.error)
    res = g.results
    print(f"slow guest: {res['pings']} Pings of {PAYLOAD >> 10} KiB, the host stopped reading after "
          f"{res['throttled_after_bytes'] / 2**20:.1f} MiB; host RSS {min(r['rss_kib']) / 1024:.1f} -> "
          f"{max(r['rss_kib']) / 1024:.1f} MiB")
    assert res["stalled"], "the host kept reading a guest that reads nothing"
    assert res["throttled_after_bytes"] < HARD_LIMIT_MIB * 2**20
    assert res["pongs"] == res["pings"] and res["in_order"], res   # every request answered, none dropped
    events = r["h_events"]
    assert [e["guest"] for e in events if e["event"] == "guest_throttled"] == [SLOW]
    assert not [e for e in events if e["event"] == "peer_disconnected"]
    assert [e["guest"] for e in events if e["event"] == "guest_unresponsive"] == [SLOW]


@pytest.mark.timeout(300)
def test_the_hosts_memory_for_it_stays_bounded(runs: dict[str, Any]) -> None:
    rss = runs["slow"]["rss_kib"]
    base = runs["baseline"]["rss_kib"]
    growth_mib = (max(rss) - min(rss)) / 1024
    print(f"host RSS: {min(rss) / 1024:.1f} .. {max(rss) / 1024:.1f} MiB with the slow guest, "
          f"{min(base) / 1024:.1f} .. {max(base) / 1024:.1f} MiB without")
    assert growth_mib < HOST_GROWTH_BOUND_MIB, growth_mib
    assert max(rss) - max(base) < HOST_GROWTH_BOUND_MIB * 1024


@pytest.mark.timeout(300)
def test_the_others_run_on_at_full_throughput(runs: dict[str, Any]) -> None:
    for name in ("slow", "baseline"):
        r = runs[name]
        assert r["rc"] == 0 and r["fin"]["reason"] == "completed" and r["fin"]["ticks"] == TICKS
        assert r["fin"]["invariant_violations"] == 0 and r["fin"]["audit_ok"] is True, r["fin"]["audit"]
        for gid in REAL:
            done = r["finished"][gid]
            assert done and done[0]["ticks"] == TICKS and done[0]["stats"]["lost_pages"] == 0
    for gid in REAL:
        slow, base = runs["slow"]["refs_per_vsec"][gid], runs["baseline"]["refs_per_vsec"][gid]
        print(f"guest {gid}: {slow:.0f} refs/vs beside the slow guest, {base:.0f} beside a well-behaved one")
        assert slow >= 0.7 * base, (gid, slow, base)

"""A hostile guest, written from the wire protocol alone, against a real host with two real guests.

Guests 2 and 3 are ``RawClient``s (``tests/rawclient.py``: ``socket``,
``struct``, ``msgpack``, nothing of the project). Guest 2 takes part in
every tick like a guest should, and in between tries everything a
hostile balloon driver or a buggy guest kernel could: gpfns and blocks
outside its range, pages twice, deflating what it never inflated,
touching its own ballooned pages, malformed and unknown requests, absurd
stats, a TickDone for the wrong tick, a flood beyond its outstanding
limit. Unauthenticated connections try the handshake with another
guest's id, a wrong token, a wrong version, requests before it, garbage
and an oversized frame. Guest 3 checks that a session reaches only its
own guest's memory and disk.

Each attempt must be refused with its specific code; the host must count
every refusal per code (``run_finished.rejected_requests``) and log it
(a flood only a few times); the real guests 0 and 1 must run every tick
with no page lost; the invariant and the end-of-run audit (in which the
raw guests answer with their balloon and the blocks they wrote) must hold.
"""
from __future__ import annotations

import os
import struct
import threading
from collections import Counter
from typing import Any, Callable

import msgpack
import pytest

from tests.rawclient import (AUDIT, BAD_FIELD, BAD_FRAME, BAD_TOKEN, BALLOON_DEFLATE, BALLOON_INFLATE, DISK_READ,
                             DISK_WRITE, DUPLICATE_GUEST, EPT_FAULT, ERROR, HELLO, INVALID_STATE, INVALIDATE,
                             NOT_AUTHENTICATED, NOTIFY, OUT_OF_RANGE, OVERLOADED, REPLY, REQUEST, RUN_END,
                             TICK_DONE, TICK_START, UNKNOWN_GUEST, UNKNOWN_TYPE, VERSION_MISMATCH, HostProcess,
                             RawClient, pages, run_config, unpack_pages)

pytestmark = pytest.mark.multiprocess

KEEP_TOKEN = 0xFFFF_FFFF_FFFF_FFFF   # proto/README.md, "Content tokens": the guest keeps its own content

TICKS = 14
REAL = (0, 1)
HOSTILE, NEIGHBOUR = 2, 3
FLOOD = 3000
WRITTEN = {0: (7 << 32) | 1, 1: (7 << 32) | 2, 2: (8 << 32) | 1, 3: (9 << 32) | 5}   # guest 2's disk blocks


class RawGuest:
    """A raw client taking part in ticks; ``attacks[tick]`` runs during that tick."""

    def __init__(self, address: str, gid: int, ram_pages: int, disk_blocks: int,
                 attacks: dict[int, Callable[["RawGuest"], None]]) -> None:
        self.c = RawClient(address)
        self.gid = gid
        self.ram_pages = ram_pages
        self.disk_blocks = disk_blocks
        self.attacks = attacks
        self.balloon: set[int] = set()
        self.disk: dict[int, int] = {}
        self.results: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.audits = 0
        self.tick: dict[str, Any] = {}   # the TickStart being played
        self.ticking = threading.Event()   # set at the first TickStart: every guest has connected
        self.c.serve = self._serve

    def _serve(self, frame: list) -> bool:
        kind, msg_id, mtype, body = frame
        if mtype == INVALIDATE:
            self.c.serve_invalidate(frame)
            return True
        if mtype == AUDIT:
            first, count = body["first"], body["count"]
            blocks = sorted(b for b in self.disk if first <= b < first + count)
            bal = sorted(g for g in self.balloon if first <= g < first + count)
            self.c.send(REPLY, msg_id, AUDIT, {
                "ram_gpfns": b"", "ram_tokens": b"", "ram_backed": b"",
                "disk_blocks": pages(*blocks), "disk_tokens": pages(*(self.disk[b] for b in blocks)),
                "balloon_gpfns": pages(*bal),
                "report": {"balloon_pages": len(self.balloon), "lost_pages": 0, "problems": []}})
            self.audits += 1
            return True
        return False

    def code(self, msg_type: int, body: Any) -> int | str:
        """Send one request; the error code it earned, or "ok"."""
        reply = self.c.call(msg_type, body)
        return reply[3]["code"] if reply[0] == ERROR else "ok"

    def run(self) -> None:
        try:
            welcome = self.c.hello(self.gid)
            assert welcome[0] == REPLY, welcome
            while True:
                frame = self.c.recv_until(lambda f: f[0] == NOTIFY and f[2] in (TICK_START, RUN_END), 60.0)
                assert frame is not None, "host closed the connection"
                if frame[2] == RUN_END:
                    self.results["end"] = frame[3]
                    return
                t = frame[3]
                self.tick = t
                self.ticking.set()
                attack = self.attacks.get(t["tick"])
                if attack is not None:
                    attack(self)
                self.c.tick_done(t["tick"], t["vt_us"] + t["tick_us"], self.ram_pages)
        except BaseException as exc:  # reported by the test
            self.error = exc


def attacks_tick_1(g: RawGuest) -> None:
    n = g.ram_pages
    r = g.results
    r["ept_out_of_range"] = g.code(EPT_FAULT, {"gpfns": pages(n + 5), "vt_us": 0.0})
    r["ept_ok"] = g.code(EPT_FAULT, {"gpfns": pages(0, 1, 2), "vt_us": 0.0})
    r["ept_twice_in_a_batch"] = g.code(EPT_FAULT, {"gpfns": pages(4, 4), "vt_us": 0.0})
    # Backed already: the host never took those frames, so it cannot know what the guest wrote since.
    reply = g.c.call(EPT_FAULT, {"gpfns": pages(0, 1, 2), "vt_us": 0.0})
    r["ept_already_backed"] = unpack_pages(reply[3]["tokens"]) if reply[0] == REPLY else reply[3]["code"]
    # A clock far ahead of everyone's: served last in virtual-time order, but served (no hang).
    r["ept_far_future"] = g.code(EPT_FAULT, {"gpfns": pages(3), "vt_us": 1e15})
    r["inflate_not_its_page"] = g.code(BALLOON_INFLATE, {"gpfns": pages(1 << 40), "vt_us": 0.0})
    r["inflate_twice_in_a_batch"] = g.code(BALLOON_INFLATE, {"gpfns": pages(5, 5), "vt_us": 0.0})
    r["inflate_ok"] = g.code(BALLOON_INFLATE, {"gpfns": pages(5, 6), "vt_us": 0.0})
    g.balloon |= {5, 6}
    r["inflate_again"] = g.code(BALLOON_INFLATE, {"gpfns": pages(5), "vt_us": 0.0})
    r["deflate_never_inflated"] = g.code(BALLOON_DEFLATE, {"gpfns": pages(7), "vt_us": 0.0})
    r["touch_ballooned"] = g.code(EPT_FAULT, {"gpfns": pages(6), "vt_us": 0.0})
    r["disk_out_of_range"] = g.code(DISK_READ, {"blocks": pages(g.disk_blocks + 1), "vt_us": 0.0})
    # A read chain (proto/README.md, "Read chains") the host cannot run is refused before it reads anything;
    # one that names a block past the disk is served up to that read, and the guest learns nothing more.
    chain = {"blocks": pages(0), "vt_us": 0.0}
    r["chain_too_short"] = g.code(DISK_READ, chain | {"chain": struct.pack("<d", 1.0)})
    r["chain_unknown_op"] = g.code(DISK_READ, chain | {"chain": struct.pack("<4d", 1e9, 0.1, 9.0, 1.0)})
    r["chain_nan"] = g.code(DISK_READ, chain | {"chain": struct.pack("<4d", 1e9, 0.1, 2.0, float("nan"))})
    reply = g.c.call(DISK_READ, chain | {"chain": struct.pack("<6d", 1e9, 0.1, 1.0, 0.0, 3.0, g.disk_blocks + 7.0)})
    r["chain_past_the_disk"] = (len(unpack_pages(reply[3]["tokens"])), "chain_vt_us" in reply[3]) \
        if reply[0] == REPLY else reply[3]["code"]
    r["disk_tokens_mismatch"] = g.code(DISK_WRITE, {"blocks": pages(0, 1), "tokens": pages(9), "vt_us": 0.0})
    r["disk_same_block_twice"] = g.code(DISK_WRITE, {"blocks": pages(0, 0), "tokens": pages(1, 2), "vt_us": 0.0})
    blocks = sorted(WRITTEN)
    r["disk_write_ok"] = g.code(DISK_WRITE, {"blocks": pages(*blocks), "tokens": pages(*(WRITTEN[b] for b in blocks)),
                                             "vt_us": 0.0})
    g.disk.update(WRITTEN)
    r["unknown_type"] = g.code(99, {})
    r["pages_as_a_list"] = g.code(EPT_FAULT, {"gpfns": [0, 1], "vt_us": 0.0})
    r["extra_field"] = g.code(EPT_FAULT, {"gpfns": pages(0), "vt_us": 0.0, "guest_id": 0})
    r["hello_twice"] = g.code(HELLO, {"version": 1, "guest_id": 0, "token": "x", "pid": 1})
    r["host_only_request"] = g.code(INVALIDATE, {"gpfns": pages(0)})
    # Notifications get no reply, only an error with id 0 when they are bad. A TickDone is
    # refused whole (and the tick not done) for a clock outside its tick, an A/D bitmap of the
    # wrong length or empty stats; stat values out of range are dropped with an error, the tick counts.
    t = g.tick
    end = t["vt_us"] + t["tick_us"]
    bitmap = bytes((g.ram_pages + 7) // 8)

    def tick_done_error(body: dict[str, Any]) -> tuple[int, str] | None:
        g.c.notify(TICK_DONE, {"tick": 1, "vt_us": end, "stats": {"refs": 1}, "accessed": bitmap,
                               "dirty": bitmap} | body)
        err = g.c.recv_until(lambda f: f[0] == ERROR and f[1] == 0 and f[2] == TICK_DONE, 10.0)
        return (err[3]["code"], err[3]["message"]) if err else None

    r["tick_done_wrong_tick"] = tick_done_error({"tick": 10_000, "vt_us": 0.0})
    r["tick_done_bad_bitmap"] = tick_done_error({"accessed": b"\x00", "dirty": b"\xff" * len(bitmap)})
    r["tick_done_empty_stats"] = tick_done_error({"stats": {}})
    r["tick_done_far_future"] = tick_done_error({"vt_us": 1e15})
    r["tick_done_before_its_tick"] = tick_done_error({"vt_us": t["vt_us"] - 1.0})
    # Stats as values alone stand for the keys of this connection's last map (tick 0's: just "refs").
    r["tick_done_values_not_the_keys"] = tick_done_error({"stats": [1, 2]})
    # A program of requests to answer ahead (proto/README.md, "Answers ahead") that the host cannot run:
    # the TickDone is refused whole, before anything is served.
    r["tick_done_bad_ahead"] = tick_done_error({"ahead": struct.pack("<4d", 1e9, 0.1, 3.0, float("inf")),
                                                "ahead_seen": 0})
    r["absurd_stats"] = tick_done_error({"stats": {"pff": "high", "free": -1.0, "refs": float("inf")}})
    # That one counted for tick 1 (its bad stat values are dropped, not the tick), so the
    # ordinary TickDone the loop sends next is a second one for the tick: refused too.


def attacks_tick_3(g: RawGuest) -> None:
    """A flood: far more requests than the host serves at once, without waiting for any reply."""
    frames = []
    for i in range(FLOOD):
        body = msgpack.packb([REQUEST, g.c.next_id + i, EPT_FAULT, {"gpfns": pages(0), "vt_us": 0.0}],
                             use_bin_type=True)
        frames.append(struct.pack(">I", len(body)) + body)
    first = g.c.next_id
    g.c.next_id += FLOOD
    g.c.sock.sendall(b"".join(frames))
    codes: Counter = Counter()
    for msg_id in range(first, first + FLOOD):
        reply = g.c.reply_to(msg_id, 30.0)
        assert reply is not None
        codes["ok" if reply[0] == REPLY else reply[3]["code"]] += 1
    g.results["flood"] = codes


def neighbour_tick_2(g: RawGuest) -> None:
    """Guest 3 asks for the same block and gpfn numbers guest 2 used: it gets its own, empty ones."""
    reply = g.c.call(DISK_READ, {"blocks": pages(*sorted(WRITTEN)), "vt_us": 0.0})
    g.results["disk_tokens"] = unpack_pages(reply[3]["tokens"])
    reply = g.c.call(EPT_FAULT, {"gpfns": pages(0, 1, 2, 5, 6), "vt_us": 0.0})
    g.results["ept_tokens"] = unpack_pages(reply[3]["tokens"])


def unauthenticated(address: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    c = RawClient(address)
    out["request_before_hello"] = c.call(EPT_FAULT, {"gpfns": pages(0), "vt_us": 0.0})[3]["code"]
    c.notify(TICK_DONE, {"tick": 0, "vt_us": 0.0, "stats": {}, "accessed": b"", "dirty": b""})
    out["notify_before_hello"] = c.recv_until(lambda f: f[0] == ERROR and f[1] == 0)[3]["code"]
    c.send_bytes(b"\xc1\xc1")
    out["garbage"] = c.recv_until(lambda f: f[0] == ERROR)[3]["code"]
    out["another_guests_id"] = c.hello(0)[3]["code"]   # guest 0 is connected
    assert c.closed(), "a refused hello must close the connection"
    for key, kwargs in (("wrong_token", {"guest_id": 1, "token": "not-the-run's-token"}),
                        ("unknown_id", {"guest_id": 99}), ("wrong_version", {"guest_id": 1, "version": 99})):
        c = RawClient(address)
        out[key] = c.hello(**kwargs)[3]["code"]
        c.close()
    c = RawClient(address)
    c.sock.sendall(struct.pack(">I", 64 * 1024 * 1024))   # announce 64 MiB; the host refuses before the body
    reply = c.recv()
    out["oversized"] = reply[3]["code"] if reply else None
    out["oversized_closed"] = c.closed()
    return out


@pytest.fixture(scope="module")
def hostile_run() -> Any:
    cfg = run_config("tests-tiny", guests=4, ticks=TICKS, connect_timeout_s=60.0, watchdog_s=5.0,
                     unresponsive_s=30.0)
    sizes = {g["id"]: (g["ram_pages"], g["disk_blocks"]) for g in cfg["guests"]}
    h = HostProcess(cfg)
    try:
        sock_mode = os.stat(h.sock).st_mode & 0o777   # while the host runs (it may remove it at the end)
        for gid in REAL:
            h.start_guest(gid)
        hostile = RawGuest(h.sock, HOSTILE, *sizes[HOSTILE], {1: attacks_tick_1, 3: attacks_tick_3})
        neighbour = RawGuest(h.sock, NEIGHBOUR, *sizes[NEIGHBOUR], {2: neighbour_tick_2})
        threads = [threading.Thread(target=g.run, daemon=True) for g in (hostile, neighbour)]
        for t in threads:
            t.start()
        # Impersonate guest 0 only once the run is under way (every guest has connected).
        assert hostile.ticking.wait(60.0), "the run did not start"
        unauth = unauthenticated(h.sock)
        for t in threads:
            t.join(120)
        rc = h.wait(60)
        logs = {"host": (h.dir / "host.jsonl").read_text()}
        for gid in REAL:
            h.guests[gid].wait(30)
            logs[f"guest-{gid}"] = (h.dir / f"guest-{gid}.jsonl").read_text()
        yield {"h": h, "rc": rc, "sock_mode": sock_mode, "hostile": hostile, "neighbour": neighbour, "unauth": unauth, "logs": logs,
               "finished": h.events("run_finished")}
    finally:
        h.close()


@pytest.mark.timeout(300)
def test_every_attack_is_refused_with_its_code(hostile_run: Any) -> None:
    g = hostile_run["hostile"]
    assert g.error is None, repr(g.error)
    r = g.results
    expected = {
        "ept_out_of_range": OUT_OF_RANGE, "ept_ok": "ok", "ept_far_future": "ok", "inflate_not_its_page": OUT_OF_RANGE,
        "ept_twice_in_a_batch": BAD_FIELD, "ept_already_backed": [KEEP_TOKEN] * 3,
        "inflate_twice_in_a_batch": BAD_FIELD, "inflate_ok": "ok", "inflate_again": INVALID_STATE,
        "deflate_never_inflated": INVALID_STATE, "touch_ballooned": INVALID_STATE,
        "disk_out_of_range": OUT_OF_RANGE, "disk_tokens_mismatch": BAD_FIELD, "disk_same_block_twice": BAD_FIELD,
        "disk_write_ok": "ok", "unknown_type": UNKNOWN_TYPE, "pages_as_a_list": BAD_FIELD, "extra_field": BAD_FIELD,
        "hello_twice": UNKNOWN_TYPE, "host_only_request": UNKNOWN_TYPE,
        "chain_too_short": BAD_FIELD, "chain_unknown_op": BAD_FIELD, "chain_nan": BAD_FIELD,
        "chain_past_the_disk": (1, False),
    }
    assert {k: r[k] for k in expected} == expected
    code, message = r["absurd_stats"]
    assert code == BAD_FIELD and "pff" in message and "free" in message and "refs" in message
    for key, words in (("tick_done_wrong_tick", ("vt_us", "tick 10000")), ("tick_done_bad_bitmap", ("accessed",)),
                       ("tick_done_empty_stats", ("stats", "empty")), ("tick_done_far_future", ("vt_us", "1000000000000000.0")),
                       ("tick_done_before_its_tick", ("vt_us",)), ("tick_done_bad_ahead", ("TickDone.ahead",)),
                       ("tick_done_values_not_the_keys", ("TickDone.stats", "2 values", "1 keys"))):
        code, message = r[key]
        assert code == BAD_FIELD and all(w in message for w in words), (key, message)
    flood = r["flood"]
    # Each flooded request is an EPT fault of a page the host backs already: answered at once, it holds
    # nothing in progress, so it need not be refused (the host starts a request's handler as it arrives).
    # The bound on requests in progress (OVERLOADED) is flooded with requests that wait in
    # test_hostile_bounds.py (a guest that stops reading) and test_proto_bounds.py.
    assert sum(flood.values()) == FLOOD and flood["ok"] >= 1 and set(flood) <= {"ok", OVERLOADED}, flood
    assert r["end"]["reason"] == "completed"
    assert hostile_run["unauth"] == {
        "request_before_hello": NOT_AUTHENTICATED, "notify_before_hello": NOT_AUTHENTICATED, "garbage": BAD_FRAME,
        "another_guests_id": DUPLICATE_GUEST, "wrong_token": BAD_TOKEN, "unknown_id": UNKNOWN_GUEST,
        "wrong_version": VERSION_MISMATCH, "oversized": BAD_FRAME, "oversized_closed": True}


@pytest.mark.timeout(300)
def test_a_session_reaches_only_its_own_guest(hostile_run: Any) -> None:
    n = hostile_run["neighbour"]
    assert n.error is None, repr(n.error)
    assert n.results["disk_tokens"] == [0] * len(WRITTEN)      # not guest 2's content
    assert n.results["ept_tokens"] == [0] * 5                   # fresh pages, and 5, 6 are not ballooned here


@pytest.mark.timeout(300)
def test_each_refusal_is_counted_per_code_and_logged(hostile_run: Any) -> None:
    fin = hostile_run["finished"][0]
    counted = fin["rejected_requests"]
    flood = hostile_run["hostile"].results["flood"][OVERLOADED]
    # INVALID_STATE: inflating a page twice, deflating one never inflated, touching a ballooned one,
    # and a second TickDone for tick 1 (the absurd one had counted).
    exact = {"OUT_OF_RANGE": 3, "INVALID_STATE": 4, "UNKNOWN_TYPE": 3, "NOT_AUTHENTICATED": 2,
             "DUPLICATE_GUEST": 1, "BAD_TOKEN": 1, "UNKNOWN_GUEST": 1, "VERSION_MISMATCH": 1, "BAD_FRAME": 2,
             # 6 bad requests, 3 bad read chains, 7 TickDones refused whole, the absurd stats
             "BAD_FIELD": 17, **({"OVERLOADED": flood} if flood else {})}
    assert counted == exact
    rejected = [e for e in hostile_run["h"].events("request_rejected")]
    logged = Counter(e["code"] for e in rejected)
    assert set(logged) == set(exact)
    assert logged["OVERLOADED"] <= 12, "a flood must not flood the log"
    assert all(e.get("guest") in (HOSTILE, None) for e in rejected)


@pytest.mark.timeout(300)
def test_the_host_and_the_real_guests_are_unaffected(hostile_run: Any) -> None:
    assert hostile_run["rc"] == 0
    fin = hostile_run["finished"][0]
    assert fin["reason"] == "completed" and fin["ticks"] == TICKS and fin["guests_lost"] == {}
    assert fin["invariant_violations"] == 0
    assert fin["audit_ok"] is True, fin["audit"]
    assert hostile_run["hostile"].audits >= 1 and hostile_run["neighbour"].audits >= 1
    # The hostile guest's balloon as the host keeps it: exactly the two pages it gave.
    assert fin["guests_memory"][str(HOSTILE)]["ballooned_pages"] == 2
    h = hostile_run["h"]
    for gid in REAL:
        done = h.guest_events(gid, "guest_finished")
        assert done and done[0]["ticks"] == TICKS and done[0]["stats"]["lost_pages"] == 0, done
    # The run's token appears in no log.
    token = h.token
    for name, text in hostile_run["logs"].items():
        assert token not in text, f"the token leaked into {name}"
    assert hostile_run["sock_mode"] == 0o600

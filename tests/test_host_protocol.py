"""The host as a client written from balloonlab.proto/README.md alone would see it.

These tests speak the wire protocol with ``socket``, ``struct`` and
``msgpack`` only (no project code on the client side) against a real
``python -m balloonlab.hostd`` process.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

from tests.procs import REPO
from tests.rawclient import (BAD_FIELD, BAD_FRAME, BAD_TOKEN, DUPLICATE_GUEST, EPT_FAULT, ERROR, HELLO,
                             NOT_AUTHENTICATED, NOTIFY, OUT_OF_RANGE, REPLY, REQUEST, RUN_END, TICK_DONE,
                             TICK_START, TOKEN, UNKNOWN_GUEST, UNKNOWN_TYPE, VERSION_MISMATCH, RawClient)

RAM_PAGES = 1024


@pytest.fixture
def host(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A real hostd for two guests; yields its socket path and process; always reaped."""
    ticks = getattr(request, "param", 5)
    d = Path(tempfile.mkdtemp(prefix="bl-host-", dir="/tmp"))
    cfg = {"run_id": "proto-test", "scenario": "raw", "variant": "default", "seed": 1, "ticks": ticks,
           "tick_us": 10_000, "connect_timeout_s": 20.0, "watchdog_s": 5.0,
           "guests": [{"id": 0, "ram_pages": RAM_PAGES}, {"id": 1, "ram_pages": RAM_PAGES}],
           "host": {"ram_mib": 6}}
    (d / "cfg.json").write_text(json.dumps(cfg))
    sock = str(d / "h.sock")
    proc = subprocess.Popen([sys.executable, "-m", "balloonlab.hostd", "--config", str(d / "cfg.json"), "--address", sock,
                             "--log", str(d / "host.jsonl")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, BALLOONLAB_TOKEN=TOKEN))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        assert ready, "host did not print its ready line"
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert b"ready" in line, line
        yield {"sock": sock, "proc": proc, "dir": d}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        shutil.rmtree(d, ignore_errors=True)


def host_events(h: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (h["dir"] / "host.jsonl").read_text().splitlines() if line.strip()]


def test_bad_token_is_refused_with_a_clear_error_then_closed(host):
    c = RawClient(host["sock"])
    reply = c.hello(0, token="wrong")
    assert reply[0] == ERROR and reply[3]["code"] == BAD_TOKEN
    assert "token" in reply[3]["message"]
    assert c.recv() is None  # closed after the refusal
    assert host["proc"].poll() is None  # and the host runs on


def test_unknown_duplicate_and_wrong_version_are_refused(host):
    c = RawClient(host["sock"])
    assert c.hello(7)[3]["code"] == UNKNOWN_GUEST
    c2 = RawClient(host["sock"])
    assert c2.hello(0, version=99)[3]["code"] == VERSION_MISMATCH
    ok = RawClient(host["sock"])
    r = ok.hello(0); assert r[0] == REPLY, r
    dup = RawClient(host["sock"])
    assert dup.hello(0)[3]["code"] == DUPLICATE_GUEST
    assert dup.recv() is None


def test_requests_before_hello_are_not_authenticated(host):
    c = RawClient(host["sock"])
    msg_id = c.request(EPT_FAULT, {"gpfns": b"\0" * 8, "vt_us": 0})
    reply = c.recv()
    assert reply[:2] == [ERROR, msg_id] and reply[3]["code"] == NOT_AUTHENTICATED
    assert c.hello(1)[0] == REPLY  # the connection is still usable for the handshake


def test_garbage_gets_an_error_and_the_connection_survives(host):
    c = RawClient(host["sock"])
    c.send_bytes(b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    reply = c.recv()
    assert reply[0] == ERROR and reply[1] == 0 and reply[3]["code"] == BAD_FRAME
    c.send_bytes(msgpack.packb({"not": "an envelope"}))
    assert c.recv()[3]["code"] == BAD_FRAME
    c.send(REQUEST, 5, 999, {})
    assert c.recv()[3]["code"] == UNKNOWN_TYPE
    msg_id = c.request(HELLO, {"version": 1, "guest_id": True, "token": TOKEN, "pid": 1})
    reply = c.recv()
    assert reply[1] == msg_id and reply[3]["code"] == BAD_FIELD and "guest_id" in reply[3]["message"]
    assert c.hello(0)[0] == REPLY


def test_oversized_frame_is_refused_before_its_body_and_closed(host):
    c = RawClient(host["sock"])
    c.sock.sendall(struct.pack(">I", 100 * 1024 * 1024))  # announce 100 MiB, send nothing more
    reply = c.recv()
    assert reply[0] == ERROR and reply[3]["code"] == BAD_FRAME and "exceeds" in reply[3]["message"]
    assert c.recv() is None


def _play_guest(c: RawClient, gid: int, bad_gpfn: bool = False) -> dict[str, Any]:
    """Take part in every tick until RunEnd; returns what happened."""
    welcome = c.hello(gid)
    assert welcome[0] == REPLY, welcome
    assert welcome[3]["tick_us"] == 10_000 and welcome[3]["config"]["ram_pages"] == RAM_PAGES
    bitmap = bytes((RAM_PAGES + 7) // 8)
    seen: dict[str, Any] = {"ticks": [], "ept": None, "bad": None}
    while True:
        msg = c.recv()
        assert msg is not None, "host closed before RunEnd"
        kind, _, mtype, body = msg
        if kind == NOTIFY and mtype == TICK_START:
            if body["tick"] == 0:
                # One EPT fault: the host backs three gpfns and answers with zero-page tokens.
                mid = c.request(EPT_FAULT, {"gpfns": struct.pack("<3Q", 0, 1, 2), "vt_us": body["vt_us"]})
                r = c.recv()
                while r[1] != mid:
                    r = c.recv()
                seen["ept"] = r
                if bad_gpfn:
                    mid = c.request(EPT_FAULT, {"gpfns": struct.pack("<Q", RAM_PAGES + 5), "vt_us": 0})
                    seen["bad"] = c.recv()
            seen["ticks"].append(body["tick"])
            c.send(NOTIFY, 0, TICK_DONE, {"tick": body["tick"], "vt_us": body["vt_us"] + body["tick_us"],
                                          "stats": {"refs": 1}, "accessed": bitmap, "dirty": bitmap})
        elif kind == NOTIFY and mtype == RUN_END:
            seen["end"] = body
            return seen


@pytest.mark.parametrize("host", [5], indirect=True)
def test_two_raw_guests_take_part_in_every_tick(host):
    import threading
    results: dict[int, Any] = {}
    clients = [RawClient(host["sock"]), RawClient(host["sock"])]

    def run(gid: int) -> None:
        results[gid] = _play_guest(clients[gid], gid, bad_gpfn=(gid == 1))

    threads = [threading.Thread(target=run, args=(gid,)) for gid in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(results) == {0, 1}, "a raw guest did not finish"
    for gid in (0, 1):
        assert results[gid]["ticks"] == [0, 1, 2, 3, 4]
        assert results[gid]["end"]["reason"] == "completed"
        ept = results[gid]["ept"]
        assert ept[0] == REPLY and ept[3]["tokens"] == bytes(24) and ept[3]["done_vt_us"] > 0
    bad = results[1]["bad"]
    assert bad[0] == ERROR and bad[3]["code"] == OUT_OF_RANGE and str(RAM_PAGES + 5) in bad[3]["message"]
    assert host["proc"].wait(10) == 0
    finished = [e for e in host_events(host) if e["event"] == "run_finished"][-1]
    assert finished["reason"] == "completed" and finished["ticks"] == 5
    assert finished["memory"]["ept_faults"] == 6
    assert finished["rejected_requests"] == {"OUT_OF_RANGE": 1}
    assert finished["invariant_violations"] == 0

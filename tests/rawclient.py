"""A guest written from the wire protocol alone: ``socket``, ``struct`` and ``msgpack``.

Nothing here imports the project's code, so tests that speak through
``RawClient`` check the host against ``proto/README.md`` rather than against
``proto``'s own encoder: frames are a 4-byte big-endian length and a msgpack
body ``[kind, id, type, body]``; page batches are ``bin`` of little-endian
u64. A hostile guest is this client sending what a well-behaved one never
would.

``HostProcess`` starts a real ``python -m balloonlab.hostd`` from a run config (the
JSON the launcher writes) in a private directory and always reaps it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgpack

__all__ = ["RawClient", "HostProcess", "guest_token", "pages", "unpack_pages", "REQUEST", "REPLY", "ERROR", "NOTIFY",
           "HELLO", "TICK_START", "TICK_DONE", "RUN_END", "EPT_FAULT", "INVALIDATE", "BALLOON_TARGET",
           "BALLOON_INFLATE", "BALLOON_DEFLATE", "DISK_READ", "DISK_WRITE", "AUDIT", "PING",
           "BAD_FRAME", "UNKNOWN_TYPE", "BAD_FIELD", "VERSION_MISMATCH", "UNKNOWN_GUEST", "DUPLICATE_GUEST",
           "BAD_TOKEN", "NOT_AUTHENTICATED", "NOT_OWNER", "OUT_OF_RANGE", "INVALID_STATE", "OVERLOADED",
           "TOKEN", "REPO"]

REPO = Path(__file__).resolve().parent.parent

# Envelope kinds
REQUEST, REPLY, ERROR, NOTIFY = 0, 1, 2, 3
# Message types
HELLO = 1
TICK_START, TICK_DONE, RUN_END = 10, 11, 12
EPT_FAULT, INVALIDATE = 20, 21
BALLOON_TARGET, BALLOON_INFLATE, BALLOON_DEFLATE = 30, 31, 32
DISK_READ, DISK_WRITE = 40, 41
AUDIT = 50
PING = 60
# Error codes (body.code of an error reply)
BAD_FRAME, UNKNOWN_TYPE, BAD_FIELD = 1, 2, 3
VERSION_MISMATCH, UNKNOWN_GUEST, DUPLICATE_GUEST, BAD_TOKEN, NOT_AUTHENTICATED = 10, 11, 12, 13, 14
NOT_OWNER, OUT_OF_RANGE, INVALID_STATE = 20, 21, 22
OVERLOADED = 30

TOKEN = "t0k3n-for-tests"   # the run secret the test hosts are given (BALLOONLAB_TOKEN of hostd)


def guest_token(guest_id: int, secret: str = TOKEN) -> str:
    """Guest ``guest_id``'s credential, as proto/README.md ("Credentials") defines it."""
    return hmac.new(secret.encode(), f"balloonlab guest {guest_id}".encode(), hashlib.sha256).hexdigest()[:32]


def pages(*numbers: int) -> bytes:
    """A page batch as the wire carries it: ``bin`` of little-endian u64."""
    return struct.pack(f"<{len(numbers)}Q", *numbers)


def unpack_pages(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


class RawClient:
    """A guest written from the protocol document: length-prefixed msgpack envelopes.

    ``address`` is a Unix socket path (optionally ``unix:PATH``) or
    ``tcp://HOST:PORT``. Frames that arrive while waiting for a particular
    reply are kept in ``inbox`` in arrival order.
    """

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        if address.startswith("tcp://"):
            host, _, port = address[len("tcp://"):].rpartition(":")
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout_s)
            self.sock.connect(address[len("unix:"):] if address.startswith("unix:") else address)
        self.sock.settimeout(None)
        self.buf = b""
        self.next_id = 1
        self.inbox: list[list] = []
        # Called with each request the host sends while we wait for something else
        # (a TLB shootdown, the audit); returns True if it answered it.
        self.serve: Callable[[list], bool] | None = None
        # A peer answers the host's heartbeat pings; a test of a silent guest turns this off.
        self.answer_pings = True

    # --- sending -----------------------------------------------------------------

    def send(self, kind: int, msg_id: int, msg_type: int, body: Any) -> None:
        self.send_bytes(msgpack.packb([kind, msg_id, msg_type, body], use_bin_type=True))

    def send_bytes(self, body: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def request(self, msg_type: int, body: Any) -> int:
        msg_id = self.next_id
        self.next_id += 1
        self.send(REQUEST, msg_id, msg_type, body)
        return msg_id

    def notify(self, msg_type: int, body: Any) -> None:
        self.send(NOTIFY, 0, msg_type, body)

    # --- receiving ---------------------------------------------------------------

    def recv(self, timeout_s: float = 10.0) -> list | None:
        """The next envelope (from ``inbox`` first), or None when the host closed the connection.

        The end-of-run ``AUDIT`` request is answered here (a guest MUST
        answer it), unless ``serve`` is set to answer requests itself.
        """
        if self.inbox:
            return self.inbox.pop(0)
        while True:
            frame = self._read_frame(timeout_s)
            if frame is not None and frame[0] == REQUEST and self._answer_audit(frame):
                continue
            return frame

    def _answer_audit(self, frame: list) -> bool:
        """Pings are answered at once; a client that keeps no memory model holds no page: empty claims, an empty balloon."""
        if frame[2] == PING and self.answer_pings:
            self.send(REPLY, frame[1], PING, {"payload": frame[3].get("payload", b"")})
            return True
        if self.serve is not None:
            return self.serve(frame)
        if frame[2] != AUDIT:
            return False
        self.send(REPLY, frame[1], AUDIT, {"ram_gpfns": b"", "ram_tokens": b"", "ram_backed": b"",
                                           "disk_blocks": b"", "disk_tokens": b"", "balloon_gpfns": b"",
                                           "report": {"balloon_pages": 0, "lost_pages": 0, "problems": []}})
        return True

    def _read_frame(self, timeout_s: float) -> list | None:
        deadline = time.monotonic() + timeout_s
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgpack.unpackb(body, raw=False, strict_map_key=False)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no frame from the host in time")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                try:
                    chunk = self.sock.recv(1 << 16)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return None
                self.buf += chunk

    def recv_until(self, pred: Callable[[list], bool], timeout_s: float = 10.0) -> list | None:
        """The first frame satisfying ``pred``; earlier ones stay in ``inbox``. None if closed."""
        for i, frame in enumerate(self.inbox):
            if pred(frame):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout_s
        while True:
            frame = self._read_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                return None
            if pred(frame):
                return frame
            if frame[0] == REQUEST and self._answer_audit(frame):
                continue
            self.inbox.append(frame)

    def reply_to(self, msg_id: int, timeout_s: float = 10.0) -> list | None:
        """The reply or error reply to request ``msg_id``."""
        return self.recv_until(lambda f: f[0] in (REPLY, ERROR) and f[1] == msg_id, timeout_s)

    def call(self, msg_type: int, body: Any, timeout_s: float = 10.0) -> list:
        msg_id = self.request(msg_type, body)
        reply = self.reply_to(msg_id, timeout_s)
        assert reply is not None, f"host closed the connection instead of answering type {msg_type}"
        return reply

    def closed(self, timeout_s: float = 10.0) -> bool:
        """True once the host closes the connection (frames before that are dropped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._read_frame(max(0.0, deadline - time.monotonic())) is None:
                    return True
            except AssertionError:
                return False
        return False

    # --- the guest's side of the protocol --------------------------------------------

    def hello(self, guest_id: int, token: str | None = None, version: int = 1) -> list:
        """Say hello as ``guest_id`` with its own credential (or ``token``)."""
        token = guest_token(guest_id) if token is None else token
        reply = self.call(HELLO, {"version": version, "guest_id": guest_id, "token": token, "pid": os.getpid()})
        return reply

    def tick_done(self, tick: int, vt_us: float, ram_pages: int, stats: dict[str, Any] | None = None) -> None:
        bitmap = bytes((ram_pages + 7) // 8)
        self.notify(TICK_DONE, {"tick": tick, "vt_us": float(vt_us), "stats": stats or {"refs": 1},
                                "accessed": bitmap, "dirty": bitmap})

    def serve_invalidate(self, frame: list, tokens: dict[int, int] | None = None) -> None:
        """Acknowledge a TLB shootdown, answering the tokens this guest holds (0 = none written)."""
        gpfns = unpack_pages(frame[3]["gpfns"])
        held = tokens or {}
        self.send(REPLY, frame[1], INVALIDATE, {"tokens": pages(*(held.get(g, 0) for g in gpfns))})

    def close(self) -> None:
        self.sock.close()


class HostProcess:
    """A real ``python -m balloonlab.hostd`` on a Unix socket in a private 0700 directory; reaped by ``close``."""

    def __init__(self, config: dict[str, Any], token: str = TOKEN, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 30.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bl-raw-", dir="/tmp"))
        self.config = dict(config)
        (self.dir / "host-config.json").write_text(json.dumps(self.config))
        self.sock = str(self.dir / "h.sock")
        self.token = token
        self.env = dict(os.environ, BALLOONLAB_TOKEN=token, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO),
                        **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balloonlab.hostd", "--config", str(self.dir / "host-config.json"), "--address", self.sock,
             "--log", str(self.dir / "host.jsonl")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=open(self.dir / "host.stderr", "wb"), env=self.env,
            start_new_session=True)
        self.guests: dict[int, subprocess.Popen] = {}
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], ready_timeout_s)
            assert ready, "host did not print its ready line"
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            assert b"ready" in line, line
        except BaseException:
            self.close()
            raise

    def client(self) -> RawClient:
        return RawClient(self.sock)

    def start_guest(self, guest_id: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """A real ``python -m balloonlab.guestd`` for ``guest_id``, logging to ``guest-N.jsonl`` beside the host's log."""
        env = {**self.env, "BALLOONLAB_TOKEN": guest_token(guest_id, self.token), **(extra_env or {})}
        p = subprocess.Popen([sys.executable, "-m", "balloonlab.guestd", "--address", self.sock, "--guest-id", str(guest_id),
                              "--log", str(self.dir / f"guest-{guest_id}.jsonl")],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(self.dir / f"guest-{guest_id}.stderr", "ab"), start_new_session=True)
        self.guests[guest_id] = p
        return p

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The host's log so far (complete lines only), optionally only events called ``name``."""
        return _read_events(self.dir / "host.jsonl", name)

    def guest_events(self, guest_id: int, name: str | None = None) -> list[dict[str, Any]]:
        return _read_events(self.dir / f"guest-{guest_id}.jsonl", name)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def rss_kib(self) -> int:
        return _status_kib(self.proc.pid, "VmRSS")

    def close(self) -> None:
        procs = [self.proc, *self.guests.values()]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5.0
        for p in procs:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "HostProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_events(path: Path, name: str | None) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and (name is None or obj.get("event") == name):
            out.append(obj)
    return out


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {key}")


# --- processes of a run: find them, stop them, record what was done to them ----------------------

def proc_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat`` (``T`` stopped, ``Z`` zombie, ...); ``""`` if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def wait_stopped(pid: int, timeout_s: float) -> None:
    """Wait until ``pid`` is stopped (SIGSTOP): a fault point was reached."""
    deadline = time.monotonic() + timeout_s
    while proc_state(pid) != "T":
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout_s} s (state {proc_state(pid)!r})")
        time.sleep(0.005)


def run_pids(run_dir: Path | str) -> dict[str, int]:
    """``{"host": pid, "guest-N": pid}`` of the live processes of a run, from their command lines."""
    from tests.procs import procs_mentioning
    out: dict[str, int] = {}
    for pid, cmd in procs_mentioning(str(run_dir)):
        argv = cmd.split()
        if "balloonlab.hostd" in argv:
            out["host"] = pid
        elif "balloonlab.guestd" in argv and "--guest-id" in argv:
            out[f"guest-{argv[argv.index('--guest-id') + 1]}"] = pid
    return out


def wait_guest_stopped(run: Any, run_dir: Path | str, guest_id: int, timeout_s: float = 90.0) -> int:
    """The pid of guest ``guest_id`` of a launched run once it has stopped itself at a fault point.

    ``run`` is the launcher (``tests.procs.Launched``): if it ends first, the wait fails with the run's logs.
    """
    from tests.procs import dump_logs
    deadline = time.monotonic() + timeout_s
    while f"guest-{guest_id}" not in run_pids(run_dir):
        assert time.monotonic() < deadline and run.proc.poll() is None, dump_logs(Path(run_dir))
        time.sleep(0.02)
    pid = run_pids(run_dir)[f"guest-{guest_id}"]
    wait_stopped(pid, timeout_s)
    return pid


def record_fault(run_dir: Path | str, target: str, pid: int, sig: str, **fields: Any) -> None:
    """Note a signal sent from outside in ``faults.jsonl`` (summary ``faults_injected`` counts these)."""
    line = {"event": "fault_injected", "level": "warning", "proc": "injector", "target": target, "pid": pid,
            "signal": sig, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    with open(Path(run_dir) / "faults.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def fault_points(log_path: Path | str) -> list[dict[str, Any]]:
    return _read_events(Path(log_path), "fault_point_reached")


def run_config(scenario: str, guests: int | None = None, ticks: int | None = None, seed: int | None = None,
               **top: Any) -> dict[str, Any]:
    """The host's run config for a scenario, resolved as the launcher does (``top`` overrides top-level keys)."""
    from balloonlab import validators
    from balloonlab.scenario import Overrides, find_scenario, load_scenario
    sc = load_scenario(find_scenario(scenario), Overrides(guests=guests, ticks=ticks, seed=seed),
                       validators.VALIDATORS)
    cfg = sc.run_config(next(iter(sc.variants)), f"raw-{os.getpid()}")
    for g in cfg["guests"]:
        g["ram_pages"], g["disk_blocks"] = validators.guest_sizes(g)
        swap_area = getattr(validators, "guest_swap_area", None)
        if swap_area is not None:
            g["swap_base_block"], g["swap_blocks"] = swap_area(g)
    cfg.update(top)
    return cfg

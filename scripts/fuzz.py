"""Fuzz the parts that read what an untrusted guest sends: ``python scripts/fuzz.py [options]``.

Targets (each a function of one ``bytes`` input, so atheris and hypothesis
drive them alike):

- ``framing``: a byte stream in random chunks through ``FrameDecoder``.
- ``messages``: bodies built from the input -- well-formed, or with a
  field missing, unknown, of the wrong type, out of range -- through every
  message class's decoder, and ``msg_type_of``.
- ``rpc``: envelopes of every kind, id and type (valid or not) with such
  bodies, plus garbage and oversized headers, in random chunks into the
  host's end of a connection (``GuestConnection``) with sync, async and
  failing handlers and calls of its own outstanding.
- ``host``: host memory driven by requests with random gpfns and blocks
  (in range, out of range, repeated), random A/D bitmaps, balloon
  operations, and guest stats through the host's sanitizer.

Properties: nothing but the documented errors escapes; every byte the host
writes back is a well-formed envelope (errors carry an int code and a
message; at most one answer per request id); buffers, pending and incoming
requests stay within their limits; host memory's invariant holds after
every operation.

Engines: ``atheris`` (coverage-guided, if it is installed for this Python)
or ``hypothesis`` (random inputs, ``--examples`` per target). The tests in
``tests/test_fuzz_*.py`` run the same targets briefly; this script runs
them for as long as asked::

    python scripts/fuzz.py --seconds 60                 # every target, hypothesis unless atheris is there
    python scripts/fuzz.py --target rpc --engine atheris -- -max_len=4096
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["Input", "TARGETS", "fuzz_framing", "fuzz_messages", "fuzz_rpc", "fuzz_host", "main"]

MAX_FRAME = 4096   # a small frame limit: oversized frames are cheap to make


class Input:
    """Reads decisions from fuzz bytes (like atheris' FuzzedDataProvider); zeros once they run out."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def int(self, n_bytes: int) -> int:
        v = 0
        for _ in range(n_bytes):
            v = (v << 8) | self.byte()
        return v

    def below(self, n: int) -> int:
        return self.int(2 if n > 256 else 1) % n if n > 1 else 0

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def chance(self, per256: int) -> bool:
        return self.byte() < per256

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def value(self, depth: int = 0) -> Any:
        """Any msgpack value, weighted toward the ones a decoder trips on."""
        k = self.below(12 if depth < 2 else 9)
        if k == 0:
            return None
        if k == 1:
            return self.chance(128)
        if k == 2:
            return self.pick([0, 1, -1, 7, 255, 2**31, 2**32, 2**53, 2**63 - 1, 2**64 - 1, -2**63])
        if k == 3:
            return self.int(2)
        if k == 4:
            return self.pick([0.0, -0.0, 1.5, -1.0, math.nan, math.inf, -math.inf, 1e308, 5e-324])
        if k == 5:
            return self.take(self.below(12)).decode("latin-1")
        if k == 6:
            return self.take(self.below(40))
        if k == 7:
            return struct.pack("<Q", self.int(8)) * self.below(4)
        if k == 8:
            return ""
        if k in (9, 10):
            return [self.value(depth + 1) for _ in range(self.below(4))]
        out = {}
        for _ in range(self.below(4)):
            key = self.value(depth + 1) if self.chance(40) else self.pick(["a", "tick", "gpfns", "code"])
            out[key if isinstance(key, (str, bytes, int, float, type(None))) else repr(key)] = self.value(depth + 1)
        return out


# --- bodies ----------------------------------------------------------------------------------

def _field_value(inp: Input, kind: str) -> Any:
    """A value for a field of wire kind ``kind``: usually valid, sometimes not."""
    if inp.chance(200):
        if kind == "int":
            return inp.pick([0, 1, 3, 1023, 1024, 2**32, 2**63 - 1])
        if kind == "number":
            return inp.pick([0, 0.5, 10_000, 1e6, 2**40])
        if kind == "str":
            return inp.pick(["", "x", "t0k3n-for-tests", "é"])
        if kind == "bin":
            return inp.take(inp.below(16))
        if kind == "pages":
            n = inp.below(6)
            return b"".join(struct.pack("<Q", inp.pick([0, 1, 2, 5, 63, 64, 1023, 1024, 2**40, 2**64 - 1]))
                            for _ in range(n))
        if kind == "map" or (kind == "stats" and inp.chance(2)):
            return {inp.pick(["refs", "pff", "free", "x"]): inp.value(1) for _ in range(inp.below(4))}
        if kind == "stats":
            return [inp.value(1) for _ in range(inp.below(4))]
    return inp.value(1)


def make_body(inp: Input, cls: Any) -> Any:
    """A body for message class ``cls``: its SPEC with mutations, or anything at all."""
    if inp.chance(20):
        return inp.value()
    body = {}
    for name, kind in cls.SPEC.items():
        if inp.chance(12):
            continue                                   # missing
        body[name] = _field_value(inp, kind)
    if inp.chance(16):
        body[inp.pick(["extra", "guest_id", 1, ""])] = inp.value(1)  # unknown (or a non-str key)
    return body


# --- targets ------------------------------------------------------------------------------------

def fuzz_framing(data: bytes) -> None:
    from balloonlab.proto.errors import FrameError, FrameTooLarge
    from balloonlab.proto.framing import HEADER_BYTES, FrameDecoder

    inp = Input(data)
    dec = FrameDecoder(MAX_FRAME)
    stream = data[inp.below(8):]
    failed = False
    pos = 0
    while pos < len(stream):
        n = 1 + inp.below(64)
        chunk = stream[pos:pos + n]
        pos += n
        try:
            items = dec.feed(chunk)
        except FrameTooLarge:
            assert failed, "feed raised before reporting the oversized frame in band"
            continue
        assert not failed or not items, "frames decoded after an oversized one"
        for item in items:
            if isinstance(item, FrameTooLarge):
                assert item is items[-1]
                failed = True
            elif isinstance(item, FrameError):
                pass
        # Bounded memory: at most one (allowed) frame is ever buffered.
        assert dec.pending_bytes() <= HEADER_BYTES + MAX_FRAME, dec.pending_bytes()
    try:
        dec.check_eof()
    except FrameError:
        pass


def fuzz_messages(data: bytes) -> None:
    from balloonlab.proto.errors import MessageError, UnknownMessageType
    from balloonlab.proto.messages import NOTIFICATIONS, REQUESTS, Message, MsgType, msg_type_of

    inp = Input(data)
    classes = [c for pair in REQUESTS.values() for c in pair] + list(NOTIFICATIONS.values())
    for _ in range(1 + inp.below(4)):
        cls = inp.pick(classes)
        body = make_body(inp, cls)
        try:
            msg = cls.from_body(body)
        except MessageError:
            continue
        assert isinstance(msg, Message) and type(msg) is cls
        again = cls.from_body(msgpack.unpackb(msgpack.packb(msg.to_body(), use_bin_type=True), raw=False,
                                              strict_map_key=False))
        assert again.to_body().keys() == msg.to_body().keys()
    raw = inp.value()
    try:
        t = msg_type_of(raw)
        assert isinstance(t, MsgType) and type(raw) is int
    except UnknownMessageType:
        pass


class _Transport(asyncio.Transport):
    """Collects what the connection writes; closing tells the protocol, as a real transport does."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.out = bytearray()
        self.closing = False
        self.reading = True
        self.protocol: Any = None

    def write(self, data: Any) -> None:
        if not self.closing:
            self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _envelope(inp: Input) -> list[Any] | Any:
    from balloonlab.proto.messages import NOTIFICATIONS, REQUESTS, MsgType

    kind = inp.pick([0, 0, 1, 2, 3, 3, 4, -1, True, 1.0, "0"])
    msg_id = inp.pick([1, 2, 3, 4, 5, 1, 2, 0, -1, 2**63, "1", None, 1.0])
    types = [int(t) for t in MsgType] + [0, 5, 99, 2**40, -1]
    t = inp.pick(types + [True, 20.0, "20"]) if inp.chance(16) else inp.pick(types)
    if kind == 0 and type(t) is int and t in {int(x) for x in REQUESTS}:
        cls = REQUESTS[MsgType(t)][0]
    elif kind == 1 and type(t) is int and t in {int(x) for x in REQUESTS}:
        cls = REQUESTS[MsgType(t)][1]
    elif kind == 3 and type(t) is int and t in {int(x) for x in NOTIFICATIONS}:
        cls = NOTIFICATIONS[MsgType(t)]
    else:
        cls = None
    if kind == 2:
        body = {"code": inp.pick([1, 3, 20, 50, 999, "x"]), "message": inp.value(1)} if inp.chance(200) else inp.value()
    else:
        body = make_body(inp, cls) if cls is not None else inp.value()
    env = [kind, msg_id, t, body]
    if inp.chance(10):
        return inp.value()       # not an envelope at all
    if inp.chance(10):
        return env[:inp.below(4)] + [inp.value(1)] * inp.below(3)
    return env


def _stream(inp: Input) -> bytes:
    parts = []
    for _ in range(1 + inp.below(24)):
        k = inp.below(32)
        if k == 0:
            parts.append(inp.take(inp.below(24)))                    # raw garbage
        elif k == 1:
            parts.append(struct.pack(">I", MAX_FRAME + 1 + inp.int(2)))  # oversized header: fatal, last
            break
        else:
            try:
                body = msgpack.packb(_envelope(inp), use_bin_type=True)
            except (OverflowError, TypeError, ValueError):
                continue
            if len(body) > MAX_FRAME:
                continue
            parts.append(struct.pack(">I", len(body)) + body)
    return b"".join(parts)


def fuzz_rpc(data: bytes) -> None:
    asyncio.run(_fuzz_rpc(data))


async def _fuzz_rpc(data: bytes) -> None:
    from balloonlab.hostd.session import GuestConnection
    from balloonlab.proto.errors import ErrorCode, MessageError, PeerClosed, ProtoError, RemoteError
    from balloonlab.proto.framing import HEADER_BYTES, FrameDecoder
    from balloonlab.proto.messages import EptFaultReply, Invalidate, MsgType, Ping, Pong
    from balloonlab.proto.rpc import RpcLimits

    class Coded(Exception):
        code = ErrorCode.OUT_OF_RANGE

    inp = Input(data)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    refused: list[int] = []
    limits = RpcLimits(max_frame_bytes=MAX_FRAME, max_outstanding=4, max_incoming=3, timeout_s=0)

    async def ept(m: Any) -> Any:
        await asyncio.sleep(0)
        return EptFaultReply(m.gpfns, m.vt_us)

    def disk_read(m: Any) -> Any:
        raise Coded(f"block {m.blocks[:1]} out of range")

    async def disk_write(m: Any) -> Any:
        raise ValueError("a handler bug")

    conn = GuestConnection(name="fuzz", limits=limits, on_refused=lambda c, code, t, msg: refused.append(code),
                           requests={MsgType.PING: lambda m: Pong(m.payload), MsgType.EPT_FAULT: ept,
                                     MsgType.DISK_READ: disk_read, MsgType.DISK_WRITE: disk_write},
                           notifications={MsgType.TICK_DONE: lambda m: None})
    tr = _Transport(loop)
    tr.protocol = conn
    conn.connection_made(tr)
    calls = [asyncio.ensure_future(conn.call(inp.pick([Ping(b"x"), Invalidate(np.zeros(2, "<u8"))])))
             for _ in range(inp.below(4))]
    await asyncio.sleep(0)
    stream = _stream(inp)
    pos = 0
    while pos < len(stream) and not tr.closing:
        n = 1 + inp.below(512)
        conn.data_received(stream[pos:pos + n])
        pos += n
        assert conn.outstanding <= limits.max_outstanding
        assert conn._incoming <= limits.max_incoming
        assert conn._decoder.pending_bytes() <= HEADER_BYTES + MAX_FRAME
        for _ in range(inp.below(3)):
            await asyncio.sleep(0)
    for _ in range(3):
        await asyncio.sleep(0)
    tr.close()
    for _ in range(3):
        await asyncio.sleep(0)
    for c in calls:
        assert c.done()
        exc = c.exception()
        assert exc is None or isinstance(exc, (PeerClosed, RemoteError, MessageError, ProtoError)), repr(exc)
    # Everything the host wrote is a well-formed envelope; one answer at most per request id.
    answered: dict[int, int] = {}
    frames = FrameDecoder(1 << 20).feed(bytes(tr.out))
    for f in frames:
        assert isinstance(f, list) and len(f) == 4, f
        kind, msg_id, mtype, body = f
        assert kind in (0, 1, 2, 3) and type(msg_id) is int and type(mtype) is int
        if kind == 2:
            assert type(body["code"]) is int and isinstance(body["message"], str), body
        if kind in (1, 2) and msg_id:
            answered[msg_id] = answered.get(msg_id, 0) + 1
    # (ids may repeat in the input, so only the error count is bounded by what was refused)
    assert len(refused) == sum(1 for f in frames if f[0] == 2)
    unexpected = [e for e in errors if "exception" in e and not isinstance(e["exception"], (PeerClosed,))]
    assert not unexpected, unexpected


def fuzz_host(data: bytes) -> None:
    asyncio.run(_fuzz_host(data))


async def _fuzz_host(data: bytes) -> None:
    from balloonlab.hostd.errors import HostdError
    from balloonlab.hostd.memory import HostMemory
    from balloonlab.hostd.session import MAX_STAT_KEYS, MAX_STAT_VALUE, sanitize_stats
    from balloonlab.proto.costs import CostModel

    inp = Input(data)
    pages, blocks = 64, 48
    mem = HostMemory(96, 160, inp.pick(["random", "clock"]), np.random.default_rng(inp.byte()), CostModel(), "ssd",
                     low_watermark_frames=2, reclaim_batch_frames=4, cluster_pages=4, vdisk_cache_max_pages=16)
    held: dict[int, np.ndarray] = {}

    async def shootdown(gid: int, gpfns: np.ndarray) -> np.ndarray:
        if inp.chance(8):
            raise HostdError("the guest did not answer")
        return held[gid][gpfns.astype(np.int64)]

    mem.wire(shootdown=shootdown)
    for gid in (1, 2):
        mem.add_guest(gid, pages, pages // 2, disk_blocks=blocks)
        held[gid] = np.arange(pages, dtype=np.uint64) + np.uint64(gid << 32)

    def numbers(limit: int) -> np.ndarray:
        n = inp.below(9)
        return np.array([inp.pick([0, 1, 2, 3, limit - 1, limit, limit + 7, 2**40, 2**64 - 1, inp.below(limit)])
                         for _ in range(n)], dtype=np.uint64)

    for _ in range(1 + inp.below(40)):
        if inp.left == 0:
            break
        gid = inp.pick([1, 2, 2, 7])
        op = inp.below(8)
        try:
            if op == 0:
                await mem.ept_fault(gid, numbers(pages), float(inp.int(2)))
            elif op == 1:
                mem.balloon_inflate(gid, numbers(pages))
            elif op == 2:
                mem.balloon_deflate(gid, numbers(pages))
            elif op == 3:
                await mem.vdisk_read(gid, numbers(blocks), 0.0)
            elif op == 4:
                b = numbers(blocks)
                await mem.vdisk_write(gid, b, numbers(2**32)[:b.size] if inp.chance(40) else b + np.uint64(9), 0.0)
            elif op == 5:
                size = (pages + 7) // 8 if inp.chance(200) else inp.below(12)
                mem.set_ad_bits(gid, inp.take(size), inp.take(size))
            elif op == 6:
                await mem.reclaim(inp.below(20), 0.0)
            else:
                mem.tick(float(inp.int(3)))
                await mem.balance(0.0)
        except HostdError:
            pass
        mem.check_invariant()
    stats = inp.value()
    clean: Any = None
    if isinstance(stats, dict):
        clean, problems = sanitize_stats({str(k): v for k, v in stats.items()})
    elif isinstance(stats, list):   # values alone, with the keys of a map before (maybe of another length)
        keys = tuple(f"k{i}" for i in range(len(stats) + inp.pick([0, 0, 0, 1, -1])))
        clean, problems = sanitize_stats(stats, None if inp.chance(8) else keys)
        assert clean or problems or not stats
    if clean is not None:
        assert len(clean) <= MAX_STAT_KEYS and len(problems) <= 8
        for v in clean.values():
            assert type(v) in (int, float) and 0 <= v <= MAX_STAT_VALUE and math.isfinite(v)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "framing": fuzz_framing, "messages": fuzz_messages, "rpc": fuzz_rpc, "host": fuzz_host,
}


# --- engines --------------------------------------------------------------------------------------

def _run_hypothesis(names: list[str], seconds: float, examples: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    per_target = seconds / len(names)
    for name in names:
        target = TARGETS[name]
        deadline = time.monotonic() + per_target
        rounds = total = 0
        while True:
            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(st.binary(max_size=4096))
            def run(data: bytes) -> None:
                target(data)

            t0 = time.monotonic()
            run()
            rounds += 1
            total += examples
            if time.monotonic() + (time.monotonic() - t0) > deadline:
                break
        print(f"{name}: {total} inputs in {rounds} round(s) of {examples}, no failure", flush=True)
    return 0


def _run_atheris(names: list[str], extra: list[str]) -> int:
    import atheris  # noqa: F401  (checked by the caller)

    if len(names) != 1:
        print("atheris fuzzes one target per process: pass --target", file=sys.stderr)
        return 2
    target = TARGETS[names[0]]
    # Coverage guidance needs the code under test instrumented: import it, then instrument what is loaded.
    import balloonlab.hostd.memory  # noqa: F401
    import balloonlab.hostd.session  # noqa: F401
    import balloonlab.proto.framing  # noqa: F401
    import balloonlab.proto.messages  # noqa: F401
    import balloonlab.proto.rpc  # noqa: F401
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *extra], target)
    atheris.Fuzz()
    return 0


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    ap = argparse.ArgumentParser(prog="fuzz.py", description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto",
                    help="auto: atheris for one target if it is installed, else hypothesis")
    ap.add_argument("--seconds", type=float, default=60.0, help="hypothesis: wall seconds in all (split over targets)")
    ap.add_argument("--examples", type=int, default=2000, help="hypothesis: inputs per round")
    args = ap.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    # The targets make the code under test log every refusal; a fuzzer has no use for millions of lines.
    import logging

    import structlog
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        engine = args.engine
        if engine == "auto":
            engine = "atheris" if _have_atheris() and len(names) == 1 else "hypothesis"
        if engine == "atheris":
            if not _have_atheris():
                print("atheris is not installed for this Python (pip install atheris); use --engine hypothesis",
                      file=sys.stderr)
                return 2
            return _run_atheris(names, extra)
        return _run_hypothesis(names, args.seconds, args.examples)
    finally:
        # main() also runs inside the test process: leave logging as it was found.
        structlog.configure(**saved)


if __name__ == "__main__":
    sys.exit(main())

"""The dashboard's web server: one page, its static files, a Server-Sent Events stream, a JSON state.

Every URL starts with the run's secret (``http://127.0.0.1:PORT/SECRET/``),
compared in constant time; anything else gets 403, so another local user who
finds the port cannot read the run. The server binds 127.0.0.1 unless told
otherwise.

    GET /SECRET/            the page (static/index.html)
    GET /SECRET/static/F    its script and style sheet
    GET /SECRET/stream      text/event-stream: a "snapshot" of everything so far, then what changes
    GET /SECRET/api/state   the same snapshot as JSON
    GET /SECRET/api/latest  per variant its meta, last frame, counts and last events (balloonlab-top)

A background task polls the run directory every ``poll_s`` wall seconds
(``model.RunModel``) and sends each subscriber what changed. A subscriber
that falls more than ``MAX_QUEUED`` messages behind is dropped; its browser
reconnects and gets a fresh snapshot.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import secrets
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from .model import Change, RunModel

__all__ = ["Dashboard", "new_secret", "POLL_S", "MAX_QUEUED"]

POLL_S = 0.25
MAX_QUEUED = 2000
KEEPALIVE_S = 15.0
_STATIC = {"index.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css",
           "LICENSE.txt": "text/plain"}


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def _static_bytes(name: str) -> bytes:
    return resources.files("balloonlab.dashboard").joinpath("static", name).read_bytes()


def _message(change: Change) -> dict[str, Any]:
    kind = change[0]
    if kind == "frame":
        return {"type": "frame", "variant": change[1], "index": change[2], "frame": change[3]}
    if kind == "event":
        return {"type": "event", "variant": change[1], "index": change[2], "event": change[3]}
    if kind == "meta":
        return {"type": "meta", "variant": change[1], "meta": change[2]}
    if kind == "counts":
        return {"type": "counts", "variant": change[1], "counts": change[2]}
    if kind == "finished":
        return {"type": "finished", "variant": change[1], "finished": change[2]}
    if kind == "variant":
        return {"type": "variant", "variant": change[1]}
    if kind == "summary":
        return {"type": "summary", "summary": change[1]}
    raise ValueError(f"unknown change kind {kind!r}")


def _coalesce(changes: list[Change]) -> list[Change]:
    """The last update of each frame, event, meta and counts only (a frame may be rebuilt twice in one poll)."""
    def key(c: Change) -> tuple[Any, ...] | None:
        if c[0] in ("frame", "event"):
            return c[:3]
        return c[:2] if c[0] in ("counts", "meta") else None

    last = {key(c): i for i, c in enumerate(changes) if key(c) is not None}
    return [c for i, c in enumerate(changes) if key(c) is None or last[key(c)] == i]


class _Subscriber:
    """One open stream: the messages not yet written to it."""

    def __init__(self) -> None:
        self.items: collections.deque[str] = collections.deque()
        self.ready = asyncio.Event()
        self.closed = False    # no more messages: the stream ends once what is queued is written

    def push(self, data: str) -> None:
        if self.closed:
            return
        if len(self.items) >= MAX_QUEUED:   # too slow: drop it; its browser reconnects for a fresh snapshot
            self.items.clear()
            self.close()
            return
        self.items.append(data)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    async def take(self, timeout_s: float) -> list[str] | None:
        """What is queued ([] after ``timeout_s`` with nothing), or None once closed and written."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            return []
        if self.closed and not self.items:
            return None
        out = list(self.items)
        self.items.clear()
        if not self.closed:
            self.ready.clear()
        return out


class Dashboard:
    """Serve one run directory; ``live``: the run is going on (the page follows it) rather than a replay."""

    def __init__(self, run_dir: Path, *, host: str = "127.0.0.1", port: int = 0, secret: str | None = None,
                 live: bool = True, poll_s: float = POLL_S) -> None:
        self.model = RunModel(run_dir)
        self.host = host
        self.port = port
        self.secret = secret or new_secret()
        self.live = live
        self.poll_s = poll_s
        self.ended = False
        self.failed = False      # a poll raised (reported once on stderr)
        self._subscribers: set[_Subscriber] = set()
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/{self.secret}/"

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> str:
        """Read what the run directory holds, listen, and follow it; return the URL."""
        await self._poll()
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/{secret}", self._redirect)
        app.router.add_get("/{secret}/", self._page)
        app.router.add_get("/{secret}/static/{name}", self._static)
        app.router.add_get("/{secret}/stream", self._stream)
        app.router.add_get("/{secret}/api/state", self._state)
        app.router.add_get("/{secret}/api/latest", self._latest)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0 and self._runner.addresses:   # the free port the system picked
            self.port = int(self._runner.addresses[0][1])
        self._poller = asyncio.create_task(self._follow())
        return self.url

    async def close(self) -> None:
        """Read the logs one last time, tell every page the run is over, and stop serving."""
        self._stopping.set()
        if self._poller is not None:
            await self._poller
        await self._poll_guarded()
        self.ended = True
        self._broadcast({"type": "end"})
        for sub in list(self._subscribers):
            sub.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            if not self._stopping.is_set():
                await self._poll_guarded()

    async def _poll_guarded(self) -> None:
        """A poll that cannot fail the run it watches: a broken dashboard says so once and goes on."""
        try:
            await self._poll()
        except Exception as exc:  # noqa: BLE001 -- the launcher's run matters more than its page
            if not self.failed:
                print(f"balloonlab: dashboard: reading the logs failed ({type(exc).__name__}: {exc}); "
                      f"the page may be incomplete", file=sys.stderr, flush=True)
            self.failed = True

    async def _poll(self) -> None:
        async with self._lock:
            # File reads and JSON parsing off the loop: a long replay's first read takes a while.
            changes = await asyncio.get_running_loop().run_in_executor(None, self.model.poll)
        for c in _coalesce(changes):
            self._broadcast(_message(c))

    def _broadcast(self, msg: dict[str, Any]) -> None:
        if not self._subscribers:
            return
        data = json.dumps(msg, separators=(",", ":"), default=str)
        for sub in list(self._subscribers):
            sub.push(data)
            if sub.closed:
                self._subscribers.discard(sub)

    # --- handlers --------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        first = request.path.lstrip("/").split("/", 1)[0]
        if not hmac.compare_digest(first.encode(), self.secret.encode()):
            return web.Response(status=403, text="403: this dashboard needs the URL with its secret, as printed\n")
        return await handler(request)

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"/{self.secret}/")

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=_static_bytes("index.html"), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return web.Response(body=_static_bytes(name), content_type=_STATIC[name], charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def _snapshot(self) -> dict[str, Any]:
        async with self._lock:
            snap = self.model.snapshot()
        snap.update(live=self.live and not self.ended, ended=self.ended)
        return snap

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._snapshot(), dumps=lambda o: json.dumps(o, default=str))

    async def _latest(self, request: web.Request) -> web.StreamResponse:
        async with self._lock:
            out = self.model.latest()
        out.update(live=self.live and not self.ended, ended=self.ended)
        return web.json_response(out, dumps=lambda o: json.dumps(o, default=str))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        sub = _Subscriber()
        # Subscribe before the snapshot is taken: nothing falls between the two (a change seen twice is harmless).
        self._subscribers.add(sub)
        try:
            snap = await self._snapshot()
            await resp.write(b"data: " + json.dumps({"type": "snapshot", "state": snap}, separators=(",", ":"),
                                                    default=str).encode() + b"\n\n")
            if self.ended:
                await resp.write(b'data: {"type":"end"}\n\n')
                return resp
            while True:
                batch = await sub.take(KEEPALIVE_S)
                if batch is None:
                    break
                if not batch:
                    await resp.write(b": keepalive\n\n")
                    continue
                await resp.write(b"".join(b"data: " + d.encode() + b"\n\n" for d in batch))
        except ConnectionResetError:
            pass   # the page went away
        finally:
            self._subscribers.discard(sub)
        return resp

"""The dashboard's server over real 127.0.0.1 sockets: the secret, the page, the event stream, the JSON state."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from balloonlab.dashboard.server import Dashboard
from tests.conftest import wait_until
from tests.dashlogs import FakeRun


async def _sse(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON messages of a text/event-stream response, one at a time."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            data = b"".join(line[6:] for line in block.split(b"\n") if line.startswith(b"data: "))
            if data:
                yield json.loads(data)


async def test_every_url_needs_the_secret(tmp_path: Path) -> None:
    FakeRun(tmp_path).tick(4)
    dash = Dashboard(tmp_path, poll_s=0.05)
    url = await dash.start()
    base = f"http://127.0.0.1:{dash.port}"
    try:
        assert url == f"{base}/{dash.secret}/" and len(dash.secret) >= 32
        async with aiohttp.ClientSession() as s:
            for bad in ("/", "/stream", "/api/state", f"/{dash.secret[:-1]}/", f"/{dash.secret}x/api/state",
                        f"/x{dash.secret}/stream", "/static/dashboard.js"):
                async with s.get(base + bad) as r:
                    assert r.status == 403, bad
            async with s.get(url) as r:
                assert r.status == 200 and '<script src="static/dashboard.js">' in await r.text()
            async with s.get(url + "static/dashboard.js") as r:
                assert r.status == 200 and "EventSource" in await r.text()
            async with s.get(url + "static/../server.py") as r:
                assert r.status in (403, 404)
            async with s.get(url + "static/nothing.js") as r:
                assert r.status == 404
            async with s.get(f"{base}/{dash.secret}", allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == f"/{dash.secret}/"
    finally:
        await dash.close()


async def test_the_stream_sends_a_snapshot_then_each_tick_as_it_is_logged_then_the_end(tmp_path: Path) -> None:
    run = FakeRun(tmp_path, guests=2)
    run.tick(4)
    dash = Dashboard(tmp_path, poll_s=0.05)
    url = await dash.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "stream") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            messages = _sse(r)
            first = await asyncio.wait_for(messages.__anext__(), 10)
            assert first["type"] == "snapshot" and first["state"]["live"] is True
            (variant,) = first["state"]["variants"]
            assert [f["tick"] for f in variant["frames"]] == [4]
            run.tick(9)
            run.write("host", {"event": "balloon_target_set", "guest": 0, "target_pages": 7, "previous_pages": 0,
                               "tick": 9, "vt_us": 100000})
            seen: list[dict[str, Any]] = []

            async def until_frame_and_event() -> None:
                async for m in messages:
                    seen.append(m)
                    if any(x["type"] == "frame" and x["frame"]["tick"] == 9 for x in seen) and \
                            any(x["type"] == "event" for x in seen):
                        return

            await asyncio.wait_for(until_frame_and_event(), 10)
            frame = next(x for x in seen if x["type"] == "frame" and x["frame"]["tick"] == 9)
            assert frame["index"] == 1 and frame["frame"]["guests"]["0"]["guest"]["balloon_pages"] == 9
            counts = [x for x in seen if x["type"] == "counts"]
            assert counts and counts[-1]["counts"]["balloon_target_set"] == 1
            closing = asyncio.create_task(dash.close())
            rest = [m async for m in messages]
            await closing
            assert rest and rest[-1] == {"type": "end"}
    finally:
        if not dash.ended:
            await dash.close()


async def test_the_json_state_and_latest(tmp_path: Path) -> None:
    run = FakeRun(tmp_path, guests=2)
    run.tick(4)
    dash = Dashboard(tmp_path, poll_s=0.05, live=False)
    url = await dash.start()
    try:
        async with aiohttp.ClientSession() as s:
            run.tick(9)
            async def two_frames() -> bool:
                async with s.get(url + "api/latest") as r:
                    latest = await r.json()
                return latest["variants"][0]["frames"] == 2

            await wait_until(two_frames, 10, what="the second tick reaches api/latest", interval_s=0.05)
            async with s.get(url + "api/state") as r:
                state = await r.json()
            assert state["live"] is False and [f["tick"] for f in state["variants"][0]["frames"]] == [4, 9]
    finally:
        await dash.close()


async def test_a_port_in_use_is_an_error_naming_it(tmp_path: Path) -> None:
    FakeRun(tmp_path)
    first = Dashboard(tmp_path)
    await first.start()
    try:
        with pytest.raises(OSError):
            await Dashboard(tmp_path, port=first.port).start()
    finally:
        await first.close()


async def test_a_failing_read_never_fails_the_run_it_watches(tmp_path: Path, capsys, monkeypatch) -> None:
    run = FakeRun(tmp_path)
    run.tick(4)
    dash = Dashboard(tmp_path, poll_s=0.02)
    await dash.start()

    def broken() -> list:
        raise RuntimeError("a bug in the model")

    monkeypatch.setattr(dash.model, "poll", broken)
    await wait_until(lambda: dash.failed, 10, what="the broken poll noticed")
    await dash.close()   # does not raise
    err = capsys.readouterr().err
    assert err.count("reading the logs failed (RuntimeError: a bug in the model)") == 1

"""Headless Chromium driven over the Chrome DevTools Protocol, with aiohttp's WebSocket client.

Debian's ``chromium`` (``CHROMIUM`` in the environment, else /usr/bin/chromium)
is started in its own process group with a fresh profile directory, on
``--remote-debugging-port=0``; the port is read from the line it prints.
``close`` ends the whole group (the browser's zygote and renderers too) and
removes the profile. Usable as ``python -m tests.cdp URL OUT.png`` to take a
screenshot by hand.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["Chromium", "chromium_path", "FLAGS"]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]
_LISTENING = re.compile(rb"DevTools listening on (ws://[^\s]+)")


def chromium_path() -> str | None:
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return path if os.access(path, os.X_OK) else None


class Chromium:
    def __init__(self, exe: str | None = None, width: int = 1400, height: int = 1000) -> None:
        self.exe = exe or chromium_path() or "/usr/bin/chromium"
        self.width, self.height = width, height
        self.proc: asyncio.subprocess.Process | None = None
        self.profile = ""
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.console: list[str] = []   # console messages and page errors

    async def __aenter__(self) -> "Chromium":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self, timeout_s: float = 30.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="bl-chromium-", dir="/tmp")
        self.proc = await asyncio.create_subprocess_exec(
            self.exe, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1", f"--window-size={self.width},{self.height}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout_s
        seen = b""
        browser_ws = None
        while browser_ws is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not open its DevTools port in {timeout_s} s: {seen[-2000:]!r}")
            line = await asyncio.wait_for(self.proc.stderr.readline(), left)
            if not line:
                raise RuntimeError(f"chromium exited ({await self.proc.wait()}): {seen[-2000:]!r}")
            seen += line
            m = _LISTENING.search(line)
            if m:
                browser_ws = m.group(1).decode()
        asyncio.get_running_loop().create_task(self._drain_stderr())
        http = "http://" + browser_ws.split("/")[2]
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"{http}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.readline():
            pass

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                if "error" in data:
                    fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.console.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the DevTools connection closed"))

    async def send(self, method: str, timeout_s: float = 30.0, **params: Any) -> Any:
        assert self._ws is not None
        i = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self._ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        return await asyncio.wait_for(fut, timeout_s)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float, what: str = "") -> Any:
        """Evaluate ``expression`` until it is truthy; return it. Fails naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:
                value = None   # the page is still loading
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page condition {what or expression!r} not met in {timeout_s} s (last {value!r}); "
                                   f"console: {self.console[-5:]}")
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        res = await self.send("Page.captureScreenshot", **params)
        Path(path).write_bytes(base64.b64decode(res["data"]))
        return Path(path)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.returncode is None:
            for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    await asyncio.wait_for(self.proc.wait(), wait_s)
                    break
                except asyncio.TimeoutError:
                    continue
        if self.proc is not None:
            try:   # the browser's helpers share its process group: none may outlive it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)


async def _shot(url: str, out: str, wait_expr: str, width: int, height: int) -> None:
    async with Chromium(width=width, height=height) as b:
        await b.navigate(url)
        await b.wait_for(wait_expr, 30.0)
        await asyncio.sleep(0.5)
        await b.screenshot(Path(out))
        print("\n".join(b.console))


if __name__ == "__main__":
    expr = sys.argv[3] if len(sys.argv) > 3 else "document.readyState === 'complete'"
    asyncio.run(_shot(sys.argv[1], sys.argv[2], expr, 1400, 1000))

"""Shared test fixtures and helpers.

- Every async test runs on uvloop, the loop the real processes use, through
  pytest-asyncio's ``pytest_asyncio_loop_factories`` hook (pytest-asyncio
  >= 1.4). ``BALLOONLAB_TEST_LOOPS=uvloop,asyncio`` runs each async test on
  both loops instead.
- ``wait_until(pred, timeout_s)`` (async; the synchronous one for
  multi-process tests is ``tests.procs.wait_until``)
  poll a condition with a deadline; tests use them, or events, never a bare
  sleep.
- ``sock_dir``: a short, private directory for Unix sockets. AF_UNIX paths
  are limited to ~107 bytes, and pytest's ``tmp_path`` is often longer.
- ``determinism_seed5``: one real run of tests/test_determinism.py's
  scenario (seed 5, guests forked), shared by the tests that compare
  other runs against it (a second run at seed 5, exec'd guests).
- ``loop_errors``: records what reaches the loop's exception handler
  ("Future exception was never retrieved", exceptions in callbacks) and fails
  the test if anything did, as asyncio's own tests do.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

__all__ = ["wait_until", "LOOP_FACTORIES"]

T = TypeVar("T")

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Every host the tests start (they inherit this) checks the whole frame invariant at every tick,
# not a sample: the suite is where a bookkeeping bug must show at once (hostd.invariant).
os.environ.setdefault("BALLOONLAB_INVARIANT", "full")


def _uvloop_factory() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": _uvloop_factory,
    "asyncio": asyncio.new_event_loop,
}
"""Loop factories by name; ``BALLOONLAB_TEST_LOOPS`` picks among them."""


def _selected_loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    names = [n.strip() for n in os.environ.get("BALLOONLAB_TEST_LOOPS", "uvloop").split(",") if n.strip()]
    unknown = [n for n in names if n not in LOOP_FACTORIES]
    if unknown or not names:
        raise pytest.UsageError(f"BALLOONLAB_TEST_LOOPS: unknown loop(s) {unknown}; known: {sorted(LOOP_FACTORIES)}")
    return {n: LOOP_FACTORIES[n] for n in names}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio hook: the event loops every async test runs on."""
    return _selected_loops()


async def wait_until(pred: Callable[[], T | Awaitable[T]], timeout_s: float = 5.0,
                     what: str | None = None, interval_s: float = 0.001) -> T:
    """Poll ``pred`` on the running loop until it returns something truthy; return it.

    ``pred`` may be a plain function or return an awaitable. Raises
    ``TimeoutError`` naming ``what`` (or the predicate) after ``timeout_s``
    wall seconds. Between polls the loop runs, so the awaited condition can
    actually progress.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition {what or getattr(pred, '__name__', pred)!s} "
                               f"not met within {timeout_s:g} s (last value {value!r})")
        await asyncio.sleep(interval_s)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh private directory under /tmp (short paths for AF_UNIX), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def loop_errors() -> Any:
    """Collect what reaches the loop's exception handler; fail the test if anything did.

    The test may inspect or clear the list itself when it expects an error.
    """
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
        # Let callbacks scheduled by the test's last steps (connection_lost,
        # done callbacks) run before judging.
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not seen, "the event loop's exception handler was called: " + "; ".join(
        str(c.get("message")) + (f" ({c['exception']!r})" if "exception" in c else "") for c in seen)


@pytest.fixture(scope="session")
def determinism_seed5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """test_determinism's scenario at seed 5 with forked guests, run once for every test that compares with it."""
    from tests.test_determinism import determinism_run

    return determinism_run(tmp_path_factory.mktemp("determinism"), "seed5-fork")

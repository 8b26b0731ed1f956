"""Handlers marked ``proto.rpc.eager``: the first step runs inside ``data_received``; a task only if it waits.

The host's deterministic lanes are marked: most requests are answered in
the read that brought them. What must hold: a handler that finishes in its
first step leaves nothing behind (no task, nothing counted in progress);
one that waits is a task registered on the connection and counted against
``max_incoming`` until it answers; errors in either step come back with
their code; what the handler sets in a contextvar stays in its own context;
an unmarked coroutine handler still runs as a task from its start.
"""
from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from balloonlab.proto.errors import ErrorCode, RemoteError
from balloonlab.proto.messages import MsgType, Ping, Pong
from balloonlab.proto.rpc import eager
from balloonlab.proto.transport import Address

from .conftest import wait_until
from .test_proto_rpc import CALL_TIMEOUT_S, address, rpc_pair  # noqa: F401  (address: the fixture)

pytestmark = [pytest.mark.usefixtures("loop_errors"), pytest.mark.timeout(30)]

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("test_rpc_eager_seen", default="unset")


class Coded(Exception):
    code = int(ErrorCode.INVALID_STATE)


async def test_a_handler_that_finishes_at_once_needs_no_task(address: Address) -> None:
    steps: list[Any] = []

    @eager
    async def ping(m: Ping) -> Pong:
        steps.append(asyncio.current_task())
        return Pong(m.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: ping}}) as p:
        for i in range(20):
            assert (await p.client.call(Ping(bytes([i])))).payload == bytes([i])
        assert steps == [None] * 20            # every one ran inside data_received, not in a task
        assert not p.server._tasks and p.server._incoming == 0 and p.server.incoming_bytes == 0


async def test_a_handler_that_waits_goes_on_as_a_counted_task(address: Address) -> None:
    gate: asyncio.Future | None = None
    steps: list[str] = []

    @eager
    async def ping(m: Ping) -> Pong:
        nonlocal gate
        steps.append("first" if asyncio.current_task() is None else "task")
        gate = asyncio.get_running_loop().create_future()
        await gate
        steps.append("task" if asyncio.current_task() is not None else "outside")
        return Pong(m.payload + b"!")

    async with rpc_pair(address, server={"requests": {MsgType.PING: ping}}) as p:
        call = asyncio.ensure_future(p.client.call(Ping(b"x")))
        await wait_until(lambda: gate is not None, CALL_TIMEOUT_S, "the first step ran")
        assert len(p.server._tasks) == 1 and p.server._incoming == 1 and p.server.incoming_bytes > 0
        assert not call.done()
        assert gate is not None
        gate.set_result(None)
        assert (await call).payload == b"x!"
        assert steps == ["first", "task"]
        await wait_until(lambda: not p.server._tasks, CALL_TIMEOUT_S, "the task is forgotten")
        assert p.server._incoming == 0 and p.server.incoming_bytes == 0


async def test_errors_in_either_step_come_back_with_their_code(address: Address) -> None:
    @eager
    async def ping(m: Ping) -> Pong:
        if m.payload == b"now":
            raise Coded("refused in the first step")
        await asyncio.sleep(0)
        if m.payload == b"later":
            raise Coded("refused after a wait")
        return Pong(m.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: ping}}) as p:
        for payload, message in ((b"now", "first step"), (b"later", "after a wait")):
            with pytest.raises(RemoteError) as info:
                await p.client.call(Ping(payload))
            assert info.value.code == ErrorCode.INVALID_STATE and message in info.value.message
        assert (await p.client.call(Ping(b"ok"))).payload == b"ok"
        await wait_until(lambda: not p.server._tasks, CALL_TIMEOUT_S, "no task left")
        assert p.server._incoming == 0 and p.server.incoming_bytes == 0


async def test_what_a_handler_sets_stays_in_its_own_context(address: Address) -> None:
    @eager
    async def ping(m: Ping) -> Pong:
        before = _seen.get()
        _seen.set(m.payload.decode())
        return Pong(before.encode())

    async with rpc_pair(address, server={"requests": {MsgType.PING: ping}}) as p:
        assert (await p.client.call(Ping(b"a"))).payload == b"unset"
        assert (await p.client.call(Ping(b"b"))).payload == b"unset"   # not "a": it did not leak


async def test_an_unmarked_coroutine_handler_runs_as_a_task_from_its_start(address: Address) -> None:
    steps: list[bool] = []

    async def ping(m: Ping) -> Pong:
        steps.append(asyncio.current_task() is not None)
        return Pong(m.payload)

    async with rpc_pair(address, server={"requests": {MsgType.PING: ping}}) as p:
        await p.client.call(Ping(b""))
        assert steps == [True]

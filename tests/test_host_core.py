"""The host core's seams, in one process: the assembly, the request disciplines, the handler table, the registry.

The multi-process consequences (same seed, same counts; silent guests;
the lock scenarios) are in test_determinism, test_faults_* and
test_deadlock_*; here each seam is checked where it is defined.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from balloonlab.hostd.assembly import HostCore, assemble
from balloonlab.hostd.config import RunConfig
from balloonlab.hostd.discipline import (MODES, ArrivalOrder, DeterministicOrder, DisciplineBase, DisciplineContext,
                                         LockModel)
from balloonlab.hostd.errors import HostdError
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.monitors import HostMonitors
from balloonlab.hostd.registry import SessionRegistry
from balloonlab.hostd.victim.prefer import PreferVictims
from balloonlab.proto.costs import CostModel
from balloonlab.proto.errors import ConfigError
from balloonlab.proto.messages import EptFault, EptFaultReply, MsgType, TickDone

MEMORY_REQUESTS = {MsgType.EPT_FAULT, MsgType.BALLOON_INFLATE, MsgType.BALLOON_DEFLATE, MsgType.DISK_READ,
                   MsgType.DISK_WRITE, MsgType.FREE_REPORT}


def run_config(**over: Any) -> RunConfig:
    raw: dict[str, Any] = {"run_id": "t", "scenario": "t", "variant": "v", "seed": 3, "ticks": 4,
                           "guests": [{"id": 0, "ram_pages": 64, "disk_blocks": 32},
                                      {"id": 1, "ram_pages": 64, "disk_blocks": 32}]}
    raw.update(over)
    return RunConfig.from_mapping(raw)


def core_for(cfg: RunConfig) -> tuple[HostCore, SessionRegistry]:
    sessions = SessionRegistry()
    return assemble(cfg, sessions, running=set, stop=lambda why: None, clock=lambda: 0.0), sessions


def fake_session(gid: int) -> Any:
    return SimpleNamespace(guest_id=gid, unresponsive=False, last_tick_done=-1, last_stats={}, stats_keys=None,
                           conn=SimpleNamespace(is_closing=False, in_progress=0))


# --- the assembly -----------------------------------------------------------------------


@pytest.mark.parametrize("over, mode", [
    ({}, DeterministicOrder),
    ({"host": {"request_order": "virtual-time"}}, DeterministicOrder),   # the old name, an alias
    ({"host": {"request_order": "arrival"}}, ArrivalOrder),
    ({"locks": {"protocol": "ordered"}}, LockModel),
    ({"locks": {"protocol": "no-callback-under-lock"}}, LockModel),
])
def test_the_run_config_picks_one_request_discipline(over: dict[str, Any], mode: type) -> None:
    core, _ = core_for(run_config(**over))
    assert type(core.discipline) is mode
    expected = "deterministic" if mode is DeterministicOrder else "arrival"
    assert core.discipline.stats()["request_order"] == expected
    # Only no-callback-under-lock drops L_hostmem around the calls into guests.
    callout = core.discipline.memory_callout()
    assert (callout is not None) == (over.get("locks", {}).get("protocol") == "no-callback-under-lock")


@pytest.mark.parametrize("order", ["deterministic", "virtual-time"])
def test_the_deterministic_order_with_a_lock_protocol_is_refused_naming_both(order: str) -> None:
    with pytest.raises(ConfigError, match=f"host.request_order: \"{order}\" cannot go with a \\[locks\\]"):
        core_for(run_config(host={"request_order": order}, locks={"protocol": "naive"}))


def test_the_assembly_connects_host_memory_once() -> None:
    core, _ = core_for(run_config())
    mem = core.mem
    assert isinstance(mem.victim, PreferVictims) and mem.victim is core.silent.victims
    assert core.machine.mem is mem and core.monitors is core.machine.monitors
    with pytest.raises(RuntimeError, match="shootdown is connected already"):
        mem.wire(shootdown=core.shootdowns.shootdown)
    with pytest.raises(RuntimeError, match="observer is connected already"):
        mem.wire(observer=core.monitors)


async def test_a_reclaim_reaches_the_guest_through_the_discipline_and_the_registry() -> None:
    """Host memory's shootdown is the shootdown module's, which finds the session in the registry."""
    core, sessions = core_for(run_config(host={"request_order": "arrival"}))
    mem = core.mem
    content = np.arange(64, dtype=np.uint64) + np.uint64(7 << 32)
    asked: list[list[int]] = []

    class Conn:
        is_closing = False
        in_progress = 0

        async def call(self, msg: Any, timeout_s: float | None = None) -> Any:
            asked.append(msg.gpfns.astype(int).tolist())
            from balloonlab.proto.messages import InvalidateReply
            return InvalidateReply(content[msg.gpfns.astype(np.int64)])

    s = fake_session(0)
    s.conn = Conn()
    sessions.join(s)
    core.machine.guest_joined(s)
    await mem.ept_fault(0, np.arange(8, dtype=np.uint64), 0.0)
    got = await mem.reclaim(3, 0.0)
    assert got.freed_frames == 3 and len(asked) == 1 and len(asked[0]) == 3
    tokens, _ = await mem.ept_fault(0, np.asarray(asked[0], np.uint64), 0.0)
    assert tokens.tolist() == content[asked[0]].tolist()
    # A guest that left cannot be shot down: the eviction fails and its mapping stays.
    sessions.leave(s, "connection lost")
    with pytest.raises(HostdError, match="guest 0 is gone"):
        await core.shootdowns.shootdown(0, np.array([1], np.uint64))


# --- the handler table -----------------------------------------------------------------------


def test_before_the_handshake_a_connection_answers_hello_only() -> None:
    core, _ = core_for(run_config())
    table = core.handlers.handshake(lambda hello: None)  # type: ignore[arg-type, return-value]
    assert set(table.requests) == {MsgType.HELLO} and not table.notifications


@pytest.mark.parametrize("over, extra_requests, extra_notes", [
    ({}, set(), set()),
    ({"host": {"request_order": "arrival"}}, set(), set()),
    ({"locks": {"protocol": "ordered"}}, {MsgType.LOCK_ACQUIRE, MsgType.LOCK_RELEASE}, {MsgType.LOCK_EVENT}),
])
def test_an_admitted_guest_gets_one_table_from_one_place(over: dict[str, Any], extra_requests: set[MsgType],
                                                         extra_notes: set[MsgType]) -> None:
    core, sessions = core_for(run_config(**over))
    s = fake_session(1)
    sessions.join(s)
    core.machine.guest_joined(s)
    done: list[Any] = []
    table = core.handlers.guest(s, lambda session, m: done.append((session, m)))
    assert set(table.requests) == MEMORY_REQUESTS | {MsgType.PING, MsgType.CONTENT_REPORT} | extra_requests
    assert set(table.notifications) == {MsgType.TICK_DONE} | extra_notes
    msg = TickDone(0, 10.0, {}, b"", b"")
    table.notifications[MsgType.TICK_DONE](msg)
    assert done == [(s, msg)]


# --- a new mode is one class and one line ---------------------------------------------------------


class CountingOrder(DisciplineBase):
    """A mode for the test: arrival order, counting what the machine tells it."""

    request_order = "counting"

    def __init__(self, ctx: DisciplineContext) -> None:
        super().__init__(ctx)
        self.heard: list[str] = []
        self.served = 0

    def serve(self, guest_id: int, requests: Any) -> Any:
        def counted(handler: Any) -> Any:
            async def run(m: Any) -> Any:
                self.served += 1
                out = handler(m)
                return await out if hasattr(out, "__await__") else out
            return run
        from balloonlab.hostd.discipline import GuestHandlers
        return GuestHandlers({t: counted(h) for t, h in requests.items()})

    def guest_joined(self, guest_id: int) -> None:
        self.heard.append(f"joined {guest_id}")

    def guest_left(self, guest_id: int) -> None:
        self.heard.append(f"left {guest_id}")

    def tick_started(self, tick: int, vt_us: float, mem: Any) -> None:
        self.heard.append(f"tick {tick}")

    def tick_done(self, guest_id: int, vt_us: float) -> None:
        self.heard.append(f"done {guest_id}")


async def test_a_new_request_discipline_is_one_class_and_one_line_in_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODES, "counting", CountingOrder)
    from balloonlab.hostd import discipline
    monkeypatch.setattr(discipline, "REQUEST_ORDERS", tuple(MODES))
    core, sessions = core_for(run_config(host={"request_order": "counting"}))
    mode = core.discipline
    assert isinstance(mode, CountingOrder)
    s = fake_session(0)
    sessions.join(s)
    core.machine.guest_joined(s)
    table = core.handlers.guest(s, core.machine.tick_done)
    core.machine.tick_started(0, 0)
    reply = await table.requests[MsgType.EPT_FAULT](EptFault(np.array([3], np.uint64), 5.0))
    assert isinstance(reply, EptFaultReply) and mode.served == 1
    table.notifications[MsgType.TICK_DONE](TickDone(0, 9.0, {}, b"", b""))
    await core.machine.end_tick(0, 10_000)
    core.machine.guest_gone(s)
    assert mode.heard == ["joined 0", "tick 0", "done 0", "left 0"]
    assert core.machine.final_metrics()["request_order"] == "counting"


# --- the registry ---------------------------------------------------------------------------------


def test_the_registry_knows_who_is_live_who_left_why_and_who_came_back() -> None:
    reg = SessionRegistry()
    a, b = fake_session(0), fake_session(1)
    assert reg.join(a) == 0 and reg.join(b) == 0
    assert reg.missing({0, 1, 2}) == [2] and not reg.all_accounted({0, 1, 2})
    assert reg.leave(a, "connection lost: reset") and not reg.leave(a, "again")
    assert reg.gone() == {0: "connection lost: reset"} and reg.left_for_good() == [0]
    again = fake_session(0)
    assert reg.join(again) == 1 and reg.rejoined() == {0: 1} and reg.get(0) is again
    assert not reg.leave(a, "the old session") and reg.get(0) is again   # a stale session cannot evict the new one
    assert reg.left_for_good() == [] and reg.all_accounted({0, 1})
    assert reg.leave(b, None) and 1 not in reg.gone()                     # the run ended: not a loss
    assert [gid for gid, _ in reg.items()] == [0] and len(reg) == 1


def test_host_monitors_are_host_memorys_observer_only_through_wire() -> None:
    mem = HostMemory(32, 32, "random", np.random.default_rng(0), CostModel())
    mon = HostMonitors({}, mem, 10_000)
    assert mem._observer is None   # building the monitors connects nothing behind the assembly's back
    mem.wire(observer=mon)
    assert mem._observer is mon

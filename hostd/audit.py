"""The end-of-run audit: is every guest page where host and guest both say it is?

After the last tick the host asks each live guest, window by window,
``Audit{first, count}``: which gpfns hold a page and what each must contain
(the token the guest last wrote), which gpfns the guest believes backed,
which disk blocks are the only up-to-date copy of a page, and which gpfns
are in its balloon (``proto.messages.AuditReply``). The guest checks its
own books first (every page in exactly one authoritative place: guest RAM,
its swap slot or file block, or nowhere for a page never written) and
reports what it finds. The host then checks each claim against its own:

- a gpfn the guest holds and believes backed is a host FRAME (the content
  is in guest RAM, which the guest checked), or SHARED (``hostd.sharing``)
  on a shared frame whose content key is the key of the token the guest
  last wrote there (``proto.content``): no sharer's write went unnoticed;
- a gpfn the guest holds but the host took (not backed) is SWAPPED, and
  its host swap slot holds exactly the guest's token (not a placeholder of
  a shootdown still unanswered);
- a block that is a page's only copy holds the guest's token;
- the guest's balloon and the host's BALLOONED gpfns are the same set, and
  the driver's count, the guest's frames and the host's count agree;
- every guest that left holds nothing (no frame, no swap slot), and host
  memory's invariant holds.

A problem names the guest, the page and both sides' views. The result is
logged (``audit_completed``) and reported in ``run_finished`` as
``audit_ok`` and ``audit``; ``audit.lost_pages`` counts the pages the
host's books show lost (``count_lost_pages``), whatever the guests say of
themselves.

Every wait is bounded: the silent guests' late ticks get one deadline all
together (no one is asked before they are back: see ``run_audit``), so do
the guests' deferred shootdowns, each ``Audit`` call ``timeout_s``, and a
guest's whole answer ``timeout_s`` per window; a guest that does not answer
in time (it stopped reading, say) fails the audit, and the run ends anyway.

This module reads host memory's books directly (``HostMemory.p2m``,
``vdisk``, ``swap``, ``pool``): an auditor has to look at the raw state
rather than at what the code under audit says about it. It changes
nothing. It is handed what it needs: the registry of live sessions, host
memory, the shootdowns (deferred ones settle first) and the guests' specs.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.content import content_keys
from balloonlab.proto.errors import ProtoError
from balloonlab.proto.messages import Audit, AuditReply

from .config import GuestSpec
from .errors import HostdError
from .hostswap import PENDING_TOKEN
from .p2m import PageState

if TYPE_CHECKING:
    from .invariant import InvariantChecker
    from .memory import HostMemory
    from .registry import SessionRegistry
    from .shootdown import Shootdowns

__all__ = ["AUDIT_WINDOW_PAGES", "GuestClaims", "run_audit", "check_guest", "check_released", "count_lost_pages"]

log = structlog.get_logger("hostd.audit")

AUDIT_WINDOW_PAGES = 65_536     # gpfns and blocks per Audit request: a reply stays near 2.5 MiB at most
MAX_PROBLEMS_PER_GUEST = 20
AUDIT_TIMEOUT_S = 10.0


@dataclass
class GuestClaims:
    """One guest's ``AuditReply`` windows, put together."""

    ram_gpfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ram_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ram_backed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    disk_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    disk_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    balloon_gpfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_replies(cls, replies: list[AuditReply]) -> "GuestClaims":
        def cat(name: str, dtype: Any) -> np.ndarray:
            parts = [np.asarray(getattr(r, name)).astype(dtype) for r in replies]
            return np.concatenate(parts) if parts else np.zeros(0, dtype)

        backed = [np.frombuffer(r.ram_backed, np.uint8) for r in replies]
        return cls(cat("ram_gpfns", np.int64), cat("ram_tokens", np.uint64),
                   (np.concatenate(backed) if backed else np.zeros(0, np.uint8)).astype(bool),
                   cat("disk_blocks", np.int64), cat("disk_tokens", np.uint64), cat("balloon_gpfns", np.int64),
                   dict(replies[-1].report) if replies else {})


def _fmt(x: Any) -> str:
    return f"{int(x):#x}"


def check_guest(mem: "HostMemory", gid: int, claims: GuestClaims) -> list[str]:
    """Every disagreement between the guest's claims and host memory; [] if none."""
    problems: list[str] = []

    def add(msg: str) -> None:
        if len(problems) < MAX_PROBLEMS_PER_GUEST:
            problems.append(f"guest {gid}: {msg}")

    p2m = mem.p2m(gid)           # read-only: see the module docstring
    n = p2m.guest_pages
    for what, arr in (("ram gpfn", claims.ram_gpfns), ("balloon gpfn", claims.balloon_gpfns)):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            add(f"claims {what}s outside [0, {n})")
            return problems
    if claims.ram_backed.size != claims.ram_gpfns.size or claims.ram_tokens.size != claims.ram_gpfns.size:
        add("ram claims of different lengths")
        return problems
    vd = mem.vdisk(gid)
    if claims.disk_blocks.size and (claims.disk_blocks.min() < 0 or claims.disk_blocks.max() >= vd.n_blocks):
        add(f"claims disk blocks outside [0, {vd.n_blocks})")
        return problems

    # Pages in guest RAM.
    gp, tok, backed = claims.ram_gpfns, claims.ram_tokens, claims.ram_backed
    state = p2m.state[gp]
    bad = backed & (state != PageState.FRAME) & (state != PageState.SHARED)
    for i in np.flatnonzero(bad)[:5]:
        add(f"gpfn {int(gp[i])} holds a page the guest believes backed, but the host has it "
            f"{PageState(int(state[i])).name}")
    for i in np.flatnonzero(_shared_mismatch(mem, gid, gp, tok, backed & (state == PageState.SHARED)))[:5]:
        add(f"gpfn {int(gp[i])} is SHARED on frame {int(p2m.loc[gp[i]])}, but the guest last wrote "
            f"{_fmt(tok[i])}, other content: a write to a shared page went past its copy-on-write")
    took = ~backed
    # in host swap, or (hostd.compress) compressed or dropped as a zero page
    swapped, held_all = mem.host_copy(gid, gp[took]) if np.any(took) else (np.zeros(0, bool), None)
    swapped_full = np.zeros(gp.size, bool)
    swapped_full[took] = swapped
    swapped = swapped_full
    for i in np.flatnonzero(took & ~swapped)[:5]:
        add(f"gpfn {int(gp[i])}: the host took its page (token {_fmt(tok[i])}) but has it "
            f"{PageState(int(state[i])).name}, not in host swap: the page is lost")
    if np.any(swapped):
        held = held_all[swapped[took]]
        wrong = held != tok[swapped]
        for j in np.flatnonzero(wrong)[:5]:
            i = np.flatnonzero(swapped)[j]
            what = "a placeholder of an unanswered shootdown" if held[j] == PENDING_TOKEN else _fmt(held[j])
            add(f"gpfn {int(gp[i])}: host swap holds {what}, the guest last wrote {_fmt(tok[i])}")

    # Pages whose only copy is on the virtual disk.
    if claims.disk_blocks.size:
        on_disk = vd.tokens[claims.disk_blocks]
        for i in np.flatnonzero(on_disk != claims.disk_tokens)[:5]:
            add(f"disk block {int(claims.disk_blocks[i])} holds {_fmt(on_disk[i])}, the guest last wrote "
                f"{_fmt(claims.disk_tokens[i])}")

    # The balloon: the same gpfns on both sides, and the same count three ways.
    host_balloon = np.flatnonzero(p2m.state == PageState.BALLOONED)
    guest_balloon = np.unique(claims.balloon_gpfns)
    if guest_balloon.size != claims.balloon_gpfns.size:
        add("the guest's balloon lists a gpfn twice")
    only_guest = np.setdiff1d(guest_balloon, host_balloon)
    only_host = np.setdiff1d(host_balloon, guest_balloon)
    if only_guest.size or only_host.size:
        add(f"balloons differ: {only_guest.size} gpfns only in the guest's (e.g. {only_guest[:3].tolist()}), "
            f"{only_host.size} only in the host's (e.g. {only_host[:3].tolist()})")
    driver = claims.report.get("balloon_pages")
    if mem.balloon_pages(gid) != host_balloon.size:
        add(f"host balloon counter {mem.balloon_pages(gid)} != {host_balloon.size} BALLOONED gpfns")
    if driver is not None and driver != guest_balloon.size:
        add(f"the guest's driver says {driver} balloon pages, its frames say {guest_balloon.size}")
    if driver is not None and driver != mem.balloon_pages(gid):
        add(f"balloon size: guest {driver} pages, host {mem.balloon_pages(gid)}")

    # What the guest found in its own books.
    for p in list(claims.report.get("problems") or [])[:5]:
        add(f"guest self-check: {p}")
    lost = claims.report.get("lost_pages", 0)
    if lost:
        add(f"the guest counted {lost} lost pages during the run")
    return problems


def count_lost_pages(mem: "HostMemory", gid: int, claims: GuestClaims) -> int:
    """Pages the host's books show lost or stale: the host's own count, not the guest's.

    A page the host took that is not in host swap, a host swap slot that
    does not hold what the guest last wrote (or still a placeholder), a page
    the guest believes backed that the host does not back, a disk block
    that does not hold its page's last write.
    """
    p2m = mem.p2m(gid)
    gp, tok, backed = claims.ram_gpfns, claims.ram_tokens, claims.ram_backed
    if gp.size != backed.size or gp.size != tok.size or (gp.size and (gp.min() < 0 or gp.max() >= p2m.guest_pages)):
        return int(gp.size)      # claims the host cannot even read: none of them is known to be safe
    state = p2m.state[gp]
    lost = int(np.count_nonzero(backed & (state != PageState.FRAME) & (state != PageState.SHARED)))
    lost += int(np.count_nonzero(_shared_mismatch(mem, gid, gp, tok, backed & (state == PageState.SHARED))))
    took = ~backed
    if np.any(took):
        has_copy, held = mem.host_copy(gid, gp[took])
        lost += int(np.count_nonzero(~has_copy))
        lost += int(np.count_nonzero(held[has_copy] != tok[took][has_copy]))
    blocks = claims.disk_blocks
    vd = mem.vdisk(gid)
    if blocks.size:
        if blocks.min() < 0 or blocks.max() >= vd.n_blocks:
            return lost + int(blocks.size)
        lost += int(np.count_nonzero(vd.tokens[blocks] != claims.disk_tokens))
    return lost


def _shared_mismatch(mem: "HostMemory", gid: int, gp: np.ndarray, tok: np.ndarray, on_shared: np.ndarray) -> np.ndarray:
    """Per claim: SHARED, and the content key of the guest's token is not its shared frame's."""
    out = np.zeros(gp.size, bool)
    sharing = mem.sharing
    if not np.any(on_shared) or sharing is None:
        return out | on_shared if sharing is None else out
    frames = mem.p2m(gid).loc[gp[on_shared]]
    keys = content_keys(mem.content(gid), gid, np.asarray(tok[on_shared], np.uint64))
    out[on_shared] = keys != sharing.key[frames]
    return out


def check_released(mem: "HostMemory", gid: int) -> list[str]:
    """A guest that left must hold nothing: no frame (but ones whose shootdown is still settling), no slot."""
    problems = []
    if gid in mem.guest_ids():
        return problems  # it came back; audited as a live guest
    frames = mem.pool.frames_owned_by(gid)
    frames = frames[~mem.pool.busy[frames]]
    if frames.size:
        problems.append(f"guest {gid} left but {frames.size} host frames are still its own")
    slots = mem.swap.slots_owned_by(gid)
    if slots.size:
        problems.append(f"guest {gid} left but {slots.size} host swap slots are still its own")
    return problems


async def _ask(sessions: "SessionRegistry", spec: GuestSpec, gid: int, timeout_s: float) -> GuestClaims:
    session = sessions[gid]
    disk_blocks = int(spec.config.get("disk_blocks", 0))
    span = max(spec.ram_pages, disk_blocks)
    windows = range(0, span, AUDIT_WINDOW_PAGES)

    async def ask_all() -> list[AuditReply]:
        replies: list[AuditReply] = []
        for first in windows:
            reply = await session.conn.call(Audit(first, AUDIT_WINDOW_PAGES), timeout_s=timeout_s)
            assert isinstance(reply, AuditReply)
            replies.append(reply)
        return replies

    # Each call is bounded, and so is the whole: a guest cannot stretch the end of the run window by window.
    # (In this task, not one ``wait_for`` would start: the first request goes out before the caller's first
    # wait, so that every guest gathers its claims while the host checks its own memory.)
    async with asyncio.timeout(timeout_s * max(1, len(windows))):
        return GuestClaims.from_replies(await ask_all())


async def _silent_at_rest(live: list[int], until_back: Callable[[int], Awaitable[bool] | None] | None,
                          timeout_s: float) -> set[int]:
    """Wait (one deadline for all) until every silent guest of ``live`` finished its late tick; the ones
    that did not."""
    waits = {gid: w for gid in live if until_back is not None and (w := until_back(gid)) is not None}
    if not waits:
        return set()
    got = await asyncio.gather(*(asyncio.wait_for(w, timeout_s) for w in waits.values()), return_exceptions=True)
    return {gid for gid, back in zip(waits, got) if back is not True}


class _CheckFailed:
    """A guest's claims came, but checking them raised: re-raised once every guest has answered."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


async def run_audit(sessions: "SessionRegistry", mem: "HostMemory", shootdowns: "Shootdowns",
                    specs: Mapping[int, GuestSpec], *, unresponsive_s: float,
                    invariant: "InvariantChecker | None" = None,
                    answered: Callable[[int], None] | None = None,
                    until_back: Callable[[int], Awaitable[bool] | None] | None = None) -> dict[str, Any]:
    """Audit every live guest and every guest that left; log ``audit_completed``; never raises.

    ``invariant``: the run's invariant checker, whose end-of-run full check
    is then this one (``InvariantChecker.check_end``), not a second one.
    ``answered(gid)``: called once a guest's claims are in and checked (the
    audit needs nothing more of it; the host ends its run there, and its exit
    overlaps the others' audits).
    ``until_back(gid)``: for a guest that is silent now (stopped mid-tick),
    what to await until it finished that tick (True) or left (False); None
    for a guest at rest.

    Nothing may move while the books are compared. A silent guest that wakes
    goes on with its late tick, faulting back in what the host took while it
    was stopped, and taking frames from the others to do it; asked then, it
    (or another guest) would answer from books that are still changing, and
    pages that are not lost would look lost. So no guest is asked before
    every silent one is back, within the audit's bound. One that is not back
    by then is asked all the same (it may be a peer that reads but plays no
    ticks, or still stopped: then it does not answer); should it wake while
    the others answer, its problems say that it was not at rest.
    """
    timeout_s = min(AUDIT_TIMEOUT_S, max(2.0, unresponsive_s))
    problems: list[str] = []
    per_guest: dict[str, dict[str, Any]] = {}
    lost_pages = 0
    try:
        live = sorted(gid for gid in sessions if gid in mem.guest_ids())
        # Taken now: a guest audited live may close once it has answered (``answered``), and one that left
        # earlier in the run and rejoined must still be audited as the live guest it is, not as released.
        gone_for_good = sessions.left_for_good()
        not_back = await _silent_at_rest(live, until_back, timeout_s)
        # Deferred shootdowns first: their answers turn placeholders into content. One deadline for all.
        settling = [asyncio.ensure_future(shootdowns.settled(gid)) for gid in live if shootdowns.pending(gid)]
        if settling:
            await asyncio.wait(settling, timeout=timeout_s)   # the placeholders left are reported below
            for task in settling:
                task.cancel()
        def check(gid: int, res: GuestClaims) -> tuple[list[str], int, dict[str, Any]]:
            mine = check_guest(mem, gid, res)
            left = shootdowns.leftover_placeholders(gid)
            if left:
                mine.append(f"guest {gid}: {left} host swap slots still wait for a shootdown's answer")
            lost = count_lost_pages(mem, gid, res)
            return mine, lost, {
                "ok": not mine, "answered": True, "lost_pages": lost, "ram_pages": int(res.ram_gpfns.size),
                "host_swapped_pages": int(np.count_nonzero(~res.ram_backed)),
                "disk_pages": int(res.disk_blocks.size), "balloon_pages": int(res.balloon_gpfns.size),
                "host_balloon_pages": mem.balloon_pages(gid)}

        async def audit_one(gid: int) -> Any:
            # Each guest's claims are checked as they come, while the others still gather theirs: the
            # host's checks and the guests' answers share the CPU instead of following one another,
            # and a guest's check runs as close to its answer as it can.
            try:
                res = await _ask(sessions, specs[gid], gid, timeout_s)
            except Exception as exc:     # did not answer (CancelledError, like any BaseException, passes)
                return exc
            try:
                return check(gid, res)
            except Exception as exc:     # the check itself failed: the audit fails, as before
                return _CheckFailed(exc)
            finally:
                if answered is not None:
                    answered(gid)

        asking = [asyncio.ensure_future(audit_one(gid)) for gid in live]
        memory_problem: str | None = None
        memory_failed: Exception | None = None
        try:
            await asyncio.sleep(0)      # every Audit request is out: the guests gather their claims ...
            try:                        # ... while host memory's own invariant is checked (nothing changes it now)
                found = mem.check_invariant() if invariant is None else invariant.check_end()
                if found is not None:
                    raise found
            except HostdError as exc:
                memory_problem = f"host memory invariant: {exc}"
            except Exception as exc:    # the audit's own failure: reported once every guest has answered
                memory_failed = exc
            results = await asyncio.gather(*asking, return_exceptions=True)
        finally:
            for task in asking:         # cancelled meanwhile (a stop signal): no request left behind
                task.cancel()
        for gid, res in zip(live, results):
            if isinstance(res, _CheckFailed):
                raise res.exc
            if isinstance(res, BaseException) and gid not in sessions:
                # It left while the audit ran (killed, say): its loss is the run's to report; the audit's
                # question is the one it asks of every guest that left, that it holds nothing now.
                mine = check_released(mem, gid)
                per_guest[str(gid)] = {"ok": not mine, "released": True, "left_during_audit": True}
            elif isinstance(res, BaseException):
                why = f"{type(res).__name__}: {res}" if isinstance(res, (ProtoError, HostdError, OSError)) else repr(res)
                mine = [f"guest {gid}: did not answer the audit ({why})"]
                per_guest[str(gid)] = {"ok": False, "answered": False}
            else:
                mine, lost, per_guest[str(gid)] = res
                lost_pages += lost
                if mine and gid in not_back:
                    mine.append(f"guest {gid}: silent when the audit began and not back with its late tick "
                                f"within {timeout_s:g} s: its books were not at rest, and what its late tick "
                                f"moved meanwhile may show above")
            problems.extend(mine)
        for gid in gone_for_good:
            mine = check_released(mem, gid)
            per_guest[str(gid)] = {"ok": not mine, "released": True}
            problems.extend(mine)
        if memory_failed is not None:
            raise memory_failed
        if memory_problem is not None:
            problems.append(memory_problem)
    except Exception as exc:  # the audit must not take the run's end down with it
        log.exception("audit_failed")
        problems.append(f"the audit itself failed: {type(exc).__name__}: {exc}")
    ok = not problems
    log.log(20 if ok else 40, ev.AUDIT_COMPLETED, ok=ok, guests=per_guest, problems=problems[:50],
            problem_count=len(problems))
    return {"ok": ok, "guests": per_guest, "problems": problems[:50], "problem_count": len(problems),
            "lost_pages": lost_pages,
            "audited": sum(1 for g in per_guest.values() if g.get("answered")),
            "released": sum(1 for g in per_guest.values() if g.get("released"))}

"""The guest's side of the end-of-run audit, and its fault points.

Audit: after the last tick the host asks ``Audit{first, count}``; the guest
answers where, by its own books, every page is and what it must contain
(``proto.messages.AuditReply``), after checking those books itself: every
workload page has exactly one authoritative place --

- guest RAM: the frame ``pt.gpfn[p]`` holds it (the host may have taken
  that frame's content into host swap; the host checks that part);
- its block on the virtual disk (its file block, or its swap slot once
  swapped out), when it is not in RAM -- a clean soft-reclaimed copy in a
  free frame is a cache of that block, checked against it;
- nowhere, for an anonymous page never written (the zero page);

and the content found there is the token the guest last wrote. Anything
else is named in ``report["problems"]``.

Fault points (``BALLOONLAB_PAUSE_AT``): the guest stops itself (SIGSTOP) at
a named moment so that a test can kill it there from outside (SIGKILL) or
freeze it (and SIGCONT it later). Points: ``balloon_inflate``,
``balloon_deflate``, ``disk_write``, ``disk_read``, ``ept_fault`` -- right
after that request went out, before its reply is seen -- and
``invalidate`` -- on receiving the host's TLB shootdown, before answering
it. See ``PausePoints``.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.faultpoints import PausePoints
from balloonlab.proto.messages import AuditReply, Message, MsgType

from .memory import FrameKind

try:
    from . import _paging
except ImportError:  # pragma: no cover - the compiled core not built: the Python check alone
    _paging = None

if TYPE_CHECKING:
    from .session import GuestSessionState

__all__ = ["audit_reply", "self_check", "REQUEST_POINTS", "pausing_call"]

log = structlog.get_logger("guestd.audit")

REQUEST_POINTS: dict[MsgType, str] = {
    MsgType.BALLOON_INFLATE: "balloon_inflate", MsgType.BALLOON_DEFLATE: "balloon_deflate",
    MsgType.DISK_WRITE: "disk_write", MsgType.DISK_READ: "disk_read", MsgType.EPT_FAULT: "ept_fault",
}
"""Request type -> the fault point reached right after such a request is sent."""

_MAX_PROBLEMS = 20


def _empty() -> np.ndarray:
    return np.zeros(0, "<u8")


def self_check(state: "GuestSessionState") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Check the guest's books; return ``(report, places)``.

    ``places`` holds every page's authoritative place: ``ram_gpfns`` /
    ``ram_tokens`` / ``ram_backed`` (resident pages and clean soft copies),
    ``disk_blocks`` / ``disk_tokens`` (pages only on disk), ``balloon_gpfns``.
    """
    k = state.kernel
    pt, fr = k.pt, k.frames
    problems: list[str] = []

    def add(msg: str) -> None:
        if len(problems) < _MAX_PROBLEMS:
            problems.append(msg)

    expect = pt.expect
    resident = np.flatnonzero(pt.gpfn >= 0)
    g_res = pt.gpfn[resident]
    soft = np.flatnonzero(pt.cached >= 0)
    g_soft = pt.cached[soft]
    # RAM: each resident page in its own frame, the frame pointing back at it.
    if np.unique(g_res).size != g_res.size:
        add("two resident pages share a frame")
    back = fr.vpage[g_res] != resident
    kinds = fr.kind[g_res]
    wrong_kind = (kinds != FrameKind.ANON) & (kinds != FrameKind.FILE)
    for i in np.flatnonzero(back | wrong_kind)[:5]:
        add(f"page {int(resident[i])} is in frame {int(g_res[i])}, which holds page {int(fr.vpage[g_res[i]])} "
            f"as {FrameKind(int(kinds[i])).name}")
    both = np.intersect1d(resident, soft)
    if both.size:
        add(f"{both.size} pages are both resident and soft-reclaimed (e.g. {int(both[0])})")
    bad_soft = (fr.kind[g_soft] != FrameKind.FREE) | (fr.vpage[g_soft] != soft)
    if np.any(bad_soft):
        add(f"{int(np.count_nonzero(bad_soft))} soft-reclaimed pages point at frames that do not hold them")
    # Content in RAM the guest can see (backed frames) must be what it last wrote.
    held_g = np.concatenate((g_res, g_soft))
    held_p = np.concatenate((resident, soft))
    seen = fr.backed[held_g]
    stale = seen & (fr.token[held_g] != expect[held_p])
    for i in np.flatnonzero(stale)[:5]:
        add(f"page {int(held_p[i])} in frame {int(held_g[i])} holds {int(fr.token[held_g[i]]):#x}, "
            f"last written {int(expect[held_p[i]]):#x}")
    # Pages not in RAM: on disk, or the zero page.
    away = pt.gpfn < 0
    on_disk = np.flatnonzero(away & pt.on_disk)
    nowhere = away & ~pt.on_disk & (expect != 0)
    nowhere[soft] = False  # a clean soft copy of a page never written back (see below)
    for p in np.flatnonzero(nowhere)[:5]:
        add(f"page {int(p)} (last written {int(expect[p]):#x}) is neither in RAM nor on disk: lost")
    soft_only = soft[~pt.on_disk[soft]]
    if np.any(expect[soft_only] != 0):
        # Only a never-written anonymous page may live in a soft copy alone (it is the zero page).
        add(f"{int(np.count_nonzero(expect[soft_only] != 0))} written pages live only in a soft-reclaimed frame")
    blocks = pt.block[on_disk]
    if np.any(blocks < 0):
        add(f"{int(np.count_nonzero(blocks < 0))} pages are on disk without a block")
    if np.unique(blocks).size != blocks.size:
        add("two pages on disk share a block")
    # A file block never written holds 0 (the file's initial content): a page at version 0 expects that.
    disk_tokens = np.where(pt.version[on_disk] == 0, np.uint64(0), expect[on_disk]).astype(np.uint64)
    # The balloon: its frames, the driver's count.
    balloon = np.flatnonzero(fr.kind == FrameKind.BALLOON)
    if np.any(fr.vpage[balloon] >= 0) or np.any(fr.backed[balloon]):
        add("a balloon frame holds a page or is backed")
    if balloon.size != state.balloon.actual_pages:
        add(f"balloon driver counts {state.balloon.actual_pages} pages, {balloon.size} frames are BALLOON")
    report = {"balloon_pages": int(state.balloon.actual_pages), "lost_pages": int(k.counters.lost_pages),
              "resident_pages": int(resident.size), "soft_pages": int(soft.size),
              "disk_only_pages": int(on_disk.size), "host_took_pages": int(np.count_nonzero(~seen)),
              "problems": problems}
    places = {"ram_gpfns": held_g, "ram_tokens": expect[held_p], "ram_backed": seen,
              "disk_blocks": blocks, "disk_tokens": disk_tokens, "balloon_gpfns": balloon}
    return report, places


def audit_reply(state: "GuestSessionState | None", first: int, count: int) -> AuditReply:
    """The ``AuditReply`` for gpfns and blocks in ``[first, first + count)``."""
    if state is None:
        # Not started yet (the host audits right after we said hello): we hold no page.
        return AuditReply(_empty(), _empty(), b"", _empty(), _empty(), _empty(),
                          {"balloon_pages": 0, "lost_pages": 0, "problems": [], "not_started": True})
    reply = _compiled_reply(state, first, count)
    if reply is not None:
        return reply
    report, places = self_check(state)
    end = first + count
    g = places["ram_gpfns"]
    ram = (g >= first) & (g < end)
    order = np.argsort(g[ram], kind="stable")
    b = places["disk_blocks"]
    disk = (b >= first) & (b < end)
    bal = places["balloon_gpfns"]
    bal = bal[(bal >= first) & (bal < end)]
    if first == 0:
        log.info(ev.AUDIT_REPORTED, ram_pages=int(g.size), disk_pages=int(b.size),
                 balloon_pages=int(places["balloon_gpfns"].size), problems=report["problems"],
                 lost_pages=report["lost_pages"])
    return AuditReply(g[ram][order].astype("<u8"), places["ram_tokens"][ram][order].astype("<u8"),
                      places["ram_backed"][ram][order].astype(np.uint8).tobytes(),
                      b[disk].astype("<u8"), places["disk_tokens"][disk].astype("<u8"), bal.astype("<u8"), report)


def _compiled_reply(state: "GuestSessionState", first: int, count: int) -> AuditReply | None:
    """``audit_reply`` in one compiled pass (``_paging.audit_places``) for books that hold; None when they
    do not (or without the compiled core): ``self_check`` then names what is wrong. Every guest answers
    at once at the run's end, each with ~30 numpy calls on cold memory (~1.2 ms) in Python."""
    if _paging is None:
        return None
    k = state.kernel
    pt, fr = k.pt, k.frames
    got = _paging.audit_places(pt.gpfn, pt.cached, pt.expect, pt.on_disk, pt.block, pt.version, fr.vpage, fr.kind,
                               fr.backed, fr.token, int(state.balloon.actual_pages), first, first + count)
    if got is None:
        return None
    ram_g, ram_t, ram_backed, disk_b, disk_t, bal, (resident, soft, disk_only, host_took, n_balloon) = got
    report = {"balloon_pages": int(state.balloon.actual_pages), "lost_pages": int(k.counters.lost_pages),
              "resident_pages": resident, "soft_pages": soft, "disk_only_pages": disk_only,
              "host_took_pages": host_took, "problems": []}
    if first == 0:
        log.info(ev.AUDIT_REPORTED, ram_pages=resident + soft, disk_pages=disk_only, balloon_pages=n_balloon,
                 problems=[], lost_pages=report["lost_pages"])
    u8 = "<u8"
    return AuditReply(np.frombuffer(ram_g, u8), np.frombuffer(ram_t, u8), ram_backed, np.frombuffer(disk_b, u8),
                      np.frombuffer(disk_t, u8), np.frombuffer(bal, u8), report)


# --- fault points -----------------------------------------------------------------------


def pausing_call(call: Callable[..., Awaitable[Message]], points: PausePoints) -> Callable[..., Awaitable[Message]]:
    """Wrap ``RpcConnection.call``: after sending a request named in ``REQUEST_POINTS``, pass its fault point."""

    async def wrapped(msg: Message, timeout_s: float | None = None) -> Message:
        point = REQUEST_POINTS.get(msg.TYPE)
        if point is None or point not in points.wanted:
            return await call(msg, timeout_s)
        task = asyncio.ensure_future(call(msg, timeout_s))
        await asyncio.sleep(0)   # the call runs up to its first wait: the request is written
        points.reached(point, pages=int(getattr(msg, "gpfns", getattr(msg, "blocks", _empty())).size))
        return await task

    return wrapped

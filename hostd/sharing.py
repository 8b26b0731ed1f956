"""Content-based page sharing: ESX's transparent page sharing, KVM's KSM.

At each tick boundary (every guest parked; ENGINE.md 3.4) the scanner
looks at the next ``scan_pages_per_s x tick`` guest-backed frames, round
robin over the guests in id order and their gpfns in order (one host-wide
cursor, as ksmd walks its list of mms). For each it needs what the page
holds *now*: the token the host stored when it backed the frame is stale
once the guest writes. Real scanners read guest memory directly; here the
memory is in the guest process, so the host asks the parked guest for the
current tokens of those gpfns (``SharePeek``, nothing invalidated, no
virtual time charged to the guest: a real scanner's read costs the guest
nothing either). Tokens become 64-bit content keys through the guest's
content map (``proto.content``): equal keys are equal bytes, key 0 the zero
page. Then, in guest-id and scan order:

- a page whose frame was written since it was last scanned (the EPT dirty
  bits every ``TickDone`` reports) is skipped, and counts as scanned: KSM
  skips a page whose checksum changed since its last pass (it is volatile),
  ESX's hint entries go stale the same way;
- a key equal to a shared frame's is merged into it (ESX's hash table of
  shared pages, KSM's stable tree);
- a key equal to a page scanned earlier and not written since (the
  candidates: KSM's unstable tree, ESX's hint frames) makes a new shared
  frame: the older page's frame is kept, the newer page's freed;
- anything else becomes a candidate.

A shared frame has one refcount (``refs``) and belongs to no guest
(``pool.owner_guest == SHARED_OWNER``); each sharer's p2m says
``PageState.SHARED`` with ``loc`` = that frame. Its duplicates' frames are
freed at once (the boundary, all grants returned: the global free stack, in
merge order). Every merged gpfn is **write-protected in its guest**
(``ShareProtect``, sent before the books change, so a page is never shared
and writable at once): a guest write to it is an EPT violation, the guest's
``EptFault`` on a SHARED gpfn is the copy-on-write break (``HostMemory``:
a private frame from the guest's own grant, the copy, ``ept_fault_us +
page_copy_us``; no copy when the guest marks the page fresh, it overwrites
it whole). Zero pages are shared like any content, under key 0: ESX's zero
page is the same thing (every zero page backed by one frame).

Determinism: scanning and merging run only at the boundary, in a fixed
order, on state that is a deterministic function of the run; the peek
answers come from parked guests. A COW break only decrements a refcount
(decrements commute); a shared frame whose last sharer left (COW, balloon,
death) is freed at the next boundary, never mid-tick, so no guest's free
list depends on who broke last. That costs what ESX and KSM avoid: the last
sharer still copies (they reuse the page when one mapping is left). A
shared frame left with one sharer goes back to being that guest's private
frame at the boundary (``unshared_frames``); the guest keeps its write
protection until its next write, which then costs a spurious EPT fault and
no copy (KSM likewise takes a write fault on a KSM page with one mapper).

Interactions: host swap never picks a shared frame (it is ``pinned`` in the
pool, so no victim policy sees it; the per-VM victims look at FRAME gpfns
only): swapping it would free one frame for a write into every sharer's own
swap file (``hostd.hostswap``: one slot per gpfn), N writes for one frame.
Balloon inflation of a SHARED gpfn drops that sharer's reference (no frame
freed unless it was the last: ``balloon_shared_pages``). A guest's death
drops its references. The frame invariant counts each shared frame's
sharers against its refcount (``hostd.invariant``); the audit checks that
each SHARED gpfn's content key, from the token the guest last wrote, is the
shared frame's (``hostd.audit``).

Costs (host CPU, reported as ``share_scan_cpu_us``; the lab has no model
of host CPU contention, so they delay no vCPU): ``page_hash_us`` per page
scanned, ``page_compare_us`` per merge (the full comparison both ESX and KSM
make before merging, since a hash match is only a hint). The guest pays
the copy-on-write break in its own virtual time.

Sources: C. A. Waldspurger, "Memory Resource Management in VMware ESX
Server", OSDI 2002, section 4 (content-based sharing: hash, hint, full
compare, COW; the zero page); Linux ``mm/ksm.c`` and
Documentation/admin-guide/mm/ksm.rst (``pages_to_scan`` default 100 per
``sleep_millisecs`` default 20 ms: 5,000 pages/s; ``pages_shared`` = KSM
pages in use, ``pages_sharing`` = the further sites sharing them, "how much
saved"); VMware, "Understanding Memory Resource Management in VMware
vSphere 5.0" (``Mem.ShareScanTime`` 60 min per VM, ``Mem.ShareScanGHz`` 4
MB/s per GHz).
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np
import structlog

from balloonlab.proto import events as ev
from balloonlab.proto.content import ZERO_KEY, content_keys
from balloonlab.proto.tokens import KEEP_TOKEN

from .framepool import NO_OWNER
from .p2m import PageState

if TYPE_CHECKING:
    from .memparts.books import MemoryBooks

__all__ = ["PageSharing", "SharingCounters", "SHARED_OWNER", "SCAN_PAGES_PER_S_DEFAULT", "Peek", "Protect"]

log = structlog.get_logger("hostd.sharing")

SHARED_OWNER = -2
"""``pool.owner_guest`` of a shared frame: it belongs to its sharers together, to no one guest."""

# KSM's defaults: pages_to_scan = 100 every sleep_millisecs = 20 ms (ksm.rst). ESX's default,
# Mem.ShareScanGHz = 4 MB/s per GHz, is ~3,000 pages/s on a 3 GHz core: the same order.
SCAN_PAGES_PER_S_DEFAULT = 5000.0

Peek = Callable[[int, np.ndarray], Awaitable[np.ndarray]]
"""``async (guest_id, gpfns) -> tokens``: what the parked guest's gpfns hold now (``KEEP_TOKEN``: no page)."""

Protect = Callable[[int, np.ndarray], Awaitable[None]]
"""``async (guest_id, gpfns)``: write-protect them in the guest (its writes to them fault to the host)."""

_FRAME = int(PageState.FRAME)
_SHARED = int(PageState.SHARED)


@dataclass(slots=True)
class SharingCounters:
    scan_pages: int = 0            # pages looked at by the scanner (hash charged)
    scan_skipped_dirty: int = 0    # ... written since their last scan: skipped
    scan_no_page: int = 0          # ... holding no page in the guest (a free frame): skipped
    merged_pages: int = 0          # pages merged into a shared frame (their frames freed, but a new frame's own)
    cow_breaks: int = 0            # copy-on-write breaks (a write to a shared page)
    cow_fresh: int = 0             # ... of which the guest overwrote whole: no copy
    balloon_shared_pages: int = 0  # shared pages given to the balloon (one reference dropped)


class PageSharing:
    """The scanner, the shared frames' refcounts and keys, the candidates. See the module docstring."""

    def __init__(self, mem: "MemoryBooks", scan_pages_per_s: float = SCAN_PAGES_PER_S_DEFAULT) -> None:
        if not scan_pages_per_s >= 0:
            raise ValueError(f"scan_pages_per_s must be >= 0, got {scan_pages_per_s}")
        self.mem = mem
        self.scan_pages_per_s = float(scan_pages_per_s)
        n = mem.pool.total_frames
        self.refs = np.zeros(n, np.int64)       # sharers of each shared frame (0: not shared)
        self.key = np.zeros(n, np.uint64)       # content key of each shared frame
        self.shared = np.zeros(n, bool)         # a shared frame (refs may be 0 until the boundary frees it)
        self._released: list[np.ndarray] = []   # shared frames whose last sharer left mid-tick
        self._dirty: dict[int, np.ndarray] = {}  # gid -> gpfns written since their last scan
        self._cursor = (-1, 0)                  # (guest id, next gpfn) of the scan
        self._carry = 0.0                       # fractional pages of scan budget
        # candidates (scanned, unmatched, not written since): key, guest, gpfn
        self._ck = np.zeros(0, np.uint64)
        self._cg = np.zeros(0, np.int64)
        self._cp = np.zeros(0, np.int64)
        self.counters = SharingCounters()
        self.guest_counters: dict[int, SharingCounters] = {}
        self.scan_cpu_us = 0.0
        self.unshared_frames = 0               # shared frames back to private: one sharer left
        self.released_frames = 0               # shared frames freed: no sharer left
        self.protect_failures = 0              # guests whose peek or protect failed (their pages not merged)
        self._failures: dict[int, int] = {}
        self.stale_candidates = 0              # earlier candidates found changed when read again before a merge
        self.peek: Peek | None = None
        self.protect: Protect | None = None
        self.eligible: Callable[[int], bool] = lambda gid: True

    # -- guests ---------------------------------------------------------------------

    def add_guest(self, guest_id: int, guest_pages: int) -> None:
        self._dirty[guest_id] = np.zeros(guest_pages, bool)
        self.guest_counters[guest_id] = SharingCounters()

    def remove_guest(self, guest_id: int, frames: np.ndarray) -> None:
        """The guest is gone: its references drop (frames of last sharers are freed at the boundary)."""
        self.drop(frames)
        self._dirty.pop(guest_id, None)
        self.guest_counters.pop(guest_id, None)
        keep = self._cg != guest_id
        self._ck, self._cg, self._cp = self._ck[keep], self._cg[keep], self._cp[keep]

    def note_dirty(self, guest_id: int, dirty: np.ndarray) -> None:
        """The guest's EPT dirty bits of a tick (bool per gpfn): those pages are volatile until rescanned."""
        d = self._dirty.get(guest_id)
        if d is not None:
            d |= dirty

    # -- references -------------------------------------------------------------------

    def drop(self, frames: np.ndarray) -> None:
        """One reference less on each of ``frames`` (a frame may repeat); the last frees it at the boundary."""
        frames = np.asarray(frames, np.int64)
        if not frames.size:
            return
        np.subtract.at(self.refs, frames, 1)
        if np.any(self.refs[frames] < 0):
            from .errors import InvariantViolation
            raise InvariantViolation(f"shared frame {int(frames[self.refs[frames] < 0][0])} lost more sharers "
                                     "than it had")
        gone = np.unique(frames[self.refs[frames] == 0])
        if gone.size:
            self._released.append(gone)

    def cow(self, guest_id: int, frames: np.ndarray, fresh: int) -> None:
        """Copy-on-write breaks of ``frames`` by the guest (``fresh`` of them overwritten whole: no copy)."""
        self.drop(frames)
        n = int(frames.size)
        for c in (self.counters, self.guest_counters.get(guest_id)):
            if c is not None:
                c.cow_breaks += n
                c.cow_fresh += fresh

    def ballooned(self, guest_id: int, frames: np.ndarray) -> None:
        self.drop(frames)
        for c in (self.counters, self.guest_counters.get(guest_id)):
            if c is not None:
                c.balloon_shared_pages += int(frames.size)

    @property
    def released_pending(self) -> np.ndarray:
        """Shared frames with no sharer left, freed at the next boundary."""
        return np.concatenate(self._released) if self._released else np.zeros(0, np.int64)

    # -- the boundary -------------------------------------------------------------------

    async def boundary(self, tick_us: float) -> None:
        """Free what the last sharers left, give single-sharer frames back, scan ``tick_us``'s worth and merge."""
        self._free_released()
        self._unshare_single()
        budget = self._carry + self.scan_pages_per_s * tick_us / 1e6
        n = int(budget)
        self._carry = budget - n
        if n <= 0 or self.peek is None or self.protect is None:
            return
        cand = self._pick(n)
        if cand is None:
            return
        cg, cp = cand
        # A page scanned now supersedes what an earlier scan of it found, whatever this scan decides.
        self._forget_candidates(cg, cp)
        costs = self.mem.costs
        self.scan_cpu_us += costs.page_hash_us * cg.size
        self._count("scan_pages", cg)
        # Volatile pages (written since their last scan) are skipped; their bit is cleared so the next
        # pass can take them if they stay put.
        vol = np.zeros(cg.size, bool)
        for gid in np.unique(cg).tolist():
            mine = cg == gid
            d = self._dirty[gid]
            vol[mine] = d[cp[mine]]
            d[cp[mine]] = False
        self._count("scan_skipped_dirty", cg[vol])
        cg, cp = cg[~vol], cp[~vol]
        if not cg.size:
            return
        keys, ok = await self._peek_keys(cg, cp)
        self._count("scan_no_page", cg[~ok & self._alive(cg)])
        cg, cp, keys = cg[ok], cp[ok], keys[ok]
        if not cg.size:
            return
        plan = self._plan(cg, cp, keys)
        if plan is None:
            return
        if await self._recheck(plan):
            # Some earlier candidates hold something else now (a guest held across the boundary has not
            # reported its dirty bits yet): without them. Removing pages never makes a new match.
            plan = self._plan(cg, cp, keys)
            if plan is None:
                return
        failed = await self._protect(plan)
        if failed:
            # Their pages stay private; what is left of the plan is a part of what was protected.
            cg, cp, keys = self._without(failed, cg, cp, keys)
            plan = self._plan(cg, cp, keys) if cg.size else None
            if plan is None:
                return
        self._commit(plan)

    def _free_released(self) -> None:
        rel = self.released_pending
        self._released = []
        if not rel.size:
            return
        rel = np.unique(rel)
        rel = rel[self.shared[rel] & (self.refs[rel] == 0)]
        if rel.size:
            self.shared[rel] = False
            self.key[rel] = 0
            self.mem.pool.free(rel)
            self.released_frames += int(rel.size)

    def _unshare_single(self) -> None:
        """Shared frames with one sharer left become that guest's private frames (swappable again)."""
        single = self.shared & (self.refs == 1)
        if not np.any(single):
            return
        pool = self.mem.pool
        for gid in self.mem.guest_ids():
            p2m = self.mem.p2m(gid)
            gp = np.flatnonzero(p2m.state == _SHARED)
            if not gp.size:
                continue
            f = p2m.loc[gp]
            mine = single[f]
            if not np.any(mine):
                continue
            gp, f = gp[mine], f[mine]
            p2m.state[gp] = _FRAME
            pool.owner_guest[f] = gid
            pool.owner_index[f] = gp
            pool.pinned[f] = p2m.pinned[gp]
            self.refs[f] = 0
            self.shared[f] = False
            self.key[f] = 0
            self.unshared_frames += int(f.size)

    def _pick(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The next ``n`` private guest-backed gpfns from the cursor: (guest ids, gpfns), in scan order."""
        mem = self.mem
        gids = [g for g in mem.guest_ids() if self.eligible(g)]
        if not gids:
            return None
        cur_gid, cur_gpfn = self._cursor
        start = next((i for i, g in enumerate(gids) if g >= cur_gid), 0)
        first = gids[start]
        if first != cur_gid:
            cur_gpfn = 0
        # One full turn from the cursor: the rest of its guest, the others, the start of its guest.
        turn = [(first, cur_gpfn, None)] + [(gids[(start + k) % len(gids)], 0, None) for k in range(1, len(gids))]
        if cur_gpfn:
            turn.append((first, 0, cur_gpfn))
        out_g: list[np.ndarray] = []
        out_p: list[np.ndarray] = []
        left = n
        pool = mem.pool
        for gid, lo, hi in turn:
            p2m = mem.p2m(gid)
            hi = p2m.guest_pages if hi is None else min(hi, p2m.guest_pages)
            idx = lo + np.flatnonzero(p2m.state[lo:hi] == _FRAME)
            if idx.size:
                f = p2m.loc[idx]
                idx = idx[~pool.pinned[f] & ~pool.busy[f]]
            take = idx[:left]
            if take.size:
                out_g.append(np.full(take.size, gid, np.int64))
                out_p.append(take)
                left -= int(take.size)
            if left == 0:
                self._cursor = (gid, int(take[-1]) + 1)
                break
        if not out_g:
            return None
        return np.concatenate(out_g), np.concatenate(out_p)

    def _alive(self, cg: np.ndarray) -> np.ndarray:
        live = np.asarray(self.mem.guest_ids(), np.int64)
        return np.isin(cg, live)

    async def _peek_keys(self, cg: np.ndarray, cp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Content keys of the candidates' current content; ``ok`` False where there is none (or no answer)."""
        assert self.peek is not None
        gids = np.unique(cg).tolist()
        results = await asyncio.gather(*(self.peek(gid, cp[cg == gid].astype(np.uint64)) for gid in gids),
                                       return_exceptions=True)
        keys = np.zeros(cg.size, np.uint64)
        ok = np.zeros(cg.size, bool)
        for gid, res in zip(gids, results):      # guest-id order, whatever answered first
            mine = cg == gid
            if not isinstance(res, np.ndarray) or res.size != int(np.count_nonzero(mine)) \
                    or gid not in self.mem.guest_ids():
                self.protect_failures += 1
                self._failed(gid, "peek", res)
                continue
            tok = np.asarray(res, np.uint64)
            has = tok != np.uint64(KEEP_TOKEN)
            # still where the scan found it: a private frame (nothing moves while guests are parked,
            # but a guest may have died meanwhile)
            p2m = self.mem.p2m(gid)
            has &= p2m.state[cp[mine]] == _FRAME
            k = np.zeros(tok.size, np.uint64)
            if np.any(has):
                k[has] = content_keys(self.mem.content(gid), gid, tok[has])
            keys[mine] = k
            ok[mine] = has
        return keys, ok

    def _plan(self, cg: np.ndarray, cp: np.ndarray, keys: np.ndarray) -> "_Plan | None":
        """Which pages merge into which frames; nothing changes yet (see ``_commit``)."""
        # 1. Into existing shared frames (keys are unique among them: a frame's content never changes).
        sf = np.flatnonzero(self.shared & (self.refs > 0))
        into = np.full(cg.size, -1, np.int64)
        if sf.size:
            order = np.argsort(self.key[sf], kind="stable")
            sk, sf = self.key[sf][order], sf[order]
            pos = np.minimum(np.searchsorted(sk, keys), sk.size - 1)
            hit = sk[pos] == keys
            into[hit] = sf[pos[hit]]
        rest = into < 0
        # 2. Among the candidates still valid (private, in a frame, not written since) and the rest.
        ck, ckg, ckp = self._valid_candidates()
        lk = np.concatenate([ck, keys[rest]])
        lg = np.concatenate([ckg, cg[rest]])
        lp = np.concatenate([ckp, cp[rest]])
        lold = np.arange(lk.size) < ck.size               # from an earlier scan: its key may be stale
        ids = (lg << 32) | lp
        if np.unique(ids).size != ids.size:                # a page twice would be merged with itself
            from .errors import InvariantViolation
            raise InvariantViolation("page sharing: a page is a candidate twice in one merge")
        order = np.argsort(lk, kind="stable")            # older candidates first within a key
        lk, lg, lp, lold = lk[order], lg[order], lp[order], lold[order]
        first = np.ones(lk.size, bool)
        first[1:] = lk[1:] != lk[:-1]
        group = np.cumsum(first) - 1
        size = np.bincount(group, minlength=int(group[-1]) + 1 if group.size else 0)
        multi = size[group] > 1
        anchor = first & multi
        member = ~first & multi
        new_frames = self._locs(lg[anchor], lp[anchor])
        # each member's anchor: the last anchor at or before it (the first of its group)
        member_f = new_frames[np.searchsorted(np.flatnonzero(anchor), np.flatnonzero(member), side="right") - 1]
        plan = _Plan(
            stable_g=cg[~rest], stable_p=cp[~rest], stable_f=into[~rest],
            anchor_g=lg[anchor], anchor_p=lp[anchor], anchor_f=new_frames, anchor_k=lk[anchor],
            member_g=lg[member], member_p=lp[member], member_f=member_f,
            old_g=lg[(anchor | member) & lold], old_p=lp[(anchor | member) & lold],
            old_k=lk[(anchor | member) & lold],
            single_k=lk[~multi], single_g=lg[~multi], single_p=lp[~multi])
        if not plan.stable_g.size and not plan.anchor_g.size:
            self._ck, self._cg, self._cp = plan.single_k, plan.single_g, plan.single_p
            return None
        return plan

    def _forget_candidates(self, g: np.ndarray, p: np.ndarray) -> None:
        if not self._ck.size:
            return
        keep = np.ones(self._ck.size, bool)
        for gid in np.unique(g).tolist():
            mine = self._cg == gid
            if np.any(mine):
                keep[mine] &= ~np.isin(self._cp[mine], p[g == gid])
        self._ck, self._cg, self._cp = self._ck[keep], self._cg[keep], self._cp[keep]

    def _locs(self, g: np.ndarray, p: np.ndarray) -> np.ndarray:
        out = np.zeros(g.size, np.int64)
        for gid in np.unique(g).tolist():
            mine = g == gid
            out[mine] = self.mem.p2m(gid).loc[p[mine]]
        return out

    def _valid_candidates(self) -> tuple[np.ndarray, ...]:
        """The candidates from earlier scans that still hold what they held then, as far as the dirty bits
        tell (``_recheck`` reads the ones a merge would use again)."""
        ck, cg, cp = self._ck, self._cg, self._cp
        if not ck.size:
            return ck, cg, cp
        ok = np.zeros(ck.size, bool)
        pool = self.mem.pool
        live = set(self.mem.guest_ids())
        for gid in np.unique(cg).tolist():
            if gid not in live:
                continue
            mine = np.flatnonzero(cg == gid)
            p = cp[mine]
            p2m = self.mem.p2m(gid)
            good = p2m.state[p] == _FRAME
            f = np.where(good, p2m.loc[p], 0)
            good &= ~pool.pinned[f] & ~pool.busy[f] & ~self._dirty[gid][p]
            ok[mine] = good
        return ck[ok], cg[ok], cp[ok]

    async def _recheck(self, plan: "_Plan") -> bool:
        """Read again what earlier candidates the plan merges hold now; drop those that changed (True if any).

        Their dirty bits say whether they were written since their scan, but
        a guest whose request is held across the boundary has not sent them
        for its last tick. ESX and KSM compare the full page before merging
        for the same reason: what was scanned may have changed.
        """
        if not plan.old_g.size:
            return False
        assert self.peek is not None
        # Their dirty bits cover what the guests reported; a guest whose request is held across the
        # boundary has not reported its last tick's yet.
        g, p, want = plan.old_g, plan.old_p, plan.old_k
        gids = np.unique(g).tolist()
        results = await asyncio.gather(*(self.peek(gid, p[g == gid].astype(np.uint64)) for gid in gids),
                                       return_exceptions=True)
        stale = np.ones(g.size, bool)
        for gid, res in zip(gids, results):
            mine = g == gid
            if not isinstance(res, np.ndarray) or res.size != int(np.count_nonzero(mine)) \
                    or gid not in self.mem.guest_ids():
                self._failed(gid, "peek", res)
                continue
            tok = np.asarray(res, np.uint64)
            has = tok != np.uint64(KEEP_TOKEN)
            k = np.zeros(tok.size, np.uint64)
            if np.any(has):
                k[has] = content_keys(self.mem.content(gid), gid, tok[has])
            stale[mine] = ~has | (k != want[mine])
        if not np.any(stale):
            return False
        self.stale_candidates += int(np.count_nonzero(stale))
        self._forget_candidates(g[stale], p[stale])
        return True

    async def _protect(self, plan: "_Plan") -> set[int]:
        """Write-protect every page the plan merges, per guest; the guests that failed."""
        assert self.protect is not None
        g = np.concatenate([plan.stable_g, plan.anchor_g, plan.member_g])
        p = np.concatenate([plan.stable_p, plan.anchor_p, plan.member_p])
        gids = np.unique(g).tolist()
        results = await asyncio.gather(*(self.protect(gid, np.sort(p[g == gid]).astype(np.uint64))
                                         for gid in gids), return_exceptions=True)
        failed = {gid for gid, res in zip(gids, results)
                  if isinstance(res, BaseException) or gid not in self.mem.guest_ids()}
        self.protect_failures += len(failed)
        for gid, res in zip(gids, results):
            if isinstance(res, BaseException):
                self._failed(gid, "protect", res)
        return failed

    def _failed(self, gid: int, step: str, res: Any) -> None:
        """Logged the 1st, 10th, 100th, ... time per guest: an older guest fails every boundary."""
        n = self._failures.get(gid, 0) + 1
        self._failures[gid] = n
        if str(n).rstrip("0") == "1":
            log.warning(ev.SHARE_FAILED, guest=gid, step=step, reason=repr(res)[:200], count=n)

    def _without(self, failed: set[int], *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        keep = ~np.isin(arrays[0], np.asarray(sorted(failed), np.int64))
        # their earlier candidates go too: they may not be protected
        ck_keep = ~np.isin(self._cg, np.asarray(sorted(failed), np.int64))
        self._ck, self._cg, self._cp = self._ck[ck_keep], self._cg[ck_keep], self._cp[ck_keep]
        return tuple(a[keep] for a in arrays)

    def _commit(self, plan: "_Plan") -> None:
        mem, pool = self.mem, self.mem.pool
        costs = mem.costs
        # New shared frames: the anchor's frame, as it is.
        f = plan.anchor_f
        if f.size:
            pool.owner_guest[f] = SHARED_OWNER
            pool.owner_index[f] = NO_OWNER
            pool.pinned[f] = True            # never a host-swap victim (module docstring)
            pool.accessed[f] = False
            pool.dirty[f] = False
            self.shared[f] = True
            self.key[f] = plan.anchor_k
            self.refs[f] += 1
            self._set_shared(plan.anchor_g, plan.anchor_p, f)
        # Members and pages matching a shared frame: into it; their own frames go.
        for g, p, into in ((plan.member_g, plan.member_p, plan.member_f),
                           (plan.stable_g, plan.stable_p, plan.stable_f)):
            if not g.size:
                continue
            old = self._locs(g, p)
            np.add.at(self.refs, into, 1)
            self._set_shared(g, p, into)
            pool.free(old)
            self.scan_cpu_us += costs.page_compare_us * g.size
            self._count("merged_pages", g)
        self._count("merged_pages", plan.anchor_g)
        self._ck, self._cg, self._cp = plan.single_k, plan.single_g, plan.single_p

    def _set_shared(self, g: np.ndarray, p: np.ndarray, frames: np.ndarray) -> None:
        for gid in np.unique(g).tolist():
            mine = g == gid
            p2m = self.mem.p2m(gid)
            p2m.state[p[mine]] = _SHARED
            p2m.loc[p[mine]] = frames[mine]

    def _count(self, name: str, gids: np.ndarray) -> None:
        if not gids.size:
            return
        setattr(self.counters, name, getattr(self.counters, name) + int(gids.size))
        ids, n = np.unique(gids, return_counts=True)
        for gid, k in zip(ids.tolist(), n.tolist()):
            c = self.guest_counters.get(gid)
            if c is not None:
                setattr(c, name, getattr(c, name) + k)

    # -- observation -----------------------------------------------------------------------

    def frames_attributed(self, guest_id: int) -> int:
        """The guest's share of the shared frames it maps: 1/r of each frame of r sharers, rounded."""
        p2m = self.mem.p2m(guest_id)
        f = p2m.loc[p2m.state == _SHARED]
        return int(round(float(np.sum(1.0 / np.maximum(self.refs[f], 1))))) if f.size else 0

    def guest_metrics(self, guest_id: int) -> dict[str, Any]:
        """Its pages on shared frames, the frames that saves (a frame of r sharers saves (r - 1) / r
        for each), its zero pages shared, and its counters."""
        p2m = self.mem.p2m(guest_id)
        f = p2m.loc[p2m.state == _SHARED]
        r = self.refs[f].astype(np.float64)
        saved = float(np.sum((r - 1) / np.maximum(r, 1))) if f.size else 0.0
        c = self.guest_counters.get(guest_id, SharingCounters())
        return {"pages_shared": int(f.size), "pages_sharing": round(saved, 2),
                "zero_pages_shared": int(np.count_nonzero(self.key[f] == ZERO_KEY)),
                **{k: v for k, v in asdict(c).items()}}

    def metrics(self) -> dict[str, Any]:
        """Host-wide, with KSM's names: ``pages_shared`` frames hold shared content, ``pages_sharing``
        frames saved (sharers beyond the first); ``zero_pages_shared`` guest pages on zero frames, of
        which ``zero_frames_saved`` are savings. ``image_pages_declared``: image pages in the live
        guests' content maps; ``image_saving_bound``: the frames sharing could save if every one were
        resident and unwritten (all but one copy of each distinct image page)."""
        live = self.shared & (self.refs > 0)
        refs = self.refs[live]
        zero = live & (self.key == ZERO_KEY)
        declared, distinct = self._image_pages()
        return {"pages_shared": int(np.count_nonzero(live)),
                "pages_sharing": int(refs.sum() - refs.size),
                "zero_pages_shared": int(self.refs[zero].sum()),
                "zero_frames_saved": int(self.refs[zero].sum() - np.count_nonzero(zero)),
                "image_pages_declared": declared, "image_saving_bound": declared - distinct,
                "share_candidates": int(self._ck.size),
                "share_scan_cpu_us": round(self.scan_cpu_us, 3),
                "unshared_frames": self.unshared_frames, "released_shared_frames": self.released_frames,
                "share_failures": self.protect_failures, "stale_candidates": self.stale_candidates,
                **asdict(self.counters)}


    def _image_pages(self) -> tuple[int, int]:
        """Image pages the live guests declare, and how many distinct (image, offset) pages they are."""
        total = 0
        spans: dict[str, list[tuple[int, int]]] = {}
        for gid in self.mem.guest_ids():
            for r in self.mem.content(gid).ranges:
                if r.image:
                    total += r.pages
                    spans.setdefault(r.image, []).append((r.image_offset, r.image_offset + r.pages))
        distinct = 0
        for ranges in spans.values():
            end = -1
            for lo, hi in sorted(ranges):          # the union of the offset ranges
                if hi > end:
                    distinct += hi - max(lo, end)
                    end = hi
        return total, distinct


@dataclass(slots=True)
class _Plan:
    stable_g: np.ndarray
    stable_p: np.ndarray
    stable_f: np.ndarray
    anchor_g: np.ndarray
    anchor_p: np.ndarray
    anchor_f: np.ndarray
    anchor_k: np.ndarray
    member_g: np.ndarray
    member_p: np.ndarray
    member_f: np.ndarray
    old_g: np.ndarray           # candidates from earlier scans the plan merges (read again before merging)
    old_p: np.ndarray
    old_k: np.ndarray
    single_k: np.ndarray
    single_g: np.ndarray
    single_p: np.ndarray

"""Page sharing's bookkeeping in host memory, without sockets: scan, merge, copy-on-write, release.

The guests are stand-ins: a token per gpfn (what the guest's frame holds now)
that the scanner's peek reads, and a record of what it write-protected.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from balloonlab.hostd.errors import HostdError
from balloonlab.hostd.invariant import check_full
from balloonlab.hostd.memory import HostMemory
from balloonlab.hostd.p2m import PageState
from balloonlab.hostd.sharing import SHARED_OWNER
from balloonlab.proto.content import ContentMap, ContentRange
from balloonlab.proto.costs import CostModel
from balloonlab.proto.tokens import KEEP_TOKEN, make_tokens

TICK_US = 10_000.0
PAGES = 64
IMAGE = 32           # vpages 0..31 are image pages, in gpfns 0..31 of each guest below


class Guests:
    """What each guest's frames hold (token per gpfn; KEEP_TOKEN: no page), and what it protected."""

    def __init__(self, n: int) -> None:
        self.tokens = {g: np.full(PAGES, KEEP_TOKEN, np.uint64) for g in range(n)}
        self.protected = {g: np.zeros(PAGES, bool) for g in range(n)}
        self.fail_protect: set[int] = set()
        self.peeks = 0

    async def peek(self, gid: int, gpfns: np.ndarray) -> np.ndarray:
        self.peeks += 1
        return self.tokens[gid][gpfns.astype(np.int64)].copy()

    async def protect(self, gid: int, gpfns: np.ndarray) -> None:
        if gid in self.fail_protect:
            raise HostdError(f"guest {gid} did not answer")
        self.protected[gid][gpfns.astype(np.int64)] = True


def _host(n_guests: int = 3, rate: float = 1e9, frames: int = 512) -> tuple[HostMemory, Guests]:
    mem = HostMemory(frames, n_guests * PAGES, "random", np.random.default_rng(0), CostModel())
    sh = mem.enable_sharing(rate)
    guests = Guests(n_guests)
    sh.peek, sh.protect = guests.peek, guests.protect
    cmap = ContentMap([ContentRange(0, IMAGE, image="os")]).to_wire()
    for gid in range(n_guests):
        mem.add_guest(gid, PAGES)
        mem.set_content(gid, cmap)
    return mem, guests


def _back(mem: HostMemory, guests: Guests, gid: int, gpfns: np.ndarray, tokens: np.ndarray) -> None:
    """The guest faults these gpfns in and holds these tokens in them (gpfn = vpage here)."""
    asyncio.run(mem.ept_fault(gid, gpfns.astype(np.uint64), 0.0))
    guests.tokens[gid][gpfns] = tokens


def _image(gpfns: np.ndarray) -> np.ndarray:
    return make_tokens(gpfns, np.zeros(gpfns.size, np.int64))


def _booted(n_guests: int, image_pages: int, rate: float = 1e9) -> tuple[HostMemory, Guests]:
    """Every guest holds the image's first ``image_pages`` pages, unwritten, in gpfns 0.. (not scanned yet)."""
    mem, guests = _host(n_guests, rate=rate)
    img = np.arange(image_pages)
    for gid in range(n_guests):
        _back(mem, guests, gid, img, _image(img))
    return mem, guests


def _boundary(mem: HostMemory) -> None:
    assert mem.sharing is not None
    asyncio.run(mem.sharing.boundary(TICK_US))
    check_full(mem)


def test_equal_image_pages_merge_and_their_frames_are_freed() -> None:
    mem, guests = _host()
    img = np.arange(IMAGE)
    for gid in range(3):
        _back(mem, guests, gid, img, _image(img))
        _back(mem, guests, gid, np.arange(IMAGE, IMAGE + 8), make_tokens(np.arange(IMAGE, IMAGE + 8), np.ones(8)))
    used = mem.pool.used_frames
    _boundary(mem)
    sh = mem.sharing
    m = sh.metrics()
    # 32 image pages in 3 guests: 32 shared frames, 64 saved; private pages (version 1) stay private
    assert m["pages_shared"] == IMAGE and m["pages_sharing"] == 2 * IMAGE, m
    assert mem.pool.used_frames == used - 2 * IMAGE
    for gid in range(3):
        st = mem.p2m(gid).state
        assert np.all(st[:IMAGE] == PageState.SHARED) and np.all(st[IMAGE:IMAGE + 8] == PageState.FRAME)
        assert np.array_equal(np.flatnonzero(guests.protected[gid]), img)
        assert mem.guest_counts(gid)["shared_pages"] == IMAGE
    f = mem.p2m(0).loc[:IMAGE]
    assert np.array_equal(f, mem.p2m(2).loc[:IMAGE])
    assert np.all(mem.pool.owner_guest[f] == SHARED_OWNER) and np.all(sh.refs[f] == 3)
    assert m["merged_pages"] == 3 * IMAGE and m["scan_pages"] == 3 * (IMAGE + 8)
    g = sh.guest_metrics(1)
    assert g["pages_shared"] == IMAGE and g["pages_sharing"] == pytest.approx(IMAGE * 2 / 3, abs=0.01)
    c = mem.guest_counts(1)     # ESX's consumed: 8 private frames + a third of 32 shared ones
    assert c["resident_pages"] == 8 and c["consumed_pages"] == 8 + round(IMAGE / 3)
    # host swap never takes a shared frame
    assert not np.any(mem.pool.evictable()[f])


def test_zero_pages_share_across_and_within_guests() -> None:
    mem, guests = _host(2)
    z = np.arange(40, 50)
    for gid in range(2):
        _back(mem, guests, gid, z, np.zeros(z.size, np.uint64))
    _boundary(mem)
    m = mem.sharing.metrics()
    assert m["pages_shared"] == 1 and m["pages_sharing"] == 19 and m["zero_pages_shared"] == 20


def test_scan_rate_cursor_and_later_matches() -> None:
    # 10 pages a tick: guest 0's image is scanned before guest 1's; they merge once both were seen
    mem, guests = _booted(2, IMAGE, rate=10 * 1e6 / TICK_US)
    for _ in range(3):
        _boundary(mem)
    assert mem.sharing.metrics()["pages_shared"] == 0
    assert mem.sharing.counters.scan_pages == 30
    for _ in range(4):
        _boundary(mem)
    m = mem.sharing.metrics()
    # the 7th tick: guest 1's last 4, then round again to guest 0's last 4 (still candidates, not shared yet)
    assert m["scan_pages"] == 68 and m["pages_shared"] == IMAGE and m["pages_sharing"] == IMAGE
    assert m["share_scan_cpu_us"] == pytest.approx(68 * 1.0 + IMAGE * 0.4)


def test_pages_written_since_their_last_scan_are_skipped() -> None:
    mem, guests = _booted(2, IMAGE)
    dirty = np.zeros(PAGES, bool)
    dirty[:8] = True
    mem.set_ad_bits(1, b"", np.packbits(dirty).tobytes())
    _boundary(mem)
    sh = mem.sharing
    assert sh.counters.scan_skipped_dirty == 8
    assert np.all(mem.p2m(1).state[:8] == PageState.FRAME) and np.all(mem.p2m(1).state[8:IMAGE] == PageState.SHARED)
    _boundary(mem)       # not written again: the next pass takes them
    assert np.all(mem.p2m(1).state[:IMAGE] == PageState.SHARED)


def test_copy_on_write_costs_a_copy_and_the_last_sharer_frees_the_frame_at_the_boundary() -> None:
    mem, guests = _booted(3, 4)
    _boundary(mem)
    sh = mem.sharing
    f = int(mem.p2m(0).loc[0])
    costs = mem.costs
    tok, done = asyncio.run(mem.ept_fault(0, np.array([0], np.uint64), 100.0))
    assert tok[0] == KEEP_TOKEN and done == pytest.approx(100.0 + costs.ept_fault_us + costs.page_copy_us)
    assert mem.p2m(0).state[0] == PageState.FRAME and mem.p2m(0).loc[0] != f and sh.refs[f] == 2
    # a fresh page (the guest overwrites it whole) needs no copy
    tok, done = asyncio.run(mem.ept_fault(1, np.array([0], np.uint64), 100.0, np.packbits([True]).tobytes()))
    assert tok[0] == KEEP_TOKEN and done == pytest.approx(100.0 + costs.ept_fault_us)
    assert sh.counters.cow_breaks == 2 and sh.counters.cow_fresh == 1 and sh.guest_counters[1].cow_breaks == 1
    check_full(mem)
    # the last sharer: the frame waits for the boundary, then is free
    asyncio.run(mem.ept_fault(2, np.array([0, 1], np.uint64), 100.0))
    assert sh.refs[f] == 0 and sh.shared[f] and f in sh.released_pending
    check_full(mem)
    free = mem.pool.free_frames
    _boundary(mem)
    assert not sh.shared[f] and mem.pool.free_frames >= free + 1 and sh.released_frames == 1
    assert mem.counters.ept_faults == 3 * 4        # copy-on-write breaks are not new backings


def test_one_sharer_left_gets_its_frame_back_private() -> None:
    mem, guests = _booted(2, 4)
    _boundary(mem)
    f = int(mem.p2m(1).loc[2])
    asyncio.run(mem.ept_fault(0, np.array([2], np.uint64), 0.0))
    guests.tokens[0][2] = make_tokens(np.array([2]), np.array([1]))[0]      # its write
    mem.set_ad_bits(0, b"", np.packbits(np.eye(1, PAGES, 2, dtype=bool)[0]).tobytes())
    _boundary(mem)
    p2m = mem.p2m(1)
    assert p2m.state[2] == PageState.FRAME and p2m.loc[2] == f and mem.pool.owner_guest[f] == 1
    assert not mem.pool.pinned[f] and mem.sharing.unshared_frames == 1
    # its write protection stays: the next write is a spurious fault, no copy
    tok, done = asyncio.run(mem.ept_fault(1, np.array([2], np.uint64), 0.0))
    assert tok[0] == KEEP_TOKEN and done == pytest.approx(mem.costs.ept_fault_us)


def test_balloon_and_death_drop_references() -> None:
    mem, guests = _booted(3, 8)
    _boundary(mem)
    sh = mem.sharing
    f = mem.p2m(0).loc[:8].copy()
    assert mem.balloon_inflate(0, np.arange(4, dtype=np.uint64)) == 0      # no frame freed: others share them
    assert np.all(sh.refs[f[:4]] == 2) and sh.counters.balloon_shared_pages == 4
    check_full(mem)
    mem.remove_guest(1)
    assert np.all(sh.refs[f[:4]] == 1) and np.all(sh.refs[f[4:]] == 2)
    check_full(mem)
    mem.remove_guest(2)
    check_full(mem)
    _boundary(mem)              # 4 frames without sharers freed, 4 with guest 0 alone back to it
    assert sh.released_frames == 4 and sh.unshared_frames == 4
    assert np.all(mem.p2m(0).state[4:8] == PageState.FRAME)
    assert mem.pool.used_frames == 4


def test_a_guest_that_fails_to_protect_keeps_its_pages_private() -> None:
    mem, guests = _booted(3, IMAGE)
    guests.fail_protect = {0}
    _boundary(mem)
    assert np.all(mem.p2m(0).state[:IMAGE] == PageState.FRAME)
    assert np.all(mem.p2m(1).state[:IMAGE] == PageState.SHARED)
    assert mem.sharing.metrics()["pages_sharing"] == IMAGE and mem.sharing.protect_failures == 1


def test_same_inputs_same_frames() -> None:
    def run() -> tuple:
        mem, guests = _host(3, rate=25 * 1e6 / TICK_US)
        rng = np.random.default_rng(7)
        for gid in range(3):
            pages = np.sort(rng.choice(PAGES, 40, replace=False))
            ver = (rng.random(40) < 0.3).astype(np.int64)
            _back(mem, guests, gid, pages, make_tokens(pages, ver))
        for _ in range(6):
            _boundary(mem)
        return (tuple(mem.sharing.metrics().items()),
                tuple(np.concatenate([mem.p2m(g).loc for g in range(3)]).tolist()))
    assert run() == run()


def test_an_earlier_candidate_is_read_again_before_it_is_merged() -> None:
    """A guest held across a boundary has not reported the dirty bits of its last tick: its earlier
    candidates may have changed without the host knowing. They are read again before any merge."""
    mem, guests = _booted(2, IMAGE, rate=IMAGE * 1e6 / TICK_US)         # one guest's image per tick
    _boundary(mem)                                             # guest 0's pages: candidates
    assert mem.sharing.metrics()["share_candidates"] == IMAGE
    guests.tokens[0][:4] = make_tokens(np.arange(4), np.ones(4))   # written; no dirty bits reported
    _boundary(mem)                                             # guest 1's pages match guest 0's candidates
    sh = mem.sharing
    assert sh.stale_candidates == 4
    assert np.all(mem.p2m(0).state[:4] == PageState.FRAME) and np.all(mem.p2m(0).state[4:IMAGE] == PageState.SHARED)
    assert sh.metrics()["pages_sharing"] == IMAGE - 4


def test_a_rescanned_page_supersedes_its_earlier_candidate() -> None:
    """Guest 0's page is a candidate, then written (dirty reported) and scanned again in the same pass
    that scans guest 1's equal page: skipped as volatile, and its stale candidate must not merge."""
    mem, guests = _booted(2, 4, rate=8 * 1e6 / TICK_US)
    mem.sharing._cursor = (0, 0)
    asyncio.run(mem.sharing.boundary(TICK_US / 2))          # 4 pages: guest 0's, candidates
    guests.tokens[0][0] = make_tokens(np.array([0]), np.array([1]))[0]
    mem.set_ad_bits(0, b"", np.packbits(np.eye(1, PAGES, 0, dtype=bool)[0]).tobytes())
    _boundary(mem)                                             # guest 1's 4, then guest 0's 4 again
    sh = mem.sharing
    assert mem.p2m(0).state[0] == PageState.FRAME and mem.p2m(1).state[0] == PageState.FRAME
    assert np.all(mem.p2m(0).state[1:4] == PageState.SHARED) and sh.stale_candidates == 0
    assert sh.counters.scan_skipped_dirty == 1

"""The guest's per-tick shortcuts give exactly what the plain code gives.

Every tick of every guest ends with ``GuestSessionState._parked``: the
stats dict (``GuestKernel.stats``, ``PsiMeter.stats``), the EPT A/D bits
(``GuestKernel.take_ad_bytes``) and, per batch, the bounds check of the
references (``GuestKernel._check_pages``). Each is held here to the
straightforward numpy/dict computation it replaces: same keys in the same
order, same values and types, same errors.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from balloonlab.guestd import _paging
from balloonlab.guestd.errors import BadPages
from balloonlab.guestd.kernel import GuestKernel
from balloonlab.guestd.memory import FrameKind
from balloonlab.guestd.psi import PsiMeter
from balloonlab.guestd.stats import BackgroundCounters, PagingCounters
from balloonlab.proto.costs import CostModel

from .test_paging_engines import build, drive, script


def plain_stats(k: GuestKernel) -> dict[str, Any]:
    """``GuestKernel.stats`` as a dict built key by key (its earlier form)."""
    fr = k.frames
    kinds = np.bincount(fr.kind, minlength=len(FrameKind)).tolist()
    counts = k.counters.array.tolist()
    out: dict[str, Any] = dict(zip(PagingCounters.FIELDS, counts))
    k._ra_resolve()
    out.update({name: int(getattr(k.bg, name)) for name in BackgroundCounters.FIELDS})
    out["pgsteal_direct"] = k.counters.evictions - k.counters.soft_reclaimed - k.counters.balloon_reclaimed
    free, file_pages = kinds[FrameKind.FREE], kinds[FrameKind.FILE]
    out.update(free=free, total=k.config.ram_pages, available=free + file_pages, caches=file_pages,
               anon_pages=kinds[FrameKind.ANON], file_pages=file_pages, balloon_pages=kinds[FrameKind.BALLOON],
               kernel_pages=kinds[FrameKind.KERNEL], soft_cached_pages=int(np.count_nonzero(k.pt.cached >= 0)),
               discarded_pages=k.discarded_pages, unbacked_pages=fr.n - int(np.count_nonzero(fr.backed)),
               shared_pages=int(np.count_nonzero(fr.wp)), cow_faults=k.cow_faults,
               share_protected=k.share_protected, swap_used=k.swap.used, swap_total=k.swap.n_slots,
               pff=float(k.pff.pff), pff_last=float(k.pff.last_rate), working_set_pages=int(k.ws.estimate_pages),
               working_set_fraction=float(k.ws.last_fraction), vt_us=float(k.vt_us))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_stats_are_the_plain_dict_key_for_key_in_order(seed: int) -> None:
    k, hv = build("compiled", "clock", 64, [("f", "file", 60), ("a", "anon", 70)], kernel_pages=3,
                  host="null", remote_disk=False, meddle_seed=None, future=None, costs=CostModel())

    async def run() -> None:
        ops = script(seed, 130, 30)
        for i in range(len(ops)):
            await drive(k, hv, ops[i:i + 1])
            if i % 7 == 0:
                await k.reclaim(2)
                k.bg.readahead_pages += 3        # a background counter that moved
            got, want = k.stats(), plain_stats(k)
            assert list(got.items()) == list(want.items())
            assert [type(v) for v in got.values()] == [type(v) for v in want.values()]

    asyncio.run(run())


def test_background_counters_values_follow_fields() -> None:
    bg = BackgroundCounters()
    bg.kswapd_wakeups = 2
    bg.readahead_wasted = np.int64(5)    # a numpy int that slipped in comes out a Python int
    assert bg.values() == [2 if n == "kswapd_wakeups" else 5 if n == "readahead_wasted" else 0
                           for n in BackgroundCounters.FIELDS]
    assert list(bg.as_dict()) == list(BackgroundCounters.FIELDS) and type(bg.as_dict()["readahead_wasted"]) is int


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 2047, 2048])
def test_take_ad_bytes_is_packbits_then_clear(n: int) -> None:
    rng = np.random.default_rng(n)
    a, d = rng.random(n) < 0.5, rng.random(n) < 0.1
    want = (np.packbits(a).tobytes(), np.packbits(d).tobytes())
    assert _paging.take_ad_bits(a, d) == want
    assert not a.any() and not d.any()


def test_kernel_take_ad_bytes_equals_take_ad_bits() -> None:
    k, hv = build("compiled", "clock", 64, [("f", "file", 60), ("a", "anon", 70)], kernel_pages=3,
                  host="null", remote_disk=False, meddle_seed=None, future=None, costs=CostModel())
    asyncio.run(drive(k, hv, script(3, 130, 20)))
    fr = k.frames
    saved = fr.ad_accessed.copy(), fr.ad_dirty.copy()
    assert saved[0].any() and saved[1].any()
    a, d = k.take_ad_bits()
    fr.ad_accessed[:], fr.ad_dirty[:] = saved
    assert k.take_ad_bytes() == (a.tobytes(), d.tobytes())
    assert not fr.ad_accessed.any() and not fr.ad_dirty.any()


def test_take_ad_bits_refuses_arrays_of_two_lengths() -> None:
    with pytest.raises(ValueError, match="one length"):
        _paging.take_ad_bits(np.zeros(8, bool), np.zeros(9, bool))


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.uint32, np.int16])
def test_check_pages_bounds_and_values_for_every_integer_dtype(dtype: Any) -> None:
    k, _ = build("compiled", "clock", 64, [("f", "file", 60), ("a", "anon", 70)], kernel_pages=3,
                 host="null", remote_disk=False, meddle_seed=None, future=None, costs=CostModel())
    pages = np.array([5, 0, 129, 77], dtype)
    got = k._check_pages(pages)
    assert got.dtype == np.int64 and got.tolist() == [5, 0, 129, 77]
    assert k._check_pages(pages[::2]).tolist() == [5, 129]          # not contiguous: numpy's path
    with pytest.raises(BadPages, match="page 130 outside the layout's 130 pages"):
        k._check_pages(np.array([3, 130, 1], dtype))
    if np.dtype(dtype).kind == "i":
        with pytest.raises(BadPages, match="page -2 is negative"):
            k._check_pages(np.array([3, -2, 1], dtype))
    big = np.array([1, 2**63 + 5], np.uint64)
    with pytest.raises(BadPages, match=f"page {2**63 + 5} outside"):
        k._check_pages(big)


def test_psi_stats_follow_every_stall_and_period() -> None:
    m = PsiMeter(period_us=1000.0)

    def plain() -> dict[str, float]:
        t = round(m.total_us, 3)
        a10, a60, a300 = (round(a, 4) for a in m.avgs)
        return {"psi_some_us": t, "psi_full_us": t, "psi_some_avg10": a10, "psi_some_avg60": a60,
                "psi_some_avg300": a300, "psi_full_avg10": a10, "psi_full_avg60": a60, "psi_full_avg300": a300}

    assert m.stats() == plain()
    for start, end in ((10.0, 250.0), (900.0, 1300.0), (1300.0, 1300.0), (2500.0, 2600.5)):
        m.stall(start, end)
        got = m.stats()
        assert list(got.items()) == list(plain().items())
        got["psi_some_us"] = -1.0            # the caller's copy: the next answer is not touched
        assert m.stats() == plain()
    m.advance(9000.0)                        # periods close with no stall: the averages decay
    assert list(m.stats().items()) == list(plain().items()) and m.stats()["psi_some_avg10"] < 100.0


@pytest.mark.parametrize("ws_pages", [1, 2, 255, 256, 257, 5000])
def test_anon_hot_draws_what_start_plus_integers_draws(ws_pages: int) -> None:
    """Its batch is start + integers(0, ws): the same pages, and the generator left where that leaves it."""
    from balloonlab.guestd.workload.generators import AnonHotWorkload
    w = AnonHotWorkload(1000, 6000, np.random.default_rng(7), ws_pages=ws_pages, write_frac=0.3)
    ref = np.random.default_rng(7)
    for n in (1, 64, 500, 1024):
        pages, writes = w.next_batch(n)
        want = (1000 + ref.integers(0, ws_pages, n)).astype(np.uint64)
        want_w = ref.random(n) < 0.3
        assert pages.dtype == np.uint64 and np.array_equal(pages, want) and np.array_equal(writes, want_w)
    assert w.rng.random() == ref.random()


def test_mix_without_freeing_components_takes_no_frees() -> None:
    from balloonlab.guestd.workload.generators import AnonHotWorkload, BurstWorkload, Mix, ZipfWorkload
    rng = np.random.default_rng(1)
    quiet = Mix([ZipfWorkload(0, 50, rng), AnonHotWorkload(50, 50, rng)], [1, 1], rng)
    quiet.next_batch(100)
    assert quiet.take_frees() is None
    burst = BurstWorkload(100, 8, rng, hold_refs=10, idle_refs=5)
    mix = Mix([ZipfWorkload(0, 50, rng), burst], [1, 1], rng)
    freed = None
    for _ in range(20):
        mix.next_batch(16)
        freed = mix.take_frees()
        if freed is not None:
            break
    assert freed is not None and freed.tolist() == list(range(100, 108))


def _drawn_and_numpy(seed: int, shared: bool, specs: list[tuple[str, dict[str, Any]]]) -> tuple[Any, Any]:
    from balloonlab.guestd.workload.generators import AnonHotWorkload, DbWorkload, Mix, ZipfWorkload
    kinds = {"db": DbWorkload, "zipf": ZipfWorkload, "anon-hot": AnonHotWorkload}
    out = []
    for drawn in (True, False):
        rng = np.random.default_rng(seed)
        comps = [kinds[k](i * 5000, 5000, rng, **kw) for i, (k, kw) in enumerate(specs)]
        mix = Mix(comps, [1.0 + i for i in range(len(comps))], rng if shared else np.random.default_rng(seed + 99))
        if not drawn:
            mix.compiled = False
        out.append(mix)
    return out[0], out[1]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("specs", [
    [("db", {}), ("anon-hot", {"ws_pages": 256})],
    [("zipf", {"theta": 0.0, "write_frac": 0.0}), ("anon-hot", {"ws_pages": 1, "write_frac": 1.0}),
     ("db", {"theta": 1.4, "write_frac": 0.5})],
    [("anon-hot", {"ws_pages": 4999, "write_frac": 0.0}), ("zipf", {"theta": 2.5})],
])
def test_mix_draw_gives_numpy_batches_and_leaves_the_generators_alike(shared: bool, specs: Any) -> None:
    """The compiled draw (one pass from the bit generators) against Mix's numpy path, batch after batch."""
    from balloonlab.guestd.workload import generators
    assert generators.draws_as_numpy()
    drawn, slow = _drawn_and_numpy(5, shared, specs)
    assert drawn._draw_specs(list(range(len(specs)))) is not None
    for n in np.random.default_rng(1).integers(1, 1500, 40).tolist() + [1, 2, 8192]:
        pd, wd = drawn.next_batch(n)
        ps, ws = slow.next_batch(n)
        assert pd.dtype == ps.dtype and wd.dtype == ws.dtype
        assert np.array_equal(pd, ps) and np.array_equal(wd, ws), n
    assert drawn.rng.bit_generator.state == slow.rng.bit_generator.state
    assert [c.rng.bit_generator.state for c in drawn.components] == [c.rng.bit_generator.state
                                                                      for c in slow.components]


def test_mix_draw_only_for_the_kinds_it_knows() -> None:
    from balloonlab.guestd.workload.generators import AnonHotWorkload, DbWorkload, Mix, ScanWorkload
    rng = np.random.default_rng(2)
    mix = Mix([DbWorkload(0, 100, rng), ScanWorkload(100, 50, rng)], [1, 1], rng)
    assert mix._draw_specs([0, 1]) is None          # a scan draws nothing: numpy's path
    db = DbWorkload(0, 100, rng)
    db.compiled = False
    assert Mix([db, AnonHotWorkload(100, 50, rng)], [1, 1], rng)._draw_specs([0, 1]) is None
    wide = AnonHotWorkload(0, 2**33, rng)
    assert wide.draw_spec() is None                  # a range past 32 bits: numpy's path


def test_mix_keeps_numpy_draws_when_the_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A numpy that drew otherwise than mix_draw: every batch stays numpy's own."""
    from balloonlab.guestd.workload import generators
    monkeypatch.setattr(generators, "_draws_checked", None)
    calls: list[bool] = []

    def sample(drawn: bool) -> list[bytes]:
        calls.append(drawn)
        return [b"drawn" if drawn else b"numpy"]

    monkeypatch.setattr(generators, "_sample_batches", sample)
    drawn, slow = _drawn_and_numpy(3, False, [("db", {}), ("anon-hot", {})])
    monkeypatch.setattr(generators, "_mix_draw", _refuse)
    for n in (10, 500):
        pd, wd = drawn.next_batch(n)
        ps, ws = slow.next_batch(n)
        assert np.array_equal(pd, ps) and np.array_equal(wd, ws)
    assert calls == [True, False] and generators.draws_as_numpy() is False


def _refuse(*args: Any) -> None:
    raise AssertionError("mix_draw used after its check failed")


def test_mix_draw_refuses_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    cap = rng.bit_generator.capsule
    cdf = np.array([0.5, 1.0])
    pages, writes = np.empty(4, np.uint64), np.empty(4, bool)
    with pytest.raises(ValueError, match="one spec per CDF entry"):
        _paging.mix_draw(cap, cdf, ((1, cap, 0, 4, 0.0),), pages, writes)
    one = np.array([1.0])       # every reference picks the one component: its spec is read
    with pytest.raises(ValueError, match="unknown kind"):
        _paging.mix_draw(cap, one, ((7, cap, 0, 4, 0.0),), pages, writes)
    with pytest.raises(ValueError, match="ws < 2"):
        _paging.mix_draw(cap, one, ((1, cap, 0, 0, 0.0),), pages, writes)
    with pytest.raises(ValueError):
        _paging.mix_draw(object(), cdf, ((1, cap, 0, 4, 0.0), (1, cap, 0, 4, 0.0)), pages, writes)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9, 63, 2048, 2051])
def test_frame_gauges_equal_numpy_counts_at_every_length(n: int) -> None:
    rng = np.random.default_rng(n)
    kind = rng.integers(0, 5, n).astype(np.uint8)
    kind[: n // 3] = 1                                    # runs of one kind, as guests have them
    backed = rng.integers(0, 3, n).astype(np.uint8).view(bool)   # bytes of 2 count as set, as numpy counts them
    wp = rng.random(n) < 0.2
    cached = rng.integers(-1, 40, max(1, n // 2)).astype(np.int64)
    out = np.zeros(8, np.int64)
    _paging.frame_gauges(kind, backed, wp, cached, out)
    want = np.bincount(kind, minlength=5).tolist() + [int(np.count_nonzero(backed)), int(np.count_nonzero(wp)),
                                                      int(np.count_nonzero(cached >= 0))]
    assert out.tolist() == want


@pytest.mark.parametrize("where, bad", [(0, 5), (6, 255), (9, 8)])
def test_frame_gauges_names_the_first_frame_of_an_unknown_kind(where: int, bad: int) -> None:
    kind = np.zeros(12, np.uint8)
    kind[where] = bad
    kind[-1] = 200                      # a later one is not the one named
    z = np.zeros(12, bool)
    with pytest.raises(ValueError, match=f"frame {where} has kind {bad} of 5"):
        _paging.frame_gauges(kind, z, z, np.zeros(2, np.int64), np.zeros(8, np.int64))

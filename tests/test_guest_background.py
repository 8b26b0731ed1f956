"""The guest's work beside its references: readahead, kswapd between watermarks.

Unit tests on the kernel with the in-process disk (whose request count
shows one read per readahead window), and the rules themselves: Linux's
window sizes (mm/readahead.c) and watermarks (mm/page_alloc.c).
"""
from __future__ import annotations

import numpy as np
import pytest

from balloonlab.guestd.errors import GuestConfigError
from balloonlab.guestd.kswapd import watermarks
from balloonlab.guestd.readahead import Readahead, init_ra_size, next_ra_size
from balloonlab.guestd.workload.layout import Layout, Region
from tests.test_paging_kernel import make_kernel

U64 = np.uint64


def test_window_sizes_are_linux_rules() -> None:
    """get_init_ra_size / get_next_ra_size for read_ahead_kb = 128 (32 pages)."""
    assert init_ra_size(1, 32) == 4            # 1 <= 32/32: x4
    assert init_ra_size(2, 32) == 4            # 2 <= 32/4: x2
    assert init_ra_size(16, 32) == 32
    assert [next_ra_size(s, 32) for s in (1, 4, 8, 16, 32)] == [4, 8, 16, 32, 32]
    assert init_ra_size(1, 1) == 1


def test_window_grows_by_marks_up_to_the_maximum() -> None:
    """A stream from the file's start: 4 pages marked on the second, then 8, 16, 32, 32 each marked on its first."""
    layout = Layout([Region("anon", "anon", 10), Region("f", "file", 1000)])
    ra = Readahead(layout, 32)
    assert ra.on_sync_miss(10) == (10, 4, 11)
    windows = [ra.on_marker(0) for _ in range(4)]
    assert windows == [(14, 8, 14), (22, 16, 22), (38, 32, 38), (70, 32, 70)]


def test_sync_misses_without_marks_and_random_reads() -> None:
    layout = Layout([Region("f", "file", 100)])
    ra = Readahead(layout, 32)
    assert ra.on_sync_miss(0) == (0, 4, 1)
    # the stream outran its window (the mark went unnoticed): the next window, merged with the one after
    assert ra.on_sync_miss(4) == (4, 24, 12)
    assert ra.on_sync_miss(50) == (50, 1, -1)   # random: the page alone
    assert ra.on_sync_miss(51) == (51, 4, 52)   # right after the previous miss: a new stream
    assert ra.on_sync_miss(98) == (98, 1, -1)
    assert ra.on_sync_miss(99)[:2] == (99, 1)   # clipped at the end of the file


def _scan(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=U64)


async def test_sequential_scan_reads_windows_in_one_request_each() -> None:
    """512 pages read in order: each fault's read carries the window; every page read ahead is used."""
    off = make_kernel([("f", "file", 512)], ram=1024, policy="clock")
    await off.access(_scan(512))
    on = make_kernel([("f", "file", 512)], ram=1024, policy="clock", read_ahead_pages=32)
    await on.access(_scan(512))
    s, s0 = on.stats(), off.stats()
    assert s0["file_reads"] == 512 and s0["readahead_pages"] == 0
    assert s["lost_pages"] == 0 and s["refs"] == 512
    # every page came in once: by a fault's own read or read ahead (a fault that waited for a page
    # still in flight counts in both)
    assert s["file_reads"] - s["readahead_waited"] + s["readahead_pages"] == 512
    assert s["readahead_hits"] == s["readahead_pages"] and s["readahead_wasted"] == 0
    assert s["file_reads"] < 512 // 8
    # a read-ahead page's first use takes it back (a minor fault), unless its read was still in flight
    assert s["minor_faults"] == s["readahead_hits"] - s["readahead_waited"]
    reads_on = int(on.blockdev.io_counts[0])                 # read requests at the device
    assert reads_on == s["file_reads"] - s["readahead_waited"] + s["readahead_async"]
    assert reads_on < 512 // 8
    assert on.vt_us < off.vt_us / 3                          # fewer waits for the disk


async def test_random_reads_read_nothing_ahead() -> None:
    k = make_kernel([("f", "file", 4000)], ram=200, policy="clock", read_ahead_pages=32)
    pages = np.random.default_rng(3).permutation(4000)[:300].astype(U64)
    await k.access(pages)
    s = k.stats()
    assert s["file_reads"] == 300
    # a page right after the previous miss starts a stream by chance, rarely
    assert s["readahead_pages"] <= 3 * 5
    assert s["lost_pages"] == 0


async def test_pages_read_ahead_and_dropped_unused_are_wasted() -> None:
    """Two pages of a file, then other pages fill memory: of the 3 read ahead, 1 used, 2 dropped unused."""
    k = make_kernel([("f", "file", 100), ("h", "anon", 200)], ram=40, policy="clock", read_ahead_pages=32)
    await k.access(np.array([0, 1], U64))
    s = k.stats()
    assert (s["readahead_pages"], s["readahead_hits"], s["readahead_wasted"]) == (3, 1, 0)
    await k.access(np.arange(100, 160, dtype=U64), np.ones(60, bool))   # anonymous pages take every frame
    s = k.stats()
    assert (s["readahead_pages"], s["readahead_hits"], s["readahead_wasted"]) == (3, 1, 2)
    await k.access(np.array([2, 3], U64))       # read again from the file: the drop cost I/O
    s = k.stats()
    assert s["lost_pages"] == 0
    assert s["readahead_hits"] + s["readahead_wasted"] <= s["readahead_pages"]


async def test_a_used_page_evicted_later_counts_as_a_hit() -> None:
    k = make_kernel([("f", "file", 100), ("h", "anon", 200)], ram=40, policy="clock", read_ahead_pages=32)
    await k.access(np.array([0, 1, 2, 3], U64))
    await k.access(np.arange(100, 160, dtype=U64), np.ones(60, bool))
    s = k.stats()
    assert (s["readahead_pages"], s["readahead_hits"], s["readahead_wasted"]) == (3, 3, 0)


def test_watermarks_follow_linux() -> None:
    """min_free_kbytes = sqrt(16 x KiB); low/high = min + d, min + 2d with d = max(min/4, pages x wsf / 10,000)."""
    wm = watermarks(7936, 10)                  # a 32 MiB guest less 1 MiB of kernel
    assert (wm.min_pages, wm.low_pages, wm.high_pages) == (178, 222, 266)
    wm = watermarks(7936, 1000)                # a scale factor of 10 %: the distance is 793 pages
    assert (wm.low_pages - wm.min_pages, wm.high_pages - wm.low_pages) == (793, 793)
    assert watermarks(256, 10).min_pages == 32   # min_free_kbytes is at least 128 KiB


def test_kswapd_needs_a_policy_it_can_hand_victims_back_to() -> None:
    with pytest.raises(GuestConfigError, match="watermark_scale_factor"):
        make_kernel([("h", "anon", 100)], ram=50, policy="car", watermark_scale_factor=10)


async def _thrash(wsf: int, deadline_step_us: float = 5_000.0) -> dict:
    """An anonymous working set larger than memory, in slices like ticks; background work at each start."""
    k = make_kernel([("h", "anon", 3000), ("f", "file", 2000)], ram=2048, policy="esc",
                    watermark_scale_factor=wsf)
    rng = np.random.default_rng(11)
    pages = np.concatenate([rng.integers(0, 3000, 30000), 3000 + rng.integers(0, 2000, 30000)])
    rng.shuffle(pages)
    writes = rng.random(pages.size) < 0.3
    done, gate = 0, 0.0
    while done < pages.size:
        gate += deadline_step_us
        await k.background()
        done += await k.access(pages[done:].astype(U64), writes[done:], deadline_us=gate)
    s = k.stats()
    s["free_at_end"] = k._free_frames()
    s["wm"] = k.wmark
    return s


async def test_kswapd_reclaims_ahead_of_demand() -> None:
    """Between the low and high marks kswapd keeps frames free: most faults find one, direct reclaim falls."""
    off = await _thrash(0)
    on = await _thrash(10)
    assert off["pgscan_kswapd"] == 0 and off["pgsteal_direct"] > 0
    assert on["pgsteal_kswapd"] > 0 and on["kswapd_wakeups"] > 0
    assert on["pgsteal_direct"] < off["pgsteal_direct"] / 2
    assert on["kswapd_writes"] > 0                   # dirty victims written back in the background ...
    assert on["kswapd_cleaned"] > 0                  # ... and clean once their write completed
    assert on["lost_pages"] == 0 and off["lost_pages"] == 0
    assert on["pgsteal_kswapd"] <= on["pgscan_kswapd"]


async def test_kswapd_run_is_deterministic() -> None:
    a, b = await _thrash(10), await _thrash(10)
    assert a == b


async def test_everything_on_same_seed_same_counts() -> None:
    async def run() -> dict:
        k = make_kernel([("f", "file", 3000), ("h", "anon", 1500)], ram=1500, policy="esc",
                        read_ahead_pages=32, watermark_scale_factor=10)
        rng = np.random.default_rng(5)
        seq = np.arange(0, 3000, dtype=U64)
        for i in range(6):
            anon = (3000 + rng.integers(0, 1500, 1500)).astype(U64)
            p = np.concatenate([seq[i * 500:(i + 1) * 500], anon])
            rng.shuffle(p)
            await k.background()
            await k.access(p, rng.random(p.size) < 0.3, deadline_us=(i + 1) * 20_000.0)
        s = k.stats()
        s["vt"] = k.vt_us
        return s
    a, b = await run(), await run()
    assert a == b
    assert a["readahead_hits"] > 0 and a["pgsteal_kswapd"] > 0 and a["lost_pages"] == 0


def _all_on_scenario() -> str:
    """test_determinism's two guests, every background feature on, and a host that swaps too
    (shootdowns land while readahead and kswapd run)."""
    from tests.test_determinism import SCENARIO

    out = SCENARIO.replace("overcommit = 0.5 ", "overcommit = 1.3 ")
    out = out.replace('policy = "esc"\n', 'policy = "esc"\nread_ahead_kb = 128\nwatermark_scale_factor = 10\n'
                      'dirty_background_ratio = 1     # low, so that a short run writes some back\n')
    out = out.replace('{ kind = "anon-hot", region = "heap", weight = 2 }',
                      '{ kind = "anon-hot", region = "heap", weight = 2, overwrite_frac = 0.5 }')
    assert out.count("read_ahead_kb") == 1 and "overwrite_frac" in out and "overcommit = 1.3" in out
    return out.replace("ticks = 20", "ticks = 30")


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_all_on_under_the_host_is_deterministic_and_loses_nothing(tmp_path) -> None:
    """Readahead, kswapd, the flusher and full-page writes in real guests under a host that swaps:
    twice, the same counts, every tick inside its bound, no page lost."""
    from tests.procs import dump_logs, procs_mentioning, run_launcher
    from tests.test_launch import events_named, read_jsonl

    scenario = tmp_path / "all-on.toml"
    scenario.write_text(_all_on_scenario())

    def run(name: str) -> dict:
        run_dir = tmp_path / name
        res = run_launcher("--scenario", str(scenario), "--run-dir", str(run_dir), "--no-report", timeout_s=90)
        assert res.returncode == 0, f"stderr:\n{res.stderr}\n{dump_logs(run_dir)}"
        assert not procs_mentioning(str(run_dir))
        out = {}
        for gid in (0, 1):
            log = read_jsonl(run_dir / f"guest-{gid}.jsonl")
            out[gid] = events_named(log, "guest_finished")[0]["stats"]
            # time-bounded: every tick's TickDone within one request and one reference's own costs (10 µs,
            # and its minor fault or zero fill: 0.75 or 0.25 µs) of the tick's end
            for e in events_named(log, "tick_completed"):
                assert e["tick_vt_us"] - (e["tick"] + 1) * 10_000 <= 11.0 + e["tick_inflight_us"] + 1e-6, e
        return out

    a, b = run("first"), run("again")
    for gid in (0, 1):
        s = a[gid]
        assert s["lost_pages"] == 0 and b[gid]["lost_pages"] == 0
        assert s["readahead_pages"] > 0 and s["readahead_hits"] > 0, s
        assert s["pgsteal_kswapd"] > 0 and s["flusher_writes"] > 0, s
        assert s["readahead_hits"] + s["readahead_wasted"] <= s["readahead_pages"]
        assert a[gid] == b[gid], {k: (a[gid][k], b[gid].get(k)) for k in a[gid] if a[gid][k] != b[gid].get(k)}
    # whether a guest's whole-page writes land on pages in its swap depends on its stream; in one of two
    assert sum(a[gid]["overwrite_reads_avoided"] for gid in (0, 1)) > 0, a


@pytest.mark.parametrize("engine", ["compiled", "reference"])
async def test_full_page_overwrite_of_a_swapped_page_reads_nothing(engine: str, monkeypatch) -> None:
    """Pages pushed to guest swap, then rewritten whole: no swap-in; the content checks still hold."""
    monkeypatch.setenv("BALLOONLAB_PAGING_ENGINE", engine)

    async def run(code: int) -> dict:
        k = make_kernel([("h", "anon", 100)], ram=20, policy="clock")
        assert k.engine == engine
        await k.access(np.arange(100, dtype=U64), np.ones(100, bool))          # 80 of them go to swap
        assert k.stats()["swap_out"] >= 80
        again = np.arange(50, dtype=U64)
        await k.access(again, np.full(50, code, np.uint8))                     # rewrite pages 0..49
        await k.access(np.arange(100, dtype=U64))                              # read every page back
        return k.stats()

    plain, full = await run(1), await run(2)
    assert plain["overwrite_reads_avoided"] == 0
    assert full["overwrite_reads_avoided"] == 50               # each of 0..49 was in swap
    assert full["swap_in"] == plain["swap_in"] - 50
    assert full["major_faults"] == plain["major_faults"] - 50
    assert full["minor_faults"] == plain["minor_faults"] + 50
    assert full["lost_pages"] == 0 and plain["lost_pages"] == 0
    assert full["refs"] == plain["refs"] == 250


def test_overwrite_frac_marks_writes_without_changing_the_references() -> None:
    from balloonlab.guestd.workload import build_workload

    layout = Layout([Region("h", "anon", 500), Region("f", "file", 100)])
    base = [{"kind": "anon-hot", "region": "h", "write_frac": 0.5}, {"kind": "scan", "region": "f"}]
    with_full = [dict(base[0], overwrite_frac=0.4), base[1]]
    p0, w0 = build_workload(base, layout, np.random.default_rng(3)).next_batch(4000)
    p1, w1 = build_workload(with_full, layout, np.random.default_rng(3)).next_batch(4000)
    assert w0.dtype == bool and w1.dtype == np.uint8
    assert np.array_equal(p0, p1) and np.array_equal(w0, w1 != 0)
    frac = np.count_nonzero(w1 == 2) / np.count_nonzero(w1)
    assert 0.35 < frac < 0.45
    with pytest.raises(GuestConfigError, match="overwrite_frac"):
        build_workload([dict(base[0], overwrite_frac=1.5)], layout, np.random.default_rng(3))

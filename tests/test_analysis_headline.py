"""The headline rows: no quantity true by construction; reclaimed pages by mechanism; double paging."""
from __future__ import annotations

from balloonlab.analysis.compare import HEADLINE, headline_value
from balloonlab.analysis.summary import reclaim_metrics


def test_no_headline_row_is_true_by_definition_and_the_mechanisms_are_there() -> None:
    keys = [m.key for m in HEADLINE]
    # Host swapping writes every page it takes by construction: that ratio is 1.0 vs 0, not a finding.
    assert "clean_cache_writes_per_page" not in keys and "clean_cache_reads_per_page" not in keys
    for key in ("reclaimed_balloon_frames", "reclaimed_guest_for_balloon", "reclaimed_guest_own",
                "reclaimed_host_swap", "reclaimed_host_cache_drop", "double_paging_pages",
                "host_swap_writes_clean_cache"):
        assert key in keys, key


def test_reclaim_by_mechanism_from_the_counters() -> None:
    host = {"swap_out_pages": 500, "swap_out_cache_pages": 100, "swap_in_pages": 50, "balloon_freed_frames": 700,
            "vdisk_trimmed_pages": 30}
    guests = [{"evictions": 400, "balloon_reclaimed": 150, "host_took_clean_file": 80},
              {"evictions": 100, "balloon_reclaimed": 0, "host_took_clean_file": 20}]
    m = reclaim_metrics(host, guests)
    assert m["reclaimed_by_mechanism"] == {"balloon_frames": 700, "guest_for_balloon": 150, "guest_own": 350,
                                           "host_swap": 400, "host_swap_cache": 100, "host_cache_drop": 30,
                                           "host_compress": None, "host_zero": None}
    # with compression and zero pages on: what they took is not swap (and no swap I/O)
    zipped = reclaim_metrics({**host, "compressed_pages": 120, "zero_pages_dropped": 30}, guests)
    assert zipped["reclaimed_by_mechanism"]["host_swap"] == 250
    assert (zipped["reclaimed_by_mechanism"]["host_compress"], zipped["reclaimed_by_mechanism"]["host_zero"]) == (120, 30)
    assert zipped["reclaim_io_pages"] == m["reclaim_io_pages"] - 150
    assert "host_swap_writes_clean_cache" not in m          # not counted by this host: no number made up
    m = reclaim_metrics({**host, "clean_cache_swap_write_pages": 90, "clean_cache_swap_read_pages": 60}, guests)
    assert m["clean_cache_host_io_per_page"] == 1.5           # (90 + 60) / the 100 clean pages the host took
    row = next(r for r in HEADLINE if r.key == "reclaimed_guest_own")
    assert headline_value(row, m) == 350

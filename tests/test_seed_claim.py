"""The seed's core claim ("The Two Choices"), measured over real processes.

``tests-ioamp`` is io-amplification.toml at half the scale (two guests of
16 MiB, a host overcommitted 1.6x, one virtual second): the same guests
reclaimed once by blind host swapping (``host-swap``) and once by
ballooning (``ballooning``). The assertions are orderings with wide
margins, never exact counts:

- host swapping writes every clean page-cache page it takes to host swap
  and reads most of them back: close to 2 I/Os per such page;
- ballooning reclaims clean cache with no write at all and at most one
  read on re-reference, and the host does not swap;
- references per virtual second are higher with ballooning;
- no page is lost in either.
"""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.procs import dump_logs, procs_mentioning, run_launcher

pytestmark = pytest.mark.multiprocess

SCENARIO = "tests-ioamp"


def _headline(name: str, v: dict[str, Any]) -> str:
    keys = ("refs_per_vsec", "reclaimed_pages", "reclaimed_clean_cache_pages", "io_per_reclaimed_page",
            "clean_cache_writes_per_page", "clean_cache_reads_per_page", "lost_pages", "wall_s")
    host = v["host"]
    return (f"{name:>10}: " + "  ".join(f"{k}={v.get(k)}" for k in keys)
            + f"  host.swap_out_pages={host['swap_out_pages']}  host.swap_in_pages={host['swap_in_pages']}")


@pytest.fixture(scope="module")
def claim_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of both variants, shared by the assertions below."""
    run_dir = tmp_path_factory.mktemp("seed-claim") / "run"
    res = run_launcher("--scenario", SCENARIO, "--run-dir", str(run_dir), "--no-report", timeout_s=110)
    assert res.returncode == 0, f"stderr:\n{res.stderr}\n{dump_logs(run_dir)}"
    assert not procs_mentioning(str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    variants = summary["variants"]
    assert sorted(variants) == ["ballooning", "host-swap"]
    print("\nseed claim, scenario", SCENARIO, "seed", summary["seed"])
    for name in ("host-swap", "ballooning"):
        print(_headline(name, variants[name]))
    return variants


@pytest.mark.timeout(120)
def test_host_swap_costs_two_ios_per_clean_cache_page(claim_run: dict[str, Any]) -> None:
    v = claim_run["host-swap"]
    msg = _headline("host-swap", v)
    assert v["reason"] == "completed" and v["lost_pages"] == 0, msg
    assert v["host"]["swap_out_pages"] > 1000, msg                 # the host really had to reclaim
    assert v["reclaimed_by_host_pages"] == v["reclaimed_pages"], msg  # and only it did
    assert v["reclaimed_clean_cache_pages"] > 1000, msg
    # every clean page the host took was written to host swap ...
    assert v["clean_cache_writes_per_page"] == pytest.approx(1.0, abs=0.05), msg
    # ... and many were read back from it when the guest re-read them
    assert v["clean_cache_reads_per_page"] > 0.4, msg
    assert v["clean_rereads_via_host_swap"] > 0, msg
    assert v["io_per_reclaimed_page"] > 1.4, msg


@pytest.mark.timeout(120)
def test_ballooning_drops_clean_cache_for_free(claim_run: dict[str, Any]) -> None:
    v, hs = claim_run["ballooning"], claim_run["host-swap"]
    msg = _headline("ballooning", v)
    assert v["reason"] == "completed" and v["lost_pages"] == 0, msg
    target = int(0.4 * 16 * 256)
    assert all(g["balloon_pages"] == target for g in v["guests"]), [g["balloon_pages"] for g in v["guests"]]
    assert v["reclaimed_by_guests_pages"] > 1000, msg
    assert v["reclaimed_clean_cache_pages"] > 1000, msg
    assert v["clean_cache_writes_per_page"] == 0, msg      # dropped, never written
    assert v["clean_cache_reads_per_page"] <= 1.0, msg     # at most one read on re-reference
    assert v["clean_rereads_via_host_swap"] == 0, msg
    assert v["host"]["swap_out_pages"] <= 0.01 * hs["host"]["swap_out_pages"], msg
    assert v["io_per_reclaimed_page"] < 0.6 * hs["io_per_reclaimed_page"], msg


@pytest.mark.timeout(120)
def test_ballooning_has_higher_throughput(claim_run: dict[str, Any]) -> None:
    b, hs = claim_run["ballooning"], claim_run["host-swap"]
    ratio = b["refs_per_vsec"] / hs["refs_per_vsec"]
    print(f"throughput ballooning / host-swap = {ratio:.3f}")
    assert ratio > 1.1, f"{_headline('ballooning', b)}\n{_headline('host-swap', hs)}"
    # per guest too, not only in total
    for gb, gh in zip(b["guests"], hs["guests"]):
        assert gb["refs_per_vsec"] > gh["refs_per_vsec"], (gb["id"], gb["refs_per_vsec"], gh["refs_per_vsec"])
    assert b["lost_pages"] == 0 and hs["lost_pages"] == 0


def _resolved(name: str, guests: int | None = None) -> dict[str, dict[str, Any]]:
    from balloonlab.scenario import Overrides, find_scenario, load_scenario
    from balloonlab.validators import VALIDATORS
    sc = load_scenario(find_scenario(name), Overrides(guests=guests), VALIDATORS)
    return {v: sc.run_config(v, "test") for v in sc.variants}


def _host_ram_pages(cfg: dict[str, Any]) -> int:
    from balloonlab.hostd.memconfig import host_memory_config
    return host_memory_config(cfg["host"]).host_ram_pages(sum(g["ram_pages"] for g in cfg["guests"]))


@pytest.mark.parametrize("guests", [None, 2, 8])
def test_io_amplification_stays_overcommitted_at_any_guest_count(guests: int | None) -> None:
    """`--guests N` changes the number of guests, not the story: the host stays 1.6x overcommitted."""
    for cfg in _resolved("io-amplification", guests).values():
        guest_ram = sum(g["ram_pages"] for g in cfg["guests"])
        assert guest_ram / _host_ram_pages(cfg) == pytest.approx(1.6, rel=0.01)
    if guests is None:  # the default run: 4 x 32 MiB on 80 MiB
        assert _host_ram_pages(cfg) == 80 * 256


def test_tests_scenario_tells_the_same_story() -> None:
    """tests-ioamp is io-amplification scaled down: same variants, policies, workloads and proportions."""
    full, small = _resolved("io-amplification"), _resolved(SCENARIO)
    assert full.keys() == small.keys()
    for name in full:
        f, s = full[name], small[name]
        assert f["balloon"] == s["balloon"], name
        assert f["host"]["victim"] == s["host"]["victim"] and f["host"]["cluster_kib"] == s["host"]["cluster_kib"]
        assert f["costs"] == s["costs"] and f["disk"] == s["disk"]
        gf, gs = f["guests"][0], s["guests"][0]
        assert gf["policy"] == gs["policy"]
        assert [(w["kind"], w["region"], w["weight"]) for w in gf["workload"]] == \
               [(w["kind"], w["region"], w["weight"]) for w in gs["workload"]]
        # every region is the same share of guest RAM
        assert [(r["name"], r["kind"], r["mib"] / gf["ram_mib"]) for r in gf["regions"]] == \
               [(r["name"], r["kind"], r["mib"] / gs["ram_mib"]) for r in gs["regions"]]
        ratio = lambda c: sum(g["ram_pages"] for g in c["guests"]) / _host_ram_pages(c)  # noqa: E731
        assert ratio(f) == pytest.approx(ratio(s), rel=0.01)


@pytest.mark.timeout(120)
def test_reclaimed_pages_are_attributed_to_the_mechanism_that_reclaimed_them(claim_run: dict[str, Any]) -> None:
    hs, b = claim_run["host-swap"], claim_run["ballooning"]
    m_hs, m_b = hs["reclaimed_by_mechanism"], b["reclaimed_by_mechanism"]
    msg = f"host-swap {m_hs}\nballooning {m_b}"
    # Host swapping: no balloon, the host's swap-outs are all there is of it, split guest pages / cache pages.
    assert m_hs["balloon_frames"] == 0 and m_hs["guest_for_balloon"] == 0, msg
    assert m_hs["host_swap"] + m_hs["host_swap_cache"] == hs["host"]["swap_out_pages"] > 1000, msg
    assert m_hs["guest_own"] == hs["reclaimed_by_guests_pages"], msg
    # Ballooning: host frames freed by inflation, counted by the host, at most one per ballooned page; the
    # guests' evictions split into those that filled the balloon and their own paging in a smaller memory.
    ballooned = sum(g["balloon_pages"] for g in b["guests"])
    assert 0 < m_b["balloon_frames"] <= ballooned, msg
    assert m_b["guest_for_balloon"] + m_b["guest_own"] == b["reclaimed_by_guests_pages"], msg
    assert m_b["host_swap"] <= 0.01 * m_hs["host_swap"], msg

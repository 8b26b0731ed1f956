"""``balloonlab-validate``: published results checked through their mechanism, on real runs.

Figure 6 (the host's sampled working-set estimate follows a toucher, fast
up and slow down) and Figure 7 (the idle memory tax moves an idle VM's
memory to an active one, by ballooning the idle one) of Waldspurger's OSDI
2002 paper are run for real; the seed's clean-cache claim is judged on
summaries with and without the host's labelled I/O counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balloonlab.validate import FAIL, NEEDS_LABELS, PASS, VALIDATIONS, judge_seed_claim, main, validate

pytestmark = pytest.mark.multiprocess


def _by_name(name: str) -> Any:
    return next(v for v in VALIDATIONS if v.name == name)


@pytest.mark.timeout(120)
def test_fig6_the_sampled_estimate_tracks_the_toucher_fast_up_slow_down(tmp_path: Path) -> None:
    checks, run_dir = validate(_by_name("fig6"), tmp_path)
    table = "\n".join(" | ".join(c.row()) for c in checks)
    assert [c.status for c in checks] == [PASS] * len(checks), table
    names = " ".join(c.check for c in checks)
    assert "fast up" in names and "slow down" in names and "settles" in names
    assert (run_dir.parent / "fig6-toucher-seed6.npz").exists()


@pytest.mark.timeout(150)
def test_fig7_the_idle_tax_moves_the_idle_vm_s_memory_by_its_balloon(tmp_path: Path) -> None:
    checks, _ = validate(_by_name("fig7"), tmp_path)
    table = "\n".join(" | ".join(c.row()) for c in checks)
    by = {c.check.split(":")[0] if c.check.startswith("tax-") else c.check: c for c in checks}
    assert len(by) == len(checks)
    # Known gap, in the README's validation table: with the deterministic engine, the memory states and
    # the calibrated cost model together, the active VM gains too little (every check passed before them).
    # Exactly these fail: one more failing, or one of them fixed, fails this test until the README says so.
    failing = sorted(c.check for c in checks if c.status != PASS)
    assert failing == sorted(FIG7_KNOWN_GAPS), table
    assert by["every variant completes, no page lost"].status == PASS, table


FIG7_KNOWN_GAPS = (
    "active VM's allocation (pages), 0 % -> 75 %",
    "active VM's throughput, 75 % / 0 %",
)


def _summary(hs: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"variants": {"host-swap": hs, "ballooning": b}}


def test_the_seed_claim_needs_the_host_s_labelled_io_and_is_judged_by_it() -> None:
    bare = _summary({"host_took_clean_cache_pages": 1000}, {"host_took_clean_cache_pages": 0})
    assert [c.status for c in judge_seed_claim(Path("."), bare)] == [NEEDS_LABELS, NEEDS_LABELS]
    two = _summary({"host_took_clean_cache_pages": 1000, "host_swap_writes_clean_cache": 1000,
                    "host_swap_reads_clean_cache": 850},
                   {"host": {"host_swap_writes_clean_cache": 0, "host_swap_reads_clean_cache": 0}})
    checks = judge_seed_claim(Path("."), two)
    assert [c.status for c in checks] == [PASS, PASS] and checks[0].measured == 1.85
    one = _summary({"host_took_clean_cache_pages": 1000, "host_swap_writes_clean_cache": 1000,
                    "host_swap_reads_clean_cache": 0},
                   {"host_swap_writes_clean_cache": 12, "host_swap_reads_clean_cache": 0})
    assert [c.status for c in judge_seed_claim(Path("."), one)] == [FAIL, FAIL]


def test_the_command_lists_refuses_unknown_names_and_has_the_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    from balloonlab.scenario import find_scenario

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for v in VALIDATIONS:
        assert v.name in out and find_scenario(v.scenario).name == f"{v.scenario}.toml"
    assert main(["fig99"]) == 2
    assert "unknown validation" in capsys.readouterr().err

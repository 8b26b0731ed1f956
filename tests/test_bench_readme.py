"""``bench.py readme``: every scenario it re-measures is shipped, and it reads the summary keys the README quotes."""
from __future__ import annotations

from balloonlab.scenario import find_scenario
from scripts.bench_readme import SCENARIOS, VALIDATIONS, metrics_of


def test_every_scenario_and_validation_it_measures_exists() -> None:
    from balloonlab.validate import VALIDATIONS as VALS

    for m in SCENARIOS:
        assert find_scenario(m.scenario).stem == m.scenario
        assert m.command.startswith(f".venv/bin/balloonlab-launch --scenario {m.scenario}")
    assert set(VALIDATIONS) == {v.name for v in VALS}


def test_it_reads_the_quoted_numbers_under_their_summary_names() -> None:
    storm = next(m for m in SCENARIOS if m.scenario == "swap-storm")
    v = {"status": "completed", "lost_pages": 0, "swap_storms": 1,
         "guests": [{"refs_per_vsec": 1000.0, "evictions": 3}, {"refs_per_vsec": 500.0, "evictions": 4}],
         "host": {"swap_out_pages": 7955, "swap_in_pages": 6926, "swap_writes_avoided": 378,
                  "io_buffer_pages_peak": 0, "peaks": {"iobuf_pages": 10, "cache_pages": 4080}},
         "throughput": {"first_inflation_tick": 30, "before_inflation_refs_per_vsec": 993118.0,
                        "after_inflation_refs_per_vsec": 943948.1}}
    rows = {metric: value for _, metric, value in metrics_of(storm, {"variants": {"aggressive": v}})}
    assert rows["refs/vs (all guests)"] == 1500 and rows["guest evictions"] == 7
    assert rows["host swap-outs"] == 7955 and rows["swap_storms"] == 1
    assert rows["host I/O memory peak (I/O buffers + cache, pages)"] == 4090
    assert rows["refs/vs before first inflation"] == 993118 and rows["refs/vs after first inflation"] == 943948
    banker = next(m for m in SCENARIOS if m.scenario == "central-banker")
    conv = {"convergence": {"steps": [{"step_tick": 30, "demand_rise_pages": 1440, "settled": True,
                                       "convergence_ticks": 14, "overshoot_pages": 0, "pff_above_ticks": 12}]}}
    rows = {metric: value for _, metric, value in metrics_of(banker, {"variants": {"working-set": conv}})}
    assert rows["step 1: tick / demand rise / settled after / overshoot / PFF-above ticks"] == "30 / +1440 / 14 / 0 / 12"

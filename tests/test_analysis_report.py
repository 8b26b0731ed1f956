"""The report, its plots and ``compare``, from one real short run.

One launcher run (module fixture) of a tiny two-variant scenario: two 4 MiB
guests on an overcommitted host, reclaimed by host swapping in one variant
and by static balloons in the other, 20 ticks each. The launcher itself
writes the report; the tests read it, the PNGs, ``analyze.py`` and
``analyze.py compare`` as a person would, and break a copy of the logs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from balloonlab.proto import events as ev
from balloonlab import analyze
from tests.procs import dump_logs, procs_mentioning, run_launcher

pytestmark = pytest.mark.multiprocess

SCENARIO = """
[scenario]
name = "tests-analysis"
description = "tests only: two tiny guests, host swapping vs static balloons"
seed = 3
guests = 2
ticks = 20
metrics_every_ticks = 2

[host]
overcommit = 1.5
victim = "random"
cluster_kib = 4
cache_max_mib = 0.25

[guest]
ram_mib = 4
kernel_mib = 0.25
policy = "esc"
batch_refs = 1024
regions = [
  { name = "db", kind = "file", mib = 2.5 },
  { name = "heap", kind = "anon", mib = 0.5 },
]
workload = [
  { kind = "db", region = "db", weight = 3 },
  { kind = "anon-hot", region = "heap", weight = 1 },
]

[costs]
mem_ref_us = 10.0

[variants.host-swap]
balloon = { policy = "none" }

[variants.ballooning]
balloon = { policy = "static", params = { fraction = 0.3 } }
"""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("analysis")
    scenario = base / "tests-analysis.toml"
    scenario.write_text(SCENARIO)
    run_dir = base / "run"
    res = run_launcher("--scenario", str(scenario), "--run-dir", str(run_dir), timeout_s=150)
    assert res.returncode == 0, f"{res.stderr}\n{dump_logs(run_dir)}"
    assert procs_mentioning(str(run_dir)) == []
    return run_dir, res


def test_the_launcher_says_where_the_report_and_plots_are(run) -> None:
    run_dir, res = run
    assert f"report: {run_dir / 'report.md'}" in res.stderr
    n_png = len(list(run_dir.glob("*.png")))
    assert n_png >= 10
    assert f"plots: {n_png} PNG file(s) in {run_dir}" in res.stderr


def test_the_report_shows_scenario_variants_tables_and_events(run) -> None:
    run_dir, _ = run
    text = (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "# Run report: tests-analysis" in text and "seed **3**" in text
    assert "variant **host-swap**" in text and "variant **ballooning**" in text
    # the variants side by side, in the scenario's order, with ratios against the first
    assert "| metric | host-swap | ballooning |" in text
    io_row = next(line for line in text.splitlines() if line.startswith("| disk I/O per reclaimed page"))
    assert "x)" in io_row
    assert "## Variant `host-swap`" in text and "## Variant `ballooning`" in text
    assert text.count("| guest | refs/vs |") == 2
    # the balloon targets the host set are notable events, each with its evidence
    balloon = summary["variants"]["ballooning"]
    target = balloon["guests"][0]["balloon_target_pages"]
    assert target > 0
    assert f"`{ev.BALLOON_TARGET_SET}`" in text and f"target_pages={target}" in text
    assert summary["variants"]["ballooning"]["event_counts"][ev.BALLOON_TARGET_SET] == 2
    # every linked plot exists
    links = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) >= 10 and all((run_dir / p).is_file() for p in links)
    assert {p.name for p in run_dir.glob("*.png")} == set(links)


def _saturated_pixels(path: Path) -> tuple[int, int]:
    """(distinct pixel values, pixels in colour): axes, grid and text are grey; data is drawn in colour."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    rgb = np.round(img * 255).astype(np.uint32)
    distinct = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]).size
    colour = int(((img.max(axis=2) - img.min(axis=2)) > 0.25).sum())
    return distinct, colour


def test_every_plot_is_a_png_with_data_in_it(run) -> None:
    run_dir, _ = run
    pngs = sorted(run_dir.glob("*.png"))
    names = {p.name for p in pngs}
    for stem in ("guest-balloon", "guest-memory", "guest-pff", "guest-working-set", "host-memory", "host-swap"):
        assert f"ballooning-{stem}.png" in names
    assert {"io-per-reclaimed-page.png", "throughput.png"} <= names
    assert "host-swap-guest-balloon.png" not in names   # no balloon in that variant: no flat-zero plot
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE, p
        distinct, colour = _saturated_pixels(p)
        assert distinct > 1, f"{p.name} is blank"
        assert colour > 300, f"{p.name} has no data drawn ({colour} coloured pixels)"


def test_analyze_writes_summary_report_and_plots_and_prints_json(run, tmp_path: Path, capsys) -> None:
    run_dir, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.png", "report.md", "summary.json", "*.sock"))
    assert analyze.main([str(copy), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads((copy / "summary.json").read_text())
    assert f"report: {copy / 'report.md'}" in err
    assert (copy / "report.md").read_text().count("## Variant `") == 2
    assert len(list(copy.glob("*.png"))) == len(list(run_dir.glob("*.png")))


def test_compare_of_a_run_against_itself_gives_ratios_of_one(run, tmp_path: Path, capsys) -> None:
    run_dir, _ = run
    out_md = tmp_path / "cmp.md"
    assert analyze.main(["compare", str(run_dir), str(run_dir), "--out", str(out_md)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_md.with_suffix(".json").read_text())
    assert data["columns"] == ["run/host-swap", "run/ballooning", "run#2/host-swap", "run#2/ballooning"]
    assert data["baselines"] == [None, None, 0, 1]
    checked = 0
    for row in data["rows"]:
        if row["metric"] == "reason":   # a word, not a number: no ratio
            assert row["values"] == ["completed"] * 4 and row["ratios"] == [None] * 4
            continue
        for value, r, base in zip(row["values"], row["ratios"], data["baselines"]):
            if base is not None and value is not None:
                assert r == 1.0, row
                checked += 1
    assert checked >= 2 * 15
    assert out_md.read_text() == printed.rstrip("\n") + "\n"
    assert "(1.00x)" in printed


def test_compare_of_the_variants_of_one_run(run, tmp_path: Path, capsys) -> None:
    run_dir, _ = run
    out_md = tmp_path / "one.md"
    assert analyze.main(["compare", str(run_dir), "--out", str(out_md)]) == 0
    data = json.loads(out_md.with_suffix(".json").read_text())
    assert data["columns"] == ["host-swap", "ballooning"] and data["baselines"] == [None, 0]
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]
    row = next(r for r in data["rows"] if r["metric"] == "refs_per_vsec")
    assert row["ratios"][1] == pytest.approx(summary["ballooning"]["refs_per_vsec"]
                                             / summary["host-swap"]["refs_per_vsec"], rel=1e-5)


def test_a_truncated_log_still_analyses_with_a_warning_naming_the_count(run, tmp_path: Path, capsys) -> None:
    run_dir, _ = run
    copy = tmp_path / "broken"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.png", "report.md", "summary.json", "*.sock"))
    log = copy / "ballooning" / "guest-0.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2] + "\n" + "garbage\n")
    assert analyze.main([str(copy), "--no-plots"]) == 0   # plots: another test's business; this one is about reading
    err = capsys.readouterr().err
    assert "skipped 2 malformed log line(s)" in err and "guest-0.jsonl: 2" in err
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["bad_log_lines"] == 2
    # the guest's last line (guest_finished) is gone: its last logged tick stands in
    g0 = summary["variants"]["ballooning"]["guests"][0]
    assert g0["finished"] is False and g0["refs"] > 0
    report = (copy / "report.md").read_text()
    assert "2 malformed or truncated log line(s) skipped" in report
    assert "## Variant `ballooning`" in report and "| 0 | " in report

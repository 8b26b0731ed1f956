"""ESX memory states on a real run: rising pressure moves the host soft -> hard, balloon first, host swap later.

``memory-states`` (variant ``esx``, 100 ticks): guests that grow on a host
with ESX states. Checked from the host's log, tick by tick (the scenario
logs metrics every tick): the state sequence, that the proportional
controller inflates only from the soft state on, that the host swaps only
at ticks whose state is hard or low, that ballooning came first, and that
no page is lost.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from balloonlab.proto import events as ev
from tests.pathology_runs import run_scenario

pytestmark = pytest.mark.multiprocess

ORDER = ["high", "clear", "soft", "hard", "low"]


@pytest.fixture(scope="module")
def esx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("memory-states") / "run"
    variants = run_scenario(run_dir, "memory-states", "--variant", "esx", "--ticks", "100", timeout_s=120)
    (host_log,) = run_dir.rglob("host.jsonl")        # one variant: at the top or in its own directory
    return host_log, variants["esx"]


def _events(host_log: Path, event: str) -> list[dict[str, Any]]:
    with open(host_log) as f:
        return [e for e in map(json.loads, f) if e.get("event") == event]


@pytest.mark.timeout(150)
def test_pressure_moves_the_states_and_swapping_waits_for_hard(esx: tuple[Path, dict[str, Any]]) -> None:
    host_log, v = esx
    ticks = sorted(_events(host_log, ev.TICK_COMPLETED), key=lambda e: e["tick"])
    assert [t["tick"] for t in ticks] == list(range(100))
    state = {t["tick"]: t["memory_state"] for t in ticks}

    # The states, as logged on each transition, agree with the per-tick state and rise through the order.
    changes = _events(host_log, ev.MEMORY_STATE_CHANGED)
    assert changes, "no memory_state_changed"
    for c in changes:
        assert state[c["tick"]] == c["state"] and c["previous"] != c["state"]
    first = {}
    for t in ticks:
        first.setdefault(t["memory_state"], t["tick"])
    assert first["high"] == 0
    assert "soft" in first and "hard" in first, first
    assert first["high"] < first["clear"] < first["soft"] < first["hard"], first
    # Each first entry into a worse state comes from the state just above or better (no jump from high to hard).
    seen = [s for s in ORDER if s in first]
    assert seen[:4] == ["high", "clear", "soft", "hard"], first

    # The balloon: the controller asks for nothing before the soft state.
    targets = _events(host_log, ev.BALLOON_TARGET_SET)
    inflations = [e["tick"] for e in targets if e["target_pages"] > e["previous_pages"]]
    assert inflations, "the balloon never inflated"
    assert all(state[t] in ("soft", "hard", "low") for t in inflations), [(t, state[t]) for t in inflations]
    swapped = [t["tick"] for t in ticks if t["swap_out_pages"] > (ticks[t["tick"] - 1]["swap_out_pages"]
                                                                  if t["tick"] else 0)]
    assert swapped, "the host never swapped: the scenario lost its pressure"
    # The boundary swaps only in hard and low; mid-tick a guest that used up its share of scarce memory
    # (the host below minFree) swaps its own pages (hostd/memstate.py, may_self_swap). Never in high.
    assert all(state[t] != "high" for t in swapped), [(t, state[t]) for t in swapped]
    h = v["host"]
    by_state = h["swap_out_pages_by_state"]
    assert by_state["high"] == 0 and by_state["hard"] + by_state["low"] > 0, by_state
    assert sum(by_state.values()) == h["swap_out_pages"] > 0, by_state

    # Summary and per-tick fields others read.
    assert h["memory_state"] == ticks[-1]["memory_state"]
    assert h["min_free_frames"] == round(0.06 * h["ram_pages"])        # a 48 MiB host: 6 % of RAM
    assert sum(h["memory_state_ticks"].values()) == 100
    assert all("alloc_target_pages" in g for g in ticks[-1]["guests"].values())
    assert v["lost_pages"] == 0 and v["audit_ok"]

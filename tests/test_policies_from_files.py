"""A controller and a replacement policy from the user's own files, outside the repository.

The files are docs/policies.md's worked examples, written into tmp_path: the
documentation is what runs. Bad specs are refused before any process starts,
naming the file and what is wrong.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import balloonlab
from balloonlab.proto.errors import ConfigError
from balloonlab.scenario import Overrides, load_scenario
from balloonlab.validators import VALIDATORS
from tests.procs import REPO, procs_mentioning

DOC = REPO / "docs" / "policies.md"

SCENARIO = """
[scenario]
name = "mine"
seed = 4
guests = 2
ticks = 24
metrics_every_ticks = 4

[host]
overcommit = 1.3

[guest]
ram_mib = 4
kernel_mib = 0.25
policy = "policies/my_policy.py:RandomEviction"
policy_params = { seed = 7 }
batch_refs = 1024
regions = [ { name = "heap", kind = "anon", mib = 3 } ]
workload = [ { kind = "anon-hot", region = "heap", ws_pages = 600 }, { kind = "anon-cold", region = "heap" } ]

[balloon]
policy = "policies/my_controller.py:MostFreeFirst"
params = { goal_fraction = 0.3, step_pages = 64 }

[costs]
mem_ref_us = 10.0
"""


def doc_files() -> dict[str, str]:
    """The code blocks of docs/policies.md marked ``<!-- file: NAME -->``."""
    text = DOC.read_text()
    found = dict(re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", text, re.S))
    assert set(found) == {"my_controller.py", "my_policy.py"}, found.keys()
    return found


def _write_user_files(root: Path) -> Path:
    (root / "policies").mkdir(parents=True)
    for name, code in doc_files().items():
        (root / "policies" / name).write_text(code)
    scenario = root / "mine.toml"
    scenario.write_text(SCENARIO)
    return scenario


@pytest.mark.multiprocess
def test_a_run_with_the_users_controller_and_policy(tmp_path: Path) -> None:
    scenario = _write_user_files(tmp_path / "elsewhere")
    run_dir = tmp_path / "run"
    run = balloonlab.run(scenario, run_dir=run_dir, report=True, verbose=False)
    assert run.ok, (run_dir / "host.stderr").read_text() if (run_dir / "host.stderr").exists() else run
    cfg = json.loads((run_dir / "host-config.json").read_text())
    # Sent absolute: the processes do not depend on their working directory.
    assert cfg["balloon"]["policy"] == f"{tmp_path / 'elsewhere' / 'policies' / 'my_controller.py'}:MostFreeFirst"
    started = [e for e in run.events.to_dict("records") if e["event"] == "guest_started"]
    assert len(started) == 2
    for e in started:
        assert e["policy"] == f"{tmp_path / 'elsewhere' / 'policies' / 'my_policy.py'}:RandomEviction"
    d = run.decisions
    assert set(d["code"]) <= {"host_has_enough", "most_free_guest"} and "most_free_guest" in set(d["code"])
    took = d[d["code"] == "most_free_guest"].iloc[0]
    assert took["decision"] == "inflate" and took["in_step_pages"] > 0 and "free memory" in took["reason"]
    assert run.summary["variants"]["default"]["lost_pages"] == 0
    per_guest = run.summary["variants"]["default"]["balloon_decisions"]
    assert sum(g["decisions"] for g in per_guest.values()) == 2 * 24   # every tick, every guest, counted
    assert "`most_free_guest`" in (run_dir / "report.md").read_text()
    assert not procs_mentioning(str(run_dir))


def _load(scenario: Path, **settings: object) -> None:
    from balloonlab.overrides import normalize
    load_scenario(scenario, Overrides(settings=normalize(settings, cwd=scenario.parent)), VALIDATORS)


def test_bad_specs_are_refused_before_anything_runs(tmp_path: Path) -> None:
    scenario = _write_user_files(tmp_path)
    _load(scenario)   # the good one loads
    pol = tmp_path / "policies"
    with pytest.raises(ConfigError, match=r"no such file .*policies/nothere\.py"):
        _load(scenario, **{"balloon.policy": "policies/nothere.py:X"})
    with pytest.raises(ConfigError, match=r"has no class 'Nope'; classes defined there: \['MostFreeFirst'\]"):
        _load(scenario, **{"balloon.policy": "policies/my_controller.py:Nope"})
    (pol / "broken.py").write_text("class NoDecide:\n    name = 'x'\n")
    with pytest.raises(ConfigError, match="NoDecide has neither decide\\(view\\) nor targets\\(view\\)"):
        _load(scenario, **{"balloon.policy": "policies/broken.py:NoDecide"})
    with pytest.raises(ConfigError, match="cannot build it with params .*'speed'"):
        _load(scenario, **{"balloon.policy": "policies/my_controller.py:MostFreeFirst", "balloon.params.speed": 3})
    (pol / "syntax.py").write_text("def (:\n")
    with pytest.raises(ConfigError, match="importing .*syntax.py failed: SyntaxError"):
        _load(scenario, **{"guest.policy": "policies/syntax.py:X"})
    (pol / "half.py").write_text("class Half:\n    name = 'half'\n    def __init__(self, n_frames):\n"
                                 "        self.capacity_pages = n_frames\n")
    with pytest.raises(ConfigError, match="Half lacks attach, resize, on_hits, on_load, select_victim"):
        _load(scenario, **{"guest.policy": "policies/half.py:Half"})
    with pytest.raises(ConfigError, match="RandomEviction.*unknown parameter"):
        _load(scenario, **{"guest.policy_params": {"speed": 1}})


def test_a_targets_only_controller_works_without_reasons(tmp_path: Path) -> None:
    from balloonlab.hostd.balloon import DecisionLog, make_controller
    from tests.test_host_balloon import guest, view

    path = tmp_path / "simple.py"
    path.write_text("class Half:\n    def targets(self, view):\n"
                    "        return {g.guest_id: g.ram_pages // 2 for g in view.guests}\n")
    ctl = make_controller(f"{path}:Half")
    assert DecisionLog("x").decide(ctl, view(guest(1, ram=1000), free=0)) == {1: 500}
    d = ctl.decide(view(guest(1, ram=1000), free=0))
    assert d[1].code == "targets" and "gives no reasons" in d[1].reason

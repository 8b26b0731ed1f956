"""Dotted-key overrides of a scenario: values, paths, variants, guests, and errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from balloonlab.overrides import normalize, parse_setting, parse_value
from balloonlab.proto.errors import ConfigError
from balloonlab.scenario import Overrides, find_scenario, load_scenario
from balloonlab.validators import VALIDATORS


def _load(name: str, settings: dict[str, object], **kw: object):  # type: ignore[no-untyped-def]
    return load_scenario(find_scenario(name), Overrides(settings=normalize(settings), **kw), VALIDATORS)


def test_values_are_toml_values_else_text() -> None:
    assert parse_value("1.5") == 1.5 and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"x y"') == "x y"
    assert parse_value("working-set") == "working-set" and parse_value(" none ") == "none"
    assert parse_setting("balloon.params.pff_high=3000") == ("balloon.params.pff_high", 3000)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_setting("host.overcommit")


def test_an_override_wins_over_every_variant() -> None:
    s = _load("swap-storm", {"balloon.policy": "none", "host.overcommit": 1.5, "scenario.guests": 2})
    for merged in s.variants.values():
        assert merged["balloon"]["policy"] == "none" and merged["host"]["overcommit"] == 1.5
        assert merged["scenario"]["guests"] == 2
    s = _load("swap-storm", {"balloon.max_percent": 50})
    assert s.variants["working-set"]["balloon"]["params"]["pff_high"] == 3000.0   # the rest of the table stays


def test_one_variant_and_one_guest() -> None:
    s = _load("swap-storm", {"variants.working-set.balloon.params.pff_high": 10.0, "guests.1.policy": "lru"})
    assert s.variants["working-set"]["balloon"]["params"]["pff_high"] == 10.0
    assert "pff_high" not in s.variants["aggressive"]["balloon"]["params"]
    cfg = s.run_config("aggressive", "r")
    assert [g["policy"] for g in cfg["guests"]] == ["esc", "lru", "esc", "esc"]


@pytest.mark.parametrize("settings, message", [
    ({"hots.overcommit": 1}, r"override 'hots.overcommit': unknown table 'hots'; did you mean 'host'.*known: \['balloon'"),
    ({"host.overcomit": 1.5}, r"override 'host.overcomit': .*: host.overcomit: unknown key; did you mean 'overcommit'\? known: .*'overcommit'"),
    ({"host.overcommit": "lots"}, r"override 'host.overcommit': .*overcommit.*'lots'"),
    ({"host": 1}, r"override 'host': name a key in \[host\]"),
    ({"host.victim.x": 1}, r"override 'host.victim.x': host.victim is 'random', not a table"),
    ({"variants.nope.host.overcommit": 1.2}, r"override 'variants.nope.host.overcommit': no variant 'nope'"),
    ({"guests.x.policy": "lru"}, r"override 'guests.x.policy': expected guests.ID.KEY"),
    ({"balloon.log_decisions": "sometimes"}, r"log_decisions: must be one of \['changes', 'all'\]"),
])
def test_a_bad_override_is_named(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load("swap-storm", settings)


def test_a_file_policy_in_an_override_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    got = normalize({"balloon.policy": "mine.py:Mine"}, cwd=tmp_path)
    assert got == (("balloon.policy", f"{tmp_path}/mine.py:Mine"),)
    assert normalize([("guest.policy", "/abs/p.py:P")]) == (("guest.policy", "/abs/p.py:P"),)


def test_another_policy_drops_the_old_policys_params() -> None:
    s = _load("swap-storm", {"balloon.policy": "proportional"})
    assert "params" not in s.variants["working-set"]["balloon"]
    s = _load("swap-storm", {"balloon.policy": "working-set", "balloon.params.pff_high": 50.0})
    assert s.variants["aggressive"]["balloon"]["params"] == {"pff_high": 50.0}
    s = _load("swap-storm", {"balloon.policy": "working-set"})   # the same policy: its tuning stays
    assert s.variants["working-set"]["balloon"]["params"]["pff_high"] == 3000.0

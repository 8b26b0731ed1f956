"""The installed package: one top-level name, every subpackage listed, the scenarios as package data."""
from __future__ import annotations

import importlib.resources
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _declared() -> tuple[list[str], dict[str, str]]:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return conf["packages"], conf["package-dir"]


def test_every_package_in_the_tree_is_listed_under_balloonlab() -> None:
    """A new subpackage that pyproject.toml does not list would be missing from the wheel."""
    packages, package_dir = _declared()
    found = set()
    for name, folder in package_dir.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([name, *rel.parts]))
    assert sorted(found) == sorted(packages)
    assert all(p == "balloonlab" or p.startswith("balloonlab.") for p in packages)


def test_the_shipped_scenarios_are_package_data() -> None:
    from balloonlab.scenario import SCENARIO_DIR, find_scenario

    names = {p.name for p in importlib.resources.files("balloonlab.scenarios").iterdir() if p.name.endswith(".toml")}
    assert "io-amplification.toml" in names and "basic.toml" in names
    assert find_scenario("basic") == SCENARIO_DIR / "basic.toml"

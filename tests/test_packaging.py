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


def _sources(dest: Path) -> None:
    """What the wheel is built from, copied: the build leaves build/ and *.egg-info behind."""
    import shutil

    shutil.copy(REPO / "pyproject.toml", dest)
    shutil.copy(REPO / "README.md", dest)
    shutil.copy(REPO / "setup.py", dest)   # the compiled modules (guestd/_paging.c, hostd/_books.c)
    _, package_dir = _declared()
    for folder in set(package_dir.values()):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))


def test_the_wheel_has_one_top_level_name_and_the_console_scripts(tmp_path: Path) -> None:
    """What ``pip install .`` puts into site-packages: balloonlab and its dist-info, nothing generic."""
    import subprocess
    import sys
    import zipfile

    _sources(tmp_path)
    res = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = zipfile.ZipFile(tmp_path / "dist" / res.stdout.strip().splitlines()[-1])
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names} == {"balloonlab", "balloonlab-0.2.0.dist-info"}
    assert any(n.startswith("balloonlab/guestd/_paging") and n.endswith(".so") for n in names), \
        "the compiled paging core is missing from the wheel"
    assert any(n.startswith("balloonlab/hostd/_books") and n.endswith(".so") for n in names), \
        "the host's compiled module is missing from the wheel"
    for module in ("balloonlab/api.py", "balloonlab/proto/plugins.py", "balloonlab/hostd/balloon/decision.py",
                   "balloonlab/sweep/cli.py", "balloonlab/analysis/tables.py", "balloonlab/scenarios/swap-storm.toml",
                   "balloonlab/proto/schema/tables.py", "balloonlab/guestd/workload/traces/sort.npz"):
        assert module in names, module
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = {line.split(" = ")[0]: line.split(" = ")[1] for line in wheel.read(info).decode().splitlines()
               if " = " in line}
    assert scripts == {"balloonlab-launch": "balloonlab.launch:main", "balloonlab-analyze": "balloonlab.analyze:main",
                       "balloonlab-sweep": "balloonlab.sweep.cli:main",
                       "balloonlab-validate": "balloonlab.validate:main",
                       "balloonlab-dashboard": "balloonlab.dashboard.cli:main", "balloonlab-top": "balloonlab.top:main",
                       "balloonlab-host": "balloonlab.launch:host_main", "balloonlab-trace": "balloonlab.tracecli:main"}
    meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    required = {line.split(":", 1)[1].split(";")[0].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    for dep in ("matplotlib", "pandas", "dask[distributed]", "fastparquet", "msgspec"):   # ordinary dependencies, not extras
        assert any(r.startswith(dep) for r in required), (dep, required)

"""The benchmarks run an anchor checkout's launcher in either layout and tell its processes apart."""
from __future__ import annotations

from pathlib import Path

import pytest

from scripts.bench_checkout import launcher_argv, process_role

REPO = Path(__file__).resolve().parent.parent


def test_this_checkout_starts_the_package_launcher() -> None:
    assert launcher_argv(REPO, "py") == ["py", "-m", "balloonlab.launch"]


def test_a_checkout_from_before_the_package_layout_starts_scripts_launch(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "launch.py").write_text("")
    assert launcher_argv(tmp_path, "py") == ["py", "-m", "scripts.launch"]


def test_a_directory_without_a_launcher_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no launcher"):
        launcher_argv(tmp_path, "py")


@pytest.mark.parametrize("cmd,role", [
    ("/v/bin/python -m balloonlab.hostd --config /r/host-config.json", "host"),
    ("/v/bin/python -m hostd --config /r/host-config.json", "host"),
    ("/v/bin/python -m balloonlab.guestd --address /r/h.sock --guest-id 3", "guest"),
    ("python -m guestd --address /r/h.sock --guest-id 3", "guest"),
    ("python -m balloonlab.forkserver --control-fd 5", "forkserver"),
    ("python -m balloonlab.launch --scenario scale", None),
    ("python scripts/bench.py scale -m", None),
])
def test_process_roles_in_either_layout(cmd: str, role: str | None) -> None:
    assert process_role(cmd) == role


def test_precompile_writes_bytecode_even_when_the_environment_forbids_writing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from scripts.bench_checkout import precompile
    (tmp_path / "hostd").mkdir()
    (tmp_path / "hostd" / "mod.py").write_text("X = 1\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other.py").write_text("Y = 2\n")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    precompile(tmp_path, sys.executable)
    assert list((tmp_path / "hostd" / "__pycache__").glob("mod.*.pyc"))
    assert not (tmp_path / "elsewhere" / "__pycache__").exists()   # only the project's package folders

"""Running another checkout's launcher, whatever its layout (the anchor of a speed ratio).

A benchmark's anchor is often the code as it was when a target was set.
Checkouts from before the package layout (launcher in ``scripts/launch.py``,
no ``balloonlab/`` package) start their launcher as ``-m scripts.launch``;
later ones as ``-m balloonlab.launch``. The command-line options the
benchmarks pass (``--scenario --guests --seed --duration --ticks --run-dir
--no-report``) and the summary.json they read are the same in both.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["launcher_argv", "launcher_source", "process_role", "precompile"]


def launcher_source(checkout: Path) -> Path:
    """The launcher's source file in ``checkout``."""
    new = checkout / "balloonlab" / "launch.py"
    return new if new.exists() else checkout / "scripts" / "launch.py"


def launcher_argv(checkout: Path, python: str | Path) -> list[str]:
    """``python -m <the checkout's launcher module>``; run it with ``cwd=checkout``."""
    src = launcher_source(checkout)
    if not src.exists():
        raise FileNotFoundError(f"{checkout}: no launcher (neither balloonlab/launch.py nor scripts/launch.py)")
    module = "balloonlab.launch" if src.parent.name == "balloonlab" else "scripts.launch"
    return [str(python), "-m", module]


def process_role(cmdline: str) -> str | None:
    """``host``, ``guest`` or ``forkserver`` for a run's process command line (either layout), else None."""
    words = cmdline.split()
    for i, w in enumerate(words[:-1]):
        if w == "-m":
            module = words[i + 1].removeprefix("balloonlab.")
            return {"hostd": "host", "guestd": "guest", "forkserver": "forkserver"}.get(module)
    return None


PACKAGE_DIRS = ("balloonlab", "scripts", "hostd", "guestd", "proto")


def precompile(checkout: Path, python: str | Path) -> None:
    """Compile a checkout's sources to bytecode before it is timed, the same for every checkout compared.

    With PYTHONDONTWRITEBYTECODE set (as here) a checkout without
    ``__pycache__`` recompiles its sources at every process start; a ratio
    would then count that against whichever side lacks them.
    """
    dirs = [d for d in PACKAGE_DIRS if (checkout / d).is_dir()]
    subprocess.run([str(python), "-m", "compileall", "-q", "-j", "0", *dirs], cwd=checkout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

"""The run directory: one run's files, never two runs mixed, never someone else's directory changed.

- A new run refuses an existing, non-empty ``--run-dir`` (its JSON-lines
  logs would get a second run appended, and summary.json would mix them);
  ``--force`` clears it first.
- A directory the launcher creates is 0700; one it did not create keeps
  its permissions (the launcher then keeps its socket elsewhere, in a
  private directory under /tmp).
- Every bad ``--run-dir`` (a file, a missing parent, no write permission,
  a read-only file system) is one line naming the path and the reason
  (``RunDirError``), and the launcher exits 2.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["RunDirError", "prepare_run_dir"]


class RunDirError(ValueError):
    """A --run-dir the launcher cannot use; the message is the one line it prints."""


def prepare_run_dir(path: Path | None, default: Path, force: bool) -> tuple[Path, bool]:
    """The run directory to use, ready and empty; and whether the launcher created it."""
    if path is None:
        try:
            default.parent.mkdir(parents=True, exist_ok=True)
            default.mkdir(mode=0o700)
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {default}: {exc.strerror or exc}") from None
        return default, True
    where = f"--run-dir {path}"
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise RunDirError(f"{where}: exists and is not a directory")
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            if not force:
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise RunDirError(f"{where}: not empty ({len(entries)} entries: {shown}); a run never goes into "
                                  f"another's directory: choose a new one, or pass --force to clear it first")
            _clear(path)
        _check_writable(path, where)
        return path, False
    parent = path.parent
    if not parent.is_dir():
        raise RunDirError(f"{where}: its parent {parent} does not exist" if not parent.exists()
                          else f"{where}: its parent {parent} is not a directory")
    try:
        path.mkdir(mode=0o700)
    except OSError as exc:
        raise RunDirError(f"{where}: cannot create it: {exc.strerror or exc}") from None
    return path, True


def _clear(path: Path) -> None:
    """--force: remove what the directory holds (not the directory, whose permissions stay its owner's)."""
    real = path.resolve()
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor) or real == home or real == cwd or real in cwd.parents:
        raise RunDirError(f"--run-dir {path}: refusing to clear {real} (the root, the home or the current "
                          f"directory, or one above it); choose a directory of its own")
    for entry in list(real.iterdir()):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            raise RunDirError(f"--run-dir {path}: --force could not remove {entry.name}: "
                              f"{exc.strerror or exc}") from None


def _check_writable(path: Path, where: str) -> None:
    probe = path / f".balloonlab-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"{where}: cannot write into it: {exc.strerror or exc}") from None

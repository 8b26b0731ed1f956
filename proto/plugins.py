"""A user's class from a Python file: ``"path/to/mine.py:MyClass"`` as a policy name.

The host loads balloon controllers this way and each guest its replacement
policy, so the loader lives here where both meet. The launcher resolves a
relative path against the scenario file and sends the absolute one, so a
process never depends on its working directory. Each file is imported once
per process (keyed by its absolute path and modification time) under a
private module name, so two files that both call themselves ``mine.py`` do
not collide and nothing of theirs lands in ``sys.modules`` under a generic
name.

Errors are ``PluginError`` (a ``ConfigError``) and name the spec, the file
and what is wrong: no such file, an import that failed (with its exception),
no such class (with the classes the file does define), not a class.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType

from .errors import ConfigError

__all__ = ["PluginError", "is_file_spec", "split_file_spec", "resolve_file_spec", "load_class"]

_SUFFIX = ".py:"


class PluginError(ConfigError):
    """A ``file.py:Class`` policy spec that cannot be used; the message names the spec and why."""


def is_file_spec(name: object) -> bool:
    """True for ``"some/file.py:ClassName"``; built-in policy names never contain ``.py:``."""
    return isinstance(name, str) and _SUFFIX in name


def split_file_spec(spec: str) -> tuple[str, str]:
    """``"dir/mine.py:Cls"`` -> ``("dir/mine.py", "Cls")``; the class part must be an identifier."""
    path, _, cls = spec.rpartition(":")
    if not path.endswith(".py") or not cls.isidentifier():
        raise PluginError(f"policy {spec!r}: expected 'path/to/file.py:ClassName'")
    return path, cls


def resolve_file_spec(spec: str, base_dir: Path) -> str:
    """The spec with its path made absolute (relative paths are relative to ``base_dir``; ``~`` expands)."""
    path, cls = split_file_spec(spec)
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = Path(base_dir) / p
    return f"{os.path.normpath(p.absolute())}:{cls}"


_MODULES: dict[tuple[str, int], ModuleType] = {}


def _import_file(path: Path, spec: str) -> ModuleType:
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise PluginError(f"policy {spec!r}: no such file {path}") from None
    key = (str(path), mtime)
    module = _MODULES.get(key)
    if module is not None:
        return module
    name = "balloonlab_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise PluginError(f"policy {spec!r}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    # Registered while it runs, so that dataclasses and pickling inside the file find their module.
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 -- any error in the user's file is reported, with its type
        sys.modules.pop(name, None)
        raise PluginError(f"policy {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    _MODULES[key] = module
    return module


def load_class(spec: str) -> type:
    """The class named by ``spec`` (an absolute or working-directory-relative ``file.py:Class``)."""
    path, cls_name = split_file_spec(spec)
    p = Path(os.path.expanduser(path)).absolute()
    module = _import_file(p, spec)
    obj = getattr(module, cls_name, None)
    if obj is None:
        classes = sorted(n for n, v in vars(module).items()
                         if inspect.isclass(v) and getattr(v, "__module__", None) == module.__name__)
        raise PluginError(f"policy {spec!r}: {p} has no class {cls_name!r}; classes defined there: {classes}")
    if not inspect.isclass(obj):
        raise PluginError(f"policy {spec!r}: {cls_name!r} in {p} is a {type(obj).__name__}, not a class")
    return obj

"""balloonlab: a laboratory for memory overcommitment.

A host hypervisor process and N guest processes run for real and talk over
msgpack-framed sockets; time is virtual. The public API::

    import balloonlab
    run = balloonlab.run("swap-storm", guests=4, seed=3, overrides={"host.overcommit": 1.5})
    run.summary, run.guests, run.host, run.events, run.decisions   # dict and pandas DataFrames
    balloonlab.load("runs/...")                                     # a finished run
    balloonlab.sweep("swap-storm", grid={"host.overcommit": [1.2, 1.5]}, seeds=5, out="sweeps/s1")

The subpackages are the parts: ``balloonlab.proto`` (the contract),
``balloonlab.hostd`` (the host), ``balloonlab.guestd`` (the guests),
``balloonlab.analysis`` (logs to reports and tables), ``balloonlab.sweep``.
The names above are imported on first use: the host and guest processes,
which import this package too, do not pay for pandas or the launcher.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

__all__ = ["__version__", "run", "load", "Run", "sweep", "load_sweep", "ConfigError"]

_LAZY = {"run": "balloonlab.api", "load": "balloonlab.api", "Run": "balloonlab.api",
         "ConfigError": "balloonlab.proto.errors",
         "sweep": "balloonlab.sweep.api", "load_sweep": "balloonlab.sweep.api"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'balloonlab' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

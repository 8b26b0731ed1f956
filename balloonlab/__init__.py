"""balloonlab: a laboratory for memory overcommitment.

A host hypervisor process and N guest processes run for real and talk over
msgpack-framed sockets; time is virtual. The subpackages are the parts:
``balloonlab.proto`` (the contract), ``balloonlab.hostd`` (the host),
``balloonlab.guestd`` (the guests), ``balloonlab.analysis`` (logs to
reports); ``balloonlab.launch`` starts a run from a scenario.
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__"]

"""``request_order = "arrival"``: the guests' requests are served as they arrive, concurrently.

The fastest mode, and the old behaviour: inside a tick the machine's
scheduler decides the order, so under host memory pressure runs of the same
scenario and seed differ from each other. Nothing to add to the base.
"""
from __future__ import annotations

from .base import DisciplineBase

__all__ = ["ArrivalOrder"]


class ArrivalOrder(DisciplineBase):
    request_order = "arrival"

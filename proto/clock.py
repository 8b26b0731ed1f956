"""Virtual time: integer microseconds owned by the host.

The host advances time in ticks; a tick ends when every live guest has
reported ``tick_done``. Wall time only says how long the emulation takes.
"""
from __future__ import annotations

__all__ = ["VirtualUs", "TICK_US_DEFAULT", "US_PER_S", "us_to_s", "s_to_us", "tick_start_us"]

VirtualUs = int
"""A point or span of virtual time in microseconds."""

US_PER_S = 1_000_000
TICK_US_DEFAULT: VirtualUs = 10_000  # 10 ms of virtual time per tick


def us_to_s(vt_us: VirtualUs) -> float:
    return vt_us / US_PER_S


def s_to_us(seconds: float) -> VirtualUs:
    return int(round(seconds * US_PER_S))


def tick_start_us(tick: int, tick_us: VirtualUs) -> VirtualUs:
    return tick * tick_us

"""The ``[monitors]`` table of a scenario, validated.

One sub-table per monitor; every key is optional::

    [monitors.swap_storm]       # the detector (on by default)
    enabled = true
    window_ticks = 10           # rates and peaks are taken over this many ticks
    guest_swap_in_pages_per_s = 500.0  # a guest reading back swapped pages faster than this thrashes,
    guest_swap_in_per_kref = 2.0       # ... or more of them than this per 1000 references (a slow disk),
    guest_swap_pages_per_s = 200.0     # ... or its balloon left it less than its working set and it
                                       #     swaps (in or out) faster than this
    min_guests = 1              # ... and at least this many must
    io_fraction = 0.05          # host I/O buffers + disk cache reached this share of host RAM
    free_fraction = 0.05        # host free frames fell to this share of host RAM
    swap_out_fraction = 0.01    # the host swapped out this share of its RAM within the window
    quiet_ticks = 20            # the chain must stay broken this long before a new storm counts

    [monitors.pinning]          # the cure of nested swapping (off by default)
    enabled = false
    swap_pages_per_s = 200.0    # a guest whose swap I/O exceeds this (guest virtual s) is swapping
    pff_high = 0.0              # ... or whose PFF exceeds this (0: PFF is not used)
    pin_after_ticks = 1         # swapping for this many ticks in a row pins its swap area
    calm_pages_per_s = 20.0     # below this (and below pff_high) it is calm ...
    calm_ticks = 100            # ... and after this many calm ticks in a row it is unpinned
    window_ticks = 5            # its swap rate is taken over this many ticks
    mode = "exempt"             # "exempt": its cache pages are never host-swap victims, the cache stays
                                # bounded; "resident": pinned and never trimmed (pin_vdisk_range)

    [monitors.double_faults]
    samples = 8                 # blocks named per double_fault event (the count covers all)

    [monitors.convergence]      # the "central banker" report (off by default)
    enabled = false
    start_tick = 20             # warm-up ignored before this tick
    step_fraction = 0.05        # host demand rising by this share of host RAM ...
    step_ticks = 5              # ... within this many ticks is a step change
    settle_ticks = 10           # targets steady (and no PFF above pff_high) this long = settled
    tolerance_fraction = 0.01   # steady: no target moved more than this share of guest RAM per tick
    pff_high = 5000.0           # faults per virtual second
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from balloonlab.proto.errors import ConfigError

__all__ = ["MonitorsConfig", "SwapStormConfig", "PinningConfig", "DoubleFaultConfig", "ConvergenceConfig",
           "monitors_config"]


@dataclass(frozen=True, slots=True)
class SwapStormConfig:
    enabled: bool = True
    window_ticks: int = 10
    guest_swap_in_pages_per_s: float = 500.0
    guest_swap_in_per_kref: float = 2.0
    guest_swap_pages_per_s: float = 200.0
    min_guests: int = 1
    io_fraction: float = 0.05
    free_fraction: float = 0.05
    swap_out_fraction: float = 0.01
    quiet_ticks: int = 20


@dataclass(frozen=True, slots=True)
class PinningConfig:
    enabled: bool = False
    swap_pages_per_s: float = 200.0
    pff_high: float = 0.0
    pin_after_ticks: int = 1
    calm_pages_per_s: float = 20.0
    calm_ticks: int = 100
    window_ticks: int = 5
    mode: str = "exempt"


@dataclass(frozen=True, slots=True)
class DoubleFaultConfig:
    samples: int = 8


@dataclass(frozen=True, slots=True)
class ConvergenceConfig:
    enabled: bool = False
    start_tick: int = 20
    step_fraction: float = 0.05
    step_ticks: int = 5
    settle_ticks: int = 10
    tolerance_fraction: float = 0.01
    pff_high: float = 5000.0


@dataclass(frozen=True, slots=True)
class MonitorsConfig:
    swap_storm: SwapStormConfig = field(default_factory=SwapStormConfig)
    pinning: PinningConfig = field(default_factory=PinningConfig)
    double_faults: DoubleFaultConfig = field(default_factory=DoubleFaultConfig)
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)


_FRACTIONS = {"io_fraction", "free_fraction", "swap_out_fraction", "step_fraction", "tolerance_fraction"}
_CHOICES = {"mode": ("exempt", "resident")}
_AT_LEAST_ONE = {"window_ticks", "min_guests", "pin_after_ticks", "calm_ticks", "step_ticks", "settle_ticks"}


def _section(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table, got {type(raw).__name__} {raw!r}")
    default = cls()
    kinds = {f.name: type(getattr(default, f.name)) for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in kinds:
            raise ConfigError(f"{where}.{key}: unknown key; known: {sorted(kinds)}")
        kind = kinds[key]
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is str:
            ok = isinstance(value, str)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        if kind in (int, float) and value < 0:
            raise ConfigError(f"{where}.{key}: must be >= 0, got {value}")
        if key in _FRACTIONS and value > 1:
            raise ConfigError(f"{where}.{key}: must be in [0, 1], got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{where}.{key}: {value!r} is not one of {list(_CHOICES[key])}")
        if key in _AT_LEAST_ONE and value < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
        values[key] = value
    return replace(default, **values)


def monitors_config(table: Mapping[str, Any] | None, where: str = "[monitors]") -> MonitorsConfig:
    """Parse ``[monitors]``; a bad key or value raises ``ConfigError`` naming it."""
    table = table or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    sections = {"swap_storm": SwapStormConfig, "pinning": PinningConfig, "double_faults": DoubleFaultConfig,
                "convergence": ConvergenceConfig}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in sections:
            raise ConfigError(f"{where}.{key}: unknown monitor; known: {sorted(sections)}")
        out[key] = _section(sections[key], value, f"{where}.{key}")
    return MonitorsConfig(**out)

"""A guest's scenario table (``[guest]`` merged with ``[[guests]]``), validated.

User-facing sizes are in MiB (256 pages each); the kernel sees pages::

    ram_mib = 64            kernel_mib = 2          swap_mib = 64 (default: one slot per anon page)
    policy = "esc"          policy_params = {}
    regions = [{name = "db", kind = "file", mib = 32}, {name = "heap", kind = "anon", pages = 4096}]
    workload = [{kind = "db", region = "db", weight = 3}, {kind = "anon-cold", region = "heap"}]
    batch_refs = 8192       shares = 1000
    dirty_background_ratio = 0    # percent: the flusher writes dirty page cache back above it (0: off)
    watermark_scale_factor = 0    # kswapd between Linux's low and high watermarks (10 in Linux; 0: off)
    read_ahead_kb = 0             # readahead of sequential file reads, window up to this (128 in Linux; 0: off)
    ws_period_us, ws_sample_pages, pff_alpha, fault_around_pages    (kernel knobs)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import GuestConfigError
from .kernel_config import KernelConfig, kernel_config_from_mapping
from .workload import build_workload

__all__ = ["GuestConfig", "guest_config_from_mapping", "MIB_PAGES", "RUN_KEYS"]

MIB_PAGES = 256

# Keys the host adds to the table it sends in Welcome; not the guest's to validate.
RUN_KEYS = frozenset({"id", "ram_pages", "disk_blocks", "seed", "costs", "disk", "locks", "ticks",
                      "metrics_every_ticks", "swap_base_block", "swap_blocks"})
_OWN = {"ram_mib", "kernel_mib", "swap_mib", "policy", "policy_params", "regions", "workload", "batch_refs",
        "shares", "dirty_background_ratio", "watermark_scale_factor", "read_ahead_kb", "ws_period_us",
        "ws_sample_pages", "pff_alpha", "fault_around_pages"}


@dataclass(frozen=True, slots=True)
class GuestConfig:
    kernel: KernelConfig
    workload: tuple[dict[str, Any], ...]   # specs for guestd.workload.build_workload
    batch_refs: int                        # references per vCPU batch
    shares: int                            # proportional-share weight for the host
    # Linux's vm.dirty_background_ratio (10 there, Documentation/admin-guide/sysctl/vm.rst): the flusher
    # starts writing dirty page cache back once it exceeds this share of available memory. Off (0) by
    # default for now: its writes are not waited for, so the guest's next request may be earlier than
    # their completion, which the one-at-a-time virtual-time sequencer takes as a bound on the guest's
    # clock (requests_behind_bound, and orders other guests by it). Per-guest lanes need no such bound.
    dirty_background_ratio: float = 0.0

    @property
    def ram_pages(self) -> int:
        return self.kernel.ram_pages

    @property
    def disk_blocks(self) -> int:
        return self.kernel.disk_blocks


def _pages(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise GuestConfigError(f"{where}: expected a size in MiB >= 0, got {value!r}")
    return int(round(value * MIB_PAGES))


def guest_config_from_mapping(raw: Mapping[str, Any], where: str = "guest") -> GuestConfig:
    extra = sorted(set(raw) - _OWN - RUN_KEYS)
    if extra:
        raise GuestConfigError(f"{where}: unknown key(s) {', '.join(extra)}; known: {', '.join(sorted(_OWN))}")
    ram_pages = _pages(raw.get("ram_mib", 64), f"{where}.ram_mib")
    kernel: dict[str, Any] = {"ram_pages": ram_pages, "kernel_pages": _pages(raw.get("kernel_mib", 1),
                                                                             f"{where}.kernel_mib")}
    if "swap_mib" in raw:
        kernel["swap_pages"] = _pages(raw["swap_mib"], f"{where}.swap_mib")
    for key in ("policy", "policy_params", "ws_period_us", "ws_sample_pages", "pff_alpha", "fault_around_pages",
                "watermark_scale_factor"):
        if key in raw:
            kernel[key] = raw[key]
    if "read_ahead_kb" in raw:
        ra = raw["read_ahead_kb"]
        if isinstance(ra, bool) or not isinstance(ra, int) or ra < 0 or ra % 4:
            raise GuestConfigError(f"{where}.read_ahead_kb: expected a multiple of 4 KiB >= 0, got {ra!r}")
        kernel["read_ahead_pages"] = ra // 4
    regions_raw = raw.get("regions", [{"name": "heap", "kind": "anon", "mib": 16}])
    if not isinstance(regions_raw, list):
        raise GuestConfigError(f"{where}.regions: expected an array of tables")
    regions = []
    for i, r in enumerate(regions_raw):
        if not isinstance(r, Mapping):
            raise GuestConfigError(f"{where}.regions[{i}]: expected a table")
        r = dict(r)
        if "mib" in r:
            if "pages" in r:
                raise GuestConfigError(f"{where}.regions[{i}]: give mib or pages, not both")
            r["pages"] = _pages(r.pop("mib"), f"{where}.regions[{i}].mib")
        regions.append(r)
    kernel["regions"] = regions
    kcfg = kernel_config_from_mapping(kernel, where=where)
    specs = raw.get("workload", [{"kind": "anon-hot", "region": kcfg.layout.regions[0].name}])
    if not isinstance(specs, list) or not specs:
        raise GuestConfigError(f"{where}.workload: expected a non-empty array of tables")
    # Build once with a throwaway generator: every bad workload key is found now, not mid-run.
    build_workload(specs, kcfg.layout, np.random.default_rng(0), where=f"{where}.workload")
    batch_refs = raw.get("batch_refs", 8192)
    shares = raw.get("shares", 1000)
    for key, value in (("batch_refs", batch_refs), ("shares", shares)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GuestConfigError(f"{where}.{key}: expected an integer >= 1, got {value!r}")
    ratio = raw.get("dirty_background_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 100:
        raise GuestConfigError(f"{where}.dirty_background_ratio: expected a percentage in [0, 100], got {ratio!r}")
    return GuestConfig(kcfg, tuple(dict(s) for s in specs), batch_refs, shares, float(ratio))

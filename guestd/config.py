"""A guest's scenario table (``[guest]`` merged with ``[[guests]]``), validated.

User-facing sizes are in MiB (256 pages each); the kernel sees pages::

    ram_mib = 64            kernel_mib = 2          swap_mib = 64 (default: one slot per anon page)
    policy = "esc"          policy_params = {}
    regions = [{name = "db", kind = "file", mib = 32}, {name = "heap", kind = "anon", pages = 4096}]
    workload = [{kind = "db", region = "db", weight = 3}, {kind = "anon-cold", region = "heap"}]
    batch_refs = 8192       shares = 1000
    dirty_background_ratio = 0    # percent: the flusher writes dirty page cache back above it (0: off)
    ws_period_us, ws_sample_pages, pff_alpha, fault_around_pages    (kernel knobs)
    free_page_reporting = false   # virtio-balloon free page reporting (guestd.reporting)
    report_delay_ms = 2000        # a block must stay free this long; the reporter runs this often
    report_order_pages = 512      # reported blocks: aligned runs of this many free frames (a power of two)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import GuestConfigError
from .kernel_config import KernelConfig, kernel_config_from_mapping
from .reporting import REPORT_DELAY_MS_DEFAULT, REPORT_ORDER_PAGES_DEFAULT, ReportingConfig
from .workload import build_workload

__all__ = ["GuestConfig", "guest_config_from_mapping", "MIB_PAGES", "RUN_KEYS"]

MIB_PAGES = 256

# Keys the host adds to the table it sends in Welcome; not the guest's to validate.
RUN_KEYS = frozenset({"id", "ram_pages", "disk_blocks", "seed", "costs", "disk", "locks", "ticks",
                      "metrics_every_ticks", "swap_base_block", "swap_blocks"})
_OWN = {"ram_mib", "kernel_mib", "swap_mib", "policy", "policy_params", "regions", "workload", "batch_refs",
        "shares", "dirty_background_ratio", "ws_period_us", "ws_sample_pages", "pff_alpha", "fault_around_pages",
        "free_page_reporting", "report_delay_ms", "report_order_pages"}


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
    reporting: ReportingConfig = ReportingConfig()   # free page reporting (off by default)

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
    for key in ("policy", "policy_params", "ws_period_us", "ws_sample_pages", "pff_alpha", "fault_around_pages"):
        if key in raw:
            kernel[key] = raw[key]
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
    return GuestConfig(kcfg, tuple(dict(s) for s in specs), batch_refs, shares, float(ratio),
                       _reporting(raw, where))


def _reporting(raw: Mapping[str, Any], where: str) -> ReportingConfig:
    on = raw.get("free_page_reporting", False)
    if not isinstance(on, bool):
        raise GuestConfigError(f"{where}.free_page_reporting: expected true or false, got {on!r}")
    delay = raw.get("report_delay_ms", REPORT_DELAY_MS_DEFAULT)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 < delay < 1e9:
        raise GuestConfigError(f"{where}.report_delay_ms: expected a number of virtual ms > 0, got {delay!r}")
    order = raw.get("report_order_pages", REPORT_ORDER_PAGES_DEFAULT)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1 or order & (order - 1):
        raise GuestConfigError(f"{where}.report_order_pages: expected a power of two >= 1 (a buddy block), "
                               f"got {order!r}")
    return ReportingConfig(on, float(delay), int(order))

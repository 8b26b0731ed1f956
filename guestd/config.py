"""A guest's scenario table (``[guest]`` merged with ``[[guests]]``), as the guest reads it.

The keys, their types, bounds and defaults are the schema's
(``balloonlab.proto.schema.tables.GuestTable``; README "Scenario files");
sizes in MiB become pages there, once. What is added here is what only the
guest knows: its replacement policies and their parameters, and building
the layout and the workload (every bad workload key is found now, not
mid-run).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from balloonlab.proto.schema import GuestTable, SchemaError, decode

from .errors import GuestConfigError, GuestdError
from .kernel_config import KernelConfig
from .replacement import make_policy
from .reporting import ReportingConfig
from .workload import build_workload
from .workload.build import spec_dict
from .workload.layout import Layout, Region

__all__ = ["GuestConfig", "guest_config_from_mapping", "build_checked_workload", "RUN_KEYS"]

# Keys the host adds to the table it sends in Welcome; not the guest's to validate.
RUN_KEYS = frozenset({"id", "ram_pages", "disk_blocks", "seed", "costs", "disk", "locks", "ticks",
                      "metrics_every_ticks", "swap_base_block", "swap_blocks", "read_chain", "ahead_chain"})
# The kernel's knobs: given, they go to KernelConfig as they are; left out, the kernel's defaults hold.
_KERNEL_KNOBS = ("ws_period_us", "ws_sample_pages", "pff_alpha", "fault_around_pages", "watermark_scale_factor")


@dataclass(frozen=True, slots=True)
class GuestConfig:
    kernel: KernelConfig
    workload: tuple[dict[str, Any], ...]   # specs for guestd.workload.build_workload, defaults filled in
    batch_refs: int                        # references per vCPU batch
    shares: int                            # proportional-share weight for the host
    # Linux's vm.dirty_background_ratio (10 there, Documentation/admin-guide/sysctl/vm.rst): the flusher
    # starts writing dirty page cache back once it exceeds this share of available memory. Off (0) by
    # default for now: its writes are not waited for, so the guest's next request may be earlier than
    # their completion, which the one-at-a-time virtual-time sequencer takes as a bound on the guest's
    # clock (requests_behind_bound, and orders other guests by it). Per-guest lanes need no such bound.
    dirty_background_ratio: float = 0.0
    table: GuestTable | None = None        # every key as given (a new key is read from here)

    @property
    def ram_pages(self) -> int:
        return self.kernel.ram_pages

    @property
    def reporting(self) -> ReportingConfig:
        """Free page reporting (``guestd.reporting``); off without a table."""
        t = self.table
        if t is None:
            return ReportingConfig()
        return ReportingConfig(t.free_page_reporting, float(t.report_delay_ms), int(t.report_order_pages))

    @property
    def disk_blocks(self) -> int:
        return self.kernel.disk_blocks


def guest_config_from_mapping(raw: Mapping[str, Any], where: str = "guest", *,
                              check_workload: bool = True) -> GuestConfig:
    """A guest's config from its table, checked; ``GuestConfigError`` naming the first bad key.

    The workload is checked by building it once (on a throwaway generator).
    ``check_workload=False`` leaves that to the caller, which builds the real
    one right after with ``build_checked_workload`` (the same check, the same
    message): a forked guest's build paid for it twice (~1.2 ms of its start,
    and a trace workload's file read twice).
    """
    own = {k: v for k, v in raw.items() if k not in RUN_KEYS}
    head, path = ("", "guest") if where == "guest" else (where, "guest")
    try:
        table = decode(GuestTable, own, path=path, where=head)
        try:
            table.check()
        except ValueError as exc:
            rel, _, reason = str(exc).partition(": ")
            raise SchemaError(f"{path}.{rel}", reason, head) from None
    except SchemaError as exc:
        raise GuestConfigError(str(exc)) from None
    layout = Layout([Region(r.name, r.kind, r.page_count, r.image, r.image_offset, r.zero_writes,
                            tuple(r.compress) if isinstance(r.compress, list) else r.compress)
                     for r in table.regions])
    knobs = {k: getattr(table, k) for k in _KERNEL_KNOBS if getattr(table, k) is not None}
    knobs["read_ahead_pages"] = table.read_ahead_kb // 4
    try:
        kcfg = KernelConfig(ram_pages=table.ram_pages, layout=layout, kernel_pages=table.kernel_pages,
                            swap_pages=table.swap_pages, policy=table.policy,
                            policy_params=dict(table.policy_params), **knobs)
        make_policy(kcfg.policy, 1, **kcfg.policy_params)   # names the bad parameter, if any
    except GuestdError as e:
        key = "guest.policy_params" if "parameter" in str(e) else "guest.policy"
        raise GuestConfigError(f"{head}: {key}: {e}" if head else f"{key}: {e}") from None
    specs = tuple(spec_dict(s) for s in table.workloads)
    if check_workload:
        build_checked_workload(table.workloads, layout, np.random.default_rng(0), where)
    return GuestConfig(kcfg, specs, table.batch_refs, table.shares, table.dirty_background_ratio, table)


def build_checked_workload(specs: Sequence[Any], layout: Layout, rng: np.random.Generator,
                           where: str = "guest") -> Any:
    """``build_workload`` with ``guest_config_from_mapping``'s error message (``where``: its argument)."""
    head = "" if where == "guest" else where
    try:
        return build_workload(specs, layout, rng, where="guest.workload")
    except GuestConfigError as e:
        raise GuestConfigError(f"{head}: {e}" if head else str(e)) from None

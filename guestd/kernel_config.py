"""Configuration of one guest's paging OS (the ``GuestKernel``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Mapping

from msgspec import Meta

from balloonlab.proto.schema import SchemaError, Table, decode

from .errors import GuestConfigError, GuestdError
from .replacement import POLICIES, make_policy
from .workload.layout import Layout

__all__ = ["KernelConfig", "kernel_config_from_mapping"]


@dataclass(frozen=True)
class KernelConfig:
    ram_pages: int                          # guest-physical frames (gpfns 0..ram_pages-1)
    layout: Layout                          # the workload's regions (vpages, files on disk)
    kernel_pages: int = 0                   # gpfns 0..kernel_pages-1 are the kernel's, never victims
    swap_pages: int | None = None           # guest swap slots; None = one per anonymous page
    policy: str = "esc"                     # a name in guestd.replacement.POLICIES, or "/abs/file.py:Class"
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    ws_period_us: float = 100_000.0         # working-set sample and PFF period (virtual µs)
    ws_sample_pages: int = 100              # resident pages sampled per period (ESX-style)
    pff_alpha: float = 0.3                  # EWMA weight of the newest period in ``pff``
    fault_around_pages: int = 16            # EPT fault-around window over upcoming free frames
    initially_backed: bool | None = None    # None: ask the hypervisor (``backs_all_initially``)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> GuestConfigError:
            return GuestConfigError(f"{key}: {why}, got {getattr(self, key)!r}")
        if self.ram_pages < 1:
            raise bad("ram_pages", "must be >= 1")
        if not 0 <= self.kernel_pages < self.ram_pages:
            raise bad("kernel_pages", f"must be in 0..{self.ram_pages - 1}")
        if self.swap_pages is not None and self.swap_pages < 0:
            raise bad("swap_pages", "must be >= 0")
        if self.policy not in POLICIES:
            make_policy(self.policy, 1)          # raises UnknownPolicy listing the known names
        if self.ws_period_us <= 0:
            raise bad("ws_period_us", "must be > 0")
        if self.ws_sample_pages < 0:
            raise bad("ws_sample_pages", "must be >= 0")
        if not 0.0 < self.pff_alpha <= 1.0:
            raise bad("pff_alpha", "must be in (0, 1]")
        if self.fault_around_pages < 1:
            raise bad("fault_around_pages", "must be >= 1")

    @property
    def swap_slots(self) -> int:
        return self.layout.anon_pages if self.swap_pages is None else self.swap_pages

    @property
    def swap_base_block(self) -> int:
        """First block of the swap area: the files come first."""
        return self.layout.n_file_blocks

    @property
    def disk_blocks(self) -> int:
        """Size of the virtual disk the kernel needs: files, then swap."""
        return self.layout.n_file_blocks + self.swap_slots


class _KernelTable(Table):
    """``kernel_config_from_mapping``'s keys: the kernel's own, in pages (a scenario gives MiB: ``GuestTable``)."""

    ram_pages: Annotated[int, Meta(ge=1)]
    kernel_pages: Annotated[int, Meta(ge=0)] = 0
    swap_pages: Annotated[int, Meta(ge=0)] | None = None
    policy: str = "esc"
    policy_params: dict[str, Any] = {}
    regions: list[Any] = []
    ws_period_us: Annotated[float, Meta(gt=0)] | None = None
    ws_sample_pages: Annotated[int, Meta(ge=0)] | None = None
    pff_alpha: Annotated[float, Meta(gt=0, le=1)] | None = None
    fault_around_pages: Annotated[int, Meta(ge=1)] | None = None
    initially_backed: bool | None = None


def kernel_config_from_mapping(raw: Mapping[str, Any], where: str = "guest") -> KernelConfig:
    """Build a ``KernelConfig`` from a table in pages; every bad key is named with ``where``.

    Keys: ram_pages, kernel_pages, swap_pages, policy, policy_params (table),
    regions (list of {name, kind, pages}), ws_period_us, ws_sample_pages,
    pff_alpha, fault_around_pages, initially_backed.
    """
    try:
        t = decode(_KernelTable, dict(raw), path=where)
    except SchemaError as e:
        raise GuestConfigError(str(e)) from None
    kw: dict[str, Any] = {f: getattr(t, f) for f in t.__struct_fields__ if f != "regions" and getattr(t, f) is not None}
    kw["policy_params"] = dict(t.policy_params)
    kw["layout"] = Layout.from_mapping(t.regions, where=f"{where}.regions")
    try:
        cfg = KernelConfig(**kw)
        make_policy(cfg.policy, 1, **cfg.policy_params)   # names the bad parameter, if any
    except GuestdError as e:
        raise GuestConfigError(f"{where}: {e}") from None
    return cfg

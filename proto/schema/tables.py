"""The scenario's tables as msgspec structs: every key, its type, its bounds, its default, its meaning.

One key is one field here: its type, bounds, meaning (``Meta``) and default.
A struct rejects unknown keys, so a typo is an
error with a suggestion (``errors.py``); bounds use ``Meta`` and appear in
the JSON Schema (``balloonlab-launch --schema``). Sizes are in MiB (or KiB)
as the user writes them; ``units.py`` turns them into pages, once.

Tables whose keys belong to a part that proto cannot import are open here
and checked by their owner with the same messages: ``[balloon] params``
(the policy's parameters), ``[guest] policy_params``, ``[monitors.NAME]``
(each monitor's config dataclass), ``[sweep]`` (``balloonlab.sweep.spec``),
and the names of registries (``balloon.policy``, ``host.victim``,
``host.request_order``, ``disk.*.profile``, ``guest.policy``); their keys
and names are added to ``--schema`` from the registries
(``balloonlab/editorschema.py``). ``[costs]`` is built from ``CostModel``
in ``proto/costs.py``, so a field added there is a key here. ``[disk.*]``'s
keys are ``hostd/devices.py``'s ``DeviceProfile`` fields, written out here
(proto cannot import hostd; ``tests/test_schema.py`` checks they agree).
"""
from __future__ import annotations

import enum
import inspect
import re
from dataclasses import MISSING, fields as dc_fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, field

from ..clock import TICK_US_DEFAULT
from ..costs import CostModel
from .units import kib_to_pages, mib_to_pages

__all__ = [
    "Table", "ScenarioTable", "HostTable", "BalloonTable", "LockProtocol", "LocksTable", "Region",
    "Workload", "WORKLOAD_KINDS", "GuestTable", "GuestEntry", "CostsTable", "DiskDevice", "DiskTable",
    "Tables", "ScenarioFile", "EditorScenario", "SweepTable", "TOP_TABLES",
]


def F(tp: Any, description: str, **bounds: Any) -> Any:
    """A key's type with its meaning and bounds, for keys built at run time (``[costs]``, ``[disk.*]``)."""
    return Annotated[tp, Meta(description=description, **bounds)]


class Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A scenario table: unknown keys are errors."""


Fraction = Annotated[float, Meta(description="the share of its references that write", ge=0, le=1)]


# --- [scenario] ---------------------------------------------------------------------------

class ScenarioTable(Table):
    name: Annotated[str, Meta(description="the scenario's name (default: the file name)")] | None = None
    description: Annotated[str, Meta(description="one line about the scenario")] = ""
    seed: Annotated[int, Meta(description="seed of every random choice of the run", ge=0)] = 1
    guests: Annotated[int, Meta(description="number of guest processes", ge=1)] = 4
    duration_s: Annotated[float, Meta(description="virtual seconds to run (default 5.0; or ticks)", gt=0)] | None = None
    ticks: Annotated[int, Meta(description="ticks to run (or duration_s)", ge=1)] | None = None
    tick_us: Annotated[int, Meta(description="virtual length of a tick in µs", ge=1)] = TICK_US_DEFAULT
    metrics_every_ticks: Annotated[int, Meta(description="a metrics line per process every N ticks", ge=1)] = 10
    watchdog_s: Annotated[float, Meta(description="wall seconds before a slow tick is reported", gt=0)] = 10.0
    unresponsive_s: Annotated[float, Meta(
        description="wall seconds before silent guests leave the tick barrier", gt=0)] = 30.0
    connect_timeout_s: Annotated[float, Meta(description="wall seconds to wait for every guest's hello", gt=0)] = 120.0
    pace: Annotated[float, Meta(
        description="at most this many virtual seconds per wall second, to watch a run live (0: as fast as it "
                    "runs); the counts do not depend on it", ge=0)] = 0.0
    expect_deadlock: Annotated[bool, Meta(
        description="the run is meant to end on a deadlock (lock-model scenarios)")] = False
    expect_guests_lost: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(
        description="guest ids the run is meant to lose (fault tests)")] = []

    def __post_init__(self) -> None:
        if self.ticks is not None and self.duration_s is not None:
            raise ValueError("give duration_s or ticks, not both")


# --- [host] -------------------------------------------------------------------------------

class HostTable(Table):
    ram_mib: Annotated[float, Meta(description="host RAM in MiB (or overcommit)", gt=0)] | None = None
    overcommit: Annotated[float, Meta(
        description="sum of guest RAM / host RAM, when ram_mib is not given", gt=0)] = 1.25
    swap_mib: Annotated[float, Meta(
        description="host swap in MiB; must hold one swap file per guest (default: twice the guests' RAM)",
        ge=0)] | None = None
    victim: Annotated[str, Meta(description="host swap victim selection: random | clock")] = "random"
    cache_max_mib: Annotated[float, Meta(
        description="the host's virtual-disk page cache in MiB, ONE budget for all guests "
                    "(default: host RAM / 16)", ge=0)] | None = None
    cluster_kib: Annotated[int, Meta(
        description="disk cache cluster in KiB, a multiple of the 4 KiB page", gt=0, multiple_of=4)] = 64
    vdisk_cache: Annotated[Literal["writethrough", "writeback", "none"], Meta(
        description="the host page cache's mode for the virtual disks, QEMU's cache=")] = "writethrough"
    dirty_expire_ms: Annotated[float, Meta(
        description="writeback: the flusher writes pages dirty this long, virtual ms (Linux dirty_expire)",
        ge=0)] = 30_000.0
    dirty_writeback_ms: Annotated[float, Meta(
        description="writeback: the flusher looks every this often, virtual ms (Linux dirty_writeback)",
        gt=0)] = 5_000.0
    dirty_background_pct: Annotated[float, Meta(
        description="writeback: the flusher writes a disk's dirty pages down to this % of its cache share "
                    "(Linux dirty_background_ratio; below dirty_pct)", ge=0, le=100)] = 10.0
    dirty_pct: Annotated[float, Meta(
        description="a writer above this % of its cache share writes its own dirty pages back first "
                    "(Linux dirty_ratio)", gt=0, le=100)] = 20.0
    max_inflight_requests: Annotated[int, Meta(description="disk requests in flight at once", ge=1)] = 32
    memory_states: Annotated[Literal["esx", "none"], Meta(
        description="\"esx\": ESX memory states (high/clear/soft/hard/low) decide when the host balloons and "
                    "swaps; \"none\": a blind refill of the watermark each tick")] = "esx"
    min_free_pct: Annotated[float, Meta(
        description="ESX's minFree as a flat % of host RAM, at most 25 (ESX's is 1-6 %; default: ESX's "
                    "sliding scale; needs memory_states)",
        gt=0, le=25)] | None = None
    victim_scope: Annotated[Literal["vm", "global"], Meta(
        description="tick-end host swap: from the VMs furthest above their allocation targets (vm), "
                    "or blind over the whole host (global)")] = "vm"
    swap_cache: Annotated[bool, Meta(
        description="host swap keeps a swap cache: a page swapped in keeps its slot until written, so "
                    "evicting it again unchanged costs no write (Linux and ESX do); false: every eviction "
                    "writes (the host the seed's two-I/Os-per-clean-page arithmetic assumes)")] = True
    low_watermark_pct: Annotated[float, Meta(
        description="free frames (% of RAM) the in-tick reclaim keeps (default: the low state's threshold "
                    "with memory states, else 1 %)", gt=0, lt=50)] | None = None
    reclaim_batch_pages: Annotated[int, Meta(description="pages reclaimed per step", ge=1)] = 32
    invariant_every_ticks: Annotated[int, Meta(description="the frame invariant every N ticks", ge=1)] = 1
    invariant: Annotated[Literal["sample", "full"], Meta(
        description="the frame invariant each tick: a seeded sample (the full check at the end), "
                    "or the full check every tick (debug)")] = "sample"
    shootdown_timeout_s: Annotated[float, Meta(description="wall seconds a TLB shootdown may take", gt=0)] = 10.0
    uncooperative_ticks: Annotated[int, Meta(
        description="no balloon progress for this long: fall back to host swapping", ge=1)] = 50
    read_chain: Annotated[int, Meta(
        description="file reads a guest may chain onto one DiskRead when they certainly follow it, with the "
                    "EPT faults of the free frames they fill (deterministic order only; 0: one round trip per "
                    "request). The counts do not change",
        ge=0, le=4096)] = 64
    ahead_chain: Annotated[bool, Meta(
        description="a guest parked with a batch to finish may send that batch's first requests with its "
                    "TickDone; the host answers them with the next TickStart when nothing at the boundary "
                    "touched the guest (with read_chain > 0, deterministic order only). The counts do not "
                    "change")] = True
    request_order: Annotated[str, Meta(
        description="the order the host serves requests in: deterministic (default; same seed, same counts) | "
                    "arrival (one global pool; with [locks])")] | None = None
    # Compression and zero pages on the way to host swap (hostd/compress.py: the defaults' sources).
    compression: Annotated[bool, Meta(
        description="ESX memory compression: a page about to be host-swapped that compresses to "
                    "compression_max_bytes or less goes into its VM's compression cache instead")] = False
    compression_cache_pct: Annotated[float, Meta(
        description="the compression cache's cap, % of the VM's memory (ESX Mem.MemZipMaxPct)",
        gt=0, le=100)] = 10.0
    compression_max_bytes: Annotated[int, Meta(
        description="a page is kept compressed only at this size or less (ESX: 2 KiB, half a page)",
        ge=1, le=4096)] = 2048
    zero_page_detection: Annotated[bool, Meta(
        description="a zero page about to be host-swapped is dropped: no slot, no I/O")] = False
    compress_page_us: Annotated[float, Meta(
        description="compressing a page, virtual µs (LZ4 at 780 MB/s)", ge=0)] = 5.3
    decompress_page_us: Annotated[float, Meta(
        description="decompressing a page, virtual µs (LZ4 at 4970 MB/s)", ge=0)] = 0.8
    zero_check_page_us: Annotated[float, Meta(
        description="checking a page for zeros, virtual µs (4 KiB at ~10 GB/s)", ge=0)] = 0.4
    page_sharing: Annotated[bool, Meta(
        description="content-based page sharing, ESX TPS / KVM KSM: a scanner at tick boundaries merges equal "
                    "pages copy-on-write (hostd/sharing.py)")] = False
    share_scan_pages_per_s: Annotated[float, Meta(
        description="page sharing's scan rate, host-wide, pages per virtual second (KSM's default: 100 pages "
                    "every 20 ms); needs page_sharing", gt=0)] | None = None

    def __post_init__(self) -> None:
        if self.dirty_background_pct >= self.dirty_pct:
            raise ValueError(f"dirty_background_pct: {self.dirty_background_pct} must be below dirty_pct = "
                             f"{self.dirty_pct} (the flusher starts before writers are throttled)")
        if self.memory_states == "none" and self.min_free_pct is not None:
            raise ValueError("min_free_pct: has no effect with memory_states = \"none\"")
        if self.share_scan_pages_per_s is not None and not self.page_sharing:
            raise ValueError("share_scan_pages_per_s: has no effect without page_sharing = true")

    @property
    def ram_pages(self) -> int | None:
        return None if self.ram_mib is None else mib_to_pages(self.ram_mib)

    @property
    def swap_pages(self) -> int | None:
        return None if self.swap_mib is None else mib_to_pages(self.swap_mib)

    @property
    def cache_max_pages(self) -> int | None:
        return None if self.cache_max_mib is None else mib_to_pages(self.cache_max_mib)

    @property
    def cluster_pages(self) -> int:
        return kib_to_pages(self.cluster_kib)


# --- [balloon] ----------------------------------------------------------------------------

class BalloonTable(Table):
    policy: Annotated[str, Meta(
        description="none | static | proportional | mom | working-set | aggressive | sweep | squeezed | hyperv | "
                    "senpai, or file.py:Class")] = "none"
    params: Annotated[dict[str, Any], Meta(description="the policy's parameters (docs/policies.md)")] = {}
    max_percent: Annotated[float, Meta(
        description="a balloon never exceeds this share of guest RAM", ge=0, le=100)] = 65.0
    log_decisions: Annotated[Literal["changes", "all"], Meta(
        description="balloon_decision events: on changes of reason, or all")] = "changes"


# --- [locks] ------------------------------------------------------------------------------

class LockProtocol(str, enum.Enum):
    NAIVE = "naive"
    ORDERED = "ordered"
    NO_CALLBACK = "no-callback-under-lock"


class LocksTable(Table):
    """Without a ``protocol`` there is no lock model (no locks, no events)."""

    protocol: Annotated[LockProtocol, Meta(description="the cross-process lock protocol")] | None = None
    break_deadlocks: Annotated[bool, Meta(
        description="fail one request of each cycle (DEADLOCK_BROKEN) instead of ending the run")] = False
    hold_vmem: Annotated[Literal["batch", "tick"], Meta(
        description="the vCPU holds L_vmem per batch of references, or a whole tick")] \
        = "batch"
    reclaim_free_pct: Annotated[float, Meta(
        description="the host's reclaim task runs in a tick when free frames < this % (0: never)",
                        ge=0, lt=50)] = 0.0
    check_interval_s: Annotated[float, Meta(
        description="wall seconds between sweeps of the wait-for graph", gt=0, le=10)] = 0.2

    @property
    def enabled(self) -> bool:
        return self.protocol is not None


# --- [guest]: regions and workloads -----------------------------------------------------------

class Region(Table):
    name: Annotated[str, Meta(description="the region's name, for workloads")]
    kind: Annotated[Literal["file", "anon"], Meta(
        description="a file on the virtual disk (page cache) or anonymous memory")]
    mib: Annotated[float, Meta(description="size in MiB (or pages)", gt=0)] | None = None
    pages: Annotated[int, Meta(description="size in 4 KiB pages (or mib)", ge=1)] | None = None
    image: Annotated[str, Meta(
        description="version 0 of its pages is this image's: the same bytes in every guest booted from it "
                    "(file regions only; proto/content.py)", min_length=1)] | None = None
    image_offset: Annotated[int, Meta(description="the region starts at this page of its image", ge=0)] = 0
    zero_writes: Annotated[bool, Meta(description="written with zeros: its pages stay zero pages")] = False
    compress: Annotated[Literal["text", "mixed", "random"] | Annotated[list[Annotated[float, Meta(gt=0, le=1)]], Meta(
        min_length=2, max_length=2)], Meta(
        description="what is left of a page after compression: a preset or [lo, hi] fractions")] = "mixed"

    def __post_init__(self) -> None:
        if (self.mib is None) == (self.pages is None):
            raise ValueError("give mib or pages, not both" if self.mib is not None else "give mib or pages")
        if self.page_count < 1:
            raise ValueError(f"mib: {self.mib} MiB is less than half a page")
        if self.image is not None and self.kind != "file":
            raise ValueError(f"image: {self.image!r} needs kind = \"file\" (image content reaches memory through "
                             "the page cache; an anonymous page never written is the zero page)")
        if self.image_offset and self.image is None:
            raise ValueError(f"image_offset: {self.image_offset} without an image")
        if isinstance(self.compress, list) and self.compress[0] > self.compress[1]:
            raise ValueError(f"compress: [lo, hi] needs lo <= hi, got {self.compress}")

    @property
    def page_count(self) -> int:
        return self.pages if self.pages is not None else mib_to_pages(self.mib)


class _Workload(Table, tag_field="kind"):
    region: Annotated[str, Meta(description="the region it references")]
    weight: Annotated[float, Meta(description="its share of the guest's references among the workloads", gt=0)] = 1.0
    overwrite_frac: Annotated[float, Meta(
        description="the share of its writes that store the whole page (a swapped-out page then needs no "
                    "swap-in)", ge=0, le=1)] = 0.0


class DbWorkload(_Workload, tag="db"):
    """A database file read with a zipf-skewed hot set."""

    theta: Annotated[float, Meta(description="zipf skew: rank r has weight r**-theta", ge=0)] = 0.99
    write_frac: Fraction = 0.02


class ZipfWorkload(_Workload, tag="zipf"):
    """Zipf-skewed references over any region."""

    theta: Annotated[float, Meta(description="zipf skew: rank r has weight r**-theta", ge=0)] = 0.99
    write_frac: Fraction = 0.0


class AnonColdWorkload(_Workload, tag="anon-cold"):
    """Every page written once, in order, then idle."""


class AnonHotWorkload(_Workload, tag="anon-hot"):
    """Uniform references over a working set of ws_pages (default: the whole region)."""

    ws_pages: Annotated[int, Meta(description="working set in pages (the region's first ones)", ge=1)] | None = None
    write_frac: Fraction = 0.3


class ScanWorkload(_Workload, tag="scan"):
    """A sequential read of the region, each page once per pass."""

    loop: Annotated[bool, Meta(description="repeat the pass forever")] = True


class PhasesWorkload(_Workload, tag="phases"):
    """A working set of ws_pages that moves by shift_pages every phase_refs references."""

    ws_pages: Annotated[int, Meta(
        description="working set in pages (default: a quarter of the region)", ge=1)] | None = None
    phase_refs: Annotated[int, Meta(description="references per phase", ge=1)] = 100_000
    shift_pages: Annotated[int, Meta(
        description="how far the window moves each phase (default ws_pages)", ge=0)] | None = None
    write_frac: Fraction = 0.2


class BurstWorkload(_Workload, tag="burst"):
    """Allocate the (anonymous) region, use it for hold_refs, free it, stay away idle_refs; again."""

    hold_refs: Annotated[int, Meta(description="references over the region between allocating and freeing it",
                                   ge=0)] = 100_000
    idle_refs: Annotated[int, Meta(description="references it sits out after freeing it", ge=0)] = 100_000
    cycles: Annotated[int, Meta(description="how many times (0: for ever)", ge=0)] = 0
    delay_refs: Annotated[int, Meta(description="references it sits out before the first cycle", ge=0)] = 0
    write_frac: Fraction = 0.3


class TraceWorkload(_Workload, tag="trace"):
    """A recorded trace replayed in order: a file (path) or a shipped recording (program)."""

    path: Annotated[str, Meta(description="a trace file (.npz or text; relative to the scenario file)")] | None = None
    program: Annotated[str, Meta(description="a shipped recording: balloonlab-trace list")] | None = None
    loop: Annotated[bool, Meta(description="replay it again at its end")] = False

    def __post_init__(self) -> None:
        if (self.path is None) == (self.program is None):
            raise ValueError("give path or program, not both" if self.path is not None else
                             "give path (a trace file) or program (a shipped recording)")


Workload = Union[DbWorkload, ZipfWorkload, AnonColdWorkload, AnonHotWorkload, ScanWorkload, PhasesWorkload,
                 TraceWorkload, BurstWorkload]
WORKLOAD_KINDS: dict[str, type] = {c.__struct_config__.tag: c for c in Workload.__args__}


def _default_regions() -> list[Region]:
    return [Region(name="heap", kind="anon", mib=16)]


class GuestTable(Table):
    """One guest: ``[guest]`` merged with its ``[[guests]]`` entries."""

    ram_mib: Annotated[float, Meta(description="guest RAM in MiB", gt=0)] = 64.0
    kernel_mib: Annotated[float, Meta(description="the kernel's own memory in MiB (never reclaimed)", ge=0)] = 1.0
    swap_mib: Annotated[float, Meta(
        description="guest swap in MiB (default: one slot per anonymous page)", ge=0)] | None = None
    policy: Annotated[str, Meta(
        description="replacement policy: esc | clock | lru | fifo | car | ... or file.py:Class")] = "esc"
    policy_params: Annotated[dict[str, Any], Meta(description="the replacement policy's parameters")] = {}
    regions: Annotated[list[Region], Meta(description="the workload's memory: files and anonymous regions")] = field(
        default_factory=_default_regions)
    workload: Annotated[list[Workload], Meta(
        description="what the guest references (default: anon-hot over the first region)",
                min_length=1)] | None = None
    batch_refs: Annotated[int, Meta(description="references per vCPU batch", ge=1)] = 8192
    shares: Annotated[int, Meta(description="proportional-share weight for the host's controllers", ge=1)] = 1000
    dirty_background_ratio: Annotated[float, Meta(
        description="% of the guest's memory: the background flusher writes dirty page cache back above it "
                    "(Linux vm.dirty_background_ratio; 0: off)", ge=0, le=100)] = 0.0
    watermark_scale_factor: Annotated[int, Meta(
        description="kswapd reclaims ahead of demand between Linux's low and high watermarks, this far apart in "
                    "1/10,000 of memory (Linux vm.watermark_scale_factor, 10 there; 0: off; policies clock, "
                    "clock-r0, esc, fifo, lru)", ge=0, le=3000)] = 0
    read_ahead_kb: Annotated[int, Meta(
        description="readahead of sequential file reads, windows up to this many KiB, a multiple of 4 "
                    "(Linux read_ahead_kb, 128 there; 0: off)", ge=0, le=16384)] = 0
    ws_period_us: Annotated[float, Meta(
        description="working-set sample and PFF period, virtual µs (default: the kernel's)", gt=0)] \
        | None = None
    ws_sample_pages: Annotated[int, Meta(
        description="resident pages sampled per period (default: the kernel's)", ge=0)] | None = None
    pff_alpha: Annotated[float, Meta(
        description="EWMA weight of the newest period in pff (default: the kernel's)", gt=0, le=1)] | None = None
    fault_around_pages: Annotated[int, Meta(
        description="EPT fault-around window (default: the kernel's)", ge=1)] | None = None
    free_page_reporting: Annotated[bool, Meta(
        description="virtio-balloon free page reporting: free blocks go back to the host (guestd/reporting.py)")] \
        = False
    report_delay_ms: Annotated[float, Meta(
        description="a block is reported once it has stayed free this long, virtual ms "
                    "(Linux PAGE_REPORTING_DELAY)", gt=0)] = 2000.0
    report_order_pages: Annotated[int, Meta(
        description="reported blocks: aligned runs of this many free frames, a power of two "
                    "(pageblock_order: 512 = 2 MiB)", ge=1)] = 512

    @property
    def ram_pages(self) -> int:
        return mib_to_pages(self.ram_mib)

    @property
    def kernel_pages(self) -> int:
        return mib_to_pages(self.kernel_mib)

    @property
    def swap_pages(self) -> int | None:
        return None if self.swap_mib is None else mib_to_pages(self.swap_mib)

    @property
    def workloads(self) -> list[Any]:
        """The workload, or its default: anon-hot over the first region."""
        if self.workload is not None:
            return list(self.workload)
        return [AnonHotWorkload(region=self.regions[0].name)]

    def check(self) -> None:
        """What one key cannot say alone; raises ValueError with the key's relative path."""
        if self.report_order_pages & (self.report_order_pages - 1):
            raise ValueError(f"report_order_pages: {self.report_order_pages} is not a power of two (a buddy block)")
        if self.kernel_pages >= self.ram_pages:
            raise ValueError(f"kernel_mib: {self.kernel_mib} MiB leaves no memory of ram_mib = {self.ram_mib}")
        if self.read_ahead_kb % 4:
            raise ValueError(f"read_ahead_kb: {self.read_ahead_kb} is not a whole number of 4 KiB pages")
        if not self.regions:
            raise ValueError("regions: needs at least one region")
        names = [r.name for r in self.regions]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"regions[{i}].name: {name!r} is given twice")
        for i, w in enumerate(self.workload or ()):
            if w.region not in names:
                from .errors import unknown_name
                raise ValueError(f"workload[{i}].region: {unknown_name('region', w.region, names)}")


class GuestEntry(GuestTable):
    """A ``[[guests]]`` entry: some of a guest's keys, for the guests it names."""

    id: Annotated[int, Meta(description="the guest this entry is for", ge=0)] | None = None
    ids: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(description="the guests this entry is for")] | None = None

    def __post_init__(self) -> None:
        if (self.id is None) == (self.ids is None):
            raise ValueError("give `id = N` or `ids = [..]`, not both" if self.id is not None else
                             "needs `id = N` or `ids = [..]`")


# --- [costs] and [disk.*]: from proto/costs.py's dataclasses ----------------------------------

def field_comments(dc: type) -> dict[str, str]:
    """A dataclass's comments as its keys' meanings.

    ``name: float = 1.0   # what it is``, or the comment lines just above the
    field (their first sentence: the rest gives sources and numbers).
    """
    try:   # the class's block of its module's text (inspect.getsource parses the whole module: 20 ms a process)
        text = Path(inspect.getfile(dc)).read_text()
    except (OSError, TypeError):
        return {}
    start = text.find(f"\nclass {dc.__name__}")
    if start < 0:
        return {}
    end = text.find("\nclass ", start + 1)
    block = text[start:end if end > 0 else len(text)]
    out: dict[str, str] = {}
    above: list[str] = []
    for line in block.splitlines():
        comment = re.match(r"^    #\s?(.*)$", line)
        if comment:
            above.append(comment[1].strip())
            continue
        m = re.match(r"^    (\w+):[^#\n]*?(?:#\s*(.*))?$", line)
        if m and (m[2] or above):
            out[m[1]] = (m[2] or "").strip() or _first_sentence(" ".join(above))
        above = []
    return out


def _first_sentence(text: str) -> str:
    """Up to the first ': ' or '. ' (the rest of a field's comment is its numbers and sources)."""
    cut = min((i for i in (text.find(": "), text.find(". ")) if i > 0), default=len(text))
    text = text[:cut].rstrip(".")
    return text[:1].lower() + text[1:]


def _from_dataclass(name: str, dc: type, *, defaults: bool, base: type = Table,
                    extra: list[tuple[str, Any, Any]] = (), positive: tuple[str, ...] = ()) -> type:
    """A table struct with one key per field of ``dc``: numbers >= 0 (counts >= 1), described by their comments."""
    out = list(extra)
    said = field_comments(dc)
    for f in dc_fields(dc):
        kind = f.type if isinstance(f.type, type) else {"float": float, "int": int, "bool": bool}.get(str(f.type))
        if kind is int:
            tp = F(int, said.get(f.name, f.name), ge=1)
        elif kind is bool:
            tp = F(bool, said.get(f.name, f.name))
        else:
            tp = F(float, said.get(f.name, f.name), **({"gt": 0} if f.name in positive else {"ge": 0}))
        if defaults and f.default is not MISSING:
            out.append((f.name, tp, f.default))
        else:
            out.append((f.name, tp | None, None))
    return msgspec.defstruct(name, out, bases=(base,), module=__name__)


CostsTable = _from_dataclass("CostsTable", CostModel, defaults=True)


class DiskDevice(Table):
    """A ``[disk.vdisk]`` or ``[disk.swap]`` table: a profile, then any of its fields to override.

    The profiles and the device model are the host's (``hostd/devices.py``:
    ``DEVICE_PROFILES``, ``DeviceProfile``); it checks the profile's name.
    Left out, a field is the profile's.
    """

    profile: Annotated[str, Meta(description="nvme | ssd | hdd, then any field to override")] = "ssd"
    read_latency_us: Annotated[float, Meta(description="service time of one read request, virtual µs", ge=0)] \
        | None = None
    write_latency_us: Annotated[float, Meta(description="service time of one write request, virtual µs", ge=0)] \
        | None = None
    read_bandwidth_bps: Annotated[float, Meta(
        description="bytes read per virtual second once a request is served", gt=0)] | None = None
    write_bandwidth_bps: Annotated[float, Meta(
        description="bytes written per virtual second once a request is served", gt=0)] | None = None
    queue_depth: Annotated[int, Meta(description="requests served in parallel", ge=1)] | None = None
    read_seek_us: Annotated[float, Meta(
        description="a read that does not continue its lane's last request pays this first (seek + rotation)",
        ge=0)] | None = None
    write_seek_us: Annotated[float, Meta(description="the same for a write", ge=0)] | None = None
    latency_us: Annotated[float, Meta(
        description="read_latency_us and write_latency_us at once", ge=0)] | None = None
    bandwidth_bps: Annotated[float, Meta(
        description="read_bandwidth_bps and write_bandwidth_bps at once", gt=0)] | None = None


class DiskTable(Table):
    shared: Annotated[bool, Meta(
        description="every virtual disk and the host swap files on ONE device ([disk.vdisk]'s profile; "
                    "[disk.swap] is then refused)")] = False
    vdisk: Annotated[DiskDevice, Meta(
        description="the guests' virtual disks (each its own device unless shared)")] | None = None
    swap: Annotated[DiskDevice, Meta(
        description="the host's swap device (the swap files of all guests, one lane each)")] | None = None

    def __post_init__(self) -> None:
        if self.shared and self.swap is not None:
            raise ValueError("swap: with shared = true the host swap files are on the one shared device, whose "
                             "profile is [disk.vdisk]'s; drop [disk.swap] or set shared = false")


# --- the whole file ---------------------------------------------------------------------------

class Tables(Table):
    """One variant's tables, merged (or a variant's own, as written)."""

    scenario: ScenarioTable = field(default_factory=ScenarioTable)
    host: HostTable = field(default_factory=HostTable)
    guest: Annotated[GuestTable, Meta(description="defaults for every guest")] = field(default_factory=GuestTable)
    guests: Annotated[list[GuestEntry], Meta(description="per-guest overrides")] = []
    balloon: BalloonTable = field(default_factory=BalloonTable)
    costs: Annotated[CostsTable, Meta(
        description="virtual-time costs (proto/costs.py)")] = field(default_factory=CostsTable)
    disk: DiskTable = field(default_factory=DiskTable)
    locks: LocksTable = field(default_factory=LocksTable)
    monitors: Annotated[dict[str, Any], Meta(
        description="one table per host monitor: swap_storm, pinning, double_faults, convergence, ... "
                                "(each checked by its monitor)")] = {}


class SweepTable(Table):
    grid: Annotated[dict[str, list[Any]], Meta(
        description="dotted key -> values, e.g. {\"host.overcommit\" = [1.2, 1.5]}")] = {}
    seeds: Annotated[Union[int, list[int]], Meta(description="how many seeds (1..N), or the list")] = 1
    metrics: Annotated[list[str], Meta(description="headline metrics to summarise and plot")] | None = None
    x: Annotated[str, Meta(description="the grid axis on the plots' x axis")] | None = None


class ScenarioFile(Tables):
    """The file as written: variants are checked one by one, the sweep by ``balloonlab.sweep``.

    (A dict of tables is decoded key by key, not as ``dict[str, Table]``: msgspec's error path would not name the key.)
    """

    variants: Annotated[dict[str, Any], Meta(description="each deep-merged over the tables above")] = {}
    sweep: Annotated[dict[str, Any], Meta(description="balloonlab-sweep's grid and seeds")] = {}


class EditorScenario(Tables):
    """What ``balloonlab-launch --schema`` describes: the file, with variants and sweep typed."""

    variants: Annotated[dict[str, Tables], Meta(description="each deep-merged over the tables above")] = {}
    sweep: SweepTable = field(default_factory=SweepTable)
    monitors: Annotated[dict[str, dict[str, Any]], Meta(
        description="one table per host monitor: swap_storm, pinning, double_faults, "
                                           "convergence, ...")] = {}


TOP_TABLES = tuple(f.encode_name for f in msgspec.structs.fields(ScenarioFile))

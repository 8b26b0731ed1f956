"""Workload generators: seeded numpy batches of ``(vpages uint64, writes bool)``.

Each generator covers one region of the ``Layout`` (its pages are
``start .. start+pages-1``) and draws from its own ``np.random.Generator``.
``next_batch(n)`` returns up to ``n`` references; fewer (possibly none) once a
finite workload is ``exhausted``. ``Mix`` composes several per guest.

Kinds (``WORKLOADS``):

- ``db``: a database file read with a zipf-skewed hot set (the hot page
  cache): rank r (1-based) has weight r**-theta, ranks scattered over the
  file by a fixed permutation; a fraction ``write_frac`` are writes.
- ``zipf``: the same skew over any region (anonymous or file).
- ``anon-cold``: every page written once, in order, then idle (exhausted).
- ``anon-hot``: uniform references over a working set of ``ws_pages``
  pages (the first ones of the region), ``write_frac`` writes.
- ``scan``: a sequential read of the region, each page used once per pass;
  ``loop`` repeats the pass forever, else it is exhausted after one.
- ``phases``: uniform over a window of ``ws_pages`` that moves by
  ``shift_pages`` (wrapping) every ``phase_refs`` references.
- ``trace``: a recorded trace replayed in order (``loop`` to repeat); its
  distinct pages are mapped densely onto the region.
- ``burst``: after ``delay_refs`` references away (it yields none then),
  allocate the (anonymous) region, writing each page once in order; use it for ``hold_refs`` references (uniform, ``write_frac``
  writes); free it all (``take_frees``: the vCPU hands the pages to
  ``GuestKernel.discard`` once the references before the free are done);
  stay away for ``idle_refs`` references (it yields none then); repeat,
  ``cycles`` times (0: for ever).

A generator that frees memory has ``take_frees() -> pages or None``: the
pages freed at the end of the batch it just returned (its batch stops at
the free, so no reference after it is in that batch).

Any spec may add ``overwrite_frac``: that fraction of its writes store the
whole page (a memset, a page-sized copy), drawn from a generator of its
own (``FullWrites``), so the references themselves do not change. Such a
batch's ``writes`` is then ``uint8`` write codes: ``READ`` 0, ``WRITE`` 1,
``FULL_WRITE`` 2 (any non-zero code is a write).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import GuestConfigError
from .cdf import CdfTable

try:    # the per-reference steps of a batch in one pass each (guestd/_paging.c); numpy's below otherwise
    from .. import _paging
    _mix_pick = _paging.mix_pick
    _mix_gather = _paging.mix_gather
    _zipf_pages = _paging.zipf_pages
    _mix_draw = _paging.mix_draw
except (ImportError, AttributeError):  # pragma: no cover - the install builds it
    _mix_pick = _mix_gather = _zipf_pages = _mix_draw = None

_DRAW_ZIPF, _DRAW_UNIFORM = 0, 1      # the kinds of component ``_paging.mix_draw`` draws itself
_U32_RANGE = 0xFFFF_FFFF              # it draws integers from ranges narrower than this

__all__ = [
    "Workload", "DbWorkload", "ZipfWorkload", "AnonColdWorkload", "AnonHotWorkload",
    "ScanWorkload", "PhasesWorkload", "TraceWorkload", "BurstWorkload", "Mix", "WORKLOADS", "take_frees", "FullWrites", "FULL_WRITE",
    "draws_as_numpy",
]

FULL_WRITE = 2      # write code: the write stores every byte of the page (its old content is not needed)

_EMPTY = (np.zeros(0, np.uint64), np.zeros(0, bool))
_U64 = np.dtype(np.uint64)


@runtime_checkable
class Workload(Protocol):
    name: str
    exhausted: bool

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]: ...


def _check_frac(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise GuestConfigError(f"{name}: write_frac must be in [0, 1], got {value}")
    return float(value)


class _Region:
    """Common fields: the region's first vpage, its size, the generator."""

    name = "region"

    def __init__(self, start: int, pages: int, rng: np.random.Generator) -> None:
        if pages < 1:
            raise GuestConfigError(f"{self.name}: region must have >= 1 page, got {pages}")
        self.start = int(start)
        self.pages = int(pages)
        self.rng = rng
        self.exhausted = False

    def _writes(self, n: int, frac: float) -> np.ndarray:
        if frac <= 0.0:
            return np.zeros(n, bool)
        return self.rng.random(n) < frac


class ZipfWorkload(_Region):
    name = "zipf"

    def __init__(self, start: int, pages: int, rng: np.random.Generator, theta: float = 0.99,
                 write_frac: float = 0.0) -> None:
        super().__init__(start, pages, rng)
        if theta < 0:
            raise GuestConfigError(f"{self.name}: theta must be >= 0, got {theta}")
        self.theta = float(theta)
        self.write_frac = _check_frac(self.name, write_frac)
        w = np.arange(1, pages + 1, dtype=np.float64) ** -self.theta
        self._cdf = np.cumsum(w / w.sum())
        self._cdf[-1] = 1.0
        self._rank_of = CdfTable(self._cdf)     # searchsorted(_cdf, u, side="right"), sooner
        # the hottest ranks land anywhere in the file, not at its start
        self._page_of_rank = (self.start + rng.permutation(pages)).astype(np.uint64)
        self.compiled = True      # False: numpy's path (the tests hold the two equal)

    def draw_spec(self) -> tuple | None:
        """What ``_paging.mix_draw`` needs to draw this component's batch as ``next_batch`` does (None: it cannot)."""
        if not self.compiled:
            return None
        t = self._rank_of
        return (_DRAW_ZIPF, self.rng.bit_generator.capsule, t._answer, t.cdf, self._page_of_rank, self.write_frac)

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        u = self.rng.random(n)
        if _zipf_pages is not None and self.compiled:
            t = self._rank_of
            pages = np.empty(n, np.uint64)
            _zipf_pages(u, t._answer, t.cdf, self._page_of_rank, pages)
            return pages, self._writes(n, self.write_frac)
        ranks = self._rank_of(u)
        np.minimum(ranks, self.pages - 1, out=ranks)
        return self._page_of_rank[ranks], self._writes(n, self.write_frac)


class DbWorkload(ZipfWorkload):
    """A database file: zipf-skewed reads (and a few writes) of its pages."""

    name = "db"

    def __init__(self, start: int, pages: int, rng: np.random.Generator, theta: float = 0.99,
                 write_frac: float = 0.02) -> None:
        super().__init__(start, pages, rng, theta=theta, write_frac=write_frac)


class AnonColdWorkload(_Region):
    """Allocated and touched (written) once, in order, then idle."""

    name = "anon-cold"

    def __init__(self, start: int, pages: int, rng: np.random.Generator) -> None:
        super().__init__(start, pages, rng)
        self._next = 0

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(n, self.pages - self._next)
        if k <= 0:
            self.exhausted = True
            return _EMPTY
        p = np.arange(self.start + self._next, self.start + self._next + k, dtype=np.uint64)
        self._next += k
        self.exhausted = self._next >= self.pages
        return p, np.ones(k, bool)


class AnonHotWorkload(_Region):
    """An anonymous working set referenced uniformly."""

    name = "anon-hot"

    def __init__(self, start: int, pages: int, rng: np.random.Generator, ws_pages: int | None = None,
                 write_frac: float = 0.3) -> None:
        super().__init__(start, pages, rng)
        self.ws_pages = pages if ws_pages is None else int(ws_pages)
        if not 1 <= self.ws_pages <= pages:
            raise GuestConfigError(f"{self.name}: ws_pages must be in 1..{pages}, got {ws_pages}")
        self.write_frac = _check_frac(self.name, write_frac)

    def draw_spec(self) -> tuple | None:
        """What ``_paging.mix_draw`` needs to draw this component's batch as ``next_batch`` does (None: it cannot)."""
        if self.ws_pages - 1 >= _U32_RANGE:
            return None
        return (_DRAW_UNIFORM, self.rng.bit_generator.capsule, self.start, self.ws_pages, self.write_frac)

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        # integers(start, start + ws) draws exactly what start + integers(0, ws) does (numpy bounds the
        # draw by the range's width, then adds the low end), without the two passes for + and the cast
        p = self.rng.integers(self.start, self.start + self.ws_pages, n).view(np.uint64)
        return p, self._writes(n, self.write_frac)


class ScanWorkload(_Region):
    """A sequential read of the region, every page used once per pass."""

    name = "scan"

    def __init__(self, start: int, pages: int, rng: np.random.Generator, loop: bool = True) -> None:
        super().__init__(start, pages, rng)
        self.loop = bool(loop)
        self._pos = 0

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.exhausted:
            return _EMPTY
        if not self.loop:
            n = min(n, self.pages - self._pos)
        idx = (self._pos + np.arange(n)) % self.pages
        self._pos += n
        if not self.loop and self._pos >= self.pages:
            self.exhausted = True
        return (self.start + idx).astype(np.uint64), np.zeros(n, bool)


class PhasesWorkload(_Region):
    """A working set that moves: uniform over a window that shifts every ``phase_refs`` references."""

    name = "phases"

    def __init__(self, start: int, pages: int, rng: np.random.Generator, ws_pages: int | None = None,
                 phase_refs: int = 100_000, shift_pages: int | None = None, write_frac: float = 0.2) -> None:
        super().__init__(start, pages, rng)
        self.ws_pages = max(1, pages // 4) if ws_pages is None else int(ws_pages)
        if not 1 <= self.ws_pages <= pages:
            raise GuestConfigError(f"{self.name}: ws_pages must be in 1..{pages}, got {ws_pages}")
        if phase_refs < 1:
            raise GuestConfigError(f"{self.name}: phase_refs must be >= 1, got {phase_refs}")
        self.phase_refs = int(phase_refs)
        self.shift_pages = self.ws_pages if shift_pages is None else int(shift_pages)
        self.write_frac = _check_frac(self.name, write_frac)
        self._done = 0     # references generated so far

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        refno = self._done + np.arange(n)
        offset = (refno // self.phase_refs) * self.shift_pages
        idx = (offset + self.rng.integers(0, self.ws_pages, n)) % self.pages
        self._done += n
        return (self.start + idx).astype(np.uint64), self._writes(n, self.write_frac)


class TraceWorkload(_Region):
    """A recorded trace, its distinct pages mapped densely (in page order) onto the region."""

    name = "trace"

    def __init__(self, start: int, pages: int, rng: np.random.Generator, trace_pages: np.ndarray | None = None,
                 trace_writes: np.ndarray | None = None, loop: bool = False) -> None:
        super().__init__(start, pages, rng)
        if trace_pages is None:
            raise GuestConfigError(f"{self.name}: needs trace_pages (or a 'path' in the spec)")
        uniq, dense = np.unique(np.asarray(trace_pages, np.uint64), return_inverse=True)
        if uniq.size > pages:
            raise GuestConfigError(f"{self.name}: trace has {uniq.size} distinct pages, region only {pages}")
        self._pages = (self.start + dense).astype(np.uint64)
        self._writes_arr = (np.zeros(self._pages.size, bool) if trace_writes is None
                            else np.asarray(trace_writes, bool))
        self.loop = bool(loop)
        self._pos = 0
        self.exhausted = self._pages.size == 0

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.exhausted:
            return _EMPTY
        total = self._pages.size
        if self.loop:
            idx = (self._pos + np.arange(n)) % total
            self._pos = (self._pos + n) % total
            return self._pages[idx], self._writes_arr[idx]
        end = min(total, self._pos + n)
        p, w = self._pages[self._pos:end], self._writes_arr[self._pos:end]
        self._pos = end
        self.exhausted = end >= total
        return p, w


class BurstWorkload(_Region):
    """Allocate the region, use it, free it, stay away; again (see the module docstring)."""

    name = "burst"
    _ALLOC, _HOLD, _FREE, _IDLE = range(4)

    def __init__(self, start: int, pages: int, rng: np.random.Generator, hold_refs: int = 100_000,
                 idle_refs: int = 100_000, cycles: int = 0, write_frac: float = 0.3, delay_refs: int = 0) -> None:
        super().__init__(start, pages, rng)
        for key, v in (("hold_refs", hold_refs), ("idle_refs", idle_refs), ("cycles", cycles),
                       ("delay_refs", delay_refs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise GuestConfigError(f"{self.name}: {key} must be an integer >= 0, got {v!r}")
        self.hold_refs, self.idle_refs, self.cycles = int(hold_refs), int(idle_refs), int(cycles)
        self.write_frac = _check_frac(self.name, write_frac)
        self._phase = self._ALLOC
        self._pos = 0
        self._delay_left = int(delay_refs)
        self._cycle = 0
        self._frees: np.ndarray | None = None
        self.frees = 0              # free events so far

    def take_frees(self) -> np.ndarray | None:
        f, self._frees = self._frees, None
        return f

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pages: list[np.ndarray] = []
        writes: list[np.ndarray] = []
        left = int(n)
        if self._delay_left:
            k = min(left, self._delay_left)
            self._delay_left -= k
            left -= k
        while left > 0 and not self.exhausted and self._frees is None:
            if self._phase == self._ALLOC:
                k = min(left, self.pages - self._pos)
                pages.append(np.arange(self.start + self._pos, self.start + self._pos + k, dtype=np.uint64))
                writes.append(np.ones(k, bool))
                self._pos += k
                if self._pos >= self.pages:
                    self._phase, self._pos = self._HOLD, 0
            elif self._phase == self._HOLD:
                k = min(left, self.hold_refs - self._pos)
                pages.append((self.start + self.rng.integers(0, self.pages, k)).astype(np.uint64))
                writes.append(self._writes(k, self.write_frac))
                self._pos += k
                if self._pos >= self.hold_refs:
                    self._phase, self._pos = self._FREE, 0
            elif self._phase == self._FREE:
                self._frees = np.arange(self.start, self.start + self.pages, dtype=np.uint64)
                self.frees += 1
                self._phase, self._pos = self._IDLE, 0
                break
            else:
                k = min(left, self.idle_refs - self._pos)
                self._pos += k
                if self._pos >= self.idle_refs:
                    self._cycle += 1
                    self._phase, self._pos = self._ALLOC, 0
                    self.exhausted = self.cycles > 0 and self._cycle >= self.cycles
                # idle references are asked for and not made: the other components' time passes
            left -= k
        if not pages:
            return _EMPTY
        return np.concatenate(pages), np.concatenate(writes)


def take_frees(workload: Workload) -> np.ndarray | None:
    """The pages the workload freed at the end of its last batch (None: none)."""
    take = getattr(workload, "take_frees", None)
    return take() if take is not None else None


class FullWrites:
    """A workload whose writes overwrite the whole page with probability ``overwrite_frac``."""

    def __init__(self, inner: Workload, overwrite_frac: float, rng: np.random.Generator) -> None:
        if isinstance(overwrite_frac, bool) or not isinstance(overwrite_frac, (int, float)) \
                or not 0.0 <= overwrite_frac <= 1.0:
            raise GuestConfigError(f"{inner.name}: overwrite_frac must be in [0, 1], got {overwrite_frac!r}")
        self.inner = inner
        self.name = inner.name
        self.overwrite_frac = float(overwrite_frac)
        self.rng = rng

    @property
    def exhausted(self) -> bool:
        return self.inner.exhausted

    def take_frees(self) -> np.ndarray | None:
        return take_frees(self.inner)

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        p, w = self.inner.next_batch(n)
        codes = np.asarray(w, bool).astype(np.uint8)
        wi = np.flatnonzero(codes)
        codes[wi[self.rng.random(wi.size) < self.overwrite_frac]] = FULL_WRITE
        return p, codes


class Mix:
    """Several workloads of one guest, interleaved reference by reference with fixed weights.

    Each reference picks a component with probability proportional to its
    weight among those not exhausted; a component that runs dry mid-batch
    just yields fewer references.
    """

    name = "mix"

    def __init__(self, components: list[Workload], weights: list[float], rng: np.random.Generator) -> None:
        if len(components) != len(weights) or not components:
            raise GuestConfigError("mix: need one weight per component and at least one component")
        if any(w <= 0 for w in weights):
            raise GuestConfigError(f"mix: weights must be > 0, got {weights}")
        self.components = list(components)
        self.weights = [float(w) for w in weights]
        self.rng = rng
        self._codes = any(isinstance(c, FullWrites) for c in self.components)   # write codes, not bools
        self._wdtype = np.dtype(np.uint8 if self._codes else bool)
        self.compiled = True      # False: numpy's path (the tests hold the two equal)
        self._active: list[int] = []
        self._cdf = np.ones(1)
        self._freeing = [c for c in self.components if hasattr(c, "take_frees")]   # those that free memory
        self._specs_for: list[int] | None = None     # the active components _specs was made for
        self._specs: tuple | None = None             # their draw specs for mix_draw (None: numpy's path)

    def _pick_cdf(self, active: list[int]) -> np.ndarray:
        """The cumulative weights of ``active``, computed as ``Generator.choice(p=...)`` does, once per
        set of active components (it changes only when one runs dry)."""
        if active != self._active:
            w = np.array([self.weights[i] for i in active])
            cdf = (w / w.sum()).cumsum()
            cdf /= cdf[-1]
            self._active, self._cdf = active, cdf
        return self._cdf

    @property
    def exhausted(self) -> bool:
        return all(c.exhausted for c in self.components)

    def take_frees(self) -> np.ndarray | None:
        if not self._freeing:       # (asked after every batch)
            return None
        got = [f for f in (take_frees(c) for c in self._freeing) if f is not None]
        return np.concatenate(got) if got else None

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        active = [i for i, c in enumerate(self.components) if not c.exhausted]
        if not active or n <= 0:
            return _EMPTY
        if len(active) == 1:
            return self.components[active[0]].next_batch(n)
        if self.compiled and _mix_draw is not None:
            specs = self._draw_specs(active)
            if specs is not None and draws_as_numpy():   # the whole batch in one compiled pass
                return self._next_drawn(active, specs, n)
        # Exactly ``rng.choice(len(active), size=n, p=weights)`` (same draws, same picks), without
        # choice's per-call checks of p: this runs once per batch, every tick of every guest.
        u = self.rng.random(n)
        if _mix_pick is not None and self.compiled:
            return self._next_compiled(active, u)
        pick = self._pick_cdf(active).searchsorted(u, side="right")
        pages = np.empty(n, np.uint64)
        writes = np.empty(n, np.uint8 if self._codes else bool)
        keep: np.ndarray | None = None
        for j, i in enumerate(active):
            where = np.flatnonzero(pick == j)
            if not where.size:
                continue
            p, wr = self.components[i].next_batch(where.size)
            got = p.size
            pages[where[:got]] = p
            writes[where[:got]] = wr
            if got < where.size:     # it ran dry: its other slots yield no reference
                if keep is None:
                    keep = np.ones(n, bool)
                keep[where[got:]] = False
        if keep is None:
            return pages, writes
        return pages[keep], writes[keep]

    def _draw_specs(self, active: list[int]) -> tuple | None:
        """The active components' draw specs, when ``mix_draw`` can draw every one of them (else None).

        Made again only when the active set changes: a component's ``compiled`` is read then.
        """
        if active != self._specs_for:
            specs = []
            for i in active:
                c = self.components[i]
                spec = c.draw_spec() if type(c) in _DRAWN_KINDS else None
                if spec is None:
                    specs = None
                    break
                specs.append(spec)
            self._specs_for, self._specs = list(active), (tuple(specs) if specs is not None else None)
        return self._specs

    def _next_drawn(self, active: list[int], specs: tuple, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``next_batch`` of components that ``mix_draw`` draws: the same draws from the same streams."""
        pages = np.empty(n, np.uint64)
        writes = np.empty(n, self._wdtype)
        _mix_draw(self.rng.bit_generator.capsule, self._pick_cdf(active), specs, pages, writes)
        return pages, writes

    def _next_compiled(self, active: list[int], u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``next_batch``'s picks and scatter in two compiled passes: the same components asked for the
        same counts in the same order, their references placed as numpy's loop places them."""
        n = u.size
        pick = np.empty(n, np.uint8)
        counts = np.empty(len(active), np.int64)
        _mix_pick(u, self._pick_cdf(active), pick, counts)
        wdt = self._wdtype
        parts: list[tuple[np.ndarray, np.ndarray] | None] = []
        for j, k in enumerate(counts.tolist()):
            if not k:
                parts.append(None)
                continue
            p, wr = self.components[active[j]].next_batch(k)
            # the casts numpy's assignment into pages/writes makes (none for the usual dtypes)
            if type(p) is not np.ndarray or p.dtype is not _U64 or not p.flags.c_contiguous:
                p = np.ascontiguousarray(p, dtype=np.uint64)
            if type(wr) is not np.ndarray or wr.dtype is not wdt or not wr.flags.c_contiguous:
                wr = np.ascontiguousarray(np.asarray(wr).astype(wdt), dtype=wdt)
            if wr.size < p.size:
                raise GuestConfigError(f"{self.components[active[j]].name}: a batch of {p.size} pages "
                                       f"and {wr.size} writes")
            parts.append((p, wr))
        pages = np.empty(n, np.uint64)
        writes = np.empty(n, wdt)
        got = _mix_gather(pick, tuple(parts), pages, writes)
        if got == n:
            return pages, writes
        return pages[:got], writes[:got]


_DRAWN_KINDS = (ZipfWorkload, DbWorkload, AnonHotWorkload)     # exactly these types: a subclass may draw otherwise

_draws_checked: bool | None = None


def draws_as_numpy() -> bool:
    """Does ``mix_draw`` draw exactly what numpy's Generator draws here? Checked once per process.

    It calls the bit generators itself (numpy's public bitgen interface), so
    it repeats what ``random()`` and ``integers()`` do with their draws. A
    numpy whose ``integers`` drew otherwise would change every count; on a
    mismatch the batches stay numpy's. (The fork server checks before it forks.)
    """
    global _draws_checked
    if _draws_checked is None:
        _draws_checked = False
        got = _sample_batches(True)
        _draws_checked = got == _sample_batches(False)
    return _draws_checked


def _sample_batches(drawn: bool) -> list[bytes]:
    """A few batches of db + anon-hot mixes (ranges of one, a few and many pages; one generator shared by the
    mix and its components, or not), by ``mix_draw`` or by numpy, and where the generators were left."""
    out = []
    for seed, ws, frac, shared in ((1, 256, 0.3, False), (2, 3, 0.0, True), (3, 1, 0.5, False),
                                   (4, 70_000, 1.0, True)):
        rng = np.random.default_rng(seed)
        mix = Mix([DbWorkload(0, 300, rng), AnonHotWorkload(300, 70_000, rng, ws_pages=ws, write_frac=frac)],
                  [2.0, 1.0], rng if shared else np.random.default_rng(seed + 10))
        mix.compiled = drawn
        for n in (1, 7, 500, 1024):
            if drawn:
                specs = mix._draw_specs([0, 1])
                if specs is None:      # (the install did not build mix_draw)
                    return []
                p, w = mix._next_drawn([0, 1], specs, n)
            else:
                p, w = mix.next_batch(n)
            out += [p.tobytes(), w.tobytes()]
        out.append(repr(rng.bit_generator.state).encode() + repr(mix.rng.bit_generator.state).encode())
    return out


WORKLOADS = {
    "db": DbWorkload,
    "zipf": ZipfWorkload,
    "anon-cold": AnonColdWorkload,
    "anon-hot": AnonHotWorkload,
    "scan": ScanWorkload,
    "phases": PhasesWorkload,
    "trace": TraceWorkload,
    "burst": BurstWorkload,
}

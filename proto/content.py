"""What a page holds, as far as page sharing, zero pages and compression care.

The content token (``proto.tokens``) stays what proves integrity. What the
bytes *are* follows from the token, the guest that wrote it and what the
page's region declares, so neither side sends anything per page:

- token 0 is the zero page;
- version 0 of a page in a region with an ``image`` is that image's page at
  the same offset: the same bytes in every guest booted from that image (an
  OS image, a shared library, a golden VM template);
- a region that declares ``zero_writes`` is written with zeros (cleared
  buffers, freshly calloc'd heaps), so its pages stay zero pages;
- anything else the guest wrote is its own: two guests that happen to write
  a page the same number of times still hold different bytes.

A guest describes its regions once, at the handshake, as a ``ContentMap``.
``content_keys`` turns tokens into 64-bit content keys (equal keys mean
equal bytes; 0 is the zero page) and ``compressed_bytes`` gives each page's
size after compression, drawn from its region's range by a hash of its key:
deterministic with no generator state, and the same for equal contents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["PAGE_BYTES", "ZERO_KEY", "COMPRESS_PRESETS", "ContentRange", "ContentMap",
           "content_keys", "compressed_bytes", "image_id", "ranges_from_regions"]

PAGE_BYTES = 4096
ZERO_KEY = 0

#: (lo, hi) fraction of a page left after compression, uniform in between.
#: "text" is what zswap and ESX measure on code and text (2.5-4x); "random"
#: is already-compressed or encrypted data; "mixed" a typical heap.
COMPRESS_PRESETS: dict[str, tuple[float, float]] = {
    "text": (0.25, 0.45),
    "mixed": (0.2, 1.0),
    "random": (1.0, 1.0),
}

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_IMAGE_TAG = np.uint64(0x1)
_PRIVATE_TAG = np.uint64(0x2)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def image_id(name: str) -> int:
    """A stable 64-bit id for an image name (not Python's salted ``hash``)."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for b in name.encode():
            h = _mix(np.array([h ^ np.uint64(b)], np.uint64))[0] + _GOLDEN
    return int(h)


@dataclass(frozen=True, slots=True)
class ContentRange:
    """``pages`` virtual pages from ``start`` (the page id in a token is the vpage)."""

    start: int
    pages: int
    image: str | None = None          # version 0 is this image's page at image_offset + i
    image_offset: int = 0
    zero_writes: bool = False
    compress: tuple[float, float] = COMPRESS_PRESETS["mixed"]

    def __post_init__(self) -> None:
        lo, hi = self.compress
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"compress range must satisfy 0 < lo <= hi <= 1, got {self.compress!r}")
        if self.start < 0 or self.pages < 1 or self.image_offset < 0:
            raise ValueError(f"bad content range start={self.start} pages={self.pages} "
                             f"image_offset={self.image_offset}")


class ContentMap:
    """A guest's regions as content: sorted, non-overlapping ranges of vpages."""

    def __init__(self, ranges: Iterable[ContentRange] = ()) -> None:
        self.ranges: tuple[ContentRange, ...] = tuple(sorted(ranges, key=lambda r: r.start))
        for a, b in zip(self.ranges, self.ranges[1:]):
            if b.start < a.start + a.pages:
                raise ValueError(f"content ranges overlap at vpage {b.start}")
        # one extra entry at the end stands for "outside every range": private, mixed
        rs = self.ranges
        lo_d, hi_d = COMPRESS_PRESETS["mixed"]
        self._n = len(rs)
        self._start = np.array([r.start for r in rs] + [0], np.int64)
        self._end = np.array([r.start + r.pages for r in rs] + [0], np.int64)
        self._image = np.array([image_id(r.image) if r.image else 0 for r in rs] + [0], np.uint64)
        self._offset = np.array([r.image_offset for r in rs] + [0], np.int64)
        self._zero = np.array([r.zero_writes for r in rs] + [False], bool)
        self._lo = np.array([r.compress[0] for r in rs] + [lo_d], np.float64)
        self._hi = np.array([r.compress[1] for r in rs] + [hi_d], np.float64)

    def to_wire(self) -> list[list[Any]]:
        return [[r.start, r.pages, r.image or "", r.image_offset, r.zero_writes, list(r.compress)]
                for r in self.ranges]

    @classmethod
    def from_wire(cls, raw: Any) -> "ContentMap":
        """Inverse of ``to_wire``; a malformed map raises ``ValueError`` naming the entry."""
        if not isinstance(raw, (list, tuple)):
            raise ValueError(f"content map: expected a list, got {type(raw).__name__}")
        out = []
        for i, e in enumerate(raw):
            try:
                start, pages, image, off, zero, comp = e
                lo, hi = comp
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, pages, off)):
                    raise ValueError("start, pages and image_offset must be integers")
                if not isinstance(image, str) or not isinstance(zero, bool):
                    raise ValueError("image must be a string and zero_writes a bool")
                out.append(ContentRange(start, pages, image or None, off, zero, (float(lo), float(hi))))
            except (TypeError, ValueError) as err:
                raise ValueError(f"content map entry {i}: {err}") from None
        return cls(out)

    def _range_of(self, pids: np.ndarray) -> np.ndarray:
        """Index of each page id's range; ``len(ranges)`` (the default entry) outside every range."""
        i = np.searchsorted(self._start[:self._n], pids, side="right") - 1
        ok = (i >= 0) & (pids < self._end[np.maximum(i, 0)])
        return np.where(ok, i, self._n)


def content_keys(cmap: ContentMap, guest_id: int, tokens: np.ndarray) -> np.ndarray:
    """One content key per token: equal keys are equal bytes, ``ZERO_KEY`` the zero page.

    ``tokens`` must be real content tokens (not ``KEEP_TOKEN`` or a pending
    placeholder): the caller knows which of its frames hold those.
    """
    tok = np.asarray(tokens, np.uint64).reshape(-1)
    pid = (tok >> np.uint64(32)).astype(np.int64) - 1
    ver = tok & np.uint64(0xFFFF_FFFF)
    r = cmap._range_of(pid)
    image = cmap._image[r]
    offset = (pid - cmap._start[r] + cmap._offset[r]).astype(np.uint64)
    zero_w = cmap._zero[r]
    with np.errstate(over="ignore"):
        img_key = _mix(_mix(image ^ _IMAGE_TAG) + offset * _GOLDEN)
        priv_key = _mix(_mix(np.uint64(guest_id) * _GOLDEN ^ _PRIVATE_TAG) + tok)
    keys = np.where((ver == 0) & (image != 0), img_key, priv_key)
    keys = np.where(zero_w | (tok == 0), np.uint64(ZERO_KEY), keys)
    keys[(keys == 0) & (tok != 0) & ~zero_w] = np.uint64(1)   # a private page never collides with zero
    return keys.astype(np.uint64)


def compressed_bytes(cmap: ContentMap, guest_id: int, tokens: np.ndarray) -> np.ndarray:
    """Bytes each page takes compressed (int32); a zero page takes 0."""
    tok = np.asarray(tokens, np.uint64).reshape(-1)
    keys = content_keys(cmap, guest_id, tok)
    pid = (tok >> np.uint64(32)).astype(np.int64) - 1
    r = cmap._range_of(pid)
    lo, hi = cmap._lo[r], cmap._hi[r]
    u = (_mix(keys ^ _GOLDEN) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    size = np.rint(PAGE_BYTES * (lo + (hi - lo) * u)).astype(np.int32)
    return np.where(keys == ZERO_KEY, 0, np.minimum(size, PAGE_BYTES)).astype(np.int32)


def ranges_from_regions(regions: Sequence[Mapping[str, Any]]) -> ContentMap:
    """Build a map from ``[{start, pages, image?, image_offset?, zero_writes?, compress?}]``.

    ``compress`` is a preset name or ``[lo, hi]``.
    """
    out = []
    for r in regions:
        comp = r.get("compress", "mixed")
        if isinstance(comp, str):
            if comp not in COMPRESS_PRESETS:
                raise ValueError(f"compress: unknown preset {comp!r}; presets: {', '.join(COMPRESS_PRESETS)}")
            comp = COMPRESS_PRESETS[comp]
        out.append(ContentRange(int(r["start"]), int(r["pages"]), r.get("image") or None,
                                int(r.get("image_offset", 0)), bool(r.get("zero_writes", False)),
                                (float(comp[0]), float(comp[1]))))
    return ContentMap(out)

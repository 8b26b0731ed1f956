"""The workload's virtual pages: named regions, each a file or anonymous memory.

Virtual page numbers (vpages) are dense: region i holds
``[start_i, start_i + pages_i)`` in declaration order. The page id in a
content token is the vpage. On the virtual disk the files come first, each
at its own block offset in declaration order, then the guest swap area
(``n_file_blocks`` onward): a file page always lives in its own block.

What the pages hold, for page sharing and compression (``proto.content``),
comes from four optional keys per region: ``image`` (version 0 of each page
is page ``image_offset + i`` of that image: equal bytes in every guest booted
from it), ``image_offset``, ``zero_writes`` (the region is written with
zeros) and ``compress`` (a preset name, ``"text"``, ``"mixed"``, ``"random"``,
or ``[lo, hi]``: the fraction of a page left after compression).

``image`` is allowed on file regions only. In the guest the one way image
bytes enter memory is a read from the virtual disk: version 0 of a file page
is what its never-written block holds (the file's initial content), while an
anonymous page never written is the zero page. An OS image's text and
libraries are exactly that: files in the page cache. An anonymous region
whose version 0 were image content would need those bytes from nowhere (a
memory snapshot restore, which the lab does not model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from balloonlab.proto.content import COMPRESS_PRESETS, ContentMap, ranges_from_regions
from balloonlab.proto.schema import unknown_name

from ..errors import GuestConfigError

__all__ = ["Region", "Layout", "FILE", "ANON"]

FILE = "file"
ANON = "anon"


_KEYS = ("name", "kind", "pages", "image", "image_offset", "zero_writes", "compress")


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    kind: str          # FILE or ANON
    pages: int
    image: str | None = None               # version 0 of page i is this image's page image_offset + i
    image_offset: int = 0
    zero_writes: bool = False              # written with zeros: its pages stay zero pages
    compress: str | tuple[float, float] = "mixed"   # preset name or (lo, hi)

    def __post_init__(self) -> None:
        if self.kind not in (FILE, ANON):
            raise GuestConfigError(f"region {self.name!r}: kind must be 'file' or 'anon', got {self.kind!r}")
        if isinstance(self.pages, bool) or not isinstance(self.pages, int) or self.pages < 1:
            raise GuestConfigError(f"region {self.name!r}: pages must be an integer >= 1, got {self.pages!r}")
        if self.image is not None:
            if not isinstance(self.image, str) or not self.image:
                raise GuestConfigError(f"region {self.name!r}: image must be a non-empty string, got {self.image!r}")
            if self.kind != FILE:
                raise GuestConfigError(f"region {self.name!r}: image {self.image!r} needs kind = 'file' (image "
                                       "content reaches memory through the page cache; an anonymous page never "
                                       "written is the zero page)")
        off = self.image_offset
        if isinstance(off, bool) or not isinstance(off, int) or off < 0:
            raise GuestConfigError(f"region {self.name!r}: image_offset must be an integer >= 0, got {off!r}")
        if off and self.image is None:
            raise GuestConfigError(f"region {self.name!r}: image_offset {off} without an image")
        if not isinstance(self.zero_writes, bool):
            raise GuestConfigError(f"region {self.name!r}: zero_writes must be true or false, "
                                   f"got {self.zero_writes!r}")
        comp = self.compress
        if isinstance(comp, str):
            if comp not in COMPRESS_PRESETS:
                raise GuestConfigError(f"region {self.name!r}: compress: unknown preset {comp!r}; presets: "
                                       f"{', '.join(COMPRESS_PRESETS)}, or [lo, hi]")
        else:
            ok = isinstance(comp, (list, tuple)) and len(comp) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in comp)
            if not ok or not 0.0 < comp[0] <= comp[1] <= 1.0:
                raise GuestConfigError(f"region {self.name!r}: compress must be a preset name or [lo, hi] with "
                                       f"0 < lo <= hi <= 1, got {comp!r}")
            object.__setattr__(self, "compress", (float(comp[0]), float(comp[1])))


class Layout:
    """Regions placed in vpage space and, for files, on the virtual disk."""

    def __init__(self, regions: Iterable[Region]) -> None:
        self.regions: tuple[Region, ...] = tuple(regions)
        names = [r.name for r in self.regions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GuestConfigError(f"duplicate region name(s): {', '.join(dup)}")
        self.start: dict[str, int] = {}
        self.file_block_start: dict[str, int] = {}
        vp = 0
        blk = 0
        for r in self.regions:
            self.start[r.name] = vp
            vp += r.pages
            if r.kind == FILE:
                self.file_block_start[r.name] = blk
                blk += r.pages
        self.n_vpages = vp
        self.n_file_blocks = blk
        self.is_file = np.zeros(vp, bool)
        self.file_block = np.full(vp, -1, np.int64)     # -1 for anonymous pages
        for r in self.regions:
            s = self.start[r.name]
            if r.kind == FILE:
                self.is_file[s:s + r.pages] = True
                b = self.file_block_start[r.name]
                self.file_block[s:s + r.pages] = np.arange(b, b + r.pages)
        self.anon_pages = int(vp - self.is_file.sum())

    def content_map(self) -> ContentMap:
        """The regions as content (``proto.content``): what the guest tells the host at the handshake."""
        return ranges_from_regions([
            {"start": self.start[r.name], "pages": r.pages, "image": r.image, "image_offset": r.image_offset,
             "zero_writes": r.zero_writes, "compress": r.compress}
            for r in self.regions])

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise GuestConfigError(unknown_name("region", name, [r.name for r in self.regions]))

    def span(self, name: str) -> tuple[int, int]:
        """(first vpage, number of pages) of region ``name``."""
        r = self.region(name)
        return self.start[name], r.pages

    @classmethod
    def single_anon(cls, pages: int, name: str = "trace") -> "Layout":
        return cls([Region(name, ANON, pages)])

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "regions") -> "Layout":
        """``[{name=, kind="file"|"anon", pages=, image=?, image_offset=?, zero_writes=?, compress=?}, ...]``."""
        if not isinstance(raw, (list, tuple)):
            raise GuestConfigError(f"{where}: expected a list of region tables, got {type(raw).__name__}")
        regions = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping):
                raise GuestConfigError(f"{where}[{i}]: expected a table, got {type(item).__name__}")
            extra = sorted(set(item) - set(_KEYS))
            if extra:
                raise GuestConfigError(f"{where}[{i}]: unknown key(s) {', '.join(extra)}; known: "
                                       f"{', '.join(sorted(_KEYS))}")
            try:
                opt = {k: item[k] for k in _KEYS[3:] if k in item}
                if isinstance(opt.get("compress"), list):
                    opt["compress"] = tuple(opt["compress"])
                regions.append(Region(str(item["name"]), item["kind"], item["pages"], **opt))
            except KeyError as e:
                raise GuestConfigError(f"{where}[{i}]: missing key {e.args[0]!r}") from None
            except GuestConfigError as e:
                raise GuestConfigError(f"{where}[{i}]: {e}") from None
        return cls(regions)

"""The workload's virtual pages: named regions, each a file or anonymous memory.

Virtual page numbers (vpages) are dense: region i holds
``[start_i, start_i + pages_i)`` in declaration order. The page id in a
content token is the vpage. On the virtual disk the files come first, each
at its own block offset in declaration order, then the guest swap area
(``n_file_blocks`` onward): a file page always lives in its own block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from balloonlab.proto.schema import unknown_name

from ..errors import GuestConfigError

__all__ = ["Region", "Layout", "FILE", "ANON"]

FILE = "file"
ANON = "anon"


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    kind: str          # FILE or ANON
    pages: int

    def __post_init__(self) -> None:
        if self.kind not in (FILE, ANON):
            raise GuestConfigError(f"region {self.name!r}: kind must be 'file' or 'anon', got {self.kind!r}")
        if isinstance(self.pages, bool) or not isinstance(self.pages, int) or self.pages < 1:
            raise GuestConfigError(f"region {self.name!r}: pages must be an integer >= 1, got {self.pages!r}")


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
        """``[{name=, kind="file"|"anon", pages=}, ...]``."""
        if not isinstance(raw, (list, tuple)):
            raise GuestConfigError(f"{where}: expected a list of region tables, got {type(raw).__name__}")
        regions = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping):
                raise GuestConfigError(f"{where}[{i}]: expected a table, got {type(item).__name__}")
            extra = sorted(set(item) - {"name", "kind", "pages"})
            if extra:
                raise GuestConfigError(f"{where}[{i}]: unknown key(s) {', '.join(extra)}; known: kind, name, pages")
            try:
                regions.append(Region(str(item["name"]), item["kind"], item["pages"]))
            except KeyError as e:
                raise GuestConfigError(f"{where}[{i}]: missing key {e.args[0]!r}") from None
            except GuestConfigError as e:
                raise GuestConfigError(f"{where}[{i}]: {e}") from None
        return cls(regions)

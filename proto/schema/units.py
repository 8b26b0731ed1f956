"""The one definition of the scenario's units: sizes in MiB or KiB become 4 KiB pages here, and only here.

Rounding: a size becomes the *nearest* whole number of pages (Python's
``round``: a size exactly half a page from two whole numbers goes to the
even one). Every size a scenario gives in MiB, on the host's side and on a
guest's, goes through ``mib_to_pages``, so 0.3 MiB is 77 pages everywhere
(76.8 rounded), never 76 on one side and 77 on the other.
"""
from __future__ import annotations

__all__ = ["PAGE_BYTES", "PAGES_PER_MIB", "PAGE_KIB", "mib_to_pages", "kib_to_pages", "pages_to_mib"]

PAGE_BYTES = 4096
PAGE_KIB = PAGE_BYTES // 1024          # 4
PAGES_PER_MIB = (1 << 20) // PAGE_BYTES  # 256


def mib_to_pages(mib: float) -> int:
    """``mib`` MiB as pages, rounded to the nearest page (ties to even)."""
    return int(round(float(mib) * PAGES_PER_MIB))


def kib_to_pages(kib: float) -> int:
    """``kib`` KiB as pages, rounded to the nearest page (ties to even)."""
    return int(round(float(kib) / PAGE_KIB))


def pages_to_mib(pages: float) -> float:
    return float(pages) / PAGES_PER_MIB

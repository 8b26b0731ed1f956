"""The figure formats a report can be drawn in, and the ``--format`` option's parser.

Apart from ``plots`` (numpy, matplotlib): the launcher checks its command
line before it starts the host and the fork server, and must not import
numpy first.
"""
from __future__ import annotations

__all__ = ["FORMATS", "parse_formats"]

FORMATS = ("png", "svg", "pdf")


def parse_formats(text: str) -> tuple[str, ...]:
    """``"png,svg"`` -> ("png", "svg"); an unknown format is a ValueError naming it."""
    out = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"unknown figure format {', '.join(bad) or repr(text)}: choose from {', '.join(FORMATS)}")
    return out

"""structlog imported without rich, for the host, guest and fork-server processes.

``import structlog`` imports ``structlog.dev`` and ``structlog.tracebacks``,
which import rich when it is installed (it is: ``balloonlab-top`` draws
with it), for console renderers and pretty locals these processes never
use: they write JSON lines. That was 0.1-0.25 s of every host start
(its imports: 0.32-0.47 s with rich, 0.21-0.22 s without), which every
guest waits for. An exception's locals are then formatted by
``repr`` instead of rich.
"""
from __future__ import annotations

import sys

__all__ = ["import_structlog"]


def import_structlog() -> None:
    """Import structlog with rich hidden from it; later imports of rich work as usual."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]   # import rich -> ImportError, for this import only
    try:
        import structlog  # noqa: F401  (imported for its side effect: in sys.modules)
    finally:
        del sys.modules["rich"]

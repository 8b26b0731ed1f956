"""Content tokens: the stand-in for a page's bytes, used to prove nothing is lost.

``0`` is the zero page (never written). A page with id ``pid`` at version
``v`` has token ``((pid + 1) << 32) | (v & 0xFFFF_FFFF)``. The host stores
tokens as opaque ``uint64`` and never interprets them.

``KEEP_TOKEN`` (all ones; no page has it: that would take page id
``2**32 - 2``) answers an EPT fault on a gpfn the host already backs: the
host never took that frame, so its content is whatever the guest last wrote
there, which only the guest knows. The guest keeps its own.

``LATER_TOKEN`` (all ones but the last bit; no page has it, as above)
answers an EPT fault on a gpfn the host did not reach: a fault of several
pages is served one page after another, as a vCPU takes them, and stops at
the end of the tick it runs in. The gpfn stays as it was (not backed); the
guest faults it again, in the next tick.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ZERO_TOKEN", "KEEP_TOKEN", "LATER_TOKEN", "make_tokens", "token_page_ids", "token_versions"]

ZERO_TOKEN = 0
KEEP_TOKEN = 0xFFFF_FFFF_FFFF_FFFF
LATER_TOKEN = 0xFFFF_FFFF_FFFF_FFFE
_VERSION_MASK = np.uint64(0xFFFF_FFFF)
_SHIFT = np.uint64(32)


def make_tokens(page_ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
    pid = np.asarray(page_ids, dtype=np.uint64)
    ver = np.asarray(versions, dtype=np.uint64)
    return ((pid + np.uint64(1)) << _SHIFT) | (ver & _VERSION_MASK)


def token_page_ids(tokens: np.ndarray) -> np.ndarray:
    """Page id of each token; -1 for the zero page."""
    return (np.asarray(tokens, dtype=np.uint64) >> _SHIFT).astype(np.int64) - 1


def token_versions(tokens: np.ndarray) -> np.ndarray:
    return (np.asarray(tokens, dtype=np.uint64) & _VERSION_MASK).astype(np.int64)

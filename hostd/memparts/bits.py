"""The guests' EPT accessed/dirty bits on host frames, and pinning (gpfns and disk ranges).

Accessed and dirty bits arrive with every ``TickDone`` (``np.packbits``
over the guest's gpfns) and are ORed into the frames backing them (the
victim policies and page sharing read them). A pinned gpfn's frame is
never a host-swap victim; a pinned disk range keeps its cache frames.
"""
from __future__ import annotations

import numpy as np

from .._books import or_backed
from ..errors import BadBatch
from ..p2m import PageState, as_page_numbers
from .books import _FRAME, MemoryBooks, _Guest

__all__ = ["BitsAndPins"]


class BitsAndPins(MemoryBooks):
    """Part of ``HostMemory``: accessed/dirty bits and pinning."""

    def set_ad_bits(self, guest_id: int, accessed_packbits: np.ndarray | bytes,
                    dirty_packbits: np.ndarray | bytes) -> None:
        """OR the guest's EPT A/D bits (``np.packbits`` over its gpfns) into the frames backing them.

        Empty bit strings mean "nothing to report".
        """
        g = self._guest(guest_id)
        for name, packed, target in (("accessed", accessed_packbits, self.pool.accessed),
                                     ("dirty", dirty_packbits, self.pool.dirty)):
            if len(packed) == 0:
                continue
            if name == "dirty" and self.sharing is not None:
                bits = self._unpack(g, name, packed)    # sharing keeps the bitmap itself
                target[g.p2m.loc[bits & (g.p2m.state == _FRAME)]] = True
                self.sharing.note_dirty(guest_id, bits)
                continue
            if isinstance(packed, np.ndarray):
                packed = np.ascontiguousarray(packed, np.uint8).reshape(-1)
            want = -(-g.p2m.guest_pages // 8)
            if len(packed) != want:
                raise BadBatch(f"guest {g.guest_id}: {name} bits have {len(packed)} bytes, expected {want}")
            or_backed(packed, g.p2m.state, _FRAME, g.p2m.loc, target)

    def _unpack(self, g: _Guest, name: str, packed: np.ndarray | bytes) -> np.ndarray:
        raw = np.frombuffer(packed, np.uint8) if isinstance(packed, (bytes, bytearray, memoryview)) \
            else np.asarray(packed, np.uint8).reshape(-1)
        want = -(-g.p2m.guest_pages // 8)
        if raw.size != want:
            raise BadBatch(f"guest {g.guest_id}: {name} bits have {raw.size} bytes, expected {want}")
        return np.unpackbits(raw, count=g.p2m.guest_pages).view(bool)   # 0/1 bytes: a view, not a copy

    def pin_gpfns(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        """Their frames are never host-swap victims (now and whenever faulted in again)."""
        self._set_pinned(guest_id, gpfns, True)

    def unpin_gpfns(self, guest_id: int, gpfns: np.ndarray | bytes) -> None:
        self._set_pinned(guest_id, gpfns, False)

    def _set_pinned(self, guest_id: int, gpfns: np.ndarray | bytes, pinned: bool) -> None:
        g = self._guest(guest_id)
        gpfns = as_page_numbers(gpfns, guest_id, "gpfn", g.p2m.guest_pages)
        g.p2m.pinned[gpfns] = pinned
        backed = gpfns[g.p2m.state[gpfns] == PageState.FRAME]
        self.pool.pinned[g.p2m.loc[backed]] = pinned

    def pin_vdisk_range(self, guest_id: int, first_block: int, n_blocks: int) -> None:
        """Pin the cache frames of these blocks (e.g. the guest's swap area) and keep them cached.

        Blocks that are in host swap right now become pinned when next touched.
        """
        self._guest(guest_id).vdisk.set_pinned(first_block, n_blocks, True)

    def unpin_vdisk_range(self, guest_id: int, first_block: int, n_blocks: int) -> None:
        self._guest(guest_id).vdisk.set_pinned(first_block, n_blocks, False)

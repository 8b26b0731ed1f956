"""A guest joins and leaves host memory: its record, swap file, virtual disk and device lanes.

Also what a guest sets once it is in: its content map (its
``ContentReport``) and its disk's or the swap device's profile.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from balloonlab.proto.content import ContentMap

from ..devices import Device, DeviceProfile, device_profile
from ..errors import BadBatch, ContentMapTaken, DuplicateGuest
from ..p2m import P2M
from ..vdisk import VirtualDisk
from .books import _SHARED, MemoryBooks, _Guest

__all__ = ["Guests", "MAX_BALLOON_FRACTION_DEFAULT", "default_max_balloon_pages"]


MAX_BALLOON_FRACTION_DEFAULT = 0.65   # ESX Mem.CtlMaxPercent


def default_max_balloon_pages(guest_pages: int) -> int:
    return int(guest_pages * MAX_BALLOON_FRACTION_DEFAULT)


class Guests(MemoryBooks):
    """Part of ``HostMemory``: guests joining and leaving."""

    def add_guest(self, guest_id: int, guest_pages: int, max_balloon_pages: int | None = None, *,
                  disk_blocks: int = 0, disk_profile: DeviceProfile | str = "ssd") -> None:
        if guest_id in self._guests:
            raise DuplicateGuest(guest_id)
        max_balloon = default_max_balloon_pages(guest_pages) if max_balloon_pages is None else int(max_balloon_pages)
        if not 0 <= max_balloon <= guest_pages:
            raise ValueError(f"guest {guest_id}: max_balloon_pages {max_balloon} not in [0, {guest_pages}]")
        self.swap.add_file(guest_id, guest_pages)
        # On a shared device each guest's disk gets its own range of offsets (sequential within it).
        vdisk = VirtualDisk(guest_id, disk_blocks, self.pool, self.costs, device=self.shared_device,
                            profile=disk_profile, offset_base=(guest_id + 1) << 40 if self.shared_device else 0,
                            mode=self.cache.cfg.mode, cluster_pages=self.cluster_pages,
                            allowance_pages=self.cache.initial_allowance(
                                {g: x.vdisk for g, x in self._guests.items()}),
                            max_inflight_requests=self.max_inflight_requests)
        self.cache.set_limits(vdisk, vdisk.allowance_pages)
        self._guests[guest_id] = _Guest(guest_id, P2M(guest_pages), max_balloon, vdisk,
                                        np.zeros(guest_pages, bool), self._guest_rng(guest_id))
        if self.zip is not None:
            self.zip.add_guest(guest_id, guest_pages)
        if self.sharing is not None:
            self.sharing.add_guest(guest_id, guest_pages)
        # In id order, not in the order guests happened to connect: every loop over the
        # guests (retiring I/O buffers frees frames onto the free stack) must be reproducible.
        self._guests = dict(sorted(self._guests.items()))

    def remove_guest(self, guest_id: int) -> None:
        """Release everything a dead guest held: frames, swap slots, disk cache and buffers.

        Frames with a shootdown pending stay busy until it settles, then are freed.
        """
        g = self._guest(guest_id)
        del self._guests[guest_id]
        for k, v in asdict(g.vdisk.counters).items():
            self._departed_vdisk[k] = self._departed_vdisk.get(k, 0) + v
        frames = self.pool.frames_owned_by(guest_id)
        self.pool.free(frames[~self.pool.busy[frames]])
        if self.sharing is not None:
            self.sharing.remove_guest(guest_id, g.p2m.loc[g.p2m.state == _SHARED])
        self.swap.remove_file(guest_id)
        if self.zip is not None:
            self.zip.remove_guest(guest_id)
        self._early_answers.pop(guest_id, None)
        if self.shared_device is not None:
            self.shared_device.remove_lane(guest_id)
        if self._vm_victims is not None:
            self._vm_victims.forget(guest_id)
        if self.states is not None:
            self.states.guest_gone(guest_id)

    def set_content(self, guest_id: int, raw: Any) -> ContentMap:
        """Take the guest's content map (``ContentMap.to_wire`` form); a malformed one is refused
        (``BadBatch``, naming the guest and the entry) and the guest keeps the map it had."""
        g = self._guest(guest_id)
        if g.content_reported:
            # Shared frames were merged under the map it had: another would make their keys a lie.
            raise ContentMapTaken(guest_id)
        try:
            cmap = ContentMap.from_wire(raw)
        except ValueError as exc:
            raise BadBatch(f"guest {guest_id}: malformed content map: {exc}") from None
        g.content = cmap
        g.content_reported = True
        return cmap

    def set_vdisk_profile(self, guest_id: int, profile: DeviceProfile | str) -> None:
        """Give the guest's disk a device of its own with this profile (not on a shared device)."""
        if self.shared_device is not None:
            raise ValueError("the virtual disks are on the shared device: set its profile in [disk.vdisk]")
        vd = self._guest(guest_id).vdisk
        vd.device = Device(device_profile(profile) if isinstance(profile, str) else profile, f"vdisk{guest_id}")
        vd.device.add_lane(guest_id)

    def set_swap_profile(self, profile: DeviceProfile | str) -> None:
        """A new swap device with this profile, lanes for the live guests (not on a shared device)."""
        if self.shared_device is not None:
            raise ValueError("the swap files are on the shared device: set its profile in [disk.vdisk]")
        old = self.swap.disk
        self.swap.disk = Device(device_profile(profile) if isinstance(profile, str) else profile, "swap",
                                old.expected_lanes)
        for gid in self._guests:
            self.swap.disk.add_lane(gid)

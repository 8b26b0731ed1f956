"""Page sharing in the summary: frames saved against what the content classes allow (hostd/sharing.py)."""
from __future__ import annotations

from typing import Any

__all__ = ["sharing_metrics", "sharing_lines", "GUEST_SHARING_KEYS"]

GUEST_SHARING_KEYS = ("resident_pages", "pages_shared", "pages_sharing", "zero_pages_shared", "cow_breaks", "cow_fresh",
                      "scan_pages", "scan_skipped_dirty", "merged_pages", "balloon_shared_pages")


def sharing_metrics(finished: dict[str, Any], host: dict[str, Any], guests: list[dict[str, Any]]) -> dict[str, Any]:
    """The host's per-guest sharing counters into each guest's row, and the variant's ``sharing`` block.

    ``image_saved_frames`` is what sharing saved beyond zero pages;
    ``image_saved_of_bound`` that over ``image_saving_bound`` (every
    declared image page resident and unwritten, in every guest): how close
    the scanner came to what the content classes allow. Empty when the
    host ran without sharing.
    """
    if "pages_sharing" not in host:
        return {}
    per_guest = finished.get("guests_memory") or {}
    for g in guests:
        row = per_guest.get(str(g["id"])) or {}
        for k in GUEST_SHARING_KEYS:
            if k in row:
                g[f"host_{k}"] = row[k]
    saved = int(host["pages_sharing"])
    image_saved = saved - int(host.get("zero_frames_saved", 0))
    bound = int(host.get("image_saving_bound", 0))
    vt_us = float(finished.get("vt_us", 0)) or 1.0
    return {"sharing": {
        "saved_frames": saved, "shared_frames": int(host["pages_shared"]),
        "zero_pages_shared": int(host.get("zero_pages_shared", 0)),
        "zero_frames_saved": int(host.get("zero_frames_saved", 0)),
        "image_saved_frames": image_saved, "image_saving_bound": bound,
        "image_saved_of_bound": round(image_saved / bound, 4) if bound else None,
        "cow_breaks": int(host.get("cow_breaks", 0)), "scan_pages": int(host.get("scan_pages", 0)),
        "scan_cpu_share_of_a_core": round(float(host.get("share_scan_cpu_us", 0.0)) / vt_us, 4),
    }}


def sharing_lines(v: dict[str, Any]) -> list[str]:
    s = v.get("sharing")
    if not s:
        return []
    bound = s["image_saving_bound"]
    of = f" = {100 * s['image_saved_of_bound']:.1f} % of the {bound} the image allows" if bound else ""
    return [f"   sharing: {s['saved_frames']} frames saved on {s['shared_frames']} shared frames "
            f"({s['zero_frames_saved']} of them zero pages; image and other content {s['image_saved_frames']}{of}); "
            f"{s['cow_breaks']} copy-on-write breaks; {s['scan_pages']} pages scanned, "
            f"{100 * s['scan_cpu_share_of_a_core']:.1f} % of a host core"]

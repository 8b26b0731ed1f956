"""A run directory written line by line, shaped like the real logs, for the dashboard's and top's tests.

The host's ``tick_completed`` carries its counters and a table of every
guest; each guest logs its own stats. Numbers follow a simple rule so tests
can compute what the page and the table must show.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["FakeRun"]

TICK_US = 10_000
RAM_PAGES = 1024          # each guest
HOST_FRAMES = 3072


class FakeRun:
    def __init__(self, run_dir: Path, guests: int = 3, variant: str = "v1", every: int = 5) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.guests = guests
        self.every = every
        self.variant = variant
        (self.dir / "host-config.json").write_text(json.dumps({
            "scenario": "fake", "variant": variant, "seed": 11, "ticks": 100, "tick_us": TICK_US,
            "metrics_every_ticks": every, "balloon": {"policy": "static"}, "costs": {"mem_ref_us": 1.0},
            "guests": [{"id": g, "ram_pages": RAM_PAGES} for g in range(guests)]}))
        self.write("host", {"event": "run_started", "scenario": "fake", "variant": variant, "seed": 11,
                            "tick_us": TICK_US, "ticks": 100, "timestamp": "2026-01-01T00:00:00Z"})

    def write(self, who: str | int, obj: dict[str, Any], partial: bool = False) -> None:
        """Append one line to the host's log or guest ``who``'s; ``partial``: only its first half, no newline."""
        path = self.dir / ("host.jsonl" if who == "host" else f"guest-{who}.jsonl")
        line = json.dumps(dict({"level": "info", "proc": "host" if who == "host" else "guest"}, **obj))
        with open(path, "a") as f:
            f.write(line[: len(line) // 2] if partial else line + "\n")

    def finish_line(self, who: str | int, obj: dict[str, Any]) -> None:
        """Write the rest of a line that ``write(..., partial=True)`` began."""
        path = self.dir / ("host.jsonl" if who == "host" else f"guest-{who}.jsonl")
        line = json.dumps(dict({"level": "info", "proc": "host" if who == "host" else "guest"}, **obj))
        with open(path, "a") as f:
            f.write(line[len(line) // 2:] + "\n")

    @staticmethod
    def guest_stats(g: int, tick: int) -> dict[str, Any]:
        balloon = 100 * g + tick            # guest g's balloon grows one page a tick
        anon, file = 200 + 10 * g, 100
        return {"event": "tick_completed", "guest": g, "tick": tick, "vt_us": (tick + 1) * TICK_US,
                "refs": 1000 * (g + 1) * (tick + 1), "major_faults": 2 * (tick + 1), "minor_faults": tick + 1,
                "swap_in": 0, "swap_out": 0, "anon_pages": anon, "file_pages": file, "kernel_pages": 32,
                "balloon_pages": balloon, "free": RAM_PAGES - anon - file - 32 - balloon, "total": RAM_PAGES,
                "pff": 10.0 * (3 - g), "working_set_pages": 150 + g, "lost_pages": 0}

    def host_line(self, tick: int, extra: dict[str, Any] | None = None,
                  guest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
        table = {str(g): dict({"guest_pages": RAM_PAGES, "resident_pages": 300 + g, "swapped_pages": 5 * g,
                               "ballooned_pages": 100 * g + tick, "swap_out_pages": g * (tick + 1),
                               "swap_in_pages": 0}, **(guest_extra or {}))
                 for g in range(self.guests)}
        resident = sum(t["resident_pages"] for t in table.values())
        host = {"event": "tick_completed", "tick": tick, "vt_us": (tick + 1) * TICK_US,
                "timestamp": f"2026-01-01T00:00:{(tick + 1) // 10:02d}.{(tick + 1) % 10}Z",
                "total_frames": HOST_FRAMES, "free_frames": HOST_FRAMES - resident - 64 - 16,
                "guest_frames": resident, "cache_pages": 64, "iobuf_pages": 16, "swap_slots": 4096,
                "swap_used_slots": 10, "swap_out_pages": 3 * (tick + 1), "swap_in_pages": tick + 1,
                "balloon_targets": {str(g): 100 * g + tick + 1 for g in range(self.guests)}, "guests": table}
        host.update(extra or {})
        return host

    def tick(self, tick: int, host_first: bool = True, **kw: Any) -> None:
        """One logged tick: the host's line and every guest's (in either order)."""
        lines = [("host", self.host_line(tick, **kw))] + [(g, self.guest_stats(g, tick)) for g in range(self.guests)]
        if not host_first:
            lines = lines[1:] + lines[:1]
        for who, obj in lines:
            self.write(who, obj)

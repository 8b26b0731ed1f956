"""Progress lines for the launcher: one rewritten line on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import IO, Any

from .cli import say

__all__ = ["Progress"]


class Progress:
    def __init__(self, out: IO[str] = sys.stderr, plain_every_s: float = 2.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.plain_every_s = plain_every_s
        self._last = 0.0
        self._wall0 = time.monotonic()
        self.variant = ""

    def start(self, variant: str) -> None:
        self.variant = variant
        self._wall0 = time.monotonic()
        self._last = 0.0

    def update(self, msg: dict[str, Any]) -> None:
        if "stalled" in msg:
            self._line(f"[{self.variant}] tick {msg['stalled']} waiting {msg['waited_s']} s for guests {msg['missing']}", force=True)
            return
        if "guest_lost" in msg:
            self._line(f"[{self.variant}] guest {msg['guest_lost']} lost at tick {msg['tick']}", force=True)
            return
        if "guest_cut_off" in msg:
            self._line(f"[{self.variant}] guest {msg['guest_cut_off']} cut off at tick {msg['tick']}: {msg['reason']}",
                       force=True)
            return
        if "tick" not in msg or "ticks" not in msg:
            return
        wall = time.monotonic() - self._wall0
        vt_s = msg["vt_us"] / 1e6
        extra = "".join(f"  {k} {v}" for k, v in msg.items() if k not in ("tick", "ticks", "vt_us", "guests"))
        text = (f"[{self.variant}] tick {msg['tick']}/{msg['ticks']}  vt {vt_s:.2f} s  guests {msg['guests']}"
                f"  wall {wall:.1f} s  ({vt_s / wall if wall > 0 else 0:.2f} vs/s){extra}")
        self._line(text, force=msg["tick"] == msg["ticks"])

    def _line(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            say("\r\x1b[2K" + text[:200], self.out, end="\n" if force else "")
        elif force or now - self._last >= self.plain_every_s:
            self._last = now
            say(text, self.out)

    def done(self) -> None:
        if self.tty:
            say("", self.out)

"""The live guest sessions by id, who left and why, who came back.

The server admits a session (``join``) once its handshake succeeds and
takes it out (``leave``) when its connection closes. Everyone else who
needs to find a guest's session -- the machine (balloon targets), the
shootdowns, the request disciplines, the audit -- is handed this registry
and reads it; nobody keeps a pointer to the server.

Only a live session holds an id: a guest that died was released, and a
restarted guest may take its id again as a fresh guest (counted as a
rejoin).
"""
from __future__ import annotations

from typing import Iterable, Iterator

from .session import GuestSession

__all__ = ["SessionRegistry"]


class SessionRegistry:
    def __init__(self) -> None:
        self._live: dict[int, GuestSession] = {}     # by guest id, in the order they joined
        self._gone: dict[int, str] = {}               # guest id -> why it left (the last time)
        self._rejoined: dict[int, int] = {}           # guest id -> times it connected again after leaving

    # --- the server's side --------------------------------------------------------

    def join(self, session: GuestSession) -> int:
        """Admit ``session`` under its guest id; returns how many times this id came back after leaving."""
        gid = session.guest_id
        assert gid is not None
        self._live[gid] = session
        if gid in self._gone:
            self._rejoined[gid] = self._rejoined.get(gid, 0) + 1
        return self._rejoined.get(gid, 0)

    def leave(self, session: GuestSession, reason: str | None) -> bool:
        """Take ``session`` out if it is the live one for its id; ``reason`` None: the run ended, not a loss.

        Returns whether it was live.
        """
        gid = session.guest_id
        if gid is None or self._live.get(gid) is not session:
            return False
        del self._live[gid]
        if reason is not None:
            self._gone[gid] = reason
        return True

    # --- reading ----------------------------------------------------------------

    def get(self, guest_id: int) -> GuestSession | None:
        return self._live.get(guest_id)

    def __getitem__(self, guest_id: int) -> GuestSession:
        return self._live[guest_id]

    def __contains__(self, guest_id: object) -> bool:
        return guest_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._live))

    def sessions(self) -> list[GuestSession]:
        """Live sessions in the order they joined."""
        return list(self._live.values())

    def items(self) -> list[tuple[int, GuestSession]]:
        """Live sessions by guest id, lowest id first."""
        return sorted(self._live.items())

    def gone(self) -> dict[int, str]:
        """Guests that left (and have not come back since, or came back: see ``rejoined``), and why."""
        return dict(sorted(self._gone.items()))

    def rejoined(self) -> dict[int, int]:
        return dict(sorted(self._rejoined.items()))

    def left_for_good(self) -> list[int]:
        """Guests that left and are not live now."""
        return sorted(set(self._gone) - set(self._live))

    def missing(self, expected: Iterable[int]) -> list[int]:
        """Of ``expected``, the ids that never connected (neither live nor gone)."""
        return sorted(set(expected) - set(self._live) - set(self._gone))

    def all_accounted(self, expected: Iterable[int]) -> bool:
        """Every expected guest connected at least once (live now, or gone)."""
        return not self.missing(expected)

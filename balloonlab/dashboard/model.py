"""A run as the dashboard and ``balloonlab-top`` see it, built from its own logs as they grow.

Nothing here talks to ``hostd`` or ``guestd``: it reads the run directory
(``host.jsonl``, ``guest-N.jsonl``, ``host-config.json``, ``summary.json``),
so a live run and a finished one look the same.

One **frame** per host ``tick_completed`` line: the host's counters, and per
guest what the host sees of it (its row of the host's table, its balloon
target) next to the guest's own latest ``tick_completed`` stats at or before
that tick, with rates over the interval since the previous frame. Fields are
copied generically (every number, and every string such as a future
``memory_state``), so counters that later engines log appear without a
change here. A frame may be rebuilt when a guest's line for its tick arrives
after the host's: updates are keyed by index and replace what was sent.

**Events**: every event other than the per-tick metrics is counted by name
(the same counts as summary.json's ``event_counts``); the notable ones
(``proto.events`` less the routine lifecycle ones, and any warning or error)
are listed, with the balloon targets of one tick folded into one entry.
"""
from __future__ import annotations

import bisect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balloonlab.analysis.report import evidence, wall_seconds as _wall
from balloonlab.proto import events as ev
from balloonlab.proto.costs import refs_per_vsec_ceiling

from .tail import LogTail

__all__ = ["VariantModel", "RunModel", "Change", "NOTABLE_ROUTINE", "MAX_EVENTS_LISTED"]

NOTABLE_ROUTINE = frozenset({ev.TICK_COMPLETED, ev.RUN_STARTED, ev.RUN_FINISHED, ev.GUEST_STARTED,
                             ev.GUEST_FINISHED, ev.GUEST_CONNECTED, ev.LOCK_EVENT, ev.AUDIT_REPORTED})
MAX_EVENTS_LISTED = 3000
"""Listed events per variant; past it only kinds seen at most ``RARE_KIND`` times are still listed (all are counted)."""
RARE_KIND = 50
_CONTEXT = {"event", "level", "timestamp", "proc", "run_id", "variant", "tick", "vt_us", "guest", "logger"}
_LOUD = {"warning", "error", "critical", "exception"}
_BULKY = {"recent_events"}          # fields too long for a live page
_MAX_FIELD_CHARS = 6000

# Cumulative counters turned into rates per virtual second, where present: (counter(s), rate name).
_GUEST_RATES = ((("refs",), "refs_per_vsec"), (("major_faults", "minor_faults"), "faults_per_vsec"),
                (("major_faults",), "major_faults_per_vsec"), (("swap_in",), "swap_in_per_vsec"),
                (("swap_out",), "swap_out_per_vsec"), (("file_reads",), "file_reads_per_vsec"))
_HOST_VIEW_RATES = ((("swap_out_pages",), "host_swap_out_per_vsec"), (("swap_in_pages",), "host_swap_in_per_vsec"))
_HOST_RATES = ((("swap_out_pages",), "swap_out_per_vsec"), (("swap_in_pages",), "swap_in_per_vsec"),
               (("vdisk_read_pages",), "vdisk_read_per_vsec"), (("vdisk_write_pages",), "vdisk_write_per_vsec"),
               (("ept_faults",), "ept_faults_per_vsec"), (("double_faults",), "double_faults_per_vsec"))

Change = tuple[Any, ...]
"""("meta", variant, meta) | ("frame", variant, index, frame) | ("event", variant, index, event) |
("counts", variant, {event: n}) | ("finished", variant, data) | ("variant", name) | ("summary", summary)"""


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    """Numbers and short strings of a log line, without the context every line carries."""
    return {k: v for k, v in d.items() if k not in _CONTEXT
            and (_is_num(v) or (isinstance(v, str) and len(v) <= 64))}


def _rates(cur: dict[str, Any], prev: dict[str, Any] | None, dt_s: float,
           specs: tuple[tuple[tuple[str, ...], str], ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    if prev is None or not dt_s > 0:
        return out
    for keys, name in specs:
        # a counter the previous line lacks (the first interval, or a counter new in this line) counted from 0
        if all(_is_num(cur.get(k)) and _is_num(prev.get(k, 0)) for k in keys):
            out[name] = round(sum(cur[k] - prev.get(k, 0) for k in keys) / dt_s, 3)
    return out


@dataclass
class _GuestLines:
    """One guest's ``tick_completed`` stats in tick order (numbers only)."""

    ticks: list[int] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)

    def at(self, tick: int) -> tuple[int, dict[str, Any]] | None:
        i = bisect.bisect_right(self.ticks, tick) - 1
        return (self.ticks[i], self.stats[i]) if i >= 0 else None


class VariantModel:
    """One variant's logs, followed: meta, frames, events, how it ended."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = Path(path)
        self.meta: dict[str, Any] = {"variant": name}
        self.frames: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.finished: dict[str, Any] | None = None
        self.left: dict[str, dict[str, Any]] = {}      # guest id -> {vt_s, reason}: guests that left
        self._host_lines: list[dict[str, Any]] = []    # the host's tick_completed lines, one per frame
        self._host_ticks: list[int] = []               # their ticks (in order), to find a frame by tick
        self._guests: dict[int, _GuestLines] = {}
        self._tails: dict[str, LogTail] = {}
        self._wall0: float | None = None
        self._config_read = False
        self._last_vt_us = 0.0

    # --- reading --------------------------------------------------------------------

    @property
    def tick_us(self) -> float:
        return float(self.meta.get("tick_us") or 10_000)

    def poll(self) -> list[Change]:
        """Read what the logs gained since the last call; return what changed."""
        changes: list[Change] = []
        if not self._config_read:
            self._read_config(changes)
        for p in sorted(self.path.glob("guest-*.jsonl")):
            if p.name not in self._tails:
                self._tails[p.name] = LogTail(p)
        self._tails.setdefault("host.jsonl", LogTail(self.path / "host.jsonl"))
        dirty_from: int | None = None
        new_events: list[tuple[str, dict[str, Any]]] = []
        # The host first: a guest line read in the same poll then finds its frame.
        for name in ["host.jsonl"] + sorted(n for n in self._tails if n != "host.jsonl"):
            gid = None if name == "host.jsonl" else _guest_id(name)
            for e in self._tails[name].read_new():
                kind = e.get("event")
                if kind == ev.TICK_COMPLETED:
                    if gid is None:
                        self._host_lines.append(e)
                        self._host_ticks.append(e["tick"] if isinstance(e.get("tick"), int) else
                                                (self._host_ticks[-1] if self._host_ticks else 0))
                        if _is_num(e.get("vt_us")):
                            self._last_vt_us = float(e["vt_us"])
                        i = len(self._host_lines) - 1
                        dirty_from = i if dirty_from is None else min(dirty_from, i)
                    elif isinstance(e.get("tick"), int):
                        i = self._add_guest_line(gid, e)
                        if i is not None:
                            dirty_from = i if dirty_from is None else min(dirty_from, i)
                    continue
                if isinstance(kind, str):
                    self.counts[kind] = self.counts.get(kind, 0) + 1
                new_events.append(("host" if gid is None else f"guest {gid}", e))
        for src, e in new_events:
            self._take_event(src, e, changes)
        if new_events:
            changes.append(("counts", self.name, dict(self.counts)))
        if dirty_from is not None:
            for i in range(dirty_from, len(self._host_lines)):
                frame = self._build_frame(i)
                if i < len(self.frames):
                    self.frames[i] = frame
                else:
                    self.frames.append(frame)
                changes.append(("frame", self.name, i, frame))
        return changes

    @property
    def bad_lines(self) -> int:
        return sum(t.bad_lines for t in self._tails.values())

    def _read_config(self, changes: list[Change]) -> None:
        cfg_path = self.path / "host-config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            return
        self._config_read = True
        guests = [g for g in cfg.get("guests") or [] if isinstance(g, dict)]
        ram = {str(g.get("id")): int(g["ram_pages"]) for g in guests if _is_num(g.get("ram_pages"))}
        mem_ref_us = (cfg.get("costs") or {}).get("mem_ref_us")
        self.meta.update({
            "scenario": cfg.get("scenario"), "variant": cfg.get("variant", self.name), "seed": cfg.get("seed"),
            "ticks": cfg.get("ticks"), "tick_us": cfg.get("tick_us"),
            "metrics_every_ticks": cfg.get("metrics_every_ticks"),
            "balloon_policy": (cfg.get("balloon") or {}).get("policy", "none"),
            "lock_protocol": (cfg.get("locks") or {}).get("protocol"),
            "guest_ram_pages": ram, "guest_ram_pages_total": sum(ram.values()),
            "mem_ref_us": mem_ref_us,
            # A guest that never waits runs one reference per mem_ref_us + cpu_us_per_ref: its ceiling.
            "refs_per_vsec_ceiling": refs_per_vsec_ceiling(cfg.get("costs")),
        })
        changes.append(("meta", self.name, dict(self.meta)))

    def _add_guest_line(self, gid: int, e: dict[str, Any]) -> int | None:
        """Keep a guest's stats; return the first frame that must be rebuilt because of them."""
        lines = self._guests.setdefault(gid, _GuestLines())
        tick = int(e["tick"])
        stats = _scalars(e)
        stats["tick"] = tick
        if lines.ticks and tick <= lines.ticks[-1]:   # a restarted guest counts from its rejoin: replace
            i = bisect.bisect_left(lines.ticks, tick)
            del lines.ticks[i:], lines.stats[i:]
        lines.ticks.append(tick)
        lines.stats.append(stats)
        i = bisect.bisect_left(self._host_ticks, tick)   # the frames at or after this tick use it
        return i if i < len(self._host_lines) else None

    def _build_frame(self, i: int) -> dict[str, Any]:
        h = self._host_lines[i]
        tick = int(h.get("tick", 0)) if isinstance(h.get("tick"), int) else 0
        vt_s = float(h["vt_us"]) / 1e6 if _is_num(h.get("vt_us")) else (tick + 1) * self.tick_us / 1e6
        prev = self.frames[i - 1] if 0 < i <= len(self.frames) else None
        # Counters start at 0 at time 0: the first frame's rates are over the run's first interval.
        prev_h = self._host_lines[i - 1] if i > 0 else {}
        dt = vt_s - prev["vt_s"] if prev is not None else vt_s
        host = _scalars(h)
        host.pop("live_guests", None)
        host.update(_rates(h, prev_h, dt, _HOST_RATES))
        w = _wall(h)
        wall_s = round(w - self._wall0, 3) if w is not None and self._wall0 is not None else None
        table = h.get("guests") if isinstance(h.get("guests"), dict) else {}
        per_guest_maps = {k: v for k, v in h.items()
                          if isinstance(v, dict) and k != "guests" and v and all(str(x).isdigit() for x in v)}
        ids = {str(k) for k in table} | {str(k) for m in per_guest_maps.values() for k in m}
        ids |= {str(g) for g in self._guests}
        guests: dict[str, Any] = {}
        for sid in sorted(ids, key=lambda s: (len(s), s)):
            hv = table.get(sid) if isinstance(table.get(sid), dict) else None
            entry: dict[str, Any] = {"host": _scalars(hv) if hv else None}
            for key, m in per_guest_maps.items():
                if _is_num(m.get(sid)):
                    entry["balloon_target_pages" if key == "balloon_targets" else key] = m[sid]
            got = self._guests.get(int(sid)).at(tick) if sid.isdigit() and int(sid) in self._guests else None
            entry["guest"] = got[1] if got else None
            rates: dict[str, float] = {}
            pg = prev["guests"].get(sid) if prev else None
            before = pg.get("guest") if pg else None
            if got and before is None and prev is None:
                before = {"tick": -1}   # the guest's first interval, from 0 at time 0
            if got and before is not None and before.get("tick") != got[0]:
                gdt = (got[0] - before["tick"]) * self.tick_us / 1e6
                rates.update(_rates(got[1], before, gdt, _GUEST_RATES))
            if hv and (pg is not None or prev is None):
                rates.update(_rates(hv, (pg or {}).get("host") or {}, dt, _HOST_VIEW_RATES))
            entry["rates"] = rates
            if sid in self.left and self.left[sid]["vt_s"] <= vt_s + 1e-9:
                entry["left"] = self.left[sid]
            guests[sid] = entry
        return {"tick": tick, "vt_s": round(vt_s, 6), "wall_s": wall_s, "host": host, "guests": guests}

    # --- events -----------------------------------------------------------------------

    def _take_event(self, src: str, e: dict[str, Any], changes: list[Change]) -> None:
        kind = e.get("event")
        if kind == ev.RUN_STARTED and src == "host":
            self._wall0 = _wall(e)
            for k in ("scenario", "variant", "seed", "tick_us", "ticks"):
                if k in e:
                    self.meta[k] = e[k]
            self.meta["started_wall"] = self._wall0
            changes.append(("meta", self.name, dict(self.meta)))
        elif kind == ev.RUN_FINISHED and src == "host":
            self.finished = {k: v for k, v in e.items() if k not in ("guests_memory", "monitors", "audit")
                             and len(json.dumps(v, default=str)) <= _MAX_FIELD_CHARS}
            if _is_num(e.get("ram_pages")):
                self.meta["host_ram_pages"] = int(e["ram_pages"])
            changes.append(("finished", self.name, self.finished))
        elif kind == ev.GUEST_DISCONNECTED and isinstance(e.get("guest"), int):
            self.left[str(e["guest"])] = {"vt_s": self._vt_s(e)[0], "reason": str(e.get("reason", "?"))}
        elif kind == ev.GUEST_CONNECTED and isinstance(e.get("guest"), int):
            self.left.pop(str(e["guest"]), None)
        if not isinstance(kind, str) or kind in NOTABLE_ROUTINE:
            return
        loud = str(e.get("level", "")).lower() in _LOUD
        if kind not in _NOTABLE_NAMES and not loud:
            return
        if len(self.events) >= MAX_EVENTS_LISTED and self.counts.get(kind, 0) > RARE_KIND:
            return
        item = self._compact(src, e)
        last = self.events[-1] if self.events else None
        if (kind == ev.BALLOON_TARGET_SET and last is not None and last["name"] == kind
                and last["tick"] == item["tick"] and last["src"] == src):
            last["data"]["targets"].update(item["data"]["targets"])
            last["data"]["previous"].update(item["data"]["previous"])
            last["text"] = _targets_text(last["data"])
            changes.append(("event", self.name, last["i"], last))
            return
        item["i"] = len(self.events)
        self.events.append(item)
        changes.append(("event", self.name, item["i"], item))

    def _vt_s(self, e: dict[str, Any]) -> tuple[float, bool]:
        """When an event happened (virtual s), and whether that is approximate."""
        if _is_num(e.get("vt_us")):
            return float(e["vt_us"]) / 1e6, False
        if isinstance(e.get("tick"), int):
            return e["tick"] * self.tick_us / 1e6, False
        cycle = e.get("cycle")
        if isinstance(cycle, list):   # a wait-for cycle closes with its latest wait
            since = [w.get("since_vt_us") for w in cycle if isinstance(w, dict) and _is_num(w.get("since_vt_us"))]
            if since:
                return max(since) / 1e6, False
        return self._last_vt_us / 1e6, True

    def _compact(self, src: str, e: dict[str, Any]) -> dict[str, Any]:
        vt_s, approx = self._vt_s(e)
        kind = str(e["event"])
        gid = e.get("guest") if isinstance(e.get("guest"), int) else None
        if kind == ev.BALLOON_TARGET_SET:
            data: dict[str, Any] = {"targets": {str(gid): e.get("target_pages")},
                                    "previous": {str(gid): e.get("previous_pages")}, "policy": e.get("policy")}
            text = _targets_text(data)
        else:
            data = {}
            for k, v in e.items():
                if k in _CONTEXT or k in _BULKY:
                    continue
                if len(json.dumps(v, default=str)) <= _MAX_FIELD_CHARS:
                    data[k] = v
            text = evidence(e, 400)
        return {"i": -1, "name": kind, "level": str(e.get("level", "info")), "src": src, "guest": gid,
                "tick": e.get("tick") if isinstance(e.get("tick"), int) else None,
                "vt_s": round(vt_s, 6), "approx": approx, "text": text, "data": data}

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.name, "meta": dict(self.meta), "frames": self.frames, "events": self.events,
                "counts": dict(self.counts), "finished": self.finished, "left": self.left,
                "bad_lines": self.bad_lines}


_NOTABLE_NAMES = frozenset(v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str))


def _targets_text(data: dict[str, Any]) -> str:
    parts = []
    for gid, t in sorted(data["targets"].items(), key=lambda kv: (len(kv[0]), kv[0])):
        prev = data["previous"].get(gid)
        parts.append(f"guest {gid} → {t} pages" + (f" (was {prev})" if prev is not None else ""))
    return "balloon targets: " + ", ".join(parts) + (f"; policy {data['policy']}" if data.get("policy") else "")


def _guest_id(file_name: str) -> int | None:
    stem = file_name.removeprefix("guest-").removesuffix(".jsonl")
    return int(stem) if stem.isdigit() else None


class RunModel:
    """A run directory: one variant at its top, or one per subdirectory (found as they appear)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run directory {self.run_dir}: no such directory")
        self.variants: dict[str, VariantModel] = {}
        self.summary: dict[str, Any] | None = None
        self._summary_mtime: float | None = None
        self.scenario: dict[str, Any] = {}
        self.polled_wall = 0.0

    def _discover(self, changes: list[Change]) -> None:
        found: list[tuple[str, Path]] = []
        if (self.run_dir / "host.jsonl").exists() or (self.run_dir / "host-config.json").exists():
            found = [(_variant_name(self.run_dir), self.run_dir)]
        else:
            subs = [p for p in self.run_dir.iterdir()
                    if p.is_dir() and ((p / "host.jsonl").exists() or (p / "host-config.json").exists())]
            from balloonlab.analysis.report import variant_order
            order = variant_order(self.run_dir, [p.name for p in subs])
            by_name = {p.name: p for p in subs}
            found = [(n, by_name[n]) for n in order]
        for name, path in found:
            if name not in self.variants:
                self.variants[name] = VariantModel(name, path)
                changes.append(("variant", name))

    def poll(self) -> list[Change]:
        changes: list[Change] = []
        self._discover(changes)
        for v in self.variants.values():
            changes += v.poll()
        path = self.run_dir / "summary.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime != self._summary_mtime:
            try:
                self.summary = json.loads(path.read_text())
                self._summary_mtime = mtime
                changes.append(("summary", self.summary))
            except (OSError, ValueError):
                pass   # being written: the next poll reads it whole
        self.polled_wall = time.time()
        return changes

    def current_variant(self) -> str | None:
        """The variant that runs now (or ran last): the last one found that has a frame, else the first."""
        with_frames = [n for n, v in self.variants.items() if v.frames]
        return with_frames[-1] if with_frames else next(iter(self.variants), None)

    def snapshot(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "variants": [v.snapshot() for v in self.variants.values()],
                "summary": self.summary, "current": self.current_variant()}

    def latest(self, last_events: int = 20) -> dict[str, Any]:
        """Per variant its meta, last frame, counts and last events: what a terminal view needs."""
        return {"run_dir": str(self.run_dir), "current": self.current_variant(), "summary": self.summary,
                "variants": [{"name": v.name, "meta": v.meta, "frame": v.frames[-1] if v.frames else None,
                              "frames": len(v.frames), "counts": v.counts, "events": v.events[-last_events:],
                              "finished": v.finished, "left": v.left} for v in self.variants.values()]}


def _variant_name(path: Path) -> str:
    try:
        return str(json.loads((path / "host-config.json").read_text()).get("variant", "default"))
    except (OSError, ValueError):
        return "default"

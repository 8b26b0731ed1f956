"""Soak benchmark: many guests for many ticks, guests killed and restarted, nothing lost, memory bounded.

    python scripts/bench.py soak [--guests 64] [--ticks 10000] [--restart-every-ticks 250]
                                 [--controllers proportional,working-set,mom] [--run-dir DIR] [--seed S]

The run is split into one phase per balloon controller (the host runs one
controller at a time; each phase is a host of its own with the same
guests). Guests get mixed workloads and replacement policies (a database
page cache, a hot anonymous heap, scans, shifting phases, zipf-skewed
memory; ESC, CLOCK, CAR, file-first), on an overcommitted host. Every
``--restart-every-ticks`` ticks one guest, picked by a seeded generator, is
SIGKILLed and a new one started under the same id: it joins the running
host as a fresh guest (``faults.jsonl`` records each kill).

Reported, per phase and overall: host RSS over wall time (sampled; its
growth from the first to the last quarter of the phase says whether host
memory is bounded), the host's frame pool and swap over virtual time, lost
pages (must be 0), invariant violations (must be 0), the end-of-run audit,
guests killed and rejoined, wall time. Written to ``soak.json`` in the run
directory; every phase leaves the usual logs and ``summary.json``.

Guests, restarted ones included, are forked from a fork server
(``balloonlab.forkserver``, one per phase, as the launcher does) unless
``--guest-start exec`` (or ``BALLOONLAB_FORKSERVER=0``) runs one
interpreter each.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

__all__ = ["main", "soak_scenario", "run_phase"]

REPO = Path(__file__).resolve().parent.parent
CONTROLLERS_DEFAULT = "proportional,working-set,mom"
RESTART_RETRIES = 20

# Mixed workloads, one per guest id modulo their number.
_WORKLOADS = [
    ("esc", [{"kind": "db", "region": "db", "weight": 3}, {"kind": "anon-hot", "region": "heap", "weight": 1}]),
    ("clock", [{"kind": "anon-hot", "region": "heap", "weight": 3}, {"kind": "scan", "region": "logs", "weight": 1}]),
    ("car", [{"kind": "phases", "region": "heap", "weight": 2, "ws_pages": 128, "phase_refs": 20_000},
             {"kind": "db", "region": "db", "weight": 1}]),
    ("file-first", [{"kind": "zipf", "region": "db", "weight": 2}, {"kind": "anon-cold", "region": "cold", "weight": 1},
                    {"kind": "anon-hot", "region": "heap", "weight": 1}]),
]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def soak_scenario(guests: int, ticks: int, controller: str, seed: int, guest_mib: float,
                  request_order: str = "deterministic") -> str:
    """The scenario of one phase, as TOML."""
    lines = [
        "[scenario]", 'name = "soak"', f"seed = {seed}", f"guests = {guests}", f"ticks = {ticks}",
        "metrics_every_ticks = 25", "watchdog_s = 10.0", "unresponsive_s = 30.0", "connect_timeout_s = 300.0", "",
        "[host]", "overcommit = 1.4", "cache_max_mib = 2", f'request_order = "{request_order}"', "",
        "[guest]", f"ram_mib = {guest_mib}", "kernel_mib = 0.25", "batch_refs = 1024",
        "regions = " + _toml([{"name": "db", "kind": "file", "mib": guest_mib * 0.4},
                              {"name": "logs", "kind": "file", "mib": guest_mib * 0.15},
                              {"name": "heap", "kind": "anon", "mib": guest_mib * 0.3},
                              {"name": "cold", "kind": "anon", "mib": guest_mib * 0.1}]), "",
    ]
    for i, (policy, workload) in enumerate(_WORKLOADS):
        ids = list(range(i, guests, len(_WORKLOADS)))
        if ids:
            lines += ["[[guests]]", f"ids = {ids}", f'policy = "{policy}"', "workload = " + _toml(workload), ""]
    lines += ["[costs]", "mem_ref_us = 10.0", "", "[balloon]", f'policy = "{controller}"', ""]
    return "\n".join(lines)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


class _Forked:
    """A guest forked by the fork server, seen through ``subprocess.Popen``'s methods the soak uses."""

    def __init__(self, loop: Any, child: Any) -> None:
        self._loop = loop
        self._child = child
        self.pid = child.pid

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    def poll(self) -> int | None:
        return self._child.returncode if self._child._exited.done() else None

    def wait(self, timeout: float | None = None) -> int | None:
        import asyncio
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(self._child.wait(), timeout), self._loop)
        try:
            return fut.result()
        except asyncio.TimeoutError:
            raise subprocess.TimeoutExpired(f"guest {self.pid}", timeout or 0.0) from None

    def send_signal(self, sig: int) -> None:
        self._loop.call_soon_threadsafe(self._child.send_signal, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _ForkLoop:
    """The launcher's fork server client (asyncio) on a loop of its own thread, for the soak's synchronous code."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        import asyncio

        from balloonlab.forkclient import ForkServer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            ForkServer.start(run_dir, env, sys.executable, _die_with_parent), self.loop).result()

    def spawn(self, name: str, args: list[str], env: dict[str, str], stderr_path: Path) -> _Forked:
        import asyncio
        child = asyncio.run_coroutine_threadsafe(
            self.server.spawn(name, args, env, stderr_path, cwd=str(REPO)), self.loop).result()
        return _Forked(self.loop, child)

    def close(self) -> None:
        import asyncio
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


class _Phase:
    """One host and its guests; restarts a guest every so often."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any], restart_every: int, rng: np.random.Generator,
                 guest_start: str = "fork") -> None:
        from balloonlab.proto.handshake import new_token
        self.dir = run_dir
        self.cfg = run_config
        self.restart_every = restart_every
        self.rng = rng
        self.token = new_token()
        self.env = dict(os.environ, BALLOONLAB_TOKEN=self.token, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        PYTHONPATH=str(REPO))
        self.guests: dict[int, Any] = {}      # subprocess.Popen, or _Forked
        self.kills: list[dict[str, Any]] = []
        self.rss: list[tuple[float, int]] = []
        self.guest_start = guest_start
        self.forks: _ForkLoop | None = None

    def _spawn(self, argv: list[str], stdout: Any, name: str) -> subprocess.Popen:
        err = open(self.dir / f"{name}.stderr", "ab")
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=err, start_new_session=True, preexec_fn=_die_with_parent)

    def _guest(self, gid: int) -> Any:
        from balloonlab.proto.handshake import guest_token
        env = dict(self.env, BALLOONLAB_TOKEN=guest_token(self.token, gid))   # its own credential only
        args = ["--address", self.address, "--guest-id", str(gid), "--log", str(self.dir / f"guest-{gid}.jsonl")]
        if self.forks is not None:
            p: Any = self.forks.spawn(f"guest-{gid}", args, env, self.dir / f"guest-{gid}.stderr")
        else:
            saved, self.env = self.env, env
            try:
                p = self._spawn(["-m", "balloonlab.guestd", *args], subprocess.DEVNULL, f"guest-{gid}")
            finally:
                self.env = saved
        self.guests[gid] = p
        return p

    def run(self) -> dict[str, Any]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cfg_path = self.dir / "host-config.json"
        cfg_path.write_text(json.dumps(self.cfg, indent=1))
        sock = self.dir / "h.sock"
        self.address = f"unix:{sock}"
        host = self._spawn(["-m", "balloonlab.hostd", "--config", str(cfg_path), "--address", self.address,
                            "--log", str(self.dir / "host.jsonl")], subprocess.PIPE, "host")
        wall0 = time.monotonic()
        try:
            if self.guest_start == "fork":
                # the server holds no credential: each guest gets its own in its spawn request
                self.forks = _ForkLoop(self.dir, {k: v for k, v in self.env.items() if k != "BALLOONLAB_TOKEN"})
            ready = self._readline(host, 60.0)
            if ready is None or "ready" not in ready:
                raise RuntimeError(f"host did not become ready: {(self.dir / 'host.stderr').read_text()[-500:]}")
            for g in self.cfg["guests"]:
                self._guest(g["id"])
            next_restart = self.restart_every if self.restart_every > 0 else None
            tick = 0
            last_sample = 0.0
            while host.poll() is None:
                msg = self._readline(host, 0.2)
                if msg is not None and "tick" in msg and isinstance(msg.get("ticks"), int):
                    tick = int(msg["tick"])
                now = time.monotonic()
                if now - last_sample >= 0.5:
                    self.rss.append((round(now - wall0, 2), _rss_kib(host.pid)))
                    last_sample = now
                # Not near the end: a guest restarted then would find the host gone and wait for it.
                if next_restart is not None and tick >= next_restart and tick < 0.9 * self.cfg["ticks"]:
                    self._restart_one(tick)
                    next_restart += self.restart_every
            host.wait()
            # Guests exit on RunEnd; one restarted too late to connect would keep retrying: stop it.
            deadline = time.monotonic() + 10.0
            for p in self.guests.values():
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        finally:
            for p in [host, *self.guests.values()]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if self.forks is not None:
                self.forks.close()
            if host.stdout is not None:
                host.stdout.close()
            for path in self.dir.glob("*.stderr"):
                if path.stat().st_size == 0:
                    path.unlink()   # keep only the ones that say something
        return {"wall_s": round(time.monotonic() - wall0, 1), "host_exit": host.returncode,
                "kills": self.kills, "rss_kib": self.rss}

    def _readline(self, host: subprocess.Popen, timeout_s: float) -> dict[str, Any] | None:
        assert host.stdout is not None
        ready, _, _ = select.select([host.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = host.stdout.readline()
        if not line:
            time.sleep(min(timeout_s, 0.05))   # EOF: the host is exiting; poll() will say so
            return None
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def _restart_one(self, tick: int) -> None:
        alive = sorted(gid for gid, p in self.guests.items() if p.poll() is None)
        if not alive:
            return
        gid = int(self.rng.choice(alive))
        old = self.guests[gid]
        old.send_signal(signal.SIGKILL)
        old.wait()
        with open(self.dir / "faults.jsonl", "a") as f:
            f.write(json.dumps({"event": "fault_injected", "level": "warning", "proc": "soak", "target": f"guest-{gid}",
                                "pid": old.pid, "signal": "SIGKILL", "tick": tick,
                                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        # The host releases the old session when it sees the connection break; until then the id is
        # taken (DUPLICATE_GUEST, exit 4), so the new guest retries.
        for _ in range(RESTART_RETRIES):
            p = self._guest(gid)
            try:
                code = p.wait(1.0)
            except subprocess.TimeoutExpired:
                break              # connected and running
            if code != 4:
                break
            time.sleep(0.1)
        self.kills.append({"guest": gid, "tick": tick})


def run_phase(run_dir: Path, guests: int, ticks: int, controller: str, seed: int, guest_mib: float,
              restart_every: int, request_order: str = "deterministic", guest_start: str = "fork") -> dict[str, Any]:
    """Run one phase; return its numbers."""
    from balloonlab import validators
    from balloonlab.analysis.summary import summarize, write_summary
    from balloonlab.scenario import Overrides, load_scenario

    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = run_dir / "scenario.toml"
    path.write_text(soak_scenario(guests, ticks, controller, seed, guest_mib, request_order))
    sc = load_scenario(path, Overrides(), validators.VALIDATORS)
    cfg = sc.run_config(next(iter(sc.variants)), f"soak-{controller}-{os.getpid()}")
    for g in cfg["guests"]:
        g["ram_pages"], g["disk_blocks"] = validators.guest_sizes(g)
        swap_area = getattr(validators, "guest_swap_area", None)
        if swap_area is not None:
            g["swap_base_block"], g["swap_blocks"] = swap_area(g)
    phase = _Phase(run_dir, cfg, restart_every, np.random.default_rng(seed), guest_start)
    res = phase.run()
    summary = summarize(run_dir)
    write_summary(run_dir, summary)
    v = next(iter(summary["variants"].values()))
    host = v.get("host", {})
    rss = np.array([r for _, r in res["rss_kib"] if r > 0], float)
    q = max(1, rss.size // 4)
    return {
        "controller": controller, "guests": guests, "ticks": v.get("ticks"), "reason": v.get("reason"),
        "wall_s": res["wall_s"], "host_exit": res["host_exit"],
        "lost_pages": v.get("lost_pages"), "invariant_violations": host.get("invariant_violations"),
        "audit_ok": v.get("audit_ok"), "audit_problems": v.get("audit_problems", [])[:5],
        "guests_killed": len(res["kills"]), "guests_rejoined": sum((v.get("guests_rejoined") or {}).values()),
        "faults_injected": v.get("faults_injected"), "rejected_requests": v.get("rejected_requests"),
        "host_rss_mib": {"min": round(float(rss.min()) / 1024, 1) if rss.size else None,
                         "max": round(float(rss.max()) / 1024, 1) if rss.size else None,
                         "first_quarter_mean": round(float(rss[:q].mean()) / 1024, 1) if rss.size else None,
                         "last_quarter_mean": round(float(rss[-q:].mean()) / 1024, 1) if rss.size else None,
                         "samples": int(rss.size)},
        "host_frames": {"total": host.get("total_frames"), "min_free": (host.get("peaks") or {}).get("min_free_frames"),
                        "peak_swap_used": (host.get("peaks") or {}).get("swap_used_slots")},
        "rss_series_kib": res["rss_kib"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.py soak", description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--ticks", type=int, default=10_000, help="ticks in all, split over the controllers")
    ap.add_argument("--controllers", default=CONTROLLERS_DEFAULT, help="comma-separated balloon controllers")
    ap.add_argument("--restart-every-ticks", type=int, default=250, help="kill and restart a guest this often (0: never)")
    ap.add_argument("--guest-mib", type=float, default=4.0, help="RAM per guest")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--request-order", choices=("deterministic", "arrival"), default="deterministic",
                    help="[host] request_order: reproducible, or served as they come (faster)")
    ap.add_argument("--guest-start", choices=("fork", "exec"), default=None,
                    help="guests forked from a fork server (default; BALLOONLAB_FORKSERVER=0: exec) or one "
                         "interpreter each")
    args = ap.parse_args(argv)
    if args.guest_start is None:
        from balloonlab.forkclient import forkserver_default
        args.guest_start = "fork" if forkserver_default() else "exec"
    if args.guests < 1 or args.ticks < 1:
        ap.error("--guests and --ticks must be >= 1")
    controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
    run_dir = args.run_dir or REPO / "runs" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    per_phase = max(1, args.ticks // len(controllers))
    print(f"soak: {args.guests} guests ({args.guest_start}), {per_phase} ticks x {len(controllers)} controllers "
          f"({', '.join(controllers)}), a guest restarted every {args.restart_every_ticks} ticks; {run_dir}",
          flush=True)
    phases = []
    for i, controller in enumerate(controllers):
        res = run_phase(run_dir / f"{i}-{controller}", args.guests, per_phase, controller, args.seed + i,
                        args.guest_mib, args.restart_every_ticks, args.request_order, args.guest_start)
        phases.append(res)
        r = res["host_rss_mib"]
        print(f"[{controller}] {res['ticks']} ticks in {res['wall_s']} s ({res['reason']}): lost pages "
              f"{res['lost_pages']}, invariant violations {res['invariant_violations']}, audit "
              f"{'ok' if res['audit_ok'] else 'FAILED ' + str(res['audit_problems'])}, {res['guests_killed']} guests "
              f"killed / {res['guests_rejoined']} rejoined; host RSS {r['first_quarter_mean']} -> "
              f"{r['last_quarter_mean']} MiB (max {r['max']})", flush=True)
    ok = all(p["lost_pages"] == 0 and p["invariant_violations"] == 0 and p["audit_ok"] and p["host_exit"] == 0
             for p in phases)
    out = {"guests": args.guests, "ticks": args.ticks, "controllers": controllers,
           "restart_every_ticks": args.restart_every_ticks, "ok": ok,
           "lost_pages": sum(p["lost_pages"] or 0 for p in phases),
           "invariant_violations": sum(p["invariant_violations"] or 0 for p in phases),
           "guests_killed": sum(p["guests_killed"] for p in phases), "phases": phases}
    (run_dir / "soak.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"soak: {'OK' if ok else 'FAILED'}: lost pages {out['lost_pages']}, invariant violations "
          f"{out['invariant_violations']}, {out['guests_killed']} guests killed and restarted; {run_dir / 'soak.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

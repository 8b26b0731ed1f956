"""The launcher's side of the guest fork server (``balloonlab.forkserver``), on asyncio.

``ForkServer.start`` starts the server and waits until it has imported the
guest; ``spawn`` asks it for a guest and returns a ``ForkedProcess``, which
looks to the runner like an ``asyncio.subprocess.Process``: ``pid``,
``returncode``, ``wait()``, ``send_signal()``. Signals go through the pidfd
the server hands over with each child, so a pid reused after the child was
reaped is never signalled. Exit statuses come from the server, which is the
children's parent and reaps them.

If the server dies, ``dead`` is set and ``death`` says how; its children die
with it (PR_SET_PDEATHSIG), are SIGKILLed through their pidfds to be sure,
and every ``wait()`` returns with ``returncode`` None and ``lost`` set, once
the child has exited (its pidfd says so): a launcher that returns then
leaves none of them running.

The launcher starts its server before it has loaded the scenario, without an
event loop and before the run directory exists (``early.start_early``: the
server's imports then overlap the launcher's), and hands it the run
directory once it has one (``ForkServer.adopt``); one server serves every
variant of a launch.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from balloonlab.early import EarlyChild, EarlyForkServer, forkserver_default, start_early

__all__ = ["EarlyChild",
           "ForkServer", "ForkedProcess", "ForkServerError", "EarlyForkServer", "start_early", "PopenProcess",
           "forkserver_default", "READY_TIMEOUT_S", "SPAWN_TIMEOUT_S", "GONE_TIMEOUT_S"]

READY_TIMEOUT_S = 120.0   # importing numpy & co on a machine loaded many times over
SPAWN_TIMEOUT_S = 60.0
GONE_TIMEOUT_S = 10.0     # a SIGKILLed child whose exit is never seen still ends its wait() after this


class ForkServerError(RuntimeError):
    """The fork server did not start, refused a guest, or died."""


class ForkedProcess:
    """A guest forked by the server: a real process with its own pid, signalled through its pidfd."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.lost = False            # the server died before it could say how this child ended
        self._pidfd: int | None = pidfd
        self._exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def send_signal(self, sig: int) -> None:
        if self._pidfd is None or self._exited.done():
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    async def wait(self) -> int | None:
        # shield: a wait_for that times out must not cancel the future others wait on
        return await asyncio.shield(self._exited)

    def _finish(self, returncode: int | None, lost: bool = False) -> None:
        if self._exited.done():
            return
        self.returncode = returncode
        self.lost = lost
        self._exited.set_result(returncode)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _lost_when_gone(self, timeout_s: float = GONE_TIMEOUT_S) -> None:
        """Its server died (nobody will reap it or say how it ended): ``wait()`` returns, ``lost``, once the
        process has exited, which its pidfd says by becoming readable; a SIGKILLed process takes a moment
        to tear down its memory, more on a loaded machine."""
        fd = self._pidfd
        if fd is None or self._exited.done():
            self._finish(None, lost=True)
            return
        self.lost = True                # known now; only the wait waits
        loop = asyncio.get_running_loop()

        def gone() -> None:
            timer.cancel()
            loop.remove_reader(fd)      # before _finish closes it
            self._finish(None, lost=True)
        loop.add_reader(fd, gone)
        timer = loop.call_later(timeout_s, gone)


class PopenProcess:
    """A ``subprocess.Popen`` child awaited on the event loop through a pidfd (it was started before the loop).

    It answers as an ``asyncio.subprocess.Process`` does: ``pid``, ``returncode``,
    ``wait()``, ``send_signal()``, ``kill()``, and ``stdout`` (a StreamReader, or None).
    """

    def __init__(self, popen: subprocess.Popen[bytes], stdout: asyncio.StreamReader | None = None) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        self._exited: asyncio.Future[None] | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)   # nothing once reaped: a reused pid is never signalled

    def kill(self) -> None:
        self._popen.kill()

    async def wait(self) -> int:
        if self._popen.poll() is not None:
            return self._popen.returncode
        if self._exited is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()
            pidfd = os.pidfd_open(self.pid)

            def on_exit() -> None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                if not exited.done():
                    exited.set_result(None)
            loop.add_reader(pidfd, on_exit)
            self._exited = exited
        await asyncio.shield(self._exited)
        return self._popen.wait()


class ForkServer:
    """One running fork server and the guests it forked."""

    def __init__(self, proc: Any, sock: socket.socket, stderr_path: Path, early_stderr: Any = None) -> None:
        self.proc = proc              # an asyncio.subprocess.Process, or a PopenProcess
        self.sock = sock
        self.stderr_path = stderr_path
        self._early_stderr = early_stderr   # an adopted server's stderr before adoption (its own copy follows)
        self.dead = asyncio.Event()
        self.death = ""
        self.preload_s = 0.0
        self.rehearsed = False        # it played a guest's first ticks before its first fork
        self.children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._replies: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._next_id = 0
        self._closing = False

    @classmethod
    async def start(cls, run_dir: Path, env: dict[str, str], python: str = sys.executable,
                    preexec_fn: Any = None, timeout_s: float = READY_TIMEOUT_S) -> "ForkServer":
        """Start the server (stderr to ``run_dir/forkserver.stderr``) and wait until it has imported the guest."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stderr_path = run_dir / "forkserver.stderr"
        try:
            with open(stderr_path, "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    python, "-m", "balloonlab.forkserver", "--control-fd", str(theirs.fileno()),
                    "--run-dir", str(run_dir), env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL, stderr=err, start_new_session=True,
                    preexec_fn=preexec_fn, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        server = cls(proc, ours, stderr_path)
        asyncio.get_running_loop().add_reader(ours.fileno(), server._on_readable)
        try:
            await server.wait_ready(timeout_s)
        except BaseException:
            await asyncio.shield(server.close())
            raise
        return server

    @classmethod
    def adopt(cls, early: EarlyForkServer, run_dir: Path) -> "ForkServer":
        """Take over a server from ``start_early`` for the run in ``run_dir`` (its stderr: ``run_dir/forkserver.stderr``).

        Returns at once; ``wait_ready`` waits for its imports.
        """
        stderr_path = run_dir / "forkserver.stderr"
        early.adopted = True
        server = cls(PopenProcess(early.popen), early.sock, stderr_path, early.stderr)
        early.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(early.sock.fileno(), server._on_readable)
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            socket.send_fds(early.sock, [json.dumps({"op": "adopt", "run_dir": str(run_dir)}).encode()], [fd])
        except OSError as exc:
            server._died(f"its control socket failed ({exc.strerror or exc})")
        finally:
            os.close(fd)
        return server

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> "ForkServer":
        """Wait until the server has imported the guest; raises ``ForkServerError`` if it does not."""
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), timeout_s)
        except asyncio.TimeoutError:
            raise ForkServerError(f"the guest fork server (pid {self.pid}) was not ready within {timeout_s:g} s"
                                  f"{self._stderr_note()}") from None
        self.preload_s = float(ready.get("preload_s", 0.0))
        self.rehearsed = ready.get("rehearsed") is True
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def spawn(self, name: str, args: list[str], env: dict[str, str], stderr_path: Path,
                    stdout_path: Path | None = None, cwd: str | None = None,
                    timeout_s: float = SPAWN_TIMEOUT_S, own_session: bool = False) -> ForkedProcess:
        """Fork a guest running ``python -m balloonlab.guestd ARGS`` with ``env``; raises ``ForkServerError``.

        The guest is its own process group in the server's session, so that the
        kernel schedules a run's guests as one group (``CONFIG_SCHED_AUTOGROUP``);
        ``own_session``: a session of its own instead, as an exec'd guest has.
        """
        if self.dead.is_set():
            raise ForkServerError(f"cannot start {name}: {self.death}")
        self._next_id += 1
        rid = self._next_id
        fut = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        req = {"op": "spawn", "id": rid, "name": name, "args": list(args), "env": env, "cwd": cwd or os.getcwd(),
               "stderr": str(stderr_path), "stdout": None if stdout_path is None else str(stdout_path),
               "python": sys.executable, "own_session": bool(own_session)}
        try:
            self.sock.send(json.dumps(req).encode())
        except OSError as exc:
            self._replies.pop(rid, None)
            self._died(f"its control socket failed ({exc.strerror or exc})")
            raise ForkServerError(f"cannot start {name}: {self.death}") from None
        try:
            reply, fds = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise ForkServerError(f"cannot start {name}: the guest fork server (pid {self.pid}) did not answer "
                                  f"within {timeout_s:g} s") from None
        finally:
            self._replies.pop(rid, None)
        if reply.get("op") != "spawned" or not fds:
            for fd in fds:
                os.close(fd)
            raise ForkServerError(f"cannot start {name}: the guest fork server said: {reply.get('error', reply)}")
        child = ForkedProcess(int(reply["pid"]), fds[0])
        for fd in fds[1:]:
            os.close(fd)
        self.children[child.pid] = child
        if child.pid in self._early_exits:   # it ended before its spawn reply was read
            child._finish(self._early_exits.pop(child.pid))
        return child

    def _on_readable(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._died(f"its control socket failed ({exc.strerror or exc})")
                return
            if not data:
                self._died("")
                return
            try:
                msg = json.loads(data)
            except ValueError:
                for fd in fds:
                    os.close(fd)
                continue
            self._dispatch(msg, list(fds))

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "ready":
            if not self._ready.done():
                self._ready.set_result(msg)
        elif op in ("spawned", "spawn_failed"):
            fut = self._replies.get(msg.get("id", -1))
            if fut is not None and not fut.done():
                fut.set_result((msg, fds))
                return
            if fds and op == "spawned":   # its spawn() gave up waiting: nobody will supervise it
                try:
                    signal.pidfd_send_signal(fds[0], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        elif op == "exited":
            pid = int(msg["pid"])
            child = self.children.get(pid)
            if child is None:
                self._early_exits[pid] = int(msg["returncode"])
            else:
                child._finish(int(msg["returncode"]))
        for fd in fds:
            os.close(fd)

    def _died(self, why: str) -> None:
        if self.dead.is_set():
            return
        loop = asyncio.get_running_loop()
        try:
            loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        live = [c for c in self.children.values() if c.returncode is None]
        for c in live:
            c.send_signal(signal.SIGKILL)   # they die with the server anyway (PR_SET_PDEATHSIG): make sure
            c._lost_when_gone()
        self.death = why
        if not self._closing:
            self.death = (f"the guest fork server (pid {self.pid}) died" + (f": {why}" if why else "") +
                          (f"; its {len(live)} running guest(s) were killed with it" if live else ""))
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(ForkServerError(self.death))
        if not self._ready.done():
            self._ready.set_exception(ForkServerError(self.death + self._stderr_note()))
            self._ready.exception()   # retrieved: start() reports it
        self.dead.set()

    async def describe_death(self, timeout_s: float = 5.0) -> str:
        """``death`` with the server's exit status and the tail of its stderr, once it has been reaped."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            return self.death
        rc = self.proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit status {rc}"
        return f"{self.death} ({how}){self._stderr_note()}"

    def _stderr_note(self) -> str:
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            data = b""
        if not data:
            data = self._early_stderr_bytes()
        tail = data[-1500:].decode(errors="replace").strip()
        return f"; its stderr ends:\n{tail}" if tail else ""

    def _early_stderr_bytes(self) -> bytes:
        """What an adopted server wrote before it took the run's stderr file (it died first, say)."""
        if self._early_stderr is None or self._early_stderr.closed:
            return b""
        self._early_stderr.seek(0)
        return self._early_stderr.read()

    async def close(self, grace_s: float = 10.0) -> None:
        """Close the control socket (the server kills what it still has and exits) and reap the server."""
        self._closing = True
        if not self.dead.is_set():
            self._died("closed")
        self.sock.close()
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except asyncio.TimeoutError:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()
        try:
            if self.stderr_path.stat().st_size == 0:
                early = self._early_stderr_bytes()   # it died before it could move there
                if early:
                    self.stderr_path.write_bytes(early)
                else:
                    self.stderr_path.unlink()
        except OSError:
            pass
        if self._early_stderr is not None:
            self._early_stderr.close()

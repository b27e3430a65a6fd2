"""Starting and stopping the application program of a session.

The program runs from an argv list (never through a shell), in its own
session and process group, with the session's values in ``SIPMESH_*``
environment variables. Stopping sends SIGTERM to the whole group (a wrapper
script and the daemon it runs alike), then SIGKILL after a grace period; once
the main process has exited, whatever is left in its group is killed too, so
no session leaves orphans behind. A program that puts itself into a new
session (``openvpn --daemon``) escapes this: run such programs in the foreground.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import stat
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

from sipmesh.agent.errors import Exit, ProfileError

log = logging.getLogger("sipmesh.agent.supervisor")

ENV_PREFIX = "SIPMESH_"


@dataclass
class ChildSpec:
    """What to run for one side of a session."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # SIPMESH_* additions
    cwd: str | None = None
    cleanup: Callable[[], None] | None = None  # after the program has stopped (temp files)

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError(f"argv must be a non-empty list of str: {self.argv!r}")
        for name, value in self.env.items():
            if "\0" in name or "\0" in value or "=" in name:
                raise ValueError(f"bad environment variable {name!r}")


def resolve_program(program: str) -> str:
    """The absolute path of `program` (a path, or a name looked up in PATH).

    Raises ProfileError (exit code PROGRAM) if it is missing, a directory, or
    not executable by us.
    """
    if os.sep in program:
        path = os.path.abspath(program)
        if not os.path.lexists(path):
            raise ProfileError(f"program not found: {program} (check the path)", Exit.PROGRAM)
    else:
        found = shutil.which(program)
        if found is None:
            raise ProfileError(f"program not found in PATH: {program} (install it, or give "
                               "its full path)", Exit.PROGRAM)
        path = os.path.abspath(found)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ProfileError(f"program not usable: {program}: {exc.strerror}", Exit.PROGRAM) from None
    if stat.S_ISDIR(mode):
        raise ProfileError(f"program is a directory: {program} (give the program in it)",
                           Exit.PROGRAM)
    if not stat.S_ISREG(mode) or not os.access(path, os.X_OK):
        raise ProfileError(f"program is not executable: {program} (chmod +x it, or run it "
                           "through its interpreter)", Exit.PROGRAM)
    return path


def dies_with_us(argv: list[str]) -> list[str]:
    """`argv` under ``setpriv --pdeathsig TERM`` (util-linux) where it is installed: a
    helper daemon of ours (wireguard-go, a member relay's turnserver) then goes when we are
    killed outright (SIGKILL, OOM), instead of staying behind and answering for us."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv is not None else list(argv)


def child_environment(extra: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The inherited environment without stale SIPMESH_* values, plus `extra`."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(ENV_PREFIX) or k in ("SIPMESH_PASSWORD_FILE",)}
    env.pop("SIPMESH_PASSWORD", None)  # never hand our SIP password to the application
    env.update(extra)
    return env


class Child:
    """A running program.

    `exited` resolves with the main process's exit status (negative: killed by that
    signal) as soon as it exits; `finished` once its whole process group is gone
    and the spec's cleanup has run.
    """

    def __init__(self, pid: int, wait: Callable[[], Awaitable[int]], spec: ChildSpec, name: str,
                 grace: float) -> None:
        self.spec = spec
        self.name = name
        self.grace = grace
        self.pid = pid
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.finished: asyncio.Future[int] = loop.create_future()
        self._stopping = False
        self._waiter = asyncio.ensure_future(self._wait(wait))

    @classmethod
    async def start(cls, spec: ChildSpec, *, name: str = "application", grace: float = 5.0) -> "Child":
        try:
            pid, wait = await _launch(spec)
        except OSError as exc:
            if spec.cleanup is not None:
                spec.cleanup()
            raise ProfileError(f"cannot start {spec.argv[0]}: {exc.strerror or exc}",
                               Exit.PROGRAM) from None
        log.info("started %s (pid %d): %s", name, pid, " ".join(spec.argv))
        return cls(pid, wait, spec, name, grace)

    async def _wait(self, wait: Callable[[], Awaitable[int]]) -> None:
        try:
            status = await wait()
            if not self._stopping:
                log.info("%s (pid %d) exited with status %s", self.name, self.pid, status)
            self.exited.set_result(status)
            await self._drain_group()
        finally:
            if self.spec.cleanup is not None:
                try:
                    self.spec.cleanup()
                except OSError as exc:
                    log.warning("cleanup after %s failed: %s", self.name, exc)
            if not self.exited.done():
                self.exited.set_result(-signal.SIGKILL)
            self.finished.set_result(self.exited.result())

    def _group_alive(self) -> bool:
        return self._kill_group(0)

    async def _drain_group(self) -> None:
        """What the main process left in its group (a wrapper's daemon): TERM, then KILL."""
        if not self._group_alive():
            return
        self._kill_group(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while self._group_alive() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._kill_group(signal.SIGKILL):
            log.warning("killed what %s (pid %d) left behind", self.name, self.pid)
            for _ in range(40):  # bounded: the kernel reaps them within milliseconds
                if not self._group_alive():
                    break
                await asyncio.sleep(0.05)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def _kill_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    async def stop(self, grace: float | None = None) -> int:
        """SIGTERM to the group, SIGKILL after `grace` seconds; returns the exit status
        once the whole group is gone."""
        grace = self.grace if grace is None else grace
        if not self.exited.done():
            self._stopping = True
            log.info("stopping %s (pid %d)", self.name, self.pid)
            self._kill_group(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self.exited)
            except asyncio.TimeoutError:
                log.warning("%s (pid %d) ignored SIGTERM for %gs: SIGKILL", self.name, self.pid, grace)
                self._kill_group(signal.SIGKILL)
        return await asyncio.shield(self.finished)


async def _launch(spec: ChildSpec) -> tuple[int, Callable[[], Awaitable[int]]]:
    """Start the program in a new session with stdin from /dev/null; (pid, wait for exit).

    posix_spawn (vfork+exec, no watcher thread) and a pidfd in the event loop where Linux
    has them; asyncio's subprocess support otherwise (or when a working directory is set).
    """
    env = child_environment(spec.env)
    if spec.cwd is None and hasattr(os, "pidfd_open") and hasattr(os, "posix_spawnp"):
        pid = os.posix_spawnp(spec.argv[0], spec.argv, env, setsid=True,
                              file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # an old kernel: poll instead
            return pid, lambda: _poll_exit(pid)
        return pid, lambda: _pidfd_exit(pid, pidfd)
    process = await asyncio.create_subprocess_exec(
        *spec.argv, env=env, cwd=spec.cwd, stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    return process.pid, process.wait


async def _pidfd_exit(pid: int, pidfd: int) -> int:
    loop = asyncio.get_running_loop()
    try:
        readable = loop.create_future()
        loop.add_reader(pidfd, lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(pidfd)
        return _reap(pid)
    finally:
        os.close(pidfd)


async def _poll_exit(pid: int) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(0.05)


def _reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)

"""The supervisor with real child processes: argv without a shell, SIPMESH_* env, process
groups, SIGTERM then SIGKILL, leftovers of wrapper scripts, program checks."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from sipmesh.agent.errors import Exit, ProfileError
from sipmesh.agent.supervisor import Child, ChildSpec, child_environment, resolve_program
from tests.lab import pid_alive, wait_for_async


async def _wait_file(path, timeout=5.0) -> str:
    """The text of `path` once something was written to it."""
    return await wait_for_async(lambda: path.exists() and path.read_text().strip() and path.read_text(),
                                timeout, 0.02, what=f"{path} written")


async def test_argv_is_not_a_shell_and_env_carries_the_values(tmp_path):
    out = tmp_path / "out"
    hostile = "$(touch {0}/pwned); `touch {0}/pwned2`; echo x > {0}/pwned3".format(tmp_path)
    script = 'printf "%s\\n" "$1" "$SIPMESH_PORT" "${SIPMESH_PASSWORD:-none}" > "$0.out"'
    child = await Child.start(ChildSpec(["/bin/sh", "-c", script, str(out), hostile],
                                        env={"SIPMESH_PORT": "8000"}))
    assert await asyncio.wait_for(child.finished, 5) == 0
    lines = (tmp_path / "out.out").read_text().splitlines()
    assert lines == [hostile, "8000", "none"]
    assert not list(tmp_path.glob("pwned*"))


def test_child_environment_drops_stale_values_and_our_password():
    env = child_environment({"SIPMESH_PORT": "1"}, base={"PATH": "/bin", "SIPMESH_PORT": "9",
                                                        "SIPMESH_PEER": "old",
                                                        "SIPMESH_PASSWORD": "secret"})
    assert env == {"PATH": "/bin", "SIPMESH_PORT": "1"}


async def test_stop_terms_the_whole_group(tmp_path):
    pids = tmp_path / "pids"
    script = f'sleep 60 & echo $$ $! > {pids}; wait'
    child = await Child.start(ChildSpec(["/bin/sh", "-c", script]))
    shell, sleeper = map(int, (await _wait_file(pids)).split())
    assert os.getpgid(sleeper) == child.pid != os.getpgid(0)  # own group
    status = await asyncio.wait_for(child.stop(grace=3), 10)
    assert status < 0 and not pid_alive(shell) and not pid_alive(sleeper)


async def test_sigkill_after_the_grace_period(tmp_path):
    ready = tmp_path / "ready"
    script = f"trap '' TERM; echo ok > {ready}; while :; do sleep 0.1; done"
    child = await Child.start(ChildSpec(["/bin/sh", "-c", script]), grace=0.5)
    await _wait_file(ready)
    t0 = time.monotonic()
    status = await asyncio.wait_for(child.stop(), 10)
    assert status == -9 and 0.4 < time.monotonic() - t0 < 5


async def test_leftovers_of_an_exited_wrapper_are_stopped(tmp_path):
    pids = tmp_path / "pids"
    # the wrapper exits at once, leaving a daemon-like child in its group
    child = await Child.start(ChildSpec(["/bin/sh", "-c", f"sleep 60 & echo $! > {pids}"]),
                              grace=2)
    assert await asyncio.wait_for(child.exited, 5) == 0
    orphan = int(await _wait_file(pids))
    await asyncio.wait_for(child.finished, 10)
    assert not pid_alive(orphan)


async def test_cleanup_runs_after_the_program_stopped(tmp_path):
    marker = tmp_path / "cleaned"
    child = await Child.start(ChildSpec(["/bin/true"], cleanup=lambda: marker.write_text("y")))
    await asyncio.wait_for(child.finished, 5)
    assert marker.read_text() == "y"


def test_resolve_program_errors(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    for program, message in ((str(tmp_path / "missing"), "program not found"),
                             ("no-such-program-sipmesh", "not found in PATH"),
                             (str(tmp_path), "is a directory"),
                             (str(plain), "not executable")):
        with pytest.raises(ProfileError, match=message) as info:
            resolve_program(program)
        assert info.value.code == Exit.PROGRAM
    assert resolve_program("sh").endswith("/sh")
    plain.chmod(0o755)
    assert resolve_program(str(plain)) == str(plain)

"""sippy (tests/peers/sippy_peer.py) as a process of a test: start it, read its events."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.lab import ManagedProcess, wait_for

SIPPY_PEER = Path(__file__).parent / "sippy_peer.py"
needs_sippy = pytest.mark.skipif(importlib.util.find_spec("sippy") is None,
                                 reason="sippy is not installed (pip install sippy)")


def sippy_events(proc: ManagedProcess) -> list[dict]:
    """The JSON events sippy_peer.py printed so far."""
    return [json.loads(line) for line in proc.log_text().splitlines()
            if line.startswith('{"event"')]


async def start_sippy(spawn_proc: Callable[..., ManagedProcess], *args: str) -> ManagedProcess:
    """sippy_peer.py ARGS, once it says it is ready."""
    proc = spawn_proc([sys.executable, str(SIPPY_PEER), *args], name=f"sippy_{args[0]}")
    await asyncio.to_thread(wait_for, lambda: any(e["event"] == "ready" for e in sippy_events(proc)),
                            15, what="sippy ready", abort=proc.exit_reason)
    return proc

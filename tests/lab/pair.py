"""Two SIP servers serving one domain in the NAT lab (issue 13): what a pair test needs
whichever the servers are (two `sipmesh broker`s, two Kamailio instances).

* ``agent``: `sipmesh serve|call` behind a home router, registered at every server given;
* ``tunnel_ping``: a ping over a running tunnel; ``assert_ping_unbroken`` checks it ran
  without loss of the session (every interval answered but a couple);
* ``server_called``: which of the servers a caller's INVITE went to (its log says).
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from sipmesh.lab.natsite import SIPMESH, password
from sipmesh.lab.procs import ManagedProcess, spawn

PING_INTERVAL = 0.2


def agent(lab, run: Path, servers: list[str], mode: str, host: str, user: str, *extra: str,
          target: str | None = None) -> ManagedProcess:
    """`sipmesh MODE [TARGET] --server S1 --server S2 ... --user USER` on ``lab[host]``."""
    argv = [SIPMESH, mode, *([target] if target else []),
            *(arg for server in servers for arg in ("--server", server)),
            "--user", user, "--password", password(user),
            "--state-dir", str(run / f"state-{user}"), "-v", *extra]
    return spawn(argv, netns=lab[host].ns, cwd=run, name=f"{mode}-{user}",
                 log_path=run / f"{mode}-{user}.log")


def tunnel_ping(lab, host: str, address: str, run: Path, seconds: int = 120) -> ManagedProcess:
    """ping ADDRESS from ``lab[host]`` every PING_INTERVAL s, for at most `seconds`."""
    return spawn(["ping", "-n", "-i", str(PING_INTERVAL), "-w", str(seconds), address],
                 netns=lab[host].ns, name="ping", log_path=run / "ping.log")


def assert_ping_unbroken(ping: ManagedProcess, since: float) -> None:
    """Stop `ping`: it ran the whole time since `since` (monotonic) and lost at most two."""
    pinged = time.monotonic() - since
    assert ping.stop(grace=5, sig=signal.SIGINT) == 0, ping.log_tail(10)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received",
                                        ping.log_text()).groups())
    assert sent >= pinged / PING_INTERVAL * 0.8 and received >= sent - 2, ping.log_tail(5)


def server_called(call: ManagedProcess, user: str, hosts: list[str]) -> int:
    """The index in `hosts` of the server the caller sent its INVITE for `user` to."""
    found = re.search(rf"calling sip:{re.escape(user)}@([0-9.]+):", call.log_text())
    assert found and found.group(1) in hosts, call.log_tail(20)
    return hosts.index(found.group(1))

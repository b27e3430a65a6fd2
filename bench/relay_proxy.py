#!/usr/bin/env python3
"""Throughput of a relayed UDP path through sipmesh's proxy (agent/handover.py), on loopback.

coturn on 127.0.0.1; two ICE sessions, one gathering only a relay candidate, so the path
runs program -> our proxy -> ChannelData -> coturn -> the other program. Two programs in a
separate process push 1200-byte datagrams through it for --seconds, at most --window
in flight (sent but not yet received), so that the rate finds the path's knee instead
of measuring drops. For comparison the same through aioice's own TURN transport (which
starts a task per datagram), driven from this process. Reported: Mbit/s delivered and
the loss. Loopback and 2 shared cores: the
figures are CPU-bound and move with the machine's load.

    .venv/bin/python bench/relay_proxy.py [--seconds 3]

Everything listens on 127.0.0.1 only; coturn is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipmesh.agent.handover import Handover  # noqa: E402
from sipmesh.agent.ice import IceConfig, IceSession, render  # noqa: E402
from sipmesh.sip.auth import compute_ha1  # noqa: E402
from sipmesh.lab.coturn import Coturn  # noqa: E402

SIZE = 1200


async def pair(server: tuple[str, int]) -> tuple[IceSession, IceSession]:
    base = IceConfig(host_addresses=("127.0.0.1",), connect_timeout=5)
    relay_only = IceConfig(host_addresses=(), turn_server=server, turn_username="bench",
                           turn_password="pw", turn_transport="udp", connect_timeout=5)
    caller, callee = IceSession(base, controlling=True), IceSession(relay_only, controlling=False)
    offer, answer = await asyncio.gather(caller.gather(), callee.gather())
    await asyncio.gather(caller.connect(caller.read_remote(render(answer))),
                         callee.connect(callee.read_remote(render(offer))))
    return caller, callee


# The two programs: a sender bound to its LOCAL_PORT sending to its REMOTE, a receiver
# bound to its LOCAL_PORT; at most WINDOW datagrams in flight. Prints "received sent seconds".
PROGRAMS = r'''
import socket, sys, threading, time
send_port, dest_ip, dest_port, recv_port, seconds, window, size = sys.argv[1:8]
seconds, window, size = float(seconds), int(window), int(size)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
rx.bind(("127.0.0.1", int(recv_port)))
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.bind(("127.0.0.1", int(send_port)))
got = [0]
def count():
    rx.settimeout(1.0)
    try:
        while True:
            rx.recv(2048); got[0] += 1
    except socket.timeout:
        pass
t = threading.Thread(target=count); t.start()
payload, sent, start = b"x" * size, 0, time.monotonic()
while time.monotonic() - start < seconds:
    if sent - got[0] < window:
        tx.sendto(payload, (dest_ip, int(dest_port))); sent += 1
    else:
        time.sleep(0.0002)
elapsed = time.monotonic() - start
t.join()
print(got[0], sent, elapsed)
'''


async def proxied(server: tuple[str, int], seconds: float, window: int) -> tuple[float, float]:
    caller, callee = await pair(server)
    mine, theirs = await asyncio.gather(Handover.take(caller), Handover.take(callee))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROGRAMS, str(theirs.endpoint.local_port),
        theirs.endpoint.remote_ip, str(theirs.endpoint.remote_port),
        str(mine.endpoint.local_port), str(seconds), str(window), str(SIZE),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    for h in (mine, theirs):
        await h.close()
    got, sent, elapsed = out.split()
    return int(got) * SIZE * 8 / float(elapsed) / 1e6, 1 - int(got) / int(sent)


async def through_aioice(server: tuple[str, int], seconds: float, window: int
                         ) -> tuple[float, float]:
    caller, callee = await pair(server)
    got, sent = 0, 0
    payload, end = b"x" * SIZE, time.monotonic() + seconds

    async def receive() -> None:
        nonlocal got
        while True:
            await caller.connection.recvfrom()
            got += 1

    task = asyncio.ensure_future(receive())
    start = time.monotonic()
    while time.monotonic() < end:
        if sent - got < window:
            await callee.connection.sendto(payload, 1)
            sent += 1
        else:
            await asyncio.sleep(0)
    elapsed = time.monotonic() - start
    await asyncio.sleep(0.5)
    task.cancel()
    await caller.close()
    await callee.close()
    return got * SIZE * 8 / elapsed / 1e6, 1 - got / sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run:
        server = Coturn(run, "127.0.0.1", realm="bench",
                        users={"bench": compute_ha1("bench", "bench", "pw")}).start()
        try:
            for name, run_one in (("sipmesh proxy (ChannelData)", proxied),
                                  ("aioice TURN transport", through_aioice)):
                mbit, loss = asyncio.run(run_one(server.address, args.seconds, args.window))
                print(f"{name:30s} {mbit:8.1f} Mbit/s delivered, loss {loss:.1%}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()

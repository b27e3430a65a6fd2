"""One side of an ICE session (sipmesh.agent.ice) inside a lab host, driven over stdio.

    iceprobe.py
        reads   CONFIG_JSON (one line; credentials stay off the command line):
                {"controlling": bool, "stun": [ip, port] | null, "turn": [ip, port] | null,
                      "user": str, "password": str, "transport": "auto"|"udp"|"tcp",
                      "timeout": seconds}
    prints  {"local": [[name, value], ...], "started": t}   our a= lines; when gathering began
    reads   [[name, value], ...]                        the peer's a= lines (one JSON line)
    prints  {"path": {...}} or {"error": str, "path": {...}}
    then the controlling side sends "ping N" and the other answers "pong N" (3 times) and
    prints {"data": [...], "first": t} with what it received and when the first datagram
    came (t: time.monotonic(), one clock for every namespace: bench/nat.py subtracts them).
    With "hold": true it then reads one more line (sent when the test cuts the path) and
    prints {"closed_after": seconds} once consent to send has expired.

    iceprobe.py stun PORT
        a STUN Binding responder on UDP PORT (what the broker does on its SIP port);
        prints {"ready": PORT} (the port it got, for PORT 0)
"""

from __future__ import annotations

import sys

if sys.path and sys.path[0] == __import__("os").path.dirname(__file__):
    del sys.path[0]   # run as a script: tests/lab/dns.py would shadow dnspython

import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

from aioice import stun  # noqa: E402

from sipmesh.agent.ice import IceConfig, IceError, IceSession, render  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def session(config: dict) -> None:
    ice = IceSession(IceConfig(
        stun_server=tuple(config["stun"]) if config.get("stun") else None,
        turn_server=tuple(config["turn"]) if config.get("turn") else None,
        turn_username=config.get("user"), turn_password=config.get("password"),
        turn_transport=config.get("transport", "auto"), use_ipv6=False,
        connect_timeout=config.get("timeout", 10.0)), controlling=config["controlling"])
    try:
        started = time.monotonic()   # CLOCK_MONOTONIC: one clock for every namespace
        emit(local=render(await ice.gather()), started=started)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        remote = ice.read_remote([tuple(a) for a in json.loads(line)])
        try:
            path = await ice.connect(remote)
        except IceError as e:
            emit(error=str(e), path=dataclasses.asdict(e.report) if e.report else None)
            return
        emit(path=dataclasses.asdict(path))
        got = []
        first = None
        conn = ice.connection
        for n in range(3):
            if config["controlling"]:
                await conn.sendto(f"ping {n}".encode(), 1)
                data, _ = await asyncio.wait_for(conn.recvfrom(), 5)
            else:
                data, _ = await asyncio.wait_for(conn.recvfrom(), 5)
                await conn.sendto(data.replace(b"ping", b"pong"), 1)
            first = first or time.monotonic()
            got.append(data.decode())
        emit(data=got, first=first)
        if config.get("hold"):
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            start = asyncio.get_running_loop().time()
            await asyncio.wait_for(ice.wait_closed(), 60)
            emit(closed_after=asyncio.get_running_loop().time() - start,
                 consent_expired=ice.consent_expired)
    finally:
        await ice.close()


def stun_responder(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    emit(ready=s.getsockname()[1])
    while True:
        data, addr = s.recvfrom(2048)
        try:
            request = stun.parse_message(data)
        except ValueError:
            continue
        if request.message_method == stun.Method.BINDING and \
                request.message_class == stun.Class.REQUEST:
            response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                    transaction_id=request.transaction_id)
            response.attributes["XOR-MAPPED-ADDRESS"] = addr
            s.sendto(bytes(response), addr)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(relativeCreated)6d %(name)s %(message)s")
    if sys.argv[1:2] == ["stun"]:
        stun_responder(int(sys.argv[2]))
    else:
        asyncio.run(session(json.loads(sys.stdin.readline())))

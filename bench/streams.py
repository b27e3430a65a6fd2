#!/usr/bin/env python3
"""Throughput of TCP carried over QUIC streams on an ICE-checked path (agent/streams.py), on
loopback, against a direct TCP connection.

Two processes, as two agents would be: the caller (listens on a local port, QUIC client)
and the answerer (QUIC server, connects to the sink). They run real ICE on 127.0.0.1 (the
descriptions and certificate fingerprints are passed through this process, as SDP would
carry them), then the source here sends --size MB through the caller's port and,
alternately, directly to the sink, --runs times each; the sink reads to EOF and answers with
the byte count. The medians are compared; the CPU each agent spent per GB is printed too
(everything here is CPU-bound: aioquic is Python, every 1350-byte datagram costs a few
tens of microseconds on each side).

    .venv/bin/python bench/streams.py [--size 200] [--runs 3]

The yardstick in TESTING.md: a pure-Python UDP relay moves 170-240 Mbit/s on this kind
of machine. Everything listens on 127.0.0.1 only; both agents are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
CHUNK = 1 << 20


# ------------------------------------------------------------------------- one agent (child)


async def agent(side: str, directory: str) -> None:
    from sipmesh.agent.certs import host_certificate
    from sipmesh.agent.ice import IceConfig, IceSession, render
    from sipmesh.agent.streams import StreamTransport

    loop = asyncio.get_running_loop()

    async def line() -> dict:
        return json.loads(await loop.run_in_executor(None, sys.stdin.readline))

    def say(**fields) -> None:
        print(json.dumps(fields), flush=True)

    cert = host_certificate(Path(directory) / side)
    ice = IceSession(IceConfig(host_addresses=("127.0.0.1",)), controlling=side == "caller")
    say(local=render(await ice.gather()), fingerprint=cert.fingerprint)
    peer = await line()
    await ice.connect(ice.read_remote([tuple(a) for a in peer["local"]]))
    transport = StreamTransport(ice.connection, client=side == "caller", certificate=cert,
                                peer_fingerprint=peer["fingerprint"],
                                target=tuple(peer["sink"]) if side == "answerer" else None)
    await transport.start()
    port = await transport.listen() if side == "caller" else None
    say(ready=port)
    await line()                                   # anything: stop
    usage = os.times()
    await transport.close()
    await ice.close()
    say(cpu=usage.user + usage.system)


# ------------------------------------------------------------------------- the parent


def sink_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            total = 0
            while chunk := conn.recv(CHUNK):
                total += len(chunk)
            conn.sendall(str(total).encode())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def send(port: int, size_mb: int) -> float:
    block = os.urandom(CHUNK)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(size_mb):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = s.recv(64)
    seconds = time.monotonic() - start
    if int(answer) != size_mb * CHUNK:
        raise SystemExit(f"the sink got {answer!r} bytes, not {size_mb * CHUNK}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=200, help="MB per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        asyncio.run(agent(args.side, args.dir))
        return 0

    server, sink = sink_server()
    with tempfile.TemporaryDirectory() as directory:
        procs = {side: subprocess.Popen([sys.executable, __file__, "--side", side, "--dir", directory],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for side in ("caller", "answerer")}
        try:
            def read(side: str) -> dict:
                text = procs[side].stdout.readline()
                if not text:
                    raise SystemExit(f"the {side} ended early")
                return json.loads(text)

            def write(side: str, **fields) -> None:
                procs[side].stdin.write(json.dumps(fields) + "\n")
                procs[side].stdin.flush()

            hello = {side: read(side) for side in procs}
            write("caller", **hello["answerer"])
            write("answerer", **hello["caller"], sink=["127.0.0.1", sink])
            port = read("caller")["ready"]
            read("answerer")
            streams, direct = [], []
            for _ in range(args.runs):
                streams.append(send(port, args.size))
                direct.append(send(sink, args.size))
            for side in procs:
                write(side, stop=True)
            cpu = {side: read(side)["cpu"] for side in procs}
        finally:
            for proc in procs.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            server.close()

    def rate(seconds: list[float]) -> float:
        return args.size * CHUNK * 8 / statistics.median(seconds) / 1e6

    gb = args.size * args.runs * CHUNK / 1e9
    print(f"{args.size} MB x {args.runs}, loopback, median:")
    print(f"  direct TCP                  {rate(direct):8.0f} Mbit/s")
    print(f"  TCP over QUIC streams (ICE) {rate(streams):8.0f} Mbit/s  "
          f"({rate(streams) / rate(direct):.3f} of direct)")
    busiest = max(cpu.values()) / gb
    print(f"  CPU per GB: caller {cpu['caller'] / gb:.1f} s, answerer {cpu['answerer'] / gb:.1f} s"
          f"  (one idle core per agent: {8000 / busiest:.0f} Mbit/s)")
    print("  (TESTING.md: a pure-Python UDP relay moves 170-240 Mbit/s here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""CPU per REGISTER inside one broker worker, without the kernel and without SIPp.

Feeds SIPp-like REGISTER datagrams (no auth, or the full 401 + digest exchange) to a
real `Broker` on 127.0.0.1 through the entry point a received datagram takes
(`TransportLayer.receive_datagram`: the broker's datagram filter, then the parser),
lets each group commit run, and reports the process CPU time per registration, less
what playing the client cost. The answers really go out over UDP to a socket of ours, which reads and checks them. What it leaves out on purpose:
the recvfrom() of the request and the event loop's wake-up, which
bench/broker_vs_kamailio.py measures with the rest under real load.

    .venv/bin/python bench/register_path.py [--count 20000] [--digest] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sipmesh.broker.server import Broker, BrokerConfig  # noqa: E402
from sipmesh.broker.users import UsersFile  # noqa: E402
from sipmesh.sip.auth import DigestClient  # noqa: E402
from sipmesh.sip.transport.base import Flow  # noqa: E402

BATCH = 50  # datagrams fed between two turns of the event loop


def register(user: str, port: int, call: int, cseq: int, broker: str, authorization: str = "") -> bytes:
    """What SIPp's reg_noauth.xml / reg_auth.xml send."""
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    return (f"REGISTER sip:{broker} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call}-{cseq}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:{user}@{broker}>;tag={call}SIPpTag00{call}\r\n"
            f"To: <sip:{user}@{broker}>\r\n"
            f"Call-ID: {call}-bench@127.0.0.1\r\n"
            f"CSeq: {cseq} REGISTER\r\n"
            f"Contact: <sip:{user}@127.0.0.1:{port};transport=UDP>\r\n"
            f"{auth}Expires: 3600\r\n"
            "User-Agent: sipp-reg\r\n"
            "Content-Length: 0\r\n\r\n").encode()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    users = [(f"u{i:06d}", f"pwu{i:06d}") for i in range(1, args.count + 1)]
    config = BrokerConfig(listen=[("127.0.0.1", 0)], transports=("UDP",), domains=["127.0.0.1"],
                          db_path=workdir / "broker.db", rate_limit=0, stats_interval=0,
                          purge_interval=0, commit_window=0)
    if args.digest:
        file = UsersFile(workdir / "users")
        for user, password in users:
            file.add("127.0.0.1", user, password)
        file.save()
        config.users_file, config.auth_algorithms = workdir / "users", ("MD5",)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sink.setblocking(False)
    port = sink.getsockname()[1]
    flow = Flow("UDP", "127.0.0.1", port)
    broker = Broker(config)
    await broker.start()
    host, bport = broker.address("UDP")
    target = f"{host}:{bport}"
    assert broker.transport is not None
    transport = broker.transport

    def feed(data: bytes) -> None:
        transport.receive_datagram(data, flow)

    answers: dict[int, int] = {}
    client = [0.0]  # CPU seconds spent playing the client: not the broker's

    def drain() -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sink.recv(65535))
            except BlockingIOError:
                return out

    async def settle() -> list[bytes]:
        for _ in range(3):
            await asyncio.sleep(0)
        c = time.process_time()
        got = drain()
        for reply in got:
            status = int(reply[8:11])
            answers[status] = answers.get(status, 0) + 1
        client[0] += time.process_time() - c
        return got

    def requests(make) -> list[bytes]:  # type: ignore[no-untyped-def]
        c = time.process_time()
        out = [make(i, user, password) for i, (user, password) in chunk]
        client[0] += time.process_time() - c
        return out

    profile = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if profile:
        profile.enable()
    for start in range(0, len(users), BATCH):
        chunk = list(enumerate(users[start:start + BATCH], start))
        for data in requests(lambda i, user, password: register(user, port, i, 1, target)):
            feed(data)
        replies = await settle()
        if args.digest:
            challenges = {}
            for reply in replies:
                head = reply.decode()
                call = int(head.split("Call-ID: ", 1)[1].split("-", 1)[0])
                challenges[call] = head.split("WWW-Authenticate: ", 1)[1].split("\r\n", 1)[0]
            for data in requests(lambda i, user, password: register(
                    user, port, i, 2, target,
                    DigestClient(user, password).authorize(challenges[i], "REGISTER", f"sip:{target}"))):
                feed(data)
            await settle()
    if profile:
        profile.disable()
    cpu, wall = time.process_time() - c0 - client[0], time.perf_counter() - t0
    for _ in range(20):
        if sum(answers.values()) >= len(users) * (2 if args.digest else 1):
            break
        await asyncio.sleep(0.01)
        await settle()
    await broker.stop()
    sink.close()
    if profile:
        stats = pstats.Stats(profile).sort_stats("tottime")
        stats.print_stats(30)
        stats.print_callers("message.py.*\\((get|get_all)\\)")
    return {"cpu": cpu, "wall": wall, "answers": answers}  # type: ignore[dict-item]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20000, help="registrations [20000]")
    p.add_argument("--digest", action="store_true", help="REGISTER -> 401 -> REGISTER with MD5 digest")
    p.add_argument("--profile", action="store_true", help="print the 30 costliest functions")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sipmesh-regpath-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    want = {200: args.count} | ({401: args.count} if args.digest else {})
    ok = result["answers"] == want
    missing = "" if ok else f" (expected {want})"
    print(f"{'digest' if args.digest else 'no auth'}: {args.count} registrations, "
          f"{1e6 * result['cpu'] / args.count:.1f} CPU-µs each "
          f"(wall time with the client: {1e6 * result['wall'] / args.count:.1f} µs); answers {result['answers']}{missing}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

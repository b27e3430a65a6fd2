"""Live fuzzing: hostile bytes over UDP and TCP to a running broker and agent, with valid
requests interleaved that must still be answered. Runs inside a network namespace that has
only `lo` (the seeds name foreign hosts; nothing answered to them can leave), started by
tests/test_live_fuzz.py, and prints a JSON report on its last line:

    python -m tests.fuzz.live --broker 127.0.0.1:5060 --agent 127.0.0.1:5070 --user 2500 \
        --datagrams 3000 --rate 500 --seed 1

Everything is bounded: the number of datagrams, connections and bytes, the send rate, and
every wait for an answer.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import secrets
import select
import socket
import time

from tests.fuzz.runner import seed_files
from tests.peers.raw import RawPeer, is_final

MAX_DATAGRAM = 65_507


# -- mutations ------------------------------------------------------------------------------

def _huge_content_length(rng: random.Random, data: bytes) -> bytes:
    value = rng.choice([b"4294967295", b"99999999999999999999", b"-1", b"65536", b"1e9", b""])
    out, n = re.subn(rb"(?im)^(content-length|l)[ \t]*:[^\r\n]*", b"Content-Length: " + value, data, 1)
    return out if n else data.replace(b"\r\n", b"\r\nContent-Length: " + value + b"\r\n", 1)


def _many_headers(rng: random.Random, data: bytes) -> bytes:
    line = rng.choice([b"Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK", b"X-Fuzz: a", b"Route: <sip:x;lr>",
                       b"Contact: <sip:a@127.0.0.1>", b"v:"])
    count = rng.choice([101, 1000, 3000])
    return data.replace(b"\r\n", b"\r\n" + (line + b"\r\n") * count, 1)


def _long_line(rng: random.Random, data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\r\nSubject: " + b"x" * rng.choice([8193, 20000, 60000]) + b"\r\n", 1)


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _cut(rng: random.Random, data: bytes) -> bytes:
    a = rng.randrange(len(data) + 1)
    b = min(len(data), a + rng.randint(1, 64))
    return data[:a] + data[b:]


def _repeat(rng: random.Random, data: bytes) -> bytes:
    a = rng.randrange(len(data) + 1)
    piece = data[a : a + rng.randint(1, 64)]
    return data[:a] + piece * rng.randint(2, 50) + data[a:]


def _special(rng: random.Random, data: bytes) -> bytes:
    a = rng.randrange(len(data) + 1)
    token = rng.choice([b"\r", b"\n", b"\0", b"\xff\xfe", b"%00", b"[", b"]", b":", b";", b",", b"<", b">",
                        b'"', b"\\", b" ", b"\t", b"sip:", b"SIP/2.0", b"\r\n\r\n", b"::", b"=" * 10])
    return data[:a] + token + data[a:]


def _splice(rng: random.Random, data: bytes, other: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]


SMALL = [_flip, _cut, _repeat, _special]
LARGE = [_huge_content_length, _many_headers, _long_line]


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = rng.choice(seeds)
    roll = rng.random()
    if roll < 0.15:
        data = rng.choice(LARGE)(rng, data)
    elif roll < 0.25:
        data = _splice(rng, data, rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        data = rng.choice(SMALL)(rng, data) if data else data
    return data[:MAX_DATAGRAM]


# -- valid requests -------------------------------------------------------------------------

def request(method: str, uri: str, to: str, *, transport: str, port: int, extra: list[str] = ()) -> bytes:
    call_id = f"probe-{secrets.token_hex(8)}"
    return "\r\n".join([
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{transport} 127.0.0.1:{port};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70", f"From: <sip:fuzzer@127.0.0.1>;tag={secrets.token_hex(4)}", f"To: <{to}>",
        f"Call-ID: {call_id}", f"CSeq: 1 {method}", *extra, "Content-Length: 0", "", ""]).encode()


def _call_id(data: bytes) -> bytes | None:
    m = re.search(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*(\S+)", data)
    return m.group(1) if m else None


def _status(data: bytes) -> int | None:
    m = re.match(rb"SIP/2\.0 (\d{3}) ", data)
    return int(m.group(1)) if m else None


class Prober:
    """Valid requests over UDP (the raw peer of tests/peers/raw.py), retransmitted (T1 = 0.5 s)
    until a final answer or 4 s."""

    def __init__(self) -> None:
        self.peer = RawPeer(lenient=True)
        self.port = self.peer.port
        self.results: list[dict] = []

    def ask(self, what: str, data: bytes, addr: tuple[str, int]) -> int | None:
        call_id = _call_id(data).decode()
        deadline = time.monotonic() + 4.0
        status = None
        while status is None and (remaining := deadline - time.monotonic()) > 0:
            self.peer.send(data, addr)
            try:
                answer, _ = self.peer.expect_blocking(is_final(call_id), min(0.5, remaining), what)
                status = answer.status
            except AssertionError:
                pass  # retransmit
        self.results.append({"what": what, "status": status})
        return status


def probes(prober: Prober, broker: tuple[str, int], agent: tuple[str, int], user: str) -> None:
    host = f"{broker[0]}:{broker[1]}"
    new_user = f"live{secrets.token_hex(3)}"
    port = prober.port
    prober.ask("REGISTER to the broker", request(
        "REGISTER", f"sip:{host}", f"sip:{new_user}@{broker[0]}", transport="UDP", port=port,
        extra=[f"Contact: <sip:{new_user}@127.0.0.1:{port}>", "Expires: 600"]), broker)
    prober.ask("OPTIONS to the broker", request(
        "OPTIONS", f"sip:{host}", f"sip:{host}", transport="UDP", port=port), broker)
    prober.ask("OPTIONS to the agent", request(
        "OPTIONS", f"sip:{user}@{agent[0]}:{agent[1]}", f"sip:{user}@{broker[0]}", transport="UDP",
        port=port), agent)
    prober.ask("OPTIONS through the broker to the agent", request(
        "OPTIONS", f"sip:{user}@{host}", f"sip:{user}@{broker[0]}", transport="UDP", port=port), broker)


# -- TCP ------------------------------------------------------------------------------------

def _connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(addr, timeout=5)
    sock.settimeout(5)
    return sock


def _read_status(sock: socket.socket, call_id: bytes | None, timeout: float = 5.0) -> int | None:
    """The first final status for `call_id` on the connection; None if closed or none came."""
    buf, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65535)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
        for message in re.split(rb"(?=SIP/2\.0 \d{3} )", buf):
            code = _status(message)
            if code is not None and code >= 200 and _call_id(message) == call_id:
                return code
    return None


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closes the connection within `timeout` (answers before that are read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65535):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def tcp_phase(rng: random.Random, seeds: list[bytes], targets: dict[str, tuple[str, int]],
              user: str, connections: int) -> dict:
    report: dict = {"slow_answered": {}, "huge_content_length_closed": {}, "many_headers_closed": {},
                    "mutated_connections": 0, "tcp_probe": {}}
    idle = []
    for name, addr in targets.items():
        idle += [_connect(addr) for _ in range(50)]  # held open while the rest goes on
        # a valid OPTIONS in 7-byte pieces, 10 ms apart
        sock = _connect(addr)
        local_port = sock.getsockname()[1]
        data = request("OPTIONS", f"sip:{user}@{addr[0]}:{addr[1]}", f"sip:{user}@{addr[0]}",
                       transport="TCP", port=local_port)
        for i in range(0, len(data), 7):
            sock.sendall(data[i : i + 7])
            time.sleep(0.01)
        report["slow_answered"][name] = _read_status(sock, _call_id(data))
        sock.close()
        # half a message, then the connection is dropped
        sock = _connect(addr)
        sock.sendall(data[: len(data) // 2])
        sock.close()
        # Content-Length far above the message limit: the connection is closed
        sock = _connect(addr)
        sock.sendall(data.replace(b"Content-Length: 0", b"Content-Length: 4294967295") + b"x" * 1000)
        report["huge_content_length_closed"][name] = _closed_by_peer(sock)
        sock.close()
        # thousands of header fields: the connection is closed
        sock = _connect(addr)
        try:
            sock.sendall(data.replace(b"\r\n", b"\r\n" + b"X-Fuzz: header\r\n" * 5000, 1))
        except OSError:
            pass  # closed while we were still writing
        report["many_headers_closed"][name] = _closed_by_peer(sock)
        sock.close()
    for i in range(connections):
        addr = list(targets.values())[i % len(targets)]
        try:
            sock = _connect(addr)
            for _ in range(rng.randint(1, 10)):
                sock.sendall(mutate(rng, seeds))
            sock.close()
            report["mutated_connections"] += 1
        except OSError:
            report["mutated_connections"] += 1  # the peer closed it on a framing error
    for name, addr in targets.items():
        sock = _connect(addr)
        data = request("OPTIONS", f"sip:{user}@{addr[0]}:{addr[1]}", f"sip:{user}@{addr[0]}",
                       transport="TCP", port=sock.getsockname()[1])
        sock.sendall(data)
        report["tcp_probe"][name] = _read_status(sock, _call_id(data))
        sock.close()
    for sock in idle:
        sock.close()
    return report


# -- main -----------------------------------------------------------------------------------

def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", type=_addr, required=True)
    parser.add_argument("--agent", type=_addr, required=True)
    parser.add_argument("--user", required=True, help="the name the agent registered")
    parser.add_argument("--datagrams", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rate", type=float, default=500.0, help="datagrams per second")
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    seeds = [p.read_bytes() for p in seed_files("message")]
    targets = {"broker": args.broker, "agent": args.agent}
    prober = Prober()
    garbage = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    garbage.bind(("127.0.0.1", 0))
    started = time.monotonic()
    sent = 0
    probes(prober, args.broker, args.agent, args.user)
    for i in range(args.datagrams):
        addr = targets["broker" if i % 2 == 0 else "agent"]
        try:
            garbage.sendto(mutate(rng, seeds), addr)
            sent += 1
        except OSError:
            pass
        while garbage in select.select([garbage], [], [], 0)[0]:
            garbage.recv(65535)  # answers to the garbage: read, not judged
        if (i + 1) % args.probe_every == 0:
            probes(prober, args.broker, args.agent, args.user)
        time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))
    udp_seconds = time.monotonic() - started
    tcp = tcp_phase(rng, seeds, targets, args.user, args.connections)
    probes(prober, args.broker, args.agent, args.user)
    print(json.dumps({"datagrams": sent, "udp_seconds": round(udp_seconds, 1), "probes": prober.results,
                      **tcp}))


if __name__ == "__main__":
    main()

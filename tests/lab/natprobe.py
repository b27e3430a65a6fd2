"""Plain-UDP probes that show what a NAT lab router does (stdlib only, run inside a host).

    natprobe.py reflect UDPPORT [UDPPORT2] [--tcp PORT]
        answer each datagram with the address it came from ("ip:port"); with --tcp, a
        connection that sends "count" is answered with the number of datagrams seen so far
    natprobe.py mapping REFLECTOR_IP PORT1 PORT2
        ask the reflector on two ports from one socket; print both mapped addresses (JSON)
    natprobe.py punch REFLECTOR_IP PORT [SECONDS]
        learn our mapping, print it, read the peer's mapping from stdin, then send to the
        peer every 50 ms until we have heard the peer and the peer has heard us (or SECONDS,
        default 5)
    natprobe.py send IP PORT N
        send N datagrams to IP:PORT, then ask IP's --tcp listener how many it got

Everything prints one JSON line and every wait is bounded.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

TIMEOUT = 5.0


def reflect(ports: list[int], tcp_port: int | None) -> None:
    socks = []
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        socks.append(s)
    listener = None
    if tcp_port:
        listener = socket.create_server(("0.0.0.0", tcp_port))
        socks.append(listener)
    print(json.dumps({"ready": ports}), flush=True)
    seen: dict[str, int] = {}  # datagrams per source address

    def drain() -> None:  # every datagram already queued counts before a "count" answer
        for s in socks:
            while s is not listener:
                try:
                    data, addr = s.recvfrom(2048, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                seen[addr[0]] = seen.get(addr[0], 0) + 1
                s.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        select.select(socks, [], [], 1.0)
        drain()
        if listener is not None and select.select([listener], [], [], 0)[0]:
            conn, addr = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                if conn.recv(16) == b"count":
                    drain()
                    conn.sendall(str(seen.get(addr[0], 0)).encode())


def _ask(sock: socket.socket, server: tuple[str, int]) -> str:
    sock.settimeout(0.2)
    for _ in range(int(TIMEOUT / 0.2)):
        sock.sendto(b"?", server)
        try:
            data, addr = sock.recvfrom(2048)
        except socket.timeout:
            continue
        if addr == server:
            return data.decode()
    raise SystemExit(json.dumps({"error": f"no answer from {server}"}))


def mapping(server: str, port1: int, port2: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    print(json.dumps({"first": _ask(s, (server, port1)), "second": _ask(s, (server, port2))}))


def punch(server: str, port: int, seconds: float = TIMEOUT) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    print(json.dumps({"mapped": _ask(s, (server, port))}), flush=True)
    host, _, peer_port = sys.stdin.readline().strip().rpartition(":")
    peer = (host, int(peer_port))
    heard = acked = False
    s.setblocking(False)
    deadline = time.monotonic() + seconds
    sent = 0
    while not (heard and acked) and time.monotonic() < deadline:
        s.sendto(b"ack" if heard else b"hello", peer)
        sent += 1
        ready, _, _ = select.select([s], [], [], 0.05)
        while ready:
            try:
                data, addr = s.recvfrom(2048)
            except BlockingIOError:
                break
            if addr == peer:
                heard = True
                acked = acked or data == b"ack"
    if heard and acked:  # let the peer hear our ack too
        for _ in range(3):
            s.sendto(b"ack", peer)
    print(json.dumps({"heard": heard, "acked": acked, "sent": sent}), flush=True)


def send(host: str, port: int, count: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(count):
        s.sendto(b"x", (host, port))
    with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
        conn.sendall(b"count")
        print(json.dumps({"sent": count, "received": int(conn.recv(16))}))


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "reflect":
        tcp = None
        if "--tcp" in args:
            i = args.index("--tcp")
            tcp = int(args[i + 1])
            args = args[:i] + args[i + 2:]
        reflect([int(a) for a in args], tcp)
    elif command == "mapping":
        mapping(args[0], int(args[1]), int(args[2]))
    elif command == "punch":
        punch(args[0], int(args[1]), *(float(a) for a in args[2:3]))
    elif command == "send":
        send(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

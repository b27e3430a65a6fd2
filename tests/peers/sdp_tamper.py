"""A hostile SIP hop for the trust tests: a UDP relay in front of the SIP server that
swaps the WireGuard key in every SDP body it passes (``a=wg-pubkey:``), in both directions,
over UDP and TCP (an INVITE with ICE candidates is too big for UDP: RFC 3261 §18.1.1).

    sdp_tamper.py LISTEN_IP:PORT SERVER_IP:PORT ATTACKER_KEY

Each client (UDP address, TCP connection) gets an upstream socket of its own, so the server
sees one address per client and its requests and responses find their way back. The key
is swapped for one of the same length (base64 of 32 bytes), so Content-Length stays right;
every swap is logged to stdout.
"""

from __future__ import annotations

import re
import selectors
import socket
import sys
import threading
import time

KEY = re.compile(rb"^a=wg-pubkey:[A-Za-z0-9+/=]{44}", re.M)
LIFETIME = 120.0   # s: the relay stops by itself (bounded, like every test program)


def addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def pump(source: socket.socket, sink: socket.socket, tamper) -> None:
    """Copy a TCP stream, rewriting whole lines (a swapped key keeps its length)."""
    pending = b""
    try:
        while chunk := source.recv(65535):
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                sink.sendall(tamper(pending[:cut]))
                pending = pending[cut:]
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve_tcp(listen: tuple[str, int], server: tuple[str, int], tamper) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(listen)
    lsock.listen(16)
    while True:
        client, _ = lsock.accept()
        try:
            up = socket.create_connection(server, timeout=5, source_address=(listen[0], 0))
        except OSError:
            client.close()
            continue
        up.settimeout(None)
        for a, b in ((client, up), (up, client)):
            threading.Thread(target=pump, args=(a, b, tamper), daemon=True).start()


def main() -> int:
    listen, server, attacker = addr(sys.argv[1]), addr(sys.argv[2]), sys.argv[3].encode()
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(listen)
    sel = selectors.DefaultSelector()
    sel.register(front, selectors.EVENT_READ, None)
    upstream: dict[tuple[str, int], socket.socket] = {}
    def tamper(data: bytes) -> bytes:
        swapped, n = KEY.subn(b"a=wg-pubkey:" + attacker, data)
        if n:
            print(f"swapped {n} a=wg-pubkey line(s) in {data.split(b' ', 1)[0].decode()}",
                  flush=True)
        return swapped

    threading.Thread(target=serve_tcp, args=(listen, server, tamper), daemon=True).start()
    print(f"relaying {sys.argv[1]} -> {sys.argv[2]}", flush=True)
    until = time.monotonic() + LIFETIME
    while time.monotonic() < until:
        for key, _ in sel.select(1.0):
            sock, client = key.fileobj, key.data
            data, source = sock.recvfrom(65535)
            if client is None:   # from a client: out through its own socket
                up = upstream.get(source)
                if up is None:
                    up = upstream[source] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    up.bind((listen[0], 0))
                    sel.register(up, selectors.EVENT_READ, source)
                up.sendto(tamper(data), server)
            else:                # from the server (or a peer) to that client
                front.sendto(tamper(data), client)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A hostile SIP hop for the trust tests: a relay in front of the SIP server that rewrites
every SDP body it passes, in both directions, over UDP and TCP (an INVITE with ICE
candidates is too big for UDP: RFC 3261 §18.1.1).

    sdp_tamper.py LISTEN_IP:PORT SERVER_IP:PORT SWAP...

A SWAP is ``ATTRIBUTE=VALUE``: ``wg-pubkey=KEY`` (the attacker's WireGuard key),
``mesh-ip=ADDRESS`` (the attacker's mesh address), ``IP4=ADDRESS`` (the paper's endpoint),
``candidate=ADDRESS`` (the connection address of every ICE candidate: the attacker's host).
Every ``a=ATTRIBUTE:`` line gets VALUE. Content-Length is set to the body's new length, so
each whole SIP message is read first (a TCP stream is cut into messages by their
Content-Length). Each client (UDP address, TCP connection) gets an upstream socket of its
own, so the server sees one address per client and its requests and responses find their
way back. Every rewrite is logged to stdout.
"""

from __future__ import annotations

import re
import selectors
import socket
import sys
import threading
import time

LIFETIME = 120.0   # s: the relay stops by itself (bounded, like every test program)
_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.I | re.M)
_CANDIDATE = re.compile(rb"^(a=candidate:\S+ \d+ \S+ \d+ )\S+", re.M)


def addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def swapper(swaps: list[str]):
    """A function rewriting one SIP message (bytes) by `swaps`, and its Content-Length."""
    rules = []
    for swap in swaps:
        name, value = swap.split("=", 1)
        if name == "candidate":
            rules.append((name, _CANDIDATE, rb"\g<1>" + value.encode()))
        else:
            line = re.compile(rb"^a=" + re.escape(name.encode()) + rb":[^\r\n]*", re.M)
            rules.append((name, line, b"a=" + name.encode() + b":" + value.encode()))

    def tamper(message: bytes) -> bytes:
        head, sep, body = message.partition(b"\r\n\r\n")
        if not sep or not body:
            return message
        done = []
        for name, pattern, replacement in rules:
            body, n = pattern.subn(replacement, body)
            if n:
                done.append(f"{n} a={name}")
        if not done:
            return message
        print(f"swapped {', '.join(done)} line(s) in {head.split(b' ', 1)[0].decode()}", flush=True)
        head = _LENGTH.sub(lambda m: m.group(0).replace(m.group(1), str(len(body)).encode()), head)
        return head + sep + body
    return tamper


def messages(buffer: bytearray):
    """Whole SIP messages (and keep-alive CRLFs) off the front of a TCP stream's buffer."""
    while buffer:
        if buffer.startswith(b"\r\n"):   # RFC 5626 keep-alives between messages
            yield bytes(buffer[:2])
            del buffer[:2]
            continue
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _LENGTH.search(bytes(buffer[:end + 2]))
        total = end + 4 + (int(length.group(1)) if length else 0)
        if len(buffer) < total:
            return
        yield bytes(buffer[:total])
        del buffer[:total]


def pump(source: socket.socket, sink: socket.socket, tamper) -> None:
    """Copy a TCP stream message by message, each rewritten."""
    pending = bytearray()
    try:
        while chunk := source.recv(65535):
            pending += chunk
            for message in messages(pending):
                sink.sendall(tamper(message))
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
    listen, server = addr(sys.argv[1]), addr(sys.argv[2])
    tamper = swapper(sys.argv[3:])
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(listen)
    sel = selectors.DefaultSelector()
    sel.register(front, selectors.EVENT_READ, None)
    upstream: dict[tuple[str, int], socket.socket] = {}

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

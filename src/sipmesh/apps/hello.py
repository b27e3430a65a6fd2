"""A harmless application pair for demonstrations and tests: one message each way, over TCP
or, when the session has a path (ICE: SIPMESH_LOCAL_PORT is set), over UDP on that path.

Run by an agent (``python -m sipmesh.apps.hello``), it reads the session from
the SIPMESH_* environment:

* answering side (SIPMESH_ROLE=server): listens on SIPMESH_PORT, answers one
  greeting, then stays up until the session ends (SIGTERM);
* calling side (SIPMESH_ROLE=client): connects to SIPMESH_REMOTE_IP:SIPMESH_PORT
  (retrying while the server comes up), sends a greeting, prints the reply and
  exits -- which ends the session.

Over UDP (the exec ``udp`` contract) both bind SIPMESH_LOCAL_PORT; the caller repeats its
greeting to SIPMESH_REMOTE_IP:SIPMESH_REMOTE_PORT until the answer comes back (a first
datagram may meet a NAT before the peer's mapping exists), the answering side answers each.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

WAIT = 30.0


def _server(port: int, user: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in os.environ.get("SIPMESH_LOCAL_IP", "")
                       else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        s.listen(1)
        s.settimeout(WAIT)
        try:
            conn, peer = s.accept()
        except socket.timeout:
            print(f"[{user}] nobody connected within {WAIT:g} s", flush=True)
            return 1
        with conn:
            conn.settimeout(WAIT)
            greeting = conn.recv(1024).decode("utf-8", "replace").strip()
            print(f"[{user}] received {greeting!r} from {peer[0]}:{peer[1]}", flush=True)
            conn.sendall(f"hello back from {user}\n".encode())
    while True:  # until the session ends (SIGTERM)
        time.sleep(3600)


def _client(host: str, port: int, user: str) -> int:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"[{user}] cannot connect to {host}:{port}", flush=True)
                return 1
            time.sleep(0.05)
    with conn:
        conn.settimeout(WAIT)
        conn.sendall(f"hello from {user}\n".encode())
        reply = conn.recv(1024).decode("utf-8", "replace").strip()
    print(f"[{user}] sent a greeting to {host}:{port}, received {reply!r}", flush=True)
    return 0


def _udp(role: str, local_port: int, remote: tuple[str, int], user: str, path: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in remote[0] else socket.AF_INET,
                       socket.SOCK_DGRAM) as s:
        s.bind(("", local_port))
        deadline = time.monotonic() + WAIT
        told = False
        while time.monotonic() < deadline:
            if role != "server":
                s.sendto(f"hello from {user}".encode(), remote)
            s.settimeout(0.2 if role != "server" else WAIT)
            try:
                data, peer = s.recvfrom(1024)
            except socket.timeout:
                continue
            text = data.decode("utf-8", "replace").strip()
            if role == "server":
                if not told:
                    print(f"[{user}] received {text!r} from {peer[0]}:{peer[1]}", flush=True)
                    told = True
                s.sendto(f"hello back from {user}".encode(), peer)
                deadline = time.monotonic() + WAIT
                continue
            print(f"[{user}] sent a greeting to {remote[0]}:{remote[1]} ({path} path), "
                  f"received {text!r}", flush=True)
            return 0
    print(f"[{user}] no answer from {remote[0]}:{remote[1]} within {WAIT:g} s", flush=True)
    return 1


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    env = os.environ
    user = env.get("SIPMESH_LOCAL_USER", "?")
    try:
        if env.get("SIPMESH_LOCAL_PORT"):
            return _udp(env.get("SIPMESH_ROLE", ""), int(env["SIPMESH_LOCAL_PORT"]),
                        (env["SIPMESH_REMOTE_IP"], int(env["SIPMESH_REMOTE_PORT"])), user,
                        env.get("SIPMESH_PATH", "?"))
        port = int(env["SIPMESH_PORT"])
        if env.get("SIPMESH_ROLE") == "server":
            return _server(port, user)
        return _client(env["SIPMESH_REMOTE_IP"], port, user)
    except KeyError as exc:
        print(f"hello: {exc.args[0]} is not set: run me from a sipmesh agent", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The application port: the configured one, or the next free one after it (prototype's -v)."""

from __future__ import annotations

import socket

from sipmesh.agent.errors import AgentError, Exit


def port_is_free(port: int, protocols: tuple[str, ...] = ("udp", "tcp"), host: str = "") -> bool:
    for proto in protocols:
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def pick_port(first: int, protocols: tuple[str, ...] = ("udp", "tcp"), *, tries: int = 100,
              host: str = "") -> int:
    """`first` if nothing is bound to it, else first+1, first+2, ... (at most `tries`)."""
    for port in range(first, min(first + tries, 65536)):
        if port_is_free(port, protocols, host):
            return port
    raise AgentError(f"no free {'/'.join(protocols)} port in {first}..{first + tries - 1}: "
                     "stop what holds them, or start from another port (--app-port)",
                     Exit.FAILURE)

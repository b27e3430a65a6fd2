"""A TCP service for forward and stream tests: a listening socket whose connections are each
served by `behaviour(conn)` in a thread of their own, and behaviours a test needs."""

from __future__ import annotations

import hashlib
import socket
import threading


class Target:
    """A TCP server on 127.0.0.1 (or `host`): per connection, `behaviour(conn)` in a thread."""

    def __init__(self, behaviour, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.behaviour = behaviour
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.behaviour, args=(conn,), daemon=True).start()

    def close(self) -> None:
        # shutdown wakes the blocked accept(); a bare close() would leave the thread in it,
        # and a retried accept() could then take connections of a socket that reuses the fd
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_digest(conn: socket.socket) -> str:
    """Read to EOF (the client's half-close): the SHA-256 of what came, in hex."""
    h = hashlib.sha256()
    while chunk := conn.recv(1 << 16):
        h.update(chunk)
    return h.hexdigest()


def digest_then_reply(conn: socket.socket) -> None:
    """Read to EOF, then answer with the SHA-256 and close."""
    conn.sendall(read_digest(conn).encode())
    conn.close()


def echo(conn: socket.socket) -> None:
    """Send back what comes, until EOF; then close."""
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)
    conn.close()

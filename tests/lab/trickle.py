"""A slow, steady TCP transfer for tests that break something under it (run as a script
inside a lab host).

    trickle.py echo PORT
        echoes every connection on 127.0.0.1:PORT; prints "ready" once it listens
    trickle.py send PORT SECONDS
        connects to 127.0.0.1:PORT, sends a numbered line every INTERVAL s for at most
        SECONDS and reads each echo back; prints "echoed N" for each, and at SIGTERM (or
        the end) one JSON line {"sent": n, "echoed": m, "max_gap": longest s between two
        echoes, "error": null | why} and exits 0 if the connection held and every echo
        matched, else 1.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time

INTERVAL = 0.1


def echo(port: int) -> None:
    server = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def send(port: int, seconds: float) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sent = echoed = 0
    error = None
    max_gap, last = 0.0, time.monotonic()
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = conn.makefile("rb")
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            sent += 1
            conn.sendall(f"{sent}\n".encode())
            line = reader.readline()   # (timeout 10 s: a stalled transfer is an error)
            if line != f"{sent}\n".encode():
                error = f"echo {line!r} for line {sent}"
                break
            echoed += 1
            max_gap, last = max(max_gap, time.monotonic() - last), time.monotonic()
            print(f"echoed {echoed}", flush=True)
            stop.wait(INTERVAL)
        conn.close()
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"sent": sent, "echoed": echoed, "max_gap": round(max_gap, 3),
                      "error": error}), flush=True)
    return 0 if error is None else 1


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(int(sys.argv[2]))
    else:
        sys.exit(send(int(sys.argv[2]), float(sys.argv[3])))

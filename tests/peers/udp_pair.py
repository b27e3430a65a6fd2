"""A UDP program pair for sessions, following the exec ``udp`` contract (apps/exec.py):
bind ``SIPMESH_LOCAL_PORT``, exchange datagrams with ``SIPMESH_REMOTE_IP``:``SIPMESH_REMOTE_PORT``.

    udp_pair.py echo OUTDIR            the answering side: echoes every datagram back
    udp_pair.py ping OUTDIR [N]        the calling side: sends "ping i" every 0.2 s until N
                                       distinct echoes came back (exit 0) or 15 s (exit 1)
    udp_pair.py ping OUTDIR heartbeat  the same, one ping a second, until SIGTERM (120 s at most)

Each writes OUTDIR/<role>-<call id>.json (atomically, after each datagram): its path values,
what it received and from where; on SIGTERM it adds "stopped": true.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    extra = sys.argv[3] if len(sys.argv) > 3 else "5"
    env = os.environ
    record = {"role": env["SIPMESH_ROLE"], "call_id": env["SIPMESH_CALL_ID"],
              "path": env.get("SIPMESH_PATH"), "local_port": int(env["SIPMESH_LOCAL_PORT"]),
              "remote": [env.get("SIPMESH_REMOTE_IP"), int(env.get("SIPMESH_REMOTE_PORT", 0))],
              "got": [], "sources": [], "stopped": False}
    name = out / f"{record['role']}-{record['call_id']}.json"

    def save() -> None:
        tmp = name.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, name)

    def stop(*_: object) -> None:
        record["stopped"] = True
        save()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", record["local_port"]))
    save()
    deadline = time.monotonic() + (120 if mode == "echo" or extra == "heartbeat" else 15)
    interval = 1.0 if extra == "heartbeat" else 0.2
    want = None if mode == "echo" or extra == "heartbeat" else int(extra)
    sent, next_send = 0, 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if mode == "ping" and now >= next_send:
            s.sendto(f"ping {sent}".encode(), tuple(record["remote"]))
            sent += 1
            next_send = now + interval
        s.settimeout(max(0.01, min(0.2, next_send - now)) if mode == "ping" else 1.0)
        try:
            data, source = s.recvfrom(2048)
        except socket.timeout:
            continue
        text = data.decode(errors="replace")
        if mode == "echo":
            s.sendto(b"echo " + data, source)
        if len(record["got"]) < 50:
            record["got"].append(text)
            record["sources"].append(f"{source[0]}:{source[1]}")
        save()
        if want is not None and len(set(record["got"])) >= want:
            return 0
    return 0 if mode == "echo" or want is None else 1


if __name__ == "__main__":
    sys.exit(main())

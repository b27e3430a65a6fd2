"""baresip, a real softphone, headless: started with its own config and driven over its
ctrl_tcp socket (used by the softphone test and by the fuzz corpus capture)."""

from __future__ import annotations

import json
import math
import socket
import sqlite3
import struct
import time
import wave
from pathlib import Path

from sipmesh.lab.procs import free_port, spawn, wait_tcp_listening
from sipmesh.lab.waiting import wait_for

MODULES = Path("/usr/lib/baresip/modules")


def _tone(path: Path, seconds: int) -> None:
    """8 kHz mono WAV: baresip's aufile source hangs up when the file ends."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 8000)))
                               for i in range(8000 * seconds)))


def start_baresip(tmp_path: Path, name: str, broker_port: int, password: str) -> tuple[object, int]:
    home = tmp_path / name
    home.mkdir()
    sip_port = free_port("both")
    while not _free(sip_port + 1):  # baresip also takes PORT+1 (TLS)
        sip_port = free_port("both")
    ctrl_port = free_port("tcp")
    rtp = free_port("udp")
    tone = tmp_path / "tone.wav"
    if not tone.exists():
        _tone(tone, 30)
    (home / "accounts").write_text(
        f"<sip:{name}@127.0.0.1:{broker_port};transport=udp>;auth_pass={password};answermode=auto;"
        "regint=600;audio_codecs=PCMU\n")
    (home / "config").write_text("\n".join([
        "poll_method epoll", "net_interface 127.0.0.1",  # never advertise anything but loopback
        f"sip_listen 127.0.0.1:{sip_port}", "sip_trans_def udp",
        f"audio_player aubridge,null_{name}", f"audio_source aufile,{tone}",
        f"audio_alert aubridge,null_{name}", "audio_srate 8000", "audio_channels 1",
        f"rtp_ports {rtp}-{rtp + 9}", f"module_path {MODULES}",
        "module g711.so", "module aufile.so", "module aubridge.so", "module ctrl_tcp.so",
        "module_app account.so", "module_app menu.so", f"ctrl_tcp_listen 127.0.0.1:{ctrl_port}", ""]))
    proc = spawn(["baresip", "-f", str(home)], cwd=home, log_path=tmp_path / "logs" / f"baresip-{name}.log",
                 name=f"baresip-{name}")
    wait_tcp_listening("127.0.0.1", ctrl_port, proc=proc, timeout=15)
    return proc, ctrl_port


def _free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


class Ctrl:
    """baresip's ctrl_tcp: netstring-framed JSON commands and events."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, command: str, params: str | None = None) -> None:
        body = json.dumps({"command": command, "token": command, **({"params": params} if params else {})})
        data = body.encode()
        self.sock.sendall(str(len(data)).encode() + b":" + data + b",")

    def event(self, types: set[str], timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b":" in self.buf:
                size, rest = self.buf.split(b":", 1)
                if len(rest) <= int(size):
                    break
                message, self.buf = json.loads(rest[:int(size)]), rest[int(size) + 1:]
                if message.get("event") and message.get("type") in types:
                    return message
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("baresip closed its control connection")
            self.buf += chunk
        raise TimeoutError(f"no {types} event from baresip")

    def close(self) -> None:
        self.sock.close()


def bindings(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT aor FROM bindings")}

"""sd_notify(3) without libsystemd: one datagram to the service manager's socket.

A service of `Type=notify` tells systemd it is ready (READY=1), reloading
(RELOADING=1, then READY=1 again) or stopping (STOPPING=1) by sending newline-separated
assignments to the AF_UNIX datagram socket named in $NOTIFY_SOCKET ("@name" is an
abstract socket). Without that variable (not run by systemd) every call is a no-op.

The variable is taken out of the environment when the Notifier is made, so the
programs we start (OpenVPN, wireguard-go, ...) cannot speak for us: systemd listens
to the main process only (NotifyAccess=main).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import MutableMapping

log = logging.getLogger("sipmesh.ops.notify")


class Notifier:
    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None)
        self.address: str | None = None
        if address and address[0] == "@":
            self.address = "\0" + address[1:]
        elif address and address[0] == "/":
            self.address = address
        elif address:
            log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX socket: no readiness notifications", address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send e.g. "READY=1", "STATUS=..."; True if the service manager got it."""
        if self.address is None:
            return False
        text = "\n".join(a.replace("\n", " ") for a in assignments)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC: what Type=notify-reload (systemd >= 253) wants with RELOADING=1
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

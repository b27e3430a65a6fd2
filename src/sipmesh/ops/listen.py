"""Where an opt-in HTTP listener listens (`--metrics`, `--status-page`).

`--metrics 9090` listens on 127.0.0.1:9090: a bare port means loopback, so nothing is
exposed to the network unless an address is written out (`--metrics 0.0.0.0:9090`).
Standard library only: every command line imports it.
"""

from __future__ import annotations

import argparse
import ipaddress

LOOPBACK = "127.0.0.1"


def parse_listen(text: str) -> tuple[str, int]:
    """'PORT' (on 127.0.0.1), 'HOST:PORT' or '[IPv6]:PORT'."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not sep:
        host, port = LOOPBACK, text
    elif bracketed:
        host = host[1:-1]
    good_host = bool(host) and (_ip_version(host) == 6 if bracketed else ":" not in host)
    if not good_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected PORT or HOST:PORT, e.g. 9090 (on {LOOPBACK}) or "
                         "0.0.0.0:9090")
    return host, int(port)


def listen_argument(text: str) -> tuple[str, int]:
    """parse_listen for argparse's type=."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""Everything a broker reads at start, checked once before any worker starts.

A worker that cannot start because of its configuration fails the same way each
time it is restarted. So the parent process reads what the workers will read (the
users file, the TLS certificate and key, the location database and its directory)
and tries the listen addresses, and stops with one line that names the file and
the reason: `ConfigError` (exit 2) for the configuration, `OSError` (exit 1, as
when a worker cannot bind) for an address that is in use or not ours.
"""

from __future__ import annotations

import socket
import sqlite3
import ssl

from sipmesh.broker.location import LocationService
from sipmesh.broker.server import BrokerConfig
from sipmesh.broker.users import UsersFile, UsersFileError


class ConfigError(ValueError):
    """Something the broker reads at start is unusable; the message names it."""


def check(config: BrokerConfig) -> None:
    """Raise ConfigError or OSError for the first thing the workers could not use."""
    if config.users_file is not None:
        try:
            UsersFile(config.users_file)
        except UsersFileError as exc:
            raise ConfigError(str(exc)) from None  # it says "file:line: reason" already
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config.users_file}: cannot read the users file: {_reason(exc)}") from None
    if "TLS" in config.transports:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{config.tls_cert}, {config.tls_key}: cannot load the TLS certificate "
                              f"and key: {_reason(exc)}") from None
    try:
        LocationService(config.database).close()  # creates the directory and the schema
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise ConfigError(f"{config.database}: cannot use the location database: {_reason(exc)}") from None
    for host, port in config.listen:
        if port:
            _try_bind(host, port, config.transports)


def _try_bind(host: str, port: int, transports: tuple[str, ...]) -> None:
    """Bind (and release) every socket a worker will bind, as the broker will."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for transport in transports:
        kind = socket.SOCK_DGRAM if transport == "UDP" else socket.SOCK_STREAM
        number = port + 1 if transport == "TLS" else port
        with socket.socket(family, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
            try:
                sock.bind((host, number))
            except OSError as exc:
                exc.strerror = f"{transport} {host}:{number}: {exc.strerror}"
                raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

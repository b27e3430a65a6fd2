"""The daemon's local control socket: `sipmesh status` asks, the daemon answers.

A Unix stream socket, mode 0600 in a directory of mode 0700 that we own, so only
our own user (and root) can talk to it. One JSON object per line each way, one
request per connection: ``{"command": "status"}`` or ``{"command": "reload"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable

log = logging.getLogger("sipmesh.daemon.control")

MAX_REQUEST = 4096
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/sipmesh, /run/sipmesh for root, else /tmp/sipmesh-UID."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "sipmesh"
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return Path("/run/sipmesh")
    return Path(f"/tmp/sipmesh-{os.geteuid()}")


def default_socket(user: str) -> Path:
    return runtime_dir() / f"daemon-{user}.sock"


def private_directory(directory: Path) -> None:
    """Create `directory` (0700) or check that an existing one is ours and private."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{directory} belongs to another user")
    if stat.S_IMODE(info.st_mode) & 0o022:
        os.chmod(directory, 0o700)


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        private_directory(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise OSError(f"another daemon answers on {self.path} (set "
                              "[agent] control_socket to run a second one)")
            self.path.unlink()  # left behind by a daemon that did not stop cleanly
        old = os.umask(0o177)  # no window in which the socket is wider than 0600
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is None:
            return  # never bound: the path may be another daemon's socket
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = await self.handler(request)
            except ValueError as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.LimitOverrunError, ConnectionError) as exc:
            log.debug("control connection dropped: %s", exc)
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def query(path: Path | str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon at `path` and return its answer (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)

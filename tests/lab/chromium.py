"""Headless Chromium driven over the DevTools protocol: web pages tested in a real browser.

Chromium runs with a fresh profile and with everything that would reach out switched
off; on top of that every host name fails to resolve and every non-loopback request is
sent to a dead local proxy, so the browser can only reach 127.0.0.1. The DevTools
endpoint (a WebSocket on 127.0.0.1, port chosen by Chromium) is driven with aiohttp on
a private event loop, so that tests stay synchronous.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from sipmesh.lab.procs import ManagedProcess, spawn, wait_for

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
         "--no-pings", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9",
         "--hide-scrollbars"]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless browser with one page. `close()` (or the lab's reaper) stops it."""

    def __init__(self, directory: Path, *, width: int = 1200, height: int = 760) -> None:
        binary = chromium_binary()
        if binary is None:
            raise FileNotFoundError("chromium is not installed (scripts/install --test)")
        profile = directory / "profile"
        profile.mkdir(parents=True)
        self.proc: ManagedProcess = spawn(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            log_path=directory / "chromium.log", name="chromium")
        active = profile / "DevToolsActivePort"
        wait_for(lambda: active.exists() and len(active.read_text().split()) >= 2, 30,
                 what="Chromium's DevTools port", abort=self.proc.exit_reason)
        self.port = int(active.read_text().split()[0])
        self.width, self.height = width, height
        self._loop = asyncio.new_event_loop()
        self._next_id = 0
        self._run(self._connect())

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    async def _connect(self) -> None:
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{self.port}/json/list") as response:
            targets = await response.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        ident = self._next_id
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = await asyncio.wait_for(self._ws.receive(), 30)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"DevTools connection closed ({message.type})")
            data = json.loads(message.data)
            if data.get("id") == ident:  # events (no id) are not needed here
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self._run(self._call(method, **params))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise AssertionError(f"Chromium cannot load {url}: {result['errorText']}")
        wait_for(lambda: self.evaluate("document.readyState") == "complete"
                 and self.evaluate("location.href") != "about:blank", timeout, what=f"{url} loaded")

    def wait_until(self, expression: str, timeout: float = 15.0, what: str | None = None) -> Any:
        """Poll a JavaScript expression in the page until it is truthy."""
        return wait_for(lambda: self.evaluate(expression), timeout, 0.1, what=what or expression,
                        abort=self.proc.exit_reason)

    def screenshot(self, path: Path) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._run(self._ws.close())
            self._run(self._session.close())
        finally:
            self._loop.close()
            self.proc.stop(grace=5)

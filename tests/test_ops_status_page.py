"""The broker's status page in a real headless Chromium: it renders, shows the agents that
registered, and updates by itself when another one registers; its token when it is
protected; and a page open to the network is refused before the broker starts."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.lab import ManagedProcess, free_port, spawn, wait_for, wait_tcp_listening
from tests.lab.chromium import Chromium, chromium_binary
from tests.lab.broker import start_broker

SIPMESH = str(Path(sys.executable).parent / "sipmesh")
ROWS = "[...document.querySelectorAll('#registrations tbody tr')].map(r => r.dataset.aor)"

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="chromium missing (scripts/install --test installs it)")


@pytest.fixture
def chromium(tmp_path: Path):
    browser = Chromium(tmp_path / "chromium", width=1200, height=480)
    yield browser
    browser.close()


def agent(tmp_path: Path, port: int, user: str) -> ManagedProcess:
    """`sipmesh serve` registered as `user` (its program would run only for a session)."""
    proc = spawn([SIPMESH, "serve", "--server", f"127.0.0.1:{port}", "--user", user,
                  "--bind", "127.0.0.1", "-v", "--", "true"], log_path=tmp_path / f"{user}.log", name=user)
    wait_for(lambda: "ready: contact" in proc.log_text(), 15, what=f"{user} registered",
             abort=proc.exit_reason)
    return proc


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_page_shows_registered_agents_and_updates_by_itself(tmp_path: Path, chromium: Chromium) -> None:
    page = free_port("tcp")
    broker, port = start_broker(tmp_path, extra=["--workers", "2", "--status-page", str(page)])
    wait_tcp_listening("127.0.0.1", page, proc=broker)
    home = agent(tmp_path, port, "home")

    chromium.navigate(f"http://127.0.0.1:{page}/")
    assert chromium.wait_until(f"{ROWS}.length === 1 && {ROWS}") == ["sip:home@127.0.0.1"]
    assert chromium.evaluate("document.title") == "sipmesh broker"
    summary = chromium.evaluate("document.getElementById('summary').textContent")
    assert f"UDP 127.0.0.1:{port}" in summary and "2 of 2 workers serving" in summary
    row = chromium.evaluate("document.querySelector('#registrations tbody tr').innerText")
    assert "sip:home@127.0.0.1:" in row and "UDP 127.0.0.1:" in row
    # the section for networks is there, and says there are none yet
    assert chromium.evaluate("getComputedStyle(document.getElementById('networks-empty')).display"
                             " !== 'none' && document.getElementById('networks-empty').textContent"
                             ) == "No networks."

    laptop = agent(tmp_path, port, "laptop")  # no reload: the page must notice by itself
    assert chromium.wait_until(f"{ROWS}.length === 2 && {ROWS}", 10,
                               what="the second agent on the page") == ["sip:home@127.0.0.1",
                                                                         "sip:laptop@127.0.0.1"]
    assert chromium.evaluate("document.getElementById('registrations-count').textContent") == "(2)"
    assert chromium.evaluate("document.getElementById('error').hidden") is True

    shot = tmp_path / "status-page.png"
    chromium.screenshot(shot)
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1200, 480)
    if os.environ.get("SIPMESH_STATUS_SCREENSHOT"):  # how docs/status-page.png is made
        shutil.copy(shot, os.environ["SIPMESH_STATUS_SCREENSHOT"])

    laptop.stop(grace=10)  # unregisters: gone from the page
    assert chromium.wait_until(f"{ROWS}.length === 1 && {ROWS}", 10) == ["sip:home@127.0.0.1"]
    # a page fetched through another host name (DNS rebinding) gets nothing
    status, _ = get(f"http://127.0.0.1:{page}/api/status", {"Host": f"attacker.example:{page}"})
    assert status == 403
    home.stop(grace=10)
    broker.signal_group(signal.SIGTERM)
    assert broker.wait(10) == 0, broker.log_tail()


def test_a_page_with_a_token_asks_for_it(tmp_path: Path, chromium: Chromium) -> None:
    token = secrets.token_hex(24)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    page = free_port("tcp")
    broker, port = start_broker(tmp_path, extra=["--status-page", f"127.0.0.1:{page}",
                                                 "--status-token-file", str(token_file)])
    wait_tcp_listening("127.0.0.1", page, proc=broker)
    agent(tmp_path, port, "home")
    url = f"http://127.0.0.1:{page}/"

    chromium.navigate(url)
    assert "needs its token" in chromium.evaluate("document.body.innerText")
    chromium.navigate(f"{url}?token=wrong-{token}")
    assert "Wrong token" in chromium.evaluate("document.body.innerText")
    chromium.navigate(f"{url}?token={token}")  # once: then a cookie, and the address bar forgets it
    assert chromium.wait_until(f"{ROWS}.length === 1 && {ROWS}") == ["sip:home@127.0.0.1"]
    assert chromium.evaluate("location.href") == url
    assert chromium.evaluate("document.cookie") == ""  # HttpOnly: not readable by scripts

    assert get(f"{url}api/status")[0] == 401
    status, body = get(f"{url}api/status", {"Authorization": f"Bearer {token}"})
    assert status == 200 and '"aor": "sip:home@127.0.0.1"' in body
    assert token not in broker.log_text()


def test_a_page_open_to_the_network_needs_a_token(tmp_path: Path) -> None:
    def broker(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SIPMESH, "broker", "--listen", f"127.0.0.1:{free_port('both')}",
                               "--db", str(tmp_path / "b.db"), "--workers", "1", *args],
                              capture_output=True, text=True, timeout=30)

    refused = broker("--status-page", "0.0.0.0:8080")
    assert refused.returncode == 2 and "--status-token-file" in refused.stderr
    (tmp_path / "short").write_text("abc\n")
    weak = broker("--status-page", "0.0.0.0:8080", "--status-token-file", str(tmp_path / "short"))
    assert weak.returncode == 2 and "at least 16 characters" in weak.stderr

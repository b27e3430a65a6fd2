"""`sipmesh up` starts without loading what only other commands or other sessions use (issue
12: a 10-member mesh within 2 s of the last join; docs/mesh.md's benchmark, START): the
command line imports only the subcommand it names, dnspython's resolver waits for a DNS
name, aioquic for a TCP program's streams. Each of those is a tenth of a second of CPU at
every member's start, ten members starting at once on two cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SIPMESH = str(Path(sys.executable).parent / "sipmesh")
# what `sipmesh up` with a server given by address never uses
UNUSED = ("aioquic", "dns.resolver", "dns.asyncresolver", "cryptography.x509", "aiohttp",
          "prometheus_client", "pyrad", "sqlite3", "sipmesh.broker", "sipmesh.agent.streams",
          "sipmesh.cli.broker", "sipmesh.cli.demo", "sipmesh.cli.daemon")

# `sipmesh up` as far as its start: the command line parsed, the member built (what
# cli/up.py:run_up does before it runs it), then the modules loaded
UP = """
import sys
from sipmesh.cli.main import build_parser
from sipmesh.cli.up import build_member
args = build_parser("up").parse_args(["up", "lab", "--server", "192.0.2.1", "--user", "ann",
                                      "--password", "secret", "--no-hosts"])
build_member(args)
print("\\n".join(sorted(sys.modules)))
"""


def test_sipmesh_up_loads_only_what_it_uses(tmp_path):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path), XDG_STATE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", UP], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout.split()
    assert "sipmesh.apps.mesh" in out  # the member was built
    loaded = [m for m in out if any(m == u or m.startswith(u + ".") for u in UNUSED)]
    assert not loaded, f"`sipmesh up` loads modules it does not use: {loaded}"


def test_every_subcommand_is_still_there():
    listed = subprocess.run([SIPMESH, "--help"], capture_output=True, text=True, timeout=60,
                            check=True).stdout
    for command in ("broker", "serve", "call", "daemon", "status", "handover", "up", "down",
                    "netcheck", "ping", "demo", "network"):
        assert f"    {command} " in listed, listed
    up = subprocess.run([SIPMESH, "up", "--help"], capture_output=True, text=True, timeout=60,
                        check=True).stdout
    assert up.startswith("usage: sipmesh up ") and "--relay" in up
    wrong = subprocess.run([SIPMESH, "upp"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "invalid choice: 'upp'" in wrong.stderr

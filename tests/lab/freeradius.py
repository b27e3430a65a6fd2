"""FreeRADIUS (Debian ``freeradius`` 3.2) as the central account server of a test.

``FreeRadius(run_dir, secret=..., users={name: password}, groups={name: [group]})`` writes
a configuration directory of its own (nothing of /etc/freeradius is read) in the layout
of Debian's: ``radiusd.conf``, ``clients.conf`` (127.0.0.1 with the shared secret,
Message-Authenticator required), ``mods-enabled/{files,digest,pap}``,
``sites-enabled/default`` (``digest`` in authorize and authenticate, as in the stock
default site) and ``mods-config/files/authorize``, the users file (``Cleartext-Password``
entries; each group a ``Filter-Id`` reply item). ``start()`` runs ``freeradius -X -d DIR``
in the foreground (its own process group; inside ``netns`` if given, on that namespace's
loopback) and waits until it is ready; ``stop()`` stops it by PID. It can be started again
on the same port (a server that comes back).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from sipmesh.lab.procs import ManagedProcess, free_port, spawn, wait_udp_listening
from sipmesh.lab.waiting import wait_for

__all__ = ["FreeRadius", "freeradius_unavailable_reason"]

FREERADIUS = "freeradius"


def freeradius_unavailable_reason() -> str | None:
    """None when freeradius can run here, else why not (for pytest.skip)."""
    if shutil.which(FREERADIUS) is None and not Path("/usr/sbin", FREERADIUS).exists():
        return "FreeRADIUS is not installed (apt-get install freeradius; see scripts/install --test)"
    return None


def _quoted(text: str) -> str:
    if any(c in text for c in '"\\\n\r'):
        raise ValueError(f"{text!r}: no quotes, backslashes or line ends in this lab's config")
    return f'"{text}"'


class FreeRadius:
    """One FreeRADIUS server on 127.0.0.1. ``start()``/``stop()`` or a context manager."""

    def __init__(self, run_dir: str | Path, *, secret: str, users: Mapping[str, str],
                 groups: Mapping[str, Sequence[str]] | None = None, port: int | None = None,
                 ip: str = "127.0.0.1", require_message_authenticator: bool = True,
                 netns: object | None = None) -> None:
        """`require_message_authenticator` False: for clients that send none (Kamailio's
        auth_radius through radcli 1.2)."""
        self.run_dir = Path(run_dir)
        self.conf = self.run_dir / "raddb"
        self.ip = ip
        self.port = port or free_port("udp", ip)
        self.secret = secret
        self.users = dict(users)
        self.groups = {name: list(values) for name, values in (groups or {}).items()}
        self.require_message_authenticator = require_message_authenticator
        self.netns = netns
        self.proc: ManagedProcess | None = None
        self.starts = 0

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def hostport(self) -> str:
        return f"{self.ip}:{self.port}"

    def files(self) -> dict[str, str]:
        """The configuration directory: relative path -> text."""
        conf, run = self.conf, self.run_dir
        users = []
        for name, password in self.users.items():
            replies = [f"\tFilter-Id = {_quoted(g)}" for g in self.groups.get(name, [])]
            users.append(f"{name} Cleartext-Password := {_quoted(password)}\n" + ",\n".join(replies))
        return {
            "radiusd.conf": f"""\
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
libdir = /usr/lib/freeradius
raddbdir = {conf}
confdir = {conf}
modconfdir = {conf}/mods-config
logdir = {run}
run_dir = {run}
db_dir = {run}
pidfile = {run}/freeradius.pid
name = freeradius
max_request_time = 10
cleanup_delay = 1
max_requests = 1024
hostname_lookups = no
log {{
	destination = stdout
	auth = yes
}}
security {{
	allow_core_dumps = no
	max_attributes = 200
	reject_delay = 0
	status_server = yes
}}
thread pool {{
	start_servers = 1
	max_servers = 4
	min_spare_servers = 1
	max_spare_servers = 2
}}
$INCLUDE clients.conf
modules {{
	$INCLUDE mods-enabled/
}}
$INCLUDE sites-enabled/
""",
            "clients.conf": f"""\
client localhost {{
	ipaddr = {self.ip}
	secret = {_quoted(self.secret)}
	require_message_authenticator = {"yes" if self.require_message_authenticator else "no"}
}}
""",
            "mods-enabled/files": "files {\n\tfilename = ${modconfdir}/files/authorize\n}\n",
            "mods-enabled/digest": "digest {\n}\n",
            "mods-enabled/pap": "pap {\n}\n",
            "sites-enabled/default": f"""\
server default {{
	listen {{
		type = auth
		ipaddr = {self.ip}
		port = {self.port}
	}}
	authorize {{
		digest
		files
		pap
	}}
	authenticate {{
		digest
		Auth-Type PAP {{
			pap
		}}
	}}
}}
""",
            "mods-config/files/authorize": "\n".join(users) + "\n",
        }

    def write(self) -> None:
        for relative, text in self.files().items():
            path = self.conf / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(text)  # the secret and passwords: readable by us only

    def start(self, timeout: float = 15.0) -> "FreeRadius":
        self.write()
        self.starts += 1
        log = self.run_dir / f"freeradius-{self.starts}.log"
        self.proc = spawn([FREERADIUS, "-X", "-d", str(self.conf)], cwd=self.run_dir,
                          name=f"freeradius{self.starts}", log_path=log, netns=self.netns)
        try:
            wait_udp_listening(self.ip, self.port, self.netns, timeout, proc=self.proc)
            wait_for(lambda: "Ready to process requests" in self.proc.log_text(), timeout,
                     what="FreeRADIUS ready", abort=self.proc.exit_reason)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3.0)

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def __enter__(self) -> "FreeRadius":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

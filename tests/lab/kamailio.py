"""Kamailio (third-party SIP registrar / record-routing proxy) for tests.

``Kamailio(run_dir, ...)`` writes ``tests/lab/kamailio.cfg`` with the chosen parameters into
``run_dir``, starts ``kamailio -DD -E`` in the foreground (own process group, optionally
inside a network namespace), waits until it listens and answers, and stops it by PID.

Auth modes:
  * ``'none'``     anyone may REGISTER / call
  * ``'db_text'``  digest auth against a db_text ``subscriber`` table written from ``users``
                   (realm = the listen host, which is what SIPp's From domain is; with
                   ``realms``, each of them too: a pair's agents name either instance)
  * ``'static'``   digest auth without a DB: password = ``static_pw_prefix + username``
                   (``'pw' + user`` by default, the same rule :func:`tests.lab.sipp.make_users` uses)
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping

from sipmesh.lab.procs import ManagedProcess, free_port, netns_prefix, spawn, wait_tcp_listening, wait_udp_listening
from sipmesh.lab.waiting import wait_for

__all__ = [
    "CFG_TEMPLATE",
    "AUTH_MODES",
    "Kamailio",
    "KamailioError",
    "kamailio_unavailable_reason",
    "render_config",
    "SHIPPED_CFG",
    "shipped_kamailio",
    "write_subscriber_table",
]

CFG_TEMPLATE = Path(__file__).with_name("kamailio.cfg")
SHIPPED_CFG = Path(__file__).resolve().parents[2] / "docs" / "kamailio" / "kamailio.cfg"
AUTH_MODES = ("none", "db_text", "static")
KAMAILIO = "kamailio"


class KamailioError(RuntimeError):
    pass


def kamailio_unavailable_reason() -> str | None:
    """None when Kamailio can be run here, else why not (for pytest.skip)."""
    exe = shutil.which(KAMAILIO) or (os.path.exists("/usr/sbin/kamailio") and "/usr/sbin/kamailio")
    if not exe:
        return "kamailio is not installed (apt-get install kamailio; see scripts/install --test)"
    if not _module_dir():
        return "kamailio modules directory not found"
    return None


def _kamailio_exe() -> str:
    return shutil.which(KAMAILIO) or "/usr/sbin/kamailio"


def _module_dir() -> str | None:
    for d in sorted(glob.glob("/usr/lib/*/kamailio/modules")) + ["/usr/lib/kamailio/modules",
                                                                  "/usr/local/lib64/kamailio/modules"]:
        if os.path.exists(os.path.join(d, "tm.so")):
            return d.rstrip("/") + "/"
    return None


def _users_items(users: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if users is None:
        return []
    if isinstance(users, Mapping):
        return list(users.items())
    return [(u, p) for u, p in users]


def write_subscriber_table(db_dir: str | os.PathLike, users, realm: str | Iterable[str]) -> Path:
    """Write the db_text ``version`` + ``subscriber`` tables (plain password, ha1, ha1b).

    ``users`` is a ``{user: password}`` mapping or ``(user, password)`` pairs, each a row in
    ``realm`` (or in each of several realms).
    ha1/ha1b must be non-empty: db_text rejects the whole table on a null in a non-null column.
    """
    db = Path(db_dir)
    db.mkdir(parents=True, exist_ok=True)
    (db / "version").write_text("id(int,auto) table_name(string) table_version(int) \n0:subscriber:7\n")
    lines = ["id(int,auto) username(string) domain(string) password(string) ha1(string) ha1b(string) \n"]
    rows = [(user, pw, domain) for domain in ([realm] if isinstance(realm, str) else realm)
            for user, pw in _users_items(users)]
    for i, (user, pw, domain) in enumerate(rows, start=1):
        for field in (user, pw, domain):
            if ":" in field or "\n" in field:
                raise ValueError(f"db_text fields cannot contain ':' or newlines: {field!r}")
        ha1 = hashlib.md5(f"{user}:{domain}:{pw}".encode()).hexdigest()
        ha1b = hashlib.md5(f"{user}@{domain}:{domain}:{pw}".encode()).hexdigest()
        lines.append(f"{i}:{user}:{domain}:{pw}:{ha1}:{ha1b}\n")
    (db / "subscriber").write_text("".join(lines))
    return db


def render_config(*, host: str = "127.0.0.1", port: int = 5070, db_url: str | None = None,
                  ctl_socket: str | None = None, auth: str = "none", sdp_rewrite: bool = False,
                  sdp_fake_ip: str = "127.0.0.254", sdp_fake_port: int = 9, tcp: bool = True,
                  children: int = 2, debug: int = 0, static_pw_prefix: str = "pw",
                  defines: Iterable[str] = (), module_dir: str | None = None,
                  template: str | os.PathLike = CFG_TEMPLATE) -> str:
    """The config text: the template with override lines inserted after ``#!KAMAILIO``."""
    if auth not in AUTH_MODES:
        raise ValueError(f"auth must be one of {AUTH_MODES}, not {auth!r}")
    listen_ip = f"[{host}]" if ":" in host else host
    subst = {
        "LISTEN_IP": listen_ip,
        "LISTEN_PORT": str(port),
        "SDP_FAKE_IP": sdp_fake_ip,
        "SDP_FAKE_PORT": str(sdp_fake_port),
        "KAM_MPATH": module_dir or _module_dir() or "/usr/lib/x86_64-linux-gnu/kamailio/modules/",
    }
    head = ["# ---- sipmesh test lab overrides (tests/lab/kamailio.py) ----"]
    for k, v in subst.items():
        if "!" in v or '"' in v:
            raise ValueError(f"bad value for {k}: {v!r}")
        head.append(f'#!substdef "!{k}!{v}!g"')
    if db_url:
        head.append(f'#!define DBURL "{db_url}"')
    if ctl_socket:
        head.append(f'#!define CTLSOCK "{ctl_socket}"')
    head.append(f'#!define STATIC_PW_PREFIX "{static_pw_prefix}"')
    head.append(f"#!define KAM_DEBUG {int(debug)}")
    head.append(f"#!define KAM_CHILDREN {int(children)}")
    flags = list(defines)
    if auth == "db_text":
        flags.append("WITH_AUTH")
    elif auth == "static":
        flags.append("WITH_AUTH_STATIC")
    if sdp_rewrite:
        flags.append("WITH_SDP_REWRITE")
    if not tcp:
        flags.append("WITHOUT_TCP")
    for f in flags:
        head.append(f"#!define {f}")
    head.append("# ---- end of overrides ----")
    text = Path(template).read_text()
    first, _, rest = text.partition("\n")
    if not first.startswith("#!KAMAILIO"):
        raise ValueError(f"{template} does not start with #!KAMAILIO")
    return first + "\n" + "\n".join(head) + "\n" + rest


def shipped_kamailio(run_dir: str | os.PathLike, users_file: str | os.PathLike, *, mesh_domain: str,
                     defines: Iterable[str] = (), **kwargs) -> "Kamailio":
    """Kamailio (not started) with the shipped docs/kamailio/kamailio.cfg (digest on, mesh
    networks on) and the users of a `sipmesh broker` users file, moved over by the shipped
    users-to-dbtext.sh as a site would: a network's members are its realm's users."""
    k = Kamailio(run_dir, template=SHIPPED_CFG, auth="none",  # auth is on in that file
                 defines=[f'MESH_DOMAIN "{mesh_domain}"', *defines], **kwargs)
    if not k.host.startswith("127."):  # pua_reginfo PUBLISHes to 127.0.0.1 unless told (README)
        k.defines.append(f'MESH_PUBLISH_TO "sip:{k.hostport}"')
    subprocess.run(["sh", str(SHIPPED_CFG.with_name("users-to-dbtext.sh")), str(users_file), str(k.db_dir)],
                   check=True, timeout=30)
    return k


class Kamailio:
    """One Kamailio instance. Construct, then :meth:`start` (or use the ``kamailio`` fixture)."""

    def __init__(self, run_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                 auth: str = "none", users: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 netns: object | None = None, sdp_rewrite: bool = False,
                 sdp_fake_ip: str = "127.0.0.254", sdp_fake_port: int = 9, tcp: bool = True,
                 children: int = 2, debug: int = 0, shm_mb: int = 64, pkg_mb: int = 8,
                 static_pw_prefix: str = "pw", defines: Iterable[str] = (),
                 template: str | os.PathLike = CFG_TEMPLATE, realms: Iterable[str] = ()):
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, not {auth!r}")
        self.run_dir = Path(run_dir).absolute()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.netns = netns
        if port is None:
            # a fresh namespace has every port free; on the host probe for one
            port = 5060 if netns is not None else free_port("both" if tcp else "udp", host)
        self.port = int(port)
        self.auth = auth
        self.users = dict(_users_items(users))
        self.realm = host
        self.realms = [host, *(r for r in realms if r != host)]  # a pair's: each one's name
        self.sdp_rewrite = sdp_rewrite
        self.sdp_fake_ip = sdp_fake_ip
        self.sdp_fake_port = sdp_fake_port
        self.tcp = tcp
        self.children = children
        self.debug = debug
        self.shm_mb = shm_mb
        self.pkg_mb = pkg_mb
        self.static_pw_prefix = static_pw_prefix
        self.defines = list(defines)
        self.template = Path(template)
        self.cfg_path = self.run_dir / "kamailio.cfg"
        self.pid_path = self.run_dir / "kamailio.pid"
        self.log_path = self.run_dir / "kamailio.log"
        self.db_dir = self.run_dir / "dbtext"
        ctl = self.run_dir / "kamailio_ctl"
        if len(str(ctl)) > 100:  # AF_UNIX path limit is 108 bytes
            ctl = Path(tempfile.mkdtemp(prefix="smk-")) / "ctl"
        self.ctl_path = ctl
        self.proc: ManagedProcess | None = None

    # -- derived
    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def hostport(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"

    @property
    def uri(self) -> str:
        return f"sip:{self.hostport}"

    def password_for(self, user: str) -> str:
        if self.auth == "static":
            return self.static_pw_prefix + user
        return self.users[user]

    # -- config
    def write_config(self) -> Path:
        if self.auth == "db_text":
            write_subscriber_table(self.db_dir, self.users, self.realms)
        text = render_config(
            host=self.host, port=self.port, db_url=f"text://{self.db_dir}",
            ctl_socket=f"unix:{self.ctl_path}", auth=self.auth, sdp_rewrite=self.sdp_rewrite,
            sdp_fake_ip=self.sdp_fake_ip, sdp_fake_port=self.sdp_fake_port, tcp=self.tcp,
            children=self.children, debug=self.debug, static_pw_prefix=self.static_pw_prefix,
            defines=self.defines, template=self.template)
        self.cfg_path.write_text(text)
        return self.cfg_path

    def check(self) -> subprocess.CompletedProcess:
        """``kamailio -c -f CFG``; raises KamailioError with the output on failure."""
        if not self.cfg_path.exists():
            self.write_config()
        p = subprocess.run(netns_prefix(self.netns) + [_kamailio_exe(), "-c", "-f", str(self.cfg_path)],
                           capture_output=True, text=True, timeout=30, cwd=self.run_dir)
        if p.returncode != 0:
            raise KamailioError(f"kamailio -c failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def argv(self) -> list[str]:
        rd = str(self.run_dir)
        return [_kamailio_exe(), "-f", str(self.cfg_path), "-DD", "-E",
                "-m", str(self.shm_mb), "-M", str(self.pkg_mb),
                "-P", str(self.pid_path), "-Y", rd, "-w", rd]

    # -- lifecycle
    def start(self, timeout: float = 15.0) -> "Kamailio":
        if self.proc is not None and self.proc.alive():
            raise KamailioError("already running")
        self.write_config()
        self.pid_path.unlink(missing_ok=True)
        self.proc = spawn(self.argv(), cwd=self.run_dir, log_path=self.log_path,
                          netns=self.netns, name=f"kamailio:{self.port}")
        try:
            wait_for(lambda: self.pid_path.exists() and self.pid_path.read_text().strip(), timeout,
                     what="kamailio pid file", abort=self.proc.exit_reason)
            wait_udp_listening(self.host, self.port, self.netns, timeout, proc=self.proc)
            if self.tcp:
                wait_tcp_listening(self.host, self.port, self.netns, timeout, proc=self.proc)
            if self.netns is None:
                wait_for(lambda: self.options_ping(0.5), timeout, 0.1,
                         what=f"kamailio {self.hostport} answering OPTIONS", abort=self.proc.exit_reason)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM to the main PID (Kamailio then stops its workers), group-kill fallback."""
        if self.proc is None:
            return None
        pid = self.pid
        if self.proc.alive() and pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        rc = self.proc.stop(grace=1.0)
        self.pid_path.unlink(missing_ok=True)
        return rc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- probes
    def options_ping(self, timeout: float = 1.0) -> bool:
        """Send one OPTIONS over UDP from the host namespace; True on a 200 reply."""
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.bind((self.host if self.host.startswith("127.") or self.host == "::1" else "", 0))
            lport = s.getsockname()[1]
            branch = "z9hG4bK" + uuid.uuid4().hex[:16]
            msg = (f"OPTIONS {self.uri} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {self.host}:{lport};branch={branch};rport\r\n"
                   f"Max-Forwards: 70\r\n"
                   f"From: <sip:probe@{self.hostport}>;tag={uuid.uuid4().hex[:8]}\r\n"
                   f"To: <{self.uri}>\r\n"
                   f"Call-ID: {uuid.uuid4().hex}@lab\r\n"
                   f"CSeq: 1 OPTIONS\r\n"
                   f"Content-Length: 0\r\n\r\n")
            s.sendto(msg.encode(), self.address)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    data = s.recv(65535)
                except (socket.timeout, ConnectionRefusedError):
                    return False
                if branch.encode() in data:
                    return data.startswith(b"SIP/2.0 200")
            return False

    def registered(self, user: str) -> bool:
        """Does Kamailio's location table hold a binding for ``user``?"""
        return f"AoR: {user}\n" in self.rpc("ul.dump")

    def rpc(self, *args: str, timeout: float = 10) -> str:
        """``kamcmd -s CTL ARGS...`` (e.g. ``rpc('ul.dump')``); returns stdout."""
        exe = shutil.which("kamcmd") or "/usr/sbin/kamcmd"
        p = subprocess.run(netns_prefix(self.netns) + [exe, "-s", f"unix:{self.ctl_path}", *args],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise KamailioError(f"kamcmd {' '.join(args)} failed: {p.stdout}{p.stderr}")
        return p.stdout

    def __enter__(self) -> "Kamailio":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Kamailio {self.hostport} auth={self.auth} pid={self.pid}>"

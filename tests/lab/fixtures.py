"""pytest fixtures of the test lab (loaded via ``pytest_plugins`` in tests/conftest.py).

* autouse ``_lab_reap_processes``: stops every process spawned (``procs.spawn``) during a test
* ``spawn_proc``     factory ``(argv, *, name=None, cwd=None, env=None, netns=None) -> ManagedProcess``
* ``netns_factory``  a :class:`NetnsFactory` (skips unless root + ``ip netns``); all deleted after
* ``lo_only_netns``  one namespace with only ``lo`` up
* ``nat_lab``        a :class:`NatLab` (internet bridge, no hosts yet) on ``netns_factory``
* ``coturn``         factory ``(ip="127.0.0.1", *, realm, users={name: ha1}, netns=None, **kw)
                     -> Coturn`` (started; skips without turnserver)
* ``kamailio``       factory ``(**Kamailio kwargs, start=True) -> Kamailio`` (skips w/o kamailio)
* ``tls_contexts``   (server, client) ``ssl`` contexts for a self-signed localhost certificate
* ``sipp``           :class:`SippLab`: ``run(args, **kw)``, ``start(args, **kw)``, ``make_users(n)``
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import ssl
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from sipmesh.lab.coturn import Coturn, coturn_unavailable_reason
from .kamailio import Kamailio, kamailio_unavailable_reason
from sipmesh.lab.netns import Netns, NetnsFactory, netns_unavailable_reason
from sipmesh.lab.procs import REGISTRY, ManagedProcess, spawn
from .topology import NatLab
from .sipp import SippProcess, SippResult, SippUsers, make_users, run_sipp, sipp_unavailable_reason, start_sipp


@pytest.fixture(autouse=True)
def _lab_reap_processes() -> Iterator[None]:
    mark = REGISTRY.mark()
    try:
        yield
    finally:
        REGISTRY.stop_since(mark)


@pytest.fixture
def spawn_proc(tmp_path: Path) -> Callable[..., ManagedProcess]:
    counter = itertools.count(1)

    def _spawn(argv: Sequence[str], *, name: str | None = None, cwd=None, env=None, netns=None) -> ManagedProcess:
        tag = name or f"{Path(str(argv[0])).name}{next(counter)}"
        return spawn(argv, cwd=cwd or tmp_path, env=env, netns=netns, name=tag,
                     log_path=tmp_path / "logs" / f"{tag}.log")

    return _spawn


@contextmanager
def stopped_gracefully(spawn: Callable[..., ManagedProcess], grace: float = 10.0
                       ) -> Iterator[Callable[..., ManagedProcess]]:
    """A spawner whose processes get SIGTERM and `grace` seconds, newest first, when the
    block ends: a fixture that yields from inside it (and depends on the SIP server or the
    namespaces) stops its agents before they go, so that the agents can unregister."""
    started: list[ManagedProcess] = []

    def start(argv: Sequence[str], **kwargs: object) -> ManagedProcess:
        proc = spawn(argv, **kwargs)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.stop(grace=grace)


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def lo_only_netns(netns_factory: NetnsFactory) -> Netns:
    return netns_factory.lo_only()


@pytest.fixture
def nat_lab(netns_factory: NetnsFactory, tmp_path: Path) -> NatLab:
    return NatLab(netns_factory, run_dir=tmp_path / "natlab")


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Callable[..., Coturn]]:
    reason = coturn_unavailable_reason()
    if reason:
        pytest.skip(reason)
    started: list[Coturn] = []
    counter = itertools.count(1)

    def _make(ip: str = "127.0.0.1", **kwargs) -> Coturn:
        server = Coturn(tmp_path / f"coturn{next(counter)}", ip, **kwargs)
        started.append(server)
        return server.start()

    try:
        yield _make
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def kamailio(tmp_path: Path) -> Iterator[Callable[..., Kamailio]]:
    reason = kamailio_unavailable_reason()
    if reason:
        pytest.skip(reason)
    started: list[Kamailio] = []
    counter = itertools.count(1)

    def _make(*, start: bool = True, run_dir=None, **kwargs) -> Kamailio:
        k = Kamailio(run_dir or tmp_path / f"kamailio{next(counter)}", **kwargs)
        started.append(k)
        if start:
            k.start()
        return k

    try:
        yield _make
    finally:
        for k in reversed(started):
            k.stop()


class SippLab:
    """SIPp runs whose files go to one directory (``tmp_path / 'sipp'``)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def run(self, args: Sequence[str], *, timeout: float = 60.0, **kwargs) -> SippResult:
        kwargs.setdefault("cwd", self.dir)
        return run_sipp(args, timeout=timeout, **kwargs)

    def start(self, args: Sequence[str], **kwargs) -> SippProcess:
        kwargs.setdefault("cwd", self.dir)
        return start_sipp(args, **kwargs)

    def make_users(self, n: int, **kwargs) -> SippUsers:
        return make_users(n, self.dir, **kwargs)


@pytest.fixture
def sipp(tmp_path: Path) -> SippLab:
    reason = sipp_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return SippLab(tmp_path / "sipp")


@pytest.fixture(scope="session")
def tls_contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts around a fresh self-signed certificate for localhost,
    127.0.0.1 and ::1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory: Path = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


@pytest.fixture
def broker_address(tmp_path: Path) -> Iterator[str]:
    """A ``sipmesh broker`` process on loopback (no users file); its ``host:port``."""
    from .broker import start_broker

    proc, port = start_broker(tmp_path)
    yield f"127.0.0.1:{port}"
    proc.stop(grace=5)

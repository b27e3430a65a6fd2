"""This host's self-signed certificate, whose fingerprint travels in SDP (RFC 8122).

Peers authenticate each other by the fingerprint the other side sent through
SIP (``a=fingerprint:sha-256 AB:CD:...``), as DTLS-SRTP does: no CA is needed,
and the key never leaves the host. The pair is made once, with the
`cryptography` package, and kept in the user's state directory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from sipmesh.agent.errors import Exit, ProfileError


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/sipmesh, else ~/.local/state/sipmesh."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sipmesh"


@dataclass(frozen=True)
class HostCertificate:
    cert: Path
    key: Path
    fingerprint: str  # "sha-256 AB:CD:..." as in a=fingerprint

    @property
    def hex(self) -> str:
        """The colon-separated hex alone, as OpenVPN's --peer-fingerprint wants it."""
        return self.fingerprint.split(" ", 1)[1]


def fingerprint_of(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(cert_pem)
    digest = cert.fingerprint(hashes.SHA256())
    return "sha-256 " + ":".join(f"{b:02X}" for b in digest)


def host_certificate(directory: Path, common_name: str = "sipmesh") -> HostCertificate:
    """The certificate in `directory` (host.crt, host.key), made on first use."""
    cert_path, key_path = directory / "host.crt", directory / "host.key"
    if not (cert_path.exists() and key_path.exists()):
        _generate(directory, cert_path, key_path, common_name)
    try:
        return HostCertificate(cert_path, key_path, fingerprint_of(cert_path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ProfileError(f"cannot read the host certificate {cert_path}: {exc} "
                           "(delete it to make a new one)", Exit.FAILURE) from None


def _generate(directory: Path, cert_path: Path, key_path: Path, common_name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise ProfileError(f"cannot create the host certificate in {directory}: {exc} (choose "
                           "a writable directory: --state-dir; daemon: [agent] state_dir)",
                           Exit.FAILURE) from None

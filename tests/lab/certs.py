"""Test certificates made with `cryptography`: a CA, and server or client certificates
it signs, written as PEM files; and every text form a private key could leak in."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class LabCA:
    cert: Path
    key: Path
    _key: object
    _name: object

    def issue(self, directory: Path, stem: str, names: list[str], *,
              client: bool = False) -> Issued:
        """A certificate for `names` (DNS names or IP addresses) signed by this CA."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = _new_key()
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
                         self._name, key)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self._key, hashes.SHA256()))  # type: ignore[arg-type]
        return Issued(*_write(directory, stem, cert, key))


def make_ca(directory: Path, name: str = "sipmesh test CA") -> LabCA:
    """A self-signed CA certificate and its key in `directory` (STEM ca)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(subject, subject, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = _write(directory, "ca", cert, key)
    return LabCA(cert_path, key_path, key, subject)


def _new_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject, issuer, key):  # type: ignore[no-untyped-def]
    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _write(directory: Path, stem: str, cert, key) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def private_texts(key: "Ed25519PrivateKey") -> list[str]:
    """Every form a private key could leak in: its raw seed in base64, base64url and hex,
    and the PEM body."""
    import base64

    from cryptography.hazmat.primitives import serialization

    from sipmesh.agent.trust import b64url

    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return [base64.b64encode(raw).decode().rstrip("="), b64url(raw), raw.hex(),
            "".join(pem.splitlines()[1:-1])]

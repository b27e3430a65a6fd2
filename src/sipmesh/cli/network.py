"""`sipmesh network`: a mesh network's trust, for its admin and its members
(docs/mesh-trust.md).

Admin side, on a machine of the admin's (lock mode: never on the broker)::

    sipmesh network ca init NETWORK --out DIR
    sipmesh network cert issue NETWORK --ca DIR --name N --address A --wg-pubkey K
                                       --identity-pubkey P [--days D] [--groups g1,g2]
    sipmesh network ca revoke NETWORK --ca DIR (--serial S | --name N | --cert FILE)

Member side::

    sipmesh network identity init [NETWORK] [--key FILE]
    sipmesh network identity show [NETWORK] [--key FILE]

Anyone: ``sipmesh network cert show FILE [--ca DIR]``.

Private keys are written 0600 and never printed; what this prints (public keys,
certificates, revocation lists) may be mailed or pasted anywhere. The broker's own
networks (pools, members, ACLs) are ``sipmesh broker network``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sipmesh.agent.trust import (DEFAULT_DAYS, MAX_DAYS, MemberCertificate, NetworkCA, RevocationList,
                                 TrustError, generate_identity, identity_public_text,
                                 issue_member_certificate, load_anchor, load_certificate,
                                 load_identity, load_revocations, save_identity, write_text)
from sipmesh.apps.certs import default_state_dir

PROG = "sipmesh network"
REVOKED = "revoked"   # DIR/revoked: the CA-signed revocation list
ISSUED = "issued"     # DIR/issued/SERIAL.cert: every certificate the CA issued


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "network", help="a mesh network's CA, member certificates and identity keys",
        description="Trust for a mesh network: the network's CA (kept by its admin, off the "
                    "broker in lock mode), member certificates binding each member's name, "
                    "mesh address and WireGuard key, and members' identity keys. See "
                    "docs/mesh-trust.md.")
    sub = p.add_subparsers(dest="network_command", metavar="ca|cert|identity", required=True)

    ca = sub.add_parser("ca", help="the network's CA: init, revoke")
    casub = ca.add_subparsers(dest="ca_command", metavar="init|revoke", required=True)
    c = casub.add_parser("init", help="make the network's CA key pair (admin side)",
                         description="Make the network's CA: DIR/ca.key (the private key, 0600: "
                                     "keep it on this machine), DIR/ca.pub (give it to the "
                                     "broker and to every member) and DIR/revoked (the signed, "
                                     "empty revocation list).")
    c.add_argument("network", metavar="NETWORK")
    c.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="the CA's directory (made 0700; must not hold a CA yet)")
    c.set_defaults(func=run_ca_init)

    c = _admin_command(casub, "revoke", "revoke a member's certificate",
                       "Add a certificate to DIR/revoked, the CA-signed revocation list, and "
                       "print the list. Give the new DIR/revoked to the broker (or to the "
                       "members): they refuse the certificate from then on.")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=int, help="the certificate's serial number")
    which.add_argument("--name", help="every unexpired certificate this CA issued to the member")
    which.add_argument("--cert", type=Path, metavar="FILE", help="the certificate in FILE")
    c.set_defaults(func=run_ca_revoke)

    cert = sub.add_parser("cert", help="member certificates: issue, show")
    certsub = cert.add_subparsers(dest="cert_command", metavar="issue|show", required=True)
    c = _admin_command(certsub, "issue", "issue a member's certificate (admin side)",
                       "Issue a certificate binding a member's name, mesh address, groups, "
                       "WireGuard public key and identity public key, signed by the network's "
                       "CA. It is printed (or written to --out) and kept in DIR/issued/. "
                       "Certificates are short-lived: issue a new one before the old one "
                       "expires.")
    c.add_argument("--name", required=True, help="the member's name (its SIP user name)")
    c.add_argument("--address", required=True, metavar="A.B.C.D/P",
                   help="the member's mesh address with the pool's prefix, e.g. 100.64.0.5/24")
    c.add_argument("--wg-pubkey", required=True, metavar="KEY",
                   help="the member's WireGuard public key (base64, as `wg pubkey` prints it)")
    c.add_argument("--identity-pubkey", required=True, metavar="KEY",
                   help="the member's identity public key (`sipmesh network identity init` "
                        "prints it)")
    c.add_argument("--days", type=float, default=DEFAULT_DAYS,
                   help=f"validity in days [default: {DEFAULT_DAYS}]")
    c.add_argument("--groups", default="", metavar="G1,G2", help="the member's groups")
    c.add_argument("--out", type=Path, metavar="FILE", help="write the certificate there "
                                                            "instead of printing it")
    c.set_defaults(func=run_cert_issue)

    c = certsub.add_parser("show", help="print a certificate's fields (and check it)",
                           description="Print a member certificate's fields. With --ca, also "
                                       "check it against the network's CA and revocation list.")
    c.add_argument("file", metavar="FILE", help="the certificate ('-': stdin)")
    c.add_argument("--ca", type=Path, metavar="DIR|FILE",
                   help="the CA's directory or its ca.pub: check the certificate")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=run_cert_show)

    ident = sub.add_parser("identity", help="this member's identity key: init, show")
    isub = ident.add_subparsers(dest="identity_command", metavar="init|show", required=True)
    for name, help_text in (("init", "make this member's identity key and print its public key"),
                            ("show", "print the public key of this member's identity key")):
        c = isub.add_parser(name, help=help_text, description=help_text + ". The private key "
                            "(0600) signs this member's sessions and never leaves this host; give "
                            "the printed public key to the network's admin.")
        c.add_argument("network", metavar="NETWORK", nargs="?",
                       help="a key for this network [default: one key for every network]")
        c.add_argument("--key", type=Path, metavar="FILE",
                       help="the key file [default: STATE/mesh/[NETWORK/]identity.key]")
        c.set_defaults(func=run_identity)


# ---------------------------------------------------------------------------- helpers


def _admin_command(sub: argparse._SubParsersAction, name: str, help_text: str,
                   description: str) -> argparse.ArgumentParser:
    """A command that uses the CA's private key: NETWORK and --ca DIR."""
    c = sub.add_parser(name, help=help_text, description=description)
    c.add_argument("network", metavar="NETWORK")
    c.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA's directory")
    return c


def _fail(exc: Exception) -> int:
    print(f"{PROG}: {exc}", file=sys.stderr)
    return 1


def _load_ca(args: argparse.Namespace) -> NetworkCA:
    ca = NetworkCA.load(args.ca)
    if ca.network != args.network:
        raise TrustError("other-ca", f"{args.ca} is the CA of network {ca.network}, "
                                     f"not {args.network}")
    return ca


def _revocations(ca: NetworkCA, directory: Path) -> RevocationList:
    path = directory / REVOKED
    if not path.exists():
        return RevocationList.empty(ca)
    return load_revocations(path, ca.public_key)


def _issued(directory: Path) -> list[MemberCertificate]:
    folder = directory / ISSUED
    return [load_certificate(path) for path in sorted(folder.glob("*.cert"))] \
        if folder.is_dir() else []


def identity_path(network: str | None, key: Path | None) -> Path:
    if key is not None:
        return key
    base = default_state_dir() / "mesh"
    return (base / network if network else base) / "identity.key"


# ---------------------------------------------------------------------------- commands


def run_ca_init(args: argparse.Namespace) -> int:
    try:
        ca = NetworkCA.create(args.network)
        ca.save(args.out)
        write_text(args.out / REVOKED, RevocationList.empty(ca).to_text())
    except (TrustError, OSError) as exc:
        return _fail(exc)
    print(f"made the CA of network {ca.network} (key id {ca.key_id.hex()}) in {args.out}:\n"
          f"  {args.out / 'ca.key'}  the private key: keep it here (lock mode: never on "
          "the broker)\n"
          f"  {args.out / 'ca.pub'}  give it to the broker and to every member\n"
          f"  {args.out / REVOKED}  the revocation list (empty)")
    return 0


def run_cert_issue(args: argparse.Namespace) -> int:
    try:
        ca = _load_ca(args)
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        cert = issue_member_certificate(ca, name=args.name, address=args.address,
                                        wg_pubkey=args.wg_pubkey,
                                        identity_pubkey=args.identity_pubkey,
                                        groups=groups, days=args.days)
        text = cert.to_text() + "\n"
        write_text(args.ca / ISSUED / f"{cert.serial}.cert", text)
        if args.out:
            write_text(args.out, text)
    except (TrustError, OSError) as exc:
        return _fail(exc)
    if not args.out:
        sys.stdout.write(text)
    print(f"issued the certificate of {cert.name} in network {cert.network}: address "
          f"{cert.address}, serial {cert.serial}, valid until {cert.describe()['not_after']}"
          + (f", written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def run_cert_show(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("ascii")
        cert = MemberCertificate.from_text(text)
        fields = cert.describe()
        status = 0
        if args.ca:
            directory = args.ca if args.ca.is_dir() else args.ca.parent
            anchor = load_anchor(args.ca / "ca.pub" if args.ca.is_dir() else args.ca)
            revoked = load_revocations(directory / REVOKED, anchor.public_key) \
                if (directory / REVOKED).exists() else ()
            try:
                cert.verify(anchor.public_key, time.time(), revoked)
                fields["check"] = "valid"
            except TrustError as exc:
                fields["check"] = f"refused: {exc.message}"
                status = 1
    except (TrustError, OSError, UnicodeDecodeError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(fields, indent=2))
    else:
        width = max(len(key) for key in fields)
        for key, value in fields.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key:<{width}}  {shown}")
    return status


def run_ca_revoke(args: argparse.Namespace) -> int:
    try:
        ca = _load_ca(args)
        now = time.time()
        if args.cert:
            certs = [load_certificate(args.cert)]
            if certs[0].ca_id != ca.key_id:
                raise TrustError("other-ca", f"{args.cert} was not issued by this CA")
        elif args.name:
            certs = [c for c in _issued(args.ca) if c.name == args.name and c.not_after > now]
            if not certs:
                raise TrustError("missing", f"this CA has issued no unexpired certificate to "
                                            f"{args.name} (see {args.ca / ISSUED})")
        else:
            certs = [c for c in _issued(args.ca) if c.serial == args.serial]
        # (serial, not_after, who): an unknown serial (issued from another copy of the CA)
        # is listed for as long as any certificate can live.
        entries = [(c.serial, c.not_after, f"{c.name}, {c.address}") for c in certs] or \
            [(args.serial, int(now + MAX_DAYS * 86400), "not in " + str(args.ca / ISSUED))]
        crl = _revocations(ca, args.ca)
        for serial, not_after, _ in entries:
            crl = crl.revoke(ca, serial, not_after, now)
        write_text(args.ca / REVOKED, crl.to_text())
    except (TrustError, OSError) as exc:
        return _fail(exc)
    for serial, _, who in entries:
        print(f"revoked serial {serial} ({who})", file=sys.stderr)
    print(f"{args.ca / REVOKED} now lists {len(crl.entries)} certificate(s): give it to the "
          "broker (or the members)", file=sys.stderr)
    sys.stdout.write(crl.to_text())
    return 0


def run_identity(args: argparse.Namespace) -> int:
    path = identity_path(args.network, args.key)
    try:
        if args.identity_command == "init":
            key = generate_identity()
            save_identity(path, key)
            print(f"made the identity key {path} (0600, never leaves this host); give the "
                  "admin this public key:", file=sys.stderr)
        else:
            key = load_identity(path)
    except TrustError as exc:
        if exc.reason == "exists":
            return _fail(f"{path} exists (its public key: "
                         f"sipmesh network identity show --key {path})")
        return _fail(exc)
    except OSError as exc:
        return _fail(exc)
    print(identity_public_text(key))
    return 0

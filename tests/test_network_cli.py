"""`sipmesh network ca|cert|identity` as an admin and a member run them (real processes)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from sipmesh.agent.trust import (NetworkCA, TrustError, identity_public_text,
                                 load_certificate, load_identity, load_revocations,
                                 sign_session, verify_session)
from sipmesh.apps.wireguard import keypair
from tests.lab.certs import private_texts

SIPMESH = [sys.executable, "-m", "sipmesh"]


class Runner:
    """Runs `sipmesh network ...` with its own state directory and keeps every output."""

    def __init__(self, tmp_path: Path) -> None:
        self.env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
        self.outputs: list[str] = []

    def __call__(self, *args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([*SIPMESH, "network", *map(str, args)], input=stdin,
                                capture_output=True, text=True, timeout=60, env=self.env)
        self.outputs += [result.stdout, result.stderr]
        return result


def test_admin_and_member_round_trip_and_no_private_key_is_ever_printed(tmp_path):
    run = Runner(tmp_path)
    ca_dir = tmp_path / "admin" / "lab-ca"

    made = run("ca", "init", "lab", "--out", ca_dir)
    assert made.returncode == 0, made.stderr
    assert "ca.pub" in made.stdout and "never on the broker" in made.stdout
    assert stat.S_IMODE(os.stat(ca_dir / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    again = run("ca", "init", "lab", "--out", ca_dir)
    assert again.returncode == 1 and "a network has one CA" in again.stderr

    # the member makes its identity key and hands the printed public key to the admin
    ident = run("identity", "init", "lab")
    assert ident.returncode == 0, ident.stderr
    key_file = tmp_path / "state" / "sipmesh" / "mesh" / "lab" / "identity.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    identity = load_identity(key_file)
    assert ident.stdout.strip() == identity_public_text(identity)
    shown = run("identity", "show", "lab")
    assert shown.stdout == ident.stdout
    twice = run("identity", "init", "lab")
    assert twice.returncode == 1 and "identity show" in twice.stderr
    assert load_identity(key_file).public_key() == identity.public_key()  # not replaced

    _, wg_public = keypair()
    issued = run("cert", "issue", "lab", "--ca", ca_dir, "--name", "alice", "--address",
                 "100.64.0.5/24", "--wg-pubkey", wg_public, "--identity-pubkey",
                 ident.stdout.strip(), "--groups", "admins,lab", "--days", "3")
    assert issued.returncode == 0, issued.stderr
    assert "issued the certificate of alice" in issued.stderr
    cert_file = tmp_path / "alice.cert"
    cert_file.write_text(issued.stdout)
    cert = load_certificate(cert_file)
    assert (cert.name, str(cert.address), cert.groups, cert.wg_pubkey) == \
        ("alice", "100.64.0.5/24", ("admins", "lab"), wg_public)
    assert abs(cert.not_after - (time.time() + 3 * 86400)) < 60
    assert (ca_dir / "issued" / f"{cert.serial}.cert").read_text() == issued.stdout

    # the member signs a session with what it got; a peer with ca.pub verifies it
    ca_public = NetworkCA.load(ca_dir).public_key
    attrs = [("wg-pubkey", wg_public), ("mesh-ip", "100.64.0.5")]
    attrs += sign_session(attrs, call_id="c1", from_uri="sip:alice@x", to_uri="sip:bob@x",
                          role="offer", certificate=cert, identity_key=identity)
    assert verify_session(attrs, "c1", "sip:alice@x", "sip:bob@x", "offer", ca_public).name == "alice"

    show = run("cert", "show", cert_file, "--ca", ca_dir)
    assert show.returncode == 0, show.stderr
    lines = dict(line.split(None, 1) for line in show.stdout.splitlines())
    assert lines["name"] == "alice" and lines["address"] == "100.64.0.5/24"
    assert lines["groups"] == "admins, lab" and lines["check"] == "valid"
    assert lines["serial"] == str(cert.serial)
    from_stdin = run("cert", "show", "-", "--json", stdin=issued.stdout)
    assert json.loads(from_stdin.stdout)["wg_pubkey"] == wg_public

    revoked = run("ca", "revoke", "lab", "--ca", ca_dir, "--name", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked serial {cert.serial} (alice, 100.64.0.5/24)" in revoked.stderr
    crl = load_revocations(ca_dir / "revoked", ca_public)
    assert cert.serial in crl and crl.to_text() == revoked.stdout
    try:
        verify_session(attrs, "c1", "sip:alice@x", "sip:bob@x", "offer", ca_public, crl)
        raise AssertionError("a revoked certificate verified")
    except TrustError as exc:
        assert exc.reason == "revoked"
    show = run("cert", "show", cert_file, "--ca", ca_dir / "ca.pub", "--json")
    assert show.returncode == 1
    assert json.loads(show.stdout)["check"].startswith("refused: the certificate of alice")
    by_serial = run("ca", "revoke", "lab", "--ca", ca_dir, "--serial", "12345")
    assert by_serial.returncode == 0 and "revoked serial 12345" in by_serial.stderr
    assert load_revocations(ca_dir / "revoked", ca_public).serials == {cert.serial, 12345}
    by_file = run("ca", "revoke", "lab", "--ca", ca_dir, "--cert", cert_file)
    assert by_file.returncode == 0, by_file.stderr

    # nothing printed, in any command, holds a private key in any encoding
    printed = "\n".join(run.outputs)
    for secret in private_texts(identity) + private_texts(NetworkCA.load(ca_dir)._key):
        assert secret not in printed


def test_mistakes_are_refused_with_what_to_fix(tmp_path):
    run = Runner(tmp_path)
    ca_dir = tmp_path / "ca"
    assert run("ca", "init", "lab", "--out", ca_dir).returncode == 0
    identity = run("identity", "init", "--key", tmp_path / "id.key").stdout.strip()
    _, wg = keypair()
    base = ["cert", "issue", "lab", "--ca", ca_dir, "--name", "bob", "--address", "100.64.0.6/24",
            "--wg-pubkey", wg, "--identity-pubkey", identity]

    def fails(args, text):
        result = run(*args)
        assert result.returncode != 0 and text in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

    fails(["cert", "issue", "other", *base[3:]], "is the CA of network lab, not other")
    fails([*base[:8], "100.64.0.300/24", *base[9:]], "is not an address")
    fails([*base[:10], "not-a-key", *base[11:]], "WireGuard public key 'not-a-key' is not a base64")
    fails([*base, "--groups", "bad group"], "group name 'bad group'")
    fails([*base, "--days", "400"], "validity of 400.0 days")
    fails(["cert", "show", tmp_path / "nothing"], "nothing")
    fails(["ca", "revoke", "lab", "--ca", ca_dir, "--name", "nobody"], "no unexpired certificate")
    fails(["ca", "init", "Bad_Name", "--out", tmp_path / "x"], "network name 'Bad_Name'")
    os.chmod(ca_dir / "ca.key", 0o640)
    fails(base, "chmod 600")

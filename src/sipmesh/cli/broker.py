"""`sipmesh broker`: the embedded registrar/proxy, and `sipmesh broker users` for its users file."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path

from sipmesh.broker.location import default_db_path
from sipmesh.broker.registrar import RegistrarPolicy
from sipmesh.broker.server import MODES, BrokerConfig
from sipmesh.broker.users import UsersFile, UsersFileError
from sipmesh.cli import broker_network
from sipmesh.cli.common import setup_logging
from sipmesh.ops.listen import listen_argument
from sipmesh.sip.errors import ParseError
from sipmesh.sip.uri import split_hostport

log = logging.getLogger("sipmesh.broker")
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "broker", help="run the embedded SIP registrar + proxy (or manage its users)",
        description="Registrar, location service, stateful proxy or redirect server, with digest "
                    "authentication when a users file is given. Runs in the foreground; stop it with "
                    "Ctrl-C or SIGTERM.")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to listen on, repeatable (default 0.0.0.0:5060)")
    p.add_argument("--transport", default="udp,tcp",
                   help="comma-separated transports: udp, tcp, tls (TLS listens on PORT+1) [udp,tcp]")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain for TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for TLS")
    p.add_argument("--domain", action="append", default=[], metavar="D",
                   help="a domain served here, repeatable; requests for other domains are refused "
                        "(403 Not relaying) unless --forward-foreign")
    p.add_argument("--forward-foreign", action="store_true",
                   help="forward requests for domains not served here instead of refusing them")
    p.add_argument("--users", type=Path, metavar="FILE",
                   help="users file (HA1 hashes); when given, every REGISTER and INVITE must "
                        "authenticate")
    p.add_argument("--auth-algorithms", default="SHA-256,MD5", metavar="LIST",
                   help="digest algorithms offered, most preferred first; clients that only read the "
                        "first challenge and know only MD5 (SIPp, old phones) need MD5 [SHA-256,MD5]")
    p.add_argument("--db", type=Path, metavar="FILE", default=None,
                   help=f"location database (SQLite) [default: {default_db_path()}]")
    p.add_argument("--mode", choices=MODES, default="proxy",
                   help="proxy requests to registered users, or answer 302 with their contacts [proxy]")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes sharing the sockets (SO_REUSEPORT) and the database "
                        "[the number of CPUs]")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop: uvloop when installed (faster), else asyncio [auto]")
    p.add_argument("--min-expires", type=int, default=60, help="shorter registrations get 423 [60]")
    p.add_argument("--max-expires", type=int, default=3600, help="longer registrations are shortened to this [3600]")
    p.add_argument("--rate-limit", type=float, default=500.0, metavar="PER_SECOND",
                   help="requests per second allowed from one source address, 0 = no limit "
                        "(503 + Retry-After above it) [500]")
    p.add_argument("--no-load-shedding", action="store_true",
                   help="do not answer 503 when the receive queue fills up")
    ops = p.add_argument_group("for the operator (docs/operations.md)")
    ops.add_argument("--metrics", type=listen_argument, metavar="[HOST:]PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (a bare PORT: on "
                          "127.0.0.1)")
    ops.add_argument("--status-page", type=listen_argument, metavar="[HOST:]PORT",
                     help="serve a read-only status page (registrations) at http://HOST:PORT/ (a "
                          "bare PORT: on 127.0.0.1; any other address needs --status-token-file)")
    ops.add_argument("--status-token-file", type=Path, metavar="FILE",
                     help="the status page asks for the token in FILE (open it once as "
                          "http://HOST:PORT/?token=TOKEN)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="[info]")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request (log level debug)")
    p.add_argument("--debug", action="store_true",
                   help="also log every SIP message (credentials redacted)")
    p.set_defaults(func=run_broker)

    sub = p.add_subparsers(dest="broker_command", metavar="users|network")
    u = sub.add_parser("users", help="manage the users file: add, remove, list",
                       description="Manage the broker's users file. Passwords are read from a prompt "
                                   "or stdin, hashed (MD5 and SHA-256 HA1) and never stored.")
    usub = u.add_subparsers(dest="users_command", metavar="add|remove|list", required=True)
    for name, help_text in (("add", "add a user or change its password"), ("remove", "remove a user"),
                            ("list", "list users")):
        c = usub.add_parser(name, help=help_text)
        c.add_argument("--users", type=Path, required=True, metavar="FILE", help="the users file")
        c.add_argument("--realm", help="the realm (= the domain) [default: the file's only realm]")
        if name != "list":
            c.add_argument("user", metavar="USER")
        if name == "add":
            c.add_argument("--password-stdin", action="store_true",
                           help="read the password from the first line of stdin instead of a prompt")
        c.set_defaults(func=run_users)
    broker_network.add_parser(sub)  # mesh networks (issue 12): cli/broker_network.py


# -- the broker --------------------------------------------------------------------------

def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT', 'HOST' (port 5060) or ':PORT' (all addresses)."""
    text = text.strip()
    if text.startswith(":"):
        text = "0.0.0.0" + text
    try:
        host, port = split_hostport(text)
    except ParseError as exc:
        raise ValueError(f"bad --listen {text!r}: {exc.reason}; expected HOST:PORT, e.g. 0.0.0.0:5060") from None
    return host, 5060 if port is None else port


def _setup_logging(args: argparse.Namespace) -> None:
    level = setup_logging(debug=args.debug, pid=args.workers > 1,
                          level=logging.DEBUG if (args.verbose or args.debug)
                          else getattr(logging, args.log_level.upper()))
    if not args.debug:  # per-message transport/transaction chatter only with --debug
        logging.getLogger("sipmesh.sip").setLevel(max(level, logging.INFO))


def build_config(args: argparse.Namespace) -> BrokerConfig:
    listen = [parse_listen(item) for item in (args.listen or ["0.0.0.0:5060"])]
    transports = tuple(t.strip().upper() for t in args.transport.split(",") if t.strip())
    if args.min_expires < 1 or args.max_expires < args.min_expires:
        raise ValueError("need 1 <= --min-expires <= --max-expires")
    if args.users is not None and not args.users.exists():
        raise ValueError(f"users file {args.users} does not exist: create it with "
                         f"'sipmesh broker users add --users {args.users} --realm DOMAIN USER'")
    if args.status_page or args.status_token_file:  # ops: refuse a page open to the network
        from sipmesh.broker.web import check_status_page

        check_status_page(args.status_page, args.status_token_file)
    algorithms = tuple(a.strip().upper() for a in args.auth_algorithms.split(",") if a.strip())
    if not algorithms or any(a not in ("MD5", "SHA-256") for a in algorithms):
        raise ValueError(f"--auth-algorithms {args.auth_algorithms!r}: use MD5 and/or SHA-256")
    policy = RegistrarPolicy(min_expires=args.min_expires, max_expires=args.max_expires,
                             default_expires=args.max_expires)
    return BrokerConfig(listen=listen, transports=transports, domains=list(args.domain),
                        users_file=args.users, db_path=args.db, mode=args.mode, workers=args.workers,
                        forward_foreign=args.forward_foreign, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, registrar=policy, rate_limit=args.rate_limit,
                        shed_load=not args.no_load_shedding, auth_algorithms=algorithms,
                        metrics=args.metrics, status_page=args.status_page,
                        status_token_file=args.status_token_file)


def run_broker(args: argparse.Namespace) -> int:
    if getattr(args, "broker_command", None):
        return 2
    _setup_logging(args)
    from sipmesh.broker import preflight
    from sipmesh.broker.workers import serve, startup_hint

    try:
        config = build_config(args)
        preflight.check(config)  # once, here: a worker would fail the same way at every restart
    except ValueError as exc:
        print(f"sipmesh broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sipmesh broker: cannot start: {exc}{startup_hint(exc)}", file=sys.stderr)
        return 1
    if config.users_file is None:
        log.warning("no --users file: anyone may register any name and call through this broker")
    if not config.domains:
        log.warning("no --domain given: serving only requests addressed to this host's addresses")
    try:
        return serve(config, loop=args.loop)
    except OSError as exc:
        print(f"sipmesh broker: cannot start: {exc}{startup_hint(exc)}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"sipmesh broker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


# -- the users file ------------------------------------------------------------------------

def _realm(args: argparse.Namespace, users: UsersFile) -> str:
    if args.realm:
        return args.realm
    realms = sorted(users.realms)
    if len(realms) == 1:
        return realms[0]
    if not realms:
        raise UsersFileError("the file has no users yet: give --realm DOMAIN (the domain the broker "
                             "serves, as in --domain)")
    raise UsersFileError(f"the file has several realms ({', '.join(realms)}): choose one with --realm")


def _read_password(args: argparse.Namespace, user: str, realm: str) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise UsersFileError("no terminal to prompt for the password: use --password-stdin")
        password = getpass.getpass(f"Password for {user}@{realm}: ")
        if getpass.getpass("Again: ") != password:
            raise UsersFileError("the passwords differ: nothing changed")
    if not password:
        raise UsersFileError("empty password: nothing changed")
    return password


def run_users(args: argparse.Namespace) -> int:
    try:
        users = UsersFile(args.users)
        if args.users_command == "list":
            realm = args.realm.lower() if args.realm else None
            for entry in users:
                if realm is None or entry.realm.lower() == realm:
                    print(f"{entry.user}@{entry.realm}")
            return 0
        realm = _realm(args, users)
        if args.users_command == "add":
            password = _read_password(args, args.user, realm)
            new = users.add(realm, args.user, password)
            users.save()
            print(f"{'added' if new else 'changed the password of'} {args.user}@{realm} in {args.users}")
            return 0
        if args.users_command == "remove":
            if not users.remove(realm, args.user):
                print(f"sipmesh broker users: no user {args.user}@{realm} in {args.users} "
                      f"(see 'sipmesh broker users list --users {args.users}')", file=sys.stderr)
                return 1
            users.save()
            print(f"removed {args.user}@{realm} from {args.users}")
            return 0
    except UsersFileError as exc:
        print(f"sipmesh broker users: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sipmesh broker users: {exc}", file=sys.stderr)
        return 1
    return 2

"""`sipmesh broker network`: the mesh networks the broker serves (broker/networks.py).

    sipmesh broker network create NAME --pool CIDR [--radius-group G]
    sipmesh broker network set NAME --radius-group G | --no-radius-group
    sipmesh broker network list | show NAME | remove NAME
    sipmesh broker network members add NAME USER... [--group G]... | remove NAME USER... | list NAME
    sipmesh broker network allow NAME FROM TO     (FROM/TO: a member, @group or *)
    sipmesh broker network disallow NAME FROM TO
    sipmesh broker network export > FILE      (every network, for a second broker)
    sipmesh broker network import FILE|-      (this store holds exactly FILE's networks)

They change the broker's SQLite store (`--db`, the broker's own); a running broker sees
the change at once. Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import NoReturn

from sipmesh.broker.location import default_db_path
from sipmesh.broker.networks import Network, NetworkError, NetworkStore

PROG = "sipmesh broker network"


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's usage errors as one line (and exit 2), like every other refusal here."""
    def error(message: str) -> NoReturn:
        print(f"{PROG}: {message} (see '{parser.prog} --help')", file=sys.stderr)
        raise SystemExit(2)
    parser.error = error  # type: ignore[method-assign]
    return parser


def add_parser(broker_sub: argparse._SubParsersAction) -> None:
    """`network` under `sipmesh broker` (called from cli/broker.py)."""
    n = _one_line_errors(broker_sub.add_parser(
        "network", help="manage mesh networks: create, set, list, show, remove, members, allow",
        description="Mesh networks served by this broker: an address pool, members (each gets "
                    "one address from the pool, for good), groups and an ACL. A network is its "
                    "own digest realm: give members a password in it with 'sipmesh broker users "
                    "add --realm NAME USER'."))
    nsub = n.add_subparsers(dest="network_command", metavar="COMMAND", required=True)

    def command(parent: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
        c = _one_line_errors(parent.add_parser(name, help=help_text, description=help_text))
        c.add_argument("--db", type=Path, metavar="FILE", default=None,
                       help=f"the broker's store (SQLite) [default: {default_db_path()}]")
        c.set_defaults(func=run_network)
        return c

    c = command(nsub, "create", "create a network with an address pool")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--pool", required=True, metavar="CIDR",
                   help="the members' addresses, e.g. 100.64.1.0/24; pools must not overlap")
    radius_group = ("users whom the broker's RADIUS server accepts with group G (--radius-groups-"
                    "attribute) are members too, each given an address at its first join (docs/radius.md)")
    c.add_argument("--radius-group", metavar="G", default=None, help=radius_group)
    c = command(nsub, "set", "change a network's settings")
    c.add_argument("name", metavar="NAME")
    choice = c.add_mutually_exclusive_group(required=True)
    choice.add_argument("--radius-group", metavar="G", help=radius_group + "; a new group takes the "
                        "members by the old one out until RADIUS names the new one for them")
    choice.add_argument("--no-radius-group", action="store_true",
                        help="take no members from RADIUS (those in by it are out; static ones stay)")
    c = command(nsub, "list", "list the networks")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c = command(nsub, "show", "show a network: pool, members and their addresses, ACL")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c = command(nsub, "remove", "remove a network, its members and its rules")
    c.add_argument("name", metavar="NAME")
    for verb, text in (("allow", "let members matching FROM reach members matching TO"),
                       ("disallow", "remove an allow rule")):
        c = command(nsub, verb, f"{text} (a member name, @group or *); without rules all reach all")
        c.add_argument("name", metavar="NAME")
        c.add_argument("src", metavar="FROM")
        c.add_argument("dst", metavar="TO")

    command(nsub, "export", "write every network (members, addresses, rules) as JSON on "
                            "stdout, for 'import' on a second broker")
    c = command(nsub, "import", "replace this store's networks by those of an export, in one "
                                "transaction (the second broker of a pair: docs/broker.md)")
    c.add_argument("file", metavar="FILE", help="the export ('-': stdin)")

    m = _one_line_errors(nsub.add_parser("members", help="add, remove or list members",
                                         description="add, remove or list the members of a network"))
    msub = m.add_subparsers(dest="members_command", metavar="add|remove|list", required=True)
    c = command(msub, "add", "add members (each gets an address from the pool, kept for good)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("users", metavar="USER", nargs="+")
    c.add_argument("--group", action="append", default=[], metavar="G",
                   help="put them in group G too, repeatable (groups name members in rules)")
    c = command(msub, "remove", "remove members (their addresses stay reserved for them)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("users", metavar="USER", nargs="+")
    c = command(msub, "list", "list members with their addresses and groups")
    c.add_argument("name", metavar="NAME")


def _as_dict(network: Network) -> dict:
    return {"name": network.name, "pool": network.pool, "realm": network.realm,
            "aor_user": network.aor_user, "radius_group": network.radius_group,
            "members": [{"user": m.user, "address": m.address, "groups": list(m.groups),
                         "static": m.static, "radius": m.radius}
                        for m in network.members.values()],
            "rules": [{"from": s, "to": d} for s, d in network.rules]}


def _member_lines(network: Network) -> list[str]:
    width = max((len(u) for u in network.members), default=0)
    return [f"{m.user:<{width}}  {m.address}" + (f"  groups: {','.join(m.groups)}" if m.groups else "")
            + ("  (by RADIUS" + (" and static)" if m.static else ")") if m.radius else "")
            for m in network.members.values()]


def _get(store: NetworkStore, name: str) -> Network:
    network = store.network(name)
    if network is None:
        raise NetworkError(f"no network {name!r} (see '{PROG} list')")
    return network


def _run(store: NetworkStore, args: argparse.Namespace) -> int:
    command = args.network_command
    if command == "create":
        network = store.create(args.name, args.pool, args.radius_group)
        print(f"created network {network.name} with pool {network.pool}; its members register "
              f"sip:{network.aor_user}@YOUR-DOMAIN in realm {network.realm}"
              + (f"; users in RADIUS group {network.radius_group} are members" if network.radius_group else ""))
    elif command == "set":
        group = None if args.no_radius_group else args.radius_group
        out = store.set_radius_group(args.name, group)
        print(f"network {args.name} takes members "
              + (f"from RADIUS group {group}" if group else "from no RADIUS group")
              + (f" ({out} member{'s' if out != 1 else ''} by RADIUS taken out)" if out else ""))
    elif command == "list":
        networks = store.networks()
        if args.json:
            print(json.dumps([_as_dict(n) for n in networks], indent=2))
        for n in networks if not args.json else ():
            print(f"{n.name}  {n.pool}  {len(n.members)} member{'s' if len(n.members) != 1 else ''}"
                  + (f"  (and RADIUS group {n.radius_group})" if n.radius_group else ""))
    elif command == "show":
        network = _get(store, args.name)
        if args.json:
            print(json.dumps(_as_dict(network), indent=2))
            return 0
        print(f"network {network.name}: pool {network.pool}, realm {network.realm}, "
              f"AOR sip:{network.aor_user}@DOMAIN")
        if network.radius_group:
            print(f"members from RADIUS group {network.radius_group} too (at their authentication)")
        print(f"members ({len(network.members)}):")
        for line in _member_lines(network):
            print(f"  {line}")
        if network.rules:
            print("may reach (FROM -> TO):")
            for src, dst in network.rules:
                print(f"  {src} -> {dst}")
        else:
            print("no rules: every member may reach every other")
    elif command == "remove":
        count = store.remove(args.name)
        print(f"removed network {args.name} ({count} member{'s' if count != 1 else ''})")
    elif command == "allow":
        new = store.allow(args.name, args.src, args.dst)
        print(f"{args.src} may reach {args.dst} in {args.name}" + ("" if new else " (already)"))
    elif command == "disallow":
        if not store.disallow(args.name, args.src, args.dst):
            raise NetworkError(f"no rule {args.src} -> {args.dst} in {args.name} (see '{PROG} show "
                               f"{args.name}')")
        print(f"removed the rule {args.src} -> {args.dst} from {args.name}")
    elif command == "export":
        print(json.dumps(store.export(), indent=1))
    elif command == "import":
        networks = store.replace_all(_read_export(args.file))
        members = sum(len(n.members) for n in networks)
        print(f"imported {len(networks)} network{'s' if len(networks) != 1 else ''}, "
              f"{members} member{'s' if members != 1 else ''}")
    elif command == "members":
        if args.members_command == "add":
            for user, address in store.add_members(args.name, args.users, args.group).items():
                print(f"{user} {address}")
        elif args.members_command == "remove":
            removed = store.remove_members(args.name, args.users)
            missing = [u for u in args.users if u not in removed]
            if removed:
                print(f"removed {', '.join(removed)} from {args.name}")
            if missing:
                raise NetworkError(f"not members of {args.name}: {', '.join(missing)}")
        else:
            for line in _member_lines(_get(store, args.name)):
                print(line)
    return 0


MAX_EXPORT_BYTES = 64 << 20


def _read_export(name: str) -> object:
    with (open(sys.stdin.fileno(), "rb", closefd=False) if name == "-" else open(name, "rb")) as f:
        data = f.read(MAX_EXPORT_BYTES + 1)
    if len(data) > MAX_EXPORT_BYTES:
        raise NetworkError(f"{name}: larger than {MAX_EXPORT_BYTES >> 20} MiB")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise NetworkError(f"{name}: not JSON ({exc})") from None


def run_network(args: argparse.Namespace) -> int:
    path = args.db or default_db_path()
    try:
        store = NetworkStore(path)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        print(f"{PROG}: cannot open the broker's store {path}: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(store, args)
    except NetworkError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"{PROG}: {path}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()

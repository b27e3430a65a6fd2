"""A mesh network member as a process of a test: its roster client, printing each event.

    python -m tests.peers.roster_member SERVER USER NETWORK [--register-expires N] [--mesh-ip A]
                                          [--listen-host ADDRESS] [--poll]

The password comes from $ROSTER_PASSWORD. Prints `ready` once registered and reading the
roster, then one line per event (`joined NAME MESH-IP`, `left NAME REASON`, `changed NAME
MESH-IP`), flushed, so a test can wait on them and then SIGKILL the process (a member that
vanishes without unregistering).
"""

from __future__ import annotations

import argparse
import asyncio
import os

from sipmesh.agent.roster import RosterClient
from sipmesh.sip.ua import UAConfig, UserAgent


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("server")
    p.add_argument("user")
    p.add_argument("network")
    p.add_argument("--register-expires", type=int, default=300)
    p.add_argument("--subscribe-expires", type=int, default=120)
    p.add_argument("--mesh-ip")
    p.add_argument("--listen-host", default="127.0.0.1")  # another: a server in a namespace
    p.add_argument("--poll", action="store_true")  # read the roster by REGISTER-fetch only
    args = p.parse_args()
    ua = UserAgent(UAConfig(user=args.user, domain=args.server, password=os.environ["ROSTER_PASSWORD"],
                            listen_host=args.listen_host, listen_port=0))
    await ua.start()
    client = RosterClient(ua, args.network, mesh_ip=args.mesh_ip, register_expires=args.register_expires,
                          subscribe_expires=args.subscribe_expires, push=not args.poll)
    await client.start()
    print("ready", client.mode, flush=True)
    async for event in client.events():
        print(event.kind, event.member.name, event.member.mesh_ip if event.kind != "left" else event.reason,
              flush=True)


if __name__ == "__main__":
    asyncio.run(main())

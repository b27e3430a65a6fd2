"""One sipmesh UserAgent in a process of its own, for the NAT-lab signalling tests.

    python -m tests.peers.nat_ua answer --server H:P --user alice [--password PW]
        [--transport udp|tcp] [--active] [--keepalive SECONDS] [--t1 SECONDS]
    python -m tests.peers.nat_ua call --server H:P --user bob --target alice [...]

Both register first. `answer` accepts one INVITE, `call` places one. Once the session is
established (for `answer`: our 200 was ACKed), the `--active` side sends INFO, a
re-INVITE and finally BYE inside the dialog; the other side answers them (the UA does
that by itself) and waits for the BYE. Every event is one JSON line on stdout
({"event": ..., ...}); the process exits when the session has ended, or after --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from sipmesh.sip.transaction.timers import TimerValues
from sipmesh.sip.ua import Call, CallFailed, IncomingCall, UAConfig, UserAgent

SDP = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=application 9 TCP x\r\na=x-nat:1\r\n"


def emit(event: str, **data: object) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


async def drive(call: Call, active: bool) -> None:
    emit("established", call_id=call.call_id)
    if not active:
        emit("bye_received", reason=await call.ended)
        return
    emit("info", status=(await call.request("INFO", body=b"ping", content_type="text/plain")).status)
    emit("reinvite", status=(await call.reinvite()).status)
    response = await call.bye()
    emit("bye", status=response.status if response is not None else None)


async def main(args: argparse.Namespace) -> int:
    established: asyncio.Future[Call] = asyncio.get_running_loop().create_future()

    async def on_invite(incoming: IncomingCall) -> None:
        incoming.ringing()
        call = await incoming.accept(SDP)
        if not established.done():
            established.set_result(call)

    ua = UserAgent(UAConfig(user=args.user, domain=args.server, password=args.password,
                            listen_host="0.0.0.0", listen_port=0, transport=args.transport.upper(),
                            keepalive=args.keepalive, timers=TimerValues(t1=args.t1)),
                   on_invite=on_invite if args.mode == "answer" else None)
    await ua.start()
    try:
        response = await ua.register()
        emit("registered", status=response.status, port=ua.config.listen_port)
        if response.status != 200:
            return 1
        if args.mode == "call":
            offer = SDP + b"".join(b"a=x-pad:" + b"p" * 90 + b"\r\n" for _ in range(args.pad // 100))
            try:
                call = await ua.invite(args.target, offer, timeout=args.invite_timeout)
            except CallFailed as exc:
                emit("failed", status=exc.status)
                return 2
        else:
            call = await established
        await drive(call, args.active)
        return 0
    finally:
        await ua.register(0)
        await ua.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("answer", "call"))
    parser.add_argument("--server", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password")
    parser.add_argument("--target")
    parser.add_argument("--transport", default="udp")
    parser.add_argument("--active", action="store_true")
    parser.add_argument("--pad", type=int, default=0, help="call: about this many more octets of SDP")
    parser.add_argument("--keepalive", type=float, default=25.0, help="0: none")
    parser.add_argument("--invite-timeout", type=float, default=10.0)
    parser.add_argument("--t1", type=float, default=0.5, help="RFC 3261 T1 (a failure comes after 64*T1)")
    parser.add_argument("--timeout", type=float, default=40.0)
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    async def bounded() -> int:
        return await asyncio.wait_for(main(options), options.timeout)

    sys.exit(asyncio.run(bounded()))

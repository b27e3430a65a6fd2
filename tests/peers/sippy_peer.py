"""sippy (PyPI `sippy`, BSD) as an independent SIP user agent for the interop tests.

sippy runs its own reactor with threads, so it lives in a process of its own:

    python sippy_peer.py uas --port P [--calls N] [--timeout S]
        answer INVITEs on 127.0.0.1:P (180, then 200 with SDP), wait for the caller's BYE
    python sippy_peer.py uac --port P --target-port Q [--calls N] [--hangup sippy|peer]
        call sip:callee@127.0.0.1:Q N times one after the other; hang up itself after
        0.3 s (`sippy`) or wait for the callee's BYE (`peer`)

Every event is one JSON line on stdout ({"event": ...}); sippy's own log goes to stderr.
Only 127.0.0.1 is used. The process exits after N calls, or after --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

SDP = ("v=0\r\no=sippy 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=x-peer:sippy\r\n")


def emit(event: str, **data) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("uas", "uac"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target-port", type=int)
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--hangup", choices=("sippy", "peer"), default="sippy")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    from sippy.SipConf import SipConf

    # Before anything builds a Contact: never the host's name or first interface.
    SipConf.my_address = "127.0.0.1"
    SipConf.my_port = args.port
    SipConf.my_uaname = "sippy-peer"

    from sippy.CCEvents import CCEventConnect, CCEventDisconnect, CCEventRing, CCEventTry
    from sippy.Core.EventDispatcher import ED2
    from sippy.MsgBody import MsgBody
    from sippy.SipLogger import SipLogger
    from sippy.SipTransactionManager import SipTransactionManager
    from sippy.Time.Timeout import Timeout
    from sippy.UA import UA

    config = {"_sip_address": "127.0.0.1", "_sip_port": args.port,
              "_sip_logger": SipLogger("sippy_peer")}
    state = {"done": 0}

    def finished() -> None:
        """A call is over (disconnected or failed): place the next one, or stop soon (the
        last BYE or ACK still has to go out and be answered)."""
        state["done"] += 1
        if state["done"] >= args.calls:
            Timeout(ED2.breakLoop, 1.0)
        elif args.mode == "uac":
            Timeout(place_call, 0.1)

    def connected(ua, rtime, origin, *rest) -> None:
        emit("connected", call_id=str(ua.cId), origin=origin,
             sdp=str(ua.rSDP) if ua.rSDP is not None else "")
        if args.mode == "uac" and args.hangup == "sippy":
            Timeout(lambda: ua.recvEvent(CCEventDisconnect()), 0.3)

    def disconnected(ua, rtime, origin, *rest) -> None:
        emit("disconnected", call_id=str(ua.cId), origin=origin)
        finished()

    def failed(ua, rtime, origin, *rest) -> None:
        emit("failed", call_id=str(ua.cId), origin=origin, code=rest[0] if rest else None)
        finished()

    def ringing(ua, rtime, origin, *rest) -> None:
        emit("ringing", call_id=str(ua.cId), code=rest[0] if rest else None)

    callbacks = dict(conn_cbs=(connected,), disc_cbs=(disconnected,), fail_cbs=(failed,),
                     ring_cbs=(ringing,))

    def uas_event(event, ua) -> None:
        if isinstance(event, CCEventTry):
            call_id, cli, cld, body, auth, caller_name = event.getData()
            emit("invite", call_id=str(call_id), cli=cli, cld=cld,
                 sdp=str(body) if body is not None else "")
            ua.recvEvent(CCEventRing((180, "Ringing", None)))
            ua.recvEvent(CCEventConnect((200, "OK", MsgBody(SDP))))

    def receive_request(req, sip_t):
        if req.getHFBody("to").getTag() is not None:
            return (req.genResponse(481, "Call Leg/Transaction Does Not Exist"), None, None)
        if req.getMethod() == "INVITE" and args.mode == "uas":
            ua = UA(config, uas_event, **callbacks)
            return ua.recvRequest(req, sip_t)
        if req.getMethod() == "OPTIONS":
            return (req.genResponse(200, "OK"), None, None)
        return (req.genResponse(501, "Not Implemented"), None, None)

    def place_call() -> None:
        ua = UA(config, lambda event, ua: None, nh_address=("127.0.0.1", args.target_port),
                **callbacks)
        ua.recvEvent(CCEventTry((None, "sippy", "callee", MsgBody(SDP), None, "Sippy Peer")))
        emit("calling", call_id=str(ua.cId))

    config["_sip_tm"] = SipTransactionManager(config, receive_request)
    emit("ready", port=args.port)
    if args.mode == "uac":
        if not args.target_port:
            parser.error("uac needs --target-port")
        Timeout(place_call, 0.05)
    ED2.loop(timeout=args.timeout)
    emit("exit", done=state["done"])
    return 0 if state["done"] >= args.calls else 1


if __name__ == "__main__":
    sys.exit(main())

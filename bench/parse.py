"""Parse + serialise throughput of the SIP message parser.

    python bench/parse.py [--seconds 1.0] [--runs 5]

Prints messages/s (parse_message followed by to_bytes) for a typical INVITE
with an SDP body and for a 200 OK answering it: the best of several runs of
about a second each, so the whole script ends in roughly 2 x runs x seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from sipmesh.sip.message import parse_message
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sipmesh.sip.message import parse_message

SDP = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 192.0.2.101\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.101\r\n"
    b"t=0 0\r\n"
    b"m=audio 49172 RTP/AVP 0 8 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=sendrecv\r\n"
)

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"From: \"Alice\" <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com;transport=udp>\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n"
    b"Supported: timer, replaces\r\n"
    b"User-Agent: sipmesh-bench/1.0\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n"
    b"\r\n" + SDP
)

OK_200 = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport=5060"
    b";received=192.0.2.101\r\n"
    b"Record-Route: <sip:proxy.biloxi.example.com;lr>\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b"From: \"Alice\" <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:bob@192.0.2.4>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n"
    b"\r\n" + SDP
)


def rate(data: bytes, seconds: float) -> float:
    """Messages per second of parse + serialise over about `seconds`."""
    parse_message(data).to_bytes()  # warm up, and fail early on a broken sample
    batch, done = 200, 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            parse_message(data).to_bytes()
        done += batch
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one run (default 1.0)")
    ap.add_argument("--runs", type=int, default=5, help="runs per message, best kept (default 5)")
    args = ap.parse_args(argv)
    seconds = min(max(args.seconds, 0.05), 10.0)
    runs = min(max(args.runs, 1), 20)
    for name, data in (("INVITE with SDP", INVITE), ("200 OK with SDP", OK_200)):
        best = max(rate(data, seconds) for _ in range(runs))
        print(f"{name:16} {len(data):5d} bytes  {best:10,.0f} msg/s  (parse + serialise, best of {runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

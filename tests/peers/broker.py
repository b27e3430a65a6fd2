"""The broker in-process for a test: a factory of started brokers (`make_broker`), of user
agents on it (`make_ua`), an `answering` callee, and raw SIP requests from a RawPeer
(`sip`, `raw_register`). Import the fixtures into the test module that uses them."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from sipmesh.broker.server import Broker, BrokerConfig
from sipmesh.sip.message import Response
from sipmesh.sip.ua import IncomingCall, UAConfig, UserAgent
from tests.peers.raw import RawPeer

SDP_A = b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 TCP x\r\na=PORT:7001\r\n"
SDP_B = b"v=0\r\no=bob 2 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 TCP x\r\na=PORT:7002\r\n"


def sip(method: str, uri: str, peer: RawPeer, *, user: str = "alice", to: str | None = None,
        call_id: str | None = None, cseq: int = 1, headers: list[str] = (), body: bytes = b"",
        via_port: int | None = None, rport: bool = True, branch: str | None = None,
        domain: str = "127.0.0.1") -> str:
    """A request as text, sent from `peer`."""
    branch = branch or "z9hG4bK" + secrets.token_hex(8)
    lines = [f"{method} {uri} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:{via_port or peer.port};branch={branch}{';rport' if rport else ''}",
             "Max-Forwards: 70",
             f"From: <sip:{user}@{domain}>;tag={secrets.token_hex(4)}",
             f"To: {to or f'<{uri}>'}",
             f"Call-ID: {call_id or secrets.token_hex(8)}",
             f"CSeq: {cseq} {method}",
             f"Contact: <sip:{user}@127.0.0.1:{peer.port}>",
             *headers]
    if body and not any(h.lower().startswith("content-type:") for h in headers):
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines) + "\r\n\r\n" + body.decode()


async def raw_register(peer: RawPeer, broker: Broker, user: str, *, contact: str | None = None,
                       expires: int = 600, call_id: str | None = None, cseq: int = 1,
                       headers: list[str] = ()) -> Response:
    call_id = call_id or secrets.token_hex(8)
    host, port = broker.address()
    contact_line = f"Contact: {contact}" if contact else f"Contact: <sip:{user}@127.0.0.1:{peer.port}>"
    text = sip("REGISTER", f"sip:{host}:{port}", peer, user=user, to=f"<sip:{user}@{host}:{port}>",
               call_id=call_id, cseq=cseq, headers=[f"Expires: {expires}", *headers])
    text = text.replace(f"Contact: <sip:{user}@127.0.0.1:{peer.port}>", contact_line)
    peer.send(text, (host, port))
    return await peer.final(call_id)


@pytest.fixture
async def make_broker(tmp_path: Path) -> AsyncIterator[Callable[..., "asyncio.Future[Broker]"]]:
    started: list[Broker] = []

    async def _make(**overrides) -> Broker:
        settings = dict(listen=[("127.0.0.1", 0)], domains=["127.0.0.1"],
                        db_path=tmp_path / f"broker{len(started)}.db", rate_limit=0, stats_interval=0)
        settings.update(overrides)
        config = BrokerConfig(**settings)
        broker = Broker(config)
        await broker.start()
        started.append(broker)
        return broker

    yield _make
    for broker in started:
        await broker.stop()


@pytest.fixture
async def make_ua() -> AsyncIterator[Callable[..., "asyncio.Future[UserAgent]"]]:
    started: list[UserAgent] = []

    async def _make(user: str, broker: Broker | str, *, transport: str = "UDP", password: str | None = None,
                    on_invite=None, transports: tuple[str, ...] = ("UDP", "TCP")) -> UserAgent:
        """A started UA of `user` on `broker` (or on the SIP server at "host:port")."""
        domain = broker if isinstance(broker, str) else "%s:%d" % broker.address(transport)
        ua = UserAgent(UAConfig(user=user, domain=domain, password=password, transport=transport,
                                listen_port=0, transports=transports), on_invite=on_invite)
        await ua.start()
        started.append(ua)
        return ua

    yield _make
    for ua in started:
        await ua.stop()


def answering(sdp: bytes, log: list[IncomingCall] | None = None):
    async def on_invite(incoming: IncomingCall) -> None:
        if log is not None:
            log.append(incoming)
        incoming.ringing()
        await incoming.accept(sdp)
    return on_invite

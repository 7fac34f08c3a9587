"""Credentials that expire (a JWT's exp, an introspected token's exp) end the connection then:
the broker in this process on a loopback port with real clients (raw sockets, in threads), its
time on a task.Clock set to the wall clock, so that PyJWT (which reads the wall clock) and the
broker agree."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest_twisted
from auth_helpers import LogCapture, RawClient
from test_auth_http import AuthService, _until
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from mqtt_broker import BrokerService
from mqtt_broker.auth import Identity
from mqtt_broker.wire import Auth, Disconnect, Pingreq, Pingresp, Publish, ReasonCode, Subscribe, SubscriptionRequest

SECRET = b"an HMAC secret of at least thirty-two bytes"


def token(subject: str, lifetime: float, clock: Clock) -> bytes:
    claims = {"sub": subject, "exp": int(clock.seconds() + lifetime)}
    return jwt.encode(claims, SECRET, algorithm="HS256").encode()


async def start(tmp_path: Path, **settings: Any) -> tuple[BrokerService, Clock, int]:
    (tmp_path / "secret").write_bytes(SECRET)
    clock = Clock()
    clock.advance(int(time.time()))  # whole seconds: exp is whole seconds too
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, clock=clock,
                           sys_interval=0, allow_anonymous=False, **settings)
    broker.startService()
    return broker, clock, broker.ports[0].getHost().port  # type: ignore[attr-defined]


async def connect(port: int, client_id: str, password: bytes, version: int = 5, username: str | None = None,
                  **connect: Any) -> RawClient:
    client: RawClient = await deferToThread(RawClient, port, client_id, username, password, version, **connect)
    assert client.connack.reason_code == 0, client.connack
    return client


async def alive(client: RawClient) -> bool:
    """Whether the broker still answers a PINGREQ."""
    client.send(Pingreq())
    return isinstance(await deferToThread(client.next), Pingresp)


async def lives_for(client: RawClient, clock: Clock, seconds: int) -> None:
    """The connection still answers ``seconds`` - 1 seconds on, and a second later the broker
    ends the expired login with DISCONNECT 0xA0."""
    clock.advance(seconds - 1)
    assert await alive(client)
    clock.advance(1)
    disconnect = await deferToThread(client.next)
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0xA0


def expiry_timers(clock: Clock) -> int:
    return sum(1 for call in clock.getDelayedCalls() if call.func.__name__ == "_credentials_expired")


@pytest_twisted.ensureDeferred
async def test_token_expiry_ends_the_connection(tmp_path: Path) -> None:
    broker, clock, port = await start(tmp_path, jwt_secret_file=str(tmp_path / "secret"))
    clients: list[RawClient] = []
    try:
        v5 = await connect(port, "v5", token("alice", 600, clock))
        v3 = await connect(port, "v3", token("bob", 1200, clock), version=4, username="bob")  # 3.1.1: no password alone
        leaving = await connect(port, "leaving", token("carol", 900, clock))
        clients += [v5, v3, leaving]
        assert expiry_timers(clock) == 3
        leaving.send(Disconnect())
        assert await deferToThread(leaving.next) is None
        assert expiry_timers(clock) == 2  # cancelled when the connection ended

        clock.advance(599)
        assert await alive(v5) and await alive(v3)
        with LogCapture() as log:
            clock.advance(1)
            disconnect = await deferToThread(v5.next)
            assert isinstance(disconnect, Disconnect)
            assert disconnect.reason_code == ReasonCode.MAXIMUM_CONNECT_TIME == 0xA0
            assert await deferToThread(v5.next) is None
        assert "closing connection 'v5' from" in log.text() and "credentials expired" in log.text()
        assert await alive(v3)
        clock.advance(600)
        assert await deferToThread(v3.next) is None  # MQTT 3 has no DISCONNECT to send: closed
        assert expiry_timers(clock) == 0
    finally:
        for client in clients:
            client.close()
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_leeway_lengthens_the_connection_as_it_does_the_token(tmp_path: Path) -> None:
    broker, clock, port = await start(tmp_path, jwt_secret_file=str(tmp_path / "secret"), jwt_leeway=30)
    client = await connect(port, "lenient", token("alice", 60, clock))
    try:
        await lives_for(client, clock, 90)
    finally:
        client.close()
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_reauthentication_with_a_new_identity_moves_the_timer(tmp_path: Path) -> None:
    broker, clock, port = await start(tmp_path, jwt_secret_file=str(tmp_path / "secret"))
    renewals: list[Any] = []

    @broker.hooks.on_auth
    def renew(client: Any, method: str, data: bytes | None, reauthenticating: bool) -> Any:
        """At CONNECT: the password's token stands. On AUTH: the data is a new token."""
        if not reauthenticating:
            return True
        claims = jwt.decode(data or b"", SECRET, algorithms=["HS256"], options={"verify_exp": False})
        renewals.append(claims)
        return Identity(client_id=client.client_id, username=claims["sub"], expires_at=float(claims["exp"]))

    client = await connect(port, "renewing", token("alice", 600, clock),
                           properties={"authentication_method": "token-renewal"})
    try:
        clock.advance(500)
        client.send(Auth(reason_code=ReasonCode.RE_AUTHENTICATE, properties={
            "authentication_method": "token-renewal", "authentication_data": token("alice", 3600, clock)}))
        answer = await deferToThread(client.next)
        assert isinstance(answer, Auth) and answer.reason_code == ReasonCode.SUCCESS
        assert len(renewals) == 1 and expiry_timers(clock) == 1
        await lives_for(client, clock, 3600)  # well past the first token's exp
    finally:
        client.close()
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_introspected_expiry_ends_the_connection(tmp_path: Path) -> None:
    service = AuthService()
    site = reactor.listenTCP(0, Site(service), interface="127.0.0.1")
    url = f"http://127.0.0.1:{site.getHost().port}/introspect"
    broker, clock, port = await start(tmp_path, http_auth_url=url, http_auth_mode="introspection")
    service.reply = lambda body: (200, json.dumps(
        {"active": True, "username": "alice", "exp": clock.seconds() + 120}).encode())
    client = await connect(port, "introspected", b"opaque-access-token")
    try:
        await lives_for(client, clock, 120)
    finally:
        client.close()
        await broker.stopService()
        await site.stopListening()


# --- credentials expired before the CONNACK ------------------------------------------------------

def _introspection_service(holder: dict[str, Any]) -> tuple[AuthService, Any]:
    service = AuthService()
    site = reactor.listenTCP(0, Site(service), interface="127.0.0.1")
    exps = {b"fresh": 120.0, b"expired": -60.0}

    def reply(body: bytes) -> tuple[int, bytes]:
        token = body.split(b"token=")[1].split(b"&")[0]
        return 200, json.dumps({"active": True, "username": "alice",
                                "exp": holder["clock"].seconds() + exps.get(token, 120.0)}).encode()
    service.reply = reply
    return service, site


@pytest_twisted.ensureDeferred
async def test_an_introspected_token_already_expired_is_refused_before_its_sessions_messages(tmp_path: Path) -> None:
    """docs/security.md: a "bad or expired token" is refused with 0x86. An introspection answer
    whose exp has passed (the service's clock behind the broker's) was let in, CONNACK 0x00, and
    sent the messages queued for its session before the 0xA0 disconnect (the expiry timer is
    started after the CONNACK and the session's resume)."""
    site = None
    broker = None
    clients: list[RawClient] = []
    try:
        holder: dict[str, Any] = {}
        _, site = _introspection_service(holder)
        broker, clock, port = await start(tmp_path, http_auth_url=f"http://127.0.0.1:{site.getHost().port}/i",
                                          http_auth_mode="introspection")
        holder["clock"] = clock
        dev = await deferToThread(RawClient, port, "dev", None, b"fresh", 5, clean_start=False,
                                  properties={"session_expiry_interval": 600})
        clients.append(dev)
        assert dev.connack.reason_code == 0
        dev.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
        await deferToThread(dev.next)  # SUBACK
        dev.send(Disconnect())
        assert await deferToThread(dev.next) is None
        publisher = await deferToThread(RawClient, port, "pub", None, b"fresh", 5)
        clients.append(publisher)
        publisher.send(Publish(topic="t", payload=b"secret", qos=1, packet_id=1))
        await deferToThread(publisher.next)  # PUBACK
        again = await deferToThread(RawClient, port, "dev", None, b"expired", 5, clean_start=False,
                                    properties={"session_expiry_interval": 600})
        clients.append(again)
        assert again.connack.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD, again.connack
        clock.advance(0)  # (an expiry timer of delay 0 would fire)
        first = await deferToThread(again.next)
        assert not isinstance(first, Publish), f"CONNACK {again.connack.reason_code:#x}, then {first!r}"
    finally:
        for c in clients:
            c.close()
        if broker is not None:
            await broker.stopService()
        if site is not None:
            await site.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_jwt_that_expires_while_a_connect_hook_decides_is_not_accepted(tmp_path: Path) -> None:
    """The token is checked at CONNECT; one that expires before the CONNACK (a connect hook, an
    AUTH exchange) was accepted all the same (CONNACK 0x00) and its session resumed."""
    from twisted.internet.defer import Deferred
    (tmp_path / "secret").write_bytes(SECRET)
    broker, clock, port = await start(tmp_path, jwt_secret_file=str(tmp_path / "secret"))
    pending: list[Deferred[None]] = []

    @broker.hooks.on_connect
    def slow(client: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    token = jwt.encode({"sub": "alice", "exp": int(clock.seconds()) + 2}, SECRET, algorithm="HS256").encode()
    connecting = deferToThread(RawClient, port, "dev", None, token, 5)
    try:
        await _until(lambda: bool(pending))  # (bounded reactor turns, no sleep)
        clock.advance(3)  # the token's exp has passed
        pending[0].callback(None)
        client = await connecting
        try:
            assert client.connack.reason_code != 0, client.connack
        finally:
            client.close()
    finally:
        await broker.stopService()

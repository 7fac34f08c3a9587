"""HTTP authentication (mqtt_broker.auth.http_auth) against a real twisted.web server on a
loopback port: the request, every kind of answer, failures that refuse, the timeout (on a
task.Clock), the bounded cache, and OAuth2 token introspection (RFC 7662)."""

from __future__ import annotations

import base64
import json
import socket
import struct
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs

import pytest
import pytest_twisted
from auth_helpers import LogCapture, RawClient
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mqtt_broker import BrokerService
from mqtt_broker.auth import AccessRules, Credentials, Identity, Refusal, Security
from mqtt_broker.auth.http_auth import HttpAuthenticator
from mqtt_broker.config import BrokerConfig, ConfigError
from mqtt_broker.wire import Suback, Subscribe, SubscriptionRequest
from mqtt_broker.wire.codes import ReasonCode

Reply = tuple[int, bytes] | None  # None: never answer


class AuthService(Resource):
    """Records each request and answers with ``reply(request_body) -> (status, body)``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.reply: Callable[[bytes], Reply] = lambda body: (200, b"")
        self.hanging: list[Request] = []

    def render_POST(self, request: Request) -> bytes | int:
        body = request.content.read()
        self.requests.append({"body": body, "path": request.path,
                              "headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}})
        reply = self.reply(body)
        if reply is None:
            self.hanging.append(request)
            return NOT_DONE_YET
        status, content = reply
        request.setResponseCode(status)
        if status in (301, 302):
            request.setHeader(b"Location", b"http://127.0.0.1:1/elsewhere")
        request.setHeader(b"Content-Type", b"application/json")
        return content


@pytest.fixture
def service() -> Iterator[tuple[AuthService, str]]:
    resource = AuthService()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield resource, f"http://127.0.0.1:{port.getHost().port}/auth"
    for request in resource.hanging:
        if not request.finished and not request._disconnected:
            request.finish()
    pytest_twisted.blockon(port.stopListening())


def creds(username: str | None = "alice", password: bytes | None = b"s3cret", client_id: str = "dev-1",
          peer: str = "127.0.0.1:40000") -> Credentials:
    return Credentials(client_id=client_id, username=username, password=password, peer=peer, protocol_version=4,
                       certificate_identity=None)


def json_reply(status: int, **answer: Any) -> Callable[[bytes], Reply]:
    return lambda body: (status, json.dumps(answer).encode())


def with_authenticator(authenticator: HttpAuthenticator, allow_anonymous: bool = False) -> Security:
    return Security(authenticators=[authenticator], allow_anonymous=allow_anonymous)


def refused(answer: Identity | Refusal, code: ReasonCode) -> bool:
    return isinstance(answer, Refusal) and answer.reason_code == code


# --- json mode ------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_request_and_allow(service: tuple[AuthService, str], tmp_path: Path) -> None:
    resource, url = service
    (tmp_path / "authorization").write_text("Bearer broker-token\n")
    sec = Security.from_config(BrokerConfig(http_auth_url=url, allow_anonymous=False,
                                            http_auth_authorization_file=str(tmp_path / "authorization")))
    try:
        answer = await sec.authenticate(creds())
        assert answer == Identity(client_id="dev-1", username="alice")
        [request] = resource.requests
        assert json.loads(request["body"]) == {
            "client_id": "dev-1", "username": "alice", "password": "s3cret",
            "password_base64": base64.b64encode(b"s3cret").decode(), "peer": "127.0.0.1:40000",
            "protocol_version": 4, "certificate_identity": None}
        assert request["headers"]["content-type"] == "application/json"
        assert request["headers"]["authorization"] == "Bearer broker-token"
        assert request["path"] == b"/auth"
    finally:
        await sec.close()


@pytest_twisted.ensureDeferred
async def test_answers(service: tuple[AuthService, str]) -> None:
    resource, url = service
    sec = with_authenticator(HttpAuthenticator(url, cache_seconds=0))
    cases: list[tuple[Callable[[bytes], Reply], Any]] = [
        (json_reply(200, result="allow"), Identity(client_id="dev-1", username="alice")),
        (json_reply(200, result="allow", publish=["up/#"], subscribe=["down/+"]),
         Identity(client_id="dev-1", username="alice", rules=AccessRules(("up/#",), ("down/+",)))),
        (json_reply(200, publish=[]), Identity(client_id="dev-1", username="alice", rules=AccessRules())),
        (lambda body: (204, b""), Identity(client_id="dev-1", username="alice")),
        (json_reply(200, result="deny"), ReasonCode.BAD_USER_NAME_OR_PASSWORD),
        (lambda body: (403, b"no"), ReasonCode.BAD_USER_NAME_OR_PASSWORD),
        (lambda body: (401, b""), ReasonCode.BAD_USER_NAME_OR_PASSWORD),
        (json_reply(200, result="ignore"), ReasonCode.BAD_USER_NAME_OR_PASSWORD),  # nobody else accepts
        (lambda body: (500, b"oops"), ReasonCode.SERVER_UNAVAILABLE),
        (lambda body: (404, b""), ReasonCode.SERVER_UNAVAILABLE),
        (lambda body: (302, b""), ReasonCode.SERVER_UNAVAILABLE),  # redirects are not followed
        (lambda body: (200, b"allow"), ReasonCode.SERVER_UNAVAILABLE),
        (lambda body: (200, b"[1]"), ReasonCode.SERVER_UNAVAILABLE),
        (json_reply(200, result="maybe"), ReasonCode.SERVER_UNAVAILABLE),
        (json_reply(200, error="database unavailable"), ReasonCode.SERVER_UNAVAILABLE),  # (not an allow)
        (json_reply(200, result="allow", publish=["a/#/b"]), ReasonCode.SERVER_UNAVAILABLE),
        (json_reply(200, result="allow", subscribe="a/b"), ReasonCode.SERVER_UNAVAILABLE),
        (lambda body: (200, b" " * (64 * 1024 + 1)), ReasonCode.SERVER_UNAVAILABLE),
    ]
    try:
        for reply, expected in cases:
            resource.reply = reply
            answer = await sec.authenticate(creds())
            if isinstance(expected, Identity):
                assert answer == expected, reply
            else:
                assert refused(answer, expected), (answer, reply)
    finally:
        await sec.close()


@pytest_twisted.ensureDeferred
async def test_anonymous_clients_are_asked_too(service: tuple[AuthService, str]) -> None:
    resource, url = service
    closed = with_authenticator(HttpAuthenticator(url, cache_seconds=0))
    opened = with_authenticator(HttpAuthenticator(url, cache_seconds=0), allow_anonymous=True)
    try:
        resource.reply = json_reply(200, result="deny")
        assert refused(await closed.authenticate(creds(None, None)), ReasonCode.NOT_AUTHORIZED)
        assert json.loads(resource.requests[-1]["body"])["password_base64"] is None
        resource.reply = json_reply(200, result="ignore")
        assert await opened.authenticate(creds(None, None)) == Identity(client_id="dev-1", username=None)
        assert refused(await closed.authenticate(creds(None, None)), ReasonCode.NOT_AUTHORIZED)
    finally:
        await closed.close()
        await opened.close()


@pytest_twisted.ensureDeferred
async def test_non_utf8_and_long_passwords(service: tuple[AuthService, str]) -> None:
    resource, url = service
    sec = with_authenticator(HttpAuthenticator(url, cache_seconds=0))
    try:
        for password in (b"\xff\xfe\x00x", b"p" * 65535):
            assert isinstance(await sec.authenticate(creds(password=password)), Identity)
            sent = json.loads(resource.requests[-1]["body"])
            assert base64.b64decode(sent["password_base64"]) == password
            assert sent["password"] == (None if password.startswith(b"\xff") else password.decode())
    finally:
        await sec.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_service_refuses(service: tuple[AuthService, str]) -> None:
    from conftest import free_port
    sec = with_authenticator(HttpAuthenticator(f"http://127.0.0.1:{free_port()}/auth"))
    with LogCapture() as log:
        answer = await sec.authenticate(creds())
    assert refused(answer, ReasonCode.SERVER_UNAVAILABLE)
    assert "ConnectionRefusedError" in log.text() and "s3cret" not in log.text()


@pytest_twisted.ensureDeferred
async def test_timeout(service: tuple[AuthService, str]) -> None:
    resource, url = service
    clock = Clock()
    sec = with_authenticator(HttpAuthenticator(url, timeout=2.0, clock=clock))
    resource.reply = lambda body: None
    try:
        asked = sec.authenticate(creds())
        await _until(lambda: bool(resource.requests))
        assert not asked.called
        clock.advance(1.9)
        assert not asked.called
        clock.advance(0.2)
        answer = await asked
        assert refused(answer, ReasonCode.SERVER_UNAVAILABLE) and "no answer within 2.0s" in answer.reason
    finally:
        await sec.close()


@pytest_twisted.ensureDeferred
async def test_requests_ended_by_the_stop_refuse_without_an_error(service: tuple[AuthService, str]) -> None:
    """Each logged an error and a refusal, at every stop, for clients already gone."""
    from auth_helpers import LogCapture
    resource, url = service
    sec = with_authenticator(HttpAuthenticator(url, timeout=600))
    resource.reply = lambda body: None
    asked = sec.authenticate(creds())
    await _until(lambda: bool(resource.requests))
    with LogCapture() as log:
        await sec.close()
        assert asked.called  # ended by the stop, not by its timeout
        answer = await asked
    assert refused(answer, ReasonCode.SERVER_SHUTTING_DOWN)
    assert "http authentication" not in log.text() and "refused client" not in log.text(), log.text()
    # Started again, it asks again.
    resource.reply = json_reply(200, result="allow")
    try:
        assert isinstance(await sec.authenticate(creds()), Identity)
    finally:
        await sec.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Let the reactor run until ``condition()`` holds (a bounded number of turns, no sleeping)."""
    from twisted.internet.task import deferLater
    for _ in range(10000):
        if condition():
            return
        await deferLater(reactor, 0, lambda: None)
    raise AssertionError("condition never held")


# --- the cache -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_cache(service: tuple[AuthService, str]) -> None:
    resource, url = service
    clock = Clock()
    authenticator = HttpAuthenticator(url, cache_seconds=30, cache_size=2, clock=clock)
    sec = with_authenticator(authenticator)
    try:
        resource.reply = json_reply(200, result="deny")
        assert refused(await sec.authenticate(creds()), ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        resource.reply = json_reply(200, result="allow")
        assert refused(await sec.authenticate(creds(peer="127.0.0.1:40001")), ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        assert len(resource.requests) == 1  # the same credentials from the same host: cached
        assert isinstance(await sec.authenticate(creds(password=b"other")), Identity)
        assert isinstance(await sec.authenticate(creds(peer="127.0.0.2:40000")), Identity)
        assert len(resource.requests) == 3
        # Two entries at most: the first answer was the least recently used and is gone.
        assert isinstance(await sec.authenticate(creds()), Identity)
        assert len(resource.requests) == 4
        assert isinstance(await sec.authenticate(creds()), Identity)
        assert len(resource.requests) == 4
        clock.advance(30)
        assert isinstance(await sec.authenticate(creds()), Identity)
        assert len(resource.requests) == 5
        # Failures are not cached.
        resource.reply = lambda body: (500, b"")
        assert refused(await sec.authenticate(creds(client_id="x")), ReasonCode.SERVER_UNAVAILABLE)
        assert refused(await sec.authenticate(creds(client_id="x")), ReasonCode.SERVER_UNAVAILABLE)
        assert len(resource.requests) == 7
    finally:
        await sec.close()


@pytest_twisted.ensureDeferred
async def test_an_embedded_brokers_clock_ages_the_answers(service: tuple[AuthService, str]) -> None:
    """Given a clock, the broker's HTTP authenticator ages its cache on it, as it checks a JSON
    Web Token's times: on the reactor's, a test that advanced the clock past the cache's life
    was still answered from the cache."""
    resource, url = service
    clock = Clock()
    broker = BrokerService(endpoints=[], persistence="memory", clock=clock, http_auth_url=url,
                           http_auth_cache_seconds=30)
    sec = broker.security
    assert sec is not None
    try:
        resource.reply = json_reply(200, result="allow")
        assert isinstance(await sec.authenticate(creds()), Identity)
        assert isinstance(await sec.authenticate(creds()), Identity)
        assert len(resource.requests) == 1
        clock.advance(30)
        assert isinstance(await sec.authenticate(creds()), Identity)
        assert len(resource.requests) == 2
    finally:
        await sec.close()


# --- introspection ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_introspection(service: tuple[AuthService, str], tmp_path: Path) -> None:
    resource, url = service
    basic = "Basic " + base64.b64encode(b"broker:broker-secret").decode()
    (tmp_path / "authorization").write_text(basic)
    sec = Security.from_config(BrokerConfig(http_auth_url=url, http_auth_mode="introspection",
                                            http_auth_authorization_file=str(tmp_path / "authorization"),
                                            http_auth_cache_seconds=0, allow_anonymous=False))
    tokens = {"good": {"active": True, "username": "alice", "exp": 2000000000, "scope": "mqtt"},
              "sub-only": {"active": True, "sub": "bob", "publish": ["bob/#"], "subscribe": ["bob/#"]},
              "anonymous": {"active": True},
              "revoked": {"active": False}}

    def introspect(body: bytes) -> Reply:
        form = parse_qs(body.decode())
        assert form["token_type_hint"] == ["access_token"]
        return 200, json.dumps(tokens.get(form["token"][0], {"active": False})).encode()

    resource.reply = introspect
    try:
        answer = await sec.authenticate(creds(None, b"good"))
        assert answer == Identity(client_id="dev-1", username="alice", expires_at=2000000000.0)
        request = resource.requests[-1]
        assert request["headers"]["authorization"] == basic
        assert request["headers"]["content-type"] == "application/x-www-form-urlencoded"
        assert await sec.authenticate(creds("alice", b"good")) == answer
        assert refused(await sec.authenticate(creds("mallory", b"good")), ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        assert await sec.authenticate(creds(None, b"sub-only")) == Identity(
            client_id="dev-1", username="bob", rules=AccessRules(("bob/#",), ("bob/#",)))
        assert await sec.authenticate(creds("carol", b"anonymous")) == Identity(client_id="dev-1", username="carol")
        for token in (b"revoked", b"unknown"):
            assert refused(await sec.authenticate(creds(None, token)), ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        sent = len(resource.requests)
        # No password, or one that cannot be a token: not asked, not accepted.
        assert refused(await sec.authenticate(creds(None, None)), ReasonCode.NOT_AUTHORIZED)
        assert refused(await sec.authenticate(creds("alice", b"\xff")), ReasonCode.BAD_USER_NAME_OR_PASSWORD)
        assert len(resource.requests) == sent
        # The endpoint refusing the broker itself is an outage, not a verdict on the client.
        resource.reply = lambda body: (401, b'{"error": "invalid_client"}')
        assert refused(await sec.authenticate(creds(None, b"good")), ReasonCode.SERVER_UNAVAILABLE)
        resource.reply = json_reply(200, active="yes")
        assert refused(await sec.authenticate(creds(None, b"good")), ReasonCode.SERVER_UNAVAILABLE)
    finally:
        await sec.close()


# --- configuration and reload --------------------------------------------------------------------

def test_bad_settings(tmp_path: Path) -> None:
    for url in ("127.0.0.1:80/auth", "ftp://host/x", "http:///nohost"):
        with pytest.raises(ConfigError) as caught:
            HttpAuthenticator(url)
        assert caught.value.key == "http_auth_url"
    (tmp_path / "two-lines").write_text("Basic a\nBasic b\n")
    with pytest.raises(ConfigError) as caught:
        HttpAuthenticator("http://127.0.0.1/", authorization_file=str(tmp_path / "two-lines"))
    assert caught.value.key == "http_auth_authorization_file"


@pytest_twisted.ensureDeferred
async def test_reload_reads_the_authorization_file_and_empties_the_cache(
        service: tuple[AuthService, str], tmp_path: Path) -> None:
    resource, url = service
    (tmp_path / "authorization").write_text("Bearer one")
    sec = with_authenticator(HttpAuthenticator(url, authorization_file=str(tmp_path / "authorization")))
    try:
        await sec.authenticate(creds())
        (tmp_path / "authorization").write_text("Bearer two")
        await sec.reload()
        await sec.authenticate(creds())
        assert [r["headers"]["authorization"] for r in resource.requests] == ["Bearer one", "Bearer two"]
        (tmp_path / "authorization").unlink()
        with pytest.raises(ConfigError):
            await sec.reload()
        await sec.authenticate(creds(client_id="other"))
        assert resource.requests[-1]["headers"]["authorization"] == "Bearer two"
    finally:
        await sec.close()


# --- end to end ------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_client_id_and_username_in_the_answers_filters(service: tuple[AuthService, str]) -> None:
    """The broker on a loopback port asks the service, whose ACL uses %c and %u: substituted per
    client, as acl_file patterns; a username with "#" gets none of the substituted filters."""
    resource, url = service
    resource.reply = json_reply(200, result="allow", publish=["devices/%c/#"],
                                subscribe=["devices/%c/#", "inbox/%u/#", "news/#"])
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0,
                           http_auth_url=url, allow_anonymous=False)
    broker.startService()
    port = broker.ports[0].getHost().port  # type: ignore[attr-defined]

    async def granted(client_id: str, username: str, *filters: str) -> tuple[int, ...]:
        client = await deferToThread(RawClient, port, client_id, username, b"pw")
        try:
            client.send(Subscribe(packet_id=1, subscriptions=tuple(SubscriptionRequest(topic_filter=f)
                                                                   for f in filters)))
            suback = await deferToThread(client.next)
            assert isinstance(suback, Suback)
            return suback.reason_codes
        finally:
            client.close()

    try:
        # "#" overlaps what dev-1 may read, but the answer's filters are permissions to subscribe:
        # one of them must cover it.
        assert await granted("dev-1", "alice", "devices/dev-1/#", "inbox/alice/#", "devices/dev-2/#",
                             "inbox/bob/#", "news/#", "#") == (0, 0, 0x87, 0x87, 0, 0x87)
        assert await granted("dev-2", "bob", "devices/dev-2/x", "inbox/bob/x", "inbox/alice/x") == (0, 0, 0x87)
        assert await granted("dev-3", "h#", "devices/dev-3/#", "inbox/h#/x", "inbox/#", "news/x") == (
            0x87, 0x8F, 0x87, 0)  # "inbox/h#/x" is no filter at all (0x8F)
        assert broker.stats.subscriptions_refused == {"NOT_AUTHORIZED": 6, "TOPIC_FILTER_INVALID": 1}
        assert len(resource.requests) == 3
    finally:
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_before_the_answer_withdraws_its_request(service: tuple[AuthService, str]) -> None:
    """With no http_auth_timeout, a client gone while the service had not answered was held for
    ever, with its request and a connection to the service: its request is cancelled now, and
    nothing is logged for it."""
    from protocol_helpers import FakeClient
    from mqtt_broker.wire import Connect
    resource, url = service
    resource.reply = lambda body: None  # never answers
    broker = BrokerService(endpoints=[], reactor=reactor, sys_interval=0, close_linger=0, http_auth_url=url,
                           http_auth_timeout=0, allow_anonymous=False)
    broker.startService()
    [http] = broker.security._authenticators  # type: ignore[union-attr]
    try:
        with LogCapture() as logged:
            clients = []
            for n in range(3):
                client = FakeClient(broker, 5)
                client.send(Connect(client_id=f"gone-{n}", protocol_level=5, username="alice", password=b"pw"))
                clients.append(client)
            for _ in range(500):  # bounded: the requests reach the service
                if len(resource.hanging) == 3:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            assert len(resource.hanging) == 3 and len(http._asking) == 3
            for client in clients:
                client.lose()
            for _ in range(500):  # bounded: the service sees the requests go
                if all(request._disconnected for request in resource.hanging):
                    break
                await deferLater(reactor, 0.01, lambda: None)
            assert all(request._disconnected for request in resource.hanging)
            assert http._asking == set() and broker.connections == set()
        assert "http authentication" not in logged.text() and "Traceback" not in logged.text()
    finally:
        await broker.stopService()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_its_socket_before_the_answer_withdraws_its_request(
        service: tuple[AuthService, str], reset: bool) -> None:
    """As above, the client's socket closed or reset for real: the broker reads on while the
    service decides (a paused socket is not watched, and the client's end went unseen until the
    answer, for ever with no http_auth_timeout)."""
    from mqtt_broker.wire import Connect, encode
    resource, url = service
    resource.reply = lambda body: None  # never answers
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0,
                           close_linger=0, http_auth_url=url, http_auth_timeout=0, allow_anonymous=False)
    broker.startService()
    [http] = broker.security._authenticators  # type: ignore[union-attr]
    client = socket.create_connection(("127.0.0.1", broker.ports[0].getHost().port))  # type: ignore[attr-defined]
    try:
        client.sendall(encode(Connect(client_id="gone", protocol_level=5, username="alice", password=b"pw"), 5))
        for _ in range(500):  # bounded: the request reaches the service
            if resource.hanging:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert len(resource.hanging) == 1 and len(broker.connections) == 1
        if reset:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        for _ in range(500):  # bounded: the broker sees the client go, the service the request
            if resource.hanging[0]._disconnected and not broker.connections:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert resource.hanging[0]._disconnected and http._asking == set() and broker.connections == set()
    finally:
        client.close()
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_a_body_that_never_ends_is_timed_out_and_its_connection_closed(service: tuple[AuthService, str]) -> None:
    """The service sends its headers and the start of a body, then stalls: the timeout refuses
    (0x88) and closes the connection to the service, which would otherwise stay open for good."""
    resource, url = service

    def stall(request: Request) -> int:
        resource.hanging.append(request)
        request.setResponseCode(200)
        request.write(b'{"result": ')
        return NOT_DONE_YET
    resource.render_POST = stall  # type: ignore[method-assign]
    clock = Clock()
    sec = with_authenticator(HttpAuthenticator(url, timeout=2.0, clock=clock))
    asked = sec.authenticate(creds())
    await _until(lambda: bool(resource.hanging))
    clock.advance(2.1)
    answer = await asked
    assert isinstance(answer, Refusal) and answer.reason_code == ReasonCode.SERVER_UNAVAILABLE
    [request] = resource.hanging
    await _until(lambda: request._disconnected)
    await sec.close()


class HeadersThenClose(Protocol):
    """A service that sends its status line and ``head``ers, then closes: one whose handler
    raised after sending its headers, or that was killed in the middle of its answer."""

    head = b""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self.transport is not None:
            self.transport.write(b"HTTP/1.1 200 OK\r\n" + self.head + b"\r\n")
            self.transport.loseConnection()


@pytest.mark.parametrize("head, allowed", [
    (b"Content-Length: 0\r\n", True),  # (an empty body, known to be one)
    (b"Connection: close\r\n", False),  # (a body read to the close, which came before any)
    (b"Content-Length: 18\r\n", False),
])
@pytest_twisted.ensureDeferred
async def test_a_service_that_closes_after_its_headers_lets_nobody_in(head: bytes, allowed: bool) -> None:
    """An answer with neither a length nor chunks ends when the connection closes: closed before
    any body, it was taken for an empty 200, an allow, although the service may have died then."""
    kind = type("Service", (HeadersThenClose,), {"head": head})
    port = reactor.listenTCP(0, Factory.forProtocol(kind), interface="127.0.0.1")
    sec = with_authenticator(HttpAuthenticator(f"http://127.0.0.1:{port.getHost().port}/auth", cache_seconds=0))
    try:
        with LogCapture() as log:
            answer = await sec.authenticate(creds())
    finally:
        await sec.close()
        await port.stopListening()
    if allowed:
        assert answer == Identity(client_id="dev-1", username="alice")
    else:
        assert refused(answer, ReasonCode.SERVER_UNAVAILABLE), answer
        assert "refusing" in log.text()


def test_credentials_in_http_auth_url_are_refused_without_showing_them() -> None:
    """They would not be sent (the request fails on the host name), and every refusal logged the
    URL with its password: the place for them is http_auth_authorization_file."""
    with pytest.raises(ConfigError) as caught:
        HttpAuthenticator("http://broker:hunter2@127.0.0.1:8080/auth")
    assert caught.value.key == "http_auth_url" and "http_auth_authorization_file" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("exp", [b'"1"', b"NaN", b"Infinity", b"true", b"1e400"])
@pytest_twisted.ensureDeferred
async def test_an_introspected_exp_that_is_not_a_time_is_a_bad_answer(service: tuple[AuthService, str],
                                                                      exp: bytes) -> None:
    """RFC 7662: exp is a NumericDate. {"exp": "1"} (expired in 1970) let the token in with no
    expiry at all, NaN gave an expiry of NaN."""
    resource, url = service
    resource.reply = lambda body: (200, b'{"active": true, "username": "alice", "exp": ' + exp + b"}")
    sec = with_authenticator(HttpAuthenticator(url, mode="introspection", cache_seconds=0))
    with LogCapture() as log:
        answer = await sec.authenticate(creds(None, b"opaque-token"))
    await sec.close()
    assert isinstance(answer, Refusal) and answer.reason_code == ReasonCode.SERVER_UNAVAILABLE, answer
    assert '"exp" is not a time' in log.text()


@pytest.mark.parametrize("mode", ["json", "introspection"])
@pytest_twisted.ensureDeferred
async def test_an_answer_nested_too_deeply_to_parse_is_a_bad_answer(service: tuple[AuthService, str],
                                                                    mode: str) -> None:
    # json.loads raises RecursionError, no ValueError, past some 1,000 levels (2,000 bytes of the
    # 64 KiB an answer may have): it was logged in Python's words, not as what the answer lacks.
    resource, url = service
    resource.reply = lambda body: (200, b'{"active": true, "result": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")
    sec = with_authenticator(HttpAuthenticator(url, mode=mode, cache_seconds=0))
    with LogCapture() as log:
        answer = await sec.authenticate(creds())
    await sec.close()
    assert isinstance(answer, Refusal) and answer.reason_code == ReasonCode.SERVER_UNAVAILABLE, answer
    assert "answer is not JSON: nested too deeply" in log.text() and "Recursion" not in log.text()


@pytest_twisted.ensureDeferred
async def test_an_introspected_null_username_falls_back_to_sub(service: tuple[AuthService, str]) -> None:
    """The username is the answer's username, else its sub: a null username is none, and bob's
    token does not connect as the CONNECT's "admin"."""
    resource, url = service
    resource.reply = json_reply(200, active=True, username=None, sub="bob")
    sec = with_authenticator(HttpAuthenticator(url, mode="introspection", cache_seconds=0))
    refused = await sec.authenticate(creds("admin", b"bobs-token"))
    accepted = await sec.authenticate(creds(None, b"bobs-token"))
    await sec.close()
    assert isinstance(refused, Refusal) and refused.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    assert isinstance(accepted, Identity) and accepted.username == "bob"


@pytest.mark.parametrize("name", ["username", "sub"])
@pytest_twisted.ensureDeferred
async def test_an_introspected_username_with_a_lone_surrogate_is_refused_as_bad_credentials(
        service: tuple[AuthService, str], name: str) -> None:
    """JSON carries "\\ud800", and a str was taken whole for the user name: no MQTT string holds
    it [MQTT-1.5.4-1], and the store could not write it (a delayed will's row), which held up
    every write after it."""
    resource, url = service
    resource.reply = json_reply(200, active=True, **{name: "\ud800"})
    sec = with_authenticator(HttpAuthenticator(url, mode="introspection", cache_seconds=0))
    with LogCapture() as log:
        answer = await sec.authenticate(creds(None, b"opaque-token"))
    await sec.close()
    assert refused(answer, ReasonCode.BAD_USER_NAME_OR_PASSWORD), answer
    assert "lone surrogate" in log.text()


@pytest_twisted.ensureDeferred
async def test_the_answer_cache_keeps_no_whole_long_client_ids(service: Any) -> None:
    """Answers, "deny" too, are cached by a keyed hash of what they depend on: client ids and
    user names of up to 64 KiB each, of clients that need no account to be refused, made keys of
    120 KB each (10,000 of them: 1.2 GB)."""
    from protocol_helpers import Held
    resource, url = service
    resource.reply = json_reply(200, result="deny")
    authenticator = HttpAuthenticator(url)
    try:
        await authenticator.authenticate(creds(client_id="warm-up"))  # (modules imported, a connection made)
        with Held() as held:
            for n in range(50):
                answer = await authenticator.authenticate(creds(
                    client_id=f"{n:05}" + "c" * 60_000, username=f"{n:05}" + "u" * 60_000, password=b"x"))
                assert isinstance(answer, Refusal)
            resource.requests.clear()  # (the test service's record of the requests)
        assert held.bytes < 50 * 10_000, f"{held.bytes / 1e6:.1f} MB held by the cache of 50 refused clients"
        again = await authenticator.authenticate(creds(client_id="00007" + "c" * 60_000, username="00007" + "u" * 60_000,
                                                       password=b"x"))
        assert isinstance(again, Refusal) and resource.requests == []  # (answered from the cache)
    finally:
        await authenticator.close()

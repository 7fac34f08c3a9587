"""mqtt_broker.websocket on StringTransports and a Clock: the handshake, frames in and out, bounds,
timers, X-Forwarded-For, back-pressure and the connection limit, byte by byte where it matters.

End-to-end tests with real clients are in test_websocket_e2e.py and test_websocket_browser.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import random
import ssl
import zlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mqtt_broker import BrokerService
from mqtt_broker.broker import MQTTFactory
from mqtt_broker.config import BrokerConfig
from mqtt_broker.protocol import PACKETS_PER_TURN, READ_WHILE_DECIDING
from mqtt_broker.websocket import CLOSE_TIMEOUT, SUBPROTOCOLS, WebSocketFactory, client_address, frame_header
from mqtt_broker.wire.codes import ReasonCode
from mqtt_broker.wire import (
    Connack, Connect, Disconnect, Packet, Pingreq, Pingresp, Publish, Suback, Subscribe,
    SubscriptionRequest, encode, FrameReader,
)
from protocol_helpers import Held, PeerSocket, connected, make_broker
from websocket_helpers import (
    ACCEPT, BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Frame, FrameParser, client_frame,
    handshake_request, split_response,
)

_ports = iter(range(20000, 60000))


class Socket(StringTransport):
    """A StringTransport that, like TCP and TLS transports, lets go of no producer quietly."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class WSClient:
    """One WebSocket connection to ``broker``, driven byte by byte."""

    def __init__(self, broker: BrokerService, factory: WebSocketFactory | None = None,
                 host: str = "127.0.0.1", version: int = 4) -> None:
        self.broker = broker
        self.factory = factory or WebSocketFactory(broker)
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, next(_ports))
        self.protocol = self.factory.buildProtocol(address)
        self.socket = self.transport_to(address)
        self.protocol.makeConnection(self.socket)
        self.parser = FrameParser()
        self.reader = FrameReader(version=version)
        self.version = version
        self.status: int | None = None
        self.headers: dict[str, str] = {}

    def transport_to(self, address: IPv4Address | IPv6Address) -> Any:
        return Socket(peerAddress=address)

    def handshake(self, path: str = "/mqtt", protocols: tuple[str, ...] | None = ("mqtt",),
                  headers: dict[str, str] | None = None) -> int:
        self.send_bytes(handshake_request(path, protocols, headers))
        written = self.written()
        response = split_response(written)
        assert response is not None, written
        self.status, self.headers, rest = response
        self.parser.feed(rest)
        return self.status

    def send_bytes(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send(self, payload: bytes, opcode: int = BINARY, fin: bool = True, **kwargs: Any) -> None:
        self.send_bytes(client_frame(payload, opcode, fin, **kwargs))

    def send_packets(self, *packets: Packet) -> None:
        self.send(b"".join(encode(p, self.version) for p in packets))

    def written(self) -> bytes:
        """What the broker wrote since last asked."""
        data = self.socket.value()
        self.socket.clear()
        return bytes(data)

    def frames(self) -> list[Frame]:
        return self.parser.feed(self.written())

    def packets(self) -> list[Packet]:
        packets: list[Packet] = []
        for frame in self.frames():
            assert frame.opcode == BINARY, frame
            packets += self.reader.feed(frame.payload)
        return packets

    def connect(self, client_id: str = "ws", **kwargs: Any) -> Packet:
        level = kwargs.pop("protocol_level", self.version)
        self.send_packets(Connect(client_id=client_id, protocol_level=level,
                                  protocol_name="MQIsdp" if level == 3 else "MQTT", **kwargs))
        [connack] = self.packets()
        return connack

    def lose(self) -> None:
        """The socket closes (as the reactor would report it)."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return self.socket.disconnecting


def ws_connected(broker: BrokerService, client_id: str = "ws", **kwargs: Any) -> WSClient:
    client = WSClient(broker, **kwargs)
    assert client.handshake() == 101
    assert client.connect(client_id) == Connack(session_present=False, reason_code=0)
    return client


# --- the opening handshake ---------------------------------------------------------------------

def test_handshake_accepts_mqtt_subprotocol() -> None:
    client = WSClient(make_broker())
    assert client.handshake() == 101
    assert client.headers["sec-websocket-protocol"] == "mqtt"
    assert client.headers["sec-websocket-accept"] == ACCEPT
    assert "sec-websocket-extensions" not in client.headers  # no compression unless configured
    assert "server" not in client.headers
    assert not client.closed


@pytest.mark.parametrize("offered,chosen", [
    (("mqtt",), "mqtt"), (("mqttv3.1",), "mqttv3.1"), (("wamp.2.json", "mqtt"), "mqtt"),
    (("mqttv3.1", "mqtt"), "mqtt"), (("mqtt", "mqttv3.1"), "mqtt")])
def test_subprotocol_is_mqtt_whenever_offered(offered: tuple[str, ...], chosen: str) -> None:
    """[MQTT-6.0.0-4]: the server selects mqtt; mqttv3.1 (MQTT 3.1's) only when offered alone."""
    client = WSClient(make_broker())
    assert client.handshake(protocols=offered) == 101
    assert client.headers["sec-websocket-protocol"] == chosen
    assert chosen in SUBPROTOCOLS


@pytest.mark.parametrize("offered", [None, ("wamp.2.json",), ("MQTT",), ("mqttv5",)])
def test_missing_or_unknown_subprotocol_is_refused(offered: tuple[str, ...] | None) -> None:
    broker = make_broker()
    client = WSClient(broker)
    assert client.handshake(protocols=offered) == 400
    assert client.closed
    assert broker.connections == set()


@pytest.mark.parametrize("path", ["/", "/mqtt", "/ws/mqtt", "/mqtt?token=1"])
def test_any_path_by_default(path: str) -> None:
    assert WSClient(make_broker()).handshake(path=path) == 101


def test_paths_restrict() -> None:
    broker = make_broker(websocket_paths=["/mqtt", "/ws"])
    assert WSClient(broker).handshake(path="/mqtt") == 101
    assert WSClient(broker).handshake(path="/ws") == 101
    assert WSClient(broker).handshake(path="/mqtt?token=1") == 101  # the query is not the path
    for path in ("/", "/mqtt/", "/MQTT", "/other"):
        client = WSClient(broker)
        assert client.handshake(path=path) == 404, path
        assert client.closed


def test_any_origin_by_default() -> None:
    """A page from disk or a sandboxed frame sends "null" (Chrome "file://" for a local file):
    let in as Mosquitto 2.0.11 does."""
    for origin in ("https://elsewhere.example", "null", "file://"):
        assert WSClient(make_broker()).handshake(headers={"Origin": origin}) == 101, origin


def test_origins_restrict_the_pages_of_browsers() -> None:
    """A page of another site could lend itself the user's client certificate or cookies
    (cross-site WebSocket hijacking, RFC 6455 10.2)."""
    broker = make_broker(websocket_origins=["https://app.example.com", "http://localhost:8080"])
    for origin in ("https://app.example.com", "HTTPS://App.Example.com", "http://localhost:8080", None):
        headers = {"Origin": origin} if origin else None  # (no Origin: not a browser)
        assert WSClient(broker).handshake(headers=headers) == 101, origin
    accepted = len(broker.connections)
    for origin in ("https://evil.example", "https://app.example.com:8443", "http://app.example.com", "null"):
        client = WSClient(broker)
        assert client.handshake(headers={"Origin": origin}) == 403, origin
        assert client.closed and len(broker.connections) == accepted


def test_an_origin_configured_with_its_default_port_lets_its_pages_in() -> None:
    """A browser leaves the scheme's default port out of Origin (RFC 6454 6.2), so one written
    with it (which the setting's check takes) would refuse every page of its site."""
    broker = make_broker(websocket_origins=["https://app.example.com:443", "HTTP://[::1]:80", "http://a.example:443"])
    for origin in ("https://app.example.com", "http://[::1]", "http://a.example:443"):
        assert WSClient(broker).handshake(headers={"Origin": origin}) == 101, origin
    for origin in ("http://app.example.com", "https://[::1]", "http://a.example"):
        assert WSClient(broker).handshake(headers={"Origin": origin}) == 403, origin


def test_a_refused_origin_is_logged_quoted_and_escaped() -> None:
    from twisted.logger import capturedLogs, formatEvent
    broker = make_broker(websocket_origins=["https://app.example.com"])
    with capturedLogs() as events:
        assert WSClient(broker).handshake(headers={"Origin": "https://evil.example\x9b2J\x85forged"}) == 403
    [line] = [formatEvent(e) for e in events if "websocket_origins" in (formatEvent(e) or "")]
    assert "origin 'https://evil.example\\x9b2J\\x85forged' not in" in line


def test_refused_handshakes_are_logged_once_per_thousand_a_listener() -> None:
    """Any client may fail handshakes by the thousand a second: each was a line (two for an
    origin refused, autobahn's and the broker's), with the origin whole (up to
    websocket_max_handshake_size)."""
    broker = make_broker(websocket_origins=["https://app.example.com"])
    factory = WebSocketFactory(broker)
    with capturedLogs() as events:
        for _ in range(2001):
            assert WSClient(broker, factory).handshake(headers={"Origin": "https://evil.example/" + "A" * 15000}) == 403
    lines = [formatEvent(e) or "" for e in events if e["log_level"] >= LogLevel.info]
    assert len(lines) == 3 and all("websocket_origins" in line for line in lines), lines[:4]
    assert lines[0].endswith("... (15021 characters)' not in websocket_origins (1 refused on this listener; logged "
                             "once per thousand)")
    assert lines[2].endswith("(2001 refused on this listener; logged once per thousand)")
    assert all(len(line) < 500 for line in lines)


def test_each_websocket_listener_counts_its_own_refusals() -> None:
    """Two listeners shared one factory, and so one count: the first refusal on the second was not
    logged, though the line says "on this listener"."""
    broker = BrokerService(endpoints=[], websocket_endpoints=["tcp:8080", "tcp:8081"], reactor=MemoryReactorClock(),
                           sys_interval=0)
    broker.startService()
    try:
        factories = [factory for _, factory, _, _ in broker.reactor.tcpServers]
        assert len(factories) == 2 and factories[0] is not factories[1]
        with capturedLogs() as events:
            for factory in factories:
                assert WSClient(broker, factory).handshake(protocols=None) == 400
        lines = [formatEvent(e) or "" for e in events if e["log_level"] >= LogLevel.info]
        assert len(lines) == 2 and all("(1 refused on this listener;" in line for line in lines), lines
    finally:
        broker.stopService()


def test_a_handshake_autobahn_fails_is_logged_quoted_cut_and_escaped() -> None:
    """autobahn's line had the reason whole and as it came, header values in it: Latin-1 decoded,
    a NEL (U+0085) or CSI (U+009B) byte went into the log raw."""
    client = WSClient(make_broker())
    request = handshake_request().replace(b"Sec-WebSocket-Version: 13",
                                          b"Sec-WebSocket-Version: 13\x85\x9b31mFORGED " + b"B" * 15000)
    with capturedLogs() as events:
        client.send_bytes(request)
    assert client.socket.value().startswith(b"HTTP/1.1 400 ") and client.closed
    [line] = [formatEvent(e) or "" for e in events if e["log_level"] >= LogLevel.info]
    assert line.startswith("refusing a WebSocket connection from ") and line.endswith(
        "... (15095 characters)' (1 refused on this listener; logged once per thousand)")
    assert "\\x85\\x9b31mFORGED BBB" in line and line.isprintable() and len(line) < 500, line


def test_a_stopped_broker_takes_no_websocket_client() -> None:
    """The admin site's HTTP connections may outlive the stop (only its port is closed): one
    upgraded to MQTT connected a client to the stopped broker, its store closed."""
    broker = make_broker(close_linger=0)
    broker.startService()
    broker.stopService()
    client = WSClient(broker)
    assert client.handshake() == 503 and client.closed and not broker.connections


def test_plain_http_request_gets_426_and_no_status_page() -> None:
    """With the headers HTTP requires of the answers [RFC 9110 15.5.22, 15.5.6]."""
    for request, code, header in ((b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 426, ("upgrade", "websocket")),
                                  (b"POST /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405,
                                   ("allow", "GET"))):
        client = WSClient(make_broker())
        client.send_bytes(request)
        status, headers, body = split_response(client.socket.value())  # type: ignore[misc]
        assert status == code and body == b""
        assert headers.get(header[0]) == header[1], headers
        assert client.closed


def test_only_rfc_6455_handshakes_are_taken() -> None:
    """A draft's handshake (version 8) carries the page in Sec-WebSocket-Origin, which
    websocket_origins did not see: another site's page was let in."""
    broker = make_broker(websocket_origins=["https://app.example.com"])
    client = WSClient(broker)
    request = handshake_request(headers={"Sec-WebSocket-Origin": "https://evil.example"})
    client.send_bytes(request.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"))
    status, headers, _ = split_response(client.socket.value())  # type: ignore[misc]
    assert status == 400 and headers.get("sec-websocket-version") == "13", headers
    assert client.closed and not broker.connections


def test_handshake_fed_byte_by_byte() -> None:
    client = WSClient(make_broker())
    data = handshake_request() + client_frame(encode(Connect(client_id="slow")))
    for i in range(len(data)):
        client.send_bytes(data[i:i + 1])
    status, _, rest = split_response(client.socket.value())  # type: ignore[misc]
    assert status == 101
    assert client.reader.feed(client.parser.feed(rest)[0].payload) == [Connack(reason_code=0)]


def test_oversize_handshake_is_refused_before_it_is_buffered() -> None:
    broker = make_broker(websocket_max_handshake_size=2048)
    client = WSClient(broker)
    client.send_bytes(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for _ in range(40):  # 40 x 100 bytes of headers, never ending
        if client.closed:
            break
        client.send_bytes(b"X-Padding: " + b"a" * 87 + b"\r\n")
    assert client.closed
    assert client.socket.value().startswith(b"HTTP/1.1 431 ")
    assert len(client.protocol.data) == 0


def test_handshake_within_the_size_limit_with_a_frame_behind_it() -> None:
    request = handshake_request(headers={"X-Padding": "a" * 1500})
    broker = make_broker(websocket_max_handshake_size=len(request))
    client = WSClient(broker)
    # The request and the first frame in one read: only the request counts against the limit.
    client.send_bytes(request + client_frame(encode(Connect(client_id="big-headers")), mask=b"\0\0\0\0"))
    status, _, rest = split_response(client.socket.value())  # type: ignore[misc]
    assert status == 101
    assert client.reader.feed(client.parser.feed(rest)[0].payload) == [Connack(reason_code=0)]


def test_the_upgrade_request_is_not_kept_once_the_connection_is_open() -> None:
    """autobahn kept it whole and parsed (its path thrice) for the life of the connection: up
    to a few times websocket_max_handshake_size for each."""
    token = "q" * 4_000
    client = WSClient(make_broker())
    assert client.handshake(path="/mqtt?token=" + token, headers={"Cookie": token}) == 101
    assert client.connect("kept") == Connack(reason_code=0)
    assert [name for name, value in vars(client.protocol).items() if token in repr(value)] == []


def test_stalled_handshake_is_dropped_after_the_timeout() -> None:
    broker = make_broker(websocket_handshake_timeout=3)
    client = WSClient(broker)
    client.send_bytes(handshake_request()[:30])
    broker.clock.advance(2.9)  # type: ignore[attr-defined]
    assert not client.closed
    broker.clock.advance(0.2)  # type: ignore[attr-defined]
    assert client.closed and client.socket.disconnected  # aborted: nothing to say to it


def test_handshake_timeout_stops_at_the_handshake() -> None:
    broker = make_broker(websocket_handshake_timeout=3, connect_timeout=0)
    client = WSClient(broker)
    assert client.handshake() == 101
    broker.clock.advance(100)  # type: ignore[attr-defined]
    assert not client.closed


def test_no_handshake_timeout() -> None:
    broker = make_broker(websocket_handshake_timeout=0)
    client = WSClient(broker)
    assert broker.clock.getDelayedCalls() == []  # type: ignore[attr-defined]
    assert not client.closed


def test_connect_timeout_runs_after_the_handshake() -> None:
    broker = make_broker(connect_timeout=5, websocket_handshake_timeout=3)
    client = WSClient(broker)
    assert client.handshake() == 101
    broker.clock.advance(4.9)  # type: ignore[attr-defined]
    assert not client.closed
    broker.clock.advance(0.2)  # type: ignore[attr-defined]
    assert client.socket.disconnected  # MQTTProtocol's own timeout: aborted as over TCP


@pytest.mark.parametrize("how", ["upgraded", "path", "origin", "subprotocol", "oversize", "timeout", "lost"])
def test_a_socket_upgrading_counts_against_max_connections_until_it_is_an_mqtt_connection_or_gone(how: str) -> None:
    broker = make_broker(websocket_paths=["/mqtt"], websocket_origins=["https://a.example"],
                         websocket_handshake_timeout=3)
    client = WSClient(broker)
    assert broker.websockets_without_mqtt == 1
    if how == "upgraded":
        client.handshake(headers={"Origin": "https://a.example"})
        assert broker.websockets_without_mqtt == 0 and len(broker.connections) == 1
    elif how == "path":
        client.handshake(path="/x")
    elif how == "origin":
        client.handshake(headers={"Origin": "https://b.example"})
    elif how == "subprotocol":
        client.handshake(protocols=("other",), headers={"Origin": "https://a.example"})
    elif how == "oversize":
        client.send_bytes(b"GET /mqtt HTTP/1.1\r\nX: " + b"y" * 100_000)
    elif how == "timeout":
        client.send_bytes(b"GET /mqtt")
        broker.clock.advance(10)  # type: ignore[attr-defined]
    client.lose()
    assert broker.websockets_without_mqtt == 0


def test_sockets_past_max_connections_are_closed_as_they_are_accepted() -> None:
    """As over TCP; those still upgrading count. Each was held open until its handshake timeout,
    with up to websocket_max_handshake_size of request buffered."""
    broker = make_broker(max_connections=2)
    factory = WebSocketFactory(broker)
    first = ws_connected(broker, "first", factory=factory)
    upgrading = WSClient(broker, factory)
    upgrading.send_bytes(handshake_request()[:30])
    refused = WSClient(broker, factory)
    assert refused.socket.disconnected and not upgrading.closed and not first.closed
    tcp = MQTTFactory(broker).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1883))
    assert tcp is None  # a TCP listener's too
    assert broker.stats.connections_refused == 2
    upgrading.lose()
    assert ws_connected(broker, "second", factory=factory)


def test_past_max_connections_a_sites_connection_is_answered_503() -> None:
    """WebSocketResource: the site has accepted the connection, and answers its request."""
    broker = make_broker(max_connections=1)
    first = ws_connected(broker, "first")
    second = WSClient(broker, WebSocketFactory(broker, paths=(), listener=False))
    assert second.handshake() == 503
    assert second.closed and not first.closed
    assert broker.stats.connections_refused == 1
    first.lose()
    assert full(broker)  # the answer's socket counts until it is gone (over TLS, the client's close_notify)
    second.lose()
    assert ws_connected(broker, "third")


def full(broker: BrokerService) -> bool:
    """Whether max_connections is reached: a TCP connection would be refused now."""
    return MQTTFactory(broker).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1883)) is None


@pytest.mark.parametrize("how", ["client's close frame", "text frame", "close timeout", "broker's close frame",
                                 "hook answers while open", "hook answers once gone", "socket lost"])
def test_a_socket_counts_against_max_connections_until_it_is_gone_however_its_mqtt_connection_ends(how: str) -> None:
    """The client's close frame (or a frame the broker refuses) ends the MQTT connection at once,
    while the socket lives on until the client has read the answer (over TLS, until its
    close_notify), for up to CLOSE_TIMEOUT: it counts meanwhile, as a lingering TCP socket does,
    and once only, whichever of the MQTT connection and the socket goes first."""
    broker = make_broker(max_connections=1)
    pending: list[Deferred[None]] = []

    @broker.hooks.on_publish
    def decide(client: object, message: object) -> Deferred[None]:
        pending.append(Deferred())
        return pending[-1]

    client = ws_connected(broker)
    if how.startswith("hook"):
        client.send_packets(Publish(topic="t", payload=b"1"))
        assert len(pending) == 1
    if how == "text frame":
        client.send(b"hello", TEXT)  # the broker's close frame (1003), unanswered
    elif how != "socket lost":
        if how == "broker's close frame":
            client.send_packets(Disconnect())
        client.send(b"\x03\xe8", CLOSE)
    if how == "close timeout":
        broker.clock.advance(CLOSE_TIMEOUT)  # type: ignore[attr-defined]
        assert client.socket.disconnected  # aborted: gone once the reactor says so
    elif how != "socket lost":
        assert not client.socket.disconnected
    if how == "hook answers while open":
        pending[0].callback(None)
    assert full(broker)
    client.lose()
    if how == "hook answers once gone":
        assert not full(broker)  # (the MQTT connection ends once the hook has decided, counted no more)
        pending[0].callback(None)
    assert not full(broker)
    assert (broker.websockets_without_mqtt, broker.ending, broker.connections) == (0, 0, set())


# --- MQTT in binary frames -----------------------------------------------------------------------

def test_connect_and_round_trip_with_a_tcp_client() -> None:
    broker = make_broker()
    ws = ws_connected(broker, "ws")
    tcp = connected(broker, "tcp")
    ws.send_packets(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t/#", qos=1),)))
    assert ws.packets() == [Suback(packet_id=1, reason_codes=(1,))]
    tcp.publish("t/1", b"to ws")
    [publish] = ws.packets()
    assert isinstance(publish, Publish) and (publish.topic, publish.payload) == ("t/1", b"to ws")
    tcp.subscribe("back")
    ws.send_packets(Publish(topic="back", payload=b"to tcp"))
    [back] = tcp.received()
    assert isinstance(back, Publish) and back.payload == b"to tcp"
    assert [c.client_id for c in broker.clients()] == ["ws", "tcp"]


def test_every_write_is_one_binary_frame_or_one_per_64_kib() -> None:
    broker = make_broker()
    ws = ws_connected(broker)
    ws.send_packets(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="big", qos=0),)))
    ws.packets()
    # The three header lengths: 7-bit, 16-bit, and 64-bit for the first 64 KiB of the largest.
    for size, messages in ((10, 1), (200, 1), (65_000, 1), (70_000, 2)):
        broker.publish("big", b"x" * size)
        frames = ws.frames()
        assert [(f.opcode, f.fin, f.rsv1) for f in frames] == [(BINARY, True, False)] * messages
        [publish] = ws.reader.feed(b"".join(f.payload for f in frames))
        assert publish.payload == b"x" * size  # type: ignore[union-attr]


@pytest.mark.parametrize("compression", [False, True])
def test_the_retained_messages_of_a_subscribe_go_out_in_messages_of_64_kib_at_most(compression: bool) -> None:
    """A client may bound the size of a message (Python websockets: 1 MiB, Netty: 64 KiB) and
    close with 1009 past it: 300 retained messages of 10 kB went out as one message of 3 MB.
    MQTT packets may span messages [MQTT-6.0.0-2]."""
    broker = make_broker(websocket_compression=compression)
    for n in range(300):
        broker.publish(f"r/{n}", b"x" * 10_000, retain=True)
    client = WSClient(broker)
    assert client.handshake(headers=DEFLATE_OFFER) == 101
    inflate = zlib.decompressobj(wbits=-15)
    client.send_packets(Connect(client_id="ws"), Subscribe(packet_id=1, subscriptions=(
        SubscriptionRequest(topic_filter="r/#", qos=0),)))
    packets = []
    for frame in client.frames():
        assert frame.opcode == BINARY and frame.fin and frame.rsv1 == compression
        payload = inflate.decompress(frame.payload + b"\x00\x00\xff\xff") if compression else frame.payload
        assert len(payload) <= 65536
        packets += client.reader.feed(payload)
    assert packets[:2] == [Connack(reason_code=0), Suback(packet_id=1, reason_codes=(0,))]
    assert sorted(p.topic for p in packets[2:]) == sorted(f"r/{n}" for n in range(300))  # type: ignore[union-attr]


def test_a_slow_subscribers_held_messages_go_out_in_messages_of_64_kib_at_most() -> None:
    """Held while its socket was full, they went out as one message of 1 MB once it drained."""
    broker = make_broker()
    client = ws_connected(broker)
    client.send_packets(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=0),)))
    client.packets()
    client.socket.producer.pauseProducing()  # the socket's buffer is full
    for _ in range(100):
        broker.publish("t", b"x" * 10_000)
    client.socket.producer.resumeProducing()  # drained
    frames = client.frames()
    assert max(len(f.payload) for f in frames) <= 65536
    assert [p.payload for f in frames for p in client.reader.feed(f.payload)] == [b"x" * 10_000] * 100  # type: ignore[union-attr]


def test_frame_header() -> None:
    assert frame_header(0) == b"\x82\x00"
    assert frame_header(125) == b"\x82\x7d"
    assert frame_header(126) == b"\x82\x7e\x00\x7e"
    assert frame_header(65535) == b"\x82\x7e\xff\xff"
    assert frame_header(65536) == b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"


def test_packet_split_across_three_frames_of_one_message() -> None:
    client = WSClient(make_broker())
    client.handshake()
    data = encode(Connect(client_id="split-frames", keep_alive=30))
    client.send(data[:3], BINARY, fin=False)
    client.send(data[3:9], CONTINUATION, fin=False)
    assert client.packets() == []
    client.send(data[9:], CONTINUATION, fin=True)
    assert client.packets() == [Connack(reason_code=0)]


def test_packet_split_across_three_messages() -> None:
    client = WSClient(make_broker())
    client.handshake()
    data = encode(Connect(client_id="split-messages"))
    for part in (data[:1], data[1:5], data[5:]):
        client.send(part)
    assert client.packets() == [Connack(reason_code=0)]


def test_two_packets_in_one_frame_and_a_half_in_the_next() -> None:
    client = WSClient(make_broker())
    client.handshake()
    subscribe = encode(Subscribe(packet_id=7, subscriptions=(SubscriptionRequest(topic_filter="a"),)))
    client.send(encode(Connect(client_id="two")) + subscribe + encode(Pingreq())[:1])
    assert client.packets() == [Connack(reason_code=0), Suback(packet_id=7, reason_codes=(0,))]
    client.send(encode(Pingreq())[1:])
    assert client.packets() == [Pingresp()]


def test_frames_and_packets_fed_byte_by_byte() -> None:
    client = WSClient(make_broker())
    client.handshake()
    stream = b"".join(client_frame(p) for p in (
        encode(Connect(client_id="bytes")), encode(Pingreq()) + encode(Pingreq())))
    for i in range(len(stream)):
        client.send_bytes(stream[i:i + 1])
    assert client.packets() == [Connack(reason_code=0), Pingresp(), Pingresp()]


def stream_of_frames() -> tuple[bytes, list[Packet]]:
    """Frames of every kind the broker reads, and the MQTT answers they get."""
    big = encode(Publish(topic="self", payload=b"b" * 100_000))  # a frame to stream (> 64 KiB)
    subscribe = encode(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="self"),)))
    pingreq = encode(Pingreq())
    stream = b"".join([
        client_frame(encode(Connect(client_id="stream"))),
        client_frame(subscribe[:3], fin=False), client_frame(subscribe[3:], CONTINUATION),
        client_frame(b"still there?", PING),
        client_frame(pingreq + pingreq[:1]), client_frame(pingreq[1:] + big[:70_000]),
        client_frame(big[70_000:], fin=False), client_frame(b"", CONTINUATION),
        client_frame(pingreq, mask=b"\0\0\0\0"),
    ])
    return stream, [Connack(reason_code=0), Suback(packet_id=1, reason_codes=(0,)), Pingresp(), Pingresp(),
                    Publish(topic="self", payload=b"b" * 100_000), Pingresp()]


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 100, 4096, 65536, 10**6])
def test_any_cut_of_the_stream_gives_the_same_packets(chunk: int) -> None:
    stream, expected = stream_of_frames()
    client = WSClient(make_broker())
    client.handshake()
    for i in range(0, len(stream), chunk):
        client.send_bytes(stream[i:i + chunk])
    frames = client.frames()
    assert [f for f in frames if f.opcode != BINARY] == [Frame(PONG, b"still there?")]
    packets = [p for f in frames if f.opcode == BINARY for p in client.reader.feed(f.payload)]
    assert packets == expected
    assert not client.closed


def test_frames_of_one_read_are_answered_together() -> None:
    client = WSClient(make_broker())
    client.handshake()
    client.send_bytes(client_frame(encode(Connect(client_id="batch"))) + client_frame(encode(Pingreq())) * 3)
    [frame] = client.frames()  # one read in, one write out, as over TCP
    assert client.reader.feed(frame.payload) == [Connack(reason_code=0), Pingresp(), Pingresp(), Pingresp()]


def test_large_frame_cut_by_reads_is_streamed_not_gathered() -> None:
    client = ws_connected(make_broker())
    data = client_frame(encode(Publish(topic="t", payload=b"x" * 200_000)))
    client.send_bytes(data[:100_000])
    assert len(client.protocol.data) < 100  # handed on as it came, not held for the frame's end
    client.send_bytes(data[100_000:] + client_frame(encode(Pingreq())))
    assert client.packets() == [Pingresp()]


@pytest.mark.parametrize("frame,code", [
    (b"\x82\x05hello", 1002),                                         # not masked
    (b"\x82\xfe\x00\x05\0\0\0\0hello", 1002),                          # 16-bit length for 5 bytes
    (b"\x82\xff" + (5).to_bytes(8, "big") + b"\0\0\0\0hello", 1002),    # 64-bit length for 5 bytes
    (b"\xc2\x85\0\0\0\0hello", 1002),                                  # RSV1 without compression
    (b"\x80\x85\0\0\0\0hello", 1002),                                  # a continuation outside a message
    (b"\x83\x85\0\0\0\0hello", 1002),                                  # reserved opcode
])
def test_malformed_frames_are_refused(frame: bytes, code: int) -> None:
    client = ws_connected(make_broker())
    client.send_bytes(frame)
    assert [f.close_code for f in client.frames()] == [code]


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 64, 1024, 1025, 70_000])
def test_unmask(size: int) -> None:
    from mqtt_broker.websocket import _unmask
    mask = b"\x9a\x01\xfe\x42"
    payload = bytes(range(256)) * (size // 256 + 1)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload[:size]))
    assert _unmask(masked, mask) == payload[:size]


def test_text_frame_closes_with_1003() -> None:  # [MQTT-6.0.0-1]
    broker = make_broker()
    client = ws_connected(broker)
    client.send(encode(Pingreq()), TEXT)
    [close] = client.frames()
    assert close.opcode == CLOSE and close.close_code == 1003
    assert broker.clients() == []  # the MQTT connection ended at once (its will would be published)
    client.send(encode(Pingreq()))  # nothing more is read or answered
    assert client.frames() == []
    client.send(b"\x03\xe8", CLOSE)  # the client's answer: the socket is closed
    assert client.closed


def test_text_frame_before_connect_closes_too() -> None:
    client = WSClient(make_broker())
    client.handshake()
    client.send(b"hello", TEXT)
    assert [f.close_code for f in client.frames()] == [1003]


def test_oversize_frame_closes_with_1009_before_its_payload() -> None:
    broker = make_broker(websocket_max_frame_size=1000)
    client = ws_connected(broker)
    client.send_bytes(client_frame(b"", length=1001)[:8])  # the header alone announces 1001 bytes
    [close] = client.frames()
    assert close.close_code == 1009
    assert broker.clients() == []
    # What follows is the oversize frame's payload, read and thrown away (never buffered) until
    # the client answers the close frame or the close timeout ends it.
    client.send_bytes(b"\0" * 1001)
    assert len(client.protocol.data) == 0 and not client.closed
    broker.clock.advance(CLOSE_TIMEOUT)  # type: ignore[attr-defined]
    assert client.socket.disconnected


def test_frame_size_setting_overrides_max_packet_size() -> None:
    broker = make_broker(websocket_max_frame_size=100)
    client = ws_connected(broker)
    client.send(encode(Publish(topic="t", payload=b"x" * 90)))
    assert client.frames() == []
    client.send(encode(Publish(topic="t", payload=b"x" * 110)))
    assert [f.close_code for f in client.frames()] == [1009]


def test_packet_over_max_packet_size_in_small_frames_is_refused_by_mqtt() -> None:
    broker = make_broker(max_packet_size=100)
    client = WSClient(broker, version=5)
    client.handshake()
    client.connect("v5", protocol_level=5)
    data = encode(Publish(topic="t", payload=b"x" * 200), 5)
    client.send(data[:50])  # the MQTT header says 200 bytes: refused before the rest arrives
    frames = client.frames()
    assert [type(p) for p in client.reader.feed(frames[0].payload)] == [Disconnect]
    assert frames[1].close_code == 1000


def test_a_client_that_pings_and_never_reads_is_read_no_more_until_its_pongs_are_sent() -> None:
    """A pong goes to the socket past what MQTT holds: a client that pinged and never read made
    the broker keep its pongs without limit (186 MB in 30 s), where PINGREQs are bounded."""
    client = ws_connected(make_broker(), "pinger")
    client.send(b"x" * 125, PING)
    assert client.socket.producerState == "producing"
    client.protocol.mqtt.pauseProducing()  # its socket's buffer is full: it reads nothing
    client.send(b"x" * 125, PING)
    assert client.socket.producerState == "paused"
    assert [f.opcode for f in client.frames()] == [PONG, PONG]
    client.protocol.mqtt.resumeProducing()  # its socket drained
    assert client.socket.producerState == "producing"


def test_ping_is_answered_with_pong() -> None:
    client = ws_connected(make_broker())
    client.send(b"are you there", PING)
    assert client.frames() == [Frame(PONG, b"are you there")]


def test_client_close_ends_mqtt_without_disconnect() -> None:
    broker = make_broker()
    client = ws_connected(broker)
    watcher = connected(broker, "watcher")
    watcher.subscribe("will")
    client.send_packets(Connect(client_id="ws", will=None))  # a second CONNECT is a protocol error
    [close] = client.frames()
    assert close.close_code == 1000 and broker.clients() == [watcher.protocol.client]
    client.send(b"\x03\xe8", CLOSE)
    assert client.closed
    client.lose()


def test_will_published_when_the_websocket_closes() -> None:
    from mqtt_broker.wire import Will
    broker = make_broker()
    watcher = connected(broker, "watcher")
    watcher.subscribe("wills/#")
    client = WSClient(broker)
    client.handshake()
    client.send_packets(Connect(client_id="mortal", will=Will(topic="wills/mortal", payload=b"gone")))
    assert client.packets() == [Connack(reason_code=0)]
    client.send(b"\x03\xe8", CLOSE)  # a WebSocket close without MQTT DISCONNECT
    [close] = client.frames()
    assert close.close_code == 1000 and client.closed
    client.lose()
    [will] = watcher.received()
    assert isinstance(will, Publish) and (will.topic, will.payload) == ("wills/mortal", b"gone")


def test_mqtt_disconnect_closes_the_websocket_and_waits_for_the_answer() -> None:
    broker = make_broker()
    client = ws_connected(broker)
    client.send_packets(Disconnect())
    [close] = client.frames()
    assert close.close_code == 1000 and not client.closed
    broker.clock.advance(CLOSE_TIMEOUT - 0.1)  # type: ignore[attr-defined]
    assert not client.closed
    broker.clock.advance(0.2)  # type: ignore[attr-defined]  # no answer: dropped
    assert client.socket.disconnected


def test_the_close_frame_goes_out_when_the_answer_comes_in_the_same_read() -> None:
    """MQTT.js's end() then close: DISCONNECT and a close frame in one read. The server closes its
    socket when the answer comes; aborted, it threw away its own close frame, not yet written,
    and the client got a reset instead (close code 1006)."""
    client = ws_connected(make_broker())
    client.send_bytes(client_frame(encode(Disconnect())) + client_frame(b"\x03\xe8", CLOSE))
    [close] = client.frames()
    assert close.close_code == 1000
    assert client.closed and not client.socket.disconnected  # closed once what was written is out


def test_a_client_that_closes_and_stops_reading_is_dropped_after_the_timeout() -> None:
    """The server closes the socket after its close reply, gracefully: once what it wrote is
    out, which a client that does not read never lets happen."""
    broker = make_broker()
    client = ws_connected(broker)
    client.send(b"\x03\xe8", CLOSE)
    [reply] = client.frames()
    assert reply.close_code == 1000 and client.closed and not client.socket.disconnected
    broker.clock.advance(CLOSE_TIMEOUT)  # type: ignore[attr-defined]
    assert client.socket.disconnected  # aborted
    client.lose()


def test_a_fragmented_message_may_go_on_in_a_frame_too_large_to_gather() -> None:
    client = ws_connected(make_broker())
    publish = encode(Publish(topic="t", payload=b"x" * 100_000))
    frames = client_frame(publish[:10], BINARY, fin=False) + client_frame(publish[10:], CONTINUATION)
    client.send_bytes(frames[:30_000])  # the continuation is streamed as it comes
    client.send_bytes(frames[30_000:] + client_frame(encode(Pingreq())))
    assert client.packets() == [Pingresp()]
    client.send(encode(Pingreq())[:1], BINARY, fin=False)
    client.send(encode(Pingreq())[1:], CONTINUATION)
    assert client.packets() == [Pingresp()]


def test_mqtt5_server_disconnect_goes_out_before_the_close_frame() -> None:
    broker = make_broker()
    client = WSClient(broker, version=5)
    client.handshake()
    assert client.connect("v5", protocol_level=5).reason_code == 0  # type: ignore[union-attr]
    ws_connected(broker, "v5")  # takeover
    frames = client.frames()
    [disconnect] = client.reader.feed(frames[0].payload)
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x8E
    assert frames[1].close_code == 1000
    broker.publish("anything", b"x")
    assert client.frames() == []  # nothing is written after the close frame


def test_keepalive_timeout_aborts_the_socket() -> None:
    broker = make_broker()
    client = WSClient(broker)
    client.handshake()
    assert client.connect("sleepy", keep_alive=10) == Connack(reason_code=0)
    broker.clock.advance(15.1)  # type: ignore[attr-defined]
    assert client.socket.disconnected


def test_an_mqtt5_clients_keepalive_timeout_is_told_before_the_socket_closes() -> None:
    """DISCONNECT 0x8D first, as over TCP: the socket was aborted with it still in its buffer,
    thrown away. It goes out with the close frame after it, and the close timer bounds the wait
    for a client that takes nothing."""
    broker = make_broker()
    client = WSClient(broker, version=5)
    client.handshake()
    assert client.connect("sleepy", keep_alive=10).reason_code == 0  # type: ignore[union-attr]
    broker.clock.advance(15.1)  # type: ignore[attr-defined]
    frames = client.frames()
    [disconnect] = client.reader.feed(frames[0].payload)
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x8D
    assert frames[1].close_code == 1000 and not client.socket.disconnected  # not aborted
    broker.clock.advance(CLOSE_TIMEOUT)  # type: ignore[attr-defined]
    assert client.socket.disconnected


@pytest.mark.parametrize("size", [60_000, 100_000])  # gathered here whole, streamed by autobahn
def test_a_large_packet_arriving_slowly_keeps_its_connection_alive(size: int) -> None:
    """As over TCP: part of a large packet counts for the keepalive as it arrives. A frame of up
    to 64 KiB cut by the reads waited here for its end unseen by MQTT, which closed the client."""
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    client = WSClient(broker)
    assert client.handshake() == 101
    assert client.connect("slow", keep_alive=10).reason_code == 0
    frame = client_frame(encode(Publish(topic="t", payload=b"x" * size)))
    for start in range(0, len(frame), 5_000):  # 7 s apart; silent for 15 s, it would be closed
        broker.clock.advance(7)  # type: ignore[attr-defined]
        client.send_bytes(frame[start:start + 5_000])
        assert not client.socket.disconnected
    assert sub.received() == [Publish(topic="t", payload=b"x" * size)]


def test_a_small_packet_trickled_does_not_keep_its_connection_alive() -> None:
    broker = make_broker()
    client = WSClient(broker)
    assert client.handshake() == 101
    assert client.connect("trickle", keep_alive=10).reason_code == 0
    frame = client_frame(encode(Publish(topic="t", payload=b"x" * 900)))
    for start in range(0, 300, 100):
        broker.clock.advance(7)  # type: ignore[attr-defined]
        client.send_bytes(frame[start:start + 100])
    assert client.socket.disconnected


def test_connection_lost_reaches_mqtt() -> None:
    broker = make_broker()
    client = ws_connected(broker, "lost")
    client.lose()
    assert broker.clients() == [] and broker.connections == set()


def test_connection_lost_during_handshake() -> None:
    broker = make_broker()
    client = WSClient(broker)
    client.send_bytes(handshake_request()[:20])
    client.lose()
    assert broker.connections == set()
    assert broker.clock.getDelayedCalls() == []  # type: ignore[attr-defined]


# --- compression ---------------------------------------------------------------------------------

DEFLATE_OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def test_compression_offer_declined_by_default() -> None:
    client = WSClient(make_broker())
    assert client.handshake(headers=DEFLATE_OFFER) == 101
    assert "sec-websocket-extensions" not in client.headers


def test_compression_when_configured() -> None:
    broker = make_broker(websocket_compression=True)
    client = WSClient(broker)
    assert client.handshake(headers=DEFLATE_OFFER) == 101
    assert client.headers["sec-websocket-extensions"].startswith("permessage-deflate")
    client.send(deflate(encode(Connect(client_id="squeezed"))), rsv1=True)
    [frame] = client.frames()
    assert frame.opcode == BINARY and frame.rsv1
    inflated = zlib.decompressobj(wbits=-15).decompress(frame.payload + b"\x00\x00\xff\xff")
    assert client.reader.feed(inflated) == [Connack(reason_code=0)]


@pytest.mark.parametrize("offer, window", [
    ("permessage-deflate", 15),  # (Firefox's)
    ("permessage-deflate; client_max_window_bits", 15),  # (Chromium's)
    ("permessage-deflate; server_max_window_bits=10", 10),
])
def test_a_compressing_connection_holds_a_small_deflate_state(offer: str, window: int) -> None:
    """zlib's defaults (a 32 KiB window, memLevel 8) allocate 256 KiB for each connection's
    compressor, 100 KiB of it resident from the first message and 220 KiB after a few dozen;
    what it sends still inflates, message after message, with the window the client has."""
    broker = make_broker(websocket_compression=True)
    client = WSClient(broker)
    assert client.handshake(headers={"Sec-WebSocket-Extensions": offer}) == 101
    assert client.headers["sec-websocket-extensions"] == offer.replace("; client_max_window_bits", "")
    with Held() as held:
        client.send_packets(Connect(client_id="squeezed"))  # the CONNACK makes the compressor
    assert held.bytes < 64 * 1024
    client.send_packets(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t"),)))
    payload = bytes(random.Random(1).randrange(256) for _ in range(12_000))
    client.send_packets(Publish(topic="t", payload=payload))
    client.send_packets(Publish(topic="t", payload=payload))  # (a message of its own)
    inflate = zlib.decompressobj(wbits=-window)
    inflated = b"".join(inflate.decompress(f.payload + b"\x00\x00\xff\xff") for f in client.frames())
    assert [p.payload for p in client.reader.feed(inflated) if isinstance(p, Publish)] == [payload, payload]


def test_a_compressed_message_is_bounded_once_inflated_as_a_packet_is() -> None:
    """A 1 MB message of zeros deflates to 1 kB: inflated all at once, a few such reads made a
    spike of hundreds of MB. (A packet above the frame limit still fits: the limit is the
    frames', as they come.)"""
    broker = make_broker(websocket_compression=True, websocket_max_frame_size=16384, max_packet_size=65536)
    client = WSClient(broker)
    assert client.handshake(headers=DEFLATE_OFFER) == 101
    client.send(deflate(encode(Connect(client_id="squeezed"))), rsv1=True)
    client.send(deflate(encode(Publish(topic="t", payload=bytes(60_000)))), rsv1=True)  # under the bound
    assert [(f.opcode, f.rsv1) for f in client.frames()] == [(BINARY, True)]  # the CONNACK, deflated
    assert [c.client_id for c in broker.clients()] == ["squeezed"]
    bomb = deflate(bytes(1_000_000))
    assert len(bomb) < 2_000
    client.send(bomb, rsv1=True)
    assert [f.close_code for f in client.frames()] == [1009]


def test_a_small_message_inflated_to_many_packets_is_handled_over_several_turns() -> None:
    """4 KiB deflated, 4 MB of PINGREQs inflated (within max_packet_size, the bound on a
    message): two million packets were handled and answered in one turn of the reactor. MQTT
    takes them PACKETS_PER_TURN at a time, as any read."""
    broker = make_broker(websocket_compression=True)
    client = WSClient(broker)
    assert client.handshake(headers=DEFLATE_OFFER) == 101
    client.send(deflate(encode(Connect(client_id="squeezed"))), rsv1=True)
    assert client.frames()
    bomb = deflate(encode(Pingreq()) * 2_000_000)
    assert len(bomb) < 5_000
    client.send(bomb, rsv1=True)
    assert broker.stats.packets_received == 1 + PACKETS_PER_TURN
    broker.clock.advance(0)  # type: ignore[attr-defined]  # (a Clock runs each next turn's call at once)
    assert broker.stats.packets_received == 1 + 2_000_000


def test_compressed_frame_refused_without_compression() -> None:
    client = ws_connected(make_broker())
    client.send(deflate(encode(Pingreq())), rsv1=True)
    assert [f.close_code for f in client.frames()] == [1002]


# --- back-pressure ---------------------------------------------------------------------------------

def test_mqtt_protocol_is_the_producer_of_the_socket() -> None:
    broker = make_broker()
    client = ws_connected(broker)
    assert client.socket.producer is client.protocol.mqtt and client.socket.streaming is True


@pytest.mark.parametrize("qos", [0, 1])
def test_slow_subscriber_is_paused_and_queued_as_over_tcp(qos: int) -> None:
    """The same slow subscriber over TCP and over WebSocket: what is queued, dropped and delivered
    once the socket drains is the same."""
    outcomes = []
    for transport in ("tcp", "websocket"):
        broker = make_broker(max_queued_messages=3)
        if transport == "tcp":
            client: Any = connected(broker, "slow")
            client.subscribe("q", qos=qos)
            socket, received = client.transport, client.received
        else:
            client = ws_connected(broker, "slow")
            client.send_packets(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="q", qos=qos),)))
            client.packets()
            socket, received = client.socket, client.packets
        socket.producer.pauseProducing()  # the socket's buffer is full
        big = b"x" * (BrokerConfig().max_held_bytes // 3 + 1)  # three are held on the connection, three queued
        for n in range(8):
            broker.publish("q", str(n).encode() + big, qos=qos)
        assert received() == []
        queued = len(broker.sessions["slow"].queue)
        socket.producer.resumeProducing()  # drained
        delivered = [(p.payload[:1], p.qos) for p in received()]  # type: ignore[union-attr]
        outcomes.append((queued, broker.stats.messages_dropped, delivered))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == 3 and outcomes[0][1] == 2
    assert outcomes[0][2] == [(str(n).encode(), qos) for n in range(6)]


class WSSocketClient(WSClient):
    """A WebSocket client on a TCP transport (Twisted's ``tcp.Connection``) over a fake socket:
    what the broker writes waits in the transport until the client ``reads`` it; what the client
    sends waits, as in the kernel's buffer, while the transport does not read."""

    unread = b""

    def transport_to(self, address: IPv4Address | IPv6Address) -> Any:
        self.peer = PeerSocket()
        return tcp.Server(self.peer, self.protocol, (address.host, address.port), None, 0, self.broker.reactor)

    def send_bytes(self, data: bytes) -> None:
        self.unread += data
        self.deliver()

    def deliver(self) -> None:
        if self.unread and self.socket in self.broker.reactor.getReaders():
            data, self.unread = self.unread, b""
            self.protocol.dataReceived(data)

    def reads(self, size: int) -> None:
        self.peer.room += size
        if self.socket in self.broker.reactor.getWriters():
            self.socket.doWrite()

    def written(self) -> bytes:
        if self.broker.unflushed:
            self.broker.flush_writes()
        if self.socket in self.broker.reactor.getWriters():  # (the reactor's turn)
            self.socket.doWrite()
        data, self.peer.taken = bytes(self.peer.taken), bytearray()
        return data

    @property
    def closed(self) -> bool:
        return bool(self.socket.disconnecting or self.socket.disconnected or self.socket._aborting)


@pytest.mark.parametrize("reading", [1000, 0])
def test_a_slow_reader_read_no_more_for_its_backlog_is_read_again_as_over_tcp(reading: int) -> None:
    """A WebSocket subscriber that reads slowly (200 bytes a second) and pings every 5 s is not
    silent [MQTT-3.1.2-24]: the socket under its WebSocket is looked at, as a TCP client's, and it
    is read again at its keepalive, its PINGREQs answered behind what waits. One whose socket
    takes nothing is dropped at 1.5 keepalives."""
    broker = make_broker(max_held_bytes=65536)
    client = WSSocketClient(broker)
    assert client.handshake() == 101
    client.send_packets(Connect(client_id="slow", keep_alive=10),
                        Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=0),)))
    assert [type(p) for p in client.packets()] == [Connack, Suback]
    client.peer.room = 0  # from now on it reads only what the test says
    for _ in range(200):
        broker.publish("t", b"x" * 1000)
    client.send_packets(Pingreq())
    assert client.unread  # (in the kernel's buffer)
    pings = 1
    while not client.closed and broker.reactor.seconds() < 60:  # a minute: four keepalive checks
        broker.reactor.advance(5)
        broker.reactor.advance(0)  # (an abort ends the transport at the next turn)
        client.reads(reading)
        client.send_packets(Pingreq())
        pings += 1
    if not reading:
        assert client.closed and broker.reactor.seconds() == 15
        return
    assert not client.closed and not client.unread  # every PINGREQ read (the last one at the last check)
    for _ in range(10):  # then it reads all the rest (bounded)
        client.reads(1 << 20)
        broker.reactor.advance(0)
    kinds = [type(p) for p in client.packets()]
    assert kinds.count(Publish) == 200 and kinds.count(Pingresp) == pings
    assert not client.closed


def test_input_is_held_while_a_hook_decides_and_paused_past_a_bound() -> None:
    broker = make_broker()
    pending: list[Deferred[Any]] = []

    @broker.hooks.on_publish
    def wait(client: Any, message: Any) -> Deferred[Any]:
        pending.append(Deferred())
        return pending[-1]

    client = ws_connected(broker)
    client.send_packets(Publish(topic="t", payload=b"1", qos=1, packet_id=1),
                        Publish(topic="t", payload=b"2", qos=1, packet_id=2))
    assert client.socket.producerState == "producing" and len(pending) == 1
    client.send_packets(Publish(topic="t", payload=bytes(READ_WHILE_DECIDING), qos=1, packet_id=3))
    assert client.socket.producerState == "paused" and len(pending) == 1
    pending[0].callback(None)
    assert len(pending) == 2
    pending[1].callback(None)
    pending[2].callback(None)
    assert client.socket.producerState == "producing"
    assert [p.packet_id for p in client.packets()] == [1, 2, 3]  # type: ignore[union-attr]


def test_tls_details_come_from_the_socket() -> None:
    """Client certificate checks call getPeerCertificate and getHandle on the MQTT transport."""
    client = ws_connected(make_broker())
    certificate, handle = object(), object()
    client.socket.getPeerCertificate = lambda: certificate  # type: ignore[attr-defined]
    client.socket.getHandle = lambda: handle  # type: ignore[attr-defined]
    transport = client.protocol.mqtt.transport
    assert transport.getPeerCertificate() is certificate and transport.getHandle() is handle
    assert transport.getHost() == client.socket.getHost()


# --- the client's address -----------------------------------------------------------------------------

def peer_of(broker: BrokerService, client_id: str) -> str:
    return next(c.peer for c in broker.clients() if c.client_id == client_id)


def test_peer_is_the_socket_peer_without_trusted_proxies() -> None:
    broker = make_broker()
    client = WSClient(broker)
    client.handshake(headers={"X-Forwarded-For": "203.0.113.7"})
    client.connect("direct")
    assert peer_of(broker, "direct").startswith("127.0.0.1:")
    assert client.protocol.mqtt.transport.getPeer() == client.socket.getPeer()


def test_forwarded_for_from_a_trusted_proxy() -> None:
    broker = make_broker(websocket_trusted_proxies=["127.0.0.1"])
    client = WSClient(broker)
    client.handshake(headers={"X-Forwarded-For": "203.0.113.7"})
    client.connect("proxied")
    assert peer_of(broker, "proxied") == "203.0.113.7:0"


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    broker = make_broker(websocket_trusted_proxies=["10.0.0.0/8"])
    client = WSClient(broker, host="192.0.2.1")
    client.handshake(headers={"X-Forwarded-For": "203.0.113.7"})
    client.connect("spoofer")
    assert peer_of(broker, "spoofer").startswith("192.0.2.1:")


V4 = ipaddress.ip_network("10.0.0.0/8")
V6 = ipaddress.ip_network("fd00::/8")


@pytest.mark.parametrize("peer,header,trusted,expected", [
    ("10.0.0.1", "203.0.113.7", [V4], "203.0.113.7"),
    ("10.0.0.1", "203.0.113.7, 10.0.0.2", [V4], "203.0.113.7"),       # a chain of our proxies
    ("10.0.0.1", "198.51.100.1, 203.0.113.7", [V4], "203.0.113.7"),   # left part forged by the client
    ("10.0.0.1", "10.0.0.3, 10.0.0.2", [V4], "10.0.0.3"),             # all proxies: the left-most
    ("10.0.0.1", "garbage, 203.0.113.7", [V4], "203.0.113.7"),
    ("10.0.0.1", "203.0.113.7, garbage", [V4], "10.0.0.1"),           # unreadable: the proxy itself
    ("10.0.0.1", "", [V4], "10.0.0.1"),
    ("10.0.0.1", None, [V4], "10.0.0.1"),
    ("192.0.2.1", "203.0.113.7", [V4], "192.0.2.1"),                  # not a trusted proxy
    ("10.0.0.1", "203.0.113.7", [], "10.0.0.1"),
    ("fd00::1", "2001:db8::7", [V6], "2001:db8::7"),
    ("fd00::1", "203.0.113.7", [V6], "203.0.113.7"),
    ("::ffff:10.0.0.1", "2001:db8::7", [V4], "2001:db8::7"),          # dual-stack socket
])
def test_client_address(peer: str, header: str | None, trusted: list[Any], expected: str) -> None:
    address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 4242)
    result = client_address(address, header, trusted)
    assert result.host == expected  # type: ignore[attr-defined]
    if expected == peer:
        assert result is address
    else:
        assert result.port == 0 and isinstance(result, IPv6Address if ":" in expected else IPv4Address)  # type: ignore[attr-defined]


# --- over TLS -------------------------------------------------------------------------------------

def _self_signed() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return key, cert


class TLSPeer:
    """A TLS client (Python's ssl on memory BIOs) talking to a server protocol on a StringTransport:
    bytes move only when the test says so, and the client answers nothing by itself."""

    def __init__(self, server: object, socket_: StringTransport) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.server, self.socket = server, socket_

    def pump(self) -> None:
        for _ in range(10):
            out = self.outgoing.read()
            if out:
                self.server.dataReceived(out)  # type: ignore[attr-defined]
            back = self.socket.value()
            self.socket.clear()
            if back:
                self.incoming.write(back)
            if not out and not back:
                return

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.tls.do_handshake()
                self.pump()
                return
            except ssl.SSLWantReadError:
                self.pump()
        raise AssertionError("no TLS handshake")

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.pump()

    def read(self) -> bytes:
        received = b""
        for _ in range(10):
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            received += chunk
        return received


def _tls_websocket(broker: Any) -> tuple[Any, TLSPeer, StringTransport]:
    """A WebSocket listener's connection over TLS (in memory), its TLS handshake done: the TLS
    protocol, the client, and the socket under both."""
    key, cert = _self_signed()
    factory = TLSMemoryBIOFactory(CertificateOptions(privateKey=key, certificate=cert), False,
                                  WebSocketFactory(broker), clock=broker.clock)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    socket = StringTransport()
    protocol.makeConnection(socket)
    client = TLSPeer(protocol, socket)
    client.handshake()
    return protocol, client, socket


def test_an_upgrade_refused_over_tls_is_not_held_by_a_client_that_never_answers_close_notify() -> None:
    """An upgrade refused with an HTTP error (here 400, no subprotocol mqtt; also 403, 404, 431,
    and 503 at max_connections) over TLS is closed with a close_notify, which Twisted then waits
    to be answered for ever: the close timer bounds the wait."""
    broker = make_broker(websocket_handshake_timeout=3, connect_timeout=5, close_linger=2)
    _, client, socket_ = _tls_websocket(broker)
    client.send(handshake_request(protocols=None))  # no subprotocol mqtt: HTTP 400
    assert client.read().startswith(b"HTTP/1.1 400")
    # The client neither answers the close_notify nor closes its socket.
    broker.clock.advance(CLOSE_TIMEOUT)  # type: ignore[attr-defined]
    assert socket_.disconnecting, "the refused WebSocket-over-TLS connection is still held"


def test_bytes_after_a_refused_upgrade_over_tls_are_not_kept() -> None:
    """Refused, the connection waits up to CLOSE_TIMEOUT for the client's close_notify, reading
    on: what the client sent meanwhile piled up, as much as it could send in 5 s."""
    broker = make_broker()
    tls, client, _ = _tls_websocket(broker)
    client.send(handshake_request(protocols=None))
    assert client.read().startswith(b"HTTP/1.1 400")
    for _ in range(64):
        client.send(b"x" * 16384)
    assert len(tls.wrappedProtocol.data) == 0


def test_bytes_after_the_close_reply_over_tls_are_not_kept() -> None:
    broker = make_broker()
    tls, client, _ = _tls_websocket(broker)
    client.send(handshake_request())
    broker.clock.advance(0)  # (TLS gathers small writes until the clock turns)
    client.pump()
    assert client.read().startswith(b"HTTP/1.1 101")
    client.send(client_frame(encode(Connect(client_id="c"))))
    client.send(client_frame(b"\x03\xe8", CLOSE))  # the broker answers and closes (close_notify)
    assert tls.wrappedProtocol.state == tls.wrappedProtocol.STATE_CLOSED and tls.disconnecting
    for _ in range(64):
        client.send(client_frame(b"y" * 16000))
    assert len(tls.wrappedProtocol.data) == 0


def test_a_refusal_for_its_path_behind_a_trusted_proxy_names_the_client() -> None:
    """As the 400 and 403 refusals do: the 404 one named the proxy, in autobahn's format."""
    broker = make_broker(websocket_paths=["/mqtt"], websocket_trusted_proxies=["127.0.0.1"])
    with capturedLogs() as events:
        assert WSClient(broker).handshake(path="/other", headers={"X-Forwarded-For": "203.0.113.7"}) == 404
    [line] = [formatEvent(e) or "" for e in events if "refusing" in e["log_format"]]
    assert line.startswith("refusing a WebSocket connection from 203.0.113.7:"), line


def test_behind_haproxy_a_refusal_for_its_path_names_the_client_of_the_header() -> None:
    """autobahn's peer is taken as the proxy connects, before its PROXY header is read."""
    from mqtt_broker.proxy import ProxyHeaderFactory
    broker = make_broker(websocket_paths=["/mqtt"])
    proxy = IPv4Address("TCP", "10.0.0.2", 40000)
    wrapper = ProxyHeaderFactory(WebSocketFactory(broker)).buildProtocol(proxy)
    transport = Socket(peerAddress=proxy)
    wrapper.makeConnection(transport)
    with capturedLogs() as events:
        wrapper.dataReceived(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 1883\r\n" + handshake_request(path="/other"))
    assert transport.value().startswith(b"HTTP/1.1 404")
    [line] = [formatEvent(e) or "" for e in events if "refusing" in e["log_format"]]
    assert line.startswith("refusing a WebSocket connection from 203.0.113.7:5555:"), line


def test_a_handshake_that_does_not_come_names_the_peer_as_the_other_lines_do() -> None:
    broker = make_broker()
    client = WSClient(broker)
    with capturedLogs() as events:
        client.send_bytes(b"GET /mqtt HTTP/1.1\r\n")
        broker.clock.advance(100)  # type: ignore[attr-defined]
    [line] = [formatEvent(e) or "" for e in events if "no handshake" in e["log_format"]]
    assert line.startswith("dropping WebSocket connection from 127.0.0.1:"), line


def test_refusals_behind_a_trusted_proxy_name_the_client() -> None:
    """They named the proxy; the MQTT log lines, and the max_connections refusal, the client."""
    broker = make_broker(websocket_trusted_proxies=["127.0.0.1"], websocket_origins=["https://app.example.com"])
    with capturedLogs() as events:
        assert WSClient(broker).handshake(protocols=None, headers={"X-Forwarded-For": "203.0.113.7"}) == 400
        assert WSClient(broker).handshake(headers={"X-Forwarded-For": "203.0.113.8",
                                                   "Origin": "https://evil.example"}) == 403
        client = WSClient(broker)
        assert client.handshake(headers={"X-Forwarded-For": "203.0.113.9"}) == 101
        client.connect("proxied")
        client.send(b"hello", TEXT)
    lines = [formatEvent(e) for e in events if "WebSocket connection from" in (formatEvent(e) or "")]
    assert [line.split(" from ")[1].split(":")[0] for line in lines] == ["203.0.113.7", "203.0.113.8", "203.0.113.9"], lines


@pytest.mark.parametrize("end", ["keepalive timeout", "connect timeout", "handshake timeout",
                                 "refused upgrade", "text frame", "unmasked frame", "unanswered close"])
def test_what_a_client_causes_is_not_warned_of(end: str) -> None:
    """autobahn warned of each, naming the socket's peer (a proxy), on top of the broker's line:
    a client or a port scanner could write warnings at will, which over TCP it cannot. What
    breaks the WebSocket protocol is logged at info, naming the client, as a malformed packet is
    over TCP."""
    broker = make_broker(websocket_paths=["/mqtt"], websocket_trusted_proxies=["127.0.0.1"])
    client = WSClient(broker)
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    with capturedLogs() as events:
        if end == "handshake timeout":
            client.send_bytes(b"GET /mqtt HTTP/1.1\r\n")
        elif end == "refused upgrade":
            assert client.handshake(path="/other", headers=forwarded) == 404
        else:
            assert client.handshake(headers=forwarded) == 101
        if end not in ("handshake timeout", "refused upgrade", "connect timeout"):
            assert client.connect("c", keep_alive=10) == Connack(reason_code=0)
        if end == "text frame":
            client.send(b"hi", TEXT)
        elif end == "unmasked frame":
            client.send_bytes(b"\x82\x01x")
        elif end == "unanswered close":
            client.send_packets(Disconnect())
        broker.clock.advance(100)  # type: ignore[attr-defined]
    assert client.socket.disconnected
    assert [formatEvent(e) for e in events if e["log_level"] > LogLevel.info] == []
    if end in ("text frame", "unmasked frame"):
        [line] = [formatEvent(e) for e in events if "WebSocket connection from" in (formatEvent(e) or "")]
        assert line.startswith("closing WebSocket connection from 203.0.113.7"), line


def test_a_frame_of_several_packets_each_within_max_packet_size_is_read() -> None:
    """[MQTT-6.0.0-2]: a frame may hold several packets (MQTT.js's browser stream joins those of
    one burst of writes in one frame): each fits max_packet_size, the frame did not, and 1009."""
    broker = make_broker(max_packet_size=1000)
    sub = connected(broker, "sub")
    sub.subscribe("t")
    client = ws_connected(broker, "batcher")
    client.send_packets(Publish(topic="t", payload=b"a" * 600), Publish(topic="t", payload=b"b" * 600))
    assert [f.close_code for f in client.frames() if f.opcode == CLOSE] == []
    assert [p.payload[:1] for p in sub.received()] == [b"a", b"b"]
# RFC 7692 section 5: "A server MUST decline an extension negotiation offer for this extension
# if ... the negotiation offer contains an extension parameter not defined for use in an offer
# ... an extension parameter with an invalid value ... multiple extension parameters with the
# same name ... [or] the server doesn't support the offered configuration." Declining is
# answering without the extension, not failing the opening handshake. 8 is a valid
# server_max_window_bits (RFC 7692 7.1.2.1: "a value in the range 8 to 15").
@pytest.mark.parametrize("compression", [False, True])
@pytest.mark.parametrize("offer", [
    "permessage-deflate; server_max_window_bits=8",
    "permessage-deflate; server_max_window_bits=8, permessage-deflate",  # a fallback offer after it
    "permessage-deflate; x-unknown-parameter",
])
def test_a_permessage_deflate_offer_the_broker_cannot_take_is_declined_not_refused(
        compression: bool, offer: str) -> None:
    client = WSClient(make_broker(websocket_compression=compression))
    status = client.handshake(headers={"Sec-WebSocket-Extensions": offer})
    assert status == 101, f"handshake offering {offer!r} refused with HTTP {status} (compression={compression})"
    assert client.headers.get("sec-websocket-protocol") == "mqtt"


@pytest.mark.parametrize("compression", [False, True])
def test_sec_websocket_extensions_on_two_lines_is_one_list(compression: bool) -> None:
    """RFC 6455 9.1: "like other HTTP header fields, this header field MAY be split or combined
    across multiple lines" (11.3.2: it "MAY appear multiple times in an HTTP request"): refused
    with 400 ("appears more than once"), even with compression off."""

    client = WSClient(make_broker(websocket_compression=compression))
    request = handshake_request(headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
    client.send_bytes(request.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: x-private-extension\r\n\r\n"))
    response = split_response(client.socket.value())
    assert response is not None and response[0] == 101, f"refused: {client.socket.value()[:80]!r}"


def test_a_ping_during_the_closing_handshake_does_not_stop_the_socket_reading() -> None:
    """A subscriber whose socket's buffer was full (MQTT paused) is closed by the broker (here a
    takeover: close frame sent, closing handshake begun, the socket reading on for the client's
    answer). A WebSocket ping from the client then (Python's websockets pings every 20 s) gets
    no pong (autobahn answers none once closing), yet onPing still calls
    read_no_more_until_sent on the stale ``paused`` of the closed MQTT connection: the socket
    stops reading for good, the client's close frame is never read, and a clean close becomes
    an abort after CLOSE_TIMEOUT (RFC 6455 7.1.1: the server closes once the close frames are
    exchanged)."""

    broker = make_broker()
    client = ws_connected(broker, "slow")
    client.send_packets(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="q"),)))
    client.packets()
    client.socket.producer.pauseProducing()  # the socket's buffer is full
    ws_connected(broker, "slow")  # taken over: the broker starts the closing handshake
    assert [f.close_code for f in client.frames() if f.opcode == CLOSE] == [1000]
    assert client.socket.producerState == "producing"  # reading on, for the client's close frame
    client.send(b"keepalive", PING)
    assert client.socket.producerState == "producing", (
        "the socket stopped reading during the closing handshake: the client's close frame will never be read")


def test_with_close_linger_0_the_closing_handshake_still_reads_the_clients_close_frame() -> None:
    """close_linger = 0: linger.close_lingering only calls loseConnection, without the
    resumeProducing its lingering branch does first. Over TCP that is a close; over WebSocket it
    starts a closing handshake that must read the client's close frame, and a socket whose input
    MQTT had paused (here while an on_publish hook decides; likewise a client read no more
    until its pongs are sent) never reads it: the clean close becomes an abort after
    CLOSE_TIMEOUT (docs/websocket.md: only "a client that does not answer the broker's close
    frame within 5 seconds is dropped")."""

    broker = make_broker(close_linger=0)
    pending: list[Deferred[None]] = []

    @broker.hooks.on_publish
    def decide(client: object, message: object) -> Deferred[None]:
        pending.append(Deferred())
        return pending[-1]

    client = ws_connected(broker, "c")
    client.send_packets(Publish(topic="t", payload=b"1", qos=1, packet_id=1),
                        Publish(topic="t", payload=bytes(READ_WHILE_DECIDING), qos=1, packet_id=2))
    assert client.socket.producerState == "paused"  # input paused while the hook decides
    connection = broker.sessions["c"].connection
    assert connection is not None
    connection.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")  # the broker starts the closing handshake
    assert [f.close_code for f in client.frames() if f.opcode == CLOSE] == [1000]
    assert client.socket.producerState == "producing", (
        "closing handshake begun on a paused socket: the client's close frame will never be read")


def test_a_ping_during_the_closing_handshake_is_answered() -> None:
    """RFC 6455 5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
    response, unless it already received a Close frame" (docs/websocket.md: "Pings are answered
    with pongs"). The broker has sent its close frame (the client's DISCONNECT) and not yet
    received the client's: autobahn's onPing answers only in STATE_OPEN."""

    client = ws_connected(make_broker())
    client.send_packets(Disconnect())
    assert [f.close_code for f in client.frames() if f.opcode == CLOSE] == [1000]
    client.send(b"still there?", PING)
    assert client.frames() == [Frame(PONG, b"still there?")]



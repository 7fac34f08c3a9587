"""The lingering close (mqtt_broker/linger.py) and how a connection uses it, on StringTransports
and a Clock: the timer that aborts, what cancels it, what is read meanwhile, and shutdown."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import termios
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.policies import ProtocolWrapper

from mqtt_broker import BrokerService
from mqtt_broker.linger import UNTAKEN_LIMIT, AllClosed, close_lingering, unsent_bytes
from mqtt_broker.protocol import READ_WHILE_DECIDING
from mqtt_broker.wire import (
    Connect, Disconnect, Pingreq, Puback, Publish, ReasonCode, Subscribe, SubscriptionRequest, Will, encode)

from protocol_helpers import FakeClient, aborted_after, connected, filled_until_untaken, make_broker


class Recorder:
    """A transport that records which of its closing methods were called, in order."""

    def __init__(self, closing_handshake: bool | None = None) -> None:
        self.calls: list[str] = []
        if closing_handshake is not None:
            self.closing_handshake = closing_handshake

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "closing_handshake":
            raise AttributeError(name)
        return lambda: self.calls.append(name)


def lingering(broker: Any) -> list[Any]:
    return [call for call in broker.clock.getDelayedCalls() if call.func.__name__ == "abortConnection"]


# --- close_lingering --------------------------------------------------------------------------

def test_a_socket_is_half_closed_read_on_and_aborted_at_the_end() -> None:
    clock = Clock()
    transport = Recorder()
    timer = close_lingering(transport, clock, 2.0, half_close=True)
    assert transport.calls == ["resumeProducing", "loseWriteConnection"]
    assert timer is not None and timer.getTime() == 2.0
    clock.advance(1.9)
    assert transport.calls == ["resumeProducing", "loseWriteConnection"]
    clock.advance(0.1)
    assert transport.calls[-1] == "abortConnection"


def test_tls_closes_with_its_own_close_and_the_same_timer() -> None:
    """Not loseWriteConnection: on TLS it would reach the TCP socket under the TLS layer."""
    clock = Clock()
    transport = Recorder()
    timer = close_lingering(transport, clock, 0.5, half_close=False)
    assert transport.calls == ["resumeProducing", "loseConnection"]
    assert timer is not None
    clock.advance(0.5)
    assert transport.calls[-1] == "abortConnection"


def test_a_closing_handshake_gets_no_second_timer() -> None:
    clock = Clock()
    transport = Recorder(closing_handshake=True)
    assert close_lingering(transport, clock, 2.0, half_close=False) is None
    assert transport.calls == ["resumeProducing", "loseConnection"] and clock.getDelayedCalls() == []


def test_linger_zero_closes_at_once() -> None:
    clock = Clock()
    transport = Recorder()
    assert close_lingering(transport, clock, 0.0, half_close=True) is None
    assert transport.calls == ["loseConnection"] and clock.getDelayedCalls() == []


# --- AllClosed ----------------------------------------------------------------------------------

def test_all_closed_fires_when_the_last_connection_goes() -> None:
    clock = Clock()
    connections = {"a", "b"}
    waiting = AllClosed(connections, clock, 2.0)
    connections.discard("a")
    waiting.lost()
    assert not waiting.done.called
    connections.discard("b")
    waiting.lost()
    assert waiting.done.called and clock.getDelayedCalls() == []


def test_all_closed_gives_up_at_the_deadline() -> None:
    clock = Clock()
    waiting = AllClosed({"stays"}, clock, 2.0)
    clock.advance(1.99)
    assert not waiting.done.called
    clock.advance(0.01)
    assert waiting.done.called and clock.getDelayedCalls() == []


def test_all_closed_fires_at_once_with_nothing_open_or_no_linger() -> None:
    assert AllClosed(set(), Clock(), 2.0).done.called
    assert AllClosed({"open"}, Clock(), 0.0).done.called


# --- a connection's close -----------------------------------------------------------------------

def test_the_socket_is_aborted_at_the_end_of_the_linger() -> None:
    broker = make_broker(close_linger=1.5)
    client = connected(broker, "kicked", version=5)
    client.protocol.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
    [disconnect] = client.received()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x98
    assert client.transport.disconnecting and not client.transport.disconnected
    broker.clock.advance(1.49)  # type: ignore[attr-defined]
    assert not client.transport.disconnected
    broker.clock.advance(0.01)  # type: ignore[attr-defined]
    assert client.transport.disconnected  # StringTransport's abortConnection
    assert lingering(broker) == []


def connection_timers(broker: BrokerService) -> list[Any]:
    """The clock's timers but the broker's one for every connection's deadlines (which stays,
    finding nothing when it fires, once no connection is watched)."""
    return [call for call in broker.clock.getDelayedCalls()  # type: ignore[attr-defined]
            if call.func != broker.keepalives._due]


def test_the_timer_is_cancelled_when_the_client_closes_first() -> None:
    broker = make_broker()
    client = connected(broker, "polite", version=5)
    client.protocol.drop(ReasonCode.SERVER_BUSY, "busy")
    assert len(lingering(broker)) == 1
    client.lose()
    assert lingering(broker) == [] and connection_timers(broker) == []
    assert not client.transport.disconnected


def test_what_comes_while_lingering_is_discarded_unread() -> None:
    broker = make_broker()
    watcher = connected(broker, "watcher")
    watcher.subscribe("t")
    client = connected(broker, "talker", version=5)
    client.protocol.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
    client.received()
    received = broker.stats.bytes_received
    reader = client.protocol.reader
    kept = (reader._buffer, reader._pos)
    publish = Publish(topic="t", payload=b"x" * 1000, qos=0)
    for _ in range(100):
        client.send(publish, Pingreq())
    client.send_bytes(b"\x30\xff\xff\xff\x7f")  # the header of a packet larger than any allowed
    assert client.received() == [] and watcher.received() == []
    assert broker.stats.bytes_received == received
    assert (reader._buffer, reader._pos) == kept  # nothing buffered: the bytes never reached the reader


def test_a_refused_connack_lingers_too() -> None:
    broker = make_broker(allow_zero_length_clientid=False)
    client = FakeClient(broker, version=5)
    assert client.connect("").reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID  # type: ignore[union-attr]
    assert client.closed and len(lingering(broker)) == 1


def test_the_connection_leaves_the_sessions_at_once_but_counts_until_its_socket_goes() -> None:
    broker = make_broker(max_connections=1)
    client = connected(broker, "one", version=5)
    client.protocol.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
    assert broker.clients() == [] and "one" not in broker.sessions
    assert broker.factory.buildProtocol(client.transport.getPeer()) is None  # still a socket
    assert broker.stats.connections_refused == 1
    client.lose()
    assert broker.factory.buildProtocol(client.transport.getPeer()) is not None


def test_a_connection_paused_by_a_hook_reads_again_while_it_lingers() -> None:
    broker = make_broker()
    pending: Deferred[Any] = Deferred()
    broker.hooks.on_subscribe(lambda client, subscription: pending)
    client = connected(broker, "waiting", version=5)
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t"),)))
    client.publish("t", bytes(READ_WHILE_DECIDING))  # read while it decides, up to that
    assert client.transport.producerState == "paused"
    client.protocol.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
    assert client.transport.producerState == "producing"
    pending.callback(None)  # decided after the close: nothing more happens
    assert [type(p) for p in client.received()] == [Disconnect]


def test_connection_timers_stop_when_the_broker_closes_not_when_the_socket_goes() -> None:
    broker = make_broker()
    client = connected(broker, "kept", version=5, keep_alive=10)
    client.protocol.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
    assert [call.func.__name__ for call in connection_timers(broker)] == ["abortConnection"]
    assert len(broker.keepalives) == 0


def test_connect_timeout_and_keepalive_timeout_still_abort() -> None:
    broker = make_broker(connect_timeout=5)
    silent = FakeClient(broker)
    sleepy = connected(broker, "sleepy", version=5, keep_alive=10)
    broker.clock.advance(15)  # type: ignore[attr-defined]
    assert silent.transport.disconnected and sleepy.transport.disconnected
    assert lingering(broker) == []


def test_close_linger_zero_closes_at_once() -> None:
    broker = make_broker(close_linger=0)
    client = connected(broker, "old", version=5)
    client.protocol.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
    assert client.transport.disconnecting and lingering(broker) == []


# --- shutdown -----------------------------------------------------------------------------------

def test_stop_waits_for_the_clients_to_close_and_no_longer() -> None:
    broker = make_broker(close_linger=2)
    broker.startService()
    polite = connected(broker, "polite", version=5)
    rude = connected(broker, "rude", version=5)
    stopped = broker.stopService()
    polite.lose()
    assert not stopped.called  # rude has not closed its side
    broker.clock.advance(1.99)  # type: ignore[attr-defined]
    assert not stopped.called
    broker.clock.advance(0.01)  # type: ignore[attr-defined]
    assert stopped.called and rude.transport.disconnected


def test_stop_is_done_when_the_last_client_closes() -> None:
    broker = make_broker(close_linger=2)
    broker.startService()
    clients = [connected(broker, f"c{n}", version=5) for n in range(3)]
    stopped = broker.stopService()
    for client in clients:
        assert not stopped.called
        client.lose()
    assert stopped.called
    assert broker.clock.getDelayedCalls() == []  # type: ignore[attr-defined]


def test_stop_with_no_connections_or_no_linger_is_done_at_once() -> None:
    broker = make_broker()
    broker.startService()
    assert broker.stopService().called
    broker = make_broker(close_linger=0)
    broker.startService()
    connected(broker, "stays", version=5)
    assert broker.stopService().called


def test_unsent_bytes_counts_what_the_kernel_holds_until_the_peer_reads_it() -> None:
    """A slow reader takes from the kernel's send buffer (a loopback's holds megabytes) long
    before the transport can write more: that shows, under a wrapper (TLS, PROXY) too."""
    ours, peer = socket.socketpair()
    transport = tcp.Connection(ours, Protocol(), MemoryReactor())
    transport.connected = 1
    wrapper = ProtocolWrapper(None, Protocol())  # type: ignore[arg-type]
    wrapper.transport = transport
    try:
        ours.send(b"x" * 1000)  # in the kernel's buffer
        transport.write(b"y" * 10)  # held by the transport
        assert unsent_bytes(transport) == unsent_bytes(wrapper) >= 1010
        peer.recv(1000)
        assert unsent_bytes(wrapper) == 10
        ours.close()
        assert unsent_bytes(wrapper) == 10
        assert unsent_bytes(StringTransport()) == 0
    finally:
        ours.close()
        peer.close()


# --- a client that does not take what it was sent, on a real socket -----------------------------

@pytest.mark.parametrize("close_linger,how,bound", [(2.0, "disconnect", 2.0), (0.0, "taken over", UNTAKEN_LIMIT)])
@pytest_twisted.inlineCallbacks
def test_a_closed_connection_whose_client_takes_nothing_is_not_held(
        close_linger: float, how: str, bound: float) -> Iterator[Deferred[Any]]:
    """Closed with bytes its client has not taken (a subscriber that stopped reading), a socket
    closed without a linger waited for it to take them, for ever: after the client's own
    DISCONNECT (a routine end, never lingered on), or with close_linger 0. The wait is bounded."""
    clock = Clock()
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, clock=clock,
                           sys_interval=0, close_linger=close_linger, max_queued_messages=1)
    broker.startService()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (a small window, before it opens)
    sock.connect(("127.0.0.1", broker.ports[0].getHost().port))  # type: ignore[attr-defined]
    sock.setblocking(False)
    try:
        def received() -> bytes:
            try:
                return sock.recv(65536)
            except BlockingIOError:
                return b""

        sock.send(encode(Connect(client_id="reader", keep_alive=0)) + encode(Subscribe(
            packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t"),))))
        seen = b""
        for _ in range(500):  # bounded: CONNACK and SUBACK
            seen += received()
            if len(seen) >= 9:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [reader] = broker.connections
        yield filled_until_untaken(broker, reader.transport)
        if how == "disconnect":
            sock.send(encode(Disconnect()))
        else:
            FakeClient(broker).connect("reader")
        yield aborted_after(broker, reader, clock, bound)
    finally:
        sock.close()
        yield broker.stopService()


def _unread(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("endpoint,header", [
    ("tcp:0:interface=127.0.0.1", b""),
    ("haproxy:tcp:0:interface=127.0.0.1", b"PROXY TCP4 127.0.0.9 127.0.0.1 50000 1883\r\n"),
], ids=["tcp", "haproxy"])
@pytest_twisted.inlineCallbacks
def test_a_closed_client_still_writing_is_read_on_not_reset(endpoint: str, header: bytes) -> Iterator[Deferred[Any]]:
    """docs/configuration.md, 'How the broker closes': the broker half-closes and for up to
    close_linger reads and discards what the client still sends, so that the client is not
    reset. Behind haproxy: (plain TCP under the PROXY header) the socket is closed outright
    instead, with the client's unread bytes in it: the kernel resets the connection."""
    clock = Clock()
    broker = BrokerService(endpoints=[endpoint], reactor=reactor, clock=clock, sys_interval=0, close_linger=2)
    broker.startService()
    sock = socket.create_connection(("127.0.0.1", broker.ports[0].getHost().port))  # type: ignore[attr-defined]
    sock.setblocking(False)
    try:
        sock.send(header + encode(Connect(client_id="kicked", protocol_level=5, keep_alive=0), 5))
        seen = b""
        for _ in range(500):  # bounded: the CONNACK
            try:
                seen += sock.recv(65536)
            except BlockingIOError:
                pass
            if seen:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert seen[:1] == b"\x20"
        [connection] = broker.connections
        socket_transport = connection.transport
        while not hasattr(socket_transport, "socket"):  # (under the PROXY header's wrapper)
            socket_transport = socket_transport.transport
        # The client is writing as the broker decides to close: its bytes wait, unread.
        sock.send(encode(Publish(topic="t", payload=b"x" * 100), 5))
        for _ in range(100_000):  # bounded: loopback delivers at once
            if _unread(socket_transport.fileno()):
                break
        connection.drop(ReasonCode.ADMINISTRATIVE_ACTION, "kicked")
        received = b""
        for _ in range(50):  # bounded: the DISCONNECT and the FIN reach the client
            yield deferLater(reactor, 0.01, lambda: None)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                break
            received += data
        assert received[:1] == b"\xe0"  # the DISCONNECT 0x98
        # The broker lingers, reading: the client can still write, and is not reset.
        outcome = "written"
        try:
            sock.send(encode(Publish(topic="t", payload=b"y"), 5))
            yield deferLater(reactor, 0.05, lambda: None)
            sock.send(encode(Publish(topic="t", payload=b"z"), 5))
        except OSError as e:
            outcome = errno.errorcode.get(e.errno or 0, str(e))
        assert outcome == "written"
        assert connection in broker.connections  # still lingering, as close_linger says
    finally:
        sock.close()
        clock.advance(2)
        yield broker.stopService()


def test_a_disconnect_hook_may_publish_as_the_stop_closes_its_client() -> None:
    """At stopService the broker still routes (and stores) the wills of the clients it closes, but
    an on_disconnect handler that publishes (a presence topic: the usual use of the event) gets
    RuntimeError('the broker is stopped'), logged as a failed hook, and the retained 'online'
    stays. BrokerService.stopped says 'its store is closed': it is not, yet, while the
    connections are closed."""
    broker = make_broker(sys_interval=0)
    broker.startService()
    broker.hooks.on_disconnect(
        lambda client, graceful: broker.publish(f"presence/{client.client_id}", b"offline", retain=True))
    connected(broker, "c", version=5, will=Will(topic="will/c", payload=b"gone", retain=True))
    broker.publish("presence/c", b"online", retain=True)
    with capturedLogs() as events:
        broker.stopService()
    failures = [e for e in events if e.get("log_failure") is not None or e["log_level"] >= LogLevel.error]
    assert broker.retained.get("will/c").payload == b"gone"  # (the will is routed at the stop)
    assert [str(e["log_failure"].value) for e in failures] == []
    assert broker.retained.get("presence/c").payload == b"offline"


@pytest.mark.parametrize("kind", ["tcp", "ssl", "haproxy"])
@pytest_twisted.inlineCallbacks
def test_a_keepalive_timeout_still_writes_disconnect_0x8d_before_the_abort(
        kind: str, tmp_path: Any) -> Iterator[Deferred[Any]]:
    """docs/configuration.md: 'Two closes stay aborts ... and the keepalive timeout (an MQTT 5
    client is still sent 0x8D first)'. Over TCP it is handed to the socket before the abort; over
    TLS (and behind haproxy:) it is only put in the transport's buffer, which the abort throws
    away: never sent."""
    import ssl

    from test_tls import make_certs

    endpoint = "tcp:0:interface=127.0.0.1"
    header = b""
    if kind == "haproxy":
        endpoint = "haproxy:" + endpoint
        header = b"PROXY TCP4 127.0.0.9 127.0.0.1 50000 1883\r\n"
    if kind == "ssl":
        make_certs(tmp_path / "certs")
        endpoint = (f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'certs' / 'server.key'}"
                    f":certKey={tmp_path / 'certs' / 'server.pem'}")
    clock = Clock()
    broker = BrokerService(endpoints=[endpoint], reactor=reactor, clock=clock, sys_interval=0)
    broker.startService()
    raw = socket.create_connection(("127.0.0.1", broker.ports[0].getHost().port))  # type: ignore[attr-defined]
    raw.setblocking(False)
    sock: Any = raw
    try:
        if kind == "ssl":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(raw, do_handshake_on_connect=False)
            for _ in range(500):  # bounded: the handshake
                try:
                    sock.do_handshake()
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    yield deferLater(reactor, 0.01, lambda: None)

        def receive() -> bytes | None:
            """What came (b"" for nothing yet); None at the end of the stream or a reset."""
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return b""
            except OSError:
                return None
            return data if data else None

        sock.send(header + encode(Connect(client_id="sleepy", protocol_level=5, keep_alive=2), 5))
        seen = b""
        for _ in range(500):  # bounded: the CONNACK
            seen += receive() or b""
            if seen:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert seen[:1] == b"\x20"
        clock.advance(3)  # silent for 1.5 keepalives: aborted
        seen = b""
        for _ in range(100):  # bounded: what the broker sent, then the end
            yield deferLater(reactor, 0.01, lambda: None)
            data = receive()
            if data is None:
                break
            seen += data
        assert seen[:1] == b"\xe0" and seen[2:3] == b"\x8d", seen
    finally:
        sock.close()
        yield broker.stopService()


def test_nothing_is_sent_after_the_disconnect_when_a_hook_answering_at_once_ended_the_connection() -> None:
    """[MQTT-3.14.4-1]: after sending DISCONNECT the sender MUST NOT send any more MQTT Control
    Packets. A hook that answers with a Deferred finds its connection closed and nothing more is
    sent (MQTTProtocol._when's run); one that answers at once after ending the connection (here
    it stops the broker) has its answer acted on all the same: a PUBACK follows the DISCONNECT."""
    broker = make_broker(sys_interval=0)
    broker.startService()

    def on_publish(client: Any, message: Any) -> None:
        if message.topic == "admin/stop":
            broker.stopService()

    broker.hooks.on_publish(on_publish)
    client = connected(broker, "c", version=5)
    client.send(Publish(topic="admin/stop", payload=b"now", qos=1, packet_id=1))
    kinds = [type(packet) for packet in client.received()]
    assert kinds[-1:] == [Disconnect], kinds
    assert Puback not in kinds[kinds.index(Disconnect):]


def test_a_connection_a_connect_hook_answering_at_once_ended_is_not_attached_after_it() -> None:
    """The same, at CONNECT: a connect hook that stops the broker (the connection is closed by
    the stop) and lets the client in has the closed connection attached to a session after the
    stop: a CONNACK after the end, a client counted as connected for good, and its disconnect
    event never fired."""
    broker = make_broker(sys_interval=0)
    broker.startService()
    events: list[Any] = []
    broker.hooks.on_disconnect(lambda client, graceful: events.append(client.client_id))

    def on_connect(client: Any) -> None:
        broker.stopService()

    broker.hooks.on_connect(on_connect)
    client = FakeClient(broker, 5)
    client.send(Connect(client_id="last", protocol_level=5))
    assert client.received() == []
    assert broker.clients() == [] and broker.attached == 0

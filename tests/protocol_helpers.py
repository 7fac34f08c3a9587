"""A broker on a fake reactor and clients on StringTransports: deterministic protocol tests."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any, Generator

from twisted.internet import tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mqtt_broker import BrokerService
from mqtt_broker.linger import unwritten
from mqtt_broker.wire import Connect, FrameReader, Packet, Publish, Subscribe, SubscriptionRequest, encode

_ports = iter(range(20000, 60000))


class Held:
    """Bytes allocated inside a ``with Held() as held:`` block and still held at its end, after a
    collection (``held.bytes``): what the broker keeps of what the block made it do; and the most
    held at once within it (``held.peak``)."""

    bytes = 0
    peak = 0

    def __enter__(self) -> Held:
        tracemalloc.start()
        self._before = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.peak = tracemalloc.get_traced_memory()[1] - self._before
            gc.collect()
            self.bytes = tracemalloc.get_traced_memory()[0] - self._before
        finally:
            tracemalloc.stop()


class TurnClock(MemoryReactorClock):
    """A fake reactor whose ``advance`` runs only the calls due when it is called, as one turn of
    a real reactor does. (Clock's runs those they make for now too, all in one advance: work
    spread over turns looks done in one.)"""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        for call in [call for call in self.calls if call.getTime() <= self.rightNow]:
            if call.active():  # (not cancelled by one run before it)
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def make_broker(reactor: MemoryReactorClock | None = None, **settings: Any) -> BrokerService:
    return BrokerService(endpoints=[], reactor=reactor or MemoryReactorClock(), **settings)


class FakeClient:
    """One client connection: ``send`` packets in, ``received()`` decodes what the broker wrote."""

    def __init__(self, broker: BrokerService, version: int = 4) -> None:
        self.version = version
        address = IPv4Address("TCP", "127.0.0.1", next(_ports))
        self.protocol = broker.factory.buildProtocol(address)
        assert self.protocol is not None
        self.transport = StringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)
        self.reader = FrameReader(version=version)
        self.lost = False
        self._pending: list[Packet] = []

    def send(self, *packets: Packet) -> None:
        self.send_bytes(b"".join(encode(p, self.version) for p in packets))

    def send_bytes(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> list[Packet]:
        """What the broker wrote to this client. A test that goes on from inside the broker's
        gathering of writes (resumed by a store's ``flushed()``, which fires while the writes a
        batch releases are gathered) sees them as they are sent when the gathering ends."""
        broker = self.protocol.broker
        if broker.unflushed:
            broker.flush_writes()
        data = self.transport.value()
        self.transport.clear()
        packets, self._pending = self._pending + self.reader.feed(data), []
        return packets

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def lose(self) -> None:
        """The network connection ends (as the reactor would report it)."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(None)

    def connect(self, client_id: str = "c", clean: bool = True, **kwargs: Any) -> Packet:
        level = kwargs.pop("protocol_level", self.version)
        name = "MQIsdp" if level == 3 else "MQTT"
        self.send(Connect(client_id=client_id, clean_start=clean, protocol_level=level,
                          protocol_name=name, **kwargs))
        packets = self.received()
        assert len(packets) >= 1, packets
        self._pending = packets[1:]
        return packets[0]

    def subscribe(self, *filters: str, qos: int = 0, packet_id: int = 1, **options: Any) -> list[Packet]:
        self.send(Subscribe(packet_id=packet_id, subscriptions=tuple(
            SubscriptionRequest(topic_filter=f, qos=qos, **options) for f in filters)))
        return self.received()

    def publish(self, topic: str, payload: bytes = b"x", qos: int = 0, retain: bool = False,
                packet_id: int = 0, **kwargs: Any) -> list[Packet]:
        self.send(Publish(topic=topic, payload=payload, qos=qos, retain=retain,
                          packet_id=packet_id or (1 if qos else 0), **kwargs))
        return self.received()


class PeerSocket:
    """A socket as a TCP transport sees it: ``send`` takes as many bytes as the peer has made
    room for by reading (``room``), into ``taken``."""

    def __init__(self) -> None:
        self.room = 1 << 30
        self.taken = bytearray()

    def send(self, data: Any) -> int:
        size = min(len(data), self.room)
        self.room -= size
        self.taken += data[:size]
        return size

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *_: Any) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


class SocketClient(FakeClient):
    """A client on a TCP transport (Twisted's ``tcp.Connection``) over a fake socket: what the
    broker writes waits in the transport until the client ``reads`` it; what the client sends
    waits, as in the kernel's buffer, while the transport does not read (``deliver``, the
    reactor's read, hands it to the broker)."""

    def __init__(self, broker: BrokerService, version: int = 4) -> None:
        self.version = version
        address = IPv4Address("TCP", "127.0.0.1", next(_ports))
        self.protocol = broker.factory.buildProtocol(address)
        assert self.protocol is not None
        self.socket = PeerSocket()
        self.reactor = broker.reactor
        self.transport: Any = tcp.Connection(self.socket, self.protocol, self.reactor)
        self.transport.connected = 1
        self.transport.startReading()
        self.protocol.makeConnection(self.transport)
        self.reader = FrameReader(version=version)
        self.lost = False
        self._pending: list[Packet] = []
        self.unread = b""
        """What the client sent that the broker has not read."""

    def send_bytes(self, data: bytes) -> None:
        self.unread += data
        self.deliver()

    def deliver(self) -> None:
        """A turn of the reactor: the transport reads what the client sent, if it reads."""
        if self.unread and self.transport in self.reactor.getReaders():
            data, self.unread = self.unread, b""
            self.protocol.dataReceived(data)

    def reads(self, size: int) -> None:
        """The client reads ``size`` bytes more: the transport writes as many to the socket."""
        self.socket.room += size
        if self.transport in self.reactor.getWriters():
            self.transport.doWrite()

    def received(self) -> list[Packet]:
        broker = self.protocol.broker
        if broker.unflushed:
            broker.flush_writes()
        data, self.socket.taken = bytes(self.socket.taken), bytearray()
        packets, self._pending = self._pending + self.reader.feed(data), []
        return packets

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected or self.transport._aborting)


def connected(broker: BrokerService, client_id: str = "c", version: int = 4, **kwargs: Any) -> FakeClient:
    client = FakeClient(broker, version)
    connack = client.connect(client_id, **kwargs)
    assert connack.reason_code == 0, connack  # type: ignore[union-attr]
    return client


def publisher_and_subscribers(broker: BrokerService, topic_filter: str) -> tuple[FakeClient, list[FakeClient]]:
    """A publisher, and a subscriber to ``topic_filter`` of each kind: MQTT 3.1.1 and MQTT 5."""
    publisher = connected(broker, "pub")
    subscribers = [connected(broker, "v3"), connected(broker, "v5", version=5)]
    for subscriber in subscribers:
        subscriber.subscribe(topic_filter)
    return publisher, subscribers


@inlineCallbacks
def filled_until_untaken(broker: BrokerService, socket: tcp.Connection) -> Generator[Deferred[Any], Any, None]:
    """Publish 64 KiB messages to "t" (bounded) until ``socket``, the broker's side of a client
    that reads nothing, holds for good what its client does not take."""
    from twisted.internet import reactor
    for _ in range(400):
        if unwritten(socket):
            yield deferLater(reactor, 0.02, lambda: None)
            if unwritten(socket):
                break
        broker.publish("t", bytes(65536))
        yield deferLater(reactor, 0, lambda: None)
    assert unwritten(socket)


@inlineCallbacks
def aborted_after(broker: BrokerService, reader: Any, clock: Clock, bound: float) -> Generator[Deferred[Any], Any, None]:
    """Once ``reader``'s session is gone (it was closed; bounded wait), it is still held, for
    what its socket holds, until ``clock`` is advanced by ``bound``; then aborted."""
    from twisted.internet import reactor
    for _ in range(500):
        if reader.session is None:
            break
        yield deferLater(reactor, 0.01, lambda: None)
    yield deferLater(reactor, 0.05, lambda: None)
    assert reader in broker.connections  # (its socket still holds what was not taken)
    clock.advance(bound)
    for _ in range(500):  # bounded: the abort reaches the reactor
        if reader not in broker.connections:
            break
        yield deferLater(reactor, 0.01, lambda: None)
    assert reader not in broker.connections


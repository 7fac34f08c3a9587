"""A broker in memory and clients that talk to it, for testing code that embeds the broker.

:class:`MemoryBroker` runs a real :class:`~mqtt_broker.BrokerService` on a
``MemoryReactorClock``: no socket is opened and no real time passes. Its clients,
:class:`MemoryClient`, speak MQTT 3.1, 3.1.1 or 5 to the broker's own protocol over in-memory
transports, so every packet goes through the same code as on the network, hooks included::

    from mqtt_broker import ReasonCode
    from mqtt_broker.testing import MemoryBroker

    broker = MemoryBroker()
    broker.hooks.on_publish(lambda client, message: message.topic != "forbidden")
    sub = broker.connect("sub")
    sub.subscribe("#")
    pub = broker.connect("pub")
    ack = pub.publish("forbidden", b"x", qos=1)  # (None while a hook's Deferred has not fired)
    assert ack is not None and ack.reason_code == ReasonCode.NOT_AUTHORIZED
    pub.publish("allowed", b"y")
    assert [m.topic for m in sub.messages()] == ["allowed"]

Everything happens at once, while a method of the kit runs: a client's packets reach the broker,
the broker's answers and deliveries reach every client, and clients answer what the protocol
asks of them (acknowledgements). Time moves only by :meth:`MemoryBroker.advance`.

A hook that returns a Deferred holds its answer back until the test fires that Deferred; the
method that was waiting for it returns None meanwhile, and the answer comes later in
:meth:`MemoryClient.received` (or :meth:`MemoryClient.messages`). So it does while the broker
reads nothing more from a client, as it stops reading a socket (a store that bounds what waits
for it, until it has caught up): what the client sends meanwhile waits in the client.

The broker itself never imports this module.
"""

from __future__ import annotations

import time
from itertools import count
from pathlib import Path
from typing import Any, Callable, Mapping
from weakref import WeakKeyDictionary

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from .broker import BrokerService
from .config import BrokerConfig
from .hooks import Hooks
from .store import Store
from .store.sqlite import SQLiteStore
from .wire import (
    MQTT_3_1, MQTT_5, NO_PROPERTIES, Connack, Connect, Disconnect, FrameReader, Packet, Pingreq,
    Pingresp, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, SubscriptionRequest,
    Unsuback, Unsubscribe, Will, encode,
)

Acknowledgement = Puback | Pubrec | Pubcomp
"""What ends a QoS 1 or 2 PUBLISH: its PUBACK, its PUBCOMP, or a PUBREC that refuses it."""
MAX_TURNS = 100_000
"""Turns of the reactor, each running the calls due at once, that one :meth:`MemoryBroker.flush`
runs before it raises (of ``PACKETS_PER_TURN`` packets each, a billion): a broker that kept
answering its clients with calls due at once, a busy loop on a real reactor, would hang the test."""


class MemoryBroker:
    """A running :class:`~mqtt_broker.BrokerService` on a fake reactor and clock.

    ``MemoryBroker(**settings)`` takes the settings of ``BrokerService`` (a ``config``, a
    ``store``, and keyword settings such as ``max_keepalive=60``), but SQLite persistence, whose
    writes run in threads, which a fake reactor has none of (a ``MemoryStore`` keeps state
    across two brokers instead). The service is started and listens on nothing; its timers run
    on the fake clock, the ``$SYS`` topics' too (every ``sys_interval`` seconds;
    ``sys_interval=0`` turns them off). The clock starts at the wall clock's time, in whole
    seconds, as a JSON Web Token's times are wall-clock times (checked against this clock); on a
    store an earlier ``MemoryBroker`` used, at the time that one reached if it is later (a
    restart does not take the time back: what expires, expires as it would have).
    """

    def __init__(self, config: BrokerConfig | str | Path | None = None, *, store: Store | None = None,
                 **settings: Any) -> None:
        for name in ("endpoints", "reactor", "clock"):
            if name in settings:
                raise TypeError(f"MemoryBroker() takes no {name}: the broker runs on the kit's own "
                                "reactor and clock (see advance())")
        self.reactor = MemoryReactorClock()
        """The reactor and clock of the broker: ``reactor.seconds()`` is the broker's time."""
        self.reactor.advance(max(int(time.time()), _reached_on(store)))
        self._store = store
        self.service = BrokerService(endpoints=[], config=config, reactor=self.reactor, store=store,
                                     **settings)
        """The broker under test, as an application would embed it."""
        if isinstance(self.service.store, SQLiteStore):  # (it opens nothing before it starts)
            raise ValueError("the testing kit runs no threads, which SQLite persistence writes in: "
                             "use a MemoryStore (store=MemoryStore()) to keep state across brokers")
        self._clients: list[MemoryClient] = []
        self._ports = count(50000)
        self._flushing = False
        self.service.startService()

    @property
    def hooks(self) -> Hooks:
        """The broker's hooks (``service.hooks``), to register handlers on."""
        return self.service.hooks

    def client(self, version: int = MQTT_5, *, acknowledge: bool = True) -> MemoryClient:
        """A new network connection to the broker, not yet connected at the MQTT level (see
        :meth:`MemoryClient.connect`). ``version`` is the MQTT protocol level: 3 (3.1), 4
        (3.1.1) or 5. ``acknowledge=False`` makes a client that does not acknowledge the QoS 1
        and 2 messages it is sent, for tests of what the broker then does."""
        client = MemoryClient(self, version, acknowledge=acknowledge)
        self._clients.append(client)
        return client

    def connect(self, client_id: str = "", *, version: int = MQTT_5, acknowledge: bool = True,
                **options: Any) -> MemoryClient:
        """A new client, connected: :meth:`client` then :meth:`MemoryClient.connect` with
        ``options``. Raises AssertionError if the broker refuses the connection or does not
        answer at once (a connect hook returned a Deferred, a will hook decides on the client's last
        will: use those two calls instead)."""
        client = self.client(version, acknowledge=acknowledge)
        try:
            connack = client.connect(client_id, **options)
        except ConnectionError as e:  # (refused before its CONNECT: max_connections)
            raise AssertionError(f"connection of {client_id!r} not accepted: {e}") from None
        if connack is None or connack.reason_code != 0:
            raise AssertionError(f"connection of {client_id!r} not accepted: {connack!r}")
        return client

    def advance(self, seconds: float) -> None:
        """Move the broker's clock on by ``seconds``, running what falls due on the way:
        keepalive timeouts, session and message expiry, QoS retries, delayed wills. Clients
        take what the broker sends them after each timer, as they would between two turns of a
        real reactor, so a delivery acknowledged at once is not resent later. ``$SYS`` is
        worked out every ``sys_interval`` (10 s) on the way: a week with 100 clients takes
        seconds, against a fifth of one with ``MemoryBroker(sys_interval=0)``."""
        reactor = self.reactor
        end = reactor.seconds() + seconds
        while True:
            due = [call.getTime() for call in reactor.getDelayedCalls() if call.getTime() <= end]
            if not due:
                break
            target = max(min(due), reactor.seconds())
            reactor.advance(target - reactor.seconds())
            if reactor.seconds() < target:  # the float sum fell short of the call's time
                reactor.rightNow = target
                reactor.advance(0)
            self.flush()
        reactor.advance(max(0.0, end - reactor.seconds()))
        if self._store is not None and _reached_on(self._store) < reactor.seconds():
            try:
                _reached[self._store] = reactor.seconds()
            except TypeError:  # a store without weak references: nothing to go on from
                pass
        self.flush()

    def flush(self) -> None:
        """Deliver everything in transit until nothing moves: the broker's gathered writes to
        the clients, the clients' automatic answers to the broker, the closing of the
        connections the broker closed, and what the broker left for the reactor's next turn
        (calls due at once: the rest of a read longer than ``PACKETS_PER_TURN`` packets). Every
        method of the kit does this before it returns; call it after firing a hook's Deferred
        and before looking at the broker's state. Raises RuntimeError after ``MAX_TURNS`` turns
        that each left calls due at once."""
        if self._flushing:
            return  # called from a hook the kit itself caused to run
        self._flushing = True
        service, reactor = self.service, self.reactor
        try:
            moved, turns = True, 0
            while moved:
                if service.unflushed:
                    service.flush_writes()
                moved = False
                for client in list(self._clients):
                    moved = client._read() or moved
                    moved = client._read_on() or moved
                    if client.transport.disconnecting and not client._lost:
                        client._lose(ConnectionAborted() if client.transport.disconnected else ConnectionDone())
                        moved = True
                if not moved and any(call.getTime() <= reactor.seconds() for call in reactor.getDelayedCalls()):
                    # The next turn comes at this same moment: time moves only by advance().
                    turns += 1
                    if turns > MAX_TURNS:
                        raise RuntimeError(f"calls still fell due at once after {MAX_TURNS} turns of the "
                                           "reactor: a loop of zero-delay calls?")
                    reactor.advance(0)
                    moved = True
            # (A closed client keeps what it received: the kit lets it go, or every call would
            # go through every client a long test ever made.)
            self._clients = [client for client in self._clients if not client._lost]
        finally:
            self._flushing = False

    def _address(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", next(self._ports))


class MemoryClient:
    """One network connection of an MQTT client to a :class:`MemoryBroker`, made by
    :meth:`MemoryBroker.client` or :meth:`MemoryBroker.connect`.

    The client answers by itself what the protocol asks of it: it completes the QoS 2 exchange
    of what it publishes (PUBREL after PUBREC) and, unless made with ``acknowledge=False``,
    acknowledges the QoS 1 and 2 messages it is sent (PUBACK; PUBREC, then PUBCOMP after
    PUBREL). It gives a message the broker sent with a Topic Alias alone (to a client that
    connected with ``topic_alias_maximum``) the topic of that alias; the alias stays in its
    properties. It sends nothing else on its own: no PINGREQ (see :meth:`ping`).

    What the broker sends and the client did not deal with itself waits in the client until a
    method takes it: the method that expects an answer (``connect`` its CONNACK, ``publish``
    its acknowledgement...), :meth:`messages` the PUBLISH packets, :meth:`received` all the
    rest. Such a method raises ConnectionError when no answer can come: on a connection that
    has ended, or that the broker ends without answering (a PUBLISH before CONNECT).
    """

    def __init__(self, broker: MemoryBroker, version: int = MQTT_5, *, acknowledge: bool = True) -> None:
        self.broker = broker
        self.version = version
        """The MQTT protocol level: 3 (3.1), 4 (3.1.1) or 5."""
        self.acknowledge = acknowledge
        """Whether QoS 1 and 2 messages sent to this client are acknowledged automatically."""
        self.client_id = ""
        """The client id it connected with, or the one the broker assigned (MQTT 5)."""
        address = broker._address()
        self.transport = StringTransport(peerAddress=address)
        """The in-memory transport the broker writes to (``disconnecting`` once it closed it)."""
        self.protocol = broker.service.factory.buildProtocol(address)
        """The broker's protocol for this connection; None if the broker refused the connection
        (``max_connections``)."""
        self._reader = FrameReader(version=version)
        self._inbox: list[Packet] = []
        self._in_flight: set[int] = set()
        self._aliases: dict[int, str] = {}
        """The topics of the Topic Aliases the broker set (a client that connected with
        ``topic_alias_maximum``)."""
        self._next_id = 0
        self._unread = bytearray()
        """What the client sent that the broker has not read: held while the broker reads no more
        from the connection (it paused the transport), as a socket would hold it."""
        self._lost = self.protocol is None
        if self.protocol is not None:
            self.protocol.makeConnection(self.transport)
        else:
            self.transport.loseConnection()

    @property
    def closed(self) -> bool:
        """Whether the connection has ended: closed by the broker, or by :meth:`disconnect` or
        :meth:`drop`."""
        return self._lost or self.transport.disconnecting

    # --- requests -----------------------------------------------------------------------

    def connect(self, client_id: str = "", *, clean_start: bool = True, keep_alive: int = 0,
                username: str | None = None, password: bytes | str | None = None, will: Will | None = None,
                properties: Mapping[str, Any] | None = None) -> Connack | None:
        """Send CONNECT; returns the CONNACK, or None if the broker has not answered yet (a
        connect hook is deciding: the CONNACK then comes in :meth:`received`) or answered with
        an AUTH packet (MQTT 5 enhanced authentication, also in :meth:`received`). ``will`` is a
        :class:`mqtt_broker.wire.Will`; ``properties`` the MQTT 5 CONNECT properties by name
        (``{"session_expiry_interval": 60}``)."""
        self._mqtt5_only(properties=properties, will_properties=will is not None and will.properties)
        self.client_id = client_id
        if isinstance(password, str):
            password = password.encode("utf-8")
        connack = self._request(Connect(
            protocol_name="MQIsdp" if self.version == MQTT_3_1 else "MQTT", protocol_level=self.version,
            client_id=client_id, clean_start=clean_start, keep_alive=keep_alive, username=username,
            password=password, will=will, properties=_properties(properties)),
            lambda packet: isinstance(packet, Connack))
        return connack  # type: ignore[return-value]

    def subscribe(self, *topic_filters: str, qos: int = 0, no_local: bool = False,
                  retain_as_published: bool = False, retain_handling: int = 0,
                  properties: Mapping[str, Any] | None = None) -> Suback | None:
        """Subscribe to one or more topic filters with the same options; returns the SUBACK (its
        ``reason_codes`` are the granted QoS or a refusal, per filter), or None if the broker has
        not answered yet. The retained messages that match are then in :meth:`messages`."""
        self._mqtt5_only(no_local=no_local, retain_as_published=retain_as_published, retain_handling=retain_handling,
                         properties=properties)
        packet_id = self._allocate()
        return self._request(Subscribe(packet_id=packet_id, properties=_properties(properties), subscriptions=tuple(
            SubscriptionRequest(topic_filter=topic_filter, qos=qos, no_local=no_local,
                                retain_as_published=retain_as_published, retain_handling=retain_handling)
            for topic_filter in topic_filters)), _answers(Suback, packet_id))  # type: ignore[return-value]

    def unsubscribe(self, *topic_filters: str) -> Unsuback | None:
        """Unsubscribe from topic filters; returns the UNSUBACK, or None if the broker has not
        answered yet."""
        packet_id = self._allocate()
        return self._request(Unsubscribe(packet_id=packet_id, topic_filters=topic_filters),
                             _answers(Unsuback, packet_id))  # type: ignore[return-value]

    def publish(self, topic: str, payload: bytes | str = b"", *, qos: int = 0, retain: bool = False,
                properties: Mapping[str, Any] | None = None) -> Acknowledgement | None:
        """Publish a message (a str payload is sent as UTF-8). Returns what ended the exchange:
        the PUBACK at QoS 1, the PUBCOMP at QoS 2 (after the PUBREC the client answered with
        PUBREL), or a PUBREC whose reason code refused the message. Returns None at QoS 0, and
        when the broker has not answered yet (a publish hook is deciding): the client completes
        the exchange when the answer comes, and the acknowledgement is then in
        :meth:`received`. Raises ConnectionError on a connection that has ended, at QoS 0 too."""
        self._mqtt5_only(properties=properties)
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        packet = Publish(topic=topic, payload=payload, qos=qos, retain=retain,
                         packet_id=self._allocate() if qos else 0, properties=_properties(properties))
        if not qos:
            if self.closed:
                raise ConnectionError("PUBLISH not sent: the connection has ended")
            self.send(packet)
            return None
        return self._request(packet, _answers((Puback, Pubrec, Pubcomp), packet.packet_id))  # type: ignore[return-value]

    def ping(self) -> Pingresp | None:
        """Send PINGREQ; returns the PINGRESP, or None if none came (a ping hook refused or is
        deciding)."""
        return self._request(Pingreq(), lambda packet: isinstance(packet, Pingresp))  # type: ignore[return-value]

    def disconnect(self, reason_code: int = 0, properties: Mapping[str, Any] | None = None) -> None:
        """End the connection with a DISCONNECT: reason code 0, the normal disconnection, discards
        the will [MQTT-3.14.4-3]; MQTT 5's 0x04 (disconnect with will message) keeps it."""
        self._mqtt5_only(reason_code=reason_code, properties=properties)
        self.send(Disconnect(reason_code=reason_code, properties=_properties(properties)))

    def drop(self) -> None:
        """End the connection without a DISCONNECT, as when the network fails: the broker
        publishes the will."""
        if not self._lost:
            # Sent before the end, it comes before it: a socket the broker does not read holds
            # it, and the end of the stream behind it.
            self._hand_over()
            self._lose(ConnectionLost("connection dropped"))
        self.broker.flush()

    def send(self, *packets: Packet) -> None:
        """Send packets as they are, for what the methods above do not cover (AUTH, a second
        CONNECT, a PUBACK of one's own when made with ``acknowledge=False``). Nothing is sent
        once the connection has ended."""
        for packet in packets:
            if isinstance(packet, Publish) and packet.qos:
                self._in_flight.add(packet.packet_id)
        self._write(b"".join(encode(packet, self.version) for packet in packets))
        self.broker.flush()

    # --- what the broker sent -----------------------------------------------------------

    def messages(self) -> list[Publish]:
        """The PUBLISH packets the broker sent since the last call, oldest first (already
        acknowledged unless the client was made with ``acknowledge=False``)."""
        self.broker.flush()
        messages = [packet for packet in self._inbox if isinstance(packet, Publish)]
        self._inbox = [packet for packet in self._inbox if not isinstance(packet, Publish)]
        return messages

    def received(self) -> list[Packet]:
        """Every packet the broker sent that no earlier call has taken, oldest first: answers
        that came late, DISCONNECT, AUTH, and PUBLISH packets :meth:`messages` has not taken.
        Not the PUBREC and PUBREL the client answered by itself."""
        self.broker.flush()
        packets, self._inbox = self._inbox, []
        return packets

    # --- inside -------------------------------------------------------------------------

    def _request(self, packet: Packet, is_answer: Callable[[Packet], bool]) -> Packet | None:
        """Send a packet, and take its answer if it came meanwhile. Raises ConnectionError when
        no answer can come: the connection had ended, or ended without one."""
        name = type(packet).__name__.upper()
        if self.closed:
            raise ConnectionError(f"{name} not sent: the connection has ended")
        mark = len(self._inbox)
        self.send(packet)
        for index in range(mark, len(self._inbox)):
            if is_answer(self._inbox[index]):
                return self._inbox.pop(index)
        if self.closed:
            raise ConnectionError(f"the broker closed the connection without answering the {name} (what it "
                                  "sent is in received())")
        return None

    def _mqtt5_only(self, **options: Any) -> None:
        """Refuse what MQTT 3 cannot carry: sent without it, a test would not test what it asks."""
        given = [name for name, value in options.items() if value]
        if given and self.version < MQTT_5:
            level = "3.1" if self.version == MQTT_3_1 else "3.1.1"
            raise ValueError(f"{', '.join(given)}: MQTT 5 only (this client speaks MQTT {level})")

    def _allocate(self) -> int:
        """A packet id not in use, counting up from 1 so that an answer that came late in
        :meth:`received` is never taken for the answer of a later request."""
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._in_flight:
                self._in_flight.add(self._next_id)
                return self._next_id
        raise RuntimeError("every packet id is in use")

    def _write(self, data: bytes) -> None:
        if not self.closed and self.protocol is not None:
            self._unread += data  # (after what waits already: a stream keeps its order)
            self._read_on()

    def _read_on(self) -> bool:
        """Hand the broker what the client sent, unless it has paused the transport (its store
        has to catch up, say); returns whether it did."""
        return self.transport.producerState == "producing" and self._hand_over()

    def _hand_over(self) -> bool:
        """Hand the broker what the client sent that it has not read; returns whether there was any."""
        if not self._unread or self.closed or self.protocol is None:
            return False
        data = bytes(self._unread)
        self._unread.clear()
        self.protocol.dataReceived(data)
        return True

    def _read(self) -> bool:
        """Take what the broker wrote, answer what the protocol asks, keep the rest; returns
        whether anything came."""
        data = self.transport.value()
        if not data:
            return False
        self.transport.clear()
        answers: list[Packet] = []
        for packet in self._reader.feed(data):
            if isinstance(packet, Publish):
                alias = packet.properties.get("topic_alias")
                if alias is not None:
                    if packet.topic:
                        self._aliases[alias] = packet.topic
                    else:  # the topic the alias was last sent with (MQTT 5 3.3.2.3.4)
                        packet.topic = self._aliases.get(alias, "")
                if self.acknowledge and packet.qos == 1:
                    answers.append(Puback(packet_id=packet.packet_id))
                elif self.acknowledge and packet.qos == 2:
                    answers.append(Pubrec(packet_id=packet.packet_id))
            elif isinstance(packet, Pubrel) and self.acknowledge:
                answers.append(Pubcomp(packet_id=packet.packet_id))
                continue
            elif isinstance(packet, Pubrec) and packet.reason_code < 0x80 and packet.packet_id in self._in_flight:
                answers.append(Pubrel(packet_id=packet.packet_id))
                continue
            elif isinstance(packet, (Puback, Pubrec, Pubcomp, Suback, Unsuback)):
                self._in_flight.discard(packet.packet_id)
            elif isinstance(packet, Connack) and "assigned_client_identifier" in packet.properties:
                self.client_id = packet.properties["assigned_client_identifier"]
            self._inbox.append(packet)
        if answers:
            self._write(b"".join(encode(packet, self.version) for packet in answers))
        return True

    def _lose(self, reason: Exception) -> None:
        """The connection is gone: tell the broker's protocol, as the reactor would."""
        self._lost = True
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(reason))


_reached: WeakKeyDictionary[Any, float] = WeakKeyDictionary()
"""The latest time a MemoryBroker on each store reached: where the next one's clock starts."""


def _reached_on(store: Store | None) -> float:
    try:
        return _reached.get(store, 0.0) if store is not None else 0.0
    except TypeError:
        return 0.0


def _answers(kind: type | tuple[type, ...], packet_id: int) -> Callable[[Packet], bool]:
    return lambda packet: isinstance(packet, kind) and getattr(packet, "packet_id", None) == packet_id


def _properties(properties: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return NO_PROPERTIES if not properties else dict(properties)


__all__ = ["MemoryBroker", "MemoryClient", "Acknowledgement"]

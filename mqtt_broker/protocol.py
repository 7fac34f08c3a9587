"""MQTTProtocol, one per client connection, and MQTTFactory.

The protocol turns bytes into packets (through the sans-IO reader), checks each packet against
the lifecycle table, dispatches it through an explicit table of handlers, and writes what the
broker sends. It never decides routing.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import lifecycle
from .hooks import Refused
from .lifecycle import State
from .message import Client, Message
from .topics import Subscription, split_shared, valid_topic_filter, valid_topic_name
from .wire import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Auth, Connack, Connect, Disconnect, FrameReader,
    MQTTError, Packet, Pingreq, Pingresp, ProtocolError, Puback, Pubcomp, Publish, Pubrec, Pubrel,
    ReasonCode, Suback, Subscribe, Unsuback, Unsubscribe, UnsupportedProtocolVersion, encode,
    publish_template, v3_connack_code,
)

log = Logger()

_PINGRESP = encode(Pingresp())
# Properties a broker must not forward as the publisher sent them [MQTT-3.3.2-?]: the alias is
# per connection, subscription identifiers are the receiver's own.
_NOT_FORWARDED = ("topic_alias", "subscription_identifier")


@implementer(IPushProducer)
class MQTTProtocol(Protocol):
    """One client connection. ``paused`` is True while the transport's buffer is full; the
    broker then queues (bounded) instead of writing."""

    def __init__(self, broker: Any, clock: IReactorTime) -> None:
        self.broker = broker
        self.clock = clock
        config = broker.config
        self.reader = FrameReader(max_packet_size=config.max_packet_size)
        self.state = State.AWAITING_CONNECT
        self._legal = lifecycle.LEGAL[self.state]
        self.version = MQTT_3_1_1
        self.session: Any = None
        self.client: Client | None = None
        self.will: Message | None = None
        self.paused = False
        self.send_quota = config.max_inflight_messages
        self.peer = "?"
        self._blocked: Deferred[Any] | None = None
        self._graceful = False
        self._last_seen = 0.0
        self._keep_alive = 0.0
        self._keepalive_call: Any = None
        self._connect_call: Any = None
        self._handlers: dict[type, Callable[[Any], None]] = {
            Connect: self._on_connect,
            Publish: self._on_publish,
            Puback: self._on_puback,
            Pubrec: self._on_pubrec,
            Pubrel: self._on_pubrel,
            Pubcomp: self._on_pubcomp,
            Subscribe: self._on_subscribe,
            Unsubscribe: self._on_unsubscribe,
            Pingreq: self._on_pingreq,
            Disconnect: self._on_disconnect,
            Auth: self._on_auth,
        }

    # --- transport events ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.broker.connections.add(self)
        self.broker.stats.connections_total += 1
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", None)
        self.peer = f"{host}:{getattr(peer, 'port', '')}" if host is not None else str(peer)
        if self.broker.config.set_tcp_nodelay:
            try:
                self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
            except (AttributeError, OSError):
                pass  # not a TCP transport (unix socket, in-memory)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._last_seen = self.clock.seconds()
        self._connect_call = self.clock.callLater(self.broker.config.connect_timeout, self._connect_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        if self._keep_alive:
            self._last_seen = self.clock.seconds()
        self.reader.receive_data(data)
        if self._blocked is None:
            self._process()

    def _process(self) -> None:
        reader = self.reader
        handlers = self._handlers
        try:
            while self._blocked is None:
                packet = reader.next_packet()
                if packet is None:
                    return
                if type(packet) not in self._legal:
                    if self.state is State.CLOSED:
                        return
                    lifecycle.check(self.state, packet, self.version)
                handlers[type(packet)](packet)
        except MQTTError as error:
            self._violation(error)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for call in (self._keepalive_call, self._connect_call):
            if call is not None and call.active():
                call.cancel()
        self._set_state(State.CLOSED)
        self.broker.detach(self, self._graceful)
        self.broker.connections.discard(self)

    # IPushProducer: the transport tells us when its buffer is full and when it drained.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.session is not None:
            self.broker.pump(self.session)

    def stopProducing(self) -> None:
        self.paused = True

    # --- ending a connection ------------------------------------------------------------

    def drop(self, reason: ReasonCode, message: str, abort: bool = False) -> None:
        """Close the connection; an MQTT 5 client is told why with a DISCONNECT first."""
        if self.state is State.CLOSED:
            return
        if self.state is State.CONNECTED and self.version == MQTT_5 and reason >= 0x80:
            self.send(Disconnect(reason_code=reason, properties={"reason_string": message}))
        log.info("closing connection {client_id} from {peer}: {reason}",
                 client_id=self.client.client_id if self.client else "-", peer=self.peer, reason=message)
        self._set_state(State.CLOSED)
        self.broker.detach(self, self._graceful)
        if abort:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _violation(self, error: MQTTError) -> None:
        if isinstance(error, UnsupportedProtocolVersion) and self.state is State.AWAITING_CONNECT:
            # [MQTT-3.1.2-2]: answer in the 3.1.1 format, which every version can read.
            self.transport.write(encode(Connack(reason_code=1), MQTT_3_1_1))  # type: ignore[union-attr]
        self.drop(error.reason_code, error.message)

    def _connect_timed_out(self) -> None:
        self._connect_call = None
        if self.state is State.AWAITING_CONNECT:
            self.drop(ReasonCode.MAXIMUM_CONNECT_TIME, "no CONNECT within the connect timeout", abort=True)

    def _check_keepalive(self) -> None:
        idle = self.clock.seconds() - self._last_seen
        limit = self._keep_alive * 1.5  # [MQTT-3.1.2-24]
        if idle >= limit:
            self._keepalive_call = None
            self.drop(ReasonCode.KEEP_ALIVE_TIMEOUT, f"keepalive timeout ({idle:.1f}s idle)", abort=True)
        else:
            self._keepalive_call = self.clock.callLater(limit - idle, self._check_keepalive)

    def _set_state(self, state: State) -> None:
        self.state = state
        self._legal = lifecycle.LEGAL[state]

    # --- waiting for hooks without reordering a client's packets -------------------------

    def _when(self, decision: Deferred[Any], then: Callable[..., None], *args: Any) -> None:
        """Run ``then(result, *args)`` when a hook decides; until then, read nothing more from
        this client, so its packets are handled in the order they came."""
        done = False

        def run(result: Any) -> None:
            nonlocal done
            done = True
            if self.state is not State.CLOSED:
                then(result, *args)

        decision.addCallback(run).addErrback(self._after_failure)
        if not done:
            self._blocked = decision
            self.transport.pauseProducing()  # type: ignore[union-attr]
            decision.addBoth(self._unblock)

    def _unblock(self, _: Any) -> None:
        self._blocked = None
        if self.state is not State.CLOSED:
            self.transport.resumeProducing()  # type: ignore[union-attr]
            self._process()

    def _after_failure(self, failure: Failure) -> None:
        if failure.check(MQTTError):
            self._violation(failure.value)  # type: ignore[arg-type]
        else:
            log.failure("error handling a packet from {peer}", failure, peer=self.peer)
            self.drop(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "internal error")

    # --- sending ------------------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        self.transport.write(encode(packet, self.version))  # type: ignore[union-attr]

    def send_publish(self, message: Message, qos: int, retain: bool, packet_id: int, dup: bool = False) -> None:
        """Write a PUBLISH, reusing the bytes encoded for the same kind of receiver."""
        cache = message.encoded
        if cache is None:
            cache = message.encoded = {}
        key = (self.version, qos, retain)
        entry = cache.get(key)
        if entry is None:
            properties = message.properties if self.version == MQTT_5 else NO_PROPERTIES
            entry = cache[key] = publish_template(
                message.topic, message.payload, qos, retain, properties, self.version, 1 if qos else 0)
        data, offset = entry
        if qos:
            patched = bytearray(data)
            patched[offset] = packet_id >> 8
            patched[offset + 1] = packet_id & 0xFF
            if dup:
                patched[0] |= 0x08
            self.transport.write(bytes(patched))  # type: ignore[union-attr]
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def send_pubrel(self, packet_id: int) -> None:
        self.send(Pubrel(packet_id=packet_id))

    # --- CONNECT ------------------------------------------------------------------------

    def _on_connect(self, packet: Connect) -> None:
        self._set_state(State.CONNECTING)
        if self._connect_call is not None and self._connect_call.active():
            self._connect_call.cancel()
        self._connect_call = None
        self.version = packet.protocol_level
        reason, client_id = self.broker.check_connect(packet)
        self.client = Client(client_id=client_id, username=packet.username, peer=self.peer,
                             protocol_version=self.version, clean_start=packet.clean_start,
                             keep_alive=packet.keep_alive)
        config = self.broker.config
        will = packet.will
        if not reason and will is not None:
            if not valid_topic_name(will.topic):
                reason = ReasonCode.TOPIC_NAME_INVALID
            elif will.qos > config.max_qos:
                reason = ReasonCode.QOS_NOT_SUPPORTED
            elif will.retain and not config.retain_available:
                reason = ReasonCode.RETAIN_NOT_SUPPORTED
        if reason:
            self._refuse(reason, "CONNECT refused")
        elif self.broker.hooks.has_connect:
            self._when(self.broker.hooks.decide("connect", self.client), self._connect_decided, packet)
        else:
            self._accept(packet)

    def _connect_decided(self, answer: Any, packet: Connect) -> None:
        if isinstance(answer, Refused):
            self._refuse(answer.reason_code, "refused by a connect hook")
        else:
            self._accept(packet)

    def _refuse(self, reason: ReasonCode, why: str) -> None:
        code = reason if self.version == MQTT_5 else v3_connack_code(reason)
        self.send(Connack(reason_code=code))  # [MQTT-3.2.2-5]: then close
        self.drop(reason, f"{why}: {reason.name}")

    def _accept(self, packet: Connect) -> None:
        broker = self.broker
        client = self.client
        assert client is not None
        existing = broker.sessions.get(client.client_id)
        present = existing is not None and existing.persistent and not packet.clean_start
        session = broker.attach(self, client.client_id, packet.clean_start)
        self.session = session
        self._set_state(State.CONNECTED)
        if packet.will is not None:
            will = packet.will
            self.will = Message(topic=will.topic, payload=will.payload, qos=will.qos, retain=will.retain,
                                properties=will.properties, sender=client.client_id)
        properties: dict[str, Any] = {}
        if self.version == MQTT_5:
            properties = self._connack_properties(packet)
        self.send(Connack(session_present=present and self.version != MQTT_3_1, properties=properties))
        if packet.keep_alive:
            self._keep_alive = float(properties.get("server_keep_alive", packet.keep_alive))
            self._last_seen = self.clock.seconds()
            self._keepalive_call = self.clock.callLater(self._keep_alive * 1.5, self._check_keepalive)
        broker.resume(session)

    def _connack_properties(self, packet: Connect) -> dict[str, Any]:
        config = self.broker.config
        assert self.client is not None
        props: dict[str, Any] = {
            "receive_maximum": config.max_inflight_messages,
            "maximum_packet_size": config.max_packet_size,
            "topic_alias_maximum": 0,
        }
        if config.max_qos < 2:
            props["maximum_qos"] = config.max_qos
        if not config.retain_available:
            props["retain_available"] = 0
        if packet.client_id != self.client.client_id:
            props["assigned_client_identifier"] = self.client.client_id
        if packet.keep_alive > config.max_keepalive:
            props["server_keep_alive"] = config.max_keepalive
        self.send_quota = min(config.max_inflight_messages, packet.properties.get("receive_maximum", 65535))
        return props

    # --- PUBLISH in ---------------------------------------------------------------------

    def _on_publish(self, packet: Publish) -> None:
        topic = packet.topic
        if not topic or "+" in topic or "#" in topic:
            raise MQTTError(f"invalid topic name {topic!r}", ReasonCode.TOPIC_NAME_INVALID)
        config = self.broker.config
        qos = packet.qos
        if qos > config.max_qos:
            raise MQTTError(f"QoS {qos} is above the maximum {config.max_qos}", ReasonCode.QOS_NOT_SUPPORTED)
        if packet.retain and not config.retain_available:
            raise MQTTError("retained messages are not supported", ReasonCode.RETAIN_NOT_SUPPORTED)
        if qos == 2 and packet.packet_id in self.session.awaiting_pubrel:
            self.send(Pubrec(packet_id=packet.packet_id))  # a resend: not routed again [MQTT-4.3.3-9]
            return
        properties = packet.properties
        if properties and any(name in properties for name in _NOT_FORWARDED):
            properties = {k: v for k, v in properties.items() if k not in _NOT_FORWARDED}
        message = Message(topic=topic, payload=packet.payload, qos=qos, retain=packet.retain,
                          properties=properties, sender=self.client.client_id)  # type: ignore[union-attr]
        if self.broker.hooks.has_publish:
            self._when(self.broker.hooks.decide("publish", self.client, message),
                       self._publish_decided, packet, message)
            return
        self.broker.route(message)
        if qos:
            self._acknowledge(packet, ReasonCode.SUCCESS)

    def _publish_decided(self, answer: Any, packet: Publish, message: Message) -> None:
        if isinstance(answer, Refused):
            reason = ReasonCode.NOT_AUTHORIZED if answer.reason_code == ReasonCode.UNSPECIFIED_ERROR \
                else answer.reason_code
        else:
            self.broker.route(answer if isinstance(answer, Message) else message)
            reason = ReasonCode.SUCCESS
        if packet.qos:
            self._acknowledge(packet, reason)

    def _acknowledge(self, packet: Publish, reason: ReasonCode) -> None:
        code = reason if self.version == MQTT_5 else 0
        if packet.qos == 1:
            self.send(Puback(packet_id=packet.packet_id, reason_code=code))
        else:
            if reason < 0x80:
                self.session.awaiting_pubrel.add(packet.packet_id)
            self.send(Pubrec(packet_id=packet.packet_id, reason_code=code))

    # --- acknowledgements of what we sent -------------------------------------------------

    def _on_puback(self, packet: Puback) -> None:
        out = self.session.outgoing.get(packet.packet_id)
        if out is not None and out.qos == 1:
            self.broker.acknowledged(self.session, packet.packet_id)

    def _on_pubrec(self, packet: Pubrec) -> None:
        out = self.session.outgoing.get(packet.packet_id)
        if out is None or out.qos != 2:
            code = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version == MQTT_5 else 0
            self.send(Pubrel(packet_id=packet.packet_id, reason_code=code))
            return
        if packet.reason_code >= 0x80:  # MQTT 5: the receiver refused it; the exchange ends here
            self.broker.acknowledged(self.session, packet.packet_id)
            return
        out.released = True
        self.send_pubrel(packet.packet_id)

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        out = self.session.outgoing.get(packet.packet_id)
        if out is not None and out.released:
            self.broker.acknowledged(self.session, packet.packet_id)

    def _on_pubrel(self, packet: Pubrel) -> None:
        awaiting = self.session.awaiting_pubrel
        if packet.packet_id in awaiting:
            awaiting.discard(packet.packet_id)
            self.send(Pubcomp(packet_id=packet.packet_id))
        else:
            code = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version == MQTT_5 else 0
            self.send(Pubcomp(packet_id=packet.packet_id, reason_code=code))

    # --- SUBSCRIBE / UNSUBSCRIBE ----------------------------------------------------------

    def _on_subscribe(self, packet: Subscribe) -> None:
        config = self.broker.config
        client_id = self.client.client_id  # type: ignore[union-attr]
        subscription_id = packet.properties.get("subscription_identifier")
        if isinstance(subscription_id, list):
            subscription_id = subscription_id[0]
        wanted: list[Subscription | ReasonCode] = []
        for request in packet.subscriptions:
            topic_filter = request.topic_filter
            if not valid_topic_filter(topic_filter):
                wanted.append(ReasonCode.TOPIC_FILTER_INVALID)
                continue
            group, _ = split_shared(topic_filter)
            if group is not None and request.no_local and self.version == MQTT_5:
                raise ProtocolError("No Local on a shared subscription")  # [MQTT-3.8.3-4]
            wanted.append(Subscription(
                client_id=client_id, topic_filter=topic_filter, qos=min(request.qos, config.max_qos),
                no_local=request.no_local, retain_as_published=request.retain_as_published,
                retain_handling=request.retain_handling, subscription_id=subscription_id,
                share_group=group))
        hooks = self.broker.hooks
        if hooks.has_subscribe:
            decisions = [hooks.decide("subscribe", self.client, w) if isinstance(w, Subscription) else w
                         for w in wanted]
            self._when(gatherResults([d if isinstance(d, Deferred) else _now(d) for d in decisions]),
                       self._subscribe_decided, packet, wanted)
        else:
            self._subscribe_decided([None] * len(wanted), packet, wanted)

    def _subscribe_decided(self, answers: list[Any], packet: Subscribe,
                           wanted: list[Subscription | ReasonCode]) -> None:
        granted: list[Subscription] = []
        codes: list[int] = []
        for subscription, answer in zip(wanted, answers):
            if not isinstance(subscription, Subscription):
                codes.append(subscription)
                continue
            if isinstance(answer, Refused):
                codes.append(ReasonCode.NOT_AUTHORIZED)
                continue
            if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer <= 2:
                subscription.qos = min(subscription.qos, answer)
            granted.append(subscription)
            codes.append(subscription.qos)
        if self.version != MQTT_5:
            codes = [code if code < 0x80 else 0x80 for code in codes]  # 3.x knows only 0x80
        self.send(Suback(packet_id=packet.packet_id, reason_codes=tuple(codes)))
        for subscription in granted:  # after the SUBACK, so retained messages follow it
            self.broker.subscribe(self.session, subscription)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        hooks = self.broker.hooks
        if hooks.has_unsubscribe:
            decisions = [hooks.decide("unsubscribe", self.client, f) for f in packet.topic_filters]
            self._when(gatherResults(decisions), self._unsubscribe_decided, packet)
        else:
            self._unsubscribe_decided([None] * len(packet.topic_filters), packet)

    def _unsubscribe_decided(self, answers: list[Any], packet: Unsubscribe) -> None:
        codes = []
        for topic_filter, answer in zip(packet.topic_filters, answers):
            if isinstance(answer, Refused):
                codes.append(ReasonCode.NOT_AUTHORIZED)
            elif self.broker.unsubscribe(self.session, topic_filter):
                codes.append(ReasonCode.SUCCESS)
            else:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
        self.send(Unsuback(packet_id=packet.packet_id, reason_codes=tuple(codes)))

    # --- the rest -----------------------------------------------------------------------

    def _on_pingreq(self, packet: Pingreq) -> None:
        if self.broker.hooks.has_ping:
            self._when(self.broker.hooks.decide("ping", self.client), self._ping_decided)
        else:
            self.transport.write(_PINGRESP)  # type: ignore[union-attr]

    def _ping_decided(self, answer: Any) -> None:
        if not isinstance(answer, Refused):
            self.transport.write(_PINGRESP)  # type: ignore[union-attr]

    def _on_disconnect(self, packet: Disconnect) -> None:
        # Only a normal disconnection discards the will [MQTT-3.14.4-3]; MQTT 5's 0x04 and
        # error codes still publish it.
        self._graceful = packet.reason_code == ReasonCode.SUCCESS
        self.drop(ReasonCode.SUCCESS, f"client disconnected (0x{packet.reason_code:02x})")

    def _on_auth(self, packet: Auth) -> None:
        # No authentication method is offered, so an AUTH is a protocol error [MQTT-4.12.0-1].
        raise ProtocolError("AUTH without an authentication method")


def _now(value: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


class MQTTFactory(Factory):
    """Builds an MQTTProtocol per connection, up to ``max_connections``."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    def buildProtocol(self, addr: IAddress) -> MQTTProtocol | None:  # type: ignore[override]
        limit = self.broker.config.max_connections
        if limit >= 0 and len(self.broker.connections) >= limit:
            self.broker.stats.connections_refused += 1
            log.warn("refusing a connection from {addr}: max_connections ({limit}) reached", addr=addr, limit=limit)
            return None
        return MQTTProtocol(self.broker, self.broker.clock)


__all__ = ["MQTTProtocol", "MQTTFactory", "MQTT_3_1", "MQTT_3_1_1", "MQTT_5"]

"""PUBLISH in, and the acknowledgements of QoS 1 and 2 both ways: a client's PUBLISH checked
and routed (the hot path in), acknowledged once it is stored; the client's PUBACK, PUBREC,
PUBREL and PUBCOMP handed to the broker's delivery.

:class:`Publishing` is a trait of :class:`~mqtt_broker.protocol.MQTTProtocol`; ``_HANDLERS``
there dispatches to these handlers like to its own (PUBLISH is called directly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from mypy_extensions import trait
from twisted.logger import Logger
from twisted.python.failure import Failure

from .aliases import InboundAliases
from .connecting import NO_SLOTS
from .hooks import PUBACK_REFUSALS, Refused, own_properties
from .lifecycle import State
from .logged import shortened
from .message import Client, Message, bare, encoding_kind, is_utf8, mistyped, unsendable
from .stats import once_per_thousand
from .store import StoreError
from .topics import MAX_TOPIC_LEVELS, reserved, too_deep
from .wire import (
    MQTT_5, NO_PROPERTIES, MQTTError, Packet, Properties, ProtocolError, Puback, Pubcomp, Pubrec, Pubrel, ReasonCode,
)
from .wire.properties import sendable

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from .auth import Identity
    from .delivery import Delivery

log = Logger(__name__)  # compiled, Logger() would not find the module from the stack


@trait
class Publishing:
    """The PUBLISH, PUBACK, PUBREC, PUBREL and PUBCOMP handlers of MQTTProtocol. The attributes
    declared here are the connection's state that they use, which lives in ``MQTTProtocol``'s
    slots and is set up by its ``__init__``. A trait of MQTTProtocol only."""

    __slots__ = NO_SLOTS

    broker: Any
    delivery: Delivery
    clock: IReactorTime
    stats: Any
    state: State
    version: int
    client: Client | None
    identity: Identity | None
    session: Any
    problem_information: bool
    _client_id: str
    _aliases_in: InboundAliases | None
    _acks: _Acks | None
    _pubacks_waiting: int
    _inherited_pubrels: set[int] | None

    # MQTTProtocol's methods that these use (see Connecting)
    def _when(self, decision: Any, then: Callable[..., None], *args: Any) -> None: ...
    def send(self, packet: Packet) -> None: ...
    def send_ack(self, first: int, packet_id: int) -> None: ...
    def send_pubrel(self, packet_id: int, again: bool = False) -> None: ...
    def wait_for_store(self, exact: bool = False) -> None: ...
    def unless_written(self, then: Callable[[], object]) -> None: ...

    # --- PUBLISH in ---------------------------------------------------------------------

    def _on_publish(self, packet: Message) -> None:
        """A PUBLISH, decoded by the reader into the Message that is routed (one object)."""
        topic = packet.topic
        properties = packet.properties
        qos = packet.qos
        if properties:  # MQTT 5 only
            if "subscription_identifier" in properties:
                raise ProtocolError("PUBLISH from a client with a subscription identifier")  # [MQTT-3.3.4-6]
            alias = properties.get("topic_alias")
            if alias is not None:
                aliases = self._aliases_in
                if aliases is None:  # made on first use: most clients never set an alias
                    aliases = self._aliases_in = InboundAliases(self.broker.config.max_topic_alias)
                topic = packet.topic = aliases.resolve(topic, alias)
                packet.properties = {k: v for k, v in properties.items() if k != "topic_alias"}
        if not topic:  # (MQTT 5: with no Topic Alias either)
            raise ProtocolError("PUBLISH with an empty topic name")  # [MQTT-4.7.3-1], 3.3.2.1
        if "+" in topic or "#" in topic:
            raise MQTTError(f"invalid topic name {topic!r}", ReasonCode.TOPIC_NAME_INVALID)  # [MQTT-3.3.2-2]
        if len(topic) >= MAX_TOPIC_LEVELS and too_deep(topic):
            raise MQTTError(f"a topic name of more than {MAX_TOPIC_LEVELS} levels", ReasonCode.TOPIC_NAME_INVALID)
        broker = self.broker
        config = broker.config
        if qos > config.max_qos:
            raise MQTTError(f"QoS {qos} is above the maximum {config.max_qos}", ReasonCode.QOS_NOT_SUPPORTED)
        if packet.retain and not config.retain_available:
            raise MQTTError("retained messages are not supported", ReasonCode.RETAIN_NOT_SUPPORTED)
        packet_id = packet.packet_id
        if qos == 2 and packet_id in self.session.awaiting_pubrel:
            # A resend: not routed again [MQTT-4.3.3-9], and acknowledged as accepted (0x00, where
            # the first PUBREC may have said 0x10, no subscribers: both successes), whatever the
            # rules say now (refused, its packet id would stay taken here and be free for the client).
            self._acknowledge_when_stored(qos, packet_id, ReasonCode.SUCCESS)
            return
        security = broker.security
        identity = self.identity  # (None: connected before an auth hook's rules had checks made)
        if (topic[0] == "$" and reserved(topic)) or (  # (the call only for "$" topics: this is per message)
                security is not None and identity is not None and not security.can_publish(identity, topic)):
            # Not routed; MQTT 3 cannot be told and is acknowledged, as Mosquitto does.
            # Counted for the broker, not per client: a client flooding denials hides the first of
            # another's, where a count per client would keep an entry for every client id.
            stats = broker.stats
            stats.publishes_denied += 1
            if once_per_thousand(stats.publishes_denied):
                log.info("denied PUBLISH to {topic!r} from {client_id!r} ({count} denied in all; logged once per "
                         "thousand)", topic=shortened(topic),
                         client_id=shortened(self.client.client_id),  # type: ignore[union-attr]
                         count=stats.publishes_denied)
            if qos:
                self._refuse_publish(qos, packet.packet_id, ReasonCode.NOT_AUTHORIZED)
            return
        if qos and self.version == MQTT_5:
            # QoS 1 PUBLISHes count until their PUBACK goes, QoS 2 ones until their PUBREL comes.
            waiting = self._pubacks_waiting
            awaiting = self.session.awaiting_pubrel
            if waiting + len(awaiting) >= config.max_inflight_messages and (
                    self._inherited_pubrels is None
                    or waiting + len(awaiting - self._inherited_pubrels) >= config.max_inflight_messages):
                raise MQTTError("more unacknowledged QoS 1 and 2 PUBLISHes than Receive Maximum",
                                ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)  # [MQTT-3.3.4-7]
        if properties and properties.get("payload_format_indicator") == 1 and not is_utf8(packet.payload):
            if not qos:
                raise MQTTError("payload is not UTF-8 as its format indicator says", ReasonCode.PAYLOAD_FORMAT_INVALID)
            self._refuse_publish(qos, packet_id, ReasonCode.PAYLOAD_FORMAT_INVALID)
            return
        message = packet
        message.sender = self._client_id
        frame = packet.frame
        if frame is not None:
            message.frame = None  # kept only as the forwarded bytes below, not a second time
            if not properties:
                # Forward the bytes as received: only the retain and DUP flags are not passed on.
                if frame[0] & 0x09:
                    frame = bytes((frame[0] & 0xF6,)) + frame[1:]
                v5 = self.version == MQTT_5
                offset = len(frame) - len(packet.payload) - 2 - v5  # v5: one byte of empty properties
                message.encoded = {encoding_kind(v5, qos, False): (frame, offset)}
        if broker.hooks.has_publish:
            own_properties(message)  # (now, not by the hook: as_received holds the dict the hook has)
            # The acknowledgement goes by the PUBLISH as received, whatever the hook makes of it.
            # (Before a hook may change it; its time counts against the expiry [MQTT-3.3.2-6].)
            as_received = (message.topic, message.payload, message.properties, qos, message.retain, self.clock.seconds())
            self._when(broker.hooks.resolve("publish", self.client, message), self._publish_decided,
                       qos, packet_id, message, as_received)
            return
        if qos == 2:
            self._route_exactly_once(packet_id, message)
            return
        routed = self.delivery.route(message)
        if qos:
            self._routed(qos, packet_id, message, routed)

    def _publish_decided(self, answer: Any, qos: int, packet_id: int, message: Message,
                         as_received: tuple[str, bytes, Properties, int, bool, float]) -> None:
        if isinstance(answer, Refused):
            if qos:
                self._refuse_publish(qos, packet_id, answer.code(ReasonCode.NOT_AUTHORIZED, PUBACK_REFUSALS),
                                    answer.reason_string)
            return
        # A Message of the hook's own is routed as a copy: the hook may answer with it again.
        made = (answer if answer is message else bare(answer)) if isinstance(answer, Message) else None
        topic, payload, properties, qos_received, retain_received, received_at = as_received
        # (A QoS of 1.0 or True, a retain or DUP flag of 1, a field of another type, is a change
        # too, which the check below refuses or makes an int, as the compiled Message does at once;
        # so is an expiry time, which a client's PUBLISH gets only below.)
        wrong_type = mistyped(message)  # (refused below, as the compiled Message refuses it when it is set)
        changed = (message.topic is not topic or message.payload is not payload or message.properties is not properties
                   or message.qos != qos_received or message.retain != retain_received
                   or type(message.qos) is not int or type(message.retain) is not bool or type(message.dup) is not bool
                   or message.expires_at is not None or wrong_type is not None)
        if changed or message.properties:  # (its dict may have been changed in place)
            if wrong_type is None:  # (an ``encoded`` of another type is to be refused, not cleared)
                message.encoded = None  # not the bytes it came as, perhaps
            made = made or message
        else:
            message.properties = NO_PROPERTIES  # (shared again: queued, it holds no dict of its own)
        if made is not None:  # what a hook made or changed is checked as a client's PUBLISH was decoded
            problem = unsendable(made, self.clock.seconds())
            if problem is not None:
                log.error("a publish hook made a message of {client_id!r} one that cannot be sent "
                          "({problem}); refusing", client_id=shortened(self._client_id), problem=problem)
                if qos:
                    self._refuse_publish(qos, packet_id, ReasonCode.UNSPECIFIED_ERROR)
                return
            message = made
            message.sender = self._client_id  # (a new Message has none): still this client's PUBLISH
        interval = message.properties.get("message_expiry_interval") if message.properties else None
        if interval is not None:
            if message.expires_at is None:
                message.expires_at = received_at + interval
            else:  # the hook's own time [docs/embedding.md]: subscribers are told what is left of it
                message.properties = {k: v for k, v in message.properties.items() if k != "message_expiry_interval"}
        # Run out while the hook decided (or by the hook's time), it goes nowhere. (Less a
        # millisecond: a real clock moves on even for a hook that answers at once, and an
        # interval of 0 is sent on now.)
        if message.expires_at is not None and message.expires_at < self.clock.seconds() - 0.001:
            self.stats.messages_expired += 1
            if message.retain and self.broker.config.retain_available:
                self.broker.delete_retained(message.topic)  # it replaced it [MQTT-3.3.1-5], and expired
            if qos == 2:
                self.delivery.await_pubrel(self.session, packet_id)  # (its PUBREL is to come)
            if qos:  # (not counted as received: it was not routed)
                self._acknowledge_when_stored(qos, packet_id, ReasonCode.NO_MATCHING_SUBSCRIBERS)
            return
        if qos == 2:
            self._route_exactly_once(packet_id, message)
            return
        routed = self.delivery.route(message)
        if qos:
            self._routed(qos, packet_id, message, routed)

    def _route_exactly_once(self, packet_id: int, message: Message) -> None:
        """Route a QoS 2 PUBLISH. Its packet id is recorded first, and when the store keeps it,
        nothing of the routing reaches a client before the id is stored: after a crash, the
        publisher's resend is then either routed for the first time or known as a resend
        [MQTT-4.3.3-9], never routed twice. In a cluster, the routing is written with the id,
        fenced by the session's epoch (see ``Delivery.through_inboxes``): the session may be claimed
        by another node before Redis has the id, and its publisher send the message again there."""
        delivery = self.delivery
        if delivery.await_pubrel(self.session, packet_id):
            if delivery.forwarding is not None:
                delivery.through_inboxes = True
                delivery.fenced_by = self._client_id
            else:
                delivery.routing_waits_for_store = True
            try:
                routed = delivery.route(message)
            finally:
                delivery.routing_waits_for_store = delivery.through_inboxes = False
                delivery.fenced_by = None
        else:
            routed = delivery.route(message)
        self._routed(2, packet_id, message, routed)

    def _routed(self, qos: int, packet_id: int, message: Message, routed: int) -> None:
        """A QoS 1/2 PUBLISH was routed: acknowledge it once the store has it (at once without
        a store). A subscriber here that could not take it makes it 0x97 for MQTT 5 (MQTT 3 has
        no way to say so: it is acknowledged, and the drop counted and logged); one reached
        through an inbox is not known of yet."""
        self.stats.received_by_qos[qos] += 1
        if message.refused:
            reason = ReasonCode.QUOTA_EXCEEDED  # (a PUBREC that frees the packet id: see _acknowledge)
        else:
            reason = ReasonCode.SUCCESS if routed else ReasonCode.NO_MATCHING_SUBSCRIBERS
        self._acknowledge_when_stored(qos, packet_id, reason)

    def _refuse_publish(self, qos: int, packet_id: int, reason: ReasonCode, reason_string: str | None = None) -> None:
        """Acknowledge a PUBLISH that is not routed, in its turn: after the acknowledgements of
        earlier PUBLISHes still waiting for the store [MQTT-4.6.0-2, -3]."""
        acks = self._acks
        if acks is None:
            self._acknowledge(qos, packet_id, reason, reason_string)
            return
        acks.entries.append((qos, packet_id, reason, reason_string, True))
        if qos == 1:
            self._pubacks_waiting += 1

    def _acknowledge_when_stored(self, qos: int, packet_id: int, reason: ReasonCode) -> None:
        """Acknowledge once everything recorded so far is stored; through the store even when
        nothing new was recorded, so that acknowledgements keep the order of the PUBLISHes
        [MQTT-4.6.0-2, -3]. The acknowledgements asked for while the store's ``generation``
        keeps one value wait together, for one ``flushed()``."""
        store = self.broker.store
        if store is None:
            self._acknowledge(qos, packet_id, reason)
            return
        if qos == 1:
            self._pubacks_waiting += 1
        acks = self._acks
        if acks is not None and acks.generation == store.generation:
            acks.entries.append((qos, packet_id, reason, None, False))
            return
        acks = self._acks = _Acks(store.generation, (qos, packet_id, reason, None, False))
        store.flushed().addCallbacks(self._durable, self._not_durable, (acks,), None, (acks,))

    def _durable(self, _: None, acks: _Acks) -> None:
        if self._acks is acks:
            self._acks = None
        connected = self.state is State.CONNECTED
        for qos, packet_id, reason, reason_string, _refused in acks.entries:
            if qos == 1:
                self._pubacks_waiting -= 1
            if connected:
                self._acknowledge(qos, packet_id, reason, reason_string, committed=True)

    def _not_durable(self, failure: Failure, acks: _Acks) -> None:
        """The store could not write: no acknowledgement. MQTT 5 is told (0x80); an MQTT 3
        client gets none and sends the message again when it reconnects."""
        if self._acks is acks:
            self._acks = None
        failure.trap(StoreError)
        for qos, packet_id, reason, reason_string, refused in acks.entries:
            if qos == 1:
                self._pubacks_waiting -= 1
            if refused:  # not routed: nothing of it to store
                if self.state is State.CONNECTED:
                    self._acknowledge(qos, packet_id, reason, reason_string)
                continue
            # MQTT 5's PUBREC 0x80 ends the exchange and frees the packet id (see _acknowledge);
            # an MQTT 3 client will send the PUBLISH again, which must not be routed a second time.
            if self.state is State.CONNECTED and self.version == MQTT_5:
                self._acknowledge(qos, packet_id, ReasonCode.UNSPECIFIED_ERROR, "the broker cannot store the message")

    def _acknowledge(self, qos: int, packet_id: int, reason: ReasonCode, reason_string: str | None = None,
                     committed: bool = False) -> None:
        """PUBACK (QoS 1) or PUBREC (QoS 2) for a PUBLISH received; ``committed``: the store
        has written what routing it recorded (its packet id, awaiting PUBREL)."""
        if not reason or self.version != MQTT_5:  # the common case, without building a packet
            self.send_ack(0x40 if qos == 1 else 0x50, packet_id)
            return
        properties: dict[str, Any] = {}
        if reason_string and self.problem_information:
            properties["reason_string"] = sendable(reason_string)
        if qos == 1:
            self.send(Puback(packet_id=packet_id, reason_code=reason, properties=properties))
            return
        session = self.session
        delivery = self.delivery
        if reason >= 0x80 and session is not None and delivery.pubrel_received(session, packet_id):
            # It ends the exchange: no PUBREL follows, and the client may use the packet id
            # again at once [MQTT-4.3.3-9]. A restart must not take that new message for a
            # resend: the PUBREC goes once the store has forgotten the id it had. A client that
            # never has the PUBREC sends the PUBLISH again (DUP) when it reconnects, which is
            # not to be routed twice: if the connection ends before the PUBREC went, the id is
            # awaited again.
            if committed and session.stored:
                self.wait_for_store(exact=True)
            self.unless_written(lambda: delivery.await_pubrel(session, packet_id))
        self.send(Pubrec(packet_id=packet_id, reason_code=reason, properties=properties))

    # --- acknowledgements of what we sent -------------------------------------------------

    def _on_puback(self, packet: Puback) -> None:
        out = self.session.outgoing.get(packet.packet_id)
        if out is not None and out.qos == 1:
            self.delivery.acknowledged(self.session, packet.packet_id)

    def _on_pubrec(self, packet: Pubrec) -> None:
        out = self.session.outgoing.get(packet.packet_id)
        if out is None or out.qos != 2:
            # Perhaps completed already, and its removal not yet stored: the PUBREL ends the
            # exchange for the client, so after a crash the PUBLISH must not come again.
            if self.session.stored:
                self.wait_for_store(exact=True)
            code = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version == MQTT_5 else 0
            self.send(Pubrel(packet_id=packet.packet_id, reason_code=code))
            return
        if packet.reason_code >= 0x80:  # MQTT 5: the receiver refused it; the exchange ends here
            self.delivery.acknowledged(self.session, packet.packet_id)
            return
        if self.delivery.released(self.session, packet.packet_id):
            # PUBREL only once the store knows: after a crash the broker must not send the
            # PUBLISH again [MQTT-4.3.3-5].
            self.wait_for_store(exact=True)
        self.send_pubrel(packet.packet_id)

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        out = self.session.outgoing.get(packet.packet_id)
        if out is not None and out.released:
            self.delivery.acknowledged(self.session, packet.packet_id)

    def _on_pubrel(self, packet: Pubrel) -> None:
        known = self.delivery.pubrel_received(self.session, packet.packet_id)
        if self._inherited_pubrels is not None:
            self._inherited_pubrels.discard(packet.packet_id)  # (its id may come again: this connection's then)
        if self.session.stored:
            # PUBCOMP only once the id is forgotten in the store too (also for an id already
            # forgotten, perhaps not yet in the store): the publisher may use it again at once,
            # and a restart must not take that message for a resend.
            self.wait_for_store(exact=True)
        if known:
            self.send_ack(0x70, packet.packet_id)
        else:
            code = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version == MQTT_5 else 0
            self.send(Pubcomp(packet_id=packet.packet_id, reason_code=code))


class _Acks:
    """Acknowledgements of PUBLISHes (QoS, packet id, reason code, reason string, refused: not
    routed) that wait for one batch of the store, in the order the PUBLISHes came."""

    __slots__ = ("generation", "entries")

    def __init__(self, generation: int, first: tuple[int, int, ReasonCode, str | None, bool]) -> None:
        self.generation = generation
        """The store's ``generation`` when they started waiting."""
        self.entries = [first]

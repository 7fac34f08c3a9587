"""What a CONNECT asks for against what the broker allows: the terms of one connection.

Pure logic, no transport: ``negotiate(config, connect)`` returns the reason code (0 to accept),
the client id to use, the timers and limits both ways, and the CONNACK properties.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from .config import BrokerConfig
from .message import is_utf8
from .topics import valid_topic_name
from .wire.codec import MAX_PACKET_SIZE, MAX_REMAINING_LENGTH, encode_connack
from .wire.codes import ReasonCode
from .wire.packets import MQTT_3_1, MQTT_5, NO_PROPERTIES, Connect, Properties

NEVER = 0xFFFFFFFF
"""A session expiry interval that means the session never expires."""


def granted_expiry(requested: int, config: BrokerConfig) -> int:
    """The session expiry interval a session gets: at most max_session_expiry_interval, and
    persistent_client_expiration (when set) for one that would never expire, as in Mosquitto."""
    expiry = min(requested, config.max_session_expiry_interval)
    return (config.persistent_client_expiration or NEVER) if expiry == NEVER else expiry


@dataclass(slots=True)
class Terms:
    reason: ReasonCode
    client_id: str
    keep_alive: int
    session_expiry: int
    """Seconds the session outlives the connection: 0 ends it with the connection, NEVER never."""
    send_quota: int
    """QoS 1/2 messages we may have unacknowledged at the client (its Receive Maximum)."""
    max_send_size: int
    """Largest packet the client accepts (its Maximum Packet Size)."""
    alias_maximum: int
    """Topic aliases the client accepts from us."""
    problem_information: bool = True
    connack_properties: Properties = NO_PROPERTIES
    """Set by negotiate for MQTT 5 (3.x CONNACKs have none)."""
    why: str = "CONNECT refused"
    """With ``reason``, what the log says of it."""

    def __init__(self, reason: ReasonCode, client_id: str, keep_alive: int, session_expiry: int, send_quota: int,
                 max_send_size: int, alias_maximum: int, problem_information: bool = True) -> None:
        # The dataclass's own, written out (compiled, it is native; one per CONNECT).
        self.reason = reason
        self.client_id = client_id
        self.keep_alive = keep_alive
        self.session_expiry = session_expiry
        self.send_quota = send_quota
        self.max_send_size = max_send_size
        self.alias_maximum = alias_maximum
        self.problem_information = problem_information
        self.connack_properties = NO_PROPERTIES
        self.why = "CONNECT refused"


def negotiate(config: BrokerConfig, connect: Connect, connack: AcceptingConnack | None = None) -> Terms:
    """The terms of a connection (``connack``: the broker's, made for it once)."""
    level = connect.protocol_level
    props = connect.properties
    client_id = connect.client_id
    reason = ReasonCode.SUCCESS
    keep_alive = connect.keep_alive
    max_keepalive = config.max_keepalive
    if level == MQTT_5:
        session_expiry = granted_expiry(props.get("session_expiry_interval", 0), config)
    else:
        # MQTT 3: clean session 0 keeps the session until persistent_client_expiration.
        session_expiry = 0 if connect.clean_start else granted_expiry(NEVER, config)
    terms = Terms(
        reason=reason, client_id=client_id, keep_alive=keep_alive, session_expiry=session_expiry,
        send_quota=min(config.max_inflight_messages, props.get("receive_maximum", 65535)),
        # (No packet may be larger, whatever the client takes: a subscription identifier or topic
        # alias added to the largest PUBLISH a client may send would need a fifth length byte.)
        max_send_size=min(props.get("maximum_packet_size", NEVER), MAX_PACKET_SIZE),
        alias_maximum=min(props.get("topic_alias_maximum", 0), config.max_topic_alias_broker),
        problem_information=bool(props.get("request_problem_information", 1)))

    if level == MQTT_3_1 and not 0 < len(client_id) <= 23:
        terms.reason = ReasonCode.CLIENT_IDENTIFIER_NOT_VALID  # MQTT 3.1: 1 to 23 characters
        return terms
    if not client_id:
        if not config.allow_zero_length_clientid or (level != MQTT_5 and not connect.clean_start):
            terms.reason = ReasonCode.CLIENT_IDENTIFIER_NOT_VALID  # [MQTT-3.1.3-8]
            return terms
        terms.client_id = config.auto_id_prefix + uuid.uuid4().hex
    if max_keepalive and (keep_alive > max_keepalive or (max_keepalive < 65535 and keep_alive == 0)):
        if level != MQTT_5:
            # MQTT 3 cannot tell a client to use a shorter keepalive; refuse as Mosquitto does
            # (with "identifier rejected": the log says why).
            terms.reason = ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
            terms.why = f"keepalive {keep_alive} refused (max_keepalive {max_keepalive})"
            return terms
        terms.keep_alive = max_keepalive
    will = connect.will
    if will is not None:
        if not valid_topic_name(will.topic):
            terms.reason = ReasonCode.TOPIC_NAME_INVALID
        elif will.qos > config.max_qos:
            terms.reason = ReasonCode.QOS_NOT_SUPPORTED  # [MQTT-3.2.2-12]
        elif will.retain and not config.retain_available:
            terms.reason = ReasonCode.RETAIN_NOT_SUPPORTED  # [MQTT-3.2.2-13]
        elif will.properties.get("payload_format_indicator") == 1 and not is_utf8(will.payload):
            terms.reason = ReasonCode.PAYLOAD_FORMAT_INVALID
        if terms.reason:
            return terms
    if level == MQTT_5:
        terms.connack_properties = _connack_properties((connack or AcceptingConnack(config)).properties, config,
                                                       connect, terms)
    return terms


def announced_packet_size(config: BrokerConfig) -> int | None:
    """The Maximum Packet Size the broker tells its peers (in a CONNACK, a bridge's CONNECT), or
    None to say nothing: past the largest remaining length, paho-mqtt 2 refuses the property (it
    wants 1-268,435,455), and left out it means the protocol's own limit, as Mosquitto leaves it."""
    return config.max_packet_size if config.max_packet_size <= MAX_REMAINING_LENGTH else None


def read_packet_size(config: BrokerConfig) -> int:
    """The largest packet the broker reads from a peer: what it announces, or the protocol's
    own limit where it announces nothing (a limit a peer is not told of would close it for a
    packet MQTT allows [MQTT-3.2.2.3.6])."""
    return announced_packet_size(config) or MAX_PACKET_SIZE


class AcceptingConnack:
    """``AcceptingConnack(config)``: what every v5 CONNACK of a broker says about it
    [MQTT-3.2.2] (only what differs from the defaults), and the whole accepting CONNACK that says
    only that, without and with Session Present: made once per broker (its settings are frozen)
    rather than for every connection. ``properties`` is shared: nothing may change it."""

    def __init__(self, config: BrokerConfig) -> None:
        props: dict[str, Any] = {
            "receive_maximum": config.max_inflight_messages,
            "topic_alias_maximum": config.max_topic_alias,
        }
        size = announced_packet_size(config)
        if size is not None:
            props["maximum_packet_size"] = size
        if config.max_qos < 2:
            props["maximum_qos"] = config.max_qos
        if not config.retain_available:
            props["retain_available"] = 0
        if not config.wildcard_subscription_available:
            props["wildcard_subscription_available"] = 0
        if not config.subscription_identifier_available:
            props["subscription_identifier_available"] = 0
        if not config.shared_subscription_available:
            props["shared_subscription_available"] = 0
        self.properties = props
        self._absent = encode_connack(False, 0, props, MQTT_5)
        self._present = encode_connack(True, 0, props, MQTT_5)

    def encode(self, present: bool, properties: Properties, version: int) -> bytes:
        """The bytes of the CONNACK that accepts a connection, with the ``connack_properties``
        of its terms (or others)."""
        if version == MQTT_5 and properties is self.properties:
            return self._present if present else self._absent
        return encode_connack(present, 0, properties, version)


def _connack_properties(base: dict[str, Any], config: BrokerConfig, connect: Connect, terms: Terms) -> dict[str, Any]:
    """What a v5 client is told [MQTT-3.2.2]: the broker's part (``base``), and what differs
    from what the client asked."""
    props: dict[str, Any] = {}
    if terms.client_id != connect.client_id:
        props["assigned_client_identifier"] = terms.client_id  # [MQTT-3.2.2-16]
    if terms.keep_alive != connect.keep_alive:
        props["server_keep_alive"] = terms.keep_alive  # [MQTT-3.2.2-21]
    if terms.session_expiry != connect.properties.get("session_expiry_interval", 0):
        props["session_expiry_interval"] = terms.session_expiry
    if connect.properties.get("request_response_information") and config.response_information:
        information = config.response_information.replace("{client_id}", terms.client_id)
        if len(information.encode()) <= 65535:  # (with a client id near that long: none, not no CONNACK)
            props["response_information"] = information
    return {**base, **props} if props else base

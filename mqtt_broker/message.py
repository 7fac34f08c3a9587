"""The application message as the broker routes it, and the client as hooks see it."""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Final

from .topics import reserved, valid_topic_name
from .wire.codec import MAX_REMAINING_LENGTH
from .wire.codes import MQTTError
from .wire.packets import NO_PROPERTIES, PUBLISH, Properties, Publish, init_arguments
from .wire.properties import decode_properties, encode_properties, encode_property_list


@dataclass(slots=True, eq=False)
class Message(Publish):
    """A published message. One instance is shared by every subscriber it is delivered to.

    It is a PUBLISH packet with what the broker needs to route it: the protocol's reader decodes
    a client's PUBLISH straight into a Message, so a message costs one object on the publish
    path, not two. ``packet_id``, ``dup`` and ``frame`` are those of the PUBLISH as received
    (zero, False and None for a message the broker made).

    ``encoded`` caches the wire bytes (and the offset of the packet id in them) per kind of
    receiver (``encoding_kind``), so a message sent to many subscribers is encoded once for each
    kind of subscriber, not once each; it starts with the PUBLISH as it was received. For MQTT 5
    subscribers that get properties of their own, it holds the properties they all get alike
    (``shared_properties``).
    """

    sender: str | None = None
    """Client id of the publisher; None for messages published by the broker itself."""
    expires_at: float | None = None
    """Clock time after which the message is not delivered (MQTT 5 Message Expiry Interval). One
    a hook sets may be at most 2**32-1 seconds ahead, the longest interval a PUBLISH carries."""
    refused: int = 0
    """Subscribers it could not be queued for (queue full, or the store's quota reached)."""
    cluster_id: bytes | None = None
    """In a cluster, the id a QoS 1/2 message gets when it first leaves its node: a session
    that moves between nodes may be sent it by two ways for a moment, and takes it once."""
    encoded: dict[int, tuple[bytes, int]] | None = field(default=None, init=False, repr=False)
    """Not an argument: a message made from another (``dataclasses.replace`` in a hook) is encoded
    afresh, never sent as the bytes of the one it replaces."""

    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False, dup: bool = False,
                 packet_id: int = 0, properties: Properties = NO_PROPERTIES, frame: bytes | None = None,
                 sender: str | None = None, expires_at: float | None = None, refused: int = 0,
                 cluster_id: bytes | None = None) -> None:
        # The dataclass's own, the fields above in order, written out: compiled, this one is
        # native, where the one dataclasses makes would be interpreted (one per PUBLISH).
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = properties
        self.frame = frame
        self.sender = sender
        self.expires_at = expires_at
        self.refused = refused
        self.cluster_id = cluster_id
        self.encoded = None

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return init_arguments(self)

    def expired(self, now: float) -> bool:
        """Whether its Message Expiry Interval has run out by ``now``."""
        return self.expires_at is not None and self.expires_at <= now

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.topic, self.payload, self.qos, self.retain, dict(self.properties)) == (
            other.topic, other.payload, other.qos, other.retain, dict(other.properties))


def is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def is_time(value: Any, latest: float = sys.float_info.max) -> bool:
    """Whether a hook's ``value`` is a clock time (an int or a float; neither inf nor NaN) no later
    than ``latest``. Compared, not checked by math.isfinite, which raises OverflowError for an int
    too large for a float (and ``value`` is Any: compiled, a float would be made of it to compare)."""
    return type(value) in (int, float) and -sys.float_info.max <= value <= latest


def mistyped(message: Message) -> str | None:
    """The name of a field the broker keeps of a message besides what its PUBLISH carries (its
    sender, cluster id, the PUBLISH it came as, its encodings) whose value is not of its declared
    type, or None. Compiled, the Message refuses such a value as a hook sets it (TypeError, which
    refuses the message); checked here, the pure-Python build refuses it too, where it was routed
    (and a non-dict ``encoded`` raised AttributeError out of the publisher's dataReceived)."""
    # (None first, then one type: called for every message a publish hook saw, this takes 0.1 µs
    # compiled and 0.2 pure, where isinstance with a tuple of types took 0.8 and 0.7.)
    if message.sender is not None and not isinstance(message.sender, str):
        return "sender"
    if message.cluster_id is not None and not isinstance(message.cluster_id, bytes):
        return "cluster_id"
    if message.frame is not None and not isinstance(message.frame, bytes):
        return "frame"
    if message.encoded is not None and not isinstance(message.encoded, dict):
        return "encoded"
    if not isinstance(message.packet_id, int):
        return "packet_id"
    if not isinstance(message.refused, int):
        return "refused"
    return None


def unsendable(message: Message, now: float, own: bool = False) -> str | None:
    """Why no PUBLISH can carry ``message``, or None. A client's PUBLISH is checked as it is
    decoded; one an application makes (a hook's, ``BrokerService.publish``'s) is checked here,
    after it is given what the compiled Message makes of it, so that both builds take the same:
    a QoS given as a bool or an IntEnum becomes its int, and correlation data given as a
    bytearray or a memoryview bytes of its own (the caller's may change after; compiled, the
    codec takes only bytes). ``now``: the clock's time, which its ``expires_at`` may be no more
    than a Message Expiry Interval ahead of. ``own``: the broker's own, which may go to $SYS."""
    topic, properties = message.topic, message.properties
    if not isinstance(topic, str) or not isinstance(properties, dict) or type(message.retain) is not bool \
            or type(message.dup) is not bool:
        return "a topic, properties, retain or DUP flag not of its type (str, dict, bool)"
    field = mistyped(message)
    if field is not None:
        return f"its {field} {getattr(message, field)!r}, not of its type"
    qos = message.qos
    if isinstance(qos, int) and type(qos) is not int:
        message.qos = int(qos)
    data = properties.get("correlation_data")
    if isinstance(data, (bytearray, memoryview)):
        message.properties = properties = {**properties, "correlation_data": bytes(data)}
    if not isinstance(message.payload, bytes):
        return f"its payload is {type(message.payload).__name__}, not bytes"
    if type(message.qos) is not int or message.qos not in (0, 1, 2):
        return f"QoS {message.qos!r}"
    expires_at: Any = message.expires_at  # (compiled, a float local would be made of it: see is_time)
    if expires_at is not None and not is_time(expires_at, now + 0xFFFFFFFF):
        return f"its expiry time {expires_at!r}, not a time at most 2**32-1 s (a Message Expiry Interval) ahead"
    if not valid_topic_name(topic) or "\x00" in topic or (reserved(topic) and not (own and topic.startswith("$SYS"))):
        return f"the topic name {topic!r}"
    if "topic_alias" in properties or "subscription_identifier" in properties:
        return "a topic alias or subscription identifier, which each connection sets"
    if properties.get("payload_format_indicator") == 1 and not is_utf8(message.payload):
        return "a payload that is not the UTF-8 its format indicator says"  # (0x99, a client's)
    try:
        size = len(topic.encode())  # (a str may hold a lone surrogate, which no MQTT string may [MQTT-1.5.4-1])
    except UnicodeEncodeError:
        return f"the topic name {topic!r}, which no UTF-8 can carry"
    try:  # (a property's string no UTF-8 can carry raises UnicodeEncodeError, a ValueError: below)
        encoded = encode_properties(properties)
        if properties:
            decode_properties(encoded, 0, PUBLISH)
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError, struct.error, MQTTError) as e:
        return f"its properties {dict(properties)!r} ({e!r})"
    # What follows the fixed header of the largest PUBLISH it goes as (MQTT 5's, with the
    # properties), which four bytes of Remaining Length must count [MQTT-1.5.5].
    size += 2 + (2 if message.qos else 0) + len(encoded) + len(message.payload)
    if size > MAX_REMAINING_LENGTH:
        return f"{size} bytes after the fixed header of its PUBLISH, more than MQTT's {MAX_REMAINING_LENGTH}"
    return None


def bare(message: Message) -> Message:
    """The message without the PUBLISH it came as nor its encodings, for what outlives its
    deliveries (the retained message of a topic, the message log): they would keep two to four
    copies of its payload for as long (one per kind of subscriber it went to). And for a Message
    a publish or will hook answers with, which it may answer with again (one it keeps): routed
    itself, it would carry what the broker writes on the message it routes (its expiry time, the
    subscribers that turned it away, its encodings) from one publish into the next."""
    return Message(message.topic, message.payload, message.qos, message.retain, properties=message.properties,
                   sender=message.sender, expires_at=message.expires_at, cluster_id=message.cluster_id)


NOT_CACHED: dict[int, tuple[bytes, int]] = {}
"""``Message.encoded`` of a message whose encodings are not kept, made again for each receiver
(at about a microsecond each): a retained message, which would otherwise keep one copy of its
payload per kind of subscriber for as long as its topic keeps it."""


def encoding_kind(mqtt5: bool, qos: int, retain: bool) -> int:
    """The key of ``Message.encoded`` for receivers of one protocol level (MQTT 5 or not), QoS
    and retain flag: an int, so that no tuple is made per delivery."""
    return mqtt5 << 3 | qos << 1 | retain


SHARED_PROPERTIES: Final = 1 << 4
"""The key of ``Message.encoded`` (above every ``encoding_kind``) that keeps the message's
``shared_properties``, with 0 for the offset."""


def shared_properties(message: Message) -> bytes:
    """The message's properties as every MQTT 5 receiver gets them (all but its expiry, of which
    each is sent the time left), encoded once (``encode_property_list``) and kept with its
    encodings: a receiver with properties of its own (the expiry left, a topic alias,
    subscription identifiers) is sent them after these. Encoded again for each, a PUBLISH of up
    to max_packet_size of user properties cost that size times its subscribers in one turn."""
    properties = message.properties
    if not properties:
        return b""
    cache = message.encoded
    if cache is None:
        cache = message.encoded = {}
    entry = cache.get(SHARED_PROPERTIES)
    if entry is None:
        if message.expires_at is not None:  # (each receiver is sent the time left [MQTT-3.3.2-6])
            properties = {k: v for k, v in properties.items() if k != "message_expiry_interval"}
        entry = (encode_property_list(properties), 0)
        if cache is not NOT_CACHED:
            cache[SHARED_PROPERTIES] = entry
    return entry[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class Client:
    """A connected (or connecting) client, as hooks and the embedding API see it."""

    client_id: str
    username: str | None
    peer: str
    """The remote address, as ``host:port`` (``unix`` for a UNIX socket's client)."""
    protocol_version: int
    """3 (MQTT 3.1), 4 (MQTT 3.1.1) or 5."""
    clean_start: bool
    keep_alive: int
    """The keepalive in force, in seconds: the client's, or max_keepalive's (MQTT 5's Server Keep
    Alive), 0 for none."""
    properties: Properties = NO_PROPERTIES
    """The CONNECT properties of an MQTT 5 client (user properties, session expiry, ...)."""
    bridge: str | None = None
    """The name of the bridge (its ``connection``) whose own link to this broker this is: a
    bridge's session here connects through the hooks as a client does. None for a client."""

    def __init__(self, *, client_id: str, username: str | None, peer: str, protocol_version: int,
                 clean_start: bool, keep_alive: int, properties: Properties = NO_PROPERTIES,
                 bridge: str | None = None) -> None:
        # The dataclass's own, written out: compiled, this one is native, where the one
        # dataclasses makes would be interpreted (one per CONNECT). Frozen: fields are set as
        # dataclasses sets them.
        set_field = object.__setattr__
        set_field(self, "client_id", client_id)
        set_field(self, "username", username)
        set_field(self, "peer", peer)
        set_field(self, "protocol_version", protocol_version)
        set_field(self, "clean_start", clean_start)
        set_field(self, "keep_alive", keep_alive)
        set_field(self, "properties", properties)
        set_field(self, "bridge", bridge)

    def __reduce__(self) -> tuple[Any, tuple[object, ...]]:
        return init_arguments(self)

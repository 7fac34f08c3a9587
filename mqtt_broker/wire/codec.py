"""Decoding a byte stream into packets and encoding packets into bytes. No I/O."""

from __future__ import annotations

from struct import Struct
from typing import Any, Callable, Final

from .codes import (
    DISCONNECT_CODES, PUBACK_CODES, PUBREL_CODES, MalformedPacket, PacketTooLarge, ProtocolError,
    UnsupportedProtocolVersion,
)
from .packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES,
    PACKET_TYPES, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, Auth, Connack, Connect, Disconnect, Packet,
    Pingreq, Pingresp, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe,
    SubscriptionRequest, Unsuback, Unsubscribe, Will,
)
from .properties import (
    WILL, decode_binary, decode_properties, decode_string, decode_varint, encode_binary,
    encode_properties, encode_property_list, encode_string, encode_varint,
)

_U16: Final = Struct("!H")
MAX_REMAINING_LENGTH: Final = 268_435_455
MAX_PACKET_SIZE: Final = MAX_REMAINING_LENGTH + 5
"""No MQTT packet is larger: a fixed header byte and four of Remaining Length [MQTT-1.5.5]."""
PROTOCOL_NAMES: Final = {MQTT_3_1: "MQIsdp", MQTT_3_1_1: "MQTT", MQTT_5: "MQTT"}

# Fixed-header flags each packet type must carry [MQTT-2.2.2-1]; PUBLISH's are its own.
_REQUIRED_FLAGS: Final = {t: 0 for t in range(1, 16)}
_REQUIRED_FLAGS.update({6: 2, 8: 2, 10: 2})
_DUP_ON_RESEND_V31: Final = (6, SUBSCRIBE, UNSUBSCRIBE)  # PUBREL, SUBSCRIBE, UNSUBSCRIBE


class FrameReader:
    """Splits a byte stream into packets, bounding each packet before it is buffered.

    ``receive_data(bytes)`` then ``next_packet()`` until it returns None, or ``feed(bytes)`` for
    every complete packet at once. The reader learns the protocol level from the CONNECT it
    decodes; before that, only a CONNECT (or, as a client, a CONNACK) can be decoded exactly.
    Raises :class:`MQTTError` subclasses; after one, the stream is not usable.

    ``publish_type``, a subclass of :class:`Publish`, is what PUBLISH packets are decoded into:
    a broker that routes the decoded packet itself makes one object per message, not two.
    """

    __slots__ = ("_buffer", "_pos", "max_packet_size", "version", "publish_type")

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE, version: int = MQTT_3_1_1,
                 publish_type: type[Publish] = Publish) -> None:
        self._buffer: bytes | bytearray = b""
        self._pos = 0
        self.max_packet_size = max_packet_size
        self.version = version
        self.publish_type = publish_type

    def receive_data(self, data: bytes) -> None:
        # The buffer is bytes, whose slices are the packets' bytes at the cost of one copy,
        # except while a large packet arrives in pieces: then a bytearray, so that each piece is
        # appended rather than the whole packet copied again.
        buffer = self._buffer
        pos = self._pos
        if pos >= len(buffer):
            self._buffer = bytes(data)
        elif len(buffer) - pos < 4096:
            self._buffer = bytes(buffer[pos:]) + data
        else:
            if isinstance(buffer, bytearray):
                del buffer[:pos]
            else:
                buffer = bytearray(buffer[pos:])
            buffer += data
            self._buffer = buffer
        self._pos = 0

    def feed(self, data: bytes) -> list[Packet]:
        self.receive_data(data)
        packets = []
        while (packet := self.next_packet()) is not None:
            packets.append(packet)
        return packets

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buffer) - self._pos

    def awaited(self) -> int:
        """Bytes still to come of the packet being received: 0 while none is, or while its
        Remaining Length has not all come."""
        buffer = self._buffer
        if self._pos >= len(buffer):
            return 0
        try:
            length, start = decode_varint(buffer, self._pos + 1)
        except MalformedPacket:  # (not all come yet, or malformed: next_packet says which)
            return 0
        return max(0, start + length - len(buffer))

    def next_packet(self) -> Packet | None:
        buffer = self._buffer
        pos = self._pos
        size = len(buffer)
        if size - pos < 2:
            if pos and pos == size:  # all read: an idle connection keeps no copy of its last read
                self._buffer = b""
                self._pos = 0
            return None
        first = buffer[pos]
        # Remaining Length, inlined: this runs once per packet, and is most often one byte.
        length = buffer[pos + 1]
        index = pos + 2
        if length & 0x80:
            length &= 0x7F
            shift = 7
            while True:
                if index >= size:
                    return None
                byte = buffer[index]
                index += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    if not byte:  # (the frame's bytes may be sent on as they came)
                        raise MalformedPacket("remaining length not in its fewest bytes")  # [MQTT-1.5.5-1]
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacket("remaining length longer than 4 bytes")
        end = index + length
        if end - pos > self.max_packet_size:
            raise PacketTooLarge(f"packet of {end - pos} bytes exceeds the maximum of {self.max_packet_size}")
        if end > size:
            return None
        self._pos = end
        packet_type = first >> 4
        if packet_type == PUBLISH:
            return _decode_publish(bytes(buffer[pos:end]), index - pos, first, self.version, self.publish_type)
        flags = first & 0x0F
        if packet_type == 0 or (packet_type == AUTH and self.version != MQTT_5):
            raise MalformedPacket(f"reserved packet type {packet_type}")
        if flags != _REQUIRED_FLAGS[packet_type] and not (
                # MQTT 3.1 sets DUP on a resent PUBREL, SUBSCRIBE or UNSUBSCRIBE (QoS 1 in their
                # header); only 3.1.1 fixed their flags to 0010 [MQTT-2.2.2-2].
                self.version == MQTT_3_1 and flags & 0x07 == 0x02 and packet_type in _DUP_ON_RESEND_V31):
            raise MalformedPacket(f"invalid fixed header flags 0x{flags:x} for packet type {packet_type}")
        body = bytes(buffer[index:end])
        packet = _DECODERS[packet_type](body, self.version)
        if packet_type == CONNECT:
            self.version = packet.protocol_level  # type: ignore[union-attr]
        return packet


def decode(data: bytes, version: int = MQTT_3_1_1) -> Packet:
    """Decode exactly one whole packet."""
    reader = FrameReader(version=version)
    reader.receive_data(data)
    packet = reader.next_packet()
    if packet is None or reader.buffered:
        raise MalformedPacket("not exactly one packet")
    return packet


def _u16(body: bytes | memoryview, pos: int) -> int:
    if pos + 2 > len(body):
        raise MalformedPacket("packet ends inside a two-byte integer")
    return body[pos] << 8 | body[pos + 1]


def _decode_publish(frame: bytes, start: int, first: int, version: int, cls: type[Publish] = Publish) -> Publish:
    """Decode a PUBLISH from its whole frame (``start``: where the variable header begins);
    the hot path, so the topic is decoded inline rather than through decode_string."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    dup = bool(first & 8)
    if dup and not qos:
        raise MalformedPacket("PUBLISH with DUP set at QoS 0")  # [MQTT-3.3.1-2]
    length = len(frame)
    if start + 2 > length:
        raise MalformedPacket("length prefix runs past the end of the packet")
    pos = start + 2 + (frame[start] << 8 | frame[start + 1])
    if pos > length:
        raise MalformedPacket("string or binary data runs past the end of the packet")
    try:
        topic = frame[start + 2:pos].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not well-formed UTF-8") from None
    if "\x00" in topic:
        raise MalformedPacket("string contains U+0000")  # [MQTT-1.5.4-2]
    packet_id = 0
    if qos:
        if pos + 2 > length:
            raise MalformedPacket("packet ends inside a two-byte integer")
        packet_id = frame[pos] << 8 | frame[pos + 1]
        pos += 2
        if not packet_id:
            raise ProtocolError("PUBLISH with packet identifier 0")  # [MQTT-2.3.1-1]
    properties = NO_PROPERTIES
    if version == MQTT_5:
        if pos < length and not frame[pos]:
            pos += 1  # no properties, the most common case
        else:
            properties, pos = decode_properties(frame, pos, PUBLISH)
    return cls(topic, frame[pos:], qos, bool(first & 1), dup, packet_id, properties, frame)


def decode_publish(frame: bytes, version: int, cls: type[Publish] = Publish) -> Publish:
    """Decode one whole PUBLISH frame, fixed header included, without a FrameReader (a frame
    that came whole, e.g. inside a cluster's record). Raises MalformedPacket for anything else,
    a frame whose remaining length is not its own included."""
    first = frame[0] if frame else 0
    if first >> 4 != PUBLISH:
        raise MalformedPacket("not a PUBLISH")
    length, index = decode_varint(frame, 1)
    if index + length != len(frame):
        raise MalformedPacket(f"remaining length {length} in a frame of {len(frame)} bytes")
    return _decode_publish(frame, index, first, version, cls)


def _decode_connect(body: bytes, version: int) -> Connect:
    name, pos = decode_string(body, 0)
    if pos >= len(body):
        raise MalformedPacket("CONNECT ends before the protocol level")
    level = body[pos]
    # Bit 7 of the level marks a bridge (Mosquitto's try_private): 0x83 or 0x84, never 0x85.
    bridge = level in (0x83, 0x84)
    if bridge:
        level &= 0x7F
    if (name, level) not in ((PROTOCOL_NAMES[MQTT_3_1], MQTT_3_1), ("MQTT", MQTT_3_1_1), ("MQTT", MQTT_5)):
        if name in ("MQTT", "MQIsdp"):
            raise UnsupportedProtocolVersion(f"unsupported protocol level {level}")  # [MQTT-3.1.2-2]
        raise ProtocolError(f"unknown protocol name {name!r}")  # [MQTT-3.1.2-1]
    if pos + 4 > len(body):
        raise MalformedPacket("CONNECT ends inside its variable header")
    flags = body[pos + 1]
    keep_alive = _u16(body, pos + 2)
    pos += 4
    # MQTT 3.1 checks neither the reserved bit nor the will QoS and retain without a will
    # (they are "disregarded"), and lets a user name or password flag be set with its string
    # missing ("This is valid"): as Mosquitto does, these are errors from 3.1.1 on only.
    v31 = level == MQTT_3_1
    if flags & 1 and not v31:
        raise MalformedPacket("CONNECT reserved flag is set")  # [MQTT-3.1.2-3]
    will_flag = flags & 4
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    if will_qos == 3:
        raise MalformedPacket("will QoS 3")  # [MQTT-3.1.2-14]
    if not will_flag and (will_qos or will_retain) and not v31:
        raise MalformedPacket("will QoS or retain set without a will")  # [MQTT-3.1.2-13, -15]
    if level != MQTT_5 and flags & 0x40 and not flags & 0x80:
        raise MalformedPacket("password without a user name")  # [MQTT-3.1.2-22]
    properties = NO_PROPERTIES
    if level == MQTT_5:
        properties, pos = decode_properties(body, pos, CONNECT)
        if "authentication_data" in properties and "authentication_method" not in properties:
            raise ProtocolError("authentication data without an authentication method")  # 3.1.2.11.10
    client_id, pos = decode_string(body, pos)
    will = None
    if will_flag:
        will_props = NO_PROPERTIES
        if level == MQTT_5:
            will_props, pos = decode_properties(body, pos, WILL)
        will_topic, pos = decode_string(body, pos)
        will_payload, pos = decode_binary(body, pos)
        will = Will(topic=will_topic, payload=will_payload, qos=will_qos, retain=will_retain,
                    properties=will_props)
    username = password = None
    if flags & 0x80 and not (v31 and pos == len(body)):
        username, pos = decode_string(body, pos)  # [MQTT-3.1.2-19]
    if flags & 0x40 and not (v31 and pos == len(body)):
        password, pos = decode_binary(body, pos)  # [MQTT-3.1.2-21]
    if pos != len(body):
        raise MalformedPacket("trailing bytes after the CONNECT payload")
    return Connect(protocol_name=name, protocol_level=level, clean_start=bool(flags & 2),
                   keep_alive=keep_alive, client_id=client_id, will=will, username=username,
                   password=password, properties=properties, bridge=bridge)


def _decode_connack(body: bytes, version: int) -> Connack:
    if len(body) < 2 or body[0] > 1:
        raise MalformedPacket("bad CONNACK")
    if version == MQTT_5 and len(body) == 2 and body[1] == 1:
        # A server of 3.1.1 refusing the protocol level, in the form of 3.1.1 [MQTT-3.1.2-2]:
        # its "unacceptable protocol version" is MQTT 5's 0x84.
        return Connack(reason_code=0x84)
    properties = NO_PROPERTIES
    pos = 2
    if version == MQTT_5:
        properties, pos = decode_properties(body, pos, CONNACK)
    if pos != len(body):
        raise MalformedPacket("trailing bytes after CONNACK")
    return Connack(session_present=bool(body[0]), reason_code=body[1], properties=properties)


def _ack_decoder(cls: type, packet_type: int, allowed: frozenset[int]) -> Callable[[bytes, int], Packet]:
    # The packet is built through its slots' own setters: a frozen dataclass's __init__ goes
    # through object.__setattr__ for each field, more than twice the time, and QoS 1/2 costs one
    # to three acknowledgements per message. The class's own __new__, not object's: a class
    # compiled by mypyc allocates its instances itself.
    new: Any = cls.__new__
    set_packet_id, set_reason_code, set_properties = (
        cls.packet_id.__set__, cls.reason_code.__set__, cls.properties.__set__)  # type: ignore[attr-defined]

    def decode_ack(body: bytes, version: int) -> Packet:
        if len(body) < 2:
            raise MalformedPacket("packet ends inside a two-byte integer")
        packet_id = body[0] << 8 | body[1]
        if not packet_id:
            raise ProtocolError("packet identifier 0")
        reason_code = 0
        properties = NO_PROPERTIES
        if version == MQTT_5:
            if len(body) > 2:
                reason_code = body[2]
                if reason_code not in allowed:
                    raise ProtocolError(f"reason code 0x{reason_code:02X} in a {cls.__name__.upper()}")
            if len(body) > 3:
                properties, pos = decode_properties(body, 3, packet_type)
                if pos != len(body):
                    raise MalformedPacket("trailing bytes after acknowledgement")
        elif len(body) != 2:
            raise MalformedPacket("acknowledgement of the wrong length")
        packet: Packet = new(cls)
        set_packet_id(packet, packet_id)
        set_reason_code(packet, reason_code)
        set_properties(packet, properties)
        return packet
    return decode_ack


def _decode_subscribe(body: bytes, version: int) -> Subscribe:
    packet_id = _u16(body, 0)
    if not packet_id:
        raise ProtocolError("SUBSCRIBE with packet identifier 0")  # [MQTT-2.3.1-1]
    properties: Properties = NO_PROPERTIES
    pos = 2
    if version == MQTT_5:
        # A second subscription identifier is refused by decode_properties as a duplicate.
        properties, pos = decode_properties(body, pos, SUBSCRIBE)
    requests = []
    while pos < len(body):
        topic_filter, pos = decode_string(body, pos)
        if pos >= len(body):
            raise MalformedPacket("SUBSCRIBE topic filter without options")
        options = body[pos]
        pos += 1
        qos = options & 3
        if qos == 3:
            if version == MQTT_5:
                raise ProtocolError("subscription QoS 3")  # 5.0 §3.8.3.1
            raise MalformedPacket("subscription QoS 3")  # [MQTT-3.8.3-4]
        if version == MQTT_5:
            if options & 0xC0:
                raise MalformedPacket("reserved subscription option bits set")  # [MQTT-3.8.3-5]
            retain_handling = (options >> 4) & 3
            if retain_handling == 3:
                raise ProtocolError("retain handling 3")
            requests.append(SubscriptionRequest(
                topic_filter=topic_filter, qos=qos, no_local=bool(options & 4),
                retain_as_published=bool(options & 8), retain_handling=retain_handling))
        else:
            if options & 0xFC:
                raise MalformedPacket("reserved subscription option bits set")  # [MQTT-3.8.3-4]
            requests.append(SubscriptionRequest(topic_filter=topic_filter, qos=qos))
    if not requests:
        raise ProtocolError("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-3]
    return Subscribe(packet_id=packet_id, subscriptions=tuple(requests), properties=properties)


def _decode_suback(body: bytes, version: int) -> Suback:
    packet_id = _u16(body, 0)
    properties = NO_PROPERTIES
    pos = 2
    if version == MQTT_5:
        properties, pos = decode_properties(body, pos, 9)
    return Suback(packet_id=packet_id, reason_codes=tuple(body[pos:]), properties=properties)


def _decode_unsubscribe(body: bytes, version: int) -> Unsubscribe:
    packet_id = _u16(body, 0)
    if not packet_id:
        raise ProtocolError("UNSUBSCRIBE with packet identifier 0")
    properties = NO_PROPERTIES
    pos = 2
    if version == MQTT_5:
        properties, pos = decode_properties(body, pos, UNSUBSCRIBE)
    filters = []
    while pos < len(body):
        topic_filter, pos = decode_string(body, pos)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
    return Unsubscribe(packet_id=packet_id, topic_filters=tuple(filters), properties=properties)


def _decode_unsuback(body: bytes, version: int) -> Unsuback:
    packet_id = _u16(body, 0)
    if version != MQTT_5:
        if len(body) != 2:
            raise MalformedPacket("UNSUBACK of the wrong length")
        return Unsuback(packet_id=packet_id)
    properties, pos = decode_properties(body, 2, 11)
    return Unsuback(packet_id=packet_id, reason_codes=tuple(body[pos:]), properties=properties)


def _empty(cls: type) -> Callable[[bytes, int], Packet]:
    instance = cls()

    def decode_empty(body: bytes, version: int) -> Packet:
        if body:
            raise MalformedPacket(f"{cls.__name__.upper()} with a body")
        return instance  # type: ignore[no-any-return]
    return decode_empty


def _reason_decoder(cls: type, packet_type: int, allowed: frozenset[int] | None) -> Callable[[bytes, int], Packet]:
    def decode_reason(body: bytes, version: int) -> Packet:
        if version != MQTT_5:
            if body:
                raise MalformedPacket(f"{cls.__name__.upper()} with a body")
            return cls()  # type: ignore[no-any-return]
        if not body:
            return cls()  # type: ignore[no-any-return]
        if allowed is not None and body[0] not in allowed:
            raise ProtocolError(f"reason code 0x{body[0]:02X} in a {cls.__name__.upper()}")
        properties = NO_PROPERTIES
        if len(body) > 1:
            properties, pos = decode_properties(body, 1, packet_type)
            if pos != len(body):
                raise MalformedPacket("trailing bytes")
        return cls(reason_code=body[0], properties=properties)  # type: ignore[no-any-return]
    return decode_reason


_DECODERS: Final[dict[int, Callable[[bytes, int], Packet]]] = {
    CONNECT: _decode_connect,
    CONNACK: _decode_connack,
    4: _ack_decoder(Puback, 4, PUBACK_CODES),
    5: _ack_decoder(Pubrec, 5, PUBACK_CODES),
    6: _ack_decoder(Pubrel, 6, PUBREL_CODES),
    7: _ack_decoder(Pubcomp, 7, PUBREL_CODES),
    SUBSCRIBE: _decode_subscribe,
    9: _decode_suback,
    UNSUBSCRIBE: _decode_unsubscribe,
    11: _decode_unsuback,
    12: _empty(Pingreq),
    13: _empty(Pingresp),
    DISCONNECT: _reason_decoder(Disconnect, DISCONNECT, DISCONNECT_CODES),
    AUTH: _reason_decoder(Auth, AUTH, None),  # (checked where it is answered: 0x18 from a server only)
}


# --- encoding ---------------------------------------------------------------------------

def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def encode_publish(publish: Publish, version: int) -> bytes:
    return publish_template(publish.topic, publish.payload, publish.qos, publish.retain,
                            publish.properties, version, publish.packet_id, publish.dup)[0]


def publish_template(topic: str, payload: bytes, qos: int, retain: bool, properties: Properties,
                     version: int, packet_id: int = 0, dup: bool = False, shared: bytes = b"") -> tuple[bytes, int]:
    """Encode a PUBLISH; returns (bytes, offset of the packet id), so that the same bytes can be
    sent to many subscribers with only the two packet id bytes (and the DUP bit) changed.

    ``shared``: MQTT 5 properties encoded already (``encode_property_list``'s), which
    ``properties`` follow: those many receivers get alike, encoded once for them all, and then
    one receiver's own (its topic alias, say)."""
    raw_topic = topic.encode("utf-8")
    topic_size = len(raw_topic)
    if version != MQTT_5:
        props = b""
    elif shared:
        own = encode_property_list(properties)
        props = b"".join((encode_varint(len(shared) + len(own)), shared, own))
    else:
        props = encode_properties(properties)
    length = 2 + topic_size + (2 if qos else 0) + len(props) + len(payload)
    first = 0x30 | qos << 1 | retain | dup << 3
    # One join: the length is known before the body is, and most PUBLISHes fit a one-byte length
    # (their first four bytes made by int.to_bytes, cheaper than bytes() of a tuple).
    if length < 0x80:
        header = 2
        parts = [(first << 24 | length << 16 | topic_size).to_bytes(4, "big"), raw_topic]
    else:
        head = bytes((first,)) + encode_varint(length)
        header = len(head)
        parts = [head, topic_size.to_bytes(2, "big"), raw_topic]
    if qos:
        parts.append(packet_id.to_bytes(2, "big"))
    parts += [props, payload]
    return b"".join(parts), header + 2 + topic_size


def _encode_connect(p: Connect, version: int) -> bytes:
    level = p.protocol_level
    flags = (p.clean_start << 1) | ((p.username is not None) << 7) | ((p.password is not None) << 6)
    if p.will is not None:
        flags |= 4 | p.will.qos << 3 | p.will.retain << 5
    parts = [encode_string(p.protocol_name), bytes((level | p.bridge << 7, flags)), _U16.pack(p.keep_alive)]
    if level == MQTT_5:
        parts.append(encode_properties(p.properties))
    parts.append(encode_string(p.client_id))
    if p.will is not None:
        if level == MQTT_5:
            parts.append(encode_properties(p.will.properties))
        parts += [encode_string(p.will.topic), encode_binary(p.will.payload)]
    if p.username is not None:
        parts.append(encode_string(p.username))
    if p.password is not None:
        parts.append(encode_binary(p.password))
    return _frame(0x10, b"".join(parts))


def encode_connack(session_present: bool, reason_code: int, properties: Properties, version: int) -> bytes:
    """A CONNACK's bytes, without a Connack to encode (one for every connection)."""
    if version != MQTT_5:
        return bytes((0x20, 2, session_present, reason_code))
    return _frame(0x20, bytes((session_present, reason_code)) + encode_properties(properties))


def _encode_connack(p: Connack, version: int) -> bytes:
    return encode_connack(p.session_present, p.reason_code, p.properties, version)


def _encode_ack(p: Puback | Pubrec | Pubrel | Pubcomp, version: int) -> bytes:
    first = PACKET_TYPES[type(p)] << 4 | (2 if isinstance(p, Pubrel) else 0)
    body = _U16.pack(p.packet_id)
    if version == MQTT_5 and (p.reason_code or p.properties):
        body += bytes((p.reason_code,))
        if p.properties:
            body += encode_properties(p.properties)
    return _frame(first, body)


def _encode_subscribe(p: Subscribe, version: int) -> bytes:
    parts = [_U16.pack(p.packet_id)]
    if version == MQTT_5:
        parts.append(encode_properties(p.properties))
    for s in p.subscriptions:
        options = s.qos
        if version == MQTT_5:
            options |= s.no_local << 2 | s.retain_as_published << 3 | s.retain_handling << 4
        parts += [encode_string(s.topic_filter), bytes((options,))]
    return _frame(0x82, b"".join(parts))


def _encode_suback(p: Suback, version: int) -> bytes:
    props = encode_properties(p.properties) if version == MQTT_5 else b""
    return _frame(0x90, _U16.pack(p.packet_id) + props + bytes(p.reason_codes))


def _encode_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    parts = [_U16.pack(p.packet_id)]
    if version == MQTT_5:
        parts.append(encode_properties(p.properties))
    parts += [encode_string(f) for f in p.topic_filters]
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(p: Unsuback, version: int) -> bytes:
    body = _U16.pack(p.packet_id)
    if version == MQTT_5:
        body += encode_properties(p.properties) + bytes(p.reason_codes)
    return _frame(0xB0, body)


def _encode_reason(p: Disconnect | Auth, version: int) -> bytes:
    first = PACKET_TYPES[type(p)] << 4
    if version != MQTT_5 or (not p.reason_code and not p.properties):
        return bytes((first, 0))
    body = bytes((p.reason_code,))
    if p.properties:
        body += encode_properties(p.properties)
    return _frame(first, body)


# Each encoder takes only its own packet type; encode() picks it by type(packet).
_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: encode_publish,
    Puback: _encode_ack,
    Pubrec: _encode_ack,
    Pubrel: _encode_ack,
    Pubcomp: _encode_ack,
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: lambda p, v: b"\xc0\x00",
    Pingresp: lambda p, v: b"\xd0\x00",
    Disconnect: _encode_reason,
    Auth: _encode_reason,
}


def encode(packet: Packet, version: int = MQTT_3_1_1) -> bytes:
    """Encode one packet for the given protocol level (a subclass of Publish as a PUBLISH)."""
    encoder = _ENCODERS.get(type(packet))
    if encoder is None and isinstance(packet, Publish):
        encoder = encode_publish
    if encoder is None:
        raise TypeError(f"not an MQTT packet: {packet!r}")
    return encoder(packet, version)

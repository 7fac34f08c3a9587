"""MQTT 5 properties (section 2.2.2): the table of identifiers, and their encoding."""

from __future__ import annotations

from struct import Struct
from typing import Any, Final

from .codes import MalformedPacket, ProtocolError
from .packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, NO_PROPERTIES, PUBACK, PUBCOMP, PUBLISH, PUBREC,
    PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, Properties,
)

WILL: Final = 0
"""Stands for the will properties of a CONNECT in the 'allowed in' column."""

_U16: Final = Struct("!H")
_U32: Final = Struct("!I")

BYTE: Final = 0
U16: Final = 1
U32: Final = 2
VARINT: Final = 3
UTF8: Final = 4
BINARY: Final = 5
PAIR: Final = 6

_ACKS: Final = (PUBACK, PUBREC, PUBREL, PUBCOMP)
_ALL: Final = frozenset({CONNECT, CONNACK, PUBLISH, *_ACKS, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
                         UNSUBACK, DISCONNECT, AUTH, WILL})

# identifier: (name, type, packets it may appear in)
PROPERTIES: Final[dict[int, tuple[str, int, frozenset[int]]]] = {
    0x01: ("payload_format_indicator", BYTE, frozenset({PUBLISH, WILL})),
    0x02: ("message_expiry_interval", U32, frozenset({PUBLISH, WILL})),
    0x03: ("content_type", UTF8, frozenset({PUBLISH, WILL})),
    0x08: ("response_topic", UTF8, frozenset({PUBLISH, WILL})),
    0x09: ("correlation_data", BINARY, frozenset({PUBLISH, WILL})),
    0x0B: ("subscription_identifier", VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("session_expiry_interval", U32, frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("assigned_client_identifier", UTF8, frozenset({CONNACK})),
    0x13: ("server_keep_alive", U16, frozenset({CONNACK})),
    0x15: ("authentication_method", UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("authentication_data", BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("request_problem_information", BYTE, frozenset({CONNECT})),
    0x18: ("will_delay_interval", U32, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({CONNECT})),
    0x1A: ("response_information", UTF8, frozenset({CONNACK})),
    0x1C: ("server_reference", UTF8, frozenset({CONNACK, DISCONNECT})),
    0x1F: ("reason_string", UTF8, frozenset({CONNACK, *_ACKS, SUBACK, UNSUBACK, DISCONNECT, AUTH})),
    0x21: ("receive_maximum", U16, frozenset({CONNECT, CONNACK})),
    0x22: ("topic_alias_maximum", U16, frozenset({CONNECT, CONNACK})),
    0x23: ("topic_alias", U16, frozenset({PUBLISH})),
    0x24: ("maximum_qos", BYTE, frozenset({CONNACK})),
    0x25: ("retain_available", BYTE, frozenset({CONNACK})),
    0x26: ("user_property", PAIR, _ALL),
    0x27: ("maximum_packet_size", U32, frozenset({CONNECT, CONNACK})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({CONNACK})),
    0x29: ("subscription_identifier_available", BYTE, frozenset({CONNACK})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({CONNACK})),
}
# Properties whose only legal byte values are 0 and 1.
_BOOLEAN: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
# Properties for which 0 is a Protocol Error.
# (A topic alias of 0 is refused by the receiver with 0x94, not here [MQTT-3.3.2-8].)
_NONZERO: Final = frozenset({0x0B, 0x21, 0x27})


def decode_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """Decode a Variable Byte Integer at ``pos``; returns (value, position after it)."""
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= len(data):
            raise MalformedPacket("variable byte integer runs past the end of the packet")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if shift and not byte:
                raise MalformedPacket("variable byte integer not in its fewest bytes")  # [MQTT-1.5.5-1]
            return value, pos
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_string(data: bytes | memoryview, pos: int) -> tuple[str, int]:
    """A UTF-8 Encoded String [MQTT-1.5.4-1..3]: well-formed, no U+0000."""
    raw, pos = decode_binary(data, pos)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not well-formed UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")
    return text, pos


def decode_binary(data: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(data):
        raise MalformedPacket("length prefix runs past the end of the packet")
    end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    if end > len(data):
        raise MalformedPacket("string or binary data runs past the end of the packet")
    return bytes(data[pos + 2:end]), end


def encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def sendable(text: str) -> str:
    """``text`` as an MQTT string can carry it: without U+0000 [MQTT-1.5.4-2], lone surrogates
    replaced [MQTT-1.5.4-1], at most 65,535 bytes of UTF-8, cut between characters. For what
    the broker only passes on, a hook's reason string say."""
    raw = text.replace("\0", "").encode("utf-8", "replace")
    return raw[:65535].decode("utf-8", "ignore")  # (a character cut in two goes)


def encode_binary(raw: bytes) -> bytes:
    return _U16.pack(len(raw)) + raw


def decode_properties(data: bytes | memoryview, pos: int, packet_type: int) -> tuple[Properties, int]:
    """Decode a property block; a property not allowed in ``packet_type`` or repeated is an error."""
    length, pos = decode_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise MalformedPacket("properties run past the end of the packet")
    if not length:
        return NO_PROPERTIES, pos
    props: dict[str, Any] = {}
    while pos < end:
        ident, pos = decode_varint(data, pos)
        entry = PROPERTIES.get(ident)
        if entry is None:
            raise MalformedPacket(f"unknown property identifier 0x{ident:02x}")
        name, kind, allowed = entry
        if packet_type not in allowed:
            # An identifier not valid for the packet type is a Malformed Packet (5.0 §2.2.2.2).
            raise MalformedPacket(f"property {name} is not allowed in this packet")
        value: Any
        if kind == BYTE:
            if pos >= end:
                raise MalformedPacket(f"property {name} is truncated")
            value = data[pos]
            pos += 1
        elif kind == U16:
            if pos + 2 > end:
                raise MalformedPacket(f"property {name} is truncated")
            value = data[pos] << 8 | data[pos + 1]
            pos += 2
        elif kind == U32:
            if pos + 4 > end:
                raise MalformedPacket(f"property {name} is truncated")
            value = _U32.unpack_from(data, pos)[0]
            pos += 4
        elif kind == VARINT:
            value, pos = decode_varint(data, pos)
        elif kind == UTF8:
            value, pos = decode_string(data, pos)
        elif kind == BINARY:
            value, pos = decode_binary(data, pos)
        else:
            key, pos = decode_string(data, pos)
            text, pos = decode_string(data, pos)
            value = (key, text)
        if pos > end:
            raise MalformedPacket(f"property {name} runs past the property block")
        if ident in _BOOLEAN and value > 1:
            raise ProtocolError(f"property {name} must be 0 or 1")
        if ident in _NONZERO and value == 0:
            raise ProtocolError(f"property {name} must not be 0")
        if ident == 0x08 and (not value or "+" in value or "#" in value):
            # A Response Topic is a topic name: not empty, no wildcards [MQTT-3.3.2-13, -14].
            raise ProtocolError(f"response topic {value!r} is not a topic name")
        if kind == PAIR or (ident == 0x0B and packet_type == PUBLISH):
            props.setdefault(name, []).append(value)
        elif name in props:
            raise ProtocolError(f"property {name} appears more than once")
        else:
            props[name] = value
    return props, pos


_ENCODING: Final[dict[str, tuple[bytes, int]]] = {name: (encode_varint(ident), kind)
                                                  for ident, (name, kind, _) in PROPERTIES.items()}
"""Each property's identifier as encoded, and its kind."""


def encode_properties(props: Properties) -> bytes:
    """Encode a property block, its length prefix included."""
    if not props:
        return b"\x00"
    out = _encoded(props)
    return encode_varint(len(out)) + out


def encode_property_list(props: Properties) -> bytes:
    """Encode properties one after the other, without the length that leads a property block:
    what one block's parts, encoded apart, are joined from."""
    return bytes(_encoded(props))


def _encoded(props: Properties) -> bytearray:
    out = bytearray()
    for name, value in props.items():
        prefix, kind = _ENCODING[name]
        if kind == PAIR:
            for key, text in value:
                out += prefix + encode_string(key) + encode_string(text)
        elif kind == VARINT:  # a Subscription Identifier, or several in a PUBLISH
            for item in (value if isinstance(value, (list, tuple)) else (value,)):
                out += prefix + encode_varint(item)
        elif kind == BYTE:
            out += prefix
            out.append(int(value))
        elif kind == U16:
            out += prefix + _U16.pack(value)
        elif kind == U32:
            out += prefix + _U32.pack(value)
        elif kind == UTF8:
            out += prefix + encode_string(value)
        else:
            out += prefix + encode_binary(value)
    return out

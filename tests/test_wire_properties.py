"""MQTT 5 properties and the primitive encodings under them (``mqtt_broker/wire/properties.py``):
the identifier table against the spec, each data type's bytes, where each property may appear,
and the rules on repeats, booleans and zeros."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_broker.wire import (
    MQTT_5, NO_PROPERTIES, Auth, Connack, Connect, Disconnect, MalformedPacket, Packet,
    ProtocolError, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe,
    SubscriptionRequest, Unsuback, Unsubscribe, Will, decode, encode,
)
from mqtt_broker.wire.packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK,
    SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
)
from mqtt_broker.wire.properties import (
    BINARY, BYTE, PAIR, PROPERTIES, U16, U32, UTF8, VARINT, WILL, decode_binary,
    decode_properties, decode_string, decode_varint, encode_binary, encode_properties,
    encode_string, encode_varint, _ENCODING,
)

FUZZ = settings(max_examples=250, deadline=None)

_ACKS = {PUBACK, PUBREC, PUBREL, PUBCOMP}
_EVERYWHERE = {CONNECT, CONNACK, PUBLISH, WILL, *_ACKS, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
               UNSUBACK, DISCONNECT, AUTH}

# MQTT 5.0 Table 2-4, copied from the spec independently of the code's table:
# identifier: (name, data type, used in).
SPEC_TABLE: dict[int, tuple[str, int, set[int]]] = {
    0x01: ("payload_format_indicator", BYTE, {PUBLISH, WILL}),
    0x02: ("message_expiry_interval", U32, {PUBLISH, WILL}),
    0x03: ("content_type", UTF8, {PUBLISH, WILL}),
    0x08: ("response_topic", UTF8, {PUBLISH, WILL}),
    0x09: ("correlation_data", BINARY, {PUBLISH, WILL}),
    0x0B: ("subscription_identifier", VARINT, {PUBLISH, SUBSCRIBE}),
    0x11: ("session_expiry_interval", U32, {CONNECT, CONNACK, DISCONNECT}),
    0x12: ("assigned_client_identifier", UTF8, {CONNACK}),
    0x13: ("server_keep_alive", U16, {CONNACK}),
    0x15: ("authentication_method", UTF8, {CONNECT, CONNACK, AUTH}),
    0x16: ("authentication_data", BINARY, {CONNECT, CONNACK, AUTH}),
    0x17: ("request_problem_information", BYTE, {CONNECT}),
    0x18: ("will_delay_interval", U32, {WILL}),
    0x19: ("request_response_information", BYTE, {CONNECT}),
    0x1A: ("response_information", UTF8, {CONNACK}),
    0x1C: ("server_reference", UTF8, {CONNACK, DISCONNECT}),
    0x1F: ("reason_string", UTF8, {CONNACK, *_ACKS, SUBACK, UNSUBACK, DISCONNECT, AUTH}),
    0x21: ("receive_maximum", U16, {CONNECT, CONNACK}),
    0x22: ("topic_alias_maximum", U16, {CONNECT, CONNACK}),
    0x23: ("topic_alias", U16, {PUBLISH}),
    0x24: ("maximum_qos", BYTE, {CONNACK}),
    0x25: ("retain_available", BYTE, {CONNACK}),
    0x26: ("user_property", PAIR, _EVERYWHERE),
    0x27: ("maximum_packet_size", U32, {CONNECT, CONNACK}),
    0x28: ("wildcard_subscription_available", BYTE, {CONNACK}),
    0x29: ("subscription_identifier_available", BYTE, {CONNACK}),
    0x2A: ("shared_subscription_available", BYTE, {CONNACK}),
}

# A value of each data type, and its bytes after the identifier.
SAMPLES: dict[int, tuple[Any, bytes]] = {
    BYTE: (1, b"\x01"),
    U16: (0x1234, b"\x12\x34"),
    U32: (0x12345678, b"\x12\x34\x56\x78"),
    VARINT: (268_435_455, b"\xff\xff\xff\x7f"),
    UTF8: ("é/x", b"\x00\x04\xc3\xa9/x"),
    BINARY: (b"\x00\xff", b"\x00\x02\x00\xff"),
}

BUILDERS: dict[int, Callable[[dict[str, Any]], Packet]] = {
    CONNECT: lambda p: Connect(protocol_level=MQTT_5, client_id="c", properties=p),
    WILL: lambda p: Connect(protocol_level=MQTT_5, client_id="c",
                            will=Will(topic="w", payload=b"", properties=p)),
    CONNACK: lambda p: Connack(properties=p),
    PUBLISH: lambda p: Publish(topic="t", payload=b"x", properties=p),
    PUBACK: lambda p: Puback(packet_id=1, properties=p),
    PUBREC: lambda p: Pubrec(packet_id=1, properties=p),
    PUBREL: lambda p: Pubrel(packet_id=1, properties=p),
    PUBCOMP: lambda p: Pubcomp(packet_id=1, properties=p),
    SUBSCRIBE: lambda p: Subscribe(packet_id=1, properties=p,
                                   subscriptions=(SubscriptionRequest(topic_filter="f"),)),
    SUBACK: lambda p: Suback(packet_id=1, reason_codes=(0,), properties=p),
    UNSUBSCRIBE: lambda p: Unsubscribe(packet_id=1, topic_filters=("f",), properties=p),
    UNSUBACK: lambda p: Unsuback(packet_id=1, reason_codes=(0,), properties=p),
    DISCONNECT: lambda p: Disconnect(properties=p),
    AUTH: lambda p: Auth(reason_code=0x18, properties=p),
}

PACKET_NAMES = {CONNECT: "CONNECT", WILL: "will", CONNACK: "CONNACK", PUBLISH: "PUBLISH",
                PUBACK: "PUBACK", PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP",
                SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
                UNSUBACK: "UNSUBACK", DISCONNECT: "DISCONNECT", AUTH: "AUTH"}


def _value(ident: int, packet_type: int) -> Any:
    name, kind, _ = PROPERTIES[ident]
    if kind == PAIR:
        return [("k", "v"), ("k", "w")]
    value = SAMPLES[kind][0]
    if name == "subscription_identifier" and packet_type == PUBLISH:
        return [value]  # a PUBLISH may carry several [MQTT-3.3.4-4]
    return value


def _packet_with(ident: int, packet_type: int) -> Packet:
    name = PROPERTIES[ident][0]
    properties = {name: _value(ident, packet_type)}
    if name == "authentication_data" and packet_type == CONNECT:  # only with its method (5.0 3.1.2.11.10)
        properties["authentication_method"] = "m"
    return BUILDERS[packet_type](properties)


ALLOWED = [(i, t) for i, (_, _, used) in SPEC_TABLE.items() for t in sorted(used)]
REFUSED = [(i, t) for i, (_, _, used) in SPEC_TABLE.items() for t in sorted(BUILDERS)
           if t not in used]


def _ids(cases: list[tuple[int, int]]) -> list[str]:
    return [f"{PROPERTIES[i][0]}-in-{PACKET_NAMES[t]}" for i, t in cases]


# --- the table ----------------------------------------------------------------------------

def test_property_table_matches_the_spec() -> None:
    assert {ident: (name, kind, set(used)) for ident, (name, kind, used) in PROPERTIES.items()} \
        == SPEC_TABLE
    # The encoder's table: each name's identifier, as it goes on the wire, and kind.
    assert {name: (decode_varint(prefix, 0)[0], kind) for name, (prefix, kind) in _ENCODING.items()} \
        == {name: (ident, kind) for ident, (name, kind, _) in SPEC_TABLE.items()}


# --- where each property may appear ---------------------------------------------------------

@pytest.mark.parametrize("ident, packet_type", ALLOWED, ids=_ids(ALLOWED))
def test_property_round_trips_where_allowed(ident: int, packet_type: int) -> None:
    packet = _packet_with(ident, packet_type)
    raw = encode(packet, MQTT_5)
    decoded = decode(raw, MQTT_5)
    assert decoded == packet
    assert encode(decoded, MQTT_5) == raw


@pytest.mark.parametrize("ident, packet_type", REFUSED, ids=_ids(REFUSED))
def test_property_refused_where_not_allowed(ident: int, packet_type: int) -> None:
    # "A Control Packet which contains an Identifier which is not valid for its packet type
    # ... is a Malformed Packet" (5.0 §2.2.2.2).
    raw = encode(_packet_with(ident, packet_type), MQTT_5)
    with pytest.raises(MalformedPacket, match=f"{PROPERTIES[ident][0]} is not allowed"):
        decode(raw, MQTT_5)


# --- each data type's bytes ------------------------------------------------------------------

@pytest.mark.parametrize("ident", [i for i, (_, kind, _) in PROPERTIES.items() if kind != PAIR],
                         ids=lambda i: PROPERTIES[i][0])
def test_property_bytes_by_data_type(ident: int) -> None:
    name, kind, used = PROPERTIES[ident]
    value, raw = SAMPLES[kind]
    block = bytes((1 + len(raw), ident)) + raw  # length, identifier, value
    assert encode_properties({name: value}) == block
    packet_type = min(used)
    assert decode_properties(block + b"rest", 0, packet_type) == ({name: _value(ident, packet_type)},
                                                                  len(block))


def test_user_properties_keep_order_and_repeats() -> None:
    # [MQTT-3.3.2-18]: user properties are forwarded in order; a name may appear many times.
    pairs = [("b", "1"), ("a", "2"), ("b", "3"), ("", "")]
    block = encode_properties({"user_property": pairs})
    assert block == (b"\x1a"                                    # 26 bytes
                     b"\x26\x00\x01b\x00\x011" b"\x26\x00\x01a\x00\x012"
                     b"\x26\x00\x01b\x00\x013" b"\x26\x00\x00\x00\x00")
    assert decode_properties(block, 0, PUBLISH) == ({"user_property": pairs}, len(block))


def test_user_properties_interleaved_with_others_keep_their_order() -> None:
    block = (b"\x11"
             b"\x26\x00\x01a\x00\x011"    # user property a=1
             b"\x23\x00\x02"              # topic alias 2
             b"\x26\x00\x01a\x00\x010")   # user property a=0
    props, _ = decode_properties(block, 0, PUBLISH)
    assert props == {"user_property": [("a", "1"), ("a", "0")], "topic_alias": 2}


def test_subscription_identifiers_are_a_list_in_publish_and_one_int_in_subscribe() -> None:
    block = b"\x04\x0b\x01\x0b\x7f"
    assert decode_properties(block, 0, PUBLISH)[0] == {"subscription_identifier": [1, 127]}
    assert decode_properties(b"\x02\x0b\x01", 0, PUBLISH)[0] == {"subscription_identifier": [1]}
    assert decode_properties(b"\x02\x0b\x01", 0, SUBSCRIBE)[0] == {"subscription_identifier": 1}
    with pytest.raises(ProtocolError, match="more than once"):
        decode_properties(block, 0, SUBSCRIBE)  # 5.0 §3.8.2.1.2
    assert encode_properties({"subscription_identifier": [1, 127]}) == block
    assert encode_properties({"subscription_identifier": (1, 127)}) == block
    assert encode_properties({"subscription_identifier": 1}) == b"\x02\x0b\x01"


def test_empty_property_block() -> None:
    assert encode_properties({}) == encode_properties(NO_PROPERTIES) == b"\x00"
    props, pos = decode_properties(b"\x00rest", 0, PUBLISH)
    assert props is NO_PROPERTIES and pos == 1
    assert decode_properties(b"xx\x00", 2, CONNACK) == (NO_PROPERTIES, 3)


def test_boolean_properties_given_as_bool_encode_as_one_byte() -> None:
    assert encode_properties({"retain_available": True}) == b"\x02\x25\x01"
    assert encode_properties({"retain_available": False}) == b"\x02\x25\x00"


def test_property_block_with_a_two_byte_length() -> None:
    reason = "r" * 200
    block = encode_properties({"reason_string": reason})
    assert block[:2] == b"\xcb\x01"  # 203 = 1 + 2 + 200
    assert decode_properties(block, 0, DISCONNECT) == ({"reason_string": reason}, len(block))


# --- repeats, booleans, zeros ----------------------------------------------------------------

SINGLE = [i for i, (name, kind, _) in PROPERTIES.items() if kind != PAIR]


@pytest.mark.parametrize("ident", SINGLE, ids=lambda i: PROPERTIES[i][0])
def test_repeated_property_is_a_protocol_error(ident: int) -> None:
    name, kind, used = PROPERTIES[ident]
    packet_type = max(used)
    if name == "subscription_identifier":
        packet_type = SUBSCRIBE  # in PUBLISH repeats are allowed (tested above)
    value = bytes((ident,)) + SAMPLES[kind][1]
    block = encode_varint(2 * len(value)) + value + value
    with pytest.raises(ProtocolError, match=f"{name} appears more than once"):
        decode_properties(block, 0, packet_type)


BOOLEANS = [i for i, (_, kind, _) in PROPERTIES.items() if kind == BYTE]


@pytest.mark.parametrize("ident", BOOLEANS, ids=lambda i: PROPERTIES[i][0])
def test_byte_properties_are_0_or_1(ident: int) -> None:
    name, _, used = PROPERTIES[ident]
    packet_type = min(used)
    for value in (0, 1):
        assert decode_properties(bytes((2, ident, value)), 0, packet_type)[0] == {name: value}
    for value in (2, 0x80, 0xFF):
        with pytest.raises(ProtocolError, match=f"{name} must be 0 or 1"):
            decode_properties(bytes((2, ident, value)), 0, packet_type)


# A topic alias of 0 decodes: the receiver refuses it with 0x94, not 0x82 (5.0 §3.3.2.3.4).
NONZERO = {"subscription_identifier", "receive_maximum", "maximum_packet_size"}
NUMBERS = [i for i, (_, kind, _) in PROPERTIES.items() if kind in (U16, U32, VARINT)]


@pytest.mark.parametrize("ident", NUMBERS, ids=lambda i: PROPERTIES[i][0])
def test_zero_is_refused_only_where_the_spec_says(ident: int) -> None:
    # 5.0 §3.8.2.1.2, §3.1.2.11.3, §3.1.2.11.4: these three may not be 0.
    name, kind, used = PROPERTIES[ident]
    packet_type = SUBSCRIBE if name == "subscription_identifier" else min(used)
    zero = {U16: b"\x00\x00", U32: b"\x00\x00\x00\x00", VARINT: b"\x00"}[kind]
    block = bytes((1 + len(zero), ident)) + zero
    if name in NONZERO:
        with pytest.raises(ProtocolError, match=f"{name} must not be 0"):
            decode_properties(block, 0, packet_type)
    else:
        assert decode_properties(block, 0, packet_type)[0] == {name: 0}


@pytest.mark.parametrize("packet_type", [PUBLISH, WILL])
def test_response_topic_must_be_a_topic_name(packet_type: int) -> None:
    # [MQTT-3.3.2-13, -14]: a topic name, so neither empty nor with a wildcard.
    assert decode_properties(encode_properties({"response_topic": "reply/to/me"}), 0, packet_type)[0] == {
        "response_topic": "reply/to/me"}
    for bad in ("reply/+", "reply/#", "+", "a/#/b", ""):
        with pytest.raises(ProtocolError, match="response topic .* is not a topic name"):
            decode_properties(encode_properties({"response_topic": bad}), 0, packet_type)


def test_largest_values_of_each_width() -> None:
    block = encode_properties({"session_expiry_interval": 0xFFFFFFFF, "receive_maximum": 0xFFFF})
    assert block == b"\x08\x11\xff\xff\xff\xff\x21\xff\xff"
    assert decode_properties(block, 0, CONNECT)[0] == {"session_expiry_interval": 0xFFFFFFFF,
                                                       "receive_maximum": 0xFFFF}


@pytest.mark.parametrize("block, message", [
    (b"\x01\x02", "message_expiry_interval is truncated"),
    (b"\x02\x00\x00", "unknown property identifier 0x00"),
    (b"\x02\x7f\x00", "unknown property identifier 0x7f"),
    (b"\x03\x80\x80\x01", "unknown property identifier 0x4000"),
    (b"\x05", "properties run past"),
    (b"\x80", "variable byte integer runs past"),
])
def test_bad_property_blocks_are_malformed(block: bytes, message: str) -> None:
    with pytest.raises(MalformedPacket, match=message):
        decode_properties(block, 0, PUBLISH)


def test_identifier_that_runs_past_the_block_is_malformed() -> None:
    with pytest.raises(MalformedPacket):
        decode_properties(b"\x01\x80", 0, PUBLISH)


# --- Variable Byte Integers, strings and binary data --------------------------------------

def test_varint_errors() -> None:
    with pytest.raises(MalformedPacket, match="longer than 4 bytes"):
        decode_varint(b"\x80\x80\x80\x80\x01", 0)
    with pytest.raises(MalformedPacket, match="runs past"):
        decode_varint(b"\x80\x80", 0)
    with pytest.raises(MalformedPacket, match="runs past"):
        decode_varint(b"\x05", 1)


@FUZZ
@given(value=st.integers(0, 268_435_455), prefix=st.binary(max_size=3))
def test_varint_round_trip_and_minimal_length(value: int, prefix: bytes) -> None:
    raw = encode_varint(value)
    # [MQTT-1.5.5-1]: the fewest bytes that hold the value.
    assert len(raw) == 1 + (value >= 128) + (value >= 16_384) + (value >= 2_097_152)
    assert decode_varint(prefix + raw + b"\xff", len(prefix)) == (value, len(prefix) + len(raw))


STRINGS = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))


@FUZZ
@given(text=STRINGS)
def test_string_round_trip(text: str) -> None:
    raw = encode_string(text)
    assert raw[:2] == len(text.encode("utf-8")).to_bytes(2, "big")
    assert decode_string(raw, 0) == (text, len(raw))
    assert decode_string(memoryview(b"..." + raw), 3) == (text, 3 + len(raw))


@FUZZ
@given(data=st.binary(max_size=300))
def test_binary_round_trip(data: bytes) -> None:
    raw = encode_binary(data)
    assert decode_binary(raw, 0) == (data, len(raw))
    assert decode_binary(memoryview(raw), 0) == (data, len(raw))


@FUZZ
@given(raw=st.binary(max_size=40))
def test_decode_string_refuses_only_with_malformed_packet(raw: bytes) -> None:
    data = len(raw).to_bytes(2, "big") + raw
    try:
        text, pos = decode_string(data, 0)
    except MalformedPacket:
        valid = True
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            valid = False
        assert not valid or b"\x00" in raw
    else:
        assert pos == len(data) and text.encode("utf-8") == raw and "\x00" not in text


def test_longest_string() -> None:
    text = "x" * 65_535
    raw = encode_string(text)
    assert raw[:2] == b"\xff\xff"
    assert decode_string(raw, 0) == (text, 65_537)


@pytest.mark.parametrize("raw, message", [
    (b"", "length prefix"), (b"\x00", "length prefix"), (b"\x00\x02a", "runs past"),
    (b"\x00\x01\xff", "not well-formed UTF-8"), (b"\x00\x03\xef\xbf", "runs past"),
    (b"\x00\x03\xed\xb0\x80", "not well-formed UTF-8"),  # a lone low surrogate
    (b"\x00\x04\xf4\x90\x80\x80", "not well-formed UTF-8"),  # above U+10FFFF
    (b"\x00\x02\xc1\xbf", "not well-formed UTF-8"),  # overlong
    (b"\x00\x01\x00", "U[+]0000"),
])
def test_bad_strings(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedPacket, match=message):
        decode_string(raw, 0)


def test_non_characters_and_controls_other_than_nul_are_accepted() -> None:
    # [MQTT-1.5.4-3] / [MQTT-1.5.3-3]: U+FEFF is kept, and U+0001..U+001F and non-characters
    # are legal on the wire (a receiver MAY refuse them, the codec does not).
    for text in ("\ufeffa", "\x01\x1f", "\uffff", "\U0010ffff"):
        assert decode_string(encode_string(text), 0)[0] == text


# --- NO_PROPERTIES ------------------------------------------------------------------------

def test_no_properties_is_an_empty_hashable_mapping() -> None:
    assert len(NO_PROPERTIES) == 0 and list(NO_PROPERTIES) == []
    assert NO_PROPERTIES == {} and not NO_PROPERTIES
    assert NO_PROPERTIES.get("topic_alias") is None
    with pytest.raises(KeyError):
        NO_PROPERTIES["topic_alias"]
    assert hash(NO_PROPERTIES) == hash(NO_PROPERTIES) and repr(NO_PROPERTIES) == "{}"
    assert Puback(packet_id=1).properties is NO_PROPERTIES
    assert hash(Puback(packet_id=1)) == hash(Puback(packet_id=1))
    assert Puback(packet_id=1) == Puback(packet_id=1, properties={})

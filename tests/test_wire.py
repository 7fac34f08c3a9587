"""The sans-IO codec, ``mqtt_broker.wire``: byte fixtures, round trips at every protocol level,
the FrameReader's framing and bounds, refusal of malformed packets, and property-based fuzzing.

Property encoding (every type, the allowed-in table) is tested in ``test_wire_properties.py``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqtt_broker.wire import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Auth, Connack, ConnackCode, Connect,
    Disconnect, FrameReader, MalformedPacket, MQTTError, Packet, PacketTooLarge, Pingreq,
    Pingresp, ProtocolError, Puback, Pubcomp, Publish, Pubrec, Pubrel, ReasonCode, Suback,
    Subscribe, SubscriptionRequest, Unsuback, Unsubscribe, UnsupportedProtocolVersion, Will,
    decode, decode_publish, encode, encode_publish, publish_template, v3_connack_code,
)
from mqtt_broker.wire.codec import MAX_REMAINING_LENGTH
from mqtt_broker.wire.packets import PACKET_TYPES
from mqtt_broker.wire.properties import decode_varint, encode_property_list, encode_varint

from conftest import assert_every_field_set
from wire_fixtures import (
    CANONICAL, CONNECT_3_1, CONNECT_3_1_1, CONNECT_5, MALFORMED, PUBLISH_5, PUBLISH_QOS0,
    PUBLISH_QOS1_RETAIN, SUBSCRIBE_5, VALID, Bad, Fixture,
)

ROOT = Path(__file__).resolve().parent.parent
WIRE = ROOT / "mqtt_broker" / "wire"

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def by_name(fixture: Fixture | Bad) -> str:
    return fixture.name


def feed_in_chunks(reader: FrameReader, data: bytes, cuts: list[int]) -> list[Packet]:
    """Feed ``data`` split at ``cuts`` and return every packet the reader produced."""
    packets: list[Packet] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        packets += reader.feed(data[start:cut])
        start = max(start, cut)
    return packets


# --- hand-written fixtures ----------------------------------------------------------------

@pytest.mark.parametrize("fixture", VALID, ids=by_name)
def test_fixture_decodes(fixture: Fixture) -> None:
    packet = decode(fixture.raw, fixture.version)
    assert type(packet) is type(fixture.packet)
    assert packet == fixture.packet


@pytest.mark.parametrize("fixture", CANONICAL, ids=by_name)
def test_fixture_encodes_to_exactly_its_bytes(fixture: Fixture) -> None:
    assert encode(fixture.packet, fixture.version) == fixture.raw


@pytest.mark.parametrize("fixture", [f for f in VALID if not f.canonical], ids=by_name)
def test_longer_forms_decode_and_are_encoded_shorter(fixture: Fixture) -> None:
    # The reason code and property length may be left out when they are 0 (5.0 §3.4.2.1,
    # §3.14.2.1); a receiver takes both forms, the encoder writes the short one.
    short = encode(fixture.packet, fixture.version)
    assert len(short) < len(fixture.raw)
    assert decode(short, fixture.version) == decode(fixture.raw, fixture.version)


@pytest.mark.parametrize("fixture", VALID, ids=by_name)
def test_fixture_through_frame_reader_whole_and_bytewise(fixture: Fixture) -> None:
    whole = FrameReader(version=fixture.version)
    assert whole.feed(fixture.raw) == [fixture.packet]
    assert whole.buffered == 0
    bytewise = FrameReader(version=fixture.version)
    packets: list[Packet] = []
    for i in range(len(fixture.raw)):
        packets += bytewise.feed(fixture.raw[i:i + 1])
        assert bytewise.buffered == (0 if packets else i + 1)
    assert packets == [fixture.packet]


@pytest.mark.parametrize("fixture", [f for f in CANONICAL if f.version == MQTT_3_1_1
                                     and not isinstance(f.packet, Connect)], ids=by_name)
def test_mqtt_3_1_1_fixtures_are_the_same_bytes_in_mqtt_3_1(fixture: Fixture) -> None:
    assert decode(fixture.raw, MQTT_3_1) == fixture.packet
    assert encode(fixture.packet, MQTT_3_1) == fixture.raw


def test_remaining_length_encoding_spec_table() -> None:
    # 3.1.1 Table 2.4 / 5.0 §1.5.5: the edges of one- to four-byte Variable Byte Integers.
    table = {
        0: b"\x00", 127: b"\x7f", 128: b"\x80\x01", 16_383: b"\xff\x7f",
        16_384: b"\x80\x80\x01", 2_097_151: b"\xff\xff\x7f", 2_097_152: b"\x80\x80\x80\x01",
        268_435_455: b"\xff\xff\xff\x7f",
    }
    for value, raw in table.items():
        assert encode_varint(value) == raw
        assert decode_varint(raw + b"tail", 0) == (value, len(raw))
    assert MAX_REMAINING_LENGTH == 268_435_455
    big = Publish(topic="t", payload=b"x" * 16_381)  # remaining length 16 384: three bytes
    assert encode(big)[:4] == b"\x30\x80\x80\x01"
    assert decode(encode(big)) == big


# --- round trips of every packet type at every level --------------------------------------

def packets_3x(level: int) -> list[Packet]:
    """Every packet type MQTT 3.1 and 3.1.1 have, in a few shapes each."""
    name = "MQIsdp" if level == MQTT_3_1 else "MQTT"
    return [
        Connect(protocol_name=name, protocol_level=level, client_id="c", keep_alive=65535),
        Connect(protocol_name=name, protocol_level=level, clean_start=False, client_id="ü-id",
                will=Will(topic="w/ü", payload=b"\x00\x01\x02", qos=2, retain=True),
                username="u", password=b""),
        Connect(protocol_name=name, protocol_level=level, client_id="c",
                will=Will(topic="w", payload=b""), username="only-user"),
        Connack(session_present=True),
        Connack(reason_code=ConnackCode.NOT_AUTHORIZED),
        Publish(topic="a/b", payload=b"x"),
        Publish(topic="a/b", qos=1, packet_id=1, retain=True),
        Publish(topic="日本/語", qos=2, dup=True, packet_id=65535, payload=b"\xff" * 1000),
        Puback(packet_id=1), Pubrec(packet_id=2), Pubrel(packet_id=3), Pubcomp(packet_id=4),
        Subscribe(packet_id=5, subscriptions=(
            SubscriptionRequest(topic_filter="a/#", qos=0),
            SubscriptionRequest(topic_filter="+/b", qos=1),
            SubscriptionRequest(topic_filter="c", qos=2))),
        Suback(packet_id=5, reason_codes=(0, 1, 2, 0x80)),
        Unsubscribe(packet_id=6, topic_filters=("a/#", "+/b")),
        Unsuback(packet_id=6),
        Pingreq(), Pingresp(), Disconnect(),
    ]


_USER = [("name", "value"), ("name", "second value"), ("ü", "")]

PACKETS_5: list[Packet] = [
    Connect(protocol_level=MQTT_5, client_id="c5", keep_alive=30, password=b"secret",
            properties={
                "session_expiry_interval": 0xFFFFFFFF, "receive_maximum": 65535,
                "maximum_packet_size": 1024, "topic_alias_maximum": 0,
                "request_response_information": 1, "request_problem_information": 0,
                "authentication_method": "SCRAM-SHA-1", "authentication_data": b"\x00\x01",
                "user_property": _USER},
            will=Will(topic="will", payload=b"gone", qos=1, properties={
                "will_delay_interval": 5, "payload_format_indicator": 0,
                "message_expiry_interval": 10, "content_type": "text/plain",
                "response_topic": "r", "correlation_data": b"\xff", "user_property": _USER})),
    Connect(protocol_level=MQTT_5, client_id=""),
    Connack(reason_code=ReasonCode.SUCCESS, properties={
        "session_expiry_interval": 1, "receive_maximum": 10, "maximum_qos": 0,
        "retain_available": 0, "maximum_packet_size": 268_435_460,
        "assigned_client_identifier": "auto-xyz", "topic_alias_maximum": 16,
        "reason_string": "welcome", "user_property": _USER,
        "wildcard_subscription_available": 1, "subscription_identifier_available": 0,
        "shared_subscription_available": 1, "server_keep_alive": 120,
        "response_information": "resp/", "server_reference": "other:1883",
        "authentication_method": "m", "authentication_data": b"d"}),
    Connack(reason_code=ReasonCode.BAD_USER_NAME_OR_PASSWORD),
    Publish(topic="a/b", payload=b"m", qos=2, packet_id=7, retain=True, properties={
        "payload_format_indicator": 1, "message_expiry_interval": 0, "topic_alias": 65535,
        "response_topic": "reply/to", "correlation_data": b"", "user_property": _USER,
        "subscription_identifier": [1, 128, 268_435_455], "content_type": ""}),
    Publish(topic="x", properties={"subscription_identifier": [42]}),
    Publish(topic="x"),
    Puback(packet_id=1, reason_code=ReasonCode.NO_MATCHING_SUBSCRIBERS,
           properties={"reason_string": "nobody", "user_property": _USER}),
    Pubrec(packet_id=2, reason_code=ReasonCode.QUOTA_EXCEEDED),
    Pubrel(packet_id=3, reason_code=ReasonCode.PACKET_IDENTIFIER_NOT_FOUND,
           properties={"reason_string": "?"}),
    Pubcomp(packet_id=4, properties={"user_property": [("k", "v")]}),
    Pubcomp(packet_id=4),
    Subscribe(packet_id=8, properties={"subscription_identifier": 268_435_455,
                                       "user_property": _USER}, subscriptions=tuple(
        SubscriptionRequest(topic_filter=f"f/{qos}/{nl}/{rap}/{rh}", qos=qos, no_local=nl,
                            retain_as_published=rap, retain_handling=rh)
        for qos in (0, 1, 2) for nl in (False, True) for rap in (False, True)
        for rh in (0, 1, 2))),
    Suback(packet_id=8, reason_codes=(0, 1, 2, 0x80, 0x8F, 0x9E, 0xA1, 0xA2),
           properties={"reason_string": "partly", "user_property": _USER}),
    Unsubscribe(packet_id=9, topic_filters=("a", "b/+"), properties={"user_property": _USER}),
    Unsuback(packet_id=9, reason_codes=(0x00, 0x11, 0x87), properties={"reason_string": "r"}),
    Pingreq(), Pingresp(),
    Disconnect(reason_code=ReasonCode.SERVER_MOVED, properties={
        "session_expiry_interval": 0, "reason_string": "moved",
        "server_reference": "elsewhere", "user_property": _USER}),
    Disconnect(),
    Auth(reason_code=ReasonCode.RE_AUTHENTICATE, properties={
        "authentication_method": "SCRAM", "authentication_data": b"\x00" * 300,
        "reason_string": "again", "user_property": _USER}),
    Auth(),
]

ROUND_TRIPS = [(level, p) for level in (MQTT_3_1, MQTT_3_1_1) for p in packets_3x(level)]
ROUND_TRIPS += [(MQTT_5, p) for p in PACKETS_5]


def test_round_trips_cover_every_packet_type() -> None:
    for level in (MQTT_3_1, MQTT_3_1_1):
        assert {type(p) for p in packets_3x(level)} == set(PACKET_TYPES) - {Auth}
    assert {type(p) for p in PACKETS_5} == set(PACKET_TYPES)


@pytest.mark.parametrize("level, packet", ROUND_TRIPS,
                         ids=[f"{lv}-{i}-{type(p).__name__}" for i, (lv, p) in enumerate(ROUND_TRIPS)])
def test_round_trip(level: int, packet: Packet) -> None:
    raw = encode(packet, level)
    decoded = decode(raw, level)
    assert type(decoded) is type(packet)
    assert decoded == packet
    assert encode(decoded, level) == raw



@pytest.mark.parametrize("packet", [Pubrel(packet_id=5), Subscribe(packet_id=5, subscriptions=(
    SubscriptionRequest(topic_filter="a/b", qos=1),)), Unsubscribe(packet_id=5, topic_filters=("a/b",))],
    ids=["PUBREL", "SUBSCRIBE", "UNSUBSCRIBE"])
def test_mqtt31_sets_dup_on_a_resent_pubrel_subscribe_or_unsubscribe(packet: Packet) -> None:
    """MQTT 3.1 (2.1, DUP): set "when the client or server attempts to re-deliver a PUBLISH,
    PUBREL, SUBSCRIBE or UNSUBSCRIBE message"; only 3.1.1 fixed their flags to 0010."""
    raw = encode(packet, MQTT_3_1)
    again = bytes((raw[0] | 0x08,)) + raw[1:]
    assert decode(again, MQTT_3_1) == packet
    with pytest.raises(MalformedPacket, match="invalid fixed header flags"):
        decode(bytes((raw[0] | 0x08,)) + encode(packet, MQTT_3_1_1)[1:], MQTT_3_1_1)

@pytest.mark.parametrize("level", [MQTT_3_1, MQTT_3_1_1, MQTT_5])
def test_round_trip_as_one_stream(level: int) -> None:
    # A server-side reader starts at 3.1.1 and takes its level from the CONNECT.
    packets = [p for lv, p in ROUND_TRIPS if lv == level]
    stream = b"".join(encode(p, level) for p in packets)
    reader = FrameReader()
    assert reader.feed(stream[:1]) == []
    assert reader.feed(stream[1:]) == packets
    assert reader.version == level
    assert reader.buffered == 0


def test_mqtt5_fields_are_left_out_for_3x() -> None:
    props = {"reason_string": "r", "user_property": [("k", "v")]}
    for level in (MQTT_3_1, MQTT_3_1_1):
        assert encode(Puback(packet_id=1, reason_code=0x80, properties=props), level) == \
            b"\x40\x02\x00\x01"
        assert encode(Pubrel(packet_id=1, reason_code=0x92), level) == b"\x62\x02\x00\x01"
        assert encode(Publish(topic="t", properties={"topic_alias": 3}), level) == \
            encode(Publish(topic="t"), level) == b"\x30\x03\x00\x01t"
        assert encode(Suback(packet_id=1, reason_codes=(0,), properties=props), level) == \
            b"\x90\x03\x00\x01\x00"
        assert encode(Unsuback(packet_id=1, reason_codes=(0x11,)), level) == b"\xb0\x02\x00\x01"
        assert encode(Disconnect(reason_code=0x8E, properties=props), level) == b"\xe0\x00"
        assert encode(Connack(reason_code=0, properties={"maximum_qos": 1}), level) == \
            b"\x20\x02\x00\x00"
        assert encode(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(
            topic_filter="t", qos=1, no_local=True, retain_as_published=True,
            retain_handling=2),)), level) == b"\x82\x06\x00\x01\x00\x01t\x01"
    assert encode(Connect(client_id="c", properties={"receive_maximum": 1})) == \
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c"


def test_connect_level_decides_its_encoding_not_the_version_argument() -> None:
    assert encode(CONNECT_5.packet, MQTT_3_1_1) == CONNECT_5.raw
    assert encode(CONNECT_3_1_1.packet, MQTT_5) == CONNECT_3_1_1.raw


def test_a_connects_repr_leaves_its_password_out() -> None:
    connect = decode(encode(Connect(client_id="c", username="u", password=b"hunter2")))
    assert connect.password == b"hunter2"
    assert "hunter2" not in repr(connect) and "client_id='c'" in repr(connect)


def test_packets_are_keyword_only_and_frozen_except_publish_and_connect() -> None:
    with pytest.raises(TypeError):
        Puback(1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Connect("MQTT")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Puback(packet_id=1).packet_id = 2  # type: ignore[misc]
    for cls in PACKET_TYPES:
        assert cls.__dictoffset__ == 0  # slotted, or compiled: no __dict__ per packet
        params = getattr(cls, "__dataclass_params__")
        assert params.frozen is (cls not in (Publish, Connect)), cls
    # Mutable for speed: one PUBLISH per message, one CONNECT per connection.
    publish = Publish(topic="t")
    publish.dup = True
    assert publish.dup
    connect = Connect(client_id="c", keep_alive=30)
    assert_every_field_set(connect, client_id="c", keep_alive=30)  # its __init__ is written out
    assert connect == Connect(client_id="c", keep_alive=30) != Connect(client_id="d", keep_alive=30)


COPIES = [copy.copy, copy.deepcopy, lambda packet: pickle.loads(pickle.dumps(packet))]


@pytest.mark.parametrize("copy_of", COPIES, ids=["copy", "deepcopy", "pickle"])
@pytest.mark.parametrize("packet", PACKETS_5, ids=[f"{i}-{type(p).__name__}" for i, p in enumerate(PACKETS_5)])
def test_every_packet_copies_and_pickles_equal_to_itself(packet: Packet, copy_of: Any) -> None:
    """As in the pure-Python build. Compiled, a frozen packet (a CONNECT's will too) raised
    FrozenInstanceError, its fields being set after it was made, and a copy without properties
    was unequal to its original: its NO_PROPERTIES was another, unequal to the first."""
    copied = copy_of(packet)
    assert type(copied) is type(packet) and copied == packet


@pytest.mark.parametrize("copy_of", COPIES, ids=["copy", "deepcopy", "pickle"])
def test_the_shared_empty_properties_copy_and_pickle_as_themselves(copy_of: Any) -> None:
    assert copy_of(NO_PROPERTIES) is NO_PROPERTIES
    assert copy_of(Puback(packet_id=1)).properties is NO_PROPERTIES


# --- encode_publish and the shared publish template ----------------------------------------

@pytest.mark.parametrize("payload", [b"payload", b"p" * 200, b"p" * 20_000], ids=["short", "2-byte", "3-byte"])
@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
@pytest.mark.parametrize("qos", [1, 2])
def test_publish_template_offset_is_the_packet_identifier(level: int, qos: int, payload: bytes) -> None:
    """Whatever the size of its remaining length (one byte, two, three)."""
    props = {"user_property": [("k", "v")]} if level == MQTT_5 else NO_PROPERTIES
    raw, offset = publish_template("topic/ü", payload, qos, True, props, level, packet_id=1)
    assert raw[offset:offset + 2] == b"\x00\x01"
    patched = bytearray(raw)
    patched[offset:offset + 2] = (0xBEEF).to_bytes(2, "big")
    patched[0] |= 0x08  # DUP
    assert decode(bytes(patched), level) == Publish(
        topic="topic/ü", payload=payload, qos=qos, retain=True, dup=True, packet_id=0xBEEF,
        properties=props)


@pytest.mark.parametrize("payload", [b"payload", b"p" * 20_000], ids=["short", "3-byte"])
@pytest.mark.parametrize("qos", [0, 1])
def test_a_publish_template_of_properties_after_shared_ones_is_that_of_them_all(qos: int, payload: bytes) -> None:
    """A receiver's own properties, put after those encoded once for many receivers (``shared``),
    make the PUBLISH that all of them would (whatever the size of the property block's length,
    and of the packet's)."""
    shared = {"content_type": "text/plain", "user_property": [("k", "v")] * 50}
    own = {"message_expiry_interval": 9, "subscription_identifier": (1, 200), "topic_alias": 3}
    for first, then in ((shared, own), ({}, own), (shared, {}), ({}, {})):
        assert publish_template("topic/ü", payload, qos, True, then, MQTT_5, qos,
                                shared=encode_property_list(first)) == publish_template(
            "topic/ü", payload, qos, True, {**first, **then}, MQTT_5, qos)


def test_encode_publish_is_encode() -> None:
    for fixture in (PUBLISH_QOS0, PUBLISH_QOS1_RETAIN, PUBLISH_5):
        assert isinstance(fixture.packet, Publish)
        assert encode_publish(fixture.packet, fixture.version) == fixture.raw


# --- FrameReader -------------------------------------------------------------------------

STREAM_5 = [CONNECT_5, PUBLISH_5, SUBSCRIBE_5]
STREAM_5_RAW = b"".join(f.raw for f in STREAM_5) + b"\xc0\x00" + b"\xe0\x00"
STREAM_5_PACKETS: list[Packet] = [f.packet for f in STREAM_5] + [Pingreq(), Disconnect()]

STREAM_3_1_RAW = CONNECT_3_1.raw + PUBLISH_QOS1_RETAIN.raw + b"\xc0\x00"
STREAM_3_1_PACKETS = [CONNECT_3_1.packet, PUBLISH_QOS1_RETAIN.packet, Pingreq()]


def test_reader_whole_stream() -> None:
    reader = FrameReader()
    assert reader.version == MQTT_3_1_1
    assert reader.feed(STREAM_5_RAW) == STREAM_5_PACKETS
    assert reader.version == MQTT_5  # learnt from the CONNECT
    assert reader.buffered == 0
    assert reader.feed(b"") == []


def test_reader_learns_mqtt_3_1_from_connect() -> None:
    reader = FrameReader()
    assert reader.feed(STREAM_3_1_RAW) == STREAM_3_1_PACKETS
    assert reader.version == MQTT_3_1


def test_reader_one_byte_at_a_time() -> None:
    reader = FrameReader()
    packets: list[Packet] = []
    boundaries = set()
    for i in range(len(STREAM_5_RAW)):
        new = reader.feed(STREAM_5_RAW[i:i + 1])
        assert len(new) <= 1
        if new:
            boundaries.add(i + 1)
        packets += new
        # Everything since the last complete packet is buffered, nothing more.
        last = max(boundaries, default=0)
        assert reader.buffered == i + 1 - last
    assert packets == STREAM_5_PACKETS
    assert reader.buffered == 0


def test_reader_says_how_much_of_a_packet_is_still_to_come() -> None:
    frame = encode(Publish(topic="t", payload=b"x" * 200))  # a Remaining Length of two bytes
    reader = FrameReader()
    for i in range(len(frame)):
        reader.feed(frame[i:i + 1])
        assert reader.awaited() == (0 if i < 2 else len(frame) - i - 1)
    reader.feed(frame + frame[:10])  # one whole packet, and part of the next
    assert reader.awaited() == len(frame) - 10


@pytest.mark.parametrize("raw, expected", [(STREAM_5_RAW, STREAM_5_PACKETS),
                                           (STREAM_3_1_RAW, STREAM_3_1_PACKETS)],
                         ids=["mqtt5", "mqtt3.1"])
def test_reader_split_at_every_position(raw: bytes, expected: list[Packet]) -> None:
    for cut in range(len(raw) + 1):
        reader = FrameReader()
        assert reader.feed(raw[:cut]) + reader.feed(raw[cut:]) == expected, cut
        assert reader.buffered == 0


def test_reader_split_at_every_pair_of_positions() -> None:
    raw = PUBLISH_QOS1_RETAIN.raw + b"\xc0\x00" + b"\x40\x02\x00\x0a" + PUBLISH_QOS0.raw
    expected = [PUBLISH_QOS1_RETAIN.packet, Pingreq(), Puback(packet_id=10), PUBLISH_QOS0.packet]
    for first in range(len(raw) + 1):
        for second in range(first, len(raw) + 1):
            reader = FrameReader()
            assert feed_in_chunks(reader, raw, [first, second]) == expected, (first, second)


def test_reader_several_packets_and_a_partial_tail() -> None:
    tail = PUBLISH_5.raw
    for keep in range(len(tail)):
        reader = FrameReader()
        assert reader.feed(STREAM_5_RAW + tail[:keep]) == STREAM_5_PACKETS
        assert reader.buffered == keep
        assert reader.feed(tail[keep:]) == [PUBLISH_5.packet]
        assert reader.buffered == 0


def test_reader_receive_data_and_next_packet() -> None:
    reader = FrameReader()
    reader.receive_data(b"\xc0\x00\xd0")
    assert reader.buffered == 3
    assert reader.next_packet() == Pingreq()
    assert reader.buffered == 1
    assert reader.next_packet() is None
    reader.receive_data(b"\x00\xe0")
    assert reader.next_packet() == Pingresp()
    assert reader.next_packet() is None
    assert reader.buffered == 1


def test_reader_waits_for_an_incomplete_remaining_length() -> None:
    reader = FrameReader()
    assert reader.feed(b"\x30") == []
    assert reader.feed(b"\x80") == []  # continuation bit: more length to come
    assert reader.feed(b"\x80") == []
    assert reader.buffered == 3
    # Four bytes are the most [MQTT-1.5.5-1]: 268 435 455 is still a legal length, so wait.
    reader = FrameReader()
    assert reader.feed(b"\x30\xff\xff\xff\x7f") == []
    assert reader.buffered == 5


@pytest.mark.parametrize("raw", [b"\x30\xff\xff\xff\xff", b"\x30\xff\xff\xff\xff\x01",
                                 b"\xc0\x80\x80\x80\x80\x00"])
def test_remaining_length_of_five_bytes_is_malformed(raw: bytes) -> None:
    # The fifth byte need not have arrived: four bytes with continuation bits are already wrong.
    with pytest.raises(MalformedPacket, match="longer than 4 bytes") as caught:
        FrameReader().feed(raw)
    assert caught.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("raw", [b"\x30\x80\x00", b"\x30\x81\x80\x00" + b"\0" * 1, b"\xc0\x80\x00"])
def test_remaining_length_in_more_bytes_than_it_needs_is_malformed(raw: bytes) -> None:
    # [MQTT-1.5.5-1]: the fewest bytes; a PUBLISH's frame may be sent on as it came.
    with pytest.raises(MalformedPacket, match="fewest bytes") as caught:
        FrameReader().feed(raw)
    assert caught.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("raw", [b"\x80\x00", b"\xff\x80\x00", b"\x80\x80\x80\x00"])
def test_a_variable_byte_integer_in_more_bytes_than_it_needs_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedPacket, match="fewest bytes"):
        decode_varint(raw, 0)


def test_packet_too_large_on_the_fixed_header_alone() -> None:
    reader = FrameReader(max_packet_size=1024)
    # PUBLISH with remaining length 268 435 455: only the four-byte header has arrived.
    with pytest.raises(PacketTooLarge) as caught:
        reader.feed(b"\x30\xff\xff\xff\x7f")
    assert caught.value.reason_code == ReasonCode.PACKET_TOO_LARGE == 0x95
    assert reader.buffered == 5  # the body was never waited for


def test_packet_too_large_counts_the_whole_packet() -> None:
    # Maximum Packet Size is the total size, fixed header included (5.0 §3.1.2.11.4).
    packet = PUBLISH_QOS0.raw  # 12 bytes: 2 of fixed header, 10 of body
    assert FrameReader(max_packet_size=12).feed(packet) == [PUBLISH_QOS0.packet]
    with pytest.raises(PacketTooLarge):
        FrameReader(max_packet_size=11).feed(packet[:2])
    two_byte_header = encode(Publish(topic="t", payload=b"x" * 200))  # 3 + 203 bytes
    assert len(two_byte_header) == 206
    assert FrameReader(max_packet_size=206).feed(two_byte_header)
    with pytest.raises(PacketTooLarge):
        FrameReader(max_packet_size=205).feed(two_byte_header[:3])


def test_packet_too_large_after_good_packets_in_the_same_chunk() -> None:
    reader = FrameReader(max_packet_size=64)
    reader.receive_data(b"\xc0\x00" + b"\x30\x80\x01")  # PINGREQ, then a 131-byte PUBLISH header
    assert reader.next_packet() == Pingreq()
    with pytest.raises(PacketTooLarge):
        reader.next_packet()


def test_default_maximum_accepts_the_largest_legal_packet_header() -> None:
    reader = FrameReader()
    assert reader.max_packet_size == MAX_REMAINING_LENGTH + 5
    assert reader.feed(b"\x30\xff\xff\xff\x7f\x00") == []


def test_decode_wants_exactly_one_packet() -> None:
    with pytest.raises(MalformedPacket, match="not exactly one packet"):
        decode(b"\xc0\x00\xc0\x00")
    with pytest.raises(MalformedPacket, match="not exactly one packet"):
        decode(PUBLISH_QOS0.raw[:-1])
    with pytest.raises(MalformedPacket, match="not exactly one packet"):
        decode(b"")


# --- malformed and refused packets --------------------------------------------------------

def _remaining_length(raw: bytes) -> tuple[int, int]:
    return decode_varint(raw, 1)


@pytest.mark.parametrize("bad", MALFORMED, ids=by_name)
def test_malformed_table_is_framed_correctly(bad: Bad) -> None:
    # Each case must be one whole frame, so that it is refused for its own reason.
    length, header = _remaining_length(bad.raw)
    assert header + length == len(bad.raw)


@pytest.mark.parametrize("bad", MALFORMED, ids=by_name)
def test_malformed_packet_is_refused(bad: Bad) -> None:
    with pytest.raises(MQTTError) as caught:
        decode(bad.raw, bad.version)
    assert type(caught.value) is bad.error
    assert caught.value.reason_code == bad.error.reason_code
    assert re.search(bad.match, caught.value.message), caught.value.message


@pytest.mark.parametrize("bad", MALFORMED, ids=by_name)
def test_malformed_packet_is_refused_when_fed_bytewise(bad: Bad) -> None:
    reader = FrameReader(version=bad.version)
    with pytest.raises(bad.error):
        for i in range(len(bad.raw)):
            packets = reader.feed(bad.raw[i:i + 1])
            assert packets == []


def test_malformed_packet_after_a_good_one_in_the_same_chunk() -> None:
    reader = FrameReader()
    reader.receive_data(PUBLISH_QOS0.raw + b"\x60\x02\x00\x0a")  # PUBREL with flags 0000
    assert reader.next_packet() == PUBLISH_QOS0.packet
    with pytest.raises(MalformedPacket, match="flags"):
        reader.next_packet()


def _wrong_flag_cases() -> list[tuple[str, int, bytes]]:
    cases = []
    seen = set()
    for fixture in CANONICAL:
        first = fixture.raw[0]
        kind = first >> 4
        if kind == 3 or kind in seen:  # PUBLISH flags are DUP, QoS and RETAIN
            continue
        seen.add(kind)
        for flags in range(16):
            if flags != first & 0x0F:
                cases.append((f"{type(fixture.packet).__name__}-0x{flags:x}", fixture.version,
                              bytes((kind << 4 | flags,)) + fixture.raw[1:]))
    assert len(seen) == 14
    return cases


@pytest.mark.parametrize("name, version, raw", _wrong_flag_cases(),
                         ids=[c[0] for c in _wrong_flag_cases()])
def test_reserved_fixed_header_flags_must_match(name: str, version: int, raw: bytes) -> None:
    # [MQTT-2.2.2-1], [MQTT-2.2.2-2]: 0010 for PUBREL, SUBSCRIBE, UNSUBSCRIBE, else 0000.
    with pytest.raises(MalformedPacket, match="invalid fixed header flags"):
        decode(raw, version)


@pytest.mark.parametrize("level", [MQTT_3_1, MQTT_3_1_1, MQTT_5])
def test_publish_header_flags(level: int) -> None:
    body = b"\x00\x01t\x00\x01" + (b"\x00" if level == MQTT_5 else b"")
    for flags in range(16):
        raw = bytes((0x30 | flags, len(body))) + body
        qos = flags >> 1 & 3
        if qos == 3:
            with pytest.raises(MalformedPacket, match="QoS 3"):  # [MQTT-3.3.1-4]
                decode(raw, level)
        elif flags & 8 and not qos:
            with pytest.raises(MalformedPacket, match="DUP"):  # [MQTT-3.3.1-2]
                decode(raw, level)
        else:
            packet = decode(raw, level)
            assert isinstance(packet, Publish)
            assert (packet.qos, packet.dup, packet.retain) == (qos, bool(flags & 8), bool(flags & 1))


def test_auth_is_a_packet_only_in_mqtt5() -> None:
    assert FrameReader(version=MQTT_5).feed(b"\xf0\x00") == [Auth()]
    reader = FrameReader()
    assert reader.feed(CONNECT_3_1_1.raw) == [CONNECT_3_1_1.packet]
    with pytest.raises(MalformedPacket, match="reserved packet type 15"):
        reader.feed(b"\xf0\x00")


def test_password_without_user_name_only_refused_before_mqtt5() -> None:
    # [MQTT-3.1.2-22] in 3.1.1; MQTT 5 dropped the rule (5.0 §3.1.2.9).
    packet = Connect(protocol_level=MQTT_5, client_id="c", password=b"p")
    assert decode(encode(packet, MQTT_5)) == packet
    v4 = encode(Connect(client_id="c", password=b"p"))
    with pytest.raises(MalformedPacket, match="password without a user name"):
        decode(v4)


@pytest.mark.parametrize("flags, payload, username", [
    (0x82, b"\x00\x01c", None),                  # user name flag, no user name
    (0xC2, b"\x00\x01c\x00\x01u", "u"),          # password flag, no password
    (0xC2, b"\x00\x01c", None),                  # neither
    (0x0A, b"\x00\x01c", None),                  # will QoS 1 without the will flag
    (0x22, b"\x00\x01c", None),                  # will retain without the will flag
    (0x03, b"\x00\x01c", None),                  # the reserved bit (and clean session)
], ids=["user-name-missing", "password-missing", "both-missing", "will-qos", "will-retain", "reserved"])
def test_mqtt31_connect_flags_that_3_1_1_made_errors_are_read_as_3_1_reads_them(
        flags: int, payload: bytes, username: str | None) -> None:
    # MQTT V3.1, 3.1: "the User Name flag is set, but the User Name string is missing. This is
    # valid" (the same for the password); the will QoS and retain are "disregarded" without the
    # will flag, and the reserved bit is not checked. They are errors from 3.1.1 on
    # [MQTT-3.1.2-3, -13, -15, -19, -21].
    def raw(name: bytes, level: int) -> bytes:
        body = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c" + payload
        return bytes((0x10, len(body))) + body

    assert decode(raw(b"MQIsdp", MQTT_3_1)) == Connect(
        protocol_name="MQIsdp", protocol_level=MQTT_3_1, clean_start=bool(flags & 2), keep_alive=60,
        client_id="c", username=username)
    with pytest.raises(MalformedPacket):
        decode(raw(b"MQTT", MQTT_3_1_1))


def test_errors_carry_their_reason_codes() -> None:
    assert MQTTError("x").reason_code == ReasonCode.UNSPECIFIED_ERROR
    assert MalformedPacket("x").reason_code == ReasonCode.MALFORMED_PACKET == 0x81
    assert ProtocolError("x").reason_code == ReasonCode.PROTOCOL_ERROR == 0x82
    assert PacketTooLarge("x").reason_code == ReasonCode.PACKET_TOO_LARGE == 0x95
    assert UnsupportedProtocolVersion("x").reason_code == 0x84
    error = ProtocolError("topic", ReasonCode.TOPIC_NAME_INVALID)
    assert error.reason_code == 0x90 and error.message == "topic" and str(error) == "topic"
    assert ProtocolError("y").reason_code == 0x82  # the override is per instance
    for cls in (MalformedPacket, ProtocolError, PacketTooLarge, UnsupportedProtocolVersion):
        assert issubclass(cls, MQTTError)


def test_v3_connack_codes() -> None:
    assert v3_connack_code(ReasonCode.SUCCESS) == ConnackCode.ACCEPTED == 0
    assert v3_connack_code(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION) == 1
    assert v3_connack_code(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID) == 2
    assert v3_connack_code(ReasonCode.BAD_USER_NAME_OR_PASSWORD) == 4
    assert v3_connack_code(ReasonCode.BAD_AUTHENTICATION_METHOD) == 4
    assert v3_connack_code(ReasonCode.NOT_AUTHORIZED) == 5
    assert v3_connack_code(ReasonCode.BANNED) == 5
    assert v3_connack_code(ReasonCode.SERVER_BUSY) == ConnackCode.SERVER_UNAVAILABLE == 3
    assert v3_connack_code(0x80) == 3
    assert isinstance(v3_connack_code(0x99), ConnackCode)


# --- property-based tests -----------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
               max_size=20)
TOPIC_NAME = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#"),
                     min_size=1, max_size=20)
PACKET_ID = st.integers(1, 65535)
USER_PROPERTIES = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3)

PUBLISH_PROPERTIES = st.fixed_dictionaries({}, optional={
    "payload_format_indicator": st.integers(0, 1),
    "message_expiry_interval": st.integers(0, 2**32 - 1),
    "content_type": TEXT,
    "response_topic": TOPIC_NAME,
    "correlation_data": st.binary(max_size=20),
    "subscription_identifier": st.lists(st.integers(1, MAX_REMAINING_LENGTH), min_size=1,
                                        max_size=3),
    "topic_alias": st.integers(1, 65535),
    "user_property": USER_PROPERTIES,
})

CONNECT_PROPERTIES = st.fixed_dictionaries({}, optional={
    "session_expiry_interval": st.integers(0, 2**32 - 1),
    "receive_maximum": st.integers(1, 65535),
    "maximum_packet_size": st.integers(1, 2**32 - 1),
    "topic_alias_maximum": st.integers(0, 65535),
    "request_response_information": st.integers(0, 1),
    "request_problem_information": st.integers(0, 1),
    "authentication_method": TEXT,
    "authentication_data": st.binary(max_size=20),
    "user_property": USER_PROPERTIES,
}).filter(lambda p: "authentication_method" in p or "authentication_data" not in p)  # (5.0 3.1.2.11.10)

WILL_PROPERTIES = st.fixed_dictionaries({}, optional={
    "will_delay_interval": st.integers(0, 2**32 - 1),
    "payload_format_indicator": st.integers(0, 1),
    "message_expiry_interval": st.integers(0, 2**32 - 1),
    "content_type": TEXT,
    "response_topic": TOPIC_NAME,
    "correlation_data": st.binary(max_size=20),
    "user_property": USER_PROPERTIES,
})


@st.composite
def publishes(draw: st.DrawFn, level: int) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        topic=draw(TEXT), payload=draw(st.binary(max_size=300)), qos=qos,
        retain=draw(st.booleans()), dup=draw(st.booleans()) if qos else False,
        packet_id=draw(PACKET_ID) if qos else 0,
        properties=draw(PUBLISH_PROPERTIES) if level == MQTT_5 else NO_PROPERTIES)


@st.composite
def subscribes(draw: st.DrawFn, level: int) -> Subscribe:
    v5 = level == MQTT_5
    requests = draw(st.lists(st.builds(
        SubscriptionRequest, topic_filter=TEXT, qos=st.integers(0, 2),
        no_local=st.booleans() if v5 else st.just(False),
        retain_as_published=st.booleans() if v5 else st.just(False),
        retain_handling=st.integers(0, 2) if v5 else st.just(0)), min_size=1, max_size=5))
    properties = NO_PROPERTIES
    if v5:
        properties = draw(st.fixed_dictionaries({}, optional={
            "subscription_identifier": st.integers(1, MAX_REMAINING_LENGTH),
            "user_property": USER_PROPERTIES}))
    return Subscribe(packet_id=draw(PACKET_ID), subscriptions=tuple(requests),
                     properties=properties)


@st.composite
def connects(draw: st.DrawFn, level: int) -> Connect:
    v5 = level == MQTT_5
    will = None
    if draw(st.booleans()):
        will = Will(topic=draw(TEXT), payload=draw(st.binary(max_size=50)),
                    qos=draw(st.integers(0, 2)), retain=draw(st.booleans()),
                    properties=draw(WILL_PROPERTIES) if v5 else NO_PROPERTIES)
    username = draw(st.none() | TEXT)
    # Before MQTT 5 a password needs a user name [MQTT-3.1.2-22].
    password = draw(st.none() | st.binary(max_size=20)) if v5 or username is not None else None
    return Connect(
        protocol_name="MQIsdp" if level == MQTT_3_1 else "MQTT", protocol_level=level,
        clean_start=draw(st.booleans()), keep_alive=draw(st.integers(0, 65535)),
        client_id=draw(TEXT), will=will, username=username, password=password,
        properties=draw(CONNECT_PROPERTIES) if v5 else NO_PROPERTIES)


def _check_round_trip(packet: Packet, level: int) -> None:
    raw = encode(packet, level)
    assert decode(raw, level) == packet
    reader = FrameReader(version=level)
    assert feed_in_chunks(reader, raw, [len(raw) // 2]) == [packet]


# pytest-twisted wraps test functions once per item, which breaks @given under
# @pytest.mark.parametrize; the level is drawn instead.
ALL_LEVELS = st.sampled_from([MQTT_3_1, MQTT_3_1_1, MQTT_5])


@FUZZ
@given(data=st.data(), level=ALL_LEVELS)
def test_publish_round_trip(level: int, data: st.DataObject) -> None:
    _check_round_trip(data.draw(publishes(level)), level)


@FUZZ
@given(data=st.data(), level=st.sampled_from([MQTT_3_1_1, MQTT_5]))
def test_subscribe_round_trip(level: int, data: st.DataObject) -> None:
    _check_round_trip(data.draw(subscribes(level)), level)


@FUZZ
@given(data=st.data(), level=ALL_LEVELS)
def test_connect_round_trip(level: int, data: st.DataObject) -> None:
    packet = data.draw(connects(level))
    _check_round_trip(packet, level)
    reader = FrameReader()  # a server-side reader learns the level from the CONNECT
    assert reader.feed(encode(packet)) == [packet]
    assert reader.version == level


@FUZZ
@given(data=st.data(), level=ALL_LEVELS)
def test_decode_publish_reads_one_whole_frame_as_the_reader_does(level: int, data: st.DataObject) -> None:
    packet = data.draw(publishes(level))
    raw = encode(packet, level)
    assert decode_publish(raw, level) == packet == FrameReader(version=level).feed(raw)[0]


@pytest.mark.parametrize("raw", [
    b"",
    bytes((0x20, 2, 0, 0)),  # a CONNACK
    bytes((0x30,)),  # no remaining length
    bytes((0x30, 0x80)),  # a remaining length that does not end
    bytes((0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01)),  # five bytes of it
    bytes((0x30, 5, 0, 1, 0x61)),  # shorter than it says
    bytes((0x30, 3, 0, 1, 0x61, 0x62)),  # longer than it says (two frames, or garbage after one)
    bytes((0x36, 3, 0, 1, 0x61)),  # QoS 3
], ids=["empty", "connack", "no-length", "unended-length", "five-byte-length", "short", "long", "qos3"])
def test_decode_publish_refuses_what_is_not_one_whole_publish(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode_publish(raw, MQTT_5)


@FUZZ
@given(first=st.integers(0x30, 0x3F), body=st.binary(max_size=120), cut=st.integers(0, 8), level=ALL_LEVELS)
def test_decode_publish_of_garbage_raises_only_malformed_packet(first: int, body: bytes, cut: int,
                                                                  level: int) -> None:
    raw = (bytes((first,)) + encode_varint(len(body)) + body)[:len(body) + 2 + cut]
    try:
        packet = decode_publish(raw, level)
    except MalformedPacket:
        return
    assert FrameReader(version=level).feed(raw) == [packet]


def _consume(reader: FrameReader, data: bytes, cuts: list[int]) -> list[tuple[Packet, int]]:
    """Feed garbage; return the packets decoded (with the level each was decoded at) until the
    reader refuses the stream. Anything raised but an MQTTError fails the test."""
    decoded: list[tuple[Packet, int]] = []
    start = 0
    try:
        for cut in [*sorted(cuts), len(data)]:
            chunk = data[start:cut]
            start = max(start, cut)
            level = reader.version
            packets = reader.feed(chunk)
            for packet in packets:
                if isinstance(packet, Connect):
                    level = packet.protocol_level
                decoded.append((packet, level))
    except MQTTError as error:
        assert isinstance(error.reason_code, ReasonCode)
    # Each packet takes at least two bytes, so feeding always ends.
    assert len(decoded) <= len(data) // 2
    return decoded


def _check_re_encoding(decoded: list[tuple[Packet, int]]) -> None:
    # Whatever the decoder accepts, the encoder writes back as bytes that decode the same.
    for packet, level in decoded:
        assert decode(encode(packet, level), level) == packet


@FUZZ
@given(data=st.binary(max_size=600), level=ALL_LEVELS,
       cuts=st.lists(st.integers(0, 600), max_size=6),
       limit=st.sampled_from([16, 1024, MAX_REMAINING_LENGTH + 5]))
def test_garbage_raises_only_mqtt_errors(data: bytes, level: int, cuts: list[int],
                                         limit: int) -> None:
    _check_re_encoding(_consume(FrameReader(max_packet_size=limit, version=level), data, cuts))


@FUZZ
@given(first=st.integers(0, 255), body=st.binary(max_size=120),
       level=ALL_LEVELS)
def test_framed_garbage_raises_only_mqtt_errors(first: int, body: bytes, level: int) -> None:
    # A correct fixed header in front of random bytes reaches every packet decoder.
    raw = bytes((first,)) + encode_varint(len(body)) + body
    _check_re_encoding(_consume(FrameReader(version=level), raw, []))


@FUZZ
@given(fixture=st.sampled_from(VALID), data=st.data())
def test_mutated_fixtures_raise_only_mqtt_errors(fixture: Fixture, data: st.DataObject) -> None:
    raw = bytearray(fixture.raw)
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["replace", "insert", "delete", "flip"]))
        if action == "replace":
            raw[index] = data.draw(st.integers(0, 255))
        elif action == "insert":
            raw.insert(index, data.draw(st.integers(0, 255)))
        elif action == "delete" and len(raw) > 1:
            del raw[index]
        else:
            raw[index] ^= 1 << data.draw(st.integers(0, 7))
    _check_re_encoding(_consume(FrameReader(version=fixture.version), bytes(raw),
                                [data.draw(st.integers(0, len(raw)))]))


# --- the codec stays free of Twisted and asyncio ----------------------------------------------

def test_importing_the_codec_does_not_import_twisted() -> None:
    code = ("import sys, mqtt_broker.wire; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'asyncio')); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_codec_modules_import_only_the_standard_library_and_each_other() -> None:
    allowed = {"__future__", "copyreg", "dataclasses", "enum", "mypy_extensions", "struct", "typing"}
    for path in sorted(WIRE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: another wire module
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_the_reader_keeps_no_copy_of_what_it_has_read() -> None:
    from mqtt_broker.wire import Pingreq
    reader = FrameReader()
    assert reader.feed(encode(Pingreq()) * 3) == [Pingreq()] * 3
    assert reader.buffered == 0 and reader._buffer == b""  # an idle connection holds nothing
    assert reader.feed(encode(Pingreq())[:1]) == [] and reader.buffered == 1


@pytest.mark.parametrize("raw", [b"\x40\x03\x00\x0a\x05", b"\x50\x03\x00\x0a\x92", b"\x62\x03\x00\x0a\x80",
                                 b"\x70\x03\x00\x0a\x10", b"\xe0\x01\x01", b"\xe0\x01\x18"],
                         ids=["PUBACK 0x05", "PUBREC 0x92", "PUBREL 0x80", "PUBCOMP 0x10", "DISCONNECT 0x01",
                              "DISCONNECT 0x18"])
def test_a_reason_code_the_packet_may_not_carry_is_a_protocol_error(raw: bytes) -> None:
    """[MQTT-3.4.2-1] and the like: the sender uses one of the packet's own reason codes; another
    is data the protocol does not allow [MQTT-4.13.1-1] (Mosquitto answers it so). Taken as any byte."""
    with pytest.raises(ProtocolError):
        decode(raw, MQTT_5)


def test_an_mqtt5_reader_reads_the_311_refusal_of_its_protocol_level() -> None:
    """A server of 3.1.1 answers an MQTT 5 CONNECT with 20 02 00 01 [MQTT-3.1.2-2] (this broker
    too, "which every version can read"): an MQTT 5 reader (a bridge's) took it for a malformed
    packet, never told it was refused for its protocol level."""
    [connack] = FrameReader(version=MQTT_5).feed(b"\x20\x02\x00\x01")
    assert isinstance(connack, Connack) and connack.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION


def test_what_is_passed_on_is_made_sendable() -> None:
    from mqtt_broker.wire.properties import sendable
    assert sendable("no\0pe") == "nope"
    assert sendable("a\udc80b") == "a?b"
    long = sendable("é" * 40000)  # 80,000 bytes: cut between characters
    assert len(long.encode()) == 65534 and long == "é" * 32767

"""Byte fixtures for the MQTT codec: one table, commented per field, named by spec id.

``VALID`` holds packets with the exact bytes they encode to (``canonical``) or, for the few
shorter-than-necessary forms a peer may send, only decode from. ``MALFORMED`` holds byte
strings that must be refused, with the :class:`MQTTError` subclass that says why. Both tables
drive ``tests/test_wire.py`` and can drive protocol tests too.

Spec ids are MQTT 3.1.1 ids (``[MQTT-x.y.z-n]``) unless the fixture is MQTT 5, where they are
the MQTT 5.0 ids; sections are cited (``5.0 §2.2.2.2``) where a rule has no id.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqtt_broker.wire import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, Auth, Connack, Connect, Disconnect, MalformedPacket,
    MQTTError, Packet, Pingreq, Pingresp, ProtocolError, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, SubscriptionRequest, Unsuback, Unsubscribe,
    UnsupportedProtocolVersion, Will,
)


@dataclass(frozen=True)
class Fixture:
    name: str
    version: int
    packet: Packet
    raw: bytes
    canonical: bool = True
    """False for a form the decoder accepts but the encoder never writes (it writes a shorter one)."""


@dataclass(frozen=True)
class Bad:
    name: str
    version: int
    raw: bytes
    error: type[MQTTError]
    match: str
    """A regular expression the error message must match, so that the case fails for its own
    reason and not an earlier one (a wrong remaining length, say)."""


# --- CONNECT ----------------------------------------------------------------------------

CONNECT_3_1_1 = Fixture(
    # The variable header is the spec's non-normative example (3.1.1 Figure 3.6).
    "CONNECT 3.1.1, will + user name + password, spec example header", MQTT_3_1_1,
    Connect(protocol_level=MQTT_3_1_1, clean_start=True, keep_alive=10, client_id="client-1",
            will=Will(topic="w/t", payload=b"bye", qos=1), username="user", password=b"pw"),
    b"\x10"                     # CONNECT, reserved flags 0000 [MQTT-2.2.2-1]
    b"\x28"                     # remaining length 40
    b"\x00\x04MQTT"             # protocol name [MQTT-3.1.2-1]
    b"\x04"                     # protocol level 4 [MQTT-3.1.2-2]
    b"\xce"                     # user name, password, will QoS 1, will flag, clean session
    b"\x00\x0a"                 # keep alive 10 s
    b"\x00\x08client-1"         # client identifier [MQTT-3.1.3-3]
    b"\x00\x03w/t"              # will topic [MQTT-3.1.3-10]
    b"\x00\x03bye"              # will message
    b"\x00\x04user"             # user name [MQTT-3.1.3-11]
    b"\x00\x02pw",              # password
)

CONNECT_3_1 = Fixture(
    "CONNECT 3.1 (MQIsdp, level 3)", MQTT_3_1,
    Connect(protocol_name="MQIsdp", protocol_level=MQTT_3_1, clean_start=True, keep_alive=60,
            client_id="c31"),
    b"\x10"                     # CONNECT
    b"\x11"                     # remaining length 17
    b"\x00\x06MQIsdp"           # MQTT 3.1 protocol name
    b"\x03"                     # protocol level 3
    b"\x02"                     # clean session
    b"\x00\x3c"                 # keep alive 60 s
    b"\x00\x03c31",             # client identifier
)

CONNECT_3_1_1_MINIMAL = Fixture(
    "CONNECT 3.1.1, empty client id, persistent session", MQTT_3_1_1,
    Connect(clean_start=False, keep_alive=0, client_id=""),
    b"\x10\x0c"                 # CONNECT, remaining length 12
    b"\x00\x04MQTT\x04"         # protocol name, level 4
    b"\x00"                     # no flags
    b"\x00\x00"                 # keep alive off
    b"\x00\x00",                # zero-length client identifier [MQTT-3.1.3-6]
)

CONNECT_5 = Fixture(
    # The variable header is the spec's non-normative example (5.0 Figure 3-6).
    "CONNECT 5.0, session expiry, will with will delay, spec example header", MQTT_5,
    Connect(protocol_level=MQTT_5, clean_start=True, keep_alive=10, client_id="client-1",
            will=Will(topic="w/t", payload=b"bye", qos=1,
                      properties={"will_delay_interval": 30}),
            username="user", password=b"pw", properties={"session_expiry_interval": 10}),
    b"\x10"                     # CONNECT
    b"\x34"                     # remaining length 52
    b"\x00\x04MQTT\x05"         # protocol name, level 5 [MQTT-3.1.2-2]
    b"\xce"                     # user name, password, will QoS 1, will flag, clean start
    b"\x00\x0a"                 # keep alive 10 s
    b"\x05"                     # property length 5
    b"\x11\x00\x00\x00\x0a"     #   session expiry interval 10
    b"\x00\x08client-1"         # client identifier
    b"\x05"                     # will property length 5
    b"\x18\x00\x00\x00\x1e"     #   will delay interval 30
    b"\x00\x03w/t"              # will topic
    b"\x00\x03bye"              # will payload
    b"\x00\x04user"             # user name
    b"\x00\x02pw",              # password
)

CONNECT_5_PASSWORD_ONLY = Fixture(
    "CONNECT 5.0, password without user name is allowed (5.0 §3.1.2.9)", MQTT_5,
    Connect(protocol_level=MQTT_5, client_id="c", password=b"token"),
    b"\x10\x15"                 # CONNECT, remaining length 21
    b"\x00\x04MQTT\x05"         # protocol name, level 5
    b"\x42"                     # password, clean start
    b"\x00\x00"                 # keep alive
    b"\x00"                     # no properties
    b"\x00\x01c"                # client identifier
    b"\x00\x05token",           # password
)

# --- CONNACK ----------------------------------------------------------------------------

CONNACK_3_1_1 = Fixture(
    "CONNACK 3.1.1, session present, accepted", MQTT_3_1_1,
    Connack(session_present=True, reason_code=0),
    b"\x20\x02"                 # CONNACK, remaining length 2
    b"\x01"                     # session present [MQTT-3.2.2-2]
    b"\x00",                    # return code 0: accepted
)

CONNACK_3_1_1_REFUSED = Fixture(
    "CONNACK 3.1.1, unacceptable protocol version [MQTT-3.1.2-2]", MQTT_3_1_1,
    Connack(reason_code=1),
    b"\x20\x02\x00"             # CONNACK, no session [MQTT-3.2.2-4]
    b"\x01",                    # return code 1
)

CONNACK_5 = Fixture(
    "CONNACK 5.0 with byte, u16, u32, utf8, binary and user properties", MQTT_5,
    Connack(session_present=False, reason_code=0, properties={
        "maximum_qos": 1, "server_keep_alive": 60, "session_expiry_interval": 3600,
        "assigned_client_identifier": "auto-1", "authentication_data": b"\xde\xad",
        "user_property": [("k", "v")]}),
    b"\x20"                     # CONNACK
    b"\x22"                     # remaining length 34
    b"\x00"                     # no session
    b"\x00"                     # reason: success
    b"\x1f"                     # property length 31
    b"\x24\x01"                 #   maximum QoS 1 (byte)
    b"\x13\x00\x3c"             #   server keep alive 60 (u16)
    b"\x11\x00\x00\x0e\x10"     #   session expiry interval 3600 (u32)
    b"\x12\x00\x06auto-1"       #   assigned client identifier (utf8)
    b"\x16\x00\x02\xde\xad"     #   authentication data (binary)
    b"\x26\x00\x01k\x00\x01v",  #   user property k=v (string pair)
)

# --- PUBLISH ----------------------------------------------------------------------------

PUBLISH_QOS0 = Fixture(
    "PUBLISH QoS 0: no packet identifier [MQTT-2.3.1-5]", MQTT_3_1_1,
    Publish(topic="a/b", payload=b"hello"),
    b"\x30"                     # PUBLISH, QoS 0, no DUP, no RETAIN
    b"\x0a"                     # remaining length 10
    b"\x00\x03a/b"              # topic name [MQTT-3.3.2-1]
    b"hello",                   # payload: the rest of the packet
)

PUBLISH_QOS1_RETAIN = Fixture(
    "PUBLISH QoS 1 retained, spec example topic and packet id (3.1.1 Figure 3.11)", MQTT_3_1_1,
    Publish(topic="a/b", payload=b"\x01\x02", qos=1, retain=True, packet_id=10),
    b"\x33"                     # PUBLISH, QoS 1, RETAIN
    b"\x09"                     # remaining length 9
    b"\x00\x03a/b"              # topic name
    b"\x00\x0a"                 # packet identifier 10
    b"\x01\x02",                # payload
)

PUBLISH_QOS2_DUP = Fixture(
    "PUBLISH QoS 2 DUP, empty payload", MQTT_3_1_1,
    Publish(topic="a/b", qos=2, dup=True, packet_id=0x1234),
    b"\x3c"                     # PUBLISH, DUP, QoS 2
    b"\x07"                     # remaining length 7
    b"\x00\x03a/b"              # topic name
    b"\x12\x34",                # packet identifier 0x1234; zero-length payload
)

PUBLISH_TWO_BYTE_LENGTH = Fixture(
    "PUBLISH with a two-byte remaining length (205)", MQTT_3_1_1,
    Publish(topic="a/b", payload=b"x" * 200),
    b"\x30"                     # PUBLISH, QoS 0
    b"\xcd\x01"                 # remaining length 205 = 0x4d + 1 * 128
    b"\x00\x03a/b"              # topic name
    + b"x" * 200,               # payload
)

PUBLISH_5 = Fixture(
    "PUBLISH 5.0 with every PUBLISH property, two subscription identifiers", MQTT_5,
    Publish(topic="a/b", payload=b"hi", qos=1, packet_id=10, properties={
        "payload_format_indicator": 1, "message_expiry_interval": 60,
        "content_type": "text/plain", "response_topic": "reply",
        "correlation_data": b"\xbe\xef", "subscription_identifier": [1, 268_435_455],
        "topic_alias": 5, "user_property": [("a", "1"), ("a", "2")]}),
    b"\x32"                     # PUBLISH, QoS 1
    b"\x43"                     # remaining length 67
    b"\x00\x03a/b"              # topic name
    b"\x00\x0a"                 # packet identifier 10
    b"\x39"                     # property length 57
    b"\x01\x01"                 #   payload format indicator: UTF-8 (byte)
    b"\x02\x00\x00\x00\x3c"     #   message expiry interval 60 (u32)
    b"\x03\x00\x0atext/plain"   #   content type (utf8)
    b"\x08\x00\x05reply"        #   response topic (utf8)
    b"\x09\x00\x02\xbe\xef"     #   correlation data (binary)
    b"\x0b\x01"                 #   subscription identifier 1 (varint)
    b"\x0b\xff\xff\xff\x7f"     #   subscription identifier 268435455 [MQTT-3.3.4-4]
    b"\x23\x00\x05"             #   topic alias 5 (u16)
    b"\x26\x00\x01a\x00\x011"   #   user property a=1
    b"\x26\x00\x01a\x00\x012"   #   user property a=2: order and repeats kept [MQTT-3.3.2-18]
    b"hi",                      # payload
)

PUBLISH_5_ALIAS_ONLY = Fixture(
    "PUBLISH 5.0 with an empty topic and a topic alias (5.0 §3.3.2.3.4)", MQTT_5,
    Publish(topic="", payload=b"p", properties={"topic_alias": 7}),
    b"\x30\x07"                 # PUBLISH QoS 0, remaining length 7
    b"\x00\x00"                 # zero-length topic name
    b"\x03"                     # property length 3
    b"\x23\x00\x07"             #   topic alias 7
    b"p",                       # payload
)

# --- publish acknowledgements -------------------------------------------------------------

PUBACK_3_1_1 = Fixture("PUBACK 3.1.1", MQTT_3_1_1, Puback(packet_id=10),
                       b"\x40\x02"      # PUBACK, remaining length 2
                       b"\x00\x0a")     # packet identifier 10
PUBREC_3_1_1 = Fixture("PUBREC 3.1.1", MQTT_3_1_1, Pubrec(packet_id=10),
                       b"\x50\x02\x00\x0a")
PUBREL_3_1_1 = Fixture("PUBREL 3.1.1: flags 0010 [MQTT-3.6.1-1]", MQTT_3_1_1,
                       Pubrel(packet_id=10),
                       b"\x62\x02\x00\x0a")
PUBCOMP_3_1_1 = Fixture("PUBCOMP 3.1.1", MQTT_3_1_1, Pubcomp(packet_id=0xffff),
                        b"\x70\x02\xff\xff")

PUBACK_5_REASON = Fixture(
    "PUBACK 5.0, reason only, property length omitted (5.0 §3.4.2.2)", MQTT_5,
    Puback(packet_id=10, reason_code=0x10),
    b"\x40\x03"                 # PUBACK, remaining length 3
    b"\x00\x0a"                 # packet identifier
    b"\x10",                    # reason: no matching subscribers
)
PUBREC_5_PROPERTIES = Fixture(
    "PUBREC 5.0 with a reason string", MQTT_5,
    Pubrec(packet_id=10, reason_code=0x80, properties={"reason_string": "no"}),
    b"\x50\x09"                 # PUBREC, remaining length 9
    b"\x00\x0a"                 # packet identifier
    b"\x80"                     # reason: unspecified error
    b"\x05"                     # property length 5
    b"\x1f\x00\x02no",          #   reason string
)
PUBREL_5_SUCCESS = Fixture(
    "PUBREL 5.0, success: reason and properties omitted", MQTT_5, Pubrel(packet_id=10),
    b"\x62\x02\x00\x0a")
PUBCOMP_5_NOT_FOUND = Fixture(
    "PUBCOMP 5.0, packet identifier not found", MQTT_5,
    Pubcomp(packet_id=10, reason_code=0x92),
    b"\x70\x03\x00\x0a\x92")
PUBACK_5_LONG_SUCCESS = Fixture(
    "PUBACK 5.0, success written out with an empty property block", MQTT_5,
    Puback(packet_id=10),
    b"\x40\x04"                 # PUBACK, remaining length 4
    b"\x00\x0a"                 # packet identifier
    b"\x00"                     # reason: success
    b"\x00",                    # property length 0
    canonical=False,
)
PUBACK_5_REASON_ZERO = Fixture(
    "PUBACK 5.0, success reason byte without properties", MQTT_5, Puback(packet_id=10),
    b"\x40\x03\x00\x0a\x00", canonical=False)

# --- SUBSCRIBE / SUBACK -------------------------------------------------------------------

SUBSCRIBE_3_1_1 = Fixture(
    "SUBSCRIBE 3.1.1, spec example filters (3.1.1 Figure 3.22)", MQTT_3_1_1,
    Subscribe(packet_id=10, subscriptions=(SubscriptionRequest(topic_filter="a/b", qos=1),
                                           SubscriptionRequest(topic_filter="c/d", qos=2))),
    b"\x82"                     # SUBSCRIBE, flags 0010 [MQTT-3.8.1-1]
    b"\x0e"                     # remaining length 14
    b"\x00\x0a"                 # packet identifier 10
    b"\x00\x03a/b\x01"          # filter a/b, requested QoS 1
    b"\x00\x03c/d\x02",         # filter c/d, requested QoS 2
)

SUBSCRIBE_5 = Fixture(
    "SUBSCRIBE 5.0 with a subscription identifier and every option", MQTT_5,
    Subscribe(packet_id=11, properties={"subscription_identifier": 5}, subscriptions=(
        SubscriptionRequest(topic_filter="a/+", qos=1, no_local=True, retain_as_published=True,
                            retain_handling=2),
        SubscriptionRequest(topic_filter="$share/g/x", qos=0, retain_handling=1))),
    b"\x82"                     # SUBSCRIBE
    b"\x18"                     # remaining length 24
    b"\x00\x0b"                 # packet identifier 11
    b"\x02"                     # property length 2
    b"\x0b\x05"                 #   subscription identifier 5
    b"\x00\x03a/+"              # filter a/+
    b"\x2d"                     #   QoS 1, no local, retain as published, retain handling 2
    b"\x00\x0a$share/g/x"       # filter $share/g/x
    b"\x10",                    #   QoS 0, retain handling 1
)

SUBACK_3_1_1 = Fixture(
    "SUBACK 3.1.1 with a failure code [MQTT-3.9.3-2]", MQTT_3_1_1,
    Suback(packet_id=10, reason_codes=(1, 2, 0x80)),
    b"\x90\x05"                 # SUBACK, remaining length 5
    b"\x00\x0a"                 # packet identifier
    b"\x01\x02\x80",            # granted QoS 1, granted QoS 2, failure
)

SUBACK_5 = Fixture(
    "SUBACK 5.0", MQTT_5,
    Suback(packet_id=10, reason_codes=(0, 0xA2)),
    b"\x90\x05"                 # SUBACK, remaining length 5
    b"\x00\x0a"                 # packet identifier
    b"\x00"                     # no properties
    b"\x00\xa2",                # granted QoS 0, wildcard subscriptions not supported
)

# --- UNSUBSCRIBE / UNSUBACK ---------------------------------------------------------------

UNSUBSCRIBE_3_1_1 = Fixture(
    "UNSUBSCRIBE 3.1.1: flags 0010 [MQTT-3.10.1-1]", MQTT_3_1_1,
    Unsubscribe(packet_id=10, topic_filters=("a/b",)),
    b"\xa2\x07"                 # UNSUBSCRIBE, remaining length 7
    b"\x00\x0a"                 # packet identifier
    b"\x00\x03a/b",             # topic filter
)

UNSUBSCRIBE_5 = Fixture(
    "UNSUBSCRIBE 5.0 with a user property", MQTT_5,
    Unsubscribe(packet_id=10, topic_filters=("a/b", "c/d"),
                properties={"user_property": [("k", "v")]}),
    b"\xa2\x14"                 # UNSUBSCRIBE, remaining length 20
    b"\x00\x0a"                 # packet identifier
    b"\x07"                     # property length 7
    b"\x26\x00\x01k\x00\x01v"   #   user property
    b"\x00\x03a/b"              # topic filter
    b"\x00\x03c/d",             # topic filter
)

UNSUBACK_3_1_1 = Fixture("UNSUBACK 3.1.1", MQTT_3_1_1, Unsuback(packet_id=10),
                         b"\xb0\x02\x00\x0a")

UNSUBACK_5 = Fixture(
    "UNSUBACK 5.0", MQTT_5, Unsuback(packet_id=10, reason_codes=(0, 0x11)),
    b"\xb0\x05"                 # UNSUBACK, remaining length 5
    b"\x00\x0a"                 # packet identifier
    b"\x00"                     # no properties
    b"\x00\x11",                # success, no subscription existed
)

# --- PINGREQ, PINGRESP, DISCONNECT, AUTH --------------------------------------------------

PINGREQ = Fixture("PINGREQ", MQTT_3_1_1, Pingreq(), b"\xc0\x00")
PINGRESP = Fixture("PINGRESP", MQTT_3_1_1, Pingresp(), b"\xd0\x00")
DISCONNECT_3_1_1 = Fixture("DISCONNECT 3.1.1", MQTT_3_1_1, Disconnect(), b"\xe0\x00")
DISCONNECT_5_SHORT = Fixture(
    "DISCONNECT 5.0, normal: reason omitted (5.0 §3.14.2.1)", MQTT_5, Disconnect(), b"\xe0\x00")
DISCONNECT_5_REASON = Fixture(
    "DISCONNECT 5.0, session taken over, reason only", MQTT_5, Disconnect(reason_code=0x8E),
    b"\xe0\x01\x8e")
DISCONNECT_5_PROPERTIES = Fixture(
    "DISCONNECT 5.0 with will message, session expiry and reason string", MQTT_5,
    Disconnect(reason_code=0x04, properties={"session_expiry_interval": 0,
                                             "reason_string": "bye"}),
    b"\xe0\x0d"                 # DISCONNECT, remaining length 13
    b"\x04"                     # reason: disconnect with will message
    b"\x0b"                     # property length 11
    b"\x11\x00\x00\x00\x00"     #   session expiry interval 0
    b"\x1f\x00\x03bye",         #   reason string
)
DISCONNECT_5_REASON_ZERO = Fixture(
    "DISCONNECT 5.0, success reason byte written out", MQTT_5, Disconnect(), b"\xe0\x01\x00",
    canonical=False)
AUTH_5 = Fixture(
    "AUTH 5.0, continue authentication", MQTT_5,
    Auth(reason_code=0x18, properties={"authentication_method": "SCRAM",
                                       "authentication_data": b"\x01\x02\x03"}),
    b"\xf0\x10"                 # AUTH, remaining length 16
    b"\x18"                     # reason: continue authentication
    b"\x0e"                     # property length 14
    b"\x15\x00\x05SCRAM"        #   authentication method
    b"\x16\x00\x03\x01\x02\x03",  # authentication data
)
AUTH_5_EMPTY = Fixture("AUTH 5.0, success: reason omitted (5.0 §3.15.2.1)", MQTT_5, Auth(),
                       b"\xf0\x00")

VALID: list[Fixture] = [
    CONNECT_3_1_1, CONNECT_3_1, CONNECT_3_1_1_MINIMAL, CONNECT_5, CONNECT_5_PASSWORD_ONLY,
    CONNACK_3_1_1, CONNACK_3_1_1_REFUSED, CONNACK_5,
    PUBLISH_QOS0, PUBLISH_QOS1_RETAIN, PUBLISH_QOS2_DUP, PUBLISH_TWO_BYTE_LENGTH, PUBLISH_5,
    PUBLISH_5_ALIAS_ONLY,
    PUBACK_3_1_1, PUBREC_3_1_1, PUBREL_3_1_1, PUBCOMP_3_1_1, PUBACK_5_REASON,
    PUBREC_5_PROPERTIES, PUBREL_5_SUCCESS, PUBCOMP_5_NOT_FOUND, PUBACK_5_LONG_SUCCESS,
    PUBACK_5_REASON_ZERO,
    SUBSCRIBE_3_1_1, SUBSCRIBE_5, SUBACK_3_1_1, SUBACK_5,
    UNSUBSCRIBE_3_1_1, UNSUBSCRIBE_5, UNSUBACK_3_1_1, UNSUBACK_5,
    PINGREQ, PINGRESP, DISCONNECT_3_1_1, DISCONNECT_5_SHORT, DISCONNECT_5_REASON,
    DISCONNECT_5_PROPERTIES, DISCONNECT_5_REASON_ZERO, AUTH_5, AUTH_5_EMPTY,
]

CANONICAL = [f for f in VALID if f.canonical]


# --- malformed and refused packets --------------------------------------------------------

_V4, _V5 = MQTT_3_1_1, MQTT_5
_FLAGS = "invalid fixed header flags"
_UTF8 = "not well-formed UTF-8"
_NUL = "U[+]0000"
_PAST = "runs past the end of the packet"
_NOT_ALLOWED = "is not allowed in this packet"
_TWICE = "appears more than once"

MALFORMED: list[Bad] = [
    # Fixed header.
    Bad("PUBREL with flags 0000 [MQTT-3.6.1-1]", _V4, b"\x60\x02\x00\x0a", MalformedPacket,
        _FLAGS),
    Bad("SUBSCRIBE with flags 0000 [MQTT-3.8.1-1]", _V4,
        b"\x80\x08\x00\x0a\x00\x03a/b\x00", MalformedPacket, _FLAGS),
    Bad("UNSUBSCRIBE with flags 0000 [MQTT-3.10.1-1]", _V4,
        b"\xa0\x07\x00\x0a\x00\x03a/b", MalformedPacket, _FLAGS),
    Bad("PUBACK with flags 0010 [MQTT-2.2.2-2]", _V4, b"\x42\x02\x00\x0a", MalformedPacket,
        _FLAGS),
    Bad("PINGREQ with flags 0001 [MQTT-2.2.2-2]", _V4, b"\xc1\x00", MalformedPacket, _FLAGS),
    Bad("reserved packet type 0", _V4, b"\x00\x00", MalformedPacket, "reserved packet type 0"),
    Bad("AUTH (type 15) on a 3.1.1 stream: reserved", _V4, b"\xf0\x00", MalformedPacket,
        "reserved packet type 15"),
    Bad("AUTH on a 3.1 stream: reserved", MQTT_3_1, b"\xf0\x00", MalformedPacket,
        "reserved packet type 15"),

    # PUBLISH header and packet identifiers.
    Bad("PUBLISH QoS 3 [MQTT-3.3.1-4]", _V4, b"\x36\x07\x00\x03a/b\x00\x01", MalformedPacket,
        "QoS 3"),
    Bad("PUBLISH QoS 3, 5.0 [MQTT-3.3.1-4]", _V5, b"\x36\x08\x00\x03a/b\x00\x01\x00",
        MalformedPacket, "QoS 3"),
    Bad("PUBLISH DUP at QoS 0 [MQTT-3.3.1-2]", _V4, b"\x38\x05\x00\x03a/b", MalformedPacket,
        "DUP"),
    Bad("PUBLISH QoS 1 with packet identifier 0 [MQTT-2.3.1-1]", _V4,
        b"\x32\x07\x00\x03a/b\x00\x00", ProtocolError, "packet identifier 0"),
    Bad("PUBLISH QoS 2 ends inside the packet identifier", _V4,
        b"\x34\x06\x00\x03a/b\x00", MalformedPacket, "two-byte integer"),
    Bad("SUBSCRIBE with packet identifier 0 [MQTT-2.3.1-1]", _V4,
        b"\x82\x08\x00\x00\x00\x03a/b\x00", ProtocolError, "packet identifier 0"),
    Bad("UNSUBSCRIBE with packet identifier 0 [MQTT-2.3.1-1]", _V4,
        b"\xa2\x07\x00\x00\x00\x03a/b", ProtocolError, "packet identifier 0"),
    Bad("PUBACK with packet identifier 0 [MQTT-2.3.1-1]", _V4, b"\x40\x02\x00\x00",
        ProtocolError, "packet identifier 0"),
    Bad("PUBREL with packet identifier 0, 5.0 [MQTT-2.2.1-3]", _V5, b"\x62\x02\x00\x00",
        ProtocolError, "packet identifier 0"),
    Bad("PUBACK with half a packet identifier", _V4, b"\x40\x01\x00", MalformedPacket,
        "two-byte integer"),

    # CONNECT.
    Bad("CONNECT reserved flag set [MQTT-3.1.2-3]", _V4,
        b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x00\x00\x00", MalformedPacket, "reserved flag"),
    Bad("CONNECT will QoS 1 without will flag [MQTT-3.1.2-13]", _V4,
        b"\x10\x0c\x00\x04MQTT\x04\x0a\x00\x00\x00\x00", MalformedPacket, "without a will"),
    Bad("CONNECT will retain without will flag [MQTT-3.1.2-15]", _V4,
        b"\x10\x0c\x00\x04MQTT\x04\x22\x00\x00\x00\x00", MalformedPacket, "without a will"),
    Bad("CONNECT will QoS 3 [MQTT-3.1.2-14]", _V4,
        b"\x10\x12\x00\x04MQTT\x04\x1e\x00\x00\x00\x00\x00\x01t\x00\x01m", MalformedPacket,
        "will QoS 3"),
    Bad("CONNECT will QoS 3, 5.0 (5.0 §3.1.2.6)", _V5,
        b"\x10\x14\x00\x04MQTT\x05\x1e\x00\x00\x00\x00\x00\x00\x00\x01t\x00\x01m",
        MalformedPacket, "will QoS 3"),
    Bad("CONNECT password without user name, 3.1.1 [MQTT-3.1.2-22]", _V4,
        b"\x10\x10\x00\x04MQTT\x04\x42\x00\x00\x00\x00\x00\x02pw", MalformedPacket,
        "password without a user name"),
    Bad("CONNECT password without user name, 3.1", MQTT_3_1,
        b"\x10\x12\x00\x06MQIsdp\x03\x42\x00\x00\x00\x00\x00\x02pw", MalformedPacket,
        "password without a user name"),
    Bad("CONNECT unknown protocol name [MQTT-3.1.2-1]", _V4,
        b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x00\x00\x00", ProtocolError, "unknown protocol name"),
    Bad("CONNECT protocol name MQTT, level 6 [MQTT-3.1.2-2]", _V4,
        b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x00\x00\x00", UnsupportedProtocolVersion, "level 6"),
    Bad("CONNECT protocol name MQTT, level 3 [MQTT-3.1.2-2]", _V4,
        b"\x10\x0c\x00\x04MQTT\x03\x02\x00\x00\x00\x00", UnsupportedProtocolVersion, "level 3"),
    Bad("CONNECT protocol name MQIsdp, level 4", _V4,
        b"\x10\x0e\x00\x06MQIsdp\x04\x02\x00\x00\x00\x00", UnsupportedProtocolVersion,
        "level 4"),
    Bad("CONNECT ends before the protocol level", _V4, b"\x10\x06\x00\x04MQTT",
        MalformedPacket, "before the protocol level"),
    Bad("CONNECT ends inside the keep alive", _V4, b"\x10\x08\x00\x04MQTT\x04\x02",
        MalformedPacket, "inside its variable header"),
    Bad("CONNECT without a client identifier", _V4,
        b"\x10\x0a\x00\x04MQTT\x04\x02\x00\x00", MalformedPacket, "length prefix"),
    Bad("CONNECT 5.0 without a property length", _V5,
        b"\x10\x0a\x00\x04MQTT\x05\x02\x00\x00", MalformedPacket, "variable byte integer"),
    Bad("CONNECT with will flag but no will topic", _V4,
        b"\x10\x0c\x00\x04MQTT\x04\x06\x00\x00\x00\x00", MalformedPacket, "length prefix"),
    Bad("CONNECT with user name flag but no user name", _V4,
        b"\x10\x0c\x00\x04MQTT\x04\x82\x00\x00\x00\x00", MalformedPacket, "length prefix"),
    Bad("CONNECT with a trailing byte", _V4,
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x00\x00", MalformedPacket, "trailing bytes"),

    # CONNACK.
    Bad("CONNACK with reserved acknowledge flags [MQTT-3.2.2-1]", _V4, b"\x20\x02\x02\x00",
        MalformedPacket, "bad CONNACK"),
    Bad("CONNACK of one byte", _V4, b"\x20\x01\x00", MalformedPacket, "bad CONNACK"),
    Bad("CONNACK with a trailing byte, 3.1.1", _V4, b"\x20\x03\x00\x00\x00", MalformedPacket,
        "trailing bytes"),
    Bad("CONNACK 5.0 without a property length", _V5, b"\x20\x02\x00\x00", MalformedPacket,
        "variable byte integer"),

    # UTF-8 Encoded Strings: well-formed [MQTT-1.5.3-1], no U+0000 [MQTT-1.5.3-2].
    Bad("topic with ill-formed UTF-8 [MQTT-1.5.3-1]", _V4, b"\x30\x04\x00\x02\xc3\x28",
        MalformedPacket, _UTF8),
    Bad("topic with a UTF-16 surrogate encoded in UTF-8 [MQTT-1.5.3-1]", _V4,
        b"\x30\x05\x00\x03\xed\xa0\x80", MalformedPacket, _UTF8),
    Bad("topic with an overlong encoding of U+0000 [MQTT-1.5.3-1]", _V4,
        b"\x30\x04\x00\x02\xc0\x80", MalformedPacket, _UTF8),
    Bad("topic with U+0000 [MQTT-1.5.3-2]", _V4, b"\x30\x05\x00\x03a\x00b", MalformedPacket,
        _NUL),
    Bad("client identifier with U+0000 [MQTT-1.5.3-2]", _V4,
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01\x00", MalformedPacket, _NUL),
    Bad("will topic with ill-formed UTF-8 [MQTT-1.5.3-1]", _V4,
        b"\x10\x11\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x01\xfe\x00\x00", MalformedPacket,
        _UTF8),
    Bad("user name with U+0000 [MQTT-1.5.3-2]", _V4,
        b"\x10\x0f\x00\x04MQTT\x04\x82\x00\x00\x00\x00\x00\x01\x00", MalformedPacket, _NUL),
    Bad("topic filter with ill-formed UTF-8 [MQTT-1.5.3-1]", _V4,
        b"\x82\x06\x00\x01\x00\x01\xff\x00", MalformedPacket, _UTF8),
    Bad("unsubscribe filter with U+0000 [MQTT-1.5.3-2]", _V4, b"\xa2\x05\x00\x01\x00\x01\x00",
        MalformedPacket, _NUL),
    Bad("user property name with ill-formed UTF-8, 5.0 [MQTT-1.5.4-1]", _V5,
        b"\x30\x0b\x00\x01t\x07\x26\x00\x01\xff\x00\x01v", MalformedPacket, _UTF8),
    Bad("content type with U+0000, 5.0 [MQTT-1.5.4-2]", _V5,
        b"\x30\x08\x00\x01t\x04\x03\x00\x01\x00", MalformedPacket, _NUL),

    # Truncated strings and binary data.
    Bad("topic length prefix cut short", _V4, b"\x30\x01\x00", MalformedPacket, "length prefix"),
    Bad("topic longer than the packet", _V4, b"\x30\x05\x00\x0aabc", MalformedPacket, _PAST),
    Bad("will payload longer than the packet", _V4,
        b"\x10\x12\x00\x04MQTT\x04\x06\x00\x00\x00\x00\x00\x01t\x00\x09m", MalformedPacket,
        _PAST),
    Bad("password longer than the packet", _V4,
        b"\x10\x12\x00\x04MQTT\x04\xc2\x00\x00\x00\x00\x00\x01u\x00\x09p", MalformedPacket,
        _PAST),

    # Trailing bytes, and bodies where none belong.
    Bad("PUBACK 3.1.1 with a reason code byte", _V4, b"\x40\x03\x00\x0a\x00", MalformedPacket,
        "wrong length"),
    Bad("PUBACK 5.0 with bytes after its properties", _V5,
        b"\x40\x05\x00\x0a\x00\x00\xff", MalformedPacket, "trailing bytes"),
    Bad("UNSUBACK 3.1.1 with a trailing byte", _V4, b"\xb0\x03\x00\x0a\x00", MalformedPacket,
        "wrong length"),
    Bad("PINGREQ with a body (3.1.1 §3.12)", _V4, b"\xc0\x01\x00", MalformedPacket,
        "PINGREQ with a body"),
    Bad("PINGRESP with a body", _V4, b"\xd0\x01\x00", MalformedPacket, "PINGRESP with a body"),
    Bad("DISCONNECT 3.1.1 with a body", _V4, b"\xe0\x01\x00", MalformedPacket,
        "DISCONNECT with a body"),
    Bad("DISCONNECT 5.0 with bytes after its properties", _V5, b"\xe0\x03\x00\x00\x00",
        MalformedPacket, "trailing bytes"),
    Bad("AUTH 5.0 with bytes after its properties", _V5, b"\xf0\x03\x18\x00\x00",
        MalformedPacket, "trailing bytes"),

    # SUBSCRIBE payload.
    Bad("SUBSCRIBE without a topic filter, 3.1.1 [MQTT-3.8.3-3]", _V4, b"\x82\x02\x00\x0a",
        ProtocolError, "without a topic filter"),
    Bad("SUBSCRIBE without a topic filter, 5.0 [MQTT-3.8.3-2]", _V5, b"\x82\x03\x00\x0a\x00",
        ProtocolError, "without a topic filter"),
    Bad("SUBSCRIBE filter without its options byte", _V4, b"\x82\x07\x00\x0a\x00\x03a/b",
        MalformedPacket, "without options"),
    Bad("SUBSCRIBE 3.1.1, reserved option bit 2 [MQTT-3.8.3-4]", _V4,
        b"\x82\x08\x00\x0a\x00\x03a/b\x04", MalformedPacket, "reserved subscription option"),
    Bad("SUBSCRIBE 3.1.1, requested QoS 3 [MQTT-3.8.3-4]", _V4,
        b"\x82\x08\x00\x0a\x00\x03a/b\x03", MalformedPacket, "QoS 3"),
    Bad("SUBSCRIBE 5.0, reserved option bit 6 [MQTT-3.8.3-5]", _V5,
        b"\x82\x09\x00\x0a\x00\x00\x03a/b\x40", MalformedPacket, "reserved subscription option"),
    Bad("SUBSCRIBE 5.0, reserved option bit 7 [MQTT-3.8.3-5]", _V5,
        b"\x82\x09\x00\x0a\x00\x00\x03a/b\x80", MalformedPacket, "reserved subscription option"),
    Bad("SUBSCRIBE 5.0, retain handling 3 (5.0 §3.8.3.1)", _V5,
        b"\x82\x09\x00\x0a\x00\x00\x03a/b\x30", ProtocolError, "retain handling 3"),
    Bad("SUBSCRIBE 5.0, maximum QoS 3 (5.0 §3.8.3.1)", _V5,
        b"\x82\x09\x00\x0a\x00\x00\x03a/b\x03", ProtocolError, "QoS 3"),
    Bad("SUBSCRIBE 5.0, two subscription identifiers (5.0 §3.8.2.1.2)", _V5,
        b"\x82\x0d\x00\x0a\x04\x0b\x01\x0b\x02\x00\x03a/b\x00", ProtocolError, _TWICE),
    Bad("SUBSCRIBE 5.0, subscription identifier 0 (5.0 §3.8.2.1.2)", _V5,
        b"\x82\x0b\x00\x0a\x02\x0b\x00\x00\x03a/b\x00", ProtocolError, "must not be 0"),

    # UNSUBSCRIBE payload.
    Bad("UNSUBSCRIBE without a topic filter, 3.1.1 [MQTT-3.10.3-2]", _V4, b"\xa2\x02\x00\x0a",
        ProtocolError, "without a topic filter"),
    Bad("UNSUBSCRIBE without a topic filter, 5.0 [MQTT-3.10.3-2]", _V5,
        b"\xa2\x03\x00\x0a\x00", ProtocolError, "without a topic filter"),

    # MQTT 5 properties. An identifier not valid for the packet type is a Malformed Packet
    # (5.0 §2.2.2.2); a repeated property or a value out of range is a Protocol Error.
    Bad("topic alias in CONNECT (5.0 §2.2.2.2)", _V5,
        b"\x10\x10\x00\x04MQTT\x05\x02\x00\x00\x03\x23\x00\x01\x00\x00", MalformedPacket,
        _NOT_ALLOWED),
    Bad("reason string in PUBLISH (5.0 §2.2.2.2)", _V5,
        b"\x30\x08\x00\x01t\x04\x1f\x00\x01r", MalformedPacket, _NOT_ALLOWED),
    Bad("will delay interval in CONNECT properties (5.0 §2.2.2.2)", _V5,
        b"\x10\x12\x00\x04MQTT\x05\x02\x00\x00\x05\x18\x00\x00\x00\x01\x00\x00",
        MalformedPacket, _NOT_ALLOWED),
    Bad("session expiry interval in will properties (5.0 §2.2.2.2)", _V5,
        b"\x10\x18\x00\x04MQTT\x05\x06\x00\x00\x00\x00\x00"
        b"\x05\x11\x00\x00\x00\x01\x00\x01t\x00\x00", MalformedPacket, _NOT_ALLOWED),
    Bad("maximum QoS in SUBACK (5.0 §2.2.2.2)", _V5, b"\x90\x06\x00\x0a\x02\x24\x01\x00",
        MalformedPacket, _NOT_ALLOWED),
    Bad("content type twice in PUBLISH (5.0 §3.3.2.3.9)", _V5,
        b"\x30\x0c\x00\x01t\x08\x03\x00\x01a\x03\x00\x01b", ProtocolError, _TWICE),
    Bad("session expiry interval twice in CONNECT (5.0 §3.1.2.11.2)", _V5,
        b"\x10\x17\x00\x04MQTT\x05\x02\x00\x00\x0a"
        b"\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02\x00\x00", ProtocolError, _TWICE),
    Bad("topic alias twice in PUBLISH (5.0 §3.3.2.3.4)", _V5,
        b"\x30\x0a\x00\x01t\x06\x23\x00\x01\x23\x00\x02", ProtocolError, _TWICE),
    Bad("payload format indicator 2 (5.0 §3.3.2.3.2)", _V5, b"\x30\x06\x00\x01t\x02\x01\x02",
        ProtocolError, "must be 0 or 1"),
    Bad("request problem information 2 (5.0 §3.1.2.11.7)", _V5,
        b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x00\x02\x17\x02\x00\x00", ProtocolError,
        "must be 0 or 1"),
    Bad("maximum QoS 2 in CONNACK (5.0 §3.2.2.3.4)", _V5, b"\x20\x05\x00\x00\x02\x24\x02",
        ProtocolError, "must be 0 or 1"),
    Bad("receive maximum 0 in CONNECT (5.0 §3.1.2.11.3)", _V5,
        b"\x10\x10\x00\x04MQTT\x05\x02\x00\x00\x03\x21\x00\x00\x00\x00", ProtocolError,
        "must not be 0"),
    Bad("maximum packet size 0 in CONNECT (5.0 §3.1.2.11.4)", _V5,
        b"\x10\x12\x00\x04MQTT\x05\x02\x00\x00\x05\x27\x00\x00\x00\x00\x00\x00", ProtocolError,
        "must not be 0"),
    Bad("unknown property identifier 0x04 (5.0 §2.2.2.2)", _V5,
        b"\x30\x06\x00\x01t\x02\x04\x00", MalformedPacket, "unknown property identifier 0x04"),
    Bad("unknown two-byte property identifier 0x80 (5.0 §2.2.2.2)", _V5,
        b"\x30\x07\x00\x01t\x03\x80\x01\x00", MalformedPacket, "unknown property identifier 0x80"),
    Bad("property length past the end of the packet", _V5, b"\x30\x05\x00\x01t\x09\x01",
        MalformedPacket, "properties run past"),
    Bad("property length of five bytes (5.0 §1.5.5)", _V5,
        b"\x30\x08\x00\x01t\xff\xff\xff\xff\x01", MalformedPacket, "longer than 4 bytes"),
    Bad("byte property cut by the property length", _V5, b"\x30\x06\x00\x01t\x01\x01\x01",
        MalformedPacket, "payload_format_indicator is truncated"),
    Bad("u16 property cut by the property length", _V5, b"\x30\x07\x00\x01t\x02\x23\x00\x01",
        MalformedPacket, "topic_alias is truncated"),
    Bad("u32 property cut by the property length", _V5,
        b"\x30\x09\x00\x01t\x04\x02\x00\x00\x00\x3c", MalformedPacket,
        "message_expiry_interval is truncated"),
    Bad("string property running past the property length", _V5,
        b"\x30\x09\x00\x01t\x03\x03\x00\x02ab", MalformedPacket, "runs past the property block"),
    Bad("binary property running past the end of the packet", _V5,
        b"\x30\x07\x00\x01t\x03\x09\x00\x05", MalformedPacket, _PAST),
    Bad("user property without its value", _V5, b"\x30\x09\x00\x01t\x05\x26\x00\x01k\x00",
        MalformedPacket, "length prefix"),
    Bad("varint property cut short", _V5, b"\x30\x06\x00\x01t\x02\x0b\x80", MalformedPacket,
        "variable byte integer runs past"),
]

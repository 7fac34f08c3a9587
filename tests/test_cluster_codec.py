"""The records one node writes to another's inbox (or publishes to it for QoS 0), read back as
they were written: every field of a message that routing or a subscriber sees, whatever the
strings, the properties and the shared subscriptions chosen."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_broker.cluster.codec import (
    BARRIER, CLEARED, FORWARDED, HANDED, HELD, TARGETED, pack_barrier, pack_cleared, pack_forwarded, pack_message,
    pack_queued, pack_retained, pack_targeted, pack_will, records_of_0_1_0, targeted_head, unpack_queued,
    unpack_records, unpack_retained, unpack_will,
)
from mqtt_broker.message import Message
from mqtt_broker.session import Queued

FUZZ = settings(max_examples=200, deadline=None)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
TOPICS = TEXT.filter(bool).filter(lambda t: "+" not in t and "#" not in t)
PROPERTIES = st.fixed_dictionaries({}, optional={
    "payload_format_indicator": st.integers(0, 1),
    "content_type": TEXT,
    "response_topic": TOPICS,
    "correlation_data": st.binary(max_size=20),
    "user_property": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
})
MESSAGES = st.builds(
    lambda topic, payload, qos, retain, properties, sender, cluster_id: Message(
        topic=topic, payload=payload, qos=qos, retain=retain, properties=properties, sender=sender,
        cluster_id=cluster_id if qos else None),
    TOPICS, st.binary(max_size=300), st.integers(0, 2), st.booleans(), PROPERTIES,
    st.none() | TEXT.filter(bool), st.none() | st.binary(min_size=1, max_size=20))
SHARES = st.lists(st.tuples(TEXT.filter(bool), TOPICS), max_size=3).map(tuple)


def same_message(got: Message, sent: Message) -> None:
    assert (got.topic, got.payload, got.qos, got.retain) == (sent.topic, sent.payload, sent.qos, sent.retain)
    assert dict(got.properties) == dict(sent.properties)
    assert (got.sender, got.cluster_id) == (sent.sender, sent.cluster_id)
    assert (got.packet_id, got.dup, got.frame) == (0, False, None)


@FUZZ
@given(messages=st.lists(st.tuples(MESSAGES, SHARES, st.sampled_from([FORWARDED, HANDED]),
                                   st.lists(TEXT, max_size=3).map(tuple)), min_size=1, max_size=5))
def test_forwarded_records_read_back_in_order(
        messages: list[tuple[Message, tuple[tuple[str, str], ...], int, tuple[str, ...]]]) -> None:
    """Forwarded to be routed, or handed on to shared subscriptions' members only (with the nodes
    that declined it)."""
    entry = b"".join(pack_forwarded(message, shares, 100.0, kind, declined) for message, shares, kind, declined in messages)
    records = list(unpack_records(entry))
    assert len(records) == len(messages)
    for (kind, got, shares), (sent, sent_shares, sent_kind, declined) in zip(records, messages):
        assert kind == sent_kind and shares == ((sent_shares, declined) if kind == HANDED else sent_shares)
        same_message(got, sent)
        assert got.expires_at is None


@pytest.mark.parametrize("kind", [FORWARDED, HANDED])
@pytest.mark.parametrize("cluster_id", [b"id", None])
def test_an_expiry_travels_as_its_time_and_the_interval_left(kind: int, cluster_id: bytes | None) -> None:
    """The time, for a record read late (a dead node's inbox); the interval, for the PUBLISH."""
    message = Message(topic="t", payload=b"p", qos=1 if cluster_id else 0, properties={"message_expiry_interval": 60},
                      expires_at=160.0, cluster_id=cluster_id, sender="s")
    ((got_kind, got, shares),) = unpack_records(pack_forwarded(message, (("g", "$share/g/t"),), 130.5, kind))
    sent = (("g", "$share/g/t"),)
    assert (got_kind, got.expires_at, got.cluster_id, got.sender, shares) == (
        kind, 160.0, cluster_id, "s", (sent, ()) if kind == HANDED else sent)
    assert got.properties["message_expiry_interval"] == 30  # 29.5 s left, rounded up


@FUZZ
@given(client_id=TEXT.filter(bool), message=MESSAGES, seq=st.integers(1, 2**40))
def test_a_targeted_record_carries_the_queued_message(client_id: str, message: Message, seq: int) -> None:
    item = Queued(message, message.qos, message.retain, (3, 7), ("group", "a/#"), seq)
    forwarded = Message(topic="other", payload=b"x")
    entry = pack_forwarded(forwarded, (), 0.0) + pack_targeted(client_id, pack_queued(item))
    (_, first, _), (kind, got_client, got) = unpack_records(entry)
    assert first.topic == "other"
    assert kind == TARGETED and got_client == client_id
    same_message(got.message, message)
    assert (got.qos, got.retain, got.subscription_ids, got.share) == (item.qos, item.retain, (3, 7), ("group", "a/#"))


@FUZZ
@given(node=TEXT, client_id=TEXT, origin=st.binary(max_size=255), message=MESSAGES)
def test_a_barrier_its_answer_and_a_held_message_read_back_in_order(node: str, client_id: str, origin: bytes,
                                                                     message: Message) -> None:
    packed = pack_queued(Queued(message, message.qos, False, (), None, 1))
    entry = (pack_barrier(node, client_id, origin) + pack_cleared(client_id, origin)
             + targeted_head(client_id, len(packed), HELD) + packed)
    barrier, cleared, (kind, held_for, held) = unpack_records(entry)
    assert (barrier, cleared) == ((BARRIER, node, (client_id, origin)), (CLEARED, client_id, origin))
    assert (kind, held_for) == (HELD, client_id)
    same_message(held.message, message)


def test_a_record_carries_hundreds_of_shared_subscriptions() -> None:
    """A client may hold many shared groups of one topic, all chosen on one node: their count
    is not bounded by a byte."""
    shares = tuple((f"g{i}", "$share/g/t") for i in range(300))
    [(kind, message, read)] = unpack_records(pack_forwarded(Message(topic="t", payload=b"p"), shares, 0.0))
    assert (kind, message.topic, read) == (FORWARDED, "t", shares)


@pytest.mark.parametrize("cluster_id", [b"id", None])
def test_a_record_carries_more_shared_subscriptions_than_two_bytes_count(cluster_id: bytes | None) -> None:
    """Nothing bounds the shared groups of a topic a node's clients hold (max_subscriptions_per_client
    0): 70,000 of them, all chosen on one node, failed every publish to the topic on another node."""
    shares = tuple((f"g{i}", "t") for i in range(70_000))
    message = Message(topic="t", payload=b"p", qos=1 if cluster_id else 0, cluster_id=cluster_id, sender="s")
    entry = pack_forwarded(message, shares, 0.0) + pack_forwarded(message, (("g", "t"),), 0.0)
    assert [(kind, got.payload, got.sender, got.cluster_id, read) for kind, got, read in unpack_records(entry)] == [
        (FORWARDED, b"p", "s", cluster_id, shares), (FORWARDED, b"p", "s", cluster_id, (("g", "t"),))]


@FUZZ
@given(message=MESSAGES, now=st.sampled_from([0.0, 0.5, 1_800_000_000.25]), expires_in=st.none() | st.integers(1, 10**6))
def test_a_retained_message_keeps_when_it_expires(message: Message, now: float, expires_in: int | None) -> None:
    """Read back at any later time, a retained message expires when it was to: a node that loads
    it from Redis learns how long it has left (whatever the clock: a test's starts at 0)."""
    message.retain = True
    if expires_in is not None:
        message.properties = {**message.properties, "message_expiry_interval": expires_in}
        message.expires_at = now + expires_in
    stored = pack_retained(message, now)
    got = unpack_retained(stored, now + 3600.0)
    assert got.expires_at == message.expires_at and got.retain
    assert (got.topic, got.payload, got.qos) == (message.topic, message.payload, message.qos)


@FUZZ
@given(message=MESSAGES)
def test_a_retained_message_keeps_its_publisher(message: Message) -> None:
    """A node that reads it from Redis knows whose it is: No Local holds for it [MQTT-3.8.3-3]."""
    message.retain = True
    assert unpack_retained(pack_retained(message, 0.0), 0.0).sender == message.sender


def test_a_retained_message_kept_without_its_publisher_is_read() -> None:
    """As Redis kept them before the publisher was: a zero byte, the clock time it expires at
    (0: never), the PUBLISH."""
    message = Message(topic="t", payload=b"p", retain=True, properties={"message_expiry_interval": 60})
    got = unpack_retained(b"\0" + struct.pack(">d", 5060.0) + pack_message(message, 5000.0), 5030.0)
    assert (got.topic, got.payload, got.retain, got.expires_at, got.sender) == ("t", b"p", True, 5060.0, None)
    never = unpack_retained(b"\0" + struct.pack(">d", 0.0) + pack_message(Message(topic="t", payload=b"p"), 0.0), 9.0)
    assert (never.payload, never.expires_at, never.sender) == (b"p", None, None)


def test_a_retained_message_kept_as_a_publish_alone_expires_its_interval_after_it_is_read() -> None:
    """As 0.1.0 kept them: the interval left when stored, all the clock tells."""
    old = pack_message(Message(topic="t", payload=b"p", retain=True, properties={"message_expiry_interval": 60}),
                       0.0)
    assert unpack_retained(old, 5000.0).expires_at == 5060.0
    assert unpack_retained(pack_message(Message(topic="t", payload=b"p", retain=True), 0.0), 5000.0).expires_at is None


# --- what a session keeps in Redis --------------------------------------------------------------

# The longest strings MQTT allows (65,535 bytes of UTF-8), which JSON writes as \uXXXX: 131,070
# bytes for the first, 196,596 for the second (a surrogate pair each).
LONGEST = ["\u4e2d" * 21_845, "\U0001f600" * 16_383]


@pytest.mark.parametrize("text", LONGEST, ids=["3-byte", "4-byte"])
def test_a_queued_message_keeps_a_publisher_and_a_shared_subscription_of_any_length_mqtt_allows(text: str) -> None:
    """As queued in Redis, and as sent on to a session's owner in an inbox; the terms of its
    delivery (a JSON head) may be longer than two bytes count."""
    message = Message(topic="t", payload=b"p", qos=1, sender=text, cluster_id=b"id")
    item = Queued(message, 1, False, (1, 268_435_455), (text, "$share/" + text[:5_000] + "/t"), 9)
    got = unpack_queued(pack_queued(item), 9)
    [(kind, client_id, sent_on)] = unpack_records(pack_targeted(text, pack_queued(item)))
    assert (kind, client_id) == (TARGETED, text)
    for read in (got, sent_on):
        same_message(read.message, message)
        assert (read.qos, read.subscription_ids, read.share) == (1, (1, 268_435_455), item.share)


def test_a_queued_message_keeps_as_many_subscription_identifiers_as_a_publish_holds() -> None:
    """Each matching subscription of the session may give one [MQTT-3.3.4-3]: 7,000 in a PUBLISH
    of 35 KB."""
    ids = tuple(range(268_435_455 - 7_000, 268_435_455))
    item = Queued(Message(topic="t", payload=b"p", qos=1), 1, False, ids, None, 1)
    assert unpack_queued(pack_queued(item), 1).subscription_ids == ids


@pytest.mark.parametrize("user_name", LONGEST, ids=["3-byte", "4-byte"])
def test_a_will_keeps_a_user_name_of_any_length_mqtt_allows(user_name: str) -> None:
    message, got_user_name, delay, due = unpack_will(pack_will(Message(topic="w", payload=b"gone", qos=1), user_name,
                                                               30, 12.5))
    assert (message.topic, message.payload, got_user_name, delay, due) == ("w", b"gone", user_name, 30, 12.5)


def test_a_queued_message_and_a_will_as_kept_before_are_read() -> None:
    """Their heads' lengths in two bytes, as 0.1.0 and the releases since wrote them all."""
    queued = unpack_queued(bytes.fromhex(
        "00325b312c66616c73652c5b375d2c5b2267222c222473686172652f672f712f23225d2c6e756c6c2c2270222c2230313032225d"
        "320d0003712f6100010068656c6c6f"), 3)
    assert (queued.message.topic, queued.message.payload, queued.message.sender, queued.message.cluster_id) == (
        "q/a", b"hello", "p", b"\1\2")
    assert (queued.qos, queued.subscription_ids, queued.share, queued.seq) == (1, (7,), ("g", "$share/g/q/#"), 3)
    will = bytes.fromhex("000d5b2275222c33302c31322e355d320c0003772f63000100676f6e65")
    message, user_name, delay, due = unpack_will(will)
    assert (message.topic, message.payload, user_name, delay, due) == ("w/c", b"gone", "u", 30, 12.5)


# --- what 0.1.0 left in an inbox --------------------------------------------------------------

# Records as 0.1.0's pack_forwarded made them (QoS 1, QoS 1 with a share, QoS 0; then a TARGETED
# one): its count of shares took one byte, this layout's two.
OF_0_1_0 = [
    "000c6e6f6465313a3030303030310003707562000000000f320d0003712f6100010068656c6c6f",
    "000c6e6f6465313a303030303031000370756201000167000c2473686172652f672f712f230000000f320d0003712f6100010068656c6c6f",
    "00000000000000000c300a0003712f61007a65726f",
]


@pytest.mark.parametrize("hexed, payload, shares", [
    (OF_0_1_0[0], b"hello", ()), (OF_0_1_0[1], b"hello", (("g", "$share/g/q/#"),)), (OF_0_1_0[2], b"zero", ())],
    ids=["qos1", "qos1-shared", "qos0"])
def test_the_records_0_1_0_left_in_an_inbox_are_read(hexed: str, payload: bytes, shares: tuple[Any, ...]) -> None:
    (kind, message, read_shares), = unpack_records(records_of_0_1_0(bytes.fromhex(hexed)))
    assert (kind, message.topic, message.payload, read_shares) == (FORWARDED, "q/a", payload, shares)


def test_an_entry_of_0_1_0_with_several_records_keeps_them_all() -> None:
    queued = pack_queued(Queued(Message(topic="t", payload=b"for c", qos=1), 1, False))
    entry = b"".join(bytes.fromhex(hexed) for hexed in OF_0_1_0) + pack_targeted("c", queued)
    records = list(unpack_records(records_of_0_1_0(entry)))
    assert [kind for kind, _, _ in records] == [FORWARDED, FORWARDED, FORWARDED, TARGETED]
    assert records[-1][1] == "c" and records[-1][2].message.payload == b"for c"

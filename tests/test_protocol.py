"""The broker's MQTT 3.1 / 3.1.1 behaviour, driven packet by packet on StringTransports and a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent, formatEventAsClassicLogText

from mqtt_broker.config import BrokerConfig
from mqtt_broker.hooks import Refused
from mqtt_broker.protocol import PACKETS_PER_TURN, READ_WHILE_DECIDING
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.testing import MemoryBroker
from mqtt_broker.wire import (
    MQTT_3_1_1, MQTT_5, Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec, Pubrel, ReasonCode,
    Suback, Subscribe, SubscriptionRequest, Unsuback, Unsubscribe, Will, encode,
)

from protocol_helpers import FakeClient, Held, SocketClient, connected, make_broker


# --- CONNECT ---------------------------------------------------------------------------------

def test_connect_accepted() -> None:
    broker = make_broker()
    client = FakeClient(broker)
    assert client.connect("c1") == Connack(session_present=False, reason_code=0)
    assert [c.client_id for c in broker.clients()] == ["c1"]
    assert broker.clients()[0].peer.startswith("127.0.0.1:")


def test_first_packet_must_be_connect() -> None:  # [MQTT-3.1.0-1]
    client = FakeClient(make_broker())
    client.send(Pingreq())
    assert client.closed and client.received() == []


@pytest.mark.parametrize("first", [b"G", b"GET / HTTP/1.1\r\n\r\n", b"\x30\xff\x7f"])
def test_a_first_packet_that_is_not_connect_closes_at_its_first_byte(first: bytes) -> None:  # [MQTT-3.1.0-1]
    # Not once the length its first bytes claim has come: an HTTP request reads as a PUBACK of
    # 69 bytes, which would hold the socket until connect_timeout.
    client = FakeClient(make_broker())
    client.send_bytes(first)
    assert client.closed and client.received() == []


def test_a_connect_arriving_a_byte_at_a_time_is_read() -> None:
    client = FakeClient(make_broker())
    for byte in encode(Connect(client_id="c1")):
        client.send_bytes(bytes([byte]))
    assert client.received() == [Connack(session_present=False, reason_code=0)]


def test_second_connect_closes() -> None:  # [MQTT-3.1.0-2]
    broker = make_broker()
    client = connected(broker, "c1")
    client.send(Connect(client_id="c1"))
    assert client.closed


def test_unsupported_protocol_level_gets_connack_1() -> None:  # [MQTT-3.1.2-2]
    """Counted as a packet received and a CONNECT, as its CONNACK is a packet sent ($SYS's
    messages/received and load/connections, as Mosquitto counts them)."""
    broker = make_broker()
    client = FakeClient(broker)
    client.send_bytes(b"\x10\x0c\x00\x04MQTT\x07\x02\x00\x3c\x00\x00")
    assert client.received() == [Connack(reason_code=1)]
    assert client.closed
    assert (broker.stats.packets_received, broker.stats.connects, broker.stats.control_packets_sent) == (1, 1, 1)


def test_unknown_protocol_name_closes_without_connack() -> None:  # [MQTT-3.1.2-1]
    client = FakeClient(make_broker())
    client.send_bytes(b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00")
    assert client.received() == [] and client.closed


@pytest.mark.parametrize("client_id", ["x" * 24, ""])
def test_mqtt31_client_id_of_other_than_1_to_23_characters_is_rejected(client_id: str) -> None:
    client = FakeClient(make_broker(), version=3)
    assert client.connect(client_id, protocol_level=3).reason_code == 2
    assert client.closed
    assert FakeClient(make_broker(), version=3).connect("x" * 23, protocol_level=3).reason_code == 0


def test_an_mqtt31_connect_with_the_user_name_flag_and_no_user_name_is_connected_anonymously() -> None:
    """MQTT V3.1, 3.1: "the User Name flag is set, but the User Name string is missing. This is
    valid, and connections should be allowed to continue" (Mosquitto connects it too)."""
    broker = make_broker()
    client = FakeClient(broker, version=3)
    client.send_bytes(b"\x10\x11\x00\x06MQIsdp\x03\xc2\x00\x3c\x00\x03c31")  # user name, password flags
    assert client.received() == [Connack(reason_code=0)] and not client.closed
    assert broker.clients()[0].username is None


def test_empty_client_id_is_assigned_with_clean_session() -> None:
    broker = make_broker()
    client = FakeClient(broker)
    assert client.connect("", clean=True).reason_code == 0
    assert broker.clients()[0].client_id.startswith("auto-")


def test_empty_client_id_refused_without_clean_session() -> None:  # [MQTT-3.1.3-8]
    client = FakeClient(make_broker())
    assert client.connect("", clean=False).reason_code == 2
    assert client.closed


def test_empty_client_id_refused_when_not_allowed() -> None:
    client = FakeClient(make_broker(allow_zero_length_clientid=False))
    assert client.connect("", clean=True).reason_code == 2


def test_keepalive_above_max_refused_for_mqtt3() -> None:
    client = FakeClient(make_broker(max_keepalive=60))
    assert client.connect("c", keep_alive=61).reason_code == 2


@pytest.mark.parametrize("will, settings", [
    (Will(topic="a/#", payload=b"x"), {}), (Will(topic="", payload=b"x"), {}),
    (Will(topic="w", payload=b"x", qos=2), {"max_qos": 1}), (Will(topic="w", payload=b"x", retain=True),
                                                             {"retain_available": False})],
    ids=["wildcard", "empty", "qos-above-max", "retained"])
def test_a_will_the_broker_cannot_take_closes_an_mqtt3_connection_without_connack(
        will: Will, settings: dict[str, Any]) -> None:
    """No 3.1.1 return code says what is wrong with it: closed without a CONNACK [MQTT-3.2.2-6],
    as Mosquitto does ("server unavailable" would have the client come back for ever)."""
    for level in (3, 4):
        client = FakeClient(make_broker(**settings), version=level)
        client.send(Connect(protocol_name="MQIsdp" if level == 3 else "MQTT", protocol_level=level, client_id="c",
                            will=will))
        assert client.received() == [] and client.closed


# --- timers ----------------------------------------------------------------------------------

def test_connect_timeout_drops_silent_connection() -> None:
    broker = make_broker(connect_timeout=5)
    client = FakeClient(broker)
    broker.clock.advance(4.9)
    assert not client.closed
    broker.clock.advance(0.2)
    assert client.closed


def test_connect_deadlines_share_the_keepalive_timer() -> None:
    broker = make_broker(connect_timeout=5)
    silent = [FakeClient(broker) for _ in range(100)]
    assert len(broker.clock.getDelayedCalls()) == 1  # one timer for every deadline
    client = connected(broker, "c", keep_alive=60)
    broker.clock.advance(5.1)
    assert all(s.closed for s in silent) and not client.closed
    assert len(broker.keepalives) == 1  # the connected client's keepalive, its CONNECT deadline gone
    broker.clock.advance(60 * 1.5 - 5)
    assert client.closed and len(broker.keepalives) == 0


def test_connect_timeout_zero_means_no_limit() -> None:
    broker = make_broker(connect_timeout=0)
    client = FakeClient(broker)
    broker.clock.advance(3600)
    assert not client.closed and not broker.clock.getDelayedCalls()


def test_keepalive_timeout_at_one_and_a_half_times() -> None:  # [MQTT-3.1.2-24]
    broker = make_broker()
    watcher = connected(broker, "w")
    watcher.subscribe("will/#")
    client = connected(broker, "c", keep_alive=10, will=Will(topic="will/c", payload=b"gone"))
    broker.clock.advance(14.9)
    assert not client.closed
    broker.clock.advance(0.2)
    assert client.closed
    assert watcher.received() == [Publish(topic="will/c", payload=b"gone")]


def test_a_keepalive_deadline_is_due_at_its_own_time_whatever_the_rounding() -> None:
    """At 968.5885203292438 + 90, ``now - last_seen`` comes out below 90 by rounding: the check
    gave back the same deadline, already due, and the timer took it again for ever (the reactor
    hung). Asked at the deadline, it is due."""
    broker = make_broker()
    broker.clock.advance(968.5885203292438)
    client = connected(broker, "k", keep_alive=60)
    broker.clock.rightNow = 968.5885203292438 + 90  # (the time alone: the timer would not come back)
    assert client.protocol.keepalive_due() is None
    assert client.closed


def test_traffic_resets_keepalive() -> None:
    broker = make_broker()
    client = connected(broker, "c", keep_alive=10)
    for _ in range(5):
        broker.clock.advance(10)
        client.send(Pingreq())
        assert client.received() == [Pingresp()]
    assert not client.closed


def test_a_packet_trickled_byte_by_byte_does_not_keep_a_connection_alive() -> None:  # [MQTT-3.1.2-24]
    broker = make_broker()
    client = connected(broker, "c", keep_alive=10)
    frame = encode(Publish(topic="t", payload=b"x" * 100))
    for byte in frame[:-1]:
        broker.clock.advance(1)
        client.send_bytes(bytes([byte]))
        if client.closed:
            break
    assert client.closed  # silent, as far as whole packets go, for 15 s


def test_a_large_packet_arriving_slowly_keeps_its_connection_alive() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    client = connected(broker, "c", keep_alive=10)
    frame = encode(Publish(topic="t", payload=b"x" * 100_000))
    pieces = [frame[i:i + 5_000] for i in range(0, len(frame), 5_000)]
    for piece in pieces:  # 21 pieces, 7 s apart: 147 s for the whole packet
        broker.clock.advance(7)
        client.send_bytes(piece)
    assert not client.closed
    assert sub.received() == [Publish(topic="t", payload=b"x" * 100_000)]


# --- QoS -------------------------------------------------------------------------------------

def test_qos0_routing() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    assert sub.subscribe("a/+") == [Suback(packet_id=1, reason_codes=(0,))]
    pub = connected(broker, "pub")
    pub.publish("a/b", b"hello")
    assert sub.received() == [Publish(topic="a/b", payload=b"hello")]


def test_qos1_acknowledged_and_delivered_at_granted_qos() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    assert pub.publish("t", b"m", qos=2, packet_id=7) == [Pubrec(packet_id=7)]
    [delivered] = sub.received()
    assert delivered.qos == 1 and delivered.payload == b"m" and delivered.packet_id != 0
    sub.send(Puback(packet_id=delivered.packet_id))
    assert broker.sessions["sub"].outgoing == {}


def test_delivered_qos_is_minimum_of_published_and_granted() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=2)
    pub = connected(broker, "pub")
    assert pub.publish("t", qos=1, packet_id=3) == [Puback(packet_id=3)]
    assert sub.received()[0].qos == 1


def test_inbound_qos2_routed_once_before_pubrel() -> None:  # [MQTT-4.3.3-9]
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    pub = connected(broker, "pub")
    assert pub.publish("t", b"once", qos=2, packet_id=5) == [Pubrec(packet_id=5)]
    assert pub.publish("t", b"once", qos=2, packet_id=5, dup=True) == [Pubrec(packet_id=5)]
    assert len(sub.received()) == 1
    pub.send(Pubrel(packet_id=5))
    assert pub.received() == [Pubcomp(packet_id=5)]
    pub.publish("t", b"again", qos=2, packet_id=5)
    assert sub.received() == [Publish(topic="t", payload=b"again")]


def test_outbound_qos2_exchange() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=2)
    connected(broker, "pub").publish("t", b"m", qos=2)
    [message] = sub.received()
    assert message.qos == 2
    sub.send(Pubrec(packet_id=message.packet_id))
    assert sub.received() == [Pubrel(packet_id=message.packet_id)]
    assert broker.sessions["sub"].outgoing[message.packet_id].released
    sub.send(Pubcomp(packet_id=message.packet_id))
    assert broker.sessions["sub"].outgoing == {}


def test_packet_ids_in_flight_are_not_reused() -> None:
    broker = make_broker(max_inflight_messages=50)
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    for _ in range(30):
        pub.publish("t", qos=1)
    ids = [p.packet_id for p in sub.received()]
    assert len(ids) == 30 and len(set(ids)) == 30 and 0 not in ids


class LookupsCounted(dict[int, Any]):
    """Messages in flight that count how often a packet id is looked up in them (pure Python:
    compiled code looks into a dict without calling ``__contains__``)."""

    lookups = 0

    def __contains__(self, key: object) -> bool:
        self.lookups += 1
        return super().__contains__(key)


def test_the_id_an_acknowledgement_frees_in_a_full_window_is_found_without_walking_it() -> None:
    """max_inflight_messages may be 65535: a subscriber that acknowledges only the newest of a
    full window leaves the one free id a window behind the next to allocate, and every id in
    flight was looked up to find it, 4 ms of the reactor's for each message."""
    broker = make_broker(max_inflight_messages=65535)
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    session = broker.sessions["sub"]
    session.outgoing = in_flight = LookupsCounted()
    pub = connected(broker, "pub")
    pub.send_bytes(b"".join(encode(Publish(topic="t", qos=1, packet_id=n % 65535 + 1)) for n in range(65535)))
    while broker.reactor.getDelayedCalls() and len(in_flight) < 65535:  # (bounded: each turn takes some)
        broker.reactor.advance(0)
    assert len(in_flight) == 65535
    newest = sub.received()[-1].packet_id  # type: ignore[attr-defined]
    in_flight.lookups = 0
    for n in range(100):
        sub.send(Puback(packet_id=newest))
        pub.send(Publish(topic="t", qos=1, packet_id=n + 1))
        [message] = sub.received()
        assert message.packet_id == newest  # type: ignore[attr-defined]
    assert len(in_flight) == 65535
    assert in_flight.lookups < 100 * 10  # (a few for each message; each id in flight without it)


def test_inflight_window_queues_the_rest_in_order() -> None:
    broker = make_broker(max_inflight_messages=2)
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    for n in range(5):
        pub.publish("t", str(n).encode(), qos=1)
    first = sub.received()
    assert [p.payload for p in first] == [b"0", b"1"]
    sub.send(Puback(packet_id=first[0].packet_id))
    assert [p.payload for p in sub.received()] == [b"2"]
    sub.send(Puback(packet_id=first[1].packet_id))
    assert [p.payload for p in sub.received()] == [b"3"]


def test_mqtt3_retry_resends_with_dup() -> None:
    broker = make_broker(retry_interval=20)
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    connected(broker, "pub").publish("t", b"m", qos=1)
    [first] = sub.received()
    broker.clock.advance(19)
    assert sub.received() == []
    broker.clock.advance(1)
    [again] = sub.received()
    assert again.dup and again.packet_id == first.packet_id and again.payload == b"m"
    sub.send(Puback(packet_id=first.packet_id))
    broker.clock.advance(60)
    assert sub.received() == []


def test_mqtt3_retries_wait_while_the_copies_sent_before_have_not_left() -> None:
    """A subscriber that reads nothing (keepalive 0: never dropped) was sent a copy more of every
    unacknowledged message at each retry_interval, behind the copies still held for it: 1 MB
    more held at each interval for twenty messages of 50 kB, without bound."""
    broker = make_broker(max_inflight_messages=20, retry_interval=20)
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    sub.protocol.pauseProducing()  # its socket's buffer is full
    publisher = connected(broker, "pub")
    for n in range(20):
        publisher.publish("t", b"%02d" % n + b"x" * 50_000, qos=1)
    held = sub.protocol.pending_bytes
    for _ in range(10):
        broker.clock.advance(20)
        assert sub.protocol.pending_bytes == held
    sub.protocol.resumeProducing()  # it reads at last: what was held goes, then the copies again
    broker.clock.advance(20)
    received = sub.received()
    assert [(p.payload[:2], p.dup) for p in received] == (
        [(b"%02d" % n, False) for n in range(20)] + [(b"%02d" % n, True) for n in range(20)])


# --- subscriptions ---------------------------------------------------------------------------

def test_overlapping_subscriptions_deliver_one_copy_at_highest_qos() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.send(Subscribe(packet_id=1, subscriptions=(
        SubscriptionRequest(topic_filter="a/#", qos=0), SubscriptionRequest(topic_filter="a/+", qos=2))))
    assert sub.received() == [Suback(packet_id=1, reason_codes=(0, 2))]
    connected(broker, "pub").publish("a/b", qos=2)
    [message] = sub.received()
    assert message.qos == 2


def test_invalid_filter_gets_0x80_and_others_still_granted() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.send(Subscribe(packet_id=2, subscriptions=(
        SubscriptionRequest(topic_filter="a/#/b"), SubscriptionRequest(topic_filter="ok", qos=1))))
    assert sub.received() == [Suback(packet_id=2, reason_codes=(0x80, 1))]
    assert not sub.closed


def test_dollar_topics_not_matched_by_leading_wildcard() -> None:  # [MQTT-4.7.2-1]
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("#")
    sub.subscribe("+/x", packet_id=2)
    broker.publish("$SYS/x", b"1")
    assert sub.received() == []
    broker.publish("a/x", b"2")
    assert len(sub.received()) == 1


def test_unsubscribe_stops_delivery() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    sub.send(Unsubscribe(packet_id=9, topic_filters=("t", "never")))
    assert sub.received() == [Unsuback(packet_id=9)]
    broker.publish("t", b"x")
    assert sub.received() == []
    assert broker.subscriptions.count == 0


def test_publish_to_wildcard_topic_closes() -> None:
    broker = make_broker()
    pub = connected(broker, "pub")
    pub.publish("a/+")
    assert pub.closed


def test_publish_above_max_qos_closes() -> None:
    pub = connected(make_broker(max_qos=1), "pub")
    pub.publish("t", qos=2)
    assert pub.closed


# --- retained --------------------------------------------------------------------------------

def test_retained_sent_on_subscribe_with_flag_and_not_on_forward() -> None:
    broker = make_broker()
    pub = connected(broker, "pub")
    pub.publish("r/1", b"old", retain=True)
    pub.publish("r/1", b"new", retain=True)
    pub.publish("r/2", b"two", qos=1, retain=True)
    sub = connected(broker, "sub")
    packets = sub.subscribe("r/#", qos=1)
    assert packets[0] == Suback(packet_id=1, reason_codes=(1,))
    retained = sorted((p.topic, p.payload, p.retain, p.qos) for p in packets[1:])
    assert retained == [("r/1", b"new", True, 0), ("r/2", b"two", True, 1)]
    pub.publish("r/1", b"live", retain=True)
    assert [(p.payload, p.retain) for p in sub.received()] == [(b"live", False)]  # [MQTT-3.3.1-9]


@pytest.mark.parametrize("qos", [0, 1])
def test_retained_messages_a_full_session_cannot_take_are_dropped_at_once(qos: int) -> None:
    """A SUBSCRIBE whose filters each match many retained messages held the reactor for seconds
    (100,000 messages, a few such filters) dropping one by one what the session could not take,
    then matching every one (a million: 2 s). Once it can take no more, the rest is not even
    matched (the one that found it full is counted as dropped), nor are the next filters: the
    expired message last in the tree was never reached, so it is still there for the sweep."""
    broker = make_broker(max_queued_messages=10)
    big = b"x" * (BrokerConfig().max_held_bytes // 3 + 1)
    for n in range(200):
        broker.publish(f"r/{n}", big, qos=qos, retain=True)
    last = broker.retained.match("#")[-1]
    last.expires_at = broker.clock.seconds() - 1
    sub = connected(broker, "sub")
    sub.protocol.pauseProducing()  # its socket is full: three messages are held, ten queued
    matched: list[str] = []
    walked: list[Any] = []
    matching = broker.retained.matching

    def counted(topic_filter: str) -> Any:
        matched.append(topic_filter)
        for message in matching(topic_filter):
            walked.append(message)
            yield message
    broker.retained.matching = counted  # type: ignore[method-assign]
    sub.send(Subscribe(packet_id=1, subscriptions=tuple(
        SubscriptionRequest(topic_filter=f, qos=qos) for f in ("#", "r/#", "r/+"))))
    assert matched == ["#"] and len(walked) == 3 + 10 + 1
    assert broker.stats.messages_dropped == 1
    assert broker.retained.get(last.topic) is last
    sub.protocol.resumeProducing()
    assert len([p for p in sub.received() if isinstance(p, Publish)]) == 3 + 10


def test_retained_messages_a_queue_full_before_the_subscribe_cannot_take_are_counted_as_dropped() -> None:
    """max_queued_messages: the retained messages a new subscription matches that the session
    cannot take are dropped and counted. Full before the SUBSCRIBE came, its queue took none and
    none was counted. As when it fills on the way: the first is counted, the rest not even
    matched, nor the next filters."""
    broker = make_broker(max_queued_messages=2, max_inflight_messages=1)
    for n in range(3):
        broker.publish(f"r/{n}", b"retained", qos=1, retain=True)
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    for _ in range(3):
        broker.publish("t", b"live", qos=1)  # one in flight, two queued
    sub.received()
    sub.send(Subscribe(packet_id=2, subscriptions=tuple(
        SubscriptionRequest(topic_filter=f, qos=1) for f in ("r/#", "r/+"))))
    assert sub.received() == [Suback(packet_id=2, reason_codes=(1, 1))]
    assert (broker.stats.messages_dropped, broker.sessions["sub"].dropped) == (1, 1)


def test_retained_messages_a_session_cannot_take_are_not_spilled_to_the_store() -> None:
    """With a store, QoS 1 messages a session's queue cannot take wait in the store, but not the
    retained messages of a SUBSCRIBE: each of its filters sends them again, and "#" a thousand
    times over in 4 KB put a million copies there in one read, holding the reactor for seconds.
    Beyond the queue they are dropped, as without a store (the first counted: the others are not
    even matched)."""
    broker = make_broker(store=MemoryStore(), max_queued_messages=10, max_held_bytes=65536)
    for n in range(1000):
        broker.publish(f"r/{n}", b"x" * 10_000, qos=1, retain=True)
    sub = connected(broker, "sub", clean=False)
    sub.protocol.pauseProducing()  # its socket is full: what is not held waits in the queue
    data = encode(Subscribe(packet_id=1, subscriptions=tuple(
        SubscriptionRequest(topic_filter="#", qos=1) for _ in range(1000))), 4)
    assert len(data) < 5000
    sub.send_bytes(data)
    session = broker.sessions["sub"]
    assert session.spilled == 0 and len(session.queue) == 10
    sub.protocol.resumeProducing()
    sent = [p for p in sub.received() if isinstance(p, Publish)]
    assert 10 < len(sent) < 1000 and broker.stats.messages_dropped == 1


def test_messages_too_large_for_a_subscriber_are_logged_once_per_thousand() -> None:
    """An MQTT 5 subscriber with a Maximum Packet Size of 64 bytes on "#": each larger message
    is dropped for it [MQTT-3.1.2-25] and counted, and logged the first time, then once per
    thousand (broker-wide): one client cannot turn all traffic into log lines."""
    broker = make_broker()
    sub = connected(broker, "tiny", version=5, properties={"maximum_packet_size": 64})
    sub.subscribe("#")
    pub = connected(broker, "pub")
    with capturedLogs() as events:
        for n in range(2001):
            pub.send(Publish(topic=f"t/{n}", payload=b"x" * 100))
    assert broker.stats.dropped_too_large == 2001
    lines = [formatEventAsClassicLogText(e) for e in events if "above its maximum packet size" in e["log_format"]]
    assert len(lines) == 3 and "(2001 dropped so far for their size" in lines[-1], lines


def test_a_read_of_many_packets_is_handled_over_several_turns_of_the_reactor() -> None:
    """A read is handled PACKETS_PER_TURN packets at a time, one turn of the reactor each, the
    client read no further meanwhile (past READ_WHILE_DECIDING held): 64 KiB of PINGREQs, or a
    WebSocket message of 4 KiB that inflates to 16 MiB of them, held the reactor while every one
    was handled and answered."""
    broker = make_broker()
    client = connected(broker, "c")
    client.send_bytes(encode(Pingreq()) * (PACKETS_PER_TURN * 2 + 5))
    assert len(client.received()) == PACKETS_PER_TURN and client.transport.producerState == "producing"
    client.send_bytes(encode(Pingreq()) * (READ_WHILE_DECIDING // 2))
    assert client.received() == [] and client.transport.producerState == "paused"
    now = broker.clock.seconds()  # type: ignore[attr-defined]
    assert [call.getTime() for call in broker.clock.getDelayedCalls()].count(now) == 1  # type: ignore[attr-defined]
    broker.clock.advance(0)  # type: ignore[attr-defined]  # (a Clock runs the next turns' calls too)
    assert len(client.received()) == PACKETS_PER_TURN + 5 + READ_WHILE_DECIDING // 2
    assert client.transport.producerState == "producing"
    client.send(Pingreq())
    assert client.received() == [Pingresp()]


def _log_lines(events: list[Any], text: str) -> list[str]:
    from twisted.logger import formatEventAsClassicLogText
    return [formatEventAsClassicLogText(e) for e in events if text in e["log_format"]]


def test_a_full_queue_is_still_warned_of_after_a_message_too_large_was_dropped() -> None:
    """The warning of the first message a full queue drops is given after a message too large
    for the client was dropped too (each kind of drop is logged on its own count)."""
    from twisted.logger import capturedLogs
    broker = make_broker(sys_interval=0, max_queued_messages=2)
    sub = connected(broker, "tiny", version=5, clean=False, properties={"maximum_packet_size": 64,
                                                                         "session_expiry_interval": 600})
    sub.subscribe("#", qos=1)
    pub = connected(broker, "pub")
    pub.publish("big", b"x" * 100, qos=1)       # too large for it: dropped, session.dropped == 1
    sub.lose()                                  # offline: its queue takes 2 messages
    with capturedLogs() as events:
        for n in range(5):
            pub.publish(f"t/{n}", b"m", qos=1)
    assert broker.sessions["tiny"].dropped == 3 and broker.stats.dropped_too_large == 1
    assert len(_log_lines(events, "is full")) == 1, "no warning of the full queue"


def test_the_first_message_too_large_for_a_client_is_logged_after_queue_drops() -> None:
    """The first message too large for a client is logged after its queue dropped some."""
    from twisted.logger import capturedLogs
    broker = make_broker(sys_interval=0, max_queued_messages=1)
    sub = connected(broker, "tiny", version=5, clean=False, properties={"maximum_packet_size": 64,
                                                                         "session_expiry_interval": 600})
    sub.subscribe("#", qos=1)
    sub.lose()
    pub = connected(broker, "pub")
    for n in range(3):
        pub.publish(f"t/{n}", b"m", qos=1)      # one queued, two dropped: session.dropped == 2
    sub = connected(broker, "tiny", version=5, clean=False, properties={"maximum_packet_size": 64,
                                                                         "session_expiry_interval": 600})
    sub.received()
    with capturedLogs() as events:
        pub.publish("big", b"x" * 100, qos=1)   # too large for it
    assert broker.stats.dropped_too_large == 1
    assert len(_log_lines(events, "above its maximum packet size")) == 1, "the first one was not logged"


def test_retained_messages_of_a_subscribe_are_not_spilled_when_the_queue_is_full_by_bytes() -> None:
    """Retained messages a SUBSCRIBE sends beyond a session's queue are dropped, not spilled to
    the store, when its queue is full by max_queued_bytes too: the first that did not fit went
    to the store, and every live message after it queued there behind it."""
    from mqtt_broker.store.memory import MemoryStore
    from mqtt_broker.wire import Subscribe, SubscriptionRequest, encode
    broker = make_broker(store=MemoryStore(), max_queued_messages=1000, max_queued_bytes=1000,
                         max_held_bytes=65536, sys_interval=0)
    for n in range(100):
        broker.publish(f"r/{n}", b"x" * 300, qos=1, retain=True)
    sub = connected(broker, "sub", clean=False)
    sub.protocol.pauseProducing()
    sub.send_bytes(encode(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="#", qos=1),)), 4))
    assert broker.sessions["sub"].spilled == 0


def _payloads_acknowledged(client: Any) -> list[bytes]:
    out = []
    for _ in range(50):
        packets = [p for p in client.received() if isinstance(p, Publish)]
        if not packets:
            break
        for p in packets:
            out.append(p.payload)
            if p.qos:
                client.send(Puback(packet_id=p.packet_id))
    return out


def test_a_small_retained_message_that_fits_is_not_dropped_behind_a_large_one_that_does_not() -> None:
    """max_queued_bytes 1000, a connected subscriber with 900 bytes queued (its one in-flight
    slot taken). A SUBSCRIBE matches a 500-byte retained message, then a 10-byte one. The first
    does not fit; the second does (900 + 10 <= 1000), and is queued: the first one too large
    for the queue's bytes does not stop the run of retained messages."""
    broker = make_broker(max_queued_bytes=1000, max_inflight_messages=1, sys_interval=0)
    broker.publish("r/small", b"b" * 10, qos=1, retain=True)
    broker.publish("r/big", b"A" * 500, qos=1, retain=True)
    order = [m.topic for m in broker.retained.match("r/#")]
    assert order == ["r/big", "r/small"], order  # (the large one is matched first)
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    broker.publish("t", b"in flight", qos=1)
    broker.publish("t", b"q" * 900, qos=1)
    session = broker.sessions["sub"]
    assert len(session.outgoing) == 1 and session.queued_bytes == 900
    sub.subscribe("r/#", qos=1, packet_id=2)
    assert [bytes(i.message.payload) for i in session.queue][1:] == [b"b" * 10], \
        "the 10-byte retained message, which fits, was dropped behind the 500-byte one"


def test_a_retained_message_is_not_dropped_for_bytes_that_expired_messages_hold() -> None:
    """max_queued_bytes 1000, a connected subscriber with 900 bytes queued (its one in-flight slot
    taken) whose messages expired. A live message of 500 bytes is queued then (deliver sweeps the
    expired ones, which make room: [MQTT-3.3.2-5] they are never sent), and so is a retained one
    of 500 bytes a SUBSCRIBE matches at that moment (it was dropped for the expired bytes)."""
    broker = make_broker(max_queued_bytes=1000, max_inflight_messages=1, sys_interval=0)
    broker.publish("r/big", b"A" * 500, qos=1, retain=True)
    sub = connected(broker, "sub", version=5)
    sub.subscribe("t", qos=1)
    broker.publish("t", b"in flight", qos=1)
    broker.publish("t", b"q" * 900, qos=1, properties={"message_expiry_interval": 1})
    session = broker.sessions["sub"]
    assert len(session.outgoing) == 1 and session.queued_bytes == 900
    broker.reactor.advance(5)  # the queued message expired
    sub.subscribe("r/#", qos=1, packet_id=2)
    assert [bytes(i.message.payload) for i in session.queue] == [b"A" * 500], \
        "the retained message was dropped for the bytes of an expired message"


def test_empty_retained_payload_deletes() -> None:  # [MQTT-3.3.1-10]
    broker = make_broker()
    pub = connected(broker, "pub")
    pub.publish("r", b"x", retain=True)
    pub.publish("r", b"", retain=True)
    assert len(broker.retained) == 0
    assert connected(broker, "sub").subscribe("r")[1:] == []


# --- will ------------------------------------------------------------------------------------

def test_will_published_on_network_failure_with_qos_and_retain() -> None:
    broker = make_broker()
    watcher = connected(broker, "w")
    watcher.subscribe("will", qos=1)
    client = connected(broker, "c", will=Will(topic="will", payload=b"bye", qos=1, retain=True))
    client.lose()
    [will] = watcher.received()
    assert (will.topic, will.payload, will.qos) == ("will", b"bye", 1)
    assert broker.retained.get("will") is not None


def test_will_not_published_after_disconnect() -> None:  # [MQTT-3.14.4-3]
    broker = make_broker()
    watcher = connected(broker, "w")
    watcher.subscribe("will")
    client = connected(broker, "c", will=Will(topic="will", payload=b"bye"))
    client.send(Disconnect())
    assert client.closed
    client.lose()
    assert watcher.received() == []


def test_will_published_on_protocol_violation() -> None:
    broker = make_broker()
    watcher = connected(broker, "w")
    watcher.subscribe("will")
    client = connected(broker, "c", will=Will(topic="will", payload=b"bye"))
    client.send_bytes(b"\x00\x00")  # reserved packet type
    assert client.closed
    assert watcher.received() == [Publish(topic="will", payload=b"bye")]


# --- sessions --------------------------------------------------------------------------------

def test_persistent_session_queues_and_resends() -> None:
    broker = MemoryBroker()
    sub = broker.connect("sub", version=MQTT_3_1_1, clean_start=False, acknowledge=False)
    sub.subscribe("t", qos=1)
    pub = broker.connect("pub", version=MQTT_3_1_1)
    pub.publish("t", b"inflight", qos=1)
    [unacked] = sub.messages()
    sub.drop()
    pub.publish("t", b"queued", qos=1)
    pub.publish("t", b"qos0-dropped", qos=0)
    again = broker.client(MQTT_3_1_1)
    assert again.connect("sub", clean_start=False) == Connack(session_present=True)
    resent = again.messages()
    assert [(p.payload, p.dup) for p in resent] == [(b"inflight", True), (b"queued", False)]
    assert resent[0].packet_id == unacked.packet_id  # [MQTT-4.4.0-1]
    assert again.received() == []


def test_clean_session_discards_previous_state() -> None:
    broker = make_broker()
    sub = connected(broker, "sub", clean=False)
    sub.subscribe("t", qos=1)
    sub.lose()
    again = FakeClient(broker)
    assert again.connect("sub", clean=True) == Connack(session_present=False)  # [MQTT-3.2.2-1]
    broker.publish("t", b"x", qos=1)
    assert again.received() == []
    assert broker.subscriptions.count == 0


def test_offline_queue_is_bounded_and_counts_drops() -> None:
    broker = make_broker(max_queued_messages=2)
    sub = connected(broker, "sub", clean=False)
    sub.subscribe("t", qos=1)
    sub.lose()
    for n in range(5):
        broker.publish("t", str(n).encode(), qos=1)
    assert broker.sessions["sub"].dropped == 3 and broker.stats.messages_dropped == 3
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert [p.payload for p in again.received()] == [b"0", b"1"]


def test_takeover_closes_old_connection_and_keeps_session() -> None:  # [MQTT-3.1.4-2]
    broker = make_broker()
    watcher = connected(broker, "w")
    watcher.subscribe("will")
    old = connected(broker, "dup", clean=False, will=Will(topic="will", payload=b"old"))
    old.subscribe("t")
    new = FakeClient(broker)
    assert new.connect("dup", clean=False) == Connack(session_present=True)
    assert old.closed
    assert watcher.received() == [Publish(topic="will", payload=b"old")]
    old.lose()  # the old connection's end must not disturb the new one
    broker.publish("t", b"still")
    assert new.received() == [Publish(topic="t", payload=b"still")]


def test_session_expiry_for_persistent_clients() -> None:
    broker = MemoryBroker(persistent_client_expiration=60)
    sub = broker.connect("sub", version=MQTT_3_1_1, clean_start=False)
    sub.subscribe("t", qos=1)
    sub.drop()
    broker.advance(59)
    assert "sub" in broker.service.sessions
    broker.advance(2)
    assert "sub" not in broker.service.sessions and broker.service.subscriptions.count == 0


# --- back-pressure and limits ----------------------------------------------------------------

def test_slow_subscriber_is_held_then_queued_then_flushed() -> None:
    """While the transport is full, up to BrokerConfig().max_held_bytes of encoded messages wait on the connection,
    then max_queued_messages in the session's queue; the rest are dropped."""
    broker = make_broker(max_queued_messages=3)
    sub = connected(broker, "sub")
    sub.subscribe("t")
    sub.protocol.pauseProducing()  # the transport's buffer is full
    big = b"x" * (BrokerConfig().max_held_bytes // 3 + 1)
    for n in range(8):
        broker.publish("t", str(n).encode() + big)
    assert sub.received() == []
    assert len(broker.sessions["sub"].queue) == 3  # three held, three queued
    assert broker.sessions["sub"].dropped == 2
    sub.protocol.resumeProducing()
    assert [p.payload[:1] for p in sub.received()] == [b"0", b"1", b"2", b"3", b"4", b"5"]


def test_a_client_that_reads_nothing_is_read_no_more_once_its_answers_fill_what_is_held() -> None:
    """A client that sends and never reads: the PUBACKs and PINGRESPs owed to it are held up to
    max_held_bytes, then nothing more is read from it (they grew as long as it sent) until it
    reads; a hook that decides meanwhile does not start the reading again."""
    broker = make_broker(max_held_bytes=65536)
    limit = broker.config.max_held_bytes
    client = connected(broker, "flood")
    client.protocol.pauseProducing()  # its socket's buffer is full: it reads nothing
    sent = 0
    while client.transport.producerState == "producing" and sent < limit:  # (bounded)
        sent += 1
        client.send(Publish(topic="t", qos=1, packet_id=sent % 65535 + 1), Pingreq())
    assert client.transport.producerState == "paused"
    assert limit < client.protocol.pending_bytes <= limit + 6  # a PUBACK and a PINGRESP past it
    assert sent == limit // 6 + 1
    # The rest of its last read: a message whose hook decides later, then one more.
    decisions: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: decisions.append(Deferred()) or decisions[-1])
    client.send(Publish(topic="t", qos=1, packet_id=1), Publish(topic="t", qos=1, packet_id=2))
    decisions[0].callback(None)
    decisions[1].callback(None)
    assert client.transport.producerState == "paused"
    client.protocol.resumeProducing()  # its socket drained
    assert client.transport.producerState == "producing"
    answers = client.received()
    assert [type(p) for p in answers] == [Puback, Pingresp] * sent + [Puback, Puback]


def test_a_client_read_no_more_for_its_backlog_is_dropped_after_its_keepalive() -> None:
    """Its PINGREQs wait unread: after 1.5 keepalives it is dropped as a silent client is, with
    the reason in the log."""
    broker = make_broker(max_held_bytes=65536)
    client = connected(broker, "stuck", keep_alive=10)
    client.protocol.pauseProducing()
    with capturedLogs() as events:
        client.send(*(Publish(topic="t", qos=1, packet_id=n % 65535 + 1)
                      for n in range(broker.config.max_held_bytes // 4 + 1)))
        broker.reactor.advance(0)  # (the read's packets past PACKETS_PER_TURN, at the next turn)
        assert client.transport.producerState == "paused"
        broker.reactor.advance(15)
    assert client.closed
    assert any("read no more for what it was sent" in str(event.get("reason", "")) for event in events)


def _flooded(broker: Any, after: float = 0) -> SocketClient:
    """A subscriber with keepalive 10 whose socket is full under a flood of QoS 0 messages
    ``after`` seconds: the broker holds max_held_bytes for it, queues the rest and reads it no
    more; its PINGREQ waits."""
    client = SocketClient(broker)
    assert client.connect("slow", keep_alive=10).reason_code == 0
    client.subscribe("t")
    client.socket.room = 0  # from now on it reads only what the test says
    broker.reactor.advance(after)
    for _ in range(200):
        broker.publish("t", b"x" * 1000)
    client.send(Pingreq())
    assert client.unread  # (in the kernel's buffer)
    return client


def test_a_client_read_no_more_for_its_backlog_is_read_again_while_its_socket_takes_bytes() -> None:
    """A subscriber that reads slowly (200 bytes a second) and pings every 5 s is not silent
    [MQTT-3.1.2-24]: once its socket has taken more than the answers held for it since reading
    stopped, it is read again at its keepalive, its PINGREQs answered behind what waits."""
    broker = make_broker(max_held_bytes=65536)
    client = _flooded(broker)
    queued = len(broker.sessions["slow"].queue)
    pings = 1
    for _ in range(12):  # a minute: four keepalive checks
        broker.reactor.advance(5)
        client.reads(1000)
        client.send(Pingreq())
        pings += 1
        assert not client.closed
    assert not client.unread  # every PINGREQ read (the last one at the last check)
    for _ in range(10):  # then it reads all the rest (bounded)
        client.reads(1 << 20)
        broker.reactor.advance(0)
    kinds = [type(p) for p in client.received()]
    # Behind the messages written or held before them, ahead of those queued.
    assert kinds == [Publish] * (200 - queued) + [Pingresp] * pings + [Publish] * queued
    assert not client.closed


def test_a_client_read_no_more_just_before_its_keepalive_ran_out_has_a_whole_one_to_read() -> None:
    """Reading it stopped a moment before its deadline: whether it reads is told over the 1.5
    keepalives from then, not over that moment (its PINGREQ came and waits)."""
    broker = make_broker(max_held_bytes=65536)
    client = _flooded(broker, after=14.9)
    broker.reactor.advance(0.2)  # its deadline, had it been read
    assert not client.closed
    client.reads(1000)
    broker.reactor.advance(15)
    client.deliver()
    assert not client.unread and not client.closed


def test_a_client_read_no_more_whose_socket_takes_nothing_is_dropped_after_its_keepalive() -> None:
    """A subscriber on a socket that takes nothing is dropped at 1.5 keepalives, as silent; one
    whose socket takes fewer bytes than the answers held for it since reading stopped is dropped
    at the next check (a client that pings and hardly reads would grow what the broker holds)."""
    for reading, pings, dropped_at in ((0, 1, 15), (2, 1000, 30)):
        broker = make_broker(max_held_bytes=65536)
        client = _flooded(broker)
        client.send(*[Pingreq()] * pings)  # (waiting with the first, read together)
        with capturedLogs() as events:
            while not client.closed and broker.reactor.seconds() < 60:  # (bounded)
                broker.reactor.advance(5)
                broker.reactor.advance(0)  # (an abort ends the transport at the next turn)
                client.reads(reading)
                client.deliver()
        assert broker.reactor.seconds() == dropped_at
        assert any("read no more for what it was sent" in str(event.get("reason", "")) for event in events)


def test_a_subscriber_that_reads_but_never_sends_is_dropped_after_its_keepalive() -> None:
    """[MQTT-3.1.2-24]: a subscriber of large messages that reads (100 KB/s) and sends nothing had
    its silence counted again from each time reading it stopped for its backlog, and was kept for
    ever. Counted again once for each packet read, and read again only while packets come."""
    broker = make_broker(max_held_bytes=65536, max_queued_messages=100000)
    client = SocketClient(broker)
    assert client.connect("mute", keep_alive=10).reason_code == 0
    client.subscribe("t")  # its last packet, at 0
    client.socket.room = 0
    while not client.closed and broker.reactor.seconds() < 120:  # (bounded)
        for _ in range(20):
            broker.publish("t", b"x" * 30000)
        for _ in range(10):
            broker.reactor.advance(0.1)
            broker.reactor.advance(0)
            client.reads(10_000)
            client.received()
            client.deliver()
    assert client.closed and broker.reactor.seconds() <= 17


def test_a_queue_moved_on_after_a_read_goes_out_in_one_write() -> None:
    """Messages queued behind BrokerConfig().max_held_bytes of one read, when the transport took all of it, are
    moved on gathered: one more write, not one per message."""
    broker = make_broker(max_queued_messages=0)
    sub = connected(broker, "sub")
    sub.subscribe("t")
    writes: list[int] = []
    write = sub.transport.write
    sub.transport.write = lambda data: (writes.append(len(data)), write(data))  # type: ignore[method-assign]
    pub = connected(broker, "pub")
    big = b"x" * (BrokerConfig().max_held_bytes // 2)
    pub.send(Publish(topic="t", payload=big), Publish(topic="t", payload=big),
             *(Publish(topic="t", payload=str(n).encode()) for n in range(500)))
    assert [p.payload for p in sub.received()] == [big, big, *(str(n).encode() for n in range(500))]
    assert len(writes) == 2


def test_oversize_packet_closes_before_buffering() -> None:
    broker = make_broker(max_packet_size=1024)
    pub = connected(broker, "pub")
    header = encode(Publish(topic="t", payload=b"x" * 2000))[:5]
    pub.send_bytes(header)
    assert pub.closed


def test_many_frames_in_one_read_and_split_frames() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("t")
    pub = connected(broker, "pub")
    data = b"".join(encode(Publish(topic="t", payload=str(n).encode())) for n in range(100))
    pub.send_bytes(data[:7])
    pub.send_bytes(data[7:])
    assert [p.payload for p in sub.received()] == [str(n).encode() for n in range(100)]


def test_max_connections() -> None:
    broker = make_broker(max_connections=1)
    FakeClient(broker)
    from twisted.internet.address import IPv4Address
    assert broker.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is None


@pytest.mark.parametrize("count, added, logged", [
    (1, 1, True), (2, 1, False), (1000, 1, False), (1001, 1, True), (1002, 1, False), (2001, 1, True),
    (3, 3, True), (1002, 3, True), (1003, 2, False), (2500, 2500, True), (2500, 1499, True), (2500, 499, False)])
def test_the_first_event_and_each_that_passes_a_thousand_more_is_logged(count: int, added: int, logged: bool) -> None:
    from mqtt_broker.stats import once_per_thousand
    assert once_per_thousand(count, added) == logged


def test_connections_refused_at_max_connections_are_logged_once_per_thousand() -> None:
    """Each is counted, and logged the first time, then once per thousand: a client may open
    thousands of connections a second (no CONNECT needed), one line each."""
    broker = make_broker(max_connections=1)
    FakeClient(broker)
    from twisted.internet.address import IPv4Address
    with capturedLogs() as events:
        for port in range(2001):
            assert broker.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port)) is None
    assert [e["refused"] for e in events if "max_connections" in e["log_format"]] == [1, 1001, 2001]
    assert broker.stats.connections_refused == 2001
    assert formatEvent(events[0]).startswith("refusing a connection from 127.0.0.1:0: max_connections (1)")


def test_a_pubrel_sent_again_to_an_mqtt_3_1_client_has_dup_set() -> None:
    """MQTT 3.1 (2.1): DUP is set when the client or server re-delivers a PUBLISH, PUBREL,
    SUBSCRIBE or UNSUBSCRIBE; later versions have no DUP on a PUBREL."""
    for level, first in ((3, b"\x6a"), (4, b"\x62")):
        broker = make_broker(retry_interval=20)
        sub = FakeClient(broker, level)
        sub.connect("sub", clean=False, protocol_level=level)
        sub.subscribe("t", qos=2)
        broker.publish("t", b"A", qos=2)
        [publish] = sub.received()
        sub.send(Pubrec(packet_id=publish.packet_id))  # type: ignore[attr-defined]
        assert sub.transport.value()[:1] == b"\x62"  # the first PUBREL
        sub.transport.clear()
        broker.clock.advance(20)
        assert sub.transport.value() == first + b"\x02" + publish.packet_id.to_bytes(2, "big")  # type: ignore[attr-defined]


# --- hooks -----------------------------------------------------------------------------------

def test_server_side_publish_and_read_access() -> None:
    broker = make_broker()
    sub = connected(broker, "sub")
    sub.subscribe("status/#", qos=1)
    d = broker.publish("status/app", b"up", qos=1, retain=True)
    assert d.called
    [message] = sub.received()
    assert (message.topic, message.payload, message.qos) == ("status/app", b"up", 1)
    assert [s.topic_filter for s in broker.subscriptions_of("sub")] == ["status/#"]


# --- limits ----------------------------------------------------------------------------------

def test_connections_per_minute_per_client_id() -> None:
    broker = make_broker(max_connections_per_minute=2)
    for _ in range(2):
        assert FakeClient(broker).connect("busy").reason_code == 0
    refused = FakeClient(broker)
    assert refused.connect("busy").reason_code == 3  # MQTT 3: server unavailable
    assert refused.closed
    assert FakeClient(broker, version=5).connect("busy").reason_code == 0x9F
    assert FakeClient(broker).connect("other").reason_code == 0  # per client id
    broker.clock.advance(60)
    assert FakeClient(broker).connect("busy").reason_code == 0


def test_connects_refused_by_max_connections_per_minute_are_logged_once_per_thousand() -> None:
    """The setting is for clients that reconnect in a loop: each refusal is counted, and logged
    the first time, then once per thousand, in one line (each was two lines, the refusal's and
    the closing's)."""
    broker = make_broker(max_connections_per_minute=1)
    assert FakeClient(broker).connect("storm").reason_code == 0
    with capturedLogs() as events:
        for _ in range(2001):
            assert FakeClient(broker).connect("storm").reason_code == 3
    assert [e.get("refused") for e in events] == [1, 1001, 2001]
    first = formatEvent(events[0])
    assert first.startswith("refused a CONNECT of 'storm' from 127.0.0.1:") and first.endswith(
        ": max_connections_per_minute (1) (1 refused for it so far; logged once per thousand)")
    assert broker.stats.refused_by_reason["CONNECTION_RATE_EXCEEDED"] == 2001


def test_connects_waiting_together_for_a_decision_are_held_to_the_limit() -> None:
    """CONNECTs of one client id that all passed the early check while a hook (or the password
    check, or a cluster's claim) decided are counted as they are accepted: past the limit, the
    rest are refused (0x9F), not let in because none had been counted yet."""
    broker = make_broker(max_connections_per_minute=2)
    pending: list[Deferred[bool]] = []
    broker.hooks.on_connect(lambda client: pending.append(Deferred()) or pending[-1])
    clients = [FakeClient(broker, version=5) for _ in range(4)]
    for client in clients:
        client.send(Connect(client_id="busy", protocol_level=MQTT_5))
    assert len(pending) == 4
    for decision in pending:
        decision.callback(True)
    codes = [packet.reason_code for client in clients for packet in client.received()
             if isinstance(packet, Connack)]
    assert codes == [0, 0, 0x9F, 0x9F]


def test_counting_connections_per_minute_keeps_no_client_id() -> None:
    """Up to 100,000 ids are counted at once: whole ids of 65,535 bytes would be gigabytes."""
    broker = make_broker(max_connections_per_minute=2)
    with Held() as held:
        for n in range(200):
            client = FakeClient(broker)
            client.connect(f"{n:05}" + "x" * 10_000)
            client.lose()
    assert held.bytes < 200 * 1_000, held.bytes  # (2 MB with the ids)


def test_counting_connections_per_minute_is_bounded_when_every_id_is_new() -> None:
    """A flood of new ids within a minute: the table stays bounded, and is not copied whole at
    each CONNECT (it was, past 100,000, for as long as they were all under a minute old)."""
    broker = make_broker(max_connections_per_minute=1)
    for n in range(100_200):
        assert broker.connect_allowed(f"id-{n}")
        broker.connect_accepted(f"id-{n}")
    assert len(broker._connects) <= 100_000
    assert not broker.connect_allowed("id-100199")  # the latest ids are still counted


def test_subscriptions_per_client() -> None:
    broker = make_broker(max_subscriptions_per_client=2)
    sub = connected(broker, "sub")
    assert sub.subscribe("a", "b", "c") == [Suback(packet_id=1, reason_codes=(0, 0, 0x80))]
    assert sub.subscribe("a", packet_id=2) == [Suback(packet_id=2, reason_codes=(0,))]  # a replacement
    v5 = connected(broker, "v5", version=5)
    assert v5.subscribe("x", "y", "z") == [Suback(packet_id=1, reason_codes=(0, 0, 0x97))]


def test_subscriptions_over_the_quota_are_logged_once_per_thousand() -> None:
    """Each filter refused is counted, and the SUBSCRIBE that refuses the first, then the one
    that passes each thousand more, is logged: a client may send thousands a second."""
    broker = make_broker(max_subscriptions_per_client=1)
    client = connected(broker, "c")
    client.subscribe("a")
    with capturedLogs() as events:
        for n in range(999):
            client.subscribe(f"b/{n}", packet_id=2)
        client.subscribe("c/1", "c/2", "c/3", packet_id=2)  # refusals 1000 to 1002
        for n in range(999):
            client.subscribe(f"d/{n}", packet_id=2)
    lines = [e for e in events if "max_subscriptions_per_client" in e["log_format"]]
    assert [(e["count"], e["refused"]) for e in lines] == [(1, 1), (3, 1002), (1, 2001)]
    assert broker.stats.subscriptions_refused == {"max_subscriptions_per_client": 2001}


def test_a_long_client_id_is_cut_in_the_lines_of_its_full_queue_and_its_session_expiring() -> None:
    """MQTT allows a client id of 65,535 bytes: these lines held it whole."""
    broker = make_broker(max_queued_messages=1)
    client_id = "c" * 5000
    sub = connected(broker, client_id, version=5, clean=False, properties={"session_expiry_interval": 10})
    sub.subscribe("t", qos=1)
    sub.send(Disconnect())
    with capturedLogs() as events:
        for _ in range(2):
            broker.publish("t", b"m", qos=1)
        broker.clock.advance(11)
    lines = [formatEvent(e) or "" for e in events
             if "is full" in e["log_format"] or "expired" in e["log_format"]]
    assert [line.split("'")[0] for line in lines] == ["queue of ", "session "], lines
    assert all(line.count("... (5000 characters)'") == 1 and len(line) < 400 for line in lines), lines


def test_filters_refused_for_the_quota_are_logged_cut_as_is_the_client_id() -> None:
    """Each may be 65,535 bytes: the line held three filters and the client id whole."""
    broker = make_broker(max_subscriptions_per_client=1)
    client = connected(broker, "c" * 5000)
    with capturedLogs() as events:
        client.subscribe("a", *(f"{n}/" + "f" * 5000 for n in range(4)))
    [line] = [formatEvent(e) or "" for e in events if "max_subscriptions_per_client" in e["log_format"]]
    assert line.count("... (5000 characters)'") == 1 and line.count("... (5002 characters)'") == 3, line
    assert line.endswith(" and 1 more: max_subscriptions_per_client (4 filters of all clients refused for it so far; "
                         "logged once per thousand)") and len(line) < 1500


def test_the_same_filter_twice_in_one_subscribe_takes_one_place_of_the_quota() -> None:
    """A SUBSCRIBE's filters are handled as a sequence of SUBSCRIBEs, a second 'a' replacing the
    first [MQTT-3.8.4-3, -5]: it was counted twice, and refused at the limit though held."""
    broker = make_broker(max_subscriptions_per_client=2)
    client = connected(broker, "c", version=5)
    assert client.subscribe("a", "a", "b", qos=1) == [Suback(packet_id=1, reason_codes=(1, 1, 1))]
    assert client.subscribe("a", "b", "c", packet_id=2, qos=1) == [Suback(packet_id=2, reason_codes=(1, 1, 0x97))]


def test_a_filter_a_hook_refuses_takes_no_place_of_the_quota() -> None:
    broker = make_broker(max_subscriptions_per_client=1)
    broker.hooks.on_subscribe(
        lambda client, subscription: Refused(ReasonCode.NOT_AUTHORIZED) if subscription.topic_filter == "a" else None)
    client = connected(broker, "c", version=5)
    assert client.subscribe("a", "b") == [Suback(packet_id=1, reason_codes=(0x87, 0))]


def test_a_shared_subscription_may_have_the_levels_a_plain_one_may() -> None:
    """Its topics have them, after the '$share/{group}/' prefix, which was counted too."""
    from mqtt_broker.topics import MAX_TOPIC_LEVELS
    broker = make_broker()
    client = connected(broker, "c", version=5)
    deep = "/".join(["x"] * MAX_TOPIC_LEVELS)
    assert client.subscribe(deep, "$share/g/" + deep, "$share/g/" + deep + "/x") == [
        Suback(packet_id=1, reason_codes=(0, 0, 0x8F))]


def test_a_publish_hook_replaces_the_message_and_not_the_acknowledgement() -> None:
    """A hook's replacement (dataclasses.replace) is what subscribers get, encoded afresh rather
    than sent as the bytes the original was received as; the publisher is acknowledged for the
    PUBLISH it sent."""
    import dataclasses
    broker = make_broker()
    broker.hooks.on_publish(lambda client, message: dataclasses.replace(message, payload=b"changed"))
    sub = connected(broker, "sub")
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    assert pub.publish("t", b"original", qos=1, packet_id=7) == [Puback(packet_id=7)]
    (message,) = sub.received()
    assert (message.payload, message.qos) == (b"changed", 1)


# --- what is logged ----------------------------------------------------------------------------

def logged(events: list[dict[str, Any]]) -> list[str]:
    """The broker's log lines, each as its first word and the client id."""
    return [e["log_format"].split(" ")[0] + " " + e.get("client_id", "-") for e in events
            if e.get("log_namespace", "").startswith("mqtt_broker")]


def test_routine_disconnects_are_not_logged_by_default() -> None:
    broker = make_broker()
    with capturedLogs() as events:
        connected(broker, "quiet").send(Disconnect())
        connected(broker, "lost").lose()
        rude = connected(broker, "rude")
        rude.send(Connect(client_id="rude"))  # a second CONNECT: a protocol error, closed by the broker
        connected(broker, "bad-disconnect", version=5).send(Disconnect(reason_code=0x80))
    assert logged(events) == ["closing rude", "closing bad-disconnect"]


def test_connection_messages_logs_every_connection() -> None:
    broker = make_broker(connection_messages=True)
    with capturedLogs() as events:
        connected(broker, "quiet", keep_alive=30).send(Disconnect())
        connected(broker, "lost").lose()
    assert logged(events) == ["client quiet", "closing quiet", "client lost", "connection lost"]
    assert "MQTT {version}" in events[0]["log_format"] and events[0]["version"] == "3.1.1"
    assert events[0]["keep_alive"] == 30 and events[0]["peer"].startswith("127.0.0.1:")


HOSTILE = "x\r2026-12-06T10:00:00Z [-] admin connected\x1b[2K\x1b[1A\u2028"
"""A client id MQTT allows (only U+0000 is not) that, written raw, would forge a log line."""


def test_what_clients_choose_is_escaped_in_the_text_log() -> None:
    broker = make_broker(connection_messages=True)
    with capturedLogs() as events:
        client = connected(broker, HOSTILE)
        client.send(Publish(topic="$SYS/" + HOSTILE, payload=b"x"))  # denied, and logged
        client.send(Connect(client_id=HOSTILE))  # a second CONNECT: closed, and logged
    text = "".join(formatEventAsClassicLogText(event) or "" for event in events)
    assert "client 'x\\r2026" in text and "denied PUBLISH to '$SYS/x\\r2026" in text
    assert "closing connection 'x\\r2026" in text
    assert not {"\r", "\x1b", "\u2028"} & set(text), text


def test_a_newline_a_client_chose_makes_no_syslog_record_of_its_own() -> None:
    from twisted.python import log as legacy
    from twisted.python.syslog import SyslogObserver
    records: list[str] = []
    observer = SyslogObserver("mqttbroker")
    observer.syslog = lambda priority, text: records.append(text)  # type: ignore[method-assign]
    broker = make_broker()
    client = connected(broker, "x\nmqttbroker: client admin authenticated")
    legacy.addObserver(observer.emit)
    try:
        client.send(Connect(client_id="again"))
    finally:
        legacy.removeObserver(observer.emit)
    [record] = [r for r in records if "closing connection" in r or "authenticated" in r]
    assert record.startswith("[-] closing connection 'x\\nmqttbroker: client admin authenticated' from ")


def test_a_topic_of_more_than_max_topic_levels_is_refused() -> None:
    """Matching walks the levels one by one: thousands of them would exhaust the stack (a retained
    message on such a topic then failed each SUBSCRIBE matching it)."""
    from mqtt_broker.topics import MAX_TOPIC_LEVELS
    deep = "/".join(["a"] * (MAX_TOPIC_LEVELS + 1))
    broker = make_broker()
    subscriber = connected(broker, "s", version=5)
    assert subscriber.subscribe(deep, "/".join(["+"] * 5000), "ok/#") == [
        Suback(packet_id=1, reason_codes=(0x8F, 0x8F, 0))]
    publisher = connected(broker, "p", version=5)
    publisher.send(Publish(topic=deep, payload=b"x", retain=True))
    assert [p.reason_code for p in publisher.received() if isinstance(p, Disconnect)] == [0x90] and publisher.closed
    assert len(broker.retained) == 0
    will = FakeClient(broker, 5).connect("w", will=Will(topic=deep, payload=b"x"))
    assert will.reason_code == 0x90  # type: ignore[union-attr]


def test_connects_refused_at_authentication_leave_the_client_ids_minute_alone() -> None:
    """max_connections_per_minute counts CONNECTs accepted: refused ones were counted too, so a
    peer without credentials that knows a client id kept its owner out (0x9F) a minute at a time."""
    broker = make_broker(max_connections_per_minute=2)
    broker.hooks.on_connect(lambda client: client.username == "owner")
    for _ in range(3):
        assert FakeClient(broker, version=5).connect("device-1", username="mallory").reason_code == 0x87
    for _ in range(2):
        assert FakeClient(broker, version=5).connect("device-1", username="owner").reason_code == 0
    assert FakeClient(broker, version=5).connect("device-1", username="owner").reason_code == 0x9F


# Topic filters every version forbids: empty [MQTT-4.7.3-1], '#' not last [MQTT-4.7.1-1],
# '+' not a whole level [MQTT-4.7.1-2]. The broker answers each in a SUBSCRIBE (3.1.1: 0x80,
# 5: 0x8F) but takes it in an UNSUBSCRIBE as a filter it had no subscription for.
_INVALID_FILTERS = ["", "a/#/b", "a+/b"]


@pytest.mark.parametrize("topic_filter", _INVALID_FILTERS)
def test_v311_unsubscribe_of_an_invalid_filter_closes(topic_filter: str) -> None:
    """MQTT 3.1.1: a filter that breaks [MQTT-4.7.3-1] / [MQTT-4.7.1-1..2] is a protocol
    violation, and the Server MUST close the connection [MQTT-4.8.0-1] (UNSUBACK has no failure
    code to say it). Mosquitto 2.0.11 closes. Here it is acknowledged and the connection goes on."""
    client = connected(make_broker(), "c", version=MQTT_3_1_1)
    client.send(Unsubscribe(packet_id=5, topic_filters=(topic_filter,)))
    answer = client.received()
    assert client.closed and not any(isinstance(p, Unsuback) for p in answer)


@pytest.mark.parametrize("topic_filter", _INVALID_FILTERS)
def test_v5_unsubscribe_of_an_invalid_filter_is_refused(topic_filter: str) -> None:
    """MQTT 5: the same filter in a SUBSCRIBE gets 0x8F (Topic Filter invalid); in an
    UNSUBSCRIBE it gets 0x11 (No subscription existed), as if it were a filter the client could
    have held. Expected: 0x8F in the UNSUBACK, or a DISCONNECT 0x81/0x82 (4.13; Mosquitto: 0x81)."""
    client = connected(make_broker(), "c", version=MQTT_5)
    client.send(Unsubscribe(packet_id=5, topic_filters=(topic_filter,)))
    answer = client.received()
    assert [(p.packet_id, p.reason_codes) for p in answer if isinstance(p, Unsuback)] == [(5, (0x8F,))]
    assert not client.closed


def test_v5_publish_with_packet_identifier_0_is_a_protocol_error() -> None:
    """A QoS 1 PUBLISH with Packet Identifier 0 [MQTT-2.2.1-3] parses (a Two Byte Integer); what
    is wrong is a value the protocol does not allow: a Protocol Error by the definitions of 1.2
    (as the spec rules for the other zeros: Subscription Identifier 0, Receive Maximum 0, Maximum
    Packet Size 0). Mosquitto 2.0.11 answers DISCONNECT 0x82; here 0x81 Malformed Packet."""
    client = connected(make_broker(), "c", version=MQTT_5)
    client.send_bytes(b"\x32\x06\x00\x01t\x00\x00\x00")  # QoS 1, topic "t", packet id 0, no properties
    answer = client.received()
    assert [p.reason_code for p in answer if isinstance(p, Disconnect)] == [0x82]


@pytest.mark.parametrize("topic_filter", ["/".join(["a"] * 129), "$share/g", "$replay/x"],
                         ids=["129-levels", "share-no-filter", "replay-no-filter"])
def test_mqtt311_unsubscribe_of_a_filter_the_broker_refuses_to_subscribe_gets_an_unsuback(topic_filter: str) -> None:
    """A filter of 129 levels is a valid MQTT 3.1.1 topic filter (section 4.7: no limit on
    levels); the broker's own limit (MAX_TOPIC_LEVELS) refuses it in a SUBSCRIBE with 0x80, as it
    may. The client, told so, UNSUBSCRIBEs it (or cleans up its list): the broker closes the
    connection as for a protocol violation, with no UNSUBACK, where "even where no Topic
    Subscriptions are deleted, the Server MUST respond with an UNSUBACK" [MQTT-3.10.4-4, -5].
    Likewise ``$share/g``, a valid 3.1.1 filter (3.1.1 has no shared subscriptions), which the
    broker reads as a shared one with no filter and refuses in a SUBSCRIBE with 0x80, and
    ``$replay/x`` (the broker's message-log prefix with no filter after it)."""
    broker = make_broker()
    client = connected(broker, "deep", version=4)
    assert [p.reason_codes for p in client.subscribe(topic_filter, qos=1)] == [(0x80,)]  # type: ignore[attr-defined]
    client.send(Unsubscribe(packet_id=2, topic_filters=(topic_filter,)))
    answers = client.received()
    assert not client.closed, f"the broker closed a 3.1.1 client for UNSUBSCRIBE of {topic_filter[:20]!r}..., a valid filter it refused with 0x80"
    assert [type(p) for p in answers] == [Unsuback]

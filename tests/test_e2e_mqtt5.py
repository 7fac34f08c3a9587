"""End to end with paho-mqtt MQTT 5 clients, and MQTT 5 and 3.1.1 clients on one broker."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from paho_helpers import PahoClient

V5 = mqtt.MQTTv5


def props(kind: int, **values: object) -> Properties:
    p = Properties(kind)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def test_mixed_versions_share_one_broker(broker) -> None:  # type: ignore[no-untyped-def]
    """A v5 message reaches a 3.1.1 subscriber without properties and a v5 subscriber with
    its user properties in order [MQTT-3.3.2-18]; a 3.1.1 message reaches a v5 subscriber."""
    v3 = PahoClient(broker.port, "v3sub")
    v3.subscribe("mix/#", qos=1)
    v5 = PahoClient(broker.port, "v5sub", version=V5)
    v5.subscribe("mix/#", qos=1)
    pub5 = PahoClient(broker.port, "v5pub", version=V5)
    user = [("b", "2"), ("a", "1"), ("b", "3")]
    pub5.publish("mix/five", b"5", qos=1, properties=props(PacketTypes.PUBLISH, UserProperty=user))
    assert v3.message().payload == b"5"
    got = v5.message()
    assert got.payload == b"5" and got.properties.UserProperty == user
    pub3 = PahoClient(broker.port, "v3pub")
    pub3.publish("mix/three", b"3", qos=1)
    got = v5.message()
    assert got.payload == b"3" and not hasattr(got.properties, "UserProperty")
    assert v3.message().payload == b"3"
    for c in (v3, v5, pub5, pub3):
        c.close()


def test_request_response_properties_forwarded(broker) -> None:  # type: ignore[no-untyped-def]
    """Response Topic, Correlation Data, Content Type and Payload Format Indicator are
    forwarded unchanged [MQTT-3.3.2-15, -16, -20]."""
    responder = PahoClient(broker.port, "responder", version=V5)
    responder.subscribe("svc/req", qos=1)
    requester = PahoClient(broker.port, "requester", version=V5)
    requester.subscribe("svc/resp/requester", qos=1)
    requester.publish("svc/req", b"ping", qos=1, properties=props(
        PacketTypes.PUBLISH, ResponseTopic="svc/resp/requester", CorrelationData=b"\x01\x02",
        ContentType="text/plain", PayloadFormatIndicator=1))
    request = responder.message()
    p = request.properties
    assert (p.ResponseTopic, p.CorrelationData, p.ContentType, p.PayloadFormatIndicator) == (
        "svc/resp/requester", b"\x01\x02", "text/plain", 1)
    responder.publish(p.ResponseTopic, b"pong", qos=1, properties=props(
        PacketTypes.PUBLISH, CorrelationData=p.CorrelationData))
    response = requester.message()
    assert response.payload == b"pong" and response.properties.CorrelationData == b"\x01\x02"
    responder.close()
    requester.close()



def test_a_message_expiry_interval_of_0_is_sent_on_at_once(broker) -> None:  # type: ignore[no-untyped-def]
    """"Now or never" [MQTT-3.3.2-5, -6]: a connected subscriber gets it, with 0. On a real
    clock the time moves between routing and delivery: a check of the expiry there dropped every
    such message (tests on a Clock that stands still could not tell)."""
    subscriber = PahoClient(broker.port, "now-or-never-sub", version=V5)
    subscriber.subscribe("now-or-never", qos=1)
    publisher = PahoClient(broker.port, "now-or-never-pub", version=V5)
    for n in range(5):
        publisher.publish("now-or-never", b"now %d" % n, qos=1,
                          properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=0))
    publisher.publish("now-or-never", b"end", qos=1)
    got = [subscriber.message() for _ in range(6)]
    assert [m.payload for m in got] == [b"now %d" % n for n in range(5)] + [b"end"]
    assert [m.properties.MessageExpiryInterval for m in got[:5]] == [0] * 5
    publisher.close()
    subscriber.close()

def test_shared_subscription_splits_messages(broker) -> None:  # type: ignore[no-untyped-def]
    """Each message to a shared subscription goes to one member (§4.8.2)."""
    members = [PahoClient(broker.port, f"worker{n}", version=V5) for n in range(2)]
    for member in members:
        member.subscribe("$share/workers/jobs", qos=1)
    pub = PahoClient(broker.port, "boss", version=V5)
    for n in range(10):
        pub.publish("jobs", str(n).encode(), qos=1)
    got = [[m.message().payload for _ in range(5)] for m in members]
    assert sorted(got[0] + got[1]) == sorted(str(n).encode() for n in range(10))
    assert all(m.no_message() for m in members)
    for c in (*members, pub):
        c.close()


def test_session_expiry_and_subscription_identifier(broker) -> None:  # type: ignore[no-untyped-def]
    """A session with an expiry interval outlives its connection [MQTT-3.1.2-23] and delivers
    queued messages with the subscription identifier [MQTT-3.3.4-3]."""
    connect_props = props(PacketTypes.CONNECT, SessionExpiryInterval=300)
    sub = PahoClient(broker.port, "sleepy", version=V5, clean=False, properties=connect_props)
    sub.subscribe("later/#", options=SubscribeOptions(qos=1),
                  properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42))
    sub.close()
    pub = PahoClient(broker.port, "waker", version=V5)
    pub.publish("later/x", b"wake up", qos=1)
    again = PahoClient(broker.port, "sleepy", version=V5, clean=False, properties=connect_props)
    assert again.flags.session_present
    message = again.message()
    assert message.payload == b"wake up" and message.properties.SubscriptionIdentifier == [42]
    again.close()
    pub.close()


def test_no_local_and_retain_as_published(broker) -> None:  # type: ignore[no-untyped-def]
    """No Local [MQTT-3.8.3-3] and Retain As Published [MQTT-3.3.1-12]."""
    client = PahoClient(broker.port, "self", version=V5)
    client.subscribe("loop/#", options=SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True))
    other = PahoClient(broker.port, "other", version=V5)
    client.publish("loop/mine", b"mine", qos=1)
    other.publish("loop/theirs", b"theirs", qos=1, retain=True)
    message = client.message()
    assert (message.payload, message.retain) == (b"theirs", True)
    assert client.no_message()
    client.close()
    other.close()


def test_replay_of_the_message_log(broker_process, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A new subscriber asks for logged messages (user property replay, or the $replay/ filter
    for MQTT 3) and gets them before the live ones, across a restart of the broker."""
    broker = broker_process("--history-filter", "log/#", "--data-dir", str(tmp_path))
    pub = PahoClient(broker.port, "logger", version=V5)
    for n in range(5):
        pub.publish("log/x", str(n).encode(), qos=1)
    pub.close()
    broker.stop()
    broker = broker_process("--history-filter", "log/#", "--data-dir", str(tmp_path), port=broker.port)
    v5 = PahoClient(broker.port, "reader5", version=V5)
    v5.subscribe("log/#", options=SubscribeOptions(qos=1),
                 properties=props(PacketTypes.SUBSCRIBE, UserProperty=[("replay", "last:2")]))
    v3 = PahoClient(broker.port, "reader3")
    v3.subscribe("$replay/all/log/#", qos=1)
    late = PahoClient(broker.port, "late", version=V5)
    late.publish("log/x", b"live", qos=1)
    assert [v5.message().payload for _ in range(3)] == [b"3", b"4", b"live"]
    assert [v3.message().payload for _ in range(6)] == [b"0", b"1", b"2", b"3", b"4", b"live"]
    for c in (v5, v3, late):
        c.close()

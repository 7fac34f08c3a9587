"""A cluster of three broker processes on one real Redis, end to end with real clients: any
client on any node, routing by interest (once per node), MQTT 5 properties and order across
nodes, retained messages and shared subscriptions cluster-wide, sessions taken over across nodes,
nodes joining and leaving."""

from __future__ import annotations

import contextlib
import itertools
import queue
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_broker.cluster.codec import unpack_retained
from mqtt_broker.wire import (
    MQTT_5, Connack, Connect, Disconnect, Puback, Pubcomp, Publish, Pubrec, Pubrel, Subscribe, SubscriptionRequest,
)

from cluster_helpers import Cluster, holds_within, reachable, wait_until
from paho_helpers import PahoClient
from rawclient import RawClient

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster("a", "b", "c")
    yield cluster
    cluster.close()


def settled(cluster: Cluster, node: str, topic_filter: str) -> None:
    """The other nodes learn a node's filters from the control channel: wait until Redis has it
    (the event goes out in the same script)."""
    wait_until(lambda: topic_filter in cluster.routes(node), f"{node} to hold {topic_filter}")


VERSIONS = [(mqtt.MQTTv311, mqtt.MQTTv5), (mqtt.MQTTv5, mqtt.MQTTv311), (mqtt.MQTTv31, mqtt.MQTTv5)]


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("versions", VERSIONS, ids=["v311-to-v5", "v5-to-v311", "v31-to-v5"])
def test_a_message_published_on_one_node_reaches_subscribers_on_the_others(
        cluster: Cluster, qos: int, versions: tuple[int, int]) -> None:
    topic = unique("cross") + "/room/temp"
    on_b = PahoClient(cluster["b"].port, unique("sub-b"), version=versions[1])
    on_c = PahoClient(cluster["c"].port, unique("sub-c"), version=versions[1])
    publisher = PahoClient(cluster["a"].port, unique("pub-a"), version=versions[0])
    try:
        on_b.subscribe(topic.split("/")[0] + "/+/temp", qos)
        on_c.subscribe(topic.split("/")[0] + "/#", 2)
        reachable(publisher, [on_b, on_c], topic)
        publisher.publish(topic, b"21.5", qos=qos)
        for client, granted in ((on_b, qos), (on_c, 2)):
            message = client.message()
            assert (message.topic, message.payload, message.qos) == (topic, b"21.5", min(qos, granted))
        assert on_b.no_message() and on_c.no_message()  # once each
    finally:
        for client in (on_b, on_c, publisher):
            client.close()


def test_dollar_topics_follow_the_wildcard_rules_across_nodes(cluster: Cluster) -> None:
    """[MQTT-4.7.2-1]: a filter starting with a wildcard does not match a $ topic, on another
    node as on one."""
    everything = PahoClient(cluster["b"].port, unique("all"))
    dollar = PahoClient(cluster["c"].port, unique("dollar"))
    publisher = PahoClient(cluster["a"].port, unique("pub"))
    try:
        everything.subscribe("#", 1)
        dollar.subscribe("$app/#", 1)
        reachable(publisher, [dollar], "$app/probe")
        reachable(publisher, [everything], "probe")
        publisher.publish("$app/x", b"dollar", qos=1)
        assert dollar.message().payload == b"dollar"
        assert everything.no_message()
    finally:
        for client in (everything, dollar, publisher):
            client.close()


def test_forwarded_once_to_each_node_that_holds_a_matching_filter(cluster: Cluster) -> None:
    """Routing by interest: node b holds three overlapping filters for three clients and gets one
    inbox entry per batch of messages, never one per subscriber; node c holds none and gets
    nothing."""
    prefix = unique("interest")
    clients = [PahoClient(cluster["b"].port, unique("sub")) for _ in range(3)]
    publisher = PahoClient(cluster["a"].port, unique("pub"))
    try:
        for client, topic_filter in zip(clients, (f"{prefix}/#", f"{prefix}/+", f"{prefix}/x")):
            client.subscribe(topic_filter, 1)
        reachable(publisher, clients, f"{prefix}/x")
        b_before, c_before = cluster.inbox_length("b"), cluster.inbox_length("c")
        publisher.publish(f"{prefix}/x", b"once", qos=1)
        for client in clients:
            assert client.message().payload == b"once"
            assert client.no_message(0.1)
        assert cluster.inbox_length("b") == b_before + 1
        assert cluster.inbox_length("c") == c_before
    finally:
        for client in (*clients, publisher):
            client.close()


def test_mqtt5_properties_survive_the_trip_between_nodes(cluster: Cluster) -> None:
    topic = unique("props")
    subscriber = PahoClient(cluster["b"].port, unique("sub"), version=mqtt.MQTTv5)
    publisher = PahoClient(cluster["a"].port, unique("pub"), version=mqtt.MQTTv5)
    try:
        subscribe = Properties(PacketTypes.SUBSCRIBE)
        subscribe.SubscriptionIdentifier = 77
        subscriber.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True), properties=subscribe)
        reachable(publisher, [subscriber], topic)
        publish = Properties(PacketTypes.PUBLISH)
        publish.UserProperty = [("k", "v"), ("k", "w")]
        publish.MessageExpiryInterval = 600
        publish.ResponseTopic = "reply/here"
        publish.CorrelationData = b"\x01\x02"
        publish.ContentType = "text/plain"
        publisher.publish(topic, b"with properties", qos=1, retain=True, properties=publish)
        message = subscriber.message()
        got = message.properties
        assert message.retain  # Retain As Published
        assert got.UserProperty == [("k", "v"), ("k", "w")]
        assert 598 <= got.MessageExpiryInterval <= 600
        assert (got.ResponseTopic, got.CorrelationData, got.ContentType) == ("reply/here", b"\x01\x02", "text/plain")
        assert got.SubscriptionIdentifier == [77]
        publisher.publish(topic, b"", qos=1, retain=True)  # clear the retained message
    finally:
        subscriber.close()
        publisher.close()


def test_order_per_publisher_is_kept_across_nodes(cluster: Cluster) -> None:
    """Per topic and QoS, as the specification asks (4.6): QoS 0 travels between nodes by
    another way than QoS 1 and 2 (pub/sub, not the inboxes), so it may overtake them."""
    topic = unique("order")
    subscriber = PahoClient(cluster["c"].port, unique("sub"))
    publisher = PahoClient(cluster["a"].port, unique("pub"))
    try:
        subscriber.subscribe(topic, 2)
        reachable(publisher, [subscriber], topic)
        for n in range(600):
            publisher.client.publish(topic, b"%d" % n, qos=n % 3)
        got = [subscriber.message() for _ in range(600)]
        for qos in (0, 1, 2):
            numbers = [int(m.payload) for m in got if m.qos == qos]
            assert numbers == list(range(qos, 600, 3))
    finally:
        subscriber.close()
        publisher.close()


def test_retained_messages_are_cluster_wide(cluster: Cluster) -> None:
    topic = unique("retained") + "/state"
    publisher = PahoClient(cluster["a"].port, unique("pub"))
    try:
        publisher.publish(topic, b"on", qos=1, retain=True)
        # Redis has it once the publish is acknowledged; c learns it by the control channel.
        wait_until(lambda: retained_at(cluster["c"].port, topic) == b"on", "c's replica to hold the message")
        late = PahoClient(cluster["c"].port, unique("late"))
        late.subscribe(topic.split("/")[0] + "/+", 1)
        message = late.message()
        assert (message.payload, message.retain) == (b"on", True)
        late.close()
        publisher.publish(topic, b"", qos=1, retain=True)  # deleted everywhere
        # A fence: retained after the deletion, its event comes after the deletion's, on one channel.
        fence = topic.split("/")[0] + "/fence"
        publisher.publish(fence, b"fence", qos=1, retain=True)
        wait_until(lambda: retained_at(cluster["b"].port, fence) == b"fence", "b to hear of the deletion")
        publisher.publish(fence, b"", qos=1, retain=True)
        again = PahoClient(cluster["b"].port, unique("again"))
        again.subscribe(topic, 1)
        assert again.no_message(0.5)
        again.close()
    finally:
        publisher.close()



def in_redis(cluster: Cluster, topic: str) -> bytes | None:
    """The retained message Redis holds for ``topic``."""
    data = cluster.redis.client().hget("mqtt:retained", topic)
    return None if data is None else unpack_retained(data, 0.0).payload


@pytest.mark.parametrize("second", [b"from b", b""], ids=["set-on-both", "cleared-on-b"])
def test_a_retained_topic_changed_at_once_on_two_nodes_ends_the_same_everywhere(cluster: Cluster,
                                                                                 second: bytes) -> None:
    """A client on a sets a retained topic as one on b sets or clears it: every node ends with
    what Redis applied last [MQTT-3.3.1-5]. (A node has its own change at once; the other's
    event, applied in Redis before it, comes after it.)"""
    on_a, on_b = RawClient(cluster["a"].port), RawClient(cluster["b"].port)
    on_a.connect(unique("sets-on-a"))
    on_b.connect(unique("sets-on-b"))
    try:
        for _ in range(5):
            topic = unique("race")
            if not second:  # something to clear
                on_b.send(Publish(topic=topic, payload=b"old", qos=1, retain=True, packet_id=1))
                on_b.expect(Puback)
                wait_until(lambda: retained_at(cluster["a"].port, topic) == b"old", "a to hold the old message")
            on_a.send(Publish(topic=topic, payload=b"from a", qos=1, retain=True, packet_id=2))
            on_b.send(Publish(topic=topic, payload=second, qos=1, retain=True, packet_id=2))
            on_a.expect(Puback)
            on_b.expect(Puback)
            wait_until(lambda: retained_at(cluster["a"].port, topic) == retained_at(cluster["b"].port, topic)
                       == retained_at(cluster["c"].port, topic) == in_redis(cluster, topic),
                       "every node to hold what Redis holds")
    finally:
        on_a.close()
        on_b.close()


def test_an_expired_retained_message_goes_from_redis_too(cluster: Cluster) -> None:
    """[MQTT-3.3.2-5]. (Each node drops it from its own copy; Redis kept it for good, for every
    node that joins to read again.)"""
    topic = unique("expiring")
    publisher = PahoClient(cluster["a"].port, unique("pub"), version=mqtt.MQTTv5)
    properties = Properties(PacketTypes.PUBLISH)
    properties.MessageExpiryInterval = 1
    publisher.publish(topic, b"short-lived", qos=1, retain=True, properties=properties)
    publisher.close()
    assert in_redis(cluster, topic) == b"short-lived"
    wait_until(lambda: retained_at(cluster["b"].port, topic) is None and in_redis(cluster, topic) is None,
               "the expired message to go")


@pytest.mark.parametrize("subscribe_on", ["a", "b"])
def test_no_local_keeps_a_clients_own_retained_message_from_it_on_any_node(cluster: Cluster,
                                                                          subscribe_on: str) -> None:
    """[MQTT-3.8.3-3] on a retained message too: the client that published it, subscribing with
    No Local on the node it published on or on one that read the message from Redis, does not
    get it back."""
    client_id, topic = unique("own"), unique("own-retained")
    publisher = PahoClient(cluster["a"].port, client_id, version=mqtt.MQTTv5)
    publisher.publish(topic, b"mine", qos=1, retain=True)
    publisher.close()
    wait_until(lambda: retained_at(cluster["b"].port, topic) == b"mine", "b's replica to hold the message")
    again = PahoClient(cluster[subscribe_on].port, client_id, version=mqtt.MQTTv5)
    try:
        again.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=True))
        assert again.no_message(0.5)
    finally:
        again.publish(topic, b"", qos=1, retain=True)
        again.close()


@pytest.mark.parametrize("publisher_on", ["a", "b"])
def test_a_session_moved_to_another_node_gets_nothing_for_a_filter_it_dropped_there(
        cluster: Cluster, publisher_on: str) -> None:
    """A session moves from node a to node b, whose client unsubscribes there: nothing more for
    that filter [MQTT-3.10.4-2], although a keeps a copy of the session (subscriptions too) until
    the routes settle, and passes on to b what the copy matches."""
    client_id, topic = unique("unsubscriber"), unique("dropped")
    expiry = {"session_expiry_interval": 3600}
    first = RawClient(cluster["a"].port)
    first.reader.version = MQTT_5
    first.sock.sendall(_encode5(Connect(client_id=client_id, clean_start=True, protocol_level=5, properties=expiry)))
    assert isinstance(first.receive(), Connack)
    first.sock.sendall(_encode5(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=topic, qos=1),))))
    first.receive()
    settled(cluster, "a", topic)
    resume = Properties(PacketTypes.CONNECT)
    resume.SessionExpiryInterval = 3600
    again = PahoClient(cluster["b"].port, client_id, version=mqtt.MQTTv5, clean=False, properties=resume)
    publisher = PahoClient(cluster[publisher_on].port, unique("pub"))
    try:
        assert again.flags.session_present
        assert again.unsubscribe(topic) == [0]
        for n in range(3):
            publisher.publish(topic, b"after the UNSUBACK %d" % n, qos=1)
        assert again.no_message(1.5)
    finally:
        for client in (again, publisher, first):
            client.close()

def retained_at(port: int, topic: str) -> bytes | None:
    """The retained message a node gives a new subscriber of ``topic`` (None: none in 0.2 s)."""
    probe = PahoClient(port, unique("retained-probe"))
    try:
        probe.subscribe(topic, 0)
        try:
            message = probe.messages.get(timeout=0.2)
        except queue.Empty:
            return None
        return message.payload if message.retain else None
    finally:
        probe.close()


def test_a_shared_subscription_gets_each_message_once_across_the_cluster(cluster: Cluster) -> None:
    group = f"$share/{unique('g')}/jobs"
    members = {node: PahoClient(cluster[node].port, unique(f"worker-{node}")) for node in ("a", "b", "c")}
    publisher = PahoClient(cluster["a"].port, unique("pub"))
    try:
        for node, member in members.items():
            member.subscribe(group, 1)
            settled(cluster, node, group)
        # Probes until the publisher's node knows every node's members (each node's get some):
        # Redis has the routes, a learns them a moment later by the control channel.
        for _ in range(150):
            publisher.publish("jobs", b"probe", qos=1)
            if holds_within(lambda: all(not member.messages.empty() for member in members.values()), 0.1):
                break
        else:
            raise AssertionError("node a never gave the group's probes to every node's member")
        for n in range(30):
            publisher.publish("jobs", b"%d" % n, qos=1)
        got: dict[str, list[int]] = {node: [] for node in members}
        for _ in range(30):
            for node, member in members.items():
                while not member.messages.empty():
                    payload = member.message().payload
                    if payload != b"probe":
                        got[node].append(int(payload))
            if sum(map(len, got.values())) == 30:
                break
            wait_until(lambda: any(not m.messages.empty() for m in members.values())
                       or sum(map(len, got.values())) == 30, "shared messages")
        everything = sorted(n for numbers in got.values() for n in numbers)
        assert everything == list(range(30))  # each exactly once
        assert all(got.values()), got  # and every node's member had a share
    finally:
        for client in (*members.values(), publisher):
            client.close()



@pytest.mark.parametrize("qos", [0, 1])
def test_a_message_expiry_interval_of_0_reaches_a_shared_member_on_another_node(cluster: Cluster, qos: int) -> None:
    """"Now or never" [MQTT-3.3.2-5]: routed just now to the group's member on another node, it
    is sent on, not taken there for expired (that node's clock has moved on since)."""
    topic = unique("now-or-never")
    member = PahoClient(cluster["b"].port, unique("member"), version=mqtt.MQTTv5)
    publisher = PahoClient(cluster["a"].port, unique("pub"), version=mqtt.MQTTv5)
    try:
        member.subscribe(f"$share/g/{topic}", 1)
        settled(cluster, "b", f"$share/g/{topic}")
        reachable(publisher, [member], topic)
        now_or_never = Properties(PacketTypes.PUBLISH)
        now_or_never.MessageExpiryInterval = 0
        for n in range(3):
            publisher.publish(topic, b"now %d" % n, qos=qos, properties=now_or_never)
        publisher.publish(topic, b"end", qos=1)
        got = [member.message().payload for _ in range(4)]  # (QoS 0 and 1 take two ways: any order)
        assert sorted(got) == [b"end", b"now 0", b"now 1", b"now 2"]
    finally:
        member.close()
        publisher.close()


def test_a_message_expiry_interval_of_0_reaches_the_member_a_node_hands_it_on_to(tmp_path: Path) -> None:
    """The group's turn falls on a member on node b that may not read the topic (the ACL): b hands
    the message on at once to a member that may, on node a, which sends it on; it is not taken
    there for expired on a's clock."""
    acl = tmp_path / "acl"
    acl.write_text("topic write #\ntopic read T/open\npattern read T/%c\n")  # a client reads T/<its id>
    handing = Cluster("a", "b", args=("--acl-file", str(acl)))
    reader = PahoClient(handing["a"].port, "reader", version=mqtt.MQTTv5)
    other = PahoClient(handing["b"].port, "other", version=mqtt.MQTTv5)
    publisher = PahoClient(handing["a"].port, "pub", version=mqtt.MQTTv5)
    try:
        reader.subscribe("$share/g/T/+", 1)
        other.subscribe("$share/g/T/+", 1)  # granted (it may read T/open), not for T/reader
        settled(handing, "b", "$share/g/T/+")
        reachable(publisher, [reader], "T/reader")
        now_or_never = Properties(PacketTypes.PUBLISH)
        now_or_never.MessageExpiryInterval = 0
        for n in range(6):  # (every other turn is b's member's)
            publisher.publish("T/reader", b"now %d" % n, qos=1, properties=now_or_never)
        publisher.publish("T/reader", b"end", qos=1)
        got = [reader.message().payload for _ in range(7)]
        assert sorted(got) == sorted([b"now %d" % n for n in range(6)] + [b"end"])
    finally:
        for client in (reader, other, publisher):
            client.close()
        handing.close()

def test_a_shared_subscriptions_messages_go_to_its_connected_members_while_any_is(cluster: Cluster) -> None:
    """As on one broker: a member whose session waits offline on node a gets none of the group's
    messages while node b's member is connected (before, the nodes took turns, and half of them
    waited for the offline member)."""
    topic = unique("tasks")
    group = f"$share/{unique('g')}/{topic}"
    offline_id = unique("offline")
    offline = PahoClient(cluster["a"].port, offline_id, clean=False)
    offline.subscribe(group, 1)
    offline.close()
    wait_until(lambda: cluster.redis.client().hget("mqtt:routes:a", group) == b"0",
               "node a to say its member of the group is offline")
    online = PahoClient(cluster["b"].port, unique("online"))
    publisher = PahoClient(cluster["c"].port, unique("pub"))
    try:
        online.subscribe(group, 1)
        # Once c routes to b's member, it has heard a's news too: it came first, by one channel.
        for _ in range(150):
            publisher.publish(topic, b"probe", qos=1)
            if not online.no_message(0.1):
                break
        for n in range(10):
            publisher.publish(topic, b"%d" % n, qos=1)
        got: list[int] = []

        def arrived() -> bool:
            while not online.messages.empty():
                payload = online.messages.get().payload
                if payload != b"probe":
                    got.append(int(payload))
            return len(got) == 10
        wait_until(arrived, f"the ten messages at the connected member (got {got})")
        assert got == list(range(10))
        offline = PahoClient(cluster["a"].port, offline_id, clean=False)
        queued = []
        with contextlib.suppress(queue.Empty):
            for _ in range(200):
                queued.append(offline.messages.get(timeout=0.5).payload)
        assert all(payload == b"probe" for payload in queued), queued
    finally:
        for client in (offline, online, publisher):
            client.close()


class SharedWork:
    """A shared group with two members: on node a one that acknowledges nothing (``leaving``),
    on node b one that does (``staying``); ten QoS 1 messages published on node a went to them
    in turn. ``got`` gathers what ``staying`` receives (``collect``)."""

    def __init__(self, cluster: Cluster, client_id: str) -> None:
        topic = unique("jobs")
        group = f"$share/{unique('g')}/{topic}"
        self.leaving = RawClient(cluster["a"].port)
        self.leaving.connect(client_id)
        self.leaving.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=group, qos=1),)))
        self.leaving.receive()
        self.staying = PahoClient(cluster["b"].port, unique("staying"))
        self.publisher = PahoClient(cluster["a"].port, unique("pub"))
        self.unacknowledged: list[int] = []
        self.got: list[int] = []
        try:
            self.staying.subscribe(group, 1)
            settled(cluster, "a", group)
            settled(cluster, "b", group)
            for _ in range(150):  # probes until node a takes turns with node b's member
                self.publisher.publish(topic, b"probe", qos=1)
                if not self.staying.no_message(0.1):
                    break
            for n in range(10):
                self.publisher.publish(topic, b"%d" % n, qos=1)
            wait_until(lambda: self.collect() and len(self.unacknowledged) + len(self.got) == 10, "the ten messages")
            assert self.unacknowledged and self.got, (self.unacknowledged, self.got)
        except BaseException:
            self.close()
            raise

    def collect(self) -> bool:
        """Move the numbered payloads received since the last call (probes left out) to
        ``unacknowledged`` or ``got``, by who received them."""
        while True:
            try:
                packet = self.leaving.receive(timeout=0.05)
            except (TimeoutError, OSError):
                break
            if isinstance(packet, Publish) and packet.payload != b"probe":
                self.unacknowledged.append(int(packet.payload))
        while not self.staying.messages.empty():
            payload = self.staying.messages.get().payload
            if payload != b"probe":
                self.got.append(int(payload))
        return True

    def close(self) -> None:
        self.leaving.close()
        self.staying.close()
        self.publisher.close()


def test_a_shared_member_that_leaves_hands_its_unfinished_messages_to_a_member_on_another_node(
        cluster: Cluster) -> None:
    """The last member of a group on node a goes with QoS 1 messages it did not acknowledge:
    they go to the group's member on node b, as they would to another member on one node."""
    work = SharedWork(cluster, unique("leaving"))
    try:
        work.leaving.close()  # a clean session: it ends with the connection
        wait_until(lambda: work.collect() and len(work.got) >= 10, "the messages the leaving member did not finish")
        assert sorted(work.got) == list(range(10))
    finally:
        work.close()


def test_a_shared_member_that_starts_clean_on_another_node_leaves_its_unfinished_messages_to_the_group(
        cluster: Cluster) -> None:
    """The member on node a connects again on node c with a clean start: its old session ends,
    and the QoS 1 messages it did not acknowledge go to the group's member on node b."""
    client_id = unique("moving-member")
    work = SharedWork(cluster, client_id)
    again = RawClient(cluster["c"].port)
    try:
        again.connect(client_id, clean=True)  # node a closes the old connection
        wait_until(lambda: work.collect() and len(work.got) >= 10, "the messages the old session did not finish")
        assert sorted(work.got) == list(range(10))
    finally:
        again.close()
        work.close()


def test_a_will_whose_session_ends_as_another_node_takes_the_client_is_published_at_once(
        cluster: Cluster) -> None:
    """MQTT 5, a will delay of 30 s and no session expiry: the client connects again on node b
    (not a clean start). Its old session could not outlive its connection on node a, so it ends
    there, and its will is due then, not after its delay [MQTT-3.1.3-9], as on one node."""
    client_id, topic = unique("will-mover"), unique("wills") + "/gone"
    observer = PahoClient(cluster["c"].port, unique("observer"))
    probe = PahoClient(cluster["a"].port, unique("probe"))
    delay = Properties(PacketTypes.WILLMESSAGE)
    delay.WillDelayInterval = 30
    first = PahoClient(cluster["a"].port, client_id, version=mqtt.MQTTv5,
                       will=(topic, b"gone", 1, False, delay))  # type: ignore[arg-type]
    again = None
    try:
        observer.subscribe(topic.split("/")[0] + "/#", 1)
        reachable(probe, [observer], topic)
        first.client.loop_stop()  # it says nothing more: node a closes it
        again = PahoClient(cluster["b"].port, client_id, version=mqtt.MQTTv5, clean=False)
        assert not again.flags.session_present
        will = observer.message()
        assert (will.topic, will.payload) == (topic, b"gone")
    finally:
        for client in (again, probe, observer):
            if client is not None:
                client.close()


def test_a_session_taken_over_on_another_node_is_resumed_there(cluster: Cluster) -> None:
    """MQTT 5: the client moves from node a to node b while connected. a sends DISCONNECT 0x8E
    and closes; b answers Session Present 1 and sends again, with DUP and the same packet id, the
    message a sent and the client did not acknowledge [MQTT-4.4.0-1]."""
    client_id, topic = unique("mover"), unique("moving")
    first = RawClient(cluster["a"].port)
    first.reader.version = MQTT_5
    first.send_version = MQTT_5  # type: ignore[attr-defined]
    expiry = {"session_expiry_interval": 3600}
    first.sock.sendall(_encode5(Connect(client_id=client_id, clean_start=True, protocol_level=5, properties=expiry)))
    assert isinstance(first.receive(), Connack)
    first.sock.sendall(_encode5(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=topic, qos=1),))))
    first.receive()
    settled(cluster, "a", topic)
    publisher = PahoClient(cluster["c"].port, unique("pub"))
    for _ in range(150):  # QoS 0 probes until node c knows node a's route for the topic
        publisher.publish(topic, b"probe", qos=0)
        try:
            first.receive(timeout=0.1)
            break
        except TimeoutError:
            continue
    publisher.publish(topic, b"last probe", qos=0)
    while first.receive().payload != b"last probe":  # type: ignore[attr-defined]
        pass
    try:
        publisher.publish(topic, b"unacknowledged", qos=1)
        sent = first.receive()
        assert isinstance(sent, Publish) and sent.payload == b"unacknowledged" and not sent.dup
        second = RawClient(cluster["b"].port)
        second.reader.version = MQTT_5
        second.sock.sendall(_encode5(Connect(client_id=client_id, clean_start=False, protocol_level=5,
                                             properties=expiry)))
        connack = second.receive()
        assert isinstance(connack, Connack) and connack.session_present and connack.reason_code == 0
        again = second.receive()
        assert isinstance(again, Publish) and (again.payload, again.packet_id, again.dup) == (
            b"unacknowledged", sent.packet_id, True)
        second.sock.sendall(_encode5(Puback(packet_id=again.packet_id)))
        told = first.receive()
        assert isinstance(told, Disconnect) and told.reason_code == 0x8E
        assert first.closed_by_peer(5)
        publisher.publish(topic, b"after the move", qos=1)  # now routed to b
        moved = second.receive()
        assert isinstance(moved, Publish) and moved.payload == b"after the move"
        second.sock.sendall(_encode5(Disconnect(properties={"session_expiry_interval": 0})))
        second.close()
    finally:
        publisher.close()
        first.close()


def test_a_qos2_message_received_on_one_node_is_released_on_the_next_and_routed_once(cluster: Cluster) -> None:
    """Node a answered a QoS 2 PUBLISH with PUBREC; the client moves to node b, sends the
    PUBLISH again (DUP, as a client that missed the PUBREC would) and the PUBREL there: b knows
    the packet id from the session, answers PUBCOMP 0, and the message is routed once."""
    client_id, topic = unique("q2mover"), unique("q2moving")
    subscriber = PahoClient(cluster["c"].port, unique("q2sub"), version=mqtt.MQTTv5)
    subscriber.subscribe(topic, 2)
    settled(cluster, "c", topic)
    prober = PahoClient(cluster["a"].port, unique("q2probe"))
    for _ in range(150):  # until node a routes the topic to node c
        prober.publish(topic, b"probe", qos=0)
        if not subscriber.no_message(0.1):
            break
    else:
        raise AssertionError("node a never routed the topic to node c")
    prober.publish(topic, b"last probe", qos=0)
    while subscriber.message().payload != b"last probe":
        pass
    first, second = RawClient(cluster["a"].port), RawClient(cluster["b"].port)
    try:
        assert not first.connect(client_id, clean=False).session_present
        first.send(Publish(topic, b"once", 2, False, False, 7))
        assert first.expect(Pubrec).packet_id == 7
        assert second.connect(client_id, clean=False).session_present
        second.send(Publish(topic, b"once", 2, False, True, 7))
        assert second.expect(Pubrec).packet_id == 7
        second.send(Pubrel(packet_id=7))
        assert second.expect(Pubcomp).packet_id == 7
        assert subscriber.message().payload == b"once"
        assert subscriber.no_message(1.0)
    finally:
        for client in (first, second):
            client.close()
        for paho in (subscriber, prober):
            paho.close()
        ending = RawClient(cluster["b"].port)
        ending.connect(client_id, clean=True)
        ending.close()


def _encode5(packet: object) -> bytes:
    from mqtt_broker.wire import encode
    return encode(packet, MQTT_5)  # type: ignore[arg-type]


def test_a_node_that_joins_late_learns_the_routes(cluster: Cluster) -> None:
    topic = unique("late-join")
    subscriber = PahoClient(cluster["b"].port, unique("sub"))
    try:
        subscriber.subscribe(topic, 1)
        settled(cluster, "b", topic)
        late = cluster.add(unique("d"))
        publisher = PahoClient(late.port, unique("pub"))
        publisher.publish(topic, b"from the new node", qos=1)
        assert subscriber.message().payload == b"from the new node"
        publisher.close()
    finally:
        subscriber.close()


def test_a_node_that_leaves_is_removed_from_the_routes(cluster: Cluster) -> None:
    """A node stopped gracefully: a survivor adopts its persistent session, its routes and
    membership go, and messages for that session still arrive once the client comes back."""
    node_id, topic, client_id = unique("e"), unique("leaving"), unique("stays")
    leaving = cluster.add(node_id)
    subscriber = PahoClient(leaving.port, client_id, clean=False)
    subscriber.subscribe(topic, 1)
    subscriber.close()
    settled(cluster, node_id, topic)
    leaving.stop()
    wait_until(lambda: node_id not in cluster.members(), f"{node_id} to leave the membership")
    assert cluster.routes(node_id) == set()
    publisher = PahoClient(cluster["a"].port, unique("pub"))
    try:
        publisher.publish(topic, b"kept for it", qos=1)
        back = PahoClient(cluster["b"].port, client_id, clean=False)
        assert back.flags.session_present
        assert back.message().payload == b"kept for it"
        back.close()
    finally:
        publisher.close()

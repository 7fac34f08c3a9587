"""A cluster under failure, with counts: a node killed with SIGKILL while it holds sessions and
their messages, Redis killed in the middle of traffic, Redis away for a while. Clients resume
their sessions as the specification says (crash_clients.py); every acknowledged message must
arrive, QoS 2 exactly once."""

from __future__ import annotations

import os
import queue
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cluster_helpers import HEARTBEAT, Cluster, reachable, wait_until
from conftest import BrokerProcess
from crash_clients import exchange
from paho_helpers import PahoClient
from rawclient import RawClient


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster("a", "b", "c")
    yield cluster
    cluster.close()


@pytest.mark.parametrize("qos", [1, 2])
@pytest.mark.parametrize("away", [0.0, 1.5], ids=["reconnects-at-once", "offline-meanwhile"])
def test_a_node_killed_with_sessions_loses_nothing_acknowledged(cluster: Cluster, qos: int, away: float) -> None:
    """The subscriber's node b is killed in the middle of the traffic; the subscriber goes to
    node c (at once, or after its messages queued for a while): its session, what was queued
    and in flight there, and what was on its way to b, all reach it there, QoS 2 once. (What
    was on its way to b comes once the survivor has read b's inbox, after newer messages: the
    order is kept between nodes that live, not across a death.)"""
    ports = {"pub": cluster["a"].port, "sub": cluster["b"].port}

    def kill() -> None:
        cluster["b"].kill()
        ports["sub"] = cluster["c"].port

    report = exchange(qos, 2000, 1, seed=qos, ports=ports, kill=kill, away=away, settle=30.0, deadline=90.0)
    assert report.kills == 1, report.line()
    assert report.received == report.acknowledged == 2000 and not report.missing, report.line()
    assert not report.stalled and not report.violation and not report.excess, report.line()
    if qos == 2:
        assert report.duplicates == 0, report.line()


def test_the_wills_of_a_killed_node_are_published_once(cluster: Cluster) -> None:
    observer = PahoClient(cluster["a"].port, "observer")
    observer.subscribe("wills/#", 1)
    wait_until(lambda: "wills/#" in cluster.routes("a"), "the observer's route")
    at_once = PahoClient(cluster["b"].port, "dies-at-once", will=("wills/at-once", b"gone", 1, False))
    delayed = PahoClient(cluster["b"].port, "dies-later", version=5, clean=False, properties=_expiry(),
                         will=("wills/later", b"gone later", 1, False, _will_delay(1)))  # type: ignore[arg-type]
    returning = PahoClient(cluster["b"].port, "comes-back", version=5, clean=False, properties=_expiry(),
                           will=("wills/never", b"must not be published", 1, False, _will_delay(30)))  # type: ignore[arg-type]
    for client in (at_once, delayed, returning):
        client.client.loop_stop()  # the node dies under them; they say nothing more
    # (b answers a CONNECT before its batch of the session and will reaches Redis)
    redis = cluster.redis.client()
    wait_until(lambda: all(redis.hexists(f"mqtt:session:{c}", "will") for c in ("dies-at-once", "dies-later",
                                                                                 "comes-back")), "b to store the wills")
    cluster["b"].kill()
    first = observer.message()
    assert (first.topic, first.payload) == ("wills/at-once", b"gone")
    second = observer.message()  # after its delay (1 s), from the survivor
    assert (second.topic, second.payload) == ("wills/later", b"gone later")
    back = PahoClient(cluster["c"].port, "comes-back", version=5, clean=False, properties=_expiry())
    assert back.flags.session_present
    extra = [observer.message() for _ in range(0 if observer.no_message(1.5) else 1)]
    assert extra == [], [(m.topic, m.payload) for m in extra]  # each once, and not the will of the client that came back
    back.close()
    observer.close()


def test_what_a_killed_node_was_sent_for_a_shared_member_goes_to_it_once(cluster: Cluster) -> None:
    """Node b holds a subscriber of t and one member of a shared group whose other member is on
    node c, both sessions persistent. b is killed, then ten messages are published on node a:
    each goes to b's inbox for the subscriber, and every other one names b for the group too.
    Once b's sessions are taken over, the member that was on b gets those five and not the
    others, which the member on c had."""
    share, topic = "$share/g/shared-on-a-dead-node", "shared-on-a-dead-node"
    member = PahoClient(cluster["b"].port, "dead-member", clean=False)
    member.subscribe(share, 1)
    subscriber = PahoClient(cluster["b"].port, "dead-subscriber", clean=False)
    subscriber.subscribe(topic, 1)
    other = PahoClient(cluster["c"].port, "live-member")
    other.subscribe(share, 1)
    publisher = PahoClient(cluster["a"].port, "publisher-to-a-dead-node")
    for node, held in (("b", {share, topic}), ("c", {share})):
        wait_until(lambda: held <= cluster.routes(node), f"{node}'s routes")
    probed = set()
    for _ in range(150):  # probes until node a has the routes of both nodes
        publisher.publish(topic, b"probe", qos=1)
        probed |= {client for client in (subscriber, other) if not client.no_message(0.1)}
        if len(probed) == 2:
            break
    for client in (member, subscriber):
        client.client.loop_stop()  # the node dies under them
    cluster["b"].kill()
    for n in range(10):
        publisher.publish(topic, b"%d" % n, qos=1)
    on_c: list[int] = []
    wait_until(lambda: _numbered(other, on_c) and len(on_c) == 5, "the live member's five")
    back = PahoClient(cluster["c"].port, "dead-member", clean=False)
    assert back.flags.session_present
    on_b: list[int] = []
    wait_until(lambda: _numbered(back, on_b) and len(on_b) >= 5, "the five for the member that was on b")
    try:  # and nothing more
        while True:
            payload = back.messages.get(timeout=1.5).payload
            if payload.isdigit():
                on_b.append(int(payload))
    except queue.Empty:
        pass
    assert sorted(on_b + on_c) == list(range(10)), (on_b, on_c)
    for client in (back, other, publisher):
        client.close()



@pytest.mark.parametrize("clean", [False, True], ids=["resumes", "starts-clean"])
def test_the_will_of_a_client_back_at_once_from_a_killed_node_is_published_once(cluster: Cluster, clean: bool) -> None:
    """Node a is killed under a client whose will has no delay, and the client connects to node
    b at once, before a is taken for dead: its connection ended without a DISCONNECT, so the
    will goes [MQTT-3.1.2-8], once. (b's claim leaves the will to a previous owner that looks
    alive; a dead one never publishes it, the survivor does.)"""
    observer = PahoClient(cluster["c"].port, "will-observer")
    observer.subscribe("wills/#", 1)
    wait_until(lambda: "wills/#" in cluster.routes("c"), "the observer's route")
    client = PahoClient(cluster["a"].port, "back-at-once", version=5, clean=False, properties=_expiry(),
                        will=("wills/back-at-once", b"gone", 1, False))
    client.client.loop_stop()  # the node dies under it
    redis = cluster.redis.client()
    wait_until(lambda: redis.hexists("mqtt:session:back-at-once", "will"), "a to store the will")
    cluster["a"].kill()
    again = PahoClient(cluster["b"].port, "back-at-once", version=5, clean=clean, properties=_expiry())
    will = observer.message()
    assert (will.topic, will.payload) == ("wills/back-at-once", b"gone")
    assert observer.no_message(1.5)
    again.close()
    observer.close()


def test_what_a_killed_node_was_given_for_a_member_that_ended_with_it_goes_to_another_member(
        cluster: Cluster) -> None:
    """A shared group has a member on node a and one on node b, both clean sessions. a is
    killed; until b takes it for dead, b gives every other message of the group to a's member,
    through a's inbox, and acknowledges it. That member ended with a: the survivor that reads
    a's inbox hands those messages to the group's member on b, and none acknowledged is lost."""
    share, topic = "$share/g/jobs-of-a-dead-node", "jobs-of-a-dead-node"
    on_a = PahoClient(cluster["a"].port, "member-on-a")
    on_a.subscribe(share, 1)
    on_b = PahoClient(cluster["b"].port, "member-on-b")
    on_b.subscribe(share, 1)
    wait_until(lambda: share in cluster.routes("a") and share in cluster.routes("b"), "both members' routes")
    publisher = PahoClient(cluster["b"].port, "jobs-publisher")
    for _ in range(150):  # probes until b gives a's member its turns
        publisher.publish(topic, b"probe", qos=0)
        if not on_a.no_message(0.05):
            break
    else:
        raise AssertionError("b never gave the member on a a message")
    on_a.client.loop_stop()  # the node dies under it
    cluster["a"].kill()
    for n in range(10):
        publisher.publish(topic, b"%d" % n, qos=1)  # (each acknowledged)
    got: list[int] = []
    wait_until(lambda: _numbered(on_b, got) and sorted(got) == list(range(10)), "the ten for the member on b")
    for client in (on_b, publisher):
        client.close()


@pytest.mark.parametrize("persistent", [False, True], ids=["clean", "persistent"])
def test_a_node_taken_for_dead_while_alive_does_not_publish_its_wills_again(cluster: Cluster,
                                                                           persistent: bool) -> None:
    """Node a stalls (SIGSTOP) past the heartbeat window: the survivor takes its client and
    publishes the will, as for a killed node. a comes back (SIGCONT), hears of the claim and
    closes the client (0x8E), without a will of its own: the connection ended once."""
    observer = PahoClient(cluster["b"].port, "stall-observer")
    observer.subscribe("wills/#", 1)
    wait_until(lambda: "wills/#" in cluster.routes("b"), "the observer's route")
    client = PahoClient(cluster["a"].port, "on-a-stalled-node", version=5, clean=not persistent,
                        properties=_expiry() if persistent else None, will=("wills/stalled", b"gone", 1, False))
    redis = cluster.redis.client()
    wait_until(lambda: redis.hexists("mqtt:session:on-a-stalled-node", "will"), "a to store the will")
    client.client.loop_stop()  # the client says nothing more
    os.kill(cluster["a"].pid, signal.SIGSTOP)
    try:
        will = observer.message()  # from the survivor, once a is taken for dead
        assert (will.topic, will.payload) == ("wills/stalled", b"gone")
    finally:
        os.kill(cluster["a"].pid, signal.SIGCONT)
    wait_until(lambda: "a" in cluster.members(), "a to join again")
    assert observer.no_message(3.0)
    observer.close()

def test_a_process_started_with_a_live_nodes_id_does_not_join_and_stops() -> None:
    """A second process with the id of a live node (a copied data_dir, a cloned machine, a typo)
    joined as that node: it read the node's inbox as the same consumer, and part of the
    acknowledged QoS 1 messages for the node's subscribers went to it instead. It waits a
    heartbeat key's life and a beat for the id to be free, then stops; the node gets every
    message, during the wait and after."""
    cluster = Cluster("a", "b")
    try:
        subscriber = PahoClient(cluster["a"].port, "on-a")
        subscriber.subscribe("twice/#", 1)
        publisher = PahoClient(cluster["b"].port, "on-b")
        reachable(publisher, [subscriber], "twice/x")
        second = BrokerProcess("--cluster", cluster.redis.url, "--cluster-node-id", "a",
                               "--cluster-heartbeat", HEARTBEAT)
        try:
            wait_until(lambda: any(said in second.output() for said in ("joined through Redis", "beats with its id")),
                       "the second process to join or to find its id taken")
            got: list[int] = []
            for i in range(100):
                publisher.publish("twice/x", b"%d" % i, qos=1)  # (each acknowledged: Redis holds it)
            wait_until(lambda: _numbered(subscriber, got) and len(got) >= 100, "every message")
            second.process.wait(15)
            assert "another process beats with this node's id" in second.output()
        finally:
            second.stop()
        publisher.publish("twice/x", b"100", qos=1)
        wait_until(lambda: _numbered(subscriber, got) and len(got) >= 101, "the message after the stop")
        assert sorted(got) == list(range(101))
        assert "a" in cluster.members() and cluster.redis.client().exists("mqtt:node:a")
    finally:
        cluster.close()


def test_a_node_killed_and_started_again_at_once_joins_as_its_last_beat_expires() -> None:
    """Started again while its killed self's heartbeat key lives on (its last beat, for
    `cluster_missed_heartbeats` beats), a node waits for the key to expire and joins, within
    the key's life and a beat from when it found it."""
    cluster = Cluster("a", "b")
    try:
        again = BrokerProcess("--cluster", cluster.redis.url, "--cluster-node-id", "a",
                              "--cluster-heartbeat", HEARTBEAT)
        try:
            wait_until(lambda: "beats with its id" in again.output(), "a's heartbeat key to be found held")
            cluster["a"].kill()
            wait_until(lambda: "joined through Redis" in again.output(), "a to join again")
            assert "another process beats with this node's id" not in again.output()
            subscriber = PahoClient(again.port, "on-a-again")
            subscriber.subscribe("again/#", 1)
            publisher = PahoClient(cluster["b"].port, "on-b")
            reachable(publisher, [subscriber], "again/x")
        finally:
            again.stop()
    finally:
        cluster.close()


def _numbered(client: PahoClient, into: list[int]) -> bool:
    """Move the numbered payloads a client has received into ``into`` (probes left out)."""
    while not client.messages.empty():
        payload = client.messages.get().payload
        if payload.isdigit():
            into.append(int(payload))
    return True


def _expiry() -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    return properties


def _will_delay(seconds: int) -> Properties:
    properties = Properties(PacketTypes.WILLMESSAGE)
    properties.WillDelayInterval = seconds
    return properties


@pytest.mark.parametrize("qos", [1, 2])
def test_redis_killed_in_the_middle_of_the_traffic_loses_nothing_acknowledged(cluster: Cluster, qos: int) -> None:
    """Redis with appendfsync always, killed with SIGKILL and started again on its files twice
    while messages go from node a to node b: what it acknowledged it still has."""
    ports = {"pub": cluster["a"].port, "sub": cluster["b"].port}

    def kill() -> None:
        cluster.redis.kill()
        cluster.redis.start()

    report = exchange(qos, 2000, 2, seed=10 + qos, ports=ports, kill=kill, settle=40.0, deadline=120.0)
    assert report.kills == 2, report.line()
    assert report.ok(), report.line()


def test_redis_away_for_ten_seconds(cluster: Cluster, tmp_path: Path) -> None:
    """Local service goes on, nothing is acknowledged that Redis has not stored, and the
    cluster heals: what was published meanwhile reaches the other node once Redis is back."""
    local_sub = PahoClient(cluster["a"].port, "local-sub")
    local_sub.subscribe("local/#", 0)
    remote_sub = PahoClient(cluster["b"].port, "remote-sub", clean=False)
    remote_sub.subscribe("remote/#", 1)
    wait_until(lambda: "remote/#" in cluster.routes("b"), "b's route")
    prober = PahoClient(cluster["a"].port, "away-prober")  # a learns b's route by the control channel
    reachable(prober, [remote_sub], "remote/probe")
    prober.close()
    publisher = RawClient(cluster["a"].port)
    publisher.connect("away-pub")
    cluster.redis.stop()
    stopped = time.monotonic()
    try:
        from mqtt_broker.wire import Publish, Puback
        publisher.send(Publish(topic="local/x", payload=b"still served", qos=0))
        assert local_sub.message().payload == b"still served"
        publisher.send(Publish(topic="remote/x", payload=b"waits for Redis", qos=1, packet_id=1))
        # QoS 0 for the other node is dropped: it was held, without bound, and sent late.
        publisher.send(Publish(topic="remote/z", payload=b"dropped while Redis is away", qos=0))
        with pytest.raises(TimeoutError):
            publisher.receive(timeout=2.0)  # no PUBACK while Redis cannot store the message
        newcomer = RawClient(cluster["c"].port, timeout=10.0)
        refused = newcomer.connect("newcomer")  # its session cannot be claimed: refused in time
        assert refused.reason_code == 3 and newcomer.closed_by_peer(5)  # MQTT 3: 3 server unavailable
        newcomer.close()
        time.sleep(max(0.0, 10.0 - (time.monotonic() - stopped)))  # the outage this test is about
    finally:
        cluster.redis.start()
    ack = publisher.receive(timeout=30.0)
    assert isinstance(ack, Puback) and ack.packet_id == 1 and ack.reason_code == 0
    publisher.send(Publish(topic="remote/y", payload=b"after", qos=1, packet_id=2))
    got = [remote_sub.message().payload]
    while got[-1] != b"after" and len(got) < 5:
        got.append(remote_sub.message().payload)
    assert got == [b"waits for Redis", b"after"]
    for client in (local_sub, remote_sub, publisher):
        client.close()

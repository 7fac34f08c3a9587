"""A cluster node in this process, its timers on a Clock: membership and the adoption of a dead
node's sessions, decided by the clock; and a broker without a cluster imports nothing of it."""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs

from mqtt_broker import BrokerService, Message
from mqtt_broker.cluster.address import RedisAddress
from mqtt_broker.admin.figures import InboxLag, read
from mqtt_broker.cluster.codec import (
    BARRIER, FORWARDED, HANDED, HELD, pack_forwarded, pack_queued, pack_retained, targeted_head, unpack_queued, unpack_records,
    unpack_retained, unpack_will,
)
from mqtt_broker.cluster.node import node_id
from mqtt_broker.cluster.redis import Redis
from mqtt_broker.cluster.store import CLAIM, WILLS, RedisStore
from mqtt_broker.config import BrokerConfig, ConfigError
from mqtt_broker.session import Queued, Session
from mqtt_broker.store import StoredWill
from mqtt_broker.topics import Subscription
from mqtt_broker.wire import (
    Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Publish, Pubrec, ReasonCode, Suback, Subscribe,
    SubscriptionRequest, Unsubscribe, Will)

from protocol_helpers import FakeClient
from redis_helpers import RedisServer


@inlineCallbacks
def until(condition: Any, what: str) -> Any:
    """Wait (bounded) for Redis's answers to arrive: the reactor is real, the clock is not."""
    for _ in range(500):
        if condition():
            return
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@inlineCallbacks
def past_a_pause(broker: BrokerService, clock: Clock) -> Any:
    """After the clock jumped past a heartbeat key's life, as after a pause: once the node has
    its heartbeat answered and knows who holds its sessions (a delayed will waits for that), a
    second on, when such a will looks again."""
    yield until(lambda: not broker.cluster.unsure_of_sessions(), "the node to know who holds its sessions")
    clock.advance(1.0)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@inlineCallbacks
def node_a(server: RedisServer, clock: Clock | None = None, **settings: Any) -> Any:
    """Node a of a cluster on the server's Redis, emptied first, in this process: joined."""
    server.client().flushall()
    broker = BrokerService(endpoints=[], reactor=reactor, clock=clock or Clock(), cluster=server.url,
                           cluster_node_id="a", close_linger=0,  # (the fake clients never close their side)
                           **settings)
    broker.startService()
    yield broker.cluster.ready
    return broker


@inlineCallbacks
def a_at_1000(server: RedisServer) -> Any:
    """Node a on a Clock at 1000 s: (clock, broker)."""
    clock = Clock()
    clock.advance(1000.0)
    return clock, (yield node_a(server, clock))


@inlineCallbacks
def node_b(server: RedisServer) -> Any:
    """Node b beside node a, on a clock of its own: joined."""
    b = BrokerService(endpoints=[], reactor=reactor, clock=Clock(), cluster=server.url, cluster_node_id="b",
                      close_linger=0)
    b.startService()
    yield b.cluster.ready
    return b


@inlineCallbacks
def connect(broker: BrokerService, version: int = 4, **fields: Any) -> Any:
    """A client of node a, once its CONNACK came (after the claim, in Redis)."""
    client = FakeClient(broker, version)
    client.send(Connect(protocol_level=version, **fields))
    yield until(lambda: client.transport.value(), "the CONNACK, after the claim")
    return client


@inlineCallbacks
def holds(store: RedisStore, client_id: str, *subscriptions: Subscription, expiry: int = 600,
          disconnected_at: float | None = None) -> Any:
    """The store's node holds the client's session, with these subscriptions, in Redis."""
    yield store.claim(client_id, False, 0)
    store.save_session(Session(client_id, expiry), disconnected_at)
    for subscription in subscriptions:
        store.save_subscription(client_id, subscription)
    yield store.flushed()


@inlineCallbacks
def watching_wills(broker: BrokerService) -> Any:
    """A client of node a subscribed to ``wills/#`` (the SUBACK read, the subscription in Redis)."""
    observer = yield connect(broker, client_id="observer")
    observer.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="wills/#", qos=1),)))
    yield broker.store.flushed()
    observer.received()
    return observer


@inlineCallbacks
def publishes(client: FakeClient, what: str, count: int = 1) -> Any:
    """Every PUBLISH the client is sent until there are ``count``, waited for (bounded): a
    message may come through the node's inbox, a moment after the batch that writes it there."""
    got: list[Publish] = []
    yield until(lambda: got.extend(p for p in client.received() if isinstance(p, Publish)) or len(got) >= count, what)
    return got


def adopt(broker: BrokerService, dead: str) -> None:
    """Adopt what ``dead`` held, as the node itself starts it: what fails once the node stops
    (Redis's connection cut under it) is not an error (left unhandled, it was logged as one in
    whichever test collected it)."""
    broker.cluster.survivor.adopt(dead).addErrback(broker.cluster.survivor.failed)


@inlineCallbacks
def s_adopted_from_x(broker: BrokerService, x: RedisStore, server: RedisServer, cluster_id: bytes) -> Any:
    """Node x dies holding session s, with a QoS 2 message queued for it ("once"); the broker's
    node adopts s. Returns the message."""
    yield x.register(600_000)
    yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=2), expiry=3600, disconnected_at=1000.0)
    message = Message(topic="t", payload=b"once", qos=2, cluster_id=cluster_id)
    x.add_delivery("s", Queued(message, 2, False, (), None, 1), None)
    yield x.flushed()
    server.client().delete("mqtt:node:x")
    adopt(broker, "x")
    yield until(lambda: "s" in broker.sessions, "the node to adopt s")
    return message


def test_a_broker_without_a_cluster_imports_nothing_of_it() -> None:
    code = ("import sys; from mqtt_broker import BrokerService; BrokerService(endpoints=[], persistence='memory'); "
            "loaded = [m for m in sys.modules if m.startswith('mqtt_broker.cluster') or m == 'txredisapi']; "
            "print(loaded); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def kept_in(data_dir: Path | str) -> BrokerConfig:
    return BrokerConfig(cluster="redis://127.0.0.1:1/0", data_dir=str(data_dir))


def test_a_node_keeps_the_id_it_made_in_its_data_dir(tmp_path: Path) -> None:
    made = node_id(kept_in(tmp_path / "data"))
    assert made and node_id(kept_in(tmp_path / "data")) == made
    assert (tmp_path / "data" / "cluster-node-id").read_text() == made + "\n"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cluster-node-id"]  # (no temporary file left)


@pytest.mark.parametrize("text", [b"", b"\n", b"\xff\xfe"])
def test_an_empty_node_id_file_gets_a_new_id(tmp_path: Path, text: bytes) -> None:
    """What a crash while the file was written left: every node that read it took the id "" (and
    bytes that are no text stopped the start with a traceback)."""
    (tmp_path / "cluster-node-id").write_bytes(text)
    with capturedLogs() as events:
        made = node_id(kept_in(tmp_path))
    assert made and (tmp_path / "cluster-node-id").read_text() == made + "\n"
    assert any("cluster-node-id" in str(e.get("path")) for e in events), events


def test_a_node_id_whose_write_fails_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written in place, the file was empty after a failure between its creation and its text."""
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(ConfigError, match="No space left on device"):
        node_id(kept_in(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setup", ["data-dir-a-file", "id-a-directory", "data-dir-cannot-be-made"])
def test_a_data_dir_that_cannot_keep_the_node_id_is_a_config_error(tmp_path: Path, setup: str) -> None:
    """NotADirectoryError, IsADirectoryError and FileNotFoundError were raised as they came, and
    twistd showed them under a traceback."""
    data_dir = tmp_path / "data"
    if setup == "data-dir-a-file":
        data_dir.write_text("")
    elif setup == "id-a-directory":
        (data_dir / "cluster-node-id").mkdir(parents=True)
    else:
        data_dir = Path("/proc/no/such")  # (root may make a directory anywhere else)
    with pytest.raises(ConfigError) as caught:
        node_id(kept_in(data_dir))
    assert caught.value.key == "data_dir"
    id_file = data_dir / "cluster-node-id"
    assert str(caught.value).startswith(f"data_dir: cannot keep the cluster node id in {id_file}: ")
    assert node_id(kept_in(data_dir).replace(cluster_node_id="a")) == "a"


@pytest_twisted.inlineCallbacks
def test_a_node_stops_without_redis_after_leave_timeout() -> Iterator[Deferred[Any]]:
    """With Redis out of reach, stopping waited for it for ever: twistd never exited on SIGTERM."""
    from twisted.logger import capturedLogs

    from mqtt_broker.cluster.node import LEAVE_TIMEOUT
    clock = Clock()
    # (port 1: nothing listens there, and only root may)
    broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster="redis://127.0.0.1:1/0",
                           cluster_node_id="a")
    broker.startService()
    with capturedLogs() as events:
        stopped = broker.stopService()
        clock.advance(LEAVE_TIMEOUT - 0.1)
        assert not stopped.called
        clock.advance(0.1)
        yield until(lambda: stopped.called, "the stop")
    assert [e["timeout"] for e in events if "did not answer" in e.get("log_format", "")] == [LEAVE_TIMEOUT]


@pytest_twisted.inlineCallbacks
def test_a_node_with_writes_waiting_for_a_dead_redis_stops_after_leave_timeout() -> Iterator[Deferred[Any]]:
    """A client's session written at its drop waited for Redis for ever, and the stop with it."""
    from twisted.logger import capturedLogs

    from mqtt_broker.cluster.node import LEAVE_TIMEOUT
    redis = RedisServer()
    clock = Clock()
    try:
        broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=redis.url, cluster_node_id="a",
                               close_linger=0)
        broker.startService()
        yield broker.cluster.ready
        yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600})
        redis.kill()
        with capturedLogs() as events:
            stopped = broker.stopService()
            clock.advance(LEAVE_TIMEOUT)
            yield until(lambda: stopped.called, "the stop")
        assert [e for e in events if "did not answer" in e.get("log_format", "")]
        assert broker.store._abandoned and not broker.store._recovering  # (tries no more)
    finally:
        redis.close()


@pytest_twisted.inlineCallbacks
def test_a_node_silent_past_its_heartbeats_is_taken_for_dead_and_its_sessions_adopted(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    clock = Clock()
    clock.advance(1000.0)
    broker = yield node_a(server, clock, cluster_heartbeat=1.0, cluster_missed_heartbeats=3)
    observer = yield connect(broker, client_id="observer")
    observer.received()
    observer.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="wills/#", qos=1),)))
    yield broker.store.flushed()
    observer.received()
    # Node b, by its store: a persistent session with a queued message and a shared subscription,
    # and a connected client's will.
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        yield b.register(3000)
        yield holds(b, "s", Subscription(client_id="s", topic_filter="t/#", qos=1),
                    Subscription(client_id="s", topic_filter="$share/g/t", qos=1, share_group="g"), expiry=3600)
        b.add_delivery("s", Queued(Message(topic="t/1", payload=b"kept", qos=1), 1, False, (), None, 1), None)
        b.arm_will("s", None, Message(topic="wills/s", payload=b"s is gone", qos=1), 0)
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b stopped beating: its key has expired
        yield broker.cluster.survivor.check_nodes()
        # Not yet: a node that just joined gives the others time to beat (they may be back
        # from the same outage).
        assert "s" not in broker.sessions
        clock.advance(3.5)  # heartbeats: the last one finds b silent for longer than three of them
        yield until(lambda: "s" in broker.sessions, "the adoption of b's session")
        session = broker.sessions["s"]
        assert sorted(session.subscriptions) == ["$share/g/t", "t/#"]
        assert [i.message.payload for i in session.queue] == [b"kept"]
        assert server.client().hget("mqtt:owner:s", "node") == b"a"
        yield broker.store.flushed()
        # The group's member here is offline: the other nodes are told so.
        assert server.client().hgetall("mqtt:routes:a") == {b"wills/#": b"1", b"t/#": b"1", b"$share/g/t": b"0"}
        will = yield publishes(observer, "the will at the observer")
        assert [(p.topic, p.payload) for p in will] == [("wills/s", b"s is gone")]
        # b's inbox is read again once its routes are gone everywhere (two of its lives later),
        # then b leaves the membership.
        for _ in range(20):
            clock.advance(1.0)
            if b"b" not in server.client().smembers("mqtt:nodes"):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        assert b"b" not in server.client().smembers("mqtt:nodes")
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_node_whose_id_another_process_took_meanwhile_gives_up_at_its_next_beat(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node a, cut off or paused past its heartbeats, finds at its next beat that another process
    started as a meanwhile: it holds a's heartbeat key. The two would read one inbox and take one
    node's sessions: a gives up (under twistd its process ends), and its stop leaves the other's
    key as it is."""
    clock = Clock()
    broker = yield node_a(server, clock)
    given_up: list[bool] = []
    broker.on_given_up = lambda: given_up.append(True)
    try:
        server.client().set("mqtt:node:a", "another process", px=600_000)
        clock.advance(broker.config.cluster_heartbeat)
        yield until(lambda: given_up, "a to give up")
    finally:
        yield broker.stopService()
    assert server.client().get("mqtt:node:a") == b"another process"


@pytest_twisted.inlineCallbacks
def test_a_shared_subscription_is_announced_with_whether_a_member_is_connected_here(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Redis (and the other nodes, by the same script's event) learn whether a node's members of
    a group are all offline, as they come and go, subscribe and unsubscribe."""
    broker = yield node_a(server)
    group = "$share/g/t"

    def announced() -> Any:
        return broker.store.flushed().addCallback(lambda _: server.client().hget("mqtt:routes:a", group))

    try:
        first = yield connect(broker, client_id="first", clean_start=False)
        first.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=group, qos=1),)))
        assert (yield announced()) == b"1"
        first.lose()
        assert (yield announced()) == b"0"
        second = yield connect(broker, client_id="second", clean_start=False)
        assert (yield announced()) == b"0"  # connected, but not a member
        second.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=group, qos=1),)))
        assert (yield announced()) == b"1"
        first = yield connect(broker, client_id="first", clean_start=False)
        second.lose()
        assert (yield announced()) == b"1"  # first is back
        first.send(Unsubscribe(packet_id=2, topic_filters=(group,)))
        assert (yield announced()) == b"0"  # second's offline session still holds it
        assert broker.cluster.awake == {group: set()}
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_shared_member_taken_by_another_node_is_no_longer_counted_as_connected_here(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        member = yield connect(broker, 5, client_id="member", clean_start=False,
                               properties={"session_expiry_interval": 60})
        member.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="$share/g/t", qos=1),)))
        yield broker.store.flushed()
        assert server.client().hget("mqtt:routes:a", "$share/g/t") == b"1"
        yield b.claim("member", False, 0)  # its client connected to node b
        yield until(lambda: server.client().hget("mqtt:routes:a", "$share/g/t") == b"0",
                    "a to say that its member of the group is not connected here")
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_session_adopted_back_leaves_nothing_of_its_old_copy_here(server: RedisServer) -> Iterator[Deferred[Any]]:
    """A client moved from node a to node b, unsubscribed there from y/#, and b died before a
    forgot its old copy of the session (it keeps it while the routes settle). a adopts the
    session from Redis: the old copy's subscriptions go with it, and y/# is not delivered."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        client = yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600})
        client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="x/#", qos=1),
                                                          SubscriptionRequest(topic_filter="y/#", qos=1))))
        yield broker.store.flushed()
        old = broker.sessions["c"]
        yield b.register(60_000)
        yield b.claim("c", False, 0)  # its client connected to node b
        yield until(lambda: client.closed and "c" not in broker.store.epochs, "a to let the client go")
        assert broker.sessions["c"] is old  # kept while the routes settle
        b.delete_subscription("c", "y/#")
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b died
        adopt(broker, "b")
        yield until(lambda: broker.sessions.get("c") not in (None, old), "a to adopt b's session")
        assert list(broker.sessions["c"].subscriptions) == ["x/#"]
        assert [m.client_id for m in broker.subscriptions.match("y/1")[0]] == []
        assert [m.client_id for m in broker.subscriptions.match("x/1")[0]] == ["c"]
    finally:
        yield broker.stopService()
        yield link.close()


def received(client: FakeClient, into: list[Publish]) -> bool:
    into += [p for p in client.received() if isinstance(p, Publish)]
    return bool(into)


@pytest_twisted.inlineCallbacks
def test_an_inbox_entry_that_cannot_be_handled_is_passed_over(server: RedisServer) -> Iterator[Deferred[Any]]:
    """An entry of node a's inbox that fails (here: not a record at all) is logged and passed
    over; the entries after it are handled (the inbox was read no more)."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        client = yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600})
        client.received()
        server.client().xadd("mqtt:inbox:a", {"d": b"\x07garbage"})
        b.send_on("c", Queued(Message(topic="t/1", payload=b"for c", qos=1), 1, False, (), None, 0), 0)
        yield b.flushed()
        got: list[Publish] = []
        yield until(lambda: received(client, got), "the message after the bad entry")
        assert [p.payload for p in got] == [b"for c"]
        yield until(lambda: server.client().xpending("mqtt:inbox:a", "nodes")["pending"] == 0, "both handled")
    finally:
        yield broker.stopService()
        yield link.close()


def targeted(payload: bytes) -> bytes:
    """An inbox entry's record of a message for the session of client c alone."""
    packed = pack_queued(Queued(Message(topic="t", payload=payload, qos=1), 1, False, (), None, 0))
    return targeted_head("c", len(packed)) + packed


@pytest_twisted.inlineCallbacks
def test_an_entry_for_a_session_being_claimed_stays_unhandled_until_the_message_is_queued(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """A message reaches node a for c while c's claim is under way there: it waits for the claim
    to end, and its inbox entry was marked handled meanwhile, so a node dying in that moment lost
    it. Now the entry stays pending until the message is queued in c's session, and is not
    handled twice when read again meanwhile."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    redis = server.client()
    gate: Deferred[None] = Deferred()
    try:
        yield holds(b, "c", Subscription(client_id="c", topic_filter="t", qos=1))
        claim = broker.store.claim
        broker.store.claim = lambda *args: gate.addCallback(lambda _: claim(*args))  # (held until the gate opens)
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 600}))
        redis.xadd("mqtt:inbox:a", {"d": targeted(b"during the claim"), "e": 1})
        yield until(lambda: broker.cluster.stats.forwarded_in == 1, "a to read the entry")
        yield broker.store.flushed()
        assert redis.xpending("mqtt:inbox:a", "nodes")["pending"] == 1
        # Read again from the first entry given (as after an outage): it was held a second time,
        # and the reads of the entries given went on from the first one until the claim ended.
        entries = yield broker.store.read_inbox("0")
        reads: list[str] = []
        broker.cluster._read_inbox = reads.append  # type: ignore[method-assign]
        broker.cluster._inbox_read(entries, "0")
        broker.cluster._inbox_read([], reads[-1])
        del broker.cluster._read_inbox
        assert len(broker.cluster._claiming["c"]) == 1
        assert reads == [entries[-1][0].decode(), ">"]
        gate.callback(None)
        yield until(lambda: "c" not in broker.cluster._claiming, "the claim's answer")
        yield broker.store.flushed()
        assert redis.xpending("mqtt:inbox:a", "nodes")["pending"] == 0
        assert [(p.topic, p.payload) for p in client.received() if isinstance(p, Publish)] == [
            ("t", b"during the claim")]
        assert redis.hlen("mqtt:inflight:c") == 1  # (queued in the session, in flight, in the batch that marked it)
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_message_of_a_dead_nodes_inbox_for_a_session_being_claimed_goes_through_redis(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died holding c, with a message for c in its inbox; c connects to node a, which
    adopts b's sessions and empties b's inbox while c's claim is under way. The message waited
    in a's memory for the claim, b's entry marked handled: lost if a died then. It goes through
    Redis instead, to a's own inbox in the batch that marks b's entry, and waits there."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    redis = server.client()
    gate: Deferred[None] = Deferred()
    try:
        yield b.register(600_000)
        yield b.create_inbox()
        yield holds(b, "c", Subscription(client_id="c", topic_filter="t", qos=1))
        redis.xadd("mqtt:inbox:b", {"d": targeted(b"left by b"), "e": 1})
        claim, claims = broker.store.claim, []

        def gated(*args: Any) -> Deferred[Any]:
            claims.append(args)
            return gate.addCallback(lambda _: claim(*args)) if len(claims) == 1 else claim(*args)
        broker.store.claim = gated
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 600}))
        redis.delete("mqtt:node:b")  # b died
        adopt(broker, "b")
        yield until(lambda: broker.cluster._claiming.get("c"), "a to hold the message for c's claim")
        yield broker.store.flushed()
        assert redis.xpending("mqtt:inbox:a", "nodes")["pending"] == 1  # (come back in a's inbox, unhandled)
        assert redis.xpending("mqtt:inbox:b", "nodes")["pending"] == 0
        assert not client.received()
        gate.callback(None)
        yield until(lambda: "c" not in broker.cluster._claiming, "the claim's answer")
        yield broker.store.flushed()
        assert [(p.topic, p.payload) for p in client.received() if isinstance(p, Publish)] == [("t", b"left by b")]
        assert redis.xpending("mqtt:inbox:a", "nodes")["pending"] == 0
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_message_from_before_its_session_was_begun_anew_elsewhere_is_not_passed_on(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node a's inbox holds messages for a session it does not hold (its old owner's writes,
    fenced off, say), and the client has since begun its session anew on node b: what came
    before that is not passed on to b (it reached the new session), what came after is."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    redis = server.client()
    try:
        redis.set("mqtt:epochs", 100)  # (the stamp one below the session's is not 0, no stamp)
        claim = yield b.claim("c", True, 0)
        redis.xadd("mqtt:inbox:a", {"d": targeted(b"from before"), "e": claim.since_stamp - 1})
        redis.xadd("mqtt:inbox:a", {"d": targeted(b"from after"), "e": claim.since_stamp})
        yield until(lambda: broker.cluster.stats.forwarded_in == 2 and
                    redis.xpending("mqtt:inbox:a", "nodes")["pending"] == 0, "a to handle both")
        payloads = [queued.message.payload for _, data in redis.xrange("mqtt:inbox:b")
                    for _, _, queued in unpack_records(data[b"d"])]
        assert payloads == [b"from after"]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_message_from_before_its_session_was_begun_anew_here_is_not_delivered(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """The same, on the node that holds the session begun anew: what its inbox holds for the
    session's earlier life is not delivered to it (as a survivor emptying a dead node's inbox
    would have it), what came after is."""
    broker = yield node_a(server)
    redis = server.client()
    try:
        redis.set("mqtt:epochs", 100)  # (the stamp one below the session's is not 0, no stamp)
        client = yield connect(broker, 5, client_id="c", clean_start=True)
        client.received()
        since = broker.store.since_stamps["c"]
        redis.xadd("mqtt:inbox:a", {"d": targeted(b"from before"), "e": since - 1})
        redis.xadd("mqtt:inbox:a", {"d": targeted(b"from after"), "e": since})
        got: list[Publish] = []
        yield until(lambda: received(client, got), "the message from after")
        yield until(lambda: broker.cluster.stats.forwarded_in == 2 and
                    redis.xpending("mqtt:inbox:a", "nodes")["pending"] == 0, "a to handle both")
        assert [p.payload for p in got + client.received()] == [b"from after"]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_taken_for_dead_and_back_reads_its_inbox_again(server: RedisServer) -> Iterator[Deferred[Any]]:
    """While node a was cut off from Redis, a survivor took it for dead and dropped its inbox
    (the stream and its group) and its membership. Back, a is a member again and reads what
    the others write to its inbox (every read failed: no group)."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        client = yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600})
        client.received()
        redis = server.client()
        redis.delete("mqtt:inbox:a", "mqtt:routes:a", "mqtt:clients:a")  # what the survivor did
        redis.srem("mqtt:nodes", "a")
        b.send_on("c", Queued(Message(topic="t/1", payload=b"for c", qos=1), 1, False, (), None, 0), 0)
        yield b.flushed()  # (into a stream of no group)
        redis.client_kill_filter(_type="pubsub")
        redis.client_kill_filter(_type="normal")
        yield until(lambda: redis.sismember("mqtt:nodes", "a"), "a to be a member again")
        got: list[Publish] = []
        # (the inbox is read again a second after a failed read: a second of a's clock each time)
        yield until(lambda: broker.clock.advance(1.0) or received(client, got),  # type: ignore[func-returns-value]
                    "the message written to a's inbox meanwhile")
        assert [p.payload for p in got] == [b"for c"]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_of_an_adopted_session_stays_in_redis_until_it_is_due(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected and c's will delayed 30 s. a adopts c's session and
    schedules the will; the claim took it out of Redis, and a writes it back with its due time,
    so that a node adopting c after a finds it (it lived in a's memory only)."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        yield b.register(600_000)
        yield holds(b, "c")
        b.arm_will("c", None, Message(topic="wills/c", payload=b"c is gone", qos=1), 30)
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b died
        adopt(broker, "b")
        yield until(lambda: "c" in broker.sessions, "a to adopt c")
        yield broker.store.flushed()
        assert "c" in broker.wills
        message, _, delay, due = unpack_will(server.client().hget("mqtt:session:c", "will"))
        assert (message.payload, delay, due) == (b"c is gone", 0, 1030.0)
        clock.advance(30.0)
        yield past_a_pause(broker, clock)
        yield broker.store.flushed()
        assert server.client().hget("mqtt:session:c", "will") is None
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_session_claimed_for_a_client_gone_before_the_answer_expires_here(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """c's session is on node b (disconnected there). c connects to a and goes before a's claim
    is answered: the session is a's now (Redis says so), kept as if c had just disconnected,
    and it expires (it stayed on a, with no timer, for good)."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        yield b.register(600_000)
        yield holds(b, "c", Subscription(client_id="c", topic_filter="t/#", qos=1), expiry=60, disconnected_at=1000.0)
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 60}))
        client.lose()
        yield until(lambda: "c" not in broker.cluster._claiming, "the claim's answer")
        yield broker.store.flushed()
        assert server.client().hget("mqtt:owner:c", "node") == b"a"
        assert broker.sessions["c"].expiry_deadline is not None
        clock.advance(61.0)
        yield broker.store.flushed()
        assert "c" not in broker.sessions and "c" not in broker.store.epochs
        assert server.client().hget("mqtt:owner:c", "node") is None
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_clean_claims_of_clients_gone_before_the_answer_leave_nothing(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Clients that connect clean and go before their claims are answered: nothing of them is
    left, here or in Redis (each left an epoch here and an owner in Redis, for good)."""
    broker = yield node_a(server)
    try:
        for n in range(5):
            client = FakeClient(broker, 4)
            client.send(Connect(protocol_level=4, client_id=f"gone{n}", clean_start=True))
            client.lose()
        yield until(lambda: not broker.cluster._claiming, "the claims' answers")
        yield broker.store.flushed()
        assert not [c for c in broker.store.epochs if c.startswith("gone")]
        assert server.client().keys("mqtt:owner:gone*") == []
        assert server.client().smembers("mqtt:clients:a") == set()
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_claim_answered_after_its_client_was_refused_keeps_the_session_and_its_will(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died holding c, connected, with a will. c connects to a, whose claim is answered
    only after cluster_claim_timeout (c is refused, 0x88): the claim went on in Redis, so the
    session is a's, kept as disconnected, and the will it took out of Redis is published (a
    knew nothing of it: the will was lost and the session left with no owner that knew)."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        observer = yield watching_wills(broker)
        yield b.register(600_000)
        yield holds(b, "c", expiry=3600)
        b.arm_will("c", None, Message(topic="wills/c", payload=b"c is gone", qos=1), 0)
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b died
        answer: Deferred[Any] = Deferred()
        claim = broker.store.claim
        broker.store.claim = lambda *args: answer  # Redis slow to answer
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 3600}))
        broker.store.claim = claim
        clock.advance(broker.config.cluster_claim_timeout)
        assert [p.reason_code for p in client.received()] == [ReasonCode.SERVER_UNAVAILABLE] and client.closed
        claim("c", False, 0).chainDeferred(answer)  # the answer, at last
        yield until(lambda: "c" in broker.sessions, "the session to be taken")
        yield broker.store.flushed()
        assert broker.sessions["c"].connection is None and broker.sessions["c"].expiry_deadline is not None
        will = yield publishes(observer, "the will at the observer")
        assert [(p.topic, p.payload) for p in will] == [("wills/c", b"c is gone")]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_will_is_in_redis_before_its_connack(server: RedisServer) -> Iterator[Deferred[Any]]:
    """The CONNACK went before the batch that takes the will to Redis: a node killed in that
    moment left no will for the survivor to publish, though its client was told it was
    connected."""
    broker = yield node_a(server)
    try:
        client = FakeClient(broker, 5)
        in_redis_at_connack: list[bytes | None] = []
        write = client.transport.write

        def writing(data: bytes) -> None:
            if not in_redis_at_connack:
                in_redis_at_connack.append(server.client().hget("mqtt:session:c", "will"))
            write(data)
        client.transport.write = writing  # type: ignore[method-assign]
        client.send(Connect(protocol_level=5, client_id="c", clean_start=True,
                            will=Will(topic="wills/c", payload=b"c is gone", qos=1, retain=False)))
        yield until(lambda: client.transport.value(), "the CONNACK")
        assert [type(p) for p in client.received()] == [Connack]
        assert in_redis_at_connack and in_redis_at_connack[0] is not None
        message, _, delay, _ = unpack_will(in_redis_at_connack[0])
        assert (message.topic, message.payload, delay) == ("wills/c", b"c is gone", 0)
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_client_id_and_a_user_name_of_long_non_ascii_text_go_to_redis(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """12,000 CJK characters (36,000 bytes of UTF-8, a valid MQTT string): the client's will
    and its QoS 1 message queued for a session Redis keeps failed to be written (their JSON
    heads, 72,000 bytes, had their length in two bytes): no CONNACK, then no PUBACK."""
    broker = yield node_a(server)
    long = "\u4e2d" * 12_000
    try:
        stored = yield connect(broker, 5, client_id="s", clean_start=False,
                               properties={"session_expiry_interval": 600})
        stored.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
        yield broker.store.flushed()
        stored.lose()
        publisher = yield connect(broker, 5, client_id=long, username=long,
                                  will=Will(topic="wills", payload=b"gone", qos=1, retain=False))
        publisher.send(Publish(topic="t", payload=b"queued", qos=1, packet_id=1))
        yield broker.store.flushed()
        assert [type(p) for p in publisher.received()] == [Connack, Puback]
        [queued] = [unpack_queued(item, 1).message for item in server.client().hvals("mqtt:deliv:s")]
        assert (queued.payload, queued.sender) == (b"queued", long)
        will, username, _, _ = unpack_will(server.client().hget(f"mqtt:session:{long}", "will"))
        assert (will.payload, username) == (b"gone", long)
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_client_reconnecting_while_its_node_takes_its_sessions_back_stays_connected(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node a, restarted, takes back the sessions it held while c connects to it again, c's
    claim first: c stays connected (it was closed with 0x8E and its will published), and its
    will is in Redis still."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    before = RedisStore(link, "a", reactor)  # node a before its restart
    try:
        yield holds(before, "c", Subscription(client_id="c", topic_filter="t/#", qos=1))
        broker.store.clients_of = lambda node: succeed(["c"])  # (at once: the two claims meet)
        broker.store.route("something/else", True)  # a batch under way: both claims wait for it
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600},
                            will=Will(topic="wills/c", payload=b"c is gone", qos=0, retain=False)))
        yield broker.cluster.survivor.adopt("a")
        yield broker.store.flushed()
        assert not client.closed and broker.sessions["c"].connection is client.protocol
        assert server.client().hget("mqtt:session:c", "will") is not None
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_shared_message_for_a_session_adopted_lately_is_delivered(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node x died; a adopted s, the only member of $share/g/t (offline). A QoS 1 message that
    node c forwards to a for the group while s counts as having moved lately goes to s (it was
    dropped: the sessions that moved are kept apart from the routing for a while, against a
    message coming by two ways, which a shared subscription's does not)."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x, c = RedisStore(link, "x", reactor), RedisStore(link, "c", reactor)
    try:
        yield x.register(600_000)
        yield holds(x, "s", Subscription(client_id="s", topic_filter="$share/g/t", qos=1, share_group="g"),
                    expiry=3600, disconnected_at=1000.0)
        server.client().delete("mqtt:node:x")  # x died
        adopt(broker, "x")
        yield until(lambda: "s" in broker.sessions, "a to adopt s")
        assert "s" in broker.cluster._moving
        message = Message(topic="t", payload=b"shared", qos=1, cluster_id=b"c-id-0001")
        c.forward("a", pack_forwarded(message, (("g", "$share/g/t"),), clock.seconds()))
        yield c.flushed()
        yield until(lambda: broker.sessions["s"].queue, "the message in s's queue")
        assert [i.message.payload for i in broker.sessions["s"].queue] == [b"shared"]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_message_a_session_brought_with_it_is_not_queued_again_by_a_second_way(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node x died with a QoS 2 message queued in s's session; a adopts s, and the same message
    (by its id) reaches a from the node it was published on, forwarded while s moved: s got it
    twice, the copy it brought counting as no way at all."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x, c = RedisStore(link, "x", reactor), RedisStore(link, "c", reactor)
    try:
        message = yield s_adopted_from_x(broker, x, server, b"c-id-0002")
        assert [i.message.payload for i in broker.sessions["s"].queue] == [b"once"]
        c.forward("a", pack_forwarded(message, (), clock.seconds()))
        yield c.flushed()
        yield until(lambda: broker.cluster.stats.forwarded_in, "a to read c's entry")
        yield broker.store.flushed()
        assert [i.message.payload for i in broker.sessions["s"].queue] == [b"once"]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest.mark.parametrize("publisher_on", ["a", "b"])
@pytest_twisted.inlineCallbacks
def test_a_qos2_message_published_while_a_session_moves_reaches_it_once(
        server: RedisServer, publisher_on: str) -> Iterator[Deferred[Any]]:
    """s moves from node a to node b; a keeps its copy (and its filter) while the routes settle.
    Published on a, a QoS 2 message goes to that copy (whose write Redis refuses, and passes on to
    b) and is forwarded to b; published on b, it goes to s there and is forwarded to a's copy,
    passed on to b again. b knows the two for one by the message's id, and s gets it once. s got
    it twice: published on a, the copy's went before the message had its id; published on b, b's
    own delivery did not count as the first way (for as long as the routes took to settle, 13 s
    with the default heartbeats)."""
    a = yield node_a(server)
    b = yield node_b(server)
    try:
        first = yield connect(a, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        first.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=2),)))
        yield a.store.flushed()
        publisher = yield connect(a if publisher_on == "a" else b, 5, client_id="p")
        yield until(lambda: "t" in b.cluster.forwarding.filters_of("a"), "b to route t to a")
        moved = yield connect(b, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        moved.received()
        yield until(lambda: first.closed and "t" in a.cluster.forwarding.filters_of("b"),
                    "a to let s go and to route t to b")
        assert "s" in a.sessions and "t" in b.cluster.forwarding.filters_of("a")  # (kept while the routes settle)
        ways = b.cluster.stats.forwarded_in + (2 if publisher_on == "a" else 1)
        publisher.send(Publish(topic="t", payload=b"once", qos=2, packet_id=1))
        got: list[Publish] = []
        yield until(lambda: received(moved, got) and b.cluster.stats.forwarded_in >= ways, "both ways to b")
        yield b.store.flushed()
        received(moved, got)
        assert [p.payload for p in got] == [b"once"]
    finally:
        yield b.stopService()
        yield a.stopService()


@inlineCallbacks
def s_on(broker: BrokerService, qos: int = 1) -> Any:
    """s's client on the node, subscribed to t (in Redis): its connection."""
    client = yield connect(broker, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=qos),)))
    yield broker.store.flushed()
    return client


@inlineCallbacks
def s_moves(first: FakeClient, to: BrokerService) -> Any:
    """s's client connects to another node, which takes its session: the new connection, once
    the first one is closed."""
    moved = yield connect(to, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
    moved.received()
    yield until(lambda: first.closed, "the first node to let s go")
    return moved


@inlineCallbacks
def moved_from_x(a: BrokerService, x: RedisStore) -> Any:
    """s's client connects to node a after node x (alive, its inbox never read: x is a store
    alone) held s, subscribed to t at QoS 1: its connection, s moving to a from x."""
    yield x.register(600_000)
    yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=1))
    return (yield connect(a, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600}))


class Stash:
    """A node slow to handle its inbox: what it reads is kept until ``release``."""

    def __init__(self, broker: BrokerService) -> None:
        self.cluster = broker.cluster
        self.entries: list[Any] = []
        self.cluster._handle_entries = self.entries.append

    def release(self) -> None:
        """What was kept is handled, in order, and what comes next at once."""
        del self.cluster._handle_entries
        for entries in self.entries:
            self.cluster._handle_entries(entries)


def connecting_slowly(broker: BrokerService) -> tuple[Deferred[None], FakeClient]:
    """s's client connects to the node again, Redis slow to take its claim: the claim goes once
    the Deferred returned fires; and the new connection."""
    gate: Deferred[None] = Deferred()
    claim = broker.store.claim
    broker.store.claim = lambda *args, **kw: gate.addCallback(lambda _: claim(*args, **kw))
    again = FakeClient(broker, 5)
    again.send(Connect(protocol_level=5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600}))
    return gate, again


@pytest_twisted.inlineCallbacks
def test_a_session_that_moves_gets_a_publishers_messages_in_order_whichever_way_they_come(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moves from node a to node b. Node c's publisher sent message 1 to a (c had not heard of
    b's filter yet), then message 2 to b directly: a passes 1 on to b through Redis, a batch
    later than 2 reached b. b holds what comes directly for s until a has passed on what came
    before (a barrier through a's inbox), so s gets 1 then 2 [MQTT-4.6.0-6]; it got 2 first."""
    a = yield node_a(server)
    b = yield node_b(server)
    link = Redis(RedisAddress.parse(server.url))
    c = RedisStore(link, "c", reactor)
    try:
        moved = yield s_moves((yield s_on(a)), b)
        origin = b"\x0c" * 6
        for node, number in (("a", 1), ("b", 2)):
            message = Message(topic="t", payload=b"%d" % number, qos=1, cluster_id=origin + number.to_bytes(8, "big"))
            c.forward(node, pack_forwarded(message, (), 0.0))
        yield c.flushed()
        got = yield publishes(moved, "both messages at s", 2)
        assert [p.payload for p in got] == [b"1", b"2"]
        yield until(lambda: server.client().xpending("mqtt:inbox:b", "nodes")["pending"] == 0, "b's entries handled")
        assert "s" not in b.cluster._barriers or not b.cluster._barriers["s"].held
    finally:
        yield b.stopService()
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_session_that_moves_to_its_publishers_node_gets_its_messages_in_order(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moves from node a to node b, where its publisher p is: p's message 1, published before
    the move, went to a, which (slow to read its inbox here) passes it on to b after the move;
    p's message 2, published after it, is for s on b at once. It waits until a has passed on
    what it had, so s gets 1 then 2 [MQTT-4.6.0-6]; it got 2 first."""
    a = yield node_a(server)
    b = yield node_b(server)
    try:
        first = yield s_on(a)
        publisher = yield connect(b, 5, client_id="p")
        yield until(lambda: "t" in b.cluster.forwarding.filters_of("a"), "b to route t to a")
        stash = Stash(a)
        publisher.send(Publish(topic="t", payload=b"1", qos=1, packet_id=1))
        yield until(lambda: stash.entries, "message 1 in a's inbox")
        moved = yield s_moves(first, b)
        publisher.send(Publish(topic="t", payload=b"2", qos=1, packet_id=2))
        yield b.store.flushed()
        yield until(lambda: len(stash.entries) == 2, "b's request in a's inbox")
        stash.release()
        got = yield publishes(moved, "both messages at s", 2)
        assert [p.payload for p in got] == [b"1", b"2"]
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_what_the_copy_of_a_session_that_moved_passes_on_in_its_last_moment_is_not_delivered_twice(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moves from node a to node b; a keeps its copy for the settling time, b takes what comes
    by two ways for one for as long. Just before a forgets its copy, node c's QoS 2 message comes
    to both nodes: b delivers it, a's copy passes it on a moment later, when b's settling time
    has run out too: s got it twice [MQTT-4.3.3]. b counts s as moving for longer than a keeps
    its copy."""
    a = yield node_a(server)
    b = yield node_b(server)
    link = Redis(RedisAddress.parse(server.url))
    c = RedisStore(link, "c", reactor)
    try:
        moved = yield s_moves((yield s_on(a, qos=2)), b)
        c.forward("b", pack_forwarded(Message(topic="t", payload=b"first", qos=2, cluster_id=b"\x0c" * 13 + b"\x01"),
                                      (), 0.0))
        yield c.flushed()
        got = yield publishes(moved, "c's first message, after a's answer")
        settle = a.cluster._settle
        for node in (a, b):
            node.clock.advance(settle - 0.5)
        assert "s" in a.sessions  # (the copy)
        stash = Stash(a)
        message = Message(topic="t", payload=b"once", qos=2, cluster_id=b"\x0c" * 13 + b"\x02")
        c.forward("a", pack_forwarded(message, (), 0.0))
        c.forward("b", pack_forwarded(message, (), 0.0))
        yield c.flushed()
        got += yield publishes(moved, "the message, at b directly")
        yield until(lambda: stash.entries, "the message in a's inbox")
        b.clock.advance(1.0)
        stash.release()
        forwarded_in = b.cluster.stats.forwarded_in
        yield until(lambda: b.cluster.stats.forwarded_in > forwarded_in, "a's copy to pass it on to b")
        yield b.store.flushed()
        got += [p for p in moved.received() if isinstance(p, Publish)]
        assert [p.payload for p in got] == [b"first", b"once"]
    finally:
        yield b.stopService()
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_what_waits_for_a_previous_node_that_does_not_answer_goes_after_a_second_its_entry_pending_till_then(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moved to node a from node x, alive but silent (its inbox is never read): a message
    forwarded to a for s goes round through a's inbox and waits there for x's answer, its entry
    unhandled (a node that dies meanwhile leaves it to be read again). Without an answer, s gets
    it a second later (BARRIER_TIMEOUT), once."""
    clock, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        client = yield moved_from_x(a, x)
        assert "s" in a.cluster._barriers
        message = Message(topic="t", payload=b"m", qos=1, cluster_id=b"\x0c" * 14)
        x.forward("a", pack_forwarded(message, (), 0.0))
        yield x.flushed()
        inbox = server.client()
        yield until(lambda: a.cluster._barriers["s"].held, "the message back from its round, held")
        assert [r for r in unpack_records(inbox.xrange("mqtt:inbox:x")[-1][1][b"d"])][0][:2] == (BARRIER, "a")
        yield a.store.flushed()
        assert inbox.xpending("mqtt:inbox:a", "nodes")["pending"] == 1
        assert [p for p in client.received() if isinstance(p, Publish)] == []
        clock.advance(1.0)
        got = yield publishes(client, "the message, without x's answer")
        assert [p.payload for p in got] == [b"m"]
        yield until(lambda: inbox.xpending("mqtt:inbox:a", "nodes")["pending"] == 0, "its entry handled")
    finally:
        yield a.stopService()
        yield link.close()


def held_for_x(number: int, qos: int = 1, payload: bytes = b"m") -> Message:
    """A message of node x's publisher (its ids' origin: six 0x0c bytes)."""
    return Message(topic="t", payload=payload, qos=qos, cluster_id=b"\x0c" * 6 + number.to_bytes(8, "big"))


def kept_for(session: Session) -> list[bytes]:
    return [i.message.payload for i in session.queue] + [i.message.payload for i in session.outgoing.values()]


@pytest_twisted.inlineCallbacks
def test_a_held_qos2_message_read_again_after_a_crash_reaches_the_session_once(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moved to node a from x (alive, slow): a QoS 2 message forwarded to a goes round and is
    held, its entry unhandled. a dies; x passes on its own copy of the message late. a starts
    again, takes s back and reads its inbox again: s has the message once (the HELD record, no
    longer one a barrier sent round, is checked as any message that may come two ways)."""
    clock, first = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    second = None
    try:
        yield x.register(600_000)
        yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=2))
        yield connect(first, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        message = held_for_x(1, qos=2, payload=b"once")
        x.forward("a", pack_forwarded(message, (), 0.0))
        yield x.flushed()
        yield until(lambda: first.cluster._barriers["s"].held, "the message back from its round, held")
        yield first.store.flushed()
        first.cluster.started = False  # (killed: a hears and writes nothing more)
        first.cluster.survivor.stop()
        yield first.cluster.redis.close()
        x.send_on("s", Queued(message, 2, False, (), None, 0), 0)
        yield x.flushed()
        server.client().delete("mqtt:node:a")  # (its heartbeat key expired: the restart waited for that)
        second = BrokerService(endpoints=[], reactor=reactor, clock=Clock(), cluster=server.url,
                               cluster_node_id="a", close_linger=0)
        second.startService()
        yield second.cluster.ready
        yield until(lambda: server.client().xpending("mqtt:inbox:a", "nodes")["pending"] == 0, "a's entries handled")
        yield second.store.flushed()
        assert kept_for(second.sessions["s"]) == [b"once"]
    finally:
        if second is not None:
            yield second.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_dead_nodes_held_message_and_the_copy_passed_on_to_it_reach_the_session_once(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """x died with two records for s in its inbox: the HELD one it sent round and the copy of the
    same message another node passed on. a adopts s and x's inbox: s has the message once."""
    _, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x, p = RedisStore(link, "x", reactor), RedisStore(link, "p", reactor)
    try:
        yield x.register(600_000)
        yield x.create_inbox()
        yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=2), expiry=3600)
        message = held_for_x(2, qos=2, payload=b"once")
        x.send_on("s", Queued(message, 2, False, (), None, 0), 0, HELD)
        p.send_on("s", Queued(message, 2, False, (), None, 0), 0)
        yield x.flushed()
        yield p.flushed()
        server.client().delete("mqtt:node:x")
        adopt(a, "x")
        yield until(lambda: "s" in a.sessions and kept_for(a.sessions["s"]), "a to deliver x's inbox")
        yield a.store.flushed()  # (the two records are read together, handled in one turn)
        assert kept_for(a.sessions["s"]) == [b"once"]
    finally:
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_what_a_session_that_moved_holds_back_stays_in_the_inbox_when_the_node_stops(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """A message held for x's answer when node a stops: nothing of the barrier runs after the
    stop (it delivered into the stopped broker and wrote to a closed store, retried for ever);
    the message's entry stays unhandled, for whoever reads a's inbox next."""
    clock, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        yield moved_from_x(a, x)
        x.forward("a", pack_forwarded(held_for_x(3), (), 0.0))
        yield x.flushed()
        yield until(lambda: a.cluster._barriers["s"].held, "the message held")
        yield a.store.flushed()
    finally:
        yield a.stopService()
        yield link.close()
    clock.advance(2 * a.cluster._settle)
    assert (a.store._pending, a.store._handled, a.store._in_flight) == ([], [], deque())
    assert server.client().xpending("mqtt:inbox:a", "nodes")["pending"] == 1


@pytest_twisted.inlineCallbacks
def test_a_client_that_connects_again_to_the_node_its_session_moved_to_gets_its_messages_in_order(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moved to node a from x (alive, slow to answer): message 1 is held for x's answer. The
    client connects to a again, and message 2 comes while that claim is under way (Redis slow):
    it waits for the claim and then behind message 1, which goes once x's answer is given up on
    [MQTT-4.6.0-6]; it overtook message 1."""
    clock, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        yield moved_from_x(a, x)
        x.forward("a", pack_forwarded(held_for_x(11, payload=b"1"), (), 0.0))
        yield x.flushed()
        yield until(lambda: a.cluster._barriers["s"].held, "message 1 back from its round, held")
        gate, again = connecting_slowly(a)
        x.forward("a", pack_forwarded(held_for_x(12, payload=b"2"), (), 0.0))
        yield x.flushed()
        yield until(lambda: a.cluster._claiming.get("s"), "message 2 back, waiting for the claim")
        gate.callback(None)
        yield until(lambda: again.transport.value(), "the CONNACK")
        yield a.store.flushed()
        clock.advance(1.0)
        got = yield publishes(again, "both messages", 2)
        assert [p.payload for p in got] == [b"1", b"2"]
    finally:
        yield a.stopService()
        yield link.close()


def from_c(number: int, payload: bytes) -> Message:
    """A message of node c's publisher (its ids' origin: six 0x0d bytes)."""
    return Message(topic="t", payload=payload, qos=1, cluster_id=b"\x0d" * 6 + number.to_bytes(8, "big"))


@pytest_twisted.inlineCallbacks
def test_a_message_held_for_a_session_whose_client_connects_again_meanwhile_reaches_it(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moved to node a from x (alive, slow to answer): message 1 is held for x's answer. The
    client connects to a again (Redis slow to answer the claim) and x's answer is given up on
    meanwhile: message 1 must still reach s."""
    clock, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        yield moved_from_x(a, x)
        x.forward("a", pack_forwarded(held_for_x(11, payload=b"1"), (), 0.0))
        yield x.flushed()
        yield until(lambda: a.cluster._barriers["s"].held, "message 1 back from its round, held")
        gate, again = connecting_slowly(a)
        assert a.cluster.claiming("s")
        clock.advance(1.0)  # x's answer given up on while the claim is under way
        yield a.store.flushed()
        gate.callback(None)
        yield until(lambda: again.transport.value(), "the CONNACK")
        yield a.store.flushed()
        got = yield publishes(again, "message 1")
        assert [p.payload for p in got] == [b"1"]
    finally:
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_publishers_first_message_while_the_client_connects_again_waits_for_the_previous_node(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moved to node a from x (alive, slow to answer). The client connects to a again (Redis
    slow to answer the claim); meanwhile the first message of node c's publisher forwarded to a
    directly comes (2): c sent its message 1 to x before it knew of a, which x passes on late.
    Message 2 must wait for x's answer (or its timeout) as it would outside the claim: s gets 1
    then 2 [MQTT-4.6.0-6]."""
    clock, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x, c = RedisStore(link, "x", reactor), RedisStore(link, "c", reactor)
    try:
        yield moved_from_x(a, x)
        gate, again = connecting_slowly(a)
        c.forward("a", pack_forwarded(from_c(2, b"2"), (), 0.0))
        yield c.flushed()
        yield until(lambda: a.cluster._claiming.get("s"), "message 2 back from its round, waiting for the claim")
        gate.callback(None)
        yield until(lambda: again.transport.value(), "the CONNACK")
        yield a.store.flushed()
        x.send_on("s", Queued(from_c(1, b"1"), 1, False, (), None, 0), 0)  # x passes message 1 on
        yield x.flushed()
        clock.advance(1.0)
        got = yield publishes(again, "both messages", 2)
        assert [p.payload for p in got] == [b"1", b"2"]
    finally:
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_message_back_from_its_round_for_a_dropped_subscription_leaves_nothing_on_its_way_round(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moved to node a from x (alive, slow). Message 1 forwarded to a goes round; the client
    unsubscribes before it is back. Back, it is for no subscription: nothing is on its way round
    any more, and the session counts as moving until the routes settle, not twice as long."""
    clock, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        client = yield moved_from_x(a, x)
        stash = Stash(a)
        x.forward("a", pack_forwarded(held_for_x(41, payload=b"1"), (), 0.0))
        yield x.flushed()
        yield until(lambda: stash.entries, "message 1 in a's inbox")
        stash.release()
        assert a.cluster._barriers["s"].round
        stash = Stash(a)
        yield a.store.flushed()
        yield until(lambda: stash.entries, "message 1 back from its round")
        client.send(Unsubscribe(packet_id=2, topic_filters=("t",)))
        stash.release()
        yield a.store.flushed()
        clock.advance(1.0)  # (x's answer given up on)
        assert not a.cluster._barriers["s"].round, a.cluster._barriers["s"].round
    finally:
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_session_that_moved_from_a_node_gone_since_waits_for_no_answer_from_it(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s moved to node a from x, alive then; x dies and what is left of it goes, its inbox
    among it. A message forwarded to a for s goes to s at once: a request to x would have made
    its inbox again, for nobody ever to read or drop."""
    _, a = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x, c = RedisStore(link, "x", reactor), RedisStore(link, "c", reactor)
    redis = server.client()
    try:
        yield x.register(600_000)
        yield x.create_inbox()
        yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=1))
        client = yield connect(a, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        assert a.cluster._barriers["s"].previous == "x"
        redis.delete("mqtt:node:x")
        yield a.store.forget_node("x")
        assert (yield a.store.drop_node("x"))
        yield until(lambda: a.cluster._barriers["s"].previous is None, "a to hear that x is gone")
        c.forward("a", pack_forwarded(held_for_x(21), (), 0.0))
        yield c.flushed()
        got = yield publishes(client, "the message")
        assert [p.payload for p in got] == [b"m"]
        yield a.store.flushed()
        assert not redis.exists("mqtt:inbox:x")
    finally:
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_left_to_a_connection_that_went_before_its_claim_was_answered_is_published(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """c is connected to node b, its will delayed 30 s. c's client connects to node a and goes
    before a's claim is answered: b lets c go and leaves the delayed will to the new connection
    (which came within the delay), and a, whose connection went, publishes it after the delay
    (nobody did)."""
    clock = Clock()
    clock.advance(1000.0)
    a = yield node_a(server, clock)
    b = yield node_b(server)
    try:
        watcher = yield watching_wills(a)
        c = yield connect(b, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600},
                          will=Will(topic="wills/c", payload=b"c is gone", qos=0, retain=False,
                                    properties={"will_delay_interval": 30}))
        yield b.store.flushed()
        gone = FakeClient(a, 5)
        gone.send(Connect(protocol_level=5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600}))
        gone.lose()
        yield until(lambda: c.closed and "c" in a.sessions and "c" not in a.cluster._claiming,
                    "b to let c go, and a to hold its session")
        yield a.store.flushed()
        assert a.stats.wills_published == 0 and [p for p in watcher.received() if isinstance(p, Publish)] == []
        clock.advance(30.0)
        yield past_a_pause(a, clock)
        yield until(lambda: a.stats.wills_published == 1, "the will, once Redis deleted it as a's")
        will = yield publishes(watcher, "the will at the watcher")
        assert [(p.topic, p.payload) for p in will] == [("wills/c", b"c is gone")]
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_due_before_the_news_of_a_claim_elsewhere_is_not_published(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """c left node a without a DISCONNECT (its will delayed 30 s) and, 10 s later, resumed its
    session on node b. The news of b's claim has not reached a (lost, or late on the control
    channel) when a's timer comes due: the client came back within the delay, so the will is
    not published [MQTT-3.1.3-9]. Redis refuses a's deleting the will as the session's owner,
    which tells a that it is no longer."""
    clock = Clock()
    clock.advance(1000.0)
    a = yield node_a(server, clock, cluster_heartbeat=60)  # (the clock's 30 s are no pause)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        yield b.register(600_000)
        watcher = yield watching_wills(a)
        c = yield connect(a, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600},
                          will=Will(topic="wills/c", payload=b"c is gone", qos=1,
                                    properties={"will_delay_interval": 30}))
        c.lose()
        yield a.store.flushed()
        assert "c" in a.wills
        clock.advance(10.0)
        handlers = a.cluster.redis._handlers
        control = handlers[b"mqtt:control"]
        held: list[bytes] = []
        handlers[b"mqtt:control"] = held.append  # the news of b's claim does not come (yet)
        claim = yield b.claim("c", False, 0)
        assert claim.session is not None  # resumed on b: Session Present 1
        yield until(lambda: held, "the news of the claim, held back")
        clock.advance(20.0)  # a's timer
        yield until(lambda: "c" not in a.sessions or a.cluster.moved_away("c"), "a to let c go")
        for event in held:
            control(event)
        yield a.store.flushed()
        assert a.stats.wills_published == 0 and "c" not in a.wills
        assert [p for p in watcher.received() if isinstance(p, Publish)] == []
        assert server.client().hgetall("mqtt:wills-left:a") == {}
    finally:
        handlers[b"mqtt:control"] = control
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_clean_start_after_the_owner_died_hands_on_what_its_shared_subscription_left(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node x died holding s, a member of $share/g/t with a QoS 1 message of the group in
    flight. Before any survivor adopts s, its client connects to a with a clean start: the
    message goes to the group's other member, as when a session ends on a live node (the
    claim deleted it with the session)."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        m = yield connect(broker, 5, client_id="m", clean_start=False, properties={"session_expiry_interval": 600})
        m.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="$share/g/t", qos=1),)))
        yield broker.store.flushed()
        m.received()
        yield x.register(600_000)
        yield holds(x, "s", Subscription(client_id="s", topic_filter="$share/g/t", qos=1, share_group="g"),
                    expiry=3600)
        x.add_delivery("s", Queued(Message(topic="t", payload=b"unfinished", qos=1), 1, False, (), ("g", "$share/g/t"), 1), 5)
        yield x.flushed()
        server.client().delete("mqtt:node:x")  # x died
        s = yield connect(broker, 5, client_id="s", clean_start=True)
        assert not s.received()[0].session_present
        got: list[Publish] = []
        yield until(lambda: received(m, got), "the group's message at m")
        assert [p.payload for p in got] == [b"unfinished"]
        assert server.client().hgetall("mqtt:deliv:s") == {}
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_claim_overtaken_before_its_answer_came_lets_the_client_go(server: RedisServer) -> Iterator[Deferred[Any]]:
    """c connects to node a and, a moment later, to node b. a's claim comes first in Redis, b's
    after it, and the news of b's claim reaches a before the answer to its own: a lets its
    connection go once connected (0x8E). It ignored the news, and c stayed connected on both
    nodes (with no will and a session ending with it, a never writes, so it was never fenced)."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    before, b = RedisStore(link, "a", reactor), RedisStore(link, "b", reactor)
    try:
        answer: Deferred[Any] = Deferred()
        broker.store.claim = lambda *args: answer  # (its answer held back)
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=True))
        mine = yield before.claim("c", True, 0)  # a's claim, as Redis applies it
        yield b.register(60_000)
        yield b.claim("c", True, 0)  # b's, after it
        yield until(lambda: "c" in broker.cluster._overtaken, "the news of b's claim")
        broker.store.epochs["c"] = mine.epoch  # (what the store does with an answer)
        answer.callback(mine)
        assert client.closed and broker.attached == 0
        assert [(type(p), p.reason_code) for p in client.received()][-1] == (Disconnect, ReasonCode.SESSION_TAKEN_OVER)
        assert "c" not in broker.store.epochs
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_connection_waiting_for_its_old_one_here_claims_after_the_wait(server: RedisServer) -> Iterator[Deferred[Any]]:
    """c connects to node a again while a hook decides on a PUBLISH of its connection there: the
    new connection waits for the old one to handle what it read, and only then claims the
    session. Claimed before the wait, another node's claim during it left a connecting the
    client over the copy it had let go: c was connected on both nodes."""
    broker = yield node_a(server)
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        expiry = {"session_expiry_interval": 60}
        old = yield connect(broker, 5, client_id="c", clean_start=False, properties=expiry)
        old.received()
        old.send(Publish(topic="t", payload=b"1"))
        claims = broker.cluster.stats.claims
        new = FakeClient(broker, 5)
        new.send(Connect(protocol_level=5, client_id="c", clean_start=False, properties=expiry))
        yield b.register(60_000)
        assert broker.cluster.stats.claims == claims  # (none for the new connection yet: it waits)
        yield b.claim("c", False, 0)  # c connected to node b meanwhile
        yield until(lambda: old.closed, "node a to let c's old connection go")
        broker.clock.advance(0)  # (the turn after the close, when its waits go on)
        yield until(lambda: new.transport.value() or new.closed, "the new connection's claim and answer")
        assert [p.reason_code for p in new.received()] == [0]
        assert broker.sessions["c"].connection is new.protocol and not broker.moved_away("c")
        assert broker.cluster.holds("c")
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_session_moved_here_twice_counts_as_moving_for_the_whole_time_after_the_second(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """(Against a message coming by two ways while routes settle.) The first move's time ended
    the second's early."""
    broker = yield node_a(server)
    cluster = broker.cluster
    try:
        cluster.moved_here("c")
        broker.clock.advance(cluster._moving_for / 2)
        cluster.moved_here("c")
        broker.clock.advance(cluster._moving_for / 2 + 0.1)
        assert "c" in cluster._moving
        broker.clock.advance(cluster._moving_for / 2)
        assert "c" not in cluster._moving
    finally:
        yield broker.stopService()


def control_events(server: RedisServer) -> Any:
    """A listener to the cluster's control channel: ``events()`` gives what came since."""
    pubsub = server.client().pubsub()
    pubsub.subscribe("mqtt:control")

    def events() -> list[bytes]:
        got = []
        for _ in range(10_000):
            message = pubsub.get_message(timeout=0.05)
            if message is None:
                return got
            if message["type"] == "message":
                got.append(message["data"])
        raise AssertionError("no end of events")
    return events


@pytest_twisted.inlineCallbacks
def test_a_client_taking_over_its_own_session_here_tells_the_other_nodes_nothing(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """The old connection's end and the new one's start cancel out within one batch: the other
    nodes are not told that the group's member went and came back."""
    broker = yield node_a(server)
    events = control_events(server)
    try:
        first = yield connect(broker, client_id="member", clean_start=False)
        first.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="$share/g/t", qos=1),)))
        yield broker.store.flushed()
        assert [e.rpartition(b"\0")[0] for e in events()] == [b"F\0a\0$share/g/t"]
        yield connect(broker, client_id="member", clean_start=False)
        yield broker.store.flushed()
        assert first.closed and events() == []
        assert broker.cluster.awake == {"$share/g/t": {"member"}}
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_nodes_that_left_for_good_leave_nothing_for_good(server: RedisServer) -> Iterator[Deferred[Any]]:
    """A node id made afresh at each start (a data_dir not kept) is a new node each time: what
    Redis and the other nodes kept of each one that left piled up (its routes' version, its
    batches' marker)."""
    broker = yield node_a(server)
    redis = server.client()
    try:
        for n in range(3):
            b = BrokerService(endpoints=[], reactor=reactor, clock=Clock(), cluster=server.url,
                              cluster_node_id=f"b{n}", close_linger=0)
            b.startService()
            yield b.cluster.ready
            client = yield connect(b, 5, client_id=f"x{n}")
            client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=f"f/{n}", qos=1),)))
            yield b.store.flushed()
            yield b.stopService()
            for _ in range(40):  # bounded: a adopts b's sessions, waits two lives of a heartbeat, drops b
                if f"b{n}".encode() not in redis.smembers("mqtt:nodes"):
                    break
                broker.clock.advance(broker.cluster.survivor.ttl_ms / 1000)
                yield deferLater(reactor, 0.05, lambda: None)
            assert f"b{n}".encode() not in redis.smembers("mqtt:nodes")
        yield broker.store.flushed()
        assert redis.hkeys("mqtt:routes-version") == [] and broker.cluster._route_versions == {}
        left = redis.keys("mqtt:*:b*")
        assert left and all(0 < redis.ttl(key) <= 7 * 24 * 3600 for key in left), left  # (the markers, for a week)
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_clean_client_taking_over_its_connection_here_keeps_its_claim(server: RedisServer) -> Iterator[Deferred[Any]]:
    """The old connection's session ends with it (clean): giving the client up undid the claim
    the new connection had just made, and the new connection's will, refused by Redis for it,
    closed that connection too (0x8E)."""
    broker = yield node_a(server)
    redis = server.client()
    try:
        will = Will(topic="wills/clean-one", payload=b"gone")
        first = yield connect(broker, 5, client_id="clean-one", will=will)
        yield broker.store.flushed()
        second = yield connect(broker, 5, client_id="clean-one", will=will)
        yield broker.store.flushed()
        yield broker.store.flushed()
        assert first.closed and not second.closed
        assert redis.hget("mqtt:owner:clean-one", "node") == b"a"
        assert int(redis.hget("mqtt:owner:clean-one", "epoch")) == broker.store.epochs["clean-one"]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_two_connects_of_one_client_at_once_leave_one_connection(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Two CONNECTs of a new client reach node a within one Redis round trip (a client retrying
    fast): the second claim finds a's copy of the session out of date (the first claim's epoch
    was not known when it was sent), and takes Redis's in its place. The first connection is
    closed (0x8E) rather than left open beside the second [MQTT-3.1.4-2]."""
    broker = yield node_a(server)
    try:
        first, second = FakeClient(broker, 5), FakeClient(broker, 5)
        for client in (first, second):
            client.send(Connect(protocol_level=5, client_id="member", clean_start=False,
                                properties={"session_expiry_interval": 600}))
        yield until(lambda: first.transport.value() and second.transport.value(), "both CONNACKs")
        yield until(lambda: first.closed, "the first connection to be closed")
        assert broker.sessions["member"].connection is second.protocol and not second.closed
        second.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="$share/g/t", qos=1),)))
        yield broker.store.flushed()
        assert broker.cluster.awake == {"$share/g/t": {"member"}}
        assert server.client().hget("mqtt:routes:a", "$share/g/t") == b"1"
    finally:
        yield broker.stopService()


def reading_routes(cluster: Any) -> list[Deferred[tuple[int, dict[str, bool]]]]:
    """Reads of a node's routes from Redis, answered by the test."""
    reads: list[Deferred[tuple[int, dict[str, bool]]]] = []

    def routes_of(node: str) -> Deferred[tuple[int, dict[str, bool]]]:
        reads.append(Deferred())
        return reads[-1]
    cluster.store.routes_of = routes_of
    return reads


@pytest_twisted.inlineCallbacks
def test_routes_read_while_their_events_come_take_the_events_newer_than_the_read(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b's routes change as node a reads them (a busy node: clients subscribing, shared
    members coming and going). The events and the answer come by different connections, so the
    answer may be older than events that came before it, or newer than events that come after
    it: each carries its version, and the replica ends as Redis is, after one read."""
    broker = yield node_a(server)
    cluster = broker.cluster
    reads = reading_routes(cluster)
    try:
        cluster._control(b"F\0b\0x/#\0" + b"5")
        loading = cluster.load_routes("b")
        cluster._control(b"f\0b\0x/#\0" + b"6")
        cluster._control(b"F\0b\0y/#\0" + b"7")
        reads[0].callback((6, {"held/long/ago/#": True}))  # made after the 6th change, before the 7th
        cluster._control(b"I\0b\0$share/g/t\0" + b"8")
        yield loading
        assert len(reads) == 1
        assert cluster.forwarding.filters_of("b") == {"held/long/ago/#": True, "y/#": True, "$share/g/t": False}
        cluster._control(b"F\0b\0$share/g/t\0" + b"8")  # an old event, after a read that had it
        assert cluster.forwarding.filters_of("b")["$share/g/t"] is False
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_forgotten_while_its_routes_are_read_stays_forgotten(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died and a survivor deleted its routes while node a read them: the answer, made
    before, comes after the event. b's routes do not come back (messages would go to an inbox
    nobody reads)."""
    broker = yield node_a(server)
    cluster = broker.cluster
    reads = reading_routes(cluster)
    try:
        cluster._control(b"F\0b\0x/#\0" + b"1")
        loading = cluster.load_routes("b")
        cluster._control(b"G\0b\0" + b"2")
        assert cluster.forwarding.filters_of("b") == {}
        reads[0].callback((1, {"x/#": True}))
        yield loading
        assert cluster.forwarding.filters_of("b") == {} and "b" not in cluster.nodes
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_route_events_and_reads_tell_the_same_versions(server: RedisServer) -> Iterator[Deferred[Any]]:
    """What Redis says: each change of a node's routes is announced with the version it makes,
    which a read of the routes gives with them; a dead node's routes going is one more."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    events = control_events(server)
    try:
        before, _ = yield broker.store.routes_of("b")
        b.route("x/#", True)
        b.route("$share/g/t", True, False)
        yield b.flushed()
        b.route("x/#", False)
        yield b.flushed()
        version, routes = yield broker.store.routes_of("b")
        assert (version, routes) == (before + 3, {"$share/g/t": False})
        yield broker.store.forget_node("b")
        assert events() == [b"F\0b\0x/#\0%d" % (before + 1), b"I\0b\0$share/g/t\0%d" % (before + 2),
                            b"f\0b\0x/#\0%d" % (before + 3), b"G\0b\0%d" % (before + 4)]
        assert (yield broker.store.routes_of("b")) == (before + 4, {})
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_nodes_offline_groups_are_announced_again_as_such_after_an_outage(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    broker = yield node_a(server)
    try:
        member = yield connect(broker, client_id="member", clean_start=False)
        member.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="$share/g/t", qos=1),)))
        yield broker.store.flushed()
        member.lose()
        yield broker.store.flushed()
        redis = server.client()
        assert redis.hget("mqtt:routes:a", "$share/g/t") == b"0"
        redis.hset("mqtt:routes:a", "$share/g/t", "1")  # as if an older write had come last
        redis.client_kill_filter(_type="normal")
        yield until(lambda: redis.hget("mqtt:routes:a", "$share/g/t") == b"0", "a to announce its routes again")
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_routes_are_read_again_from_redis_after_an_outage(server: RedisServer) -> Iterator[Deferred[Any]]:
    """While node a was cut off from Redis, node b let a filter go and took others, and node c
    was dropped from the cluster, without a word to a: once back, a routes by what Redis holds
    (before, it kept forwarding to b's old filter and to c for good)."""
    broker = yield node_a(server)
    links = [Redis(RedisAddress.parse(server.url)) for _ in "bc"]
    b, c = (RedisStore(link, node, reactor) for link, node in zip(links, "bc"))
    forwarding = broker.cluster.forwarding
    try:
        for store in (b, c):
            yield store.register(60_000)
        b.route("gone/#", True)
        b.route("kept/+", True)
        c.route("c/#", True)
        yield b.flushed()
        yield c.flushed()
        yield until(lambda: set(forwarding.filters_of("b")) == {"gone/#", "kept/+"} and forwarding.filters_of("c"),
                    "b's and c's routes, by their events")
        redis = server.client()
        redis.hdel("mqtt:routes:b", "gone/#")
        redis.hset("mqtt:routes:b", "new/#", "1")
        redis.hset("mqtt:routes:b", "$share/g/t", "0")  # b's members of g went offline
        redis.delete("mqtt:routes:c", "mqtt:node:c")
        redis.srem("mqtt:nodes", "c")
        redis.client_kill_filter(_type="pubsub")  # the cut: a's connections go, and the events with them
        redis.client_kill_filter(_type="normal")
        # (a reads each node's routes in turn, b's and c's in either order: both are waited for)
        yield until(lambda: forwarding.filters_of("b") == {"kept/+": True, "new/#": True, "$share/g/t": False}
                    and forwarding.nodes() == {"b"}, "a to read the routes again")
    finally:
        yield broker.stopService()
        for link in links:
            yield link.close()


@pytest_twisted.inlineCallbacks
def test_retained_messages_are_read_again_from_redis_after_an_outage(server: RedisServer) -> Iterator[Deferred[Any]]:
    """While node a was cut off from Redis, retained messages were deleted and set there without
    a word to it (the events went with the connection): once back, its replica is what Redis
    holds, each message expiring when it was to; what its own client retained stays."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        client = yield connect(broker, client_id="retainer")
        client.send(Publish(topic="mine", payload=b"a's own", retain=True))
        expiring = Message(topic="kept", payload=b"k", retain=True, properties={"message_expiry_interval": 60},
                           expires_at=1060.0)
        b.save_retained(expiring)
        b.save_retained(Message(topic="deleted", payload=b"d", retain=True))
        yield b.flushed()
        yield broker.store.flushed()
        yield until(lambda: broker.retained.get("deleted") is not None, "b's retained messages, by their events")
        assert broker.retained.get("kept").expires_at == 1060.0  # type: ignore[union-attr]
        redis = server.client()
        redis.hdel("mqtt:retained", "deleted")
        redis.hset("mqtt:retained", "new", pack_retained(Message(topic="new", payload=b"n", retain=True,
                                                                 properties={"message_expiry_interval": 30},
                                                                 expires_at=1030.0), 1000.0))
        redis.client_kill_filter(_type="pubsub")  # the cut: a's connections go, and the events with them
        redis.client_kill_filter(_type="normal")
        yield until(lambda: broker.retained.get("deleted") is None, "a to read the retained messages again")
        assert {m.topic: (m.payload, m.expires_at) for m in broker.retained if not m.topic.startswith("$")} == {
            "mine": (b"a's own", None), "kept": (b"k", 1060.0), "new": (b"n", 1030.0)}
    finally:
        yield broker.stopService()
        yield link.close()


@inlineCallbacks
def persistent_publisher(broker: BrokerService) -> Any:
    """Client p of node a (MQTT 5) with a session Redis keeps, once the store has it."""
    client = yield connect(broker, 5, client_id="p", clean_start=False, properties={"session_expiry_interval": 600})
    yield broker.store.flushed()
    return client


@inlineCallbacks
def subscriber(broker: BrokerService, client_id: str, topic_filter: str) -> Any:
    """A client of node a with a session Redis keeps, subscribed at QoS 2."""
    client = yield connect(broker, 5, client_id=client_id, clean_start=False,
                           properties={"session_expiry_interval": 600})
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=topic_filter, qos=2),)))
    received: list[Any] = []
    yield until(lambda: received.extend(client.received()) or Suback in map(type, received), "the SUBACK")
    return client


@pytest_twisted.inlineCallbacks
def test_a_qos2_message_of_a_session_redis_keeps_reaches_the_sessions_here_through_this_nodes_inbox(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Written by the batch that records its packet id, as to any other node: a subscriber here
    and a member of a shared subscription here get it once, and it counts as received once."""
    broker = yield node_a(server)
    try:
        plain = yield subscriber(broker, "s", "t")
        member = yield subscriber(broker, "m", "$share/g/t")
        publisher = yield connect(broker, 5, client_id="p", clean_start=False,
                                  properties={"session_expiry_interval": 600})
        received_before = broker.stats.messages_received
        publisher.send(Publish(topic="t", payload=b"once", qos=2, packet_id=7))
        got: dict[str, list[Any]] = {"s": [], "m": [], "p": []}

        def all_three() -> bool:
            got["s"] += plain.received()
            got["m"] += member.received()
            got["p"] += publisher.received()
            return bool(got["s"] and got["m"] and Pubrec in map(type, got["p"]))
        yield until(all_three, "the message, from a's inbox, and the PUBREC")
        assert [type(p) for p in got["p"]] == [Connack, Pubrec]
        assert [(p.topic, p.payload) for p in got["s"] + got["m"]] == [("t", b"once"), ("t", b"once")]
        entries = server.client().xrange("mqtt:inbox:a")
        assert len(entries) == 1
        assert [(m.topic, m.payload, shares) for _, m, shares in unpack_records(entries[0][1][b"d"])] == [
            ("t", b"once", (("g", "$share/g/t"),))]
        assert broker.stats.messages_received - received_before == 1
        assert broker.cluster.stats.forwarded_in == broker.cluster.stats.forwarded_out == 0
        yield deferLater(reactor, 0.05, lambda: None)
        assert plain.received() == member.received() == []  # (once)
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_qos2_retained_message_of_a_session_redis_keeps_reaches_a_filter_subscribed_meanwhile_once_written(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """As its subscribers of before get it from the inbox once Redis has its packet id, so does
    a filter subscribed here before then (to which the retained copy went at once)."""
    broker = yield node_a(server)
    try:
        publisher = yield persistent_publisher(broker)
        late = yield connect(broker, 5, client_id="late")
        late.received()
        store = broker.store
        store._recovering = True  # (what holds its batches back after a failure: here, until it is looked at)
        publisher.send(Publish(topic="t", payload=b"once", qos=2, retain=True, packet_id=7))
        late.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=0),)))
        yield deferLater(reactor, 0.05, lambda: None)
        early = [p for p in late.received() if isinstance(p, Publish)]
        store._recovering = False
        yield store.flushed()
        assert early == []
        yield publishes(late, "the retained message, once Redis has its packet id")
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_qos2_publish_whose_session_another_node_claims_before_its_batch_goes_nowhere_from_here(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """The publisher's session is claimed by node c between its PUBLISH here and the batch that
    records its packet id: the record is refused, and so is the routing (to node b's inbox and
    to this node's subscriber). Routed from here, it was routed again once the publisher sent
    it to c, which had no record of its packet id: twice in all."""
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    c = RedisStore(link, "c", reactor)
    try:
        local = yield subscriber(broker, "s", "t")
        broker.cluster.forwarding.add_route("b", "t")
        publisher = yield persistent_publisher(broker)
        store = broker.store
        store._recovering = True  # (what holds its batches back after a failure: here, until c has claimed)
        publisher.send(Publish(topic="t", payload=b"once", qos=2, packet_id=7))
        claim = yield c.claim("p", False, 0)
        assert claim.session is not None and claim.session.awaiting_pubrel == set()
        store._recovering = False
        yield store.flushed()
        yield until(lambda: publisher.closed, "a to let p go, told by Redis")
        redis = server.client()
        assert redis.xlen("mqtt:inbox:b") == 0
        assert redis.xlen("mqtt:inbox:a") == 0
        assert redis.smembers("mqtt:pubrel:p") == set()
        assert local.received() == []
        assert [(type(p), getattr(p, "reason_code", None)) for p in publisher.received()] == [
            (Connack, 0), (Disconnect, ReasonCode.SESSION_TAKEN_OVER)]
        assert "p" not in broker.cluster.forwarding.pending_here  # (refused, it never comes back)
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_batch_whose_answer_is_lost_still_tells_which_sessions_redis_refused(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node c claims p, the news of it lost (a's pub/sub connection cut); a's batch is applied
    after the claim, p's packet id and routing refused, and its answer lost. Read back after the
    outage, the marker said the batch was applied, and its waiters went on without a word of the
    refusal: p had its PUBREC for a message routed nowhere. Now the refusals are kept with the
    marker, and a lets p go before anything is acknowledged."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    c = RedisStore(link, "c", reactor)
    try:
        local = yield subscriber(broker, "s", "t")
        publisher = yield connect(broker, 5, client_id="p", clean_start=False,
                                  properties={"session_expiry_interval": 600})
        store = broker.store
        yield store.flushed()
        broker.cluster._claimed_elsewhere = lambda *args: None  # type: ignore[method-assign]  # (the news lost)
        store._recovering = True  # (holding a's batch back until c has claimed)
        publisher.send(Publish(topic="t", payload=b"once", qos=2, packet_id=7))
        yield c.claim("p", False, 0)
        refused: list[list[bytes]] = []
        written = store._written

        def answer_lost(answer: list[bytes], batch: Any) -> None:
            refused.append(answer)
            store._written = written  # type: ignore[method-assign]
            store._not_written(Failure(ConnectionLost("the answer is lost")), batch)
        store._written = answer_lost  # type: ignore[method-assign]
        store._recovering = False
        store._flush()  # (as the end of a recovery does)
        yield until(lambda: publisher.closed, "a to let p go, from the refusals kept in Redis")
        assert refused and refused[0]
        assert [(type(p), getattr(p, "reason_code", None)) for p in publisher.received()] == [
            (Connack, 0), (Disconnect, ReasonCode.SESSION_TAKEN_OVER)]
        redis = server.client()
        assert redis.xlen("mqtt:inbox:a") == 0 and redis.smembers("mqtt:pubrel:p") == set()
        assert local.received() == []
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_qos2_message_then_a_disconnect_that_ends_the_session_reaches_the_subscriber_here(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """The session's end (its owner gone from Redis) was recorded in the same batch before the
    message's routing, which carried the epoch read when the batch was cut (none by then): the
    routing was refused. It carries the epoch of the PUBLISH."""
    broker = yield node_a(server)
    try:
        local = yield subscriber(broker, "s", "t")
        publisher = yield persistent_publisher(broker)
        publisher.send(Publish(topic="t", payload=b"last", qos=2, packet_id=7),
                       Disconnect(properties={"session_expiry_interval": 0}))
        got: list[Any] = []
        yield until(lambda: got.extend(local.received()) or bool(got), "the message at s")
        assert [(p.topic, p.payload) for p in got] == [("t", b"last")]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_will_does_not_overtake_the_last_qos2_message_of_its_client(server: RedisServer) -> Iterator[Deferred[Any]]:
    """A QoS 2 message of a session Redis keeps reaches the subscribers here through this node's
    inbox: the will, routed at once, came first, and a subscriber of a client's state saw it
    "online" last."""
    broker = yield node_a(server)
    try:
        local = yield subscriber(broker, "s", "status")
        publisher = yield connect(broker, 5, client_id="p", clean_start=False,
                                  properties={"session_expiry_interval": 600},
                                  will=Will(topic="status", payload=b"offline", qos=2, retain=False))
        yield broker.store.flushed()
        publisher.send(Publish(topic="status", payload=b"online", qos=2, packet_id=7))
        publisher.lose()
        got: list[Any] = []
        yield until(lambda: got.extend(local.received()) or len(got) >= 2, "both messages at s")
        assert [p.payload for p in got] == [b"online", b"offline"]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_another_nodes_inbox_has_a_clients_messages_and_its_will_in_the_order_they_came(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """The QoS 2 message of a session Redis keeps goes with a guard of its own. Before, it went in
    an entry of its own after the batch's other records for that node, its will among them; now
    one entry has them all in the order they were routed."""
    broker = yield node_a(server)
    try:
        broker.cluster.forwarding.add_route("b", "t")
        publisher = yield connect(broker, 5, client_id="p", clean_start=False,
                                  properties={"session_expiry_interval": 600},
                                  will=Will(topic="t", payload=b"third", qos=1, retain=False))
        yield broker.store.flushed()
        publisher.send(Publish(topic="t", payload=b"first", qos=1, packet_id=1),
                       Publish(topic="t", payload=b"second", qos=2, packet_id=2))
        publisher.lose()
        yield broker.store.flushed()
        payloads = [message.payload for _, fields in server.client().xrange("mqtt:inbox:b")
                    for _, message, _ in unpack_records(fields[b"d"])]
        assert payloads == [b"first", b"second", b"third"]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_will_reaches_the_subscribers_here_at_once_while_redis_is_away() -> Iterator[Deferred[Any]]:
    """The will of a client whose QoS 2 message is on its way to a subscriber here through this
    node's inbox follows it there while Redis answers; while Redis is away, this node's clients
    are served all the same, and the will reaches them at once."""
    from mqtt_broker.cluster.node import LEAVE_TIMEOUT
    redis = RedisServer()
    clock = Clock()
    try:
        broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=redis.url, cluster_node_id="a",
                               close_linger=0)
        broker.startService()
        yield broker.cluster.ready
        watcher = yield connect(broker, 5, client_id="watcher")  # (its session ends with it: not in Redis)
        watcher.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="wills/#", qos=1),)))
        yield subscriber(broker, "s", "t")
        gone = yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600},
                             will=Will(topic="wills/c", payload=b"c is gone", qos=1, retain=False))
        yield broker.store.flushed()
        broker.store._recovering = True  # (the batch that would take it there never goes)
        gone.send(Publish(topic="t", payload=b"on its way", qos=2, packet_id=1))
        assert broker.cluster.forwarding.pending_here == {"c": 1}
        redis.kill()
        yield until(lambda: broker.cluster.unready() is not None, "a to find Redis gone")
        gone.lose()
        assert [(p.topic, p.payload) for p in watcher.received() if isinstance(p, Publish)] == [
            ("wills/c", b"c is gone")]
        stopped = broker.stopService()
        clock.advance(LEAVE_TIMEOUT)
        yield until(lambda: stopped.called, "the stop")
    finally:
        redis.close()


@pytest_twisted.inlineCallbacks
def test_the_records_of_one_batch_for_a_node_go_in_one_entry_whoever_published_them(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Two clients whose sessions Redis keeps publish QoS 2 messages in turn, a third QoS 1 ones:
    they go in one entry, in order, each part with its guard (before, each change of guard made
    an entry of its own: one XADD, and one XACK, per message)."""
    broker = yield node_a(server)
    try:
        broker.cluster.forwarding.add_route("b", "t")
        one = yield connect(broker, 5, client_id="p1", clean_start=False, properties={"session_expiry_interval": 600})
        two = yield connect(broker, 5, client_id="p2", clean_start=False, properties={"session_expiry_interval": 600})
        three = yield connect(broker, client_id="p3")
        yield broker.store.flushed()
        broker.store._recovering = True  # (all of them in one batch)
        for i in range(1, 4):
            one.send(Publish(topic="t", payload=b"1-%d" % i, qos=2, packet_id=i))
            two.send(Publish(topic="t", payload=b"2-%d" % i, qos=2, packet_id=i))
            three.send(Publish(topic="t", payload=b"3-%d" % i, qos=1, packet_id=i))
        broker.store._recovering = False
        broker.store._flush()
        yield broker.store.flushed()
        entries = server.client().xrange("mqtt:inbox:b")
        assert len(entries) == 1
        assert [message.payload for _, message, _ in unpack_records(entries[0][1][b"d"])] == [
            b"%d-%d" % (client, i) for i in range(1, 4) for client in (1, 2, 3)]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_will_of_a_client_without_qos2_messages_here_does_not_wait_for_redis(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Only a will that must come after its client's QoS 2 messages goes through this node's
    inbox: the others reach this node's subscribers at once, while Redis takes no write (a stall,
    a failover), as a QoS 0 message does."""
    broker = yield node_a(server)
    redis = server.client()
    try:
        watcher = yield connect(broker, 5, client_id="watcher")  # (its session ends with it: not in Redis)
        watcher.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="status", qos=1),)))
        for qos in (0, 1):
            gone = yield connect(broker, 5, client_id=f"p{qos}", will=Will(topic="status", payload=b"offline %d" % qos,
                                                                          qos=qos, retain=False))
            yield broker.store.flushed()
            redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
            try:
                gone.lose()
                will = yield publishes(watcher, "the will, while Redis takes no write")
            finally:
                redis.execute_command("CLIENT", "UNPAUSE")
            assert [(p.payload, p.qos) for p in will] == [(b"offline %d" % qos, qos)]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_will_a_hook_decides_late_still_follows_its_clients_qos2_message(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Whether the will goes through this node's inbox, after its client's QoS 2 message, was
    decided once the will hook answered: by then the session had ended (expiry 0 at DISCONNECT),
    the client was forgotten, and the will went straight to the subscriber, first."""
    broker = yield node_a(server)
    try:
        decision: Deferred[None] = Deferred()
        broker.hooks.on_will(lambda client, message: decision)
        local = yield subscriber(broker, "s", "status")
        publisher = yield connect(broker, 5, client_id="p", clean_start=False,
                                  properties={"session_expiry_interval": 600},
                                  will=Will(topic="status", payload=b"offline", qos=2, retain=False))
        yield broker.store.flushed()
        publisher.send(Publish(topic="status", payload=b"online", qos=2, packet_id=7),
                       Disconnect(reason_code=ReasonCode.DISCONNECT_WITH_WILL_MESSAGE,
                                  properties={"session_expiry_interval": 0}))
        decision.callback(None)
        got = yield publishes(local, "both messages at s", 2)
        assert [p.payload for p in got] == [b"online", b"offline"]
        yield deferLater(reactor, 0.05, lambda: None)
        assert broker.cluster.forwarding.pending_here == {}  # (both came back)
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_entries_trimmed_before_they_were_handled_are_told(server: RedisServer) -> Iterator[Deferred[Any]]:
    """An inbox keeps its last cluster_inbox_maxlen entries: read again after an outage, the
    entries trimmed meanwhile come without their data. Their loss is logged, once per read."""
    broker = yield node_a(server)
    try:
        with capturedLogs() as events:
            broker.cluster._handle_entries([(b"1-0", None, 0), (b"2-0", None, 0)])
        [warning] = [e for e in events if "trimmed" in e.get("log_format", "")]
        assert warning["count"] == 2 and warning["log_level"].name == "warn"
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_restarted_node_does_not_queue_again_a_message_its_session_has(server: RedisServer) -> Iterator[Deferred[Any]]:
    """A node drops a message that reached a session moved to it by a second way; the mark of
    that inbox entry waits for a batch, and the node is killed first. Restarted, it takes its own
    sessions back and reads the entry again: the session still gets the QoS 2 message once."""
    clock = Clock()
    clock.advance(1000.0)
    first = yield node_a(server, clock)
    link = Redis(RedisAddress.parse(server.url))
    x, c = RedisStore(link, "x", reactor), RedisStore(link, "c", reactor)
    redis = server.client()
    second = None
    try:
        message = yield s_adopted_from_x(first, x, server, b"c-id-0001")  # (s "moved" to a)
        yield first.store.flushed()
        assert redis.hlen("mqtt:deliv:s") == 1
        # The same message reaches a by a second way (forwarded by c while s moved): dropped as
        # a copy, nothing queued, so the entry's mark waits for a batch (ACK_DELAY)...
        marks: list[Any] = []
        first.store.handled = lambda entry_id, node="": marks.append(entry_id)  # ...and a dies first (kill -9)
        c.forward("a", pack_forwarded(message, (), clock.seconds()))
        yield c.flushed()
        yield until(lambda: marks, "a to handle c's entry")
        assert [i.message.payload for i in first.sessions["s"].queue] == [b"once"]  # (dropped as a copy)
        first.cluster.started = False
        first.cluster.survivor.stop()
        yield first.cluster.redis.close()  # (dead: writes nothing more)
        redis.delete("mqtt:node:a")  # (its heartbeat key expired: the restart waited for that)
        # a restarts: it takes its sessions back and reads the entries it was given again.
        second = BrokerService(endpoints=[], reactor=reactor, clock=Clock(), cluster=server.url,
                               cluster_node_id="a", close_linger=0)
        second.startService()
        yield second.cluster.ready
        yield until(lambda: redis.xpending("mqtt:inbox:a", "nodes")["pending"] == 0, "a to handle the entry again")
        yield second.store.flushed()
        queued = [i.message.payload for i in second.sessions["s"].queue]
        assert queued == [b"once"], f"s holds the QoS 2 message {len(queued)} times: {queued}"
        assert redis.hlen("mqtt:deliv:s") == 1
        # Adopted from dead x by a; taken back by a itself after its restart: not adopted again.
        assert (first.cluster.stats.adopted, second.cluster.stats.adopted) == (1, 0)
    finally:
        if second is not None:
            yield second.stopService()
        yield link.close()


# --- shared subscriptions whose members here may not have a message ----------------------------------

def inbox(server: RedisServer, node: str) -> list[tuple[int, bytes, tuple[tuple[str, str], ...]]]:
    """(kind, payload, shares) of every record in the node's inbox."""
    return [(kind, message.payload, shares) for _, fields in server.client().xrange(f"mqtt:inbox:{node}")
            for kind, message, shares in unpack_records(fields[b"d"])]


def shared_member(broker: BrokerService, client_id: str, topic_filter: str, **fields: Any) -> Any:
    return subscribed(broker, client_id, topic_filter, 1, **fields)


@inlineCallbacks
def subscribed(broker: BrokerService, client_id: str, topic_filter: str, qos: int, **fields: Any) -> Any:
    client = yield connect(broker, 5, client_id=client_id, **fields)
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=topic_filter, qos=qos),)))
    yield broker.store.flushed()
    assert Suback in map(type, client.received())
    return client


SHARE = ("g", "$share/g/t/+")


@pytest_twisted.inlineCallbacks
def test_a_shared_message_no_member_here_may_read_goes_to_the_groups_other_node(
        server: RedisServer, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """The publisher and a member of $share/g/t/+ are on node a, another member on node b: a
    chooses between the two nodes in turn. The member here may not read t/secret (the ACL): what
    a chose itself for goes to b too, as one broker gives it to the member that may read it."""
    acl = tmp_path / "acl"
    acl.write_text("topic write #\ntopic read t/open\n")
    broker = yield node_a(server, acl_file=str(acl))
    try:
        broker.cluster.forwarding.add_route("b", SHARE[1])
        member = yield shared_member(broker, "m", SHARE[1])
        publisher = yield connect(broker, 5, client_id="p")
        publisher.send(*[Publish(topic="t/secret", payload=b"%d" % n, qos=1, packet_id=n + 1) for n in range(4)])
        yield until(lambda: len(inbox(server, "b")) >= 4, "the four messages in b's inbox")
        assert sorted(payload for _, payload, _ in inbox(server, "b")) == [b"0", b"1", b"2", b"3"]
        assert not [p for p in member.received() if isinstance(p, Publish)]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_handed_message_no_member_here_may_read_goes_to_a_node_that_has_not_declined_it(
        server: RedisServer, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """Node x's last member of $share/g/t/+ left a message unfinished and x handed it to a,
    whose member may not read it: a hands it on, to the group's member on c (not back to x).
    One that c has declined already is dropped, not sent round the nodes again."""
    acl = tmp_path / "acl"
    acl.write_text("topic write #\ntopic read t/open\n")
    broker = yield node_a(server, acl_file=str(acl))
    try:
        for node in "cx":
            broker.cluster.forwarding.add_route(node, SHARE[1])
        member = yield shared_member(broker, "m", SHARE[1])
        records = [pack_forwarded(Message(topic="t/secret", payload=payload, qos=1), (SHARE,), 0.0, HANDED, declined)
                   for payload, declined in ((b"declined by c", ("x", "c")), (b"handed", ("x",)))]
        server.client().xadd("mqtt:inbox:a", {"d": b"".join(records), "e": 1})  # (one entry: handled at once)
        yield until(lambda: inbox(server, "c"), "a record in c's inbox")
        assert inbox(server, "c") == [(HANDED, b"handed", ((SHARE,), ("x", "a")))]
        assert inbox(server, "x") == []
        assert not [p for p in member.received() if isinstance(p, Publish)]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_leaving_members_messages_go_to_a_connected_member_elsewhere_before_an_offline_one_here(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node a holds two members of $share/g/t/+, one offline (its session kept) and one whose
    connection ends with QoS 1 messages it did not acknowledge; node b has one connected. As on
    one broker, connected members come first: those messages go to b, not to the offline one."""
    broker = yield node_a(server)
    try:
        broker.cluster.forwarding.add_route("b", SHARE[1])
        offline = yield shared_member(broker, "off", SHARE[1], clean_start=False,
                                      properties={"session_expiry_interval": 600})
        offline.lose()
        leaving = yield shared_member(broker, "leaving", SHARE[1])
        publisher = yield connect(broker, 5, client_id="p")
        publisher.send(*[Publish(topic="t/1", payload=b"%d" % n, qos=1, packet_id=n + 1) for n in range(4)])
        yield until(lambda: len(inbox(server, "b")) >= 2, "b's turns in its inbox")
        unfinished: list[Publish] = []
        assert received(leaving, unfinished)
        leaving.lose()
        yield until(lambda: len(inbox(server, "b")) >= 4, "the unfinished messages in b's inbox too")
        assert sorted(payload for _, payload, _ in inbox(server, "b")) == [b"0", b"1", b"2", b"3"]
        assert sorted(payload for kind, payload, _ in inbox(server, "b") if kind == HANDED) == sorted(
            p.payload for p in unfinished)
        assert not broker.sessions["off"].queue
    finally:
        yield broker.stopService()


@pytest.mark.parametrize("stays", [False, True])
@pytest_twisted.inlineCallbacks
def test_a_claim_of_a_session_that_ran_out_on_a_dead_node_publishes_its_will_at_once(
        server: Any, stays: bool) -> Iterator[Deferred[Any]]:
    """Node b died holding c's session (disconnected at 1000, expiry 10) and c's will, delayed
    100 s. At 1050 c connects to node a, the session having ended at 1010: its will is due at
    once [MQTT-3.1.3-9], and the session is not resumed (Session Present 0), whether c stays or
    goes before the claim is answered (the will waited for 1100, or for an expiry counted anew)."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    try:
        observer = yield watching_wills(broker)
        yield b.register(600_000)
        yield holds(b, "c", expiry=10, disconnected_at=1000.0)
        b.save_will(StoredWill("c", None, Message(topic="wills/c", payload=b"c is gone", qos=1), 1000.0 + 100))
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b died
        clock.advance(50.0)  # the session ended at 1010
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 10}))
        if not stays:
            client.lose()
        yield until(lambda: "c" not in broker.cluster._claiming, "the claim's answer")
        if stays:
            [connack] = client.received()
            assert connack.reason_code == 0 and not connack.session_present
        yield broker.store.flushed()
        clock.advance(1.0)  # (a will due at once is published on the next turn)
        yield broker.store.flushed()
        got = [(p.topic, p.payload) for p in observer.received() if isinstance(p, Publish)]
        waiting = broker.wills._delayed["c"][0][0] - clock.seconds() if "c" in broker.wills else None
        assert got == [("wills/c", b"c is gone")], f"the will still waits {waiting} s"
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_message_0_1_0_left_in_a_nodes_inbox_reaches_its_session_after_an_upgrade(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """docs/cluster.md: to upgrade, stop every node, upgrade, start them: inboxes wait in Redis.
    An entry 0.1.0 wrote (a one-byte count of shares, no stamp) was passed over as malformed,
    and its message, acknowledged to its publisher, lost."""
    broker = yield node_a(server)
    try:
        client = yield connect(broker, 5, client_id="c", clean_start=False,
                               properties={"session_expiry_interval": 600})
        client.received()
        client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="q/#", qos=1),)))
        yield until(lambda: client.received(), "the SUBACK")
        record = bytes.fromhex("000c6e6f6465313a3030303030310003707562000000000f320d0003712f6100010068656c6c6f")
        server.client().xadd("mqtt:inbox:a", {"d": record})  # (as 0.1.0's pack_forwarded made it)
        got: list[Publish] = []
        yield until(lambda: received(client, got), "the message 0.1.0 left in the inbox")
        assert [(p.topic, p.payload) for p in got] == [("q/a", b"hello")]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_without_retained_messages_a_node_takes_none_from_redis(server: RedisServer) -> Iterator[Deferred[Any]]:
    """retain_available = false: clients are told retained messages are not supported; the node
    loaded Redis's all the same (at start, and from other nodes' events), and sent them."""
    server.client().flushall()
    server.client().hset("mqtt:retained", "r/t", pack_retained(Message(topic="r/t", payload=b"old", retain=True), 0.0))
    broker = BrokerService(endpoints=[], reactor=reactor, clock=Clock(), cluster=server.url, cluster_node_id="a",
                           close_linger=0, retain_available=False)
    broker.startService()
    try:
        yield broker.cluster.ready
        broker.cluster._control(b"R\0b\0r/u\0" + pack_retained(Message(topic="r/u", payload=b"new", retain=True), 0.0))
        client = yield connect(broker, 5, client_id="s")
        client.received()
        client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="r/#", qos=0),)))
        got: list[Any] = []
        yield until(lambda: got.extend(client.received()) or Suback in map(type, got), "the SUBACK")
        assert [p for p in got if isinstance(p, Publish)] == []
        assert [m.topic for m in broker.retained if m.topic.startswith("r/")] == []
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_nodes_message_log_is_kept_by_the_restore_step_of_its_start(server: RedisServer) -> Iterator[Deferred[Any]]:
    """The message log stays in each node's memory (docs/cluster.md): Redis keeps none, and the
    start's restore step, which takes a store's log in place of the one held, emptied it."""
    broker = yield node_a(server, history_filters=["log/#"])
    try:
        yield broker.publish("log/a", b"one", qos=1)
        now = broker.clock.seconds()
        broker._restore(broker.store.load(broker.config.max_queued_messages))
        assert [e.message.payload for e in broker.history.replay("log/#", "all", now)] == [b"one"]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_message_of_another_node_that_expired_on_its_way_is_not_counted_as_routed(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Counted as routed here for another node, but not as received (it was routed nowhere): the
    messages received from clients, worked out as received less those, went below zero."""
    clock, broker = yield a_at_1000(server)
    try:
        message = Message("t", b"late", qos=1, properties={"message_expiry_interval": 1}, sender="c",
                          expires_at=clock.seconds() - 1)
        broker.cluster._handle_record(FORWARDED, message, (), 0, b"1-0")
        assert broker.stats.messages_expired == 1 and broker.stats.routed_from_nodes == 0
        assert read(broker).publish_received == [0, 0, 0]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_the_next_message_after_one_of_this_node_expired_on_its_way_back_is_counted(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """A QoS 2 message of a stored session goes round through this node's inbox, counted as
    received as it was published: one that expired on its way back left the mark of "counted
    before" for the next message routed here, which was then counted by no one."""
    clock, broker = yield a_at_1000(server)
    try:
        subscriber = yield connect(broker, 5, client_id="s")
        subscriber.subscribe("t", qos=2)
        publisher = yield connect(broker, 5, client_id="p", clean_start=False,
                                  properties={"session_expiry_interval": 600})
        publisher.send(Publish(topic="t", payload=b"expiring", qos=2, packet_id=1,
                               properties={"message_expiry_interval": 1}))
        clock.advance(2.0)  # before a reads it back from its inbox
        yield until(lambda: broker.stats.messages_expired == 1, "a to read its message back, expired")
        assert not [p for p in subscriber.received() if isinstance(p, Publish)]
        before = sum(read(broker).publish_received)
        publisher.send(Publish(topic="other", payload=b"counted", qos=0))
        assert sum(read(broker).publish_received) == before + 1
    finally:
        yield broker.stopService()


@inlineCallbacks
def replayed(broker: BrokerService) -> Iterator[Deferred[Any]]:
    """What a replay sends waits for the store (a QoS 2 message is logged before its packet id
    is stored): it is written once the store has written what it had, and the next turn ends."""
    yield broker.store.flushed()
    yield deferLater(reactor, 0, lambda: None)


@inlineCallbacks
def replay_of_s(broker: BrokerService, client: FakeClient) -> Any:
    """The PUBLISHes a client of ``broker`` is sent once it subscribed to ``$replay/all/s/#``:
    the replay, then the retained messages."""
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="$replay/all/s/#", qos=1),)))
    got: list[Any] = []
    yield until(lambda: got.extend(client.received()) or Suback in map(type, got), "the SUBACK")
    yield replayed(broker)
    got += client.received()
    return [p for p in got if isinstance(p, Publish)]


@pytest_twisted.inlineCallbacks
def test_a_replay_is_followed_by_the_retained_message_another_node_set_after_what_it_replayed(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """A retained message set on b reaches a's retained messages through Redis, never a's log: a
    replay on a sent a's older logged message of the topic and took the retained one for no newer,
    where a plain subscriber got it [MQTT-3.3.1-6]. The client ended with the old value."""
    a = yield node_a(server, history_filters=["s/#"])
    b = yield node_b(server)
    try:
        yield a.publish("s/t", b"old", qos=1, retain=True)
        yield until(lambda: b.retained.get("s/t") is not None, "b to have a's retained message")
        yield b.publish("s/t", b"new", qos=1, retain=True)
        yield until(lambda: a.retained.get("s/t").payload == b"new", "a to have b's retained message")
        client = yield connect(a, 5, client_id="c")
        client.received()
        got = yield replay_of_s(a, client)
        assert [(p.payload, p.retain) for p in got] == [(b"old", False), (b"new", True)]
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_retained_message_read_again_from_redis_unchanged_is_not_sent_again_after_its_replay(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """After an outage the node reads Redis's retained messages again in place of its own: one it
    logged and that did not change meanwhile stays as old as it was, and a replay that sent it
    does not send it again."""
    a = yield node_a(server, history_filters=["s/#"])
    try:
        yield a.publish("s/t", b"state", qos=1, retain=True)
        yield until(lambda: not a.cluster.store.retained_pending("s/t"), "a's change to come back from Redis")
        yield a.cluster._load_retained()
        client = yield connect(a, 5, client_id="c")
        client.received()
        got = yield replay_of_s(a, client)
        assert [(p.payload, p.retain) for p in got] == [(b"state", False)]
    finally:
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_retained_message_read_again_from_redis_from_another_publisher_is_newer_than_the_log(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Two retained messages of the same content are two messages: one Redis holds from another
    publisher (or expiring at another time) than the one the node had, after an event the node
    missed, is newer than what the node logged, as any other change is."""
    a = yield node_a(server, history_filters=["s/#"])
    try:
        yield a.publish("s/t", b"state", qos=1, retain=True)
        yield until(lambda: not a.cluster.store.retained_pending("s/t"), "a's change to come back from Redis")
        yield a.publish("s/u", b"later", qos=1)
        a.retained.store(Message("s/t", b"state", qos=1, retain=True, sender="other"), logged=a.retained.logged("s/t"))
        assert a.retained.logged("s/t") < a.history.last_seq
        yield a.cluster._load_retained()
        assert (a.retained.get("s/t").sender, a.retained.logged("s/t")) == (None, a.history.last_seq)
    finally:
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_replay_asked_for_while_a_message_comes_back_from_the_inbox_gets_it_once(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """A QoS 2 message of a session Redis keeps reaches this node's subscribers when it comes
    back from the node's inbox: logged when it was published, it reached a replay asked for
    meanwhile twice, from the log and live (docs/message-log.md: neither a gap nor a duplicate).
    It is logged as it comes back now, just before it goes to the subscribers here."""
    broker = yield node_a(server, history_filters=["log/#"])
    try:
        publisher = yield connect(broker, 5, client_id="p", clean_start=False,
                                  properties={"session_expiry_interval": 600})
        early = yield subscriber(broker, "early", "log/#")
        late = yield connect(broker, 5, client_id="late")
        publisher.received()
        late.received()
        publisher.send(Publish(topic="log/x", payload=b"once", qos=2, packet_id=7))
        late.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="$replay/all/log/#", qos=2),)))
        yield publishes(early, "the message, back from the inbox")
        assert [p.payload for p in late.received() if isinstance(p, Publish)] == [b"once"]
        assert [e.message.payload for e in broker.history.replay("log/#", "all", 0)] == [b"once"]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_stored_messages_that_expired_make_room_under_max_stored_messages(server: RedisServer) -> Iterator[Deferred[Any]]:
    """As with the SQLite store: at max_stored_messages, the offline session's messages that
    expired are deleted from Redis, and the next ones are taken."""
    clock = Clock()
    clock.advance(1000)
    broker = yield node_a(server, clock, max_queued_messages=1, max_stored_messages=2)
    try:
        sub = yield subscriber(broker, "s", "t")
        sub.lose()
        publisher = yield connect(broker, 5, client_id="p")
        publisher.received()  # (its CONNACK)

        @inlineCallbacks
        def codes(*payloads: bytes, **properties: Any) -> Any:
            answers = []
            for n, payload in enumerate(payloads):
                publisher.send(Publish(topic="t", payload=payload, qos=1, packet_id=n + 1, properties=properties))
                got: list[Any] = []
                yield until(lambda: got.extend(publisher.received()) or bool(got), "the PUBACK")
                answers += [p.reason_code for p in got]
            return answers
        assert (yield codes(b"old", b"old", b"old", b"old", message_expiry_interval=10)) == [
            0, 0, 0, ReasonCode.QUOTA_EXCEEDED]  # one in memory, two in Redis
        clock.advance(11)
        assert (yield codes(b"new0")) == [ReasonCode.QUOTA_EXCEEDED]  # (and Redis is swept meanwhile)
        yield until(lambda: not broker.sessions["s"].spilled, "the sweep's answer")
        assert (yield codes(b"new1", b"new2")) == [0, 0]
        assert broker.stats.messages_expired == 3
        again = yield connect(broker, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        got = yield publishes(again, "the messages kept", 2)
        assert [p.payload for p in got] == [b"new1", b"new2"]
    finally:
        yield broker.stopService()


@inlineCallbacks
def adopted(server: RedisServer, broker: BrokerService, clock: Clock, dead: str = "b") -> Any:
    """The survivor's adoption of ``dead``, to its end (past its wait for the others' last writes)."""
    adopting = broker.cluster.survivor.adopt(dead).addErrback(broker.cluster.survivor.failed)
    yield until(lambda: not server.client().exists(f"mqtt:clients:{dead}"), "the adoption's forget_node")
    yield past_the_adoptions_wait(broker, clock, adopting)
    yield until(lambda: adopting.called, "the adoption's end")


@inlineCallbacks
def past_the_adoptions_wait(broker: BrokerService, clock: Clock, adopting: Deferred[Any] | list[Any]) -> Any:
    """Move the clock past the wait of an adoption for the other nodes' last writes, once it
    waits: it begins when forget_node's answer is back, which may come after Redis is seen to
    have applied it, or before the clock last moved (the wait then ends sooner)."""
    wait = 2 * broker.cluster.survivor.ttl_ms / 1000
    ended = (lambda: adopting.called) if isinstance(adopting, Deferred) else (lambda: bool(adopting))

    def waiting() -> list[float]:  # (deferLater's call: a Deferred's callback, due within the wait)
        return [call.getTime() for call in clock.getDelayedCalls()
                if isinstance(getattr(call.func, "__self__", None), Deferred)
                and clock.seconds() < call.getTime() <= clock.seconds() + wait]
    yield until(lambda: ended() or waiting(), "the adoption's wait")
    if not ended():
        clock.advance(max(waiting()) - clock.seconds())


@inlineCallbacks
def wills_published(broker: BrokerService, observer: FakeClient) -> Any:
    """What the observer got (not the DUP copies of a retry), once the store wrote what it holds."""
    yield broker.store.flushed()
    return [(p.topic, p.payload) for p in observer.received() if isinstance(p, Publish) and not p.dup]


@inlineCallbacks
def a_watching_wills(server: RedisServer) -> Any:
    """Node a on a Clock, with a client of it watching wills/#: (clock, broker, observer)."""
    clock, broker = yield a_at_1000(server)
    return clock, broker, (yield watching_wills(broker))


@inlineCallbacks
def b_holding_c(server: RedisServer, delay: int, expiry: int = 3600) -> Any:
    """Node b (a store of its own) holds client c, connected, with a will on wills/c of ``delay``
    seconds and a session of ``expiry`` (0: none kept past the connection). Returns b's link."""
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    yield b.register(600_000)
    yield b.claim("c", not expiry, 0)
    if expiry:
        b.save_session(Session("c", expiry), None)
    b.arm_will("c", None, Message(topic="wills/c", payload=b"c is gone", qos=1), delay)
    yield b.flushed()
    return link


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_of_a_dead_nodes_session_that_ended_with_it_is_published_when_its_client_resumes(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected, c's session ending with its connection (expiry 0) and
    c's will delayed 30 s: the session ended when b died, so the will is due at once
    [MQTT-3.1.3-9]. c reconnected to a before any survivor adopted b: a's claim took the will
    out of Redis and dropped it, as if c had come back within the delay."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 30, expiry=0)  # (its session ending with its connection)
    try:
        server.client().delete("mqtt:node:b")  # b died
        client = yield connect(broker, 5, client_id="c", clean_start=False)
        assert [p.session_present for p in client.received()] == [False]
        yield broker.store.flushed()
        clock.advance(31.0)  # (even after its delay)
        yield broker.store.flushed()
        yield adopted(server, broker, clock)
        yield broker.store.flushed()
        got = yield publishes(observer, "the will")
        # (a DUP copy too, if the clock passed the retry interval meanwhile)
        assert [(p.topic, p.payload) for p in got if not p.dup] == [("wills/c", b"c is gone")]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_message_for_a_session_that_moved_here_follows_its_retain_as_published_here(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """c's session moved from node x to a, its subscription to "t" with Retain As Published 1;
    on a, c subscribes to "t" again without it. x's copy (kept until the routes settle) routes a
    message published with RETAIN 1 to c, passed on to a: what c holds here decides the QoS and
    the subscription ids [MQTT-3.10.4-2], and the RETAIN flag too [MQTT-3.3.1-12]."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        yield x.register(600_000)
        yield holds(x, "c", Subscription(client_id="c", topic_filter="t", qos=1, retain_as_published=True),
                    expiry=600, disconnected_at=1000.0)
        client = yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600})
        assert "c" in broker.cluster._moving
        client.received()
        client.send(Subscribe(packet_id=1, subscriptions=(
            SubscriptionRequest(topic_filter="t", qos=1, retain_as_published=False),)))
        yield broker.store.flushed()
        client.received()
        # x's copy routes a retained publication to c: passed on to a, c's owner.
        message = Message(topic="t", payload=b"m", qos=1, retain=True, cluster_id=b"x-1")
        x.send_on("c", Queued(message, 1, True, (), None, 0), 0)
        yield x.flushed()
        got = yield publishes(client, "the message at c")
        assert [(p.payload, p.retain) for p in got] == [(b"m", False)]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_node_back_while_a_survivor_adopts_it_keeps_its_routes_its_inbox_and_its_membership(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node x, taken for dead, came back (a pause over) while a, its survivor, waited to read its
    inbox a last time: a went on as if x were dead, dropped its inbox with a message acknowledged
    into it since, its membership and its routes' version (x's next route events, from version 1
    again, were ignored)."""
    clock = Clock()
    clock.advance(1000.0)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    broker = yield node_a(server, clock)
    try:
        yield x.register(600_000)
        yield x.create_inbox()
        x.route("t", True)
        yield x.flushed()
        cluster = broker.cluster
        yield until(lambda: "x" in cluster.forwarding.nodes(), "a to learn x's route")
        server.client().delete("mqtt:node:x")  # x taken for dead
        adopting = cluster.survivor.adopt("x").addErrback(cluster.survivor.failed)
        yield until(lambda: "x" not in cluster.forwarding.nodes(), "a to forget x's routes (G)")
        # x is back: it registers, makes its inbox and announces its filter again (as start() does).
        yield x.register(600_000)
        yield x.create_inbox()
        x.route("t", True)
        yield x.flushed()
        yield until(lambda: "x" in cluster.forwarding.nodes(), "a to learn x's route again")
        publisher = yield connect(broker, 4, client_id="p")
        publisher.received()
        publisher.send(Publish(topic="t", payload=b"for x", qos=1, packet_id=1))
        yield until(lambda: publisher.received(), "the PUBACK")
        assert server.client().xlen("mqtt:inbox:x") == 1  # acknowledged: x's inbox holds it
        clock.advance(2 * cluster.survivor.ttl_ms / 1000)  # a's adoption goes on
        yield until(lambda: adopting.called, "the adoption's end")
        r = server.client()
        assert r.hgetall("mqtt:routes:x") == {b"t": b"1"}
        assert r.xlen("mqtt:inbox:x") == 1 and r.sismember("mqtt:nodes", "x")
        x.route("u", True)  # x's subscriber takes a new filter, after the adoption
        yield x.flushed()
        yield until(lambda: "u" in cluster.forwarding.filters_of("x"), "a to hear x's new filter")
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_adopted_while_its_client_connects_is_kept_when_that_connection_is_refused(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected, c's will delayed 30 s. c connects to a, whose claim Redis
    answers late; meanwhile a adopts b and its claim of c comes first: the will was dropped as
    its client's, connecting again. But that connection was refused (0x88 after
    cluster_claim_timeout): c never came back [MQTT-3.1.3-9], and its will was never published."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 30)
    try:
        server.client().delete("mqtt:node:b")  # b died
        answer: Deferred[Any] = Deferred()
        claim = broker.store.claim
        broker.store.claim = lambda *args: answer  # Redis slow to answer c's claim
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 3600}))
        broker.store.claim = claim
        adopting = broker.cluster.survivor.adopt("b").addErrback(broker.cluster.survivor.failed)
        yield until(lambda: "c" in broker.sessions, "a to adopt c")
        clock.advance(broker.config.cluster_claim_timeout)
        assert [p.reason_code for p in client.received()] == [ReasonCode.SERVER_UNAVAILABLE] and client.closed
        claim("c", False, 0).chainDeferred(answer)  # the answer, at last
        yield until(lambda: "c" not in broker.cluster._claiming, "the claim's answer")
        yield broker.store.flushed()
        clock.advance(31.0)
        yield past_a_pause(broker, clock)
        yield until(lambda: not server.client().exists("mqtt:clients:b"), "the adoption's forget_node")
        yield past_the_adoptions_wait(broker, clock, adopting)
        yield until(lambda: adopting.called, "the adoption's end")
        assert (yield wills_published(broker, observer)) == [("wills/c", b"c is gone")]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_left_by_a_node_just_killed_is_published_when_the_new_connection_started_clean(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b is killed with c connected (session expiry 3600 s, will delayed 30 s); before its
    heartbeat key expires, c connects to a with Clean Start 1. a's claim finds b alive and leaves
    it the will (wills-left); b never hears. The clean start ended c's session, so the will is
    due at once ([MQTT-3.1.3-9]: "or the Session ends"; a live b would publish it). a adopted b
    later and found the left will, but took it for one whose client came back: dropped."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 30)
    try:
        # b is killed now; its key lives on a moment: c connects to a, clean.
        yield connect(broker, 5, client_id="c", clean_start=True, properties={"session_expiry_interval": 3600})
        assert server.client().hget("mqtt:wills-left:b", "c") is not None
        server.client().delete("mqtt:node:b")  # b's key expired
        yield adopted(server, broker, clock)
        clock.advance(31.0)
        assert (yield wills_published(broker, observer)) == [("wills/c", b"c is gone")]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_left_will_is_published_once_when_the_survivor_dies_before_it_forgets_the_dead_node(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b is killed with c connected (will, delay 0). c connects to a before b's key expires:
    the claim leaves the will to b (wills-left:b). A survivor adopts b, finds the left will and
    publishes it, then dies before forget_node (which deletes wills-left:b) (here: forget_node
    fails). The next survivor adopted b again (b still a member, c still in b's clients) and
    published the will a second time: the left will was read, never taken."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 0)
    try:
        yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 3600})
        assert server.client().hget("mqtt:wills-left:b", "c") is not None
        server.client().delete("mqtt:node:b")  # b's key expired
        store = broker.cluster.store
        forget_node = store.forget_node
        store.forget_node = lambda dead: fail(RuntimeError("the survivor died here"))
        ended: list[Any] = []
        first = store.flushed().addCallback(lambda _: broker.cluster.survivor.adopt("b"))
        first.addBoth(ended.append)
        yield until(lambda: ended, "the first survivor's end")
        assert "the survivor died here" in str(ended[0])
        store.forget_node = forget_node
        yield store.flushed()
        got: list[Publish] = []
        yield until(lambda: got.extend(p for p in observer.received() if isinstance(p, Publish)) or got, "the will")
        done: list[Any] = []
        broker.cluster.survivor.adopt("b").addErrback(broker.cluster.survivor.failed).addBoth(done.append)
        yield until(lambda: not server.client().exists("mqtt:clients:b"), "the next survivor's forget_node")
        yield past_the_adoptions_wait(broker, clock, done)
        yield until(lambda: done, "the next survivor's end")
        yield store.flushed()
        got += [p for p in observer.received() if isinstance(p, Publish)]
        assert [(p.topic, p.payload) for p in got if not p.dup] == [("wills/c", b"c is gone")], "published twice"
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_will_a_survivor_took_is_published_by_the_next_when_that_survivor_dies_before_it_published_it(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected (will, no delay). Node s claimed c's session as b's survivor
    (the claim took the will out of the session) and was killed before its next batch: the node
    that adopts s publishes c's will, once. It was lost with s."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 0)
    s = RedisStore(link, "s", reactor)
    try:
        server.client().delete("mqtt:node:b")  # b died
        yield s.register(600_000)
        claim = yield s.claim("c", False, 0, "b")
        assert claim is not None and claim.will is not None
        server.client().delete("mqtt:node:s")  # s killed before it wrote anything more
        yield adopted(server, broker, clock, "b")
        yield adopted(server, broker, clock, "s")
        assert (yield wills_published(broker, observer)) == [("wills/c", b"c is gone")]
        assert not server.client().keys("mqtt:wills-due:*")
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_the_wills_a_node_took_are_not_taken_from_it_while_it_is_alive(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node s claimed c's session from dead b, and was left c2's will by a claim that found it
    alive: both wills are s's to publish while it lives (an adoption of s that finds it back, a
    pause over, goes on to read what s left). Another node took them all the same."""
    server.client().flushall()
    link = yield b_holding_c(server, 0)
    s, t = RedisStore(link, "s", reactor), RedisStore(link, "t", reactor)
    try:
        server.client().delete("mqtt:node:b")  # b died
        yield s.register(600_000)
        yield t.register(600_000)
        assert (yield s.claim("c", False, 0, "b")).will_id is not None
        server.client().hset("mqtt:wills-left:s", "c2", b"a will")
        assert (yield t.take_wills("s")) == []
        assert (yield t.take_left_will("s", "c2")) is None
        assert server.client().hlen("mqtt:wills-due:s") == 1 and server.client().hexists("mqtt:wills-left:s", "c2")
    finally:
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_will_of_a_session_another_adoption_took_is_left_to_that_node(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node s took c's will from dead b (delayed, the session going on) and died. Nodes x and a
    adopt s at the same time: x claimed c first; a's take of s's wills leaves c's to x, which
    holds the session (and hears of c's next connection), and x takes it."""
    server.client().flushall()
    link = yield b_holding_c(server, 60)
    s, x, a = (RedisStore(link, node, reactor) for node in "sxa")
    try:
        r = server.client()
        r.delete("mqtt:node:b")  # b died
        yield s.register(600_000)
        assert (yield s.claim("c", False, 0, "b")).will_id is not None
        r.delete("mqtt:node:s")  # s died
        yield x.register(600_000)
        yield a.register(600_000)
        assert (yield x.claim("c", False, 0, "s")) is not None
        assert (yield a.take_wills("s")) == [] and r.hlen("mqtt:wills-due:s") == 1
        [taken] = yield x.take_wills("s")
        assert (taken.client_id, taken.back, taken.expiry) == ("c", False, 3600)
        assert not r.exists("mqtt:wills-due:s") and r.hlen("mqtt:wills-due:x") == 1
    finally:
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_will_whose_claim_answer_was_lost_is_published_when_the_node_takes_its_sessions_back(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected (will, no delay). Redis applied a's claim of c and its
    answer was lost: a takes back what Redis says it holds (as after a restart) and publishes
    c's will, once. The claim had taken the will out of the session, and nothing published it."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 0)
    try:
        r = server.client()
        r.delete("mqtt:node:b")  # b died
        assert r.eval(CLAIM.source, 0, "c", "a", "0", "0", 0, "", 0, "mqtt:control")  # (its answer lost)
        done: list[Any] = []
        broker.cluster.survivor.adopt("a").addBoth(done.append)
        yield until(lambda: done, "the adoption's end")
        assert done == [None]
        assert (yield wills_published(broker, observer)) == [("wills/c", b"c is gone")]
        assert not r.keys("mqtt:wills-due:*")
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_left_will_is_published_once_when_two_nodes_adopt_the_dead_node_at_once(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b is killed with c connected (will, no delay); c connects to a before b's key
    expires, so the claim leaves the will to b (wills-left:b). Nodes a and d both take b for dead
    and adopt it at the same time (their batches held: a stall): each read the left will, and
    each published it."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 0)
    d = BrokerService(endpoints=[], reactor=reactor, clock=Clock(), cluster=server.url, cluster_node_id="d",
                      close_linger=0)
    d.startService()
    try:
        yield d.cluster.ready
        yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 3600})
        assert server.client().hget("mqtt:wills-left:b", "c") is not None
        yield broker.store.flushed()
        yield d.store.flushed()
        server.client().delete("mqtt:node:b")  # b's key expired
        found: list[str] = []
        for node in (broker, d):
            survivor = node.cluster.survivor
            left_will_found = survivor.left_will_found
            survivor.left_will_found = lambda *args, f=left_will_found, n=node: (  # type: ignore[method-assign]
                found.append(n.cluster.node), f(*args))
            node.store._recovering = True  # (its batches wait)
        for node in (broker, d):
            adopt(node, "b")
        yield until(lambda: len(found) == 2, "both adoptions to look for the left will")
        assert broker.stats.wills_published + d.stats.wills_published == 1
    finally:
        for node in (broker, d):
            node.store._recovering = False
        yield d.stopService()
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_a_dead_node_took_is_not_published_once_its_client_is_back_on_another_node(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected (session of 3600 s, will delayed 60 s). Node s claimed c's
    session from b (the will went to wills-due:s) and was killed before its next batch. c then
    connected to node t (its claim found s dead): a new connection within the delay, so the will
    must not be sent [MQTT-3.1.3-9]. Node a adopts s: it takes the will from wills-due:s and,
    not holding c's session, schedules it, and publishes it after 60 s while c is on t."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 60)
    s, t = RedisStore(link, "s", reactor), RedisStore(link, "t", reactor)
    try:
        r = server.client()
        r.delete("mqtt:node:b")  # b died
        yield s.register(600_000)
        claim = yield s.claim("c", False, 0, "b")
        assert claim is not None and claim.will is not None
        r.delete("mqtt:node:s")  # s killed before it wrote anything more
        yield t.register(600_000)
        claim = yield t.claim("c", False, 0)  # c connects to t (within the will's delay)
        assert claim is not None and claim.previous == "s"
        yield adopted(server, broker, clock, "s")
        clock.advance(61.0)
        yield past_a_pause(broker, clock)
        yield broker.store.flushed()
        assert broker.stats.wills_published == 0
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_will_whose_adoption_claim_answer_was_lost_is_published_when_the_adoption_runs_again(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected (will, no delay). Node a, adopting b, had its claim of c
    applied by Redis and its answer lost (the connection cut: the adoption failed): the will
    went to wills-due:a. The adoption runs again at the next beat: its claim of c finds a
    holding it (no will), wills-due:b is empty, and wills-due:a is read only at a's restart or
    after a CONNECT's lost claim: the will stays in Redis, unpublished."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 0)
    try:
        r = server.client()
        r.delete("mqtt:node:b")  # b died
        # a's adoption claim (its answer lost)
        assert r.eval(CLAIM.source, 0, "c", "a", "0", "0", 0, "b", 0, "mqtt:control")
        yield adopted(server, broker, clock, "b")  # the adoption again, at the next beat
        assert (yield wills_published(broker, observer)) == [("wills/c", b"c is gone")]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_will_whose_move_to_the_survivor_had_its_answer_lost_is_published_when_the_adoption_runs_again(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b died with c connected (will, no delay); node s claimed c's session from b (the
    will went to wills-due:s) and was killed before its next batch. Node a, adopting s, had its
    wills.lua 'due' step applied (the will moved to wills-due:a) and its answer lost. The
    adoption of s runs again: wills-due:s is empty now, and wills-due:a is read only at a's
    restart: c's will is never published."""
    clock, broker, observer = yield a_watching_wills(server)
    link = yield b_holding_c(server, 0)
    s = RedisStore(link, "s", reactor)
    try:
        r = server.client()
        r.delete("mqtt:node:b")  # b died
        yield s.register(600_000)
        assert (yield s.claim("c", False, 0, "b")).will_id is not None
        r.delete("mqtt:node:s")  # s killed before it wrote anything more
        assert r.eval(WILLS.source, 0, "due", "a", "s")  # a's take_wills("s") (its answer lost)
        yield adopted(server, broker, clock, "s")  # the adoption again, at the next beat
        assert (yield wills_published(broker, observer)) == [("wills/c", b"c is gone")]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_fenced_qos2_publish_keeps_the_received_counts_consistent(server: RedisServer) -> Iterator[Deferred[Any]]:
    """A QoS 2 PUBLISH routed through the inboxes, fenced by its publisher's session, which
    another node claims before the batch goes: routed nowhere. It was counted as a QoS 2 message
    received at once, and as a message routed only once back from this node's inbox (never,
    here): the QoS 0 count, what is left of the routed ones, was -1 for good."""
    from mqtt_broker.admin import figures
    broker = yield node_a(server)
    link = Redis(RedisAddress.parse(server.url))
    c = RedisStore(link, "c", reactor)
    try:
        yield subscriber(broker, "s", "t")
        publisher = yield persistent_publisher(broker)
        store = broker.store
        store._recovering = True  # (the batch waits, as while Redis is away)
        try:
            publisher.send(Publish(topic="t", payload=b"once", qos=2, packet_id=7))
            at_once = figures.read(broker).publish_received
            yield c.claim("p", False, 0)
        finally:
            store._recovering = False
        assert at_once == [0, 0, 1]
        yield store.flushed()
        yield until(lambda: publisher.closed, "a to let p go, told by Redis")
        assert figures.read(broker).publish_received == [0, 0, 1]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_qos2_publish_back_from_this_nodes_inbox_is_counted_once(server: RedisServer) -> Iterator[Deferred[Any]]:
    from mqtt_broker.admin import figures
    broker = yield node_a(server)
    try:
        local = yield subscriber(broker, "s", "t")
        publisher = yield persistent_publisher(broker)
        publisher.send(Publish(topic="t", payload=b"once", qos=2, packet_id=7))
        assert figures.read(broker).publish_received == [0, 0, 1]  # (on its way through the inbox)
        got = yield publishes(local, "the message at s")
        assert [p.payload for p in got] == [b"once"]
        assert figures.read(broker).publish_received == [0, 0, 1]
    finally:
        yield broker.stopService()


# --- a damaged record in an entry; a shared copy and the session's own --------------------------

def _record(payload: bytes, qos: int = 1) -> bytes:
    return pack_forwarded(Message(topic="t", payload=payload, qos=qos, sender="p",
                                  cluster_id=b"x" * 14 if qos else None), (), 0.0)


def _payloads(client: Any, into: list[bytes]) -> bool:
    into += [p.payload for p in client.received() if isinstance(p, Publish)]
    return bool(into)


@pytest.mark.parametrize("way", ["inbox", "qos0"])
@pytest_twisted.inlineCallbacks
def test_a_damaged_record_loses_none_of_the_records_before_it(server: RedisServer, way: str) -> Iterator[Deferred[Any]]:
    """The whole entry (or QoS 0 write) was read before any of it was routed: a record cut short
    at its end lost the good message before it, acknowledged to its publisher on another node."""
    broker = yield node_a(server)
    try:
        s = yield subscriber(broker, "s", "t")
        qos = 1 if way == "inbox" else 0
        good, cut, after = _record(b"good", qos), _record(b"cut short", qos)[:-3], _record(b"after", qos)
        with capturedLogs() as events:
            if way == "inbox":
                server.client().xadd("mqtt:inbox:a", {"d": good + cut})
                server.client().xadd("mqtt:inbox:a", {"d": after})
            else:
                channel = broker.cluster.store.qos0_channel("a")
                server.client().publish(channel, good + cut)
                server.client().publish(channel, after)  # (pub/sub keeps the order)
            got: list[bytes] = []
            yield until(lambda: _payloads(s, got) and b"after" in got, "the entry after the damaged one")
        assert got == [b"good", b"after"]
        assert any("the rest of" in (e.get("log_format") or "") and "cut short" in str(e.get("log_failure"))
                   for e in events)
    finally:
        yield broker.stopService()


@pytest.mark.parametrize("way", ["passed on", "from a dead node's inbox"])
@pytest_twisted.inlineCallbacks
def test_a_session_that_moved_gets_a_shared_copy_as_well_as_its_own(server: RedisServer,
                                                                     way: str) -> Iterator[Deferred[Any]]:
    """s holds "t" and "$share/g/t" (its only member) and moved to node a lately. On one broker
    it gets a copy for each [MQTT-4.8.2]; here the group's copy was taken for one it had by the
    other way (the same message id), and the group lost the message."""
    clock, broker = yield a_at_1000(server)
    link = Redis(RedisAddress.parse(server.url))
    x, c = RedisStore(link, "x", reactor), RedisStore(link, "c", reactor)
    share = ("g", "$share/g/t")
    message = Message(topic="t", payload=b"p", qos=1, sender="pub", cluster_id=b"c-id-" + way[:4].encode())
    try:
        yield x.register(600_000)
        yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=1),
                    Subscription(client_id="s", topic_filter="$share/g/t", qos=1, share_group="g"),
                    expiry=3600, disconnected_at=1000.0)
        if way == "passed on":
            server.client().delete("mqtt:node:x")  # x died
            adopt(broker, "x")
            yield until(lambda: "s" in broker.sessions, "a to adopt s")
            assert "s" in broker.cluster._moving
            c.forward("a", pack_forwarded(message, (), clock.seconds()))  # for s's subscription to t
            c.send_on("s", Queued(message, 1, False, (), share, 0), 0)  # the group's, passed on
            yield c.flushed()
            yield until(lambda: broker.cluster.stats.forwarded_in >= 2, "a to read both")
        else:  # c chose x for the group and forwarded it there; x died before reading it
            yield x.create_inbox()
            c.forward("x", pack_forwarded(message, (share,), clock.seconds()))
            yield c.flushed()
            server.client().delete("mqtt:node:x")
            adopt(broker, "x")
            yield until(lambda: "s" in broker.sessions and broker.sessions["s"].queue, "a to deliver x's inbox")
        yield broker.store.flushed()
        assert sorted(str(item.share) for item in broker.sessions["s"].queue) == sorted([str(None), str(share)])
    finally:
        yield broker.stopService()
        yield link.close()


@inlineCallbacks
def b_holding(server: RedisServer, client_id: str, *subscriptions: Subscription) -> Any:
    """Node b (a store of its own), a member with its inbox, holding the session of
    ``client_id`` with these subscriptions: (b's link, b)."""
    link = Redis(RedisAddress.parse(server.url))
    b = RedisStore(link, "b", reactor)
    yield b.register(600_000)
    yield b.create_inbox()
    yield holds(b, client_id, *subscriptions)
    return link, b


@pytest_twisted.inlineCallbacks
def test_a_dead_nodes_message_reaches_its_publisher_by_a_subscription_without_no_local(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """c holds t with No Local and # without, on node b; its own message on t waits in b's inbox
    when b dies. No Local is its one subscription's [MQTT-3.8.3-3]: the survivor dropped c
    altogether, where # asks for the message [MQTT-3.3.4-2]."""
    clock = Clock()
    broker = yield node_a(server, clock)
    link, b = yield b_holding(server, "c", Subscription(client_id="c", topic_filter="t", qos=1, no_local=True),
                              Subscription(client_id="c", topic_filter="#", qos=1, subscription_id=7))
    try:
        b.forward("b", pack_forwarded(Message(topic="t", payload=b"own", qos=1, sender="c"), (), clock.seconds()))
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b died
        yield adopted(server, broker, clock)
        yield broker.store.flushed()
        assert [(item.message.payload, item.subscription_ids) for item in broker.sessions["c"].queue] == [
            (b"own", (7,))]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest.mark.parametrize("way", ["adopted", "claimed by its client"])
@pytest_twisted.inlineCallbacks
def test_a_session_from_redis_is_read_within_max_queued_bytes(server: RedisServer, way: str) -> Iterator[Deferred[Any]]:
    """A claim read max_queued_messages of the queue (with 0, all of it) whatever max_queued_bytes
    said, and the claim of a connecting client kept it all in memory: 50 messages of 1,000 bytes
    under 2,000."""
    clock = Clock()
    clock.advance(1000.0)
    broker = yield node_a(server, clock, max_queued_messages=0, max_queued_bytes=2000, max_inflight_messages=1)
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        yield x.register(600_000)
        yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=1), expiry=3600, disconnected_at=1000.0)
        for seq in range(1, 51):
            x.add_delivery("s", Queued(Message(topic="t", payload=b"x" * 1000, qos=1), 1, False, (), None, seq), None)
        yield x.flushed()
        read: list[int] = []
        claim = broker.store.claim
        broker.store.claim = lambda *args: claim(*args).addCallback(  # (RedisStore is not compiled)
            lambda answer: read.append(answer.session.queued_bytes if answer and answer.session else 0) or answer)
        if way == "adopted":
            server.client().delete("mqtt:node:x")  # x died
            adopt(broker, "x")
            yield until(lambda: "s" in broker.sessions, "a to adopt s")
        else:
            yield connect(broker, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 3600})
        session = broker.sessions["s"]
        assert read and max(read) <= 2000, f"read from Redis at once: {read} bytes"
        assert session.queued_bytes <= 2000 and len(session.queue) + len(session.outgoing) + session.spilled == 50
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_dead_nodes_shared_message_does_not_go_back_to_the_bridge_that_sent_it(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """A bridge (its subscriptions No Local) is not sent back what it publishes, through a shared
    subscription either: from a dead node's inbox, the survivor gave it to the member the dead
    node had, the bridge itself."""
    clock = Clock()
    broker = yield node_a(server, clock)
    link, b = yield b_holding(server, "br", Subscription(client_id="br", topic_filter="$share/g/t", qos=1,
                                                         no_local=True, share_group="g"))
    try:
        b.forward("b", pack_forwarded(Message(topic="t", payload=b"from br", qos=1, sender="br"),
                                      (("g", "$share/g/t"),), clock.seconds()))
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b died
        yield adopted(server, broker, clock)
        yield broker.store.flushed()
        assert [s.no_local for s in broker.sessions["br"].subscriptions.values()] == [True]
        assert list(broker.sessions["br"].queue) == []
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_dead_nodes_shared_message_its_member_may_not_read_goes_to_one_that_may(
        server: RedisServer, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """Node b died holding m1, its one member of $share/g/t/+, and a QoS 1 message on t/secret
    given to b waits in its inbox; m1's client (user nope: t/open only) reconnected to node a,
    where m3 may read t/secret. Draining b's inbox, a gave the message to m1, which may not read
    it, and it went to no member: another member has it, as on one node."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\nuser nope\ntopic write #\ntopic read t/open\n")
    clock = Clock()
    broker = yield node_a(server, clock, acl_file=str(acl))
    share = ("g", "$share/g/t/+")
    link, b = yield b_holding(server, "m1", Subscription(client_id="m1", topic_filter=share[1], qos=1, share_group="g"))
    try:
        m3 = yield connect(broker, 5, client_id="m3")
        m3.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=share[1], qos=1),)))
        yield broker.store.flushed()
        m3.received()
        b.forward("b", pack_forwarded(Message(topic="t/secret", payload=b"secret", qos=1, sender="p"),
                                      (share,), clock.seconds()))
        yield b.flushed()
        server.client().delete("mqtt:node:b")  # b died
        m1 = yield connect(broker, 5, client_id="m1", username="nope", clean_start=False,
                           properties={"session_expiry_interval": 600})
        yield broker.store.flushed()
        yield adopted(server, broker, clock)
        yield broker.store.flushed()
        [got] = yield publishes(m3, "the message, for m3")
        assert got.payload == b"secret" and not [p for p in m1.received() if isinstance(p, Publish)]
    finally:
        yield broker.stopService()
        yield link.close()

# --- a node taken for dead that is not -------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_a_node_taken_for_dead_that_beats_again_before_the_claim_keeps_its_clients(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """c is connected to node b, with a will (delay 0). b stalls past its heartbeats; a, its
    survivor, judges it dead and starts adopting it; b beats again (its pause over) before a's
    claim of c. The claim took c all the same, leaving b the will, and b, letting c go (0x8E),
    published it; a published it again, from the claim's reply. The adoption stops there
    (docs/cluster.md): c stays on b, and no will goes."""
    clock = Clock()
    clock.advance(1000.0)
    a = yield node_a(server, clock)
    b = yield node_b(server)
    try:
        watcher = yield watching_wills(a)
        c = yield connect(b, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600},
                          will=Will(topic="wills/c", payload=b"c is gone", qos=0, retain=False))
        yield b.store.flushed()
        c.received()
        server.client().delete("mqtt:node:b")  # b stalled past its heartbeats: a judges it dead
        clients_of = a.store.clients_of
        ttl = b.cluster.survivor.ttl_ms
        # (b's pause ends, and it beats, between a's judgement and a's claim of c)
        a.store.clients_of = lambda node: b.store.beat(ttl).addCallback(lambda _: clients_of(node))
        adopting = a.cluster.survivor.adopt("b").addErrback(a.cluster.survivor.failed)
        yield until(lambda: adopting.called, "the adoption's end (b is alive: it stops there)")
        yield a.store.flushed()
        yield b.store.flushed()
        assert not c.closed and "c" not in a.sessions and server.client().hget("mqtt:owner:c", "node") == b"b"
        assert (a.stats.wills_published, b.stats.wills_published) == (0, 0)
        assert [p for p in watcher.received() if isinstance(p, Publish)] == []
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_paused_past_its_adoption_routes_its_filters_again_once_back(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node x holds s1 and s2, connected, both subscribed to "t". x pauses (its clock stops)
    long enough for a, its survivor, to adopt both and forget x (routes:x deleted, 'G': every
    node forgets x's routes), then drop it. x's pause ends: it beats again, lets s1 and s2 go
    (0x8E), and s1's client reconnects to x at once. x held "t" throughout (s2's copy is kept
    while the routes settle), so it never announces it again: no node routes "t" to x, and a
    QoS 1 message published on a never reaches s1 (acknowledged, and lost for s1)."""
    clock = Clock()
    clock.advance(1000.0)
    a = yield node_a(server, clock)
    x_clock = Clock()
    x_clock.advance(1000.0)
    x = BrokerService(endpoints=[], reactor=reactor, clock=x_clock, cluster=server.url, cluster_node_id="x",
                      close_linger=0)
    x.startService()
    try:
        yield x.cluster.ready
        clients = {}
        for name in ("s1", "s2"):
            client = clients[name] = yield connect(x, 5, client_id=name, clean_start=False,
                                                   properties={"session_expiry_interval": 600})
            client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
        yield x.store.flushed()
        yield until(lambda: "t" in a.cluster.forwarding.filters_of("x"), "a to route t to x")
        # x pauses: no heartbeat (its clock stands still); its key expires.
        server.client().delete("mqtt:node:x")
        adopting = a.cluster.survivor.adopt("x").addErrback(a.cluster.survivor.failed)
        yield until(lambda: not server.client().exists("mqtt:clients:x"), "a to forget x")
        yield past_the_adoptions_wait(a, clock, adopting)
        yield until(lambda: adopting.called, "a to drop x")
        assert not server.client().sismember("mqtt:nodes", "x")
        # x's pause ends: it beats again; s1's client (let go) reconnects to x at once.
        x_clock.advance(x.config.cluster_heartbeat)
        yield until(lambda: server.client().exists("mqtt:node:x"), "x to beat again")
        yield until(lambda: clients["s1"].closed and clients["s2"].closed, "x to let s1 and s2 go")
        s1 = yield connect(x, 5, client_id="s1", clean_start=False, properties={"session_expiry_interval": 600})
        assert s1.received()[0].session_present
        for _ in range(20):  # the routes settle (on both clocks), x beats, a learns x is back
            x_clock.advance(1.0)
            clock.advance(1.0)
            yield x.store.flushed()
            yield a.store.flushed()
        yield a.cluster.survivor.check_nodes()
        publisher = yield connect(a, 5, client_id="p")
        publisher.received()
        publisher.send(Publish(topic="t", payload=b"for s1", qos=1, packet_id=1))
        yield until(lambda: publisher.received(), "the PUBACK")
        got: list[Any] = []
        try:
            yield until(lambda: got.extend(p for p in s1.received() if isinstance(p, Publish)) or got,
                        "the message at s1")
        except AssertionError:
            pass
        assert [p.payload for p in got] == [b"for s1"], \
            f"s1 on x never got it: a routes {a.cluster.forwarding.filters_of('x')} to x, " \
            f"routes:x = {server.client().hgetall('mqtt:routes:x')}"
    finally:
        yield x.stopService()
        yield a.stopService()


@inlineCallbacks
def c_on(broker: BrokerService, **will_properties: Any) -> Any:
    """Client c of node a, connected, with a persistent session and a will on wills/c."""
    client = yield connect(broker, 5, client_id="c", clean_start=False, properties={"session_expiry_interval": 600},
                           will=Will(topic="wills/c", payload=b"c is gone", qos=1, retain=False,
                                     properties=will_properties))
    client.received()
    yield broker.store.flushed()
    return client


def x_adopts_c_from_a(server: RedisServer) -> Any:
    """Node x (alive) takes a for dead and claims c as an adoption does: the claim's reply (the
    will is x's to publish: a is found dead)."""
    r = server.client()
    r.delete("mqtt:node:a")
    r.set("mqtt:node:x", "x", px=600_000)
    r.sadd("mqtt:nodes", "x")
    reply = r.eval(CLAIM.source, 0, "c", "x", "0", "0", 0, "a", 0, "mqtt:control")
    assert reply[2] == 0 and reply[3] is not None and r.hget("mqtt:owner:c", "node") == b"x"
    return reply


@pytest_twisted.inlineCallbacks
def test_a_node_fenced_off_after_being_taken_for_dead_does_not_publish_the_will_its_survivor_took(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """As above: a is cut off, taken for dead, and x adopts c (its claim finds a dead, 'C' with
    alive 0, and takes c's will to publish it). The news is lost with a's subscribed connection.
    Back, a writes for c (c subscribes): Redis refuses the write, and a lets c go (0x8E) as for
    a claim that left it the will: a publishes c's will too (Cluster._fenced calls _let_go with
    will_left True). The will goes twice: by x, and by a."""
    clock, broker = yield a_at_1000(server)
    try:
        client = yield c_on(broker)
        r = server.client()
        r.client_kill_filter(_type="pubsub")
        r.client_kill_filter(_type="normal", skipme=True)
        x_adopts_c_from_a(server)
        yield until(lambda: r.exists("mqtt:node:a"), "a to register again")
        client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
        yield until(lambda: client.closed, "a to let c go once Redis refuses its write")
        yield broker.store.flushed()
        assert broker.stats.wills_published == 0, "a published c's will, which x took to publish"
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_back_before_its_survivor_drains_its_inbox_keeps_what_was_sent_to_it_since(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """x is taken for dead; a starts adopting it. x's pause ends (it beats again) and node y
    forwards x a QoS 1 message for x's client n ("n/t"), acknowledged to its publisher once in
    x's inbox. a's first drain of x's inbox runs without looking whether x is back: it reads
    the new entry (XREADGROUP '>', as a's consumer), matches it against the subscriptions of the
    sessions x held (none for "n/t"), drops it and marks it handled. x never reads it.
    docs/cluster.md: a node taken for dead that is alive again "keeps its inbox"."""
    from mqtt_broker.cluster.codec import pack_forwarded
    clock = Clock()
    clock.advance(1000.0)
    a = yield node_a(server, clock)
    link = Redis(RedisAddress.parse(server.url))
    x, y = RedisStore(link, "x", reactor), RedisStore(link, "y", reactor)
    try:
        yield x.register(600_000)
        yield x.create_inbox()
        yield holds(x, "s", Subscription(client_id="s", topic_filter="t", qos=1), expiry=600, disconnected_at=1000.0)
        server.client().delete("mqtt:node:x")  # x taken for dead
        clients_of = a.store.clients_of

        @inlineCallbacks
        def x_back_meanwhile(node: str) -> Any:
            yield x.register(600_000)  # x's pause is over
            y.forward("x", pack_forwarded(Message(topic="n/t", payload=b"for n", qos=1, cluster_id=b"y-1"), (),
                                          1000.0))
            yield y.flushed()  # (its publisher has its PUBACK now)
            return (yield clients_of(node))
        a.store.clients_of = x_back_meanwhile
        adopting = a.cluster.survivor.adopt("x").addErrback(a.cluster.survivor.failed)
        yield until(lambda: adopting.called, "the adoption's end (x is alive: it stops)")
        yield a.store.flushed()
        r = server.client()
        new = r.xreadgroup("nodes", "x", {"mqtt:inbox:x": ">"})
        pending = r.xpending("mqtt:inbox:x", "nodes")["pending"]
        assert new or pending, "the message for x's client n, sent to x after it was back, is gone from x's inbox"
    finally:
        yield a.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_node_taken_for_dead_while_cut_off_closes_its_clients_whose_sessions_were_adopted(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node a is cut off from Redis (its connections lost) long enough to be taken for dead:
    node x adopts c's session, connected to a (x's claim of it, with required 'a', takes its
    will out of Redis to publish it). The claim's news on the control channel is lost with a's
    subscribed connection. Back, a re-registers and beats again, but c, idle, stays connected to
    a for good: a writes nothing for c that Redis could refuse. docs/cluster.md: a node taken
    for dead "closes those clients (0x8E), which reconnect" (and when c leaves a, a publishes
    its will a second time)."""
    clock, broker = yield a_at_1000(server)
    try:
        client = yield c_on(broker)
        r = server.client()
        assert r.hget("mqtt:owner:c", "node") == b"a"
        # a is cut off: every connection of it lost (the test's own client is spared) ...
        r.client_kill_filter(_type="pubsub")
        r.client_kill_filter(_type="normal", skipme=True)
        x_adopts_c_from_a(server)  # ... and while it is away, x takes it for dead and adopts c
        # a is back: it registers again and beats.
        yield until(lambda: r.exists("mqtt:node:a"), "a to register again")
        for _ in range(10):
            clock.advance(broker.config.cluster_heartbeat)
            yield broker.store.flushed()
        try:
            yield until(lambda: client.closed, "a to let c go")  # (once Redis has said who holds c)
        finally:
            got = client.received()
        assert [getattr(p, "reason_code", None) for p in got if isinstance(p, Disconnect)] == \
            [ReasonCode.SESSION_TAKEN_OVER] and client.closed, f"c still connected to a ({got})"
        assert broker.stats.wills_published == 0  # (x took it, found a dead)
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_delayed_will_due_during_a_pause_past_the_heartbeats_is_published_once(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """c left node a with a will delayed 10 s (kept in a's memory, and in Redis with its due
    time). a is cut off from Redis (or pauses) past its heartbeats; x takes it for dead and
    adopts c (its claim takes the will, due at 1010, to publish it then). At 1010 a, still cut
    off (or its pause over, its timers running before it reads the claim's news), publishes
    the will as well: nothing fences a will's publication, and x and a both publish it."""
    clock, broker = yield a_at_1000(server)
    try:
        client = yield c_on(broker, will_delay_interval=10)
        client.lose()
        yield broker.store.flushed()
        assert "c" in broker.wills and server.client().hget("mqtt:session:c", "will") is not None
        x_adopts_c_from_a(server)  # a pauses: x takes it for dead and adopts c, the will with it ...
        # ... and a's pause ends at 1011: its timers first (as Twisted's loop runs them), the news after.
        clock.advance(11.0)
        yield until(lambda: "c" not in broker.store.epochs, "a to hear of x's claim")
        yield broker.store.flushed()
        assert broker.stats.wills_published == 0, "a published c's will, which x took (and publishes)"
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_asking_who_holds_the_sessions_leaves_the_reactor_free_between_a_thousand(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """check_owned (a node back from an outage, or a pause) sent one command per session in one
    turn of the reactor: 50,000 sessions held it for seconds, longer than a heartbeat key lives,
    and the node came back only to be taken for dead."""
    from mqtt_broker.cluster.node import OWNED_AT_ONCE
    clock, broker = yield a_at_1000(server)
    try:
        for i in range(3 * OWNED_AT_ONCE):
            broker.store.epochs[f"c{i}"] = i + 1
        sent: list[Any] = []
        call = broker.store.redis.call
        broker.store.redis.call = lambda *args, **kwargs: sent.append(args[0]) or call(*args, **kwargs)
        checking = broker.cluster.check_owned()
        in_one_turn = len(sent)
        yield checking
        broker.store.redis.call = call
        assert (in_one_turn, len(sent)) == (OWNED_AT_ONCE, 3 * OWNED_AT_ONCE)
    finally:
        broker.store.epochs.clear()
        yield broker.stopService()


@inlineCallbacks
def two_nodes(server: Any, clock: Clock | None = None, **settings: Any) -> Any:
    """Nodes a and b on the server's Redis (emptied first), on one clock (node clocks agree)."""
    server.client().flushall()
    clock = clock or Clock()
    nodes = []
    for name in ("a", "b"):
        broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=server.url,
                               cluster_node_id=name, close_linger=0, **settings)
        broker.startService()
        yield broker.cluster.ready
        nodes.append(broker)
    return nodes


@pytest_twisted.inlineCallbacks
def test_a_retained_message_deleted_while_a_node_joins_stays_on_that_node(server: Any) -> Iterator[Deferred[Any]]:
    """Node a holds the retained message of r/x; node c joins and reads the retained messages
    from Redis (HSCAN). Between Redis's answer and c's taking it (or between two pages of the
    scan), a client of a deletes r/x (empty retained PUBLISH): c hears the 'r' event first, finds
    nothing to delete in its replica, then stores r/x from what it read. c's clients are sent a
    retained message deleted everywhere else, for as long as c runs ([MQTT-3.3.1-6]; docs: an
    empty payload deletes it everywhere)."""
    clock = Clock()
    clock.advance(reactor.seconds())
    server.client().flushall()
    a = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=server.url, cluster_node_id="a",
                      close_linger=0)
    a.startService()
    c = None
    try:
        yield a.cluster.ready
        yield a.publish("r/x", b"old", qos=1, retain=True)
        c = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=server.url, cluster_node_id="c",
                          close_linger=0)
        held: dict[str, Any] = {}
        call = c.cluster.store.redis.call

        def scanning(*args: Any, **kwargs: Any) -> Deferred[Any]:
            d = call(*args, **kwargs)
            if args[0] == "HSCAN" and "gate" not in held:
                gate = held["gate"] = Deferred()
                d.addCallback(lambda reply: held.setdefault("reply", reply) and gate)
            return d
        c.cluster.store.redis.call = scanning
        events: list[bytes] = []
        control = c.cluster._control
        c.cluster._control = lambda data: events.append(data) or control(data)
        c.startService()
        yield until(lambda: "reply" in held, "c's scan of the retained messages, answered")
        yield a.publish("r/x", b"", qos=1, retain=True)  # deleted, everywhere
        yield until(lambda: any(e.startswith(b"r\0") for e in events), "c to hear of the deletion")
        held["gate"].callback(held["reply"])
        yield c.cluster.ready
        assert server.client().hget("mqtt:retained", "r/x") is None and a.retained.get("r/x") is None
        assert c.retained.get("r/x") is None, "c keeps the retained message r/x deleted everywhere else"
    finally:
        if c is not None:
            yield c.stopService()
        yield a.stopService()


@pytest.mark.parametrize("interval, sent", [(5, False), (0, True)])
@pytest_twisted.inlineCallbacks
def test_a_message_read_from_an_inbox_after_its_expiry_interval(server: Any, interval: int,
                                                               sent: bool) -> Iterator[Deferred[Any]]:
    """A QoS 1 message published on node a for a subscriber connected to node b is read from b's
    inbox 10 s later (b behind reading it). With an interval of 5 s it expired before onward
    delivery started: b must not send it [MQTT-3.3.2-5] (it was sent, with an interval of 0).
    With an interval of 0 it goes to the subscribers connected when it is routed, as on one
    broker: on another node too."""
    clock = Clock()
    clock.advance(reactor.seconds())
    a, b = yield two_nodes(server, clock)
    try:
        sub = yield connect(b, 5, client_id="s")
        sub.received()
        sub.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
        yield b.store.flushed()
        sub.received()
        yield until(lambda: "t" in a.cluster.forwarding.filters_of("b"), "a to route t to b")
        pub = yield connect(a, 5, client_id="p")
        pub.received()
        pub.send(Publish(topic="t", payload=b"m", qos=1, packet_id=1, properties={"message_expiry_interval": interval}))
        clock.advance(10.0)  # (b reads its inbox 10 s on)
        yield a.store.flushed()
        if sent:
            got = yield publishes(sub, "the message on b")
        else:
            yield until(lambda: b.cluster.stats.forwarded_in >= 1, "b to read the message")
            yield b.store.flushed()
            got = [p for p in sub.received() if isinstance(p, Publish)]
        assert [p.payload for p in got] == ([b"m"] if sent else [])
        assert b.stats.messages_expired == (0 if sent else 1)
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest.mark.parametrize("clean", [False, True])
@pytest_twisted.inlineCallbacks
def test_a_current_claim_answered_after_the_news_of_a_later_claim_lets_the_client_go(
        server: RedisServer, clean: bool) -> Iterator[Deferred[Any]]:
    """s is connected to a, its session ending with its connection (expiry 0). Its client
    connects to a again (a's claim finds a's copy current, epoch 1) and, a moment later, to b
    (epoch 2). The news of b's claim reaches a before the answer to a's claim: a closes the old
    connection, then the answer sets the client's epoch back to 1 and attaches the new
    connection. The client stays connected on a and on b [MQTT-3.1.4-3]: a never writes
    for it (no session kept), so nothing fences it off."""
    a = yield node_a(server)
    b = yield node_b(server)
    try:
        s = yield connect(a, 5, client_id="s", clean_start=clean)
        s.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
        yield a.store.flushed()
        s.received()
        real = a.store.redis.run
        applied: list[Any] = []
        held: Deferred[Any] = Deferred()

        def run(script: Any, *args: Any) -> Any:
            if script is CLAIM:  # applied in Redis now, its answer held back
                real(script, *args).addCallback(applied.append)
                return held
            return real(script, *args)
        a.store.redis.run = run
        again = FakeClient(a, 5)
        again.send(Connect(protocol_level=5, client_id="s", clean_start=clean))
        yield until(lambda: applied, "a's claim applied in Redis")
        a.store.redis.run = real
        on_b = yield connect(b, 5, client_id="s", clean_start=clean)
        yield until(lambda: s.closed, "the news of b's claim at a")
        held.callback(applied[0])
        for _ in range(3):
            yield a.store.flushed()
            yield b.store.flushed()
        assert server.client().hget("mqtt:owner:s", "node") == b"b" and not on_b.closed
        assert again.closed, f"still connected to a as well as to b (a's epochs: {a.store.epochs})"
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_will_published_at_a_bounce_is_not_published_again_when_its_node_dies(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s (will W, delay 0) is on node a; its client connects to b, then back to a before a hears
    of b's claim. a publishes W as it takes s back (once: right). b's claim had left W to a in
    Redis (wills-left:a), and a, which never heard of that claim, never clears it. Later a dies;
    the client connects to b (no will this time) and b adopts a: W is published a second time."""
    clock = Clock()
    clock.advance(1000.0)
    a = yield node_a(server, clock)
    b = yield node_b(server)
    b.clock.advance(1000.0)
    try:
        watcher = yield watching_wills(b)
        yield until(lambda: "wills/#" in a.cluster.forwarding.filters_of("b"), "a to route wills/# to b")
        s = yield connect(a, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600},
                          will=Will(topic="wills/s", payload=b"W", qos=0, retain=False))
        yield a.store.flushed()
        handlers = a.cluster.redis._handlers
        real = handlers[a.store.control.encode()]
        held: list[bytes] = []

        def control(data: bytes) -> None:
            if data.startswith(b"C\0"):
                held.append(data)
            else:
                real(data)
        handlers[a.store.control.encode()] = control  # (b's claim news comes late)
        on_b = yield connect(b, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        yield until(lambda: held, "b's claim news (held)")
        yield connect(a, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        for x in held:
            real(x)
        handlers[a.store.control.encode()] = real
        yield until(lambda: on_b.closed and s.closed, "b and the first connection closed")
        for _ in range(3):
            yield a.store.flushed()
            yield b.store.flushed()
        clock.advance(0)  # (a's QoS 0 messages for other nodes go at the clock's next turn)
        first = yield publishes(watcher, "W, published once as a took s back")
        assert [x.payload for x in first] == [b"W"]
        # a dies (kill -9): it hears and writes nothing more
        handlers[a.store.control.encode()] = lambda data: None
        server.client().delete("mqtt:node:a")
        again = yield connect(b, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        assert again.received()[0].session_present
        yield adopted(server, b, b.clock, "a")
        for _ in range(3):
            yield b.store.flushed()
        more = [x.payload for x in watcher.received() if isinstance(x, Publish)]  # (b's own: sent at once)
        assert more == [], "W was published again"
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_session_that_ran_out_taken_from_a_live_node_publishes_its_will(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """s (expiry 60, will delayed 120) disconnected from a. Its client connects to b just as the
    session runs out, before a's expiry timer ran: b finds it ran out and ends it, and leaves the
    will to a (alive); a, told the session goes on (not a clean start), cancels the delayed will.
    The session ended, yet its will is never published [MQTT-3.1.2-8]."""
    clock = Clock()
    clock.advance(1000.0)
    a = yield node_a(server, clock)
    b = yield node_b(server)
    b.clock.advance(1000.0)
    try:
        watcher = yield watching_wills(a)
        s = yield connect(a, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 60},
                          will=Will(topic="wills/s", payload=b"W", qos=0, retain=False,
                                    properties={"will_delay_interval": 120}))
        yield a.store.flushed()
        s.lose()
        yield a.store.flushed()
        clock.advance(59.99)  # a's expiry timer has not fired yet
        b.clock.advance(60.0)
        moved = yield connect(b, 5, client_id="s", clean_start=False, properties={"session_expiry_interval": 600})
        assert not moved.received()[0].session_present
        yield until(lambda: "s" not in a.store.epochs, "a to let s go")
        for _ in range(3):
            yield a.store.flushed()
            yield b.store.flushed()
        clock.advance(200)
        yield past_a_pause(a, clock)
        b.clock.advance(200)
        got = yield publishes(watcher, "W")
        assert [x.payload for x in got] == [b"W"]
    finally:
        yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_credentials_that_expire_while_the_session_is_claimed_are_refused(
        server: RedisServer, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """A JWT that expires while Redis hands the session over (the claim, up to
    cluster_claim_timeout) was accepted, CONNACK 0, the session's messages sent before the 0xA0
    disconnect: refused with 0x86 as when it expires while a hook decides. The session claimed
    stays here, as if its client had left."""
    import time

    import jwt
    secret = b"an HMAC secret of at least thirty-two bytes"
    (tmp_path / "secret").write_bytes(secret)
    clock = Clock()
    clock.advance(time.time())  # (PyJWT reads the wall clock)
    broker = yield node_a(server, clock, jwt_secret_file=str(tmp_path / "secret"))
    token = jwt.encode({"sub": "alice", "exp": int(clock.seconds()) + 2}, secret, algorithm="HS256").encode()
    session = {"session_expiry_interval": 600}
    first = yield connect(broker, 5, client_id="dev", clean_start=False, username="alice", password=token,
                          properties=session)
    first.send(Disconnect())
    yield broker.store.flushed()
    claim = broker.store.claim
    held: list[tuple[Deferred[Any], Deferred[Any]]] = []

    def slow(*args: Any) -> Deferred[Any]:
        late: Deferred[Any] = Deferred()
        held.append((claim(*args), late))
        return late
    broker.store.claim = slow  # (RedisStore is not compiled)
    try:
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="dev", clean_start=False, username="alice", password=token,
                            properties=session))
        yield until(lambda: held, "the claim")
        clock.advance(3)  # the token's exp passed while Redis answered
        answer = yield held[0][0]
        held[0][1].callback(answer)
        yield until(lambda: client.transport.value(), "the CONNACK")
        [connack] = [p for p in client.received() if isinstance(p, Connack)]
        assert connack.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD, connack
        assert broker.sessions["dev"].connection is None
    finally:
        yield broker.stopService()

# --- what a node reports ---------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_an_inbox_read_to_its_end_after_a_trim_shows_no_unread_entries(server: RedisServer) -> Iterator[Deferred[Any]]:
    """A node fell behind its inbox until cluster_inbox_maxlen trimmed entries it had not read
    (2 of 5 here, trimmed as other nodes wrote: XADD MAXLEN); it then read and handled the other 3.
    Redis's XINFO GROUPS ``lag`` counts entries added minus entries read, trimmed ones included,
    and stayed 2 for good: /cluster/nodes said unread 2, and so did $SYS cluster/inbox/lag,
    mqtt_cluster_inbox_lag and the dashboard."""
    redis = server.client()
    a = yield node_a(server, sys_interval=0)

    def handled() -> bool:
        groups = redis.xinfo_groups("mqtt:inbox:a")
        return groups[0]["pending"] == 0 and groups[0]["last-delivered-id"] == redis.xinfo_stream(
            "mqtt:inbox:a")["last-generated-id"]

    @inlineCallbacks
    def handled_all() -> Any:
        for _ in range(50):  # bounded: the batch that marks them handled (its window is on the clock)
            a.clock.advance(0.05)
            if handled():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"not handled: {redis.xinfo_groups('mqtt:inbox:a')}")
    try:
        redis.xadd("mqtt:inbox:a", {"d": b"", "e": 1})  # one read and handled in time, as ever
        yield handled_all()
        pipe = redis.pipeline(transaction=True)  # (node a reads none of them before the trim)
        for n in range(5):
            pipe.xadd("mqtt:inbox:a", {"d": b"", "e": 1})
        pipe.xtrim("mqtt:inbox:a", maxlen=3, approximate=False)
        pipe.execute()
        yield handled_all()
        nodes = yield a.cluster.store.describe_nodes()
        assert [n["inbox"] for n in nodes if n["id"] == "a"] == [{"length": 3, "unread": 0, "unhandled": 0}]
        lag = InboxLag(a.cluster)  # ($SYS cluster/inbox/lag, mqtt_cluster_inbox_lag, /stats)
        lag.refresh()
        yield until(lambda: lag.value is not None, "Redis's answer")
        assert lag.value == 0
    finally:
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_that_joins_counts_the_live_nodes_it_read(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node b joins a cluster whose node a holds no filter yet: its join read the members
    (load_routes) but kept none of them, so until its first heartbeat b said it was alone:
    cluster/nodes 1, mqtt_cluster_nodes 1, and the log line 'joined ... (0 other nodes)'."""
    from twisted.logger import capturedLogs
    a = yield node_a(server)
    b = None
    try:
        with capturedLogs() as events:
            b = yield node_b(server)
        joined = [e for e in events if e.get("log_format", "").startswith("cluster node {node} joined")]
        assert read(b).cluster.nodes == 2
        assert [e["nodes"] for e in joined] == [1]
    finally:
        if b is not None:
            yield b.stopService()
        yield a.stopService()


@pytest_twisted.inlineCallbacks
def test_a_publisher_adding_past_the_bound_of_what_waits_for_redis_is_read_no_more_until_redis_has_it(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """While Redis takes no write, a client publishing QoS 1 messages without waiting for its
    PUBACKs (which wait for Redis) had them pile up in the node's memory, for another node's
    inbox or the sessions Redis keeps. Past the store's bound, its connection is read no more
    (what was read is handled); once Redis holds what waited, it is read again, and every message
    is acknowledged and kept. A client adding nothing is read on meanwhile."""
    broker = yield node_a(server)
    redis = server.client()
    store = broker.store
    try:
        assert broker.bounded_store is store
        store.max_unwritten_bytes = 10_000
        broker.cluster.forwarding.add_route("b", "t")
        publisher = yield connect(broker, client_id="p")
        other = yield connect(broker, client_id="other")
        publisher.received()
        other.received()
        yield store.flushed()
        redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        try:
            publisher.send(Publish(topic="t", payload=b"first", qos=1, packet_id=1))
            yield until(lambda: store._in_flight, "the batch on its way")  # (held by Redis)
            publisher.send(*(Publish(topic="t", payload=b"x" * 1000, qos=1, packet_id=i) for i in range(2, 6)))
            assert publisher.transport.producerState == "producing"
            publisher.send(*(Publish(topic="t", payload=b"x" * 1000, qos=1, packet_id=i) for i in range(6, 12)))
            assert publisher.transport.producerState == "paused"
            assert store.unwritten_bytes > store.max_unwritten_bytes
            other.send(Pingreq())
            assert other.received() == [Pingresp()] and other.transport.producerState == "producing"
            assert publisher.received() == []
        finally:
            redis.execute_command("CLIENT", "UNPAUSE")
        yield until(lambda: publisher.transport.producerState == "producing", "the publisher read again")
        assert [(type(a), a.packet_id) for a in publisher.received()] == [(Puback, i) for i in range(1, 12)]
        assert store.unwritten_bytes == 0
        payloads = [message.payload for _, fields in redis.xrange("mqtt:inbox:b")
                    for _, message, _ in unpack_records(fields[b"d"])]
        assert payloads == [b"first"] + [b"x" * 1000] * 10
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_qos0_messages_for_other_nodes_past_the_bound_of_what_waits_for_redis_are_dropped(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """While Redis answers nothing and its connection stays up (a hung host, a network black hole)
    or answers slower than a QoS 0 publisher, every QoS 0 message for another node was written
    to the connection all the same, its PUBLISH and the Deferred of its answer held in the node's
    memory without bound. Past the store's bound of what waits for Redis, they are dropped; those
    within it go through once Redis answers, and so do those published after."""
    broker = yield node_a(server)
    redis = server.client()
    channel = redis.pubsub()
    channel.subscribe(broker.store.qos0_channel("b"))
    try:
        broker.store.max_unwritten_bytes = 10_000
        broker.cluster.forwarding.add_route("b", "t")
        publisher = yield connect(broker, client_id="p")
        redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        try:
            for n in range(20):
                publisher.send(Publish(topic="t", payload=b"%02d" % n + b"x" * 1000, qos=0))
                broker.clock.advance(0)  # (one write each: QoS 0 records go at the end of the turn)
        finally:
            redis.execute_command("CLIENT", "UNPAUSE")
        yield broker.store.locate("nobody")  # (answered in order: the PUBLISHes' answers came before)
        publisher.send(Publish(topic="t", payload=b"after", qos=0))
        broker.clock.advance(0)
        payloads: list[bytes] = []
        for _ in range(100):  # bounded: each wait is too
            event = channel.get_message(ignore_subscribe_messages=True, timeout=5.0)
            if event is not None:
                payloads += [message.payload for _, message, _ in unpack_records(event["data"])]
                if payloads[-1] == b"after":
                    break
        *kept, after = payloads
        assert after == b"after"
        assert 0 < len(kept) < 10 and kept == [b"%02d" % n + b"x" * 1000 for n in range(len(kept))]
    finally:
        channel.close()
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_the_claim_of_a_connect_refused_while_redis_was_out_of_reach_is_never_sent() -> Iterator[Deferred[Any]]:
    """c, whose session node b holds, connects to node a while a cannot reach Redis: refused
    after cluster_claim_timeout, it goes back to b. Its claim on a waited for Redis all the same,
    and was sent once a reached it again: it took the session from c's connection on b (0x8E
    there). Not yet sent when its client is refused, it is withdrawn."""
    from mqtt_broker.cluster.node import LEAVE_TIMEOUT
    redis = RedisServer()
    clock = Clock()
    link = Redis(RedisAddress.parse(redis.url))
    b = RedisStore(link, "b", reactor)
    try:
        broker = yield node_a(redis, clock)
        yield b.register(600_000)
        yield holds(b, "c", expiry=3600)
        redis.stop()
        yield until(lambda: broker.cluster.unready() is not None, "a to find Redis gone")
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 3600}))
        clock.advance(broker.config.cluster_claim_timeout)
        assert [p.reason_code for p in client.received()] == [ReasonCode.SERVER_UNAVAILABLE] and client.closed
        redis.start()
        for _ in range(5):  # bounded: reconnecting backs off up to 2 s
            if broker.cluster.redis.up:
                break
            yield deferLater(reactor, 1.0, lambda: None)
        owner = yield broker.store.locate("c")  # (answered after what waited for the connection)
        assert owner is not None and owner["node"] == "b"
        assert "c" not in broker.sessions and not broker.cluster.claiming("c")
        stopped = broker.stopService()
        clock.advance(LEAVE_TIMEOUT)
        yield until(lambda: stopped.called, "the stop")
    finally:
        yield link.close()
        redis.close()


@pytest_twisted.inlineCallbacks
def test_entries_of_a_dead_nodes_inbox_trimmed_before_they_were_handled_are_told(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Node x's inbox kept its last cluster_inbox_maxlen entries while x was dead and not yet
    taken for dead: the entries it had been given and not handled, and those written since, that
    were trimmed went without a word (Redis told of the first, XAUTOCLAIM's deleted ids, and
    counts the second with the unread, for good). The survivor tells how many, once."""
    clock, broker = yield a_at_1000(server)
    redis = server.client()
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        yield x.register(600_000)
        yield x.create_inbox()
        for _ in range(3):
            redis.xadd("mqtt:inbox:x", {"d": b"", "e": 1})
        redis.xreadgroup("nodes", "x", {"mqtt:inbox:x": ">"})  # given to x, which dies before it handles them
        pipe = redis.pipeline(transaction=True)
        for _ in range(5):
            pipe.xadd("mqtt:inbox:x", {"d": b"", "e": 1})
        pipe.xtrim("mqtt:inbox:x", maxlen=3, approximate=False)  # (3 given and 2 never given go)
        pipe.execute()
        redis.delete("mqtt:node:x")
        with capturedLogs() as events:
            yield adopted(server, broker, clock, "x")
        assert [e["count"] for e in events if "trimmed" in e.get("log_format", "")] == [5]
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_dead_nodes_inbox_that_was_written_to_and_never_read_is_adopted_to_its_end(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """Other nodes wrote to node x's inbox before x made its group (or after it was dropped): the
    inbox has no group to count the entries trimmed unread with, and its adoption goes on."""
    clock, broker = yield a_at_1000(server)
    redis = server.client()
    link = Redis(RedisAddress.parse(server.url))
    x = RedisStore(link, "x", reactor)
    try:
        yield x.register(600_000)
        redis.xadd("mqtt:inbox:x", {"d": b"", "e": 1})
        redis.delete("mqtt:node:x")
        with capturedLogs() as events:
            yield adopted(server, broker, clock, "x")
        assert not [e for e in events if e.get("log_failure")] and not redis.exists("mqtt:inbox:x")  # (dropped)
    finally:
        yield broker.stopService()
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_claim_goes_to_redis_once_the_changes_before_it_are_written_not_those_recorded_since() -> Iterator[
        Deferred[Any]]:
    """c, whose session node b holds, connects to node a while a batch of a's is on its way to
    Redis, and a records more changes meanwhile. The claim went once that batch was written, and
    then waited for the next as well: Redis lost under it, the client was refused at
    cluster_claim_timeout with its claim held, not withdrawn (no longer waiting for Redis), and
    sent once the batch was written, minutes later perhaps, taking the session from c's
    connection on b (0x8E there). It goes once what was recorded before it is written."""
    redis = RedisServer()
    clock = Clock()
    link = Redis(RedisAddress.parse(redis.url))
    b = RedisStore(link, "b", reactor)
    try:
        broker = yield node_a(redis, clock)
        yield b.register(600_000)
        yield holds(b, "c", expiry=3600)
        store = broker.store
        before: Deferred[None] = Deferred()  # the batch on its way when c connects
        since: Deferred[None] = Deferred()  # the next, which Redis, lost under it, does not answer
        real_flushed = store.flushed
        store.flushed = lambda: since if before.called else before  # type: ignore[method-assign]
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c", clean_start=False,
                            properties={"session_expiry_interval": 3600}))
        before.callback(None)
        yield until(lambda: client.transport.value() or client.closed, "the claim's answer")
        assert [p.reason_code for p in client.received()] == [ReasonCode.SUCCESS] and not client.closed
        clock.advance(broker.config.cluster_claim_timeout)
        assert not client.closed
        store.flushed = real_flushed  # type: ignore[method-assign]
        since.callback(None)
        owner = yield store.locate("c")
        assert owner is not None and owner["node"] == "a"
        yield broker.stopService()
    finally:
        yield link.close()
        redis.close()


@inlineCallbacks
def bridged_nodes(server: RedisServer, remote_port: int, **settings: Any) -> Any:
    """Nodes a and b, each with the same [[bridge]] table (to the remote on ``remote_port``,
    ``q/#`` out, and ``settings``): (a, b, a's clock), once both joined."""
    bridge = {"connection": "up", "addresses": [f"127.0.0.1:{remote_port}"], "remote_clientid": "edge",
              "restart_timeout": 5, "topic": ["q/# out 1"], **settings}
    clock = Clock()
    a = yield node_a(server, clock, bridge=[bridge])
    b = BrokerService(endpoints=[], reactor=reactor, clock=Clock(), cluster=server.url, cluster_node_id="b",
                      close_linger=0, bridge=[bridge])
    b.startService()
    yield b.cluster.ready
    return a, b, clock


@inlineCallbacks
def crossed(there: FakeClient, node: BrokerService, what: str) -> Any:
    """The PUBLISH a client of the remote is sent through the bridge running on ``node``, whose
    in-memory link to the bridge is on the node's clock, turned as it waits."""
    got: list[Publish] = []
    yield until(lambda: node.clock.advance(0) or got.extend(p for p in there.received() if isinstance(p, Publish))
                or got, what)
    return got


@pytest_twisted.inlineCallbacks
def test_a_bridge_runs_on_one_node_of_a_cluster_and_moves_to_another_when_that_node_stops(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    # Every node ran every [[bridge]]: the nodes took the bridge's sessions from each other,
    # here and at the remote, and what crossed did so once per node.
    remote = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, clock=Clock(), close_linger=0)
    remote.startService()
    there = FakeClient(remote, 5)
    there.connect("there")
    there.subscribe("q/#", qos=1)
    there.received()
    a, b, _ = yield bridged_nodes(server, remote.ports[0].getHost().port)
    try:
        on_a, on_b = a.bridges.get("up"), b.bridges.get("up")
        # (The bridge's link to its node is in memory, on the node's clock: turned as it waits.)
        yield until(lambda: a.clock.advance(0) or on_a.state == "connected",
                    "the bridge to come up on node a, which joined first")
        yield b.cluster.leases.renew()  # (a heartbeat of b: the lease is a's)
        assert (on_b.running, server.client().get("mqtt:lease:bridge:up")) == (False, b"a")
        yield until(lambda: b.cluster.forwarding.routes.match("q/t")[0], "node b to learn the bridge's route")
        publisher = yield connect(b, 5, client_id="publisher")
        publisher.received()
        publisher.send(Publish(topic="q/t", payload=b"from b", qos=1, packet_id=1))
        got = yield crossed(there, a, "the message at the remote")
        yield a.stopService()  # (it gives the lease up: b takes it at its next heartbeat)
        yield b.cluster.leases.renew()
        yield until(lambda: b.clock.advance(0) or on_b.state == "connected", "the bridge to come up on node b")
        # The session here moved with it: the remote's goes on (a clean start would drop what
        # that session had of their exchanges, and what it queued for the bridge).
        assert not on_b.remote.connect.clean_start
        publisher.send(Publish(topic="q/t", payload=b"after the move", qos=1, packet_id=2))
        got += yield crossed(there, b, "the second message at the remote")
        assert [p.payload for p in got] == [b"from b", b"after the move"]
        assert len(remote.connections) == 2  # (there, and b's bridge: a's went)
    finally:
        yield b.stopService()
        yield remote.stopService()


@pytest_twisted.inlineCallbacks
def test_a_bridge_whose_session_could_not_be_claimed_claims_it_again_before_it_reaches_the_remote(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deferred[Any]]:
    """The node that takes the bridge over claims its session first; a claim Redis did not
    answer in time left the session unknown here, and the bridge went on to the remote as with
    a new one: it started the remote's anew, dropping what that session had of their exchanges
    and what it queued for the bridge. It claims the session again after its back-off."""
    remote = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, clock=Clock(), close_linger=0)
    remote.startService()
    a, b, _ = yield bridged_nodes(server, remote.ports[0].getHost().port)
    try:
        on_a, on_b = a.bridges.get("up"), b.bridges.get("up")
        yield until(lambda: a.clock.advance(0) or on_a.state == "connected", "the bridge to come up on node a")
        claim, unanswered = b.cluster.claim, []

        def claim_once_unanswered(client_id: str, clean_start: bool) -> Deferred[bool]:
            if client_id == on_b.config.local_client_id and not unanswered:
                unanswered.append(client_id)
                return succeed(False)
            return claim(client_id, clean_start)
        monkeypatch.setattr(b.cluster, "claim", claim_once_unanswered)
        yield a.stopService()
        connects = remote.stats.connects
        yield b.cluster.leases.renew()
        yield until(lambda: b.clock.advance(0) or on_b.state == "waiting", "the bridge on b to wait after the claim")
        assert (unanswered, on_b.remote, on_b._connecting) == (["local.edge"], None, None)
        b.clock.advance(on_b.config.restart_timeout[1])
        yield until(lambda: b.clock.advance(0) or on_b.state == "connected", "the bridge to come up on node b")
        # One CONNECT, resuming the remote's session (a clean start is two more with MQTT 3.1.1).
        assert (remote.stats.connects - connects, on_b.remote.connect.clean_start) == (1, False)
    finally:
        yield b.stopService()
        yield remote.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_that_cannot_renew_its_bridges_lease_stops_the_bridge_before_the_lease_expires(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    a, b, clock = yield bridged_nodes(server, 1)  # (port 1: the bridge tries, and waits to try again)
    try:
        on_a = a.bridges.get("up")
        yield until(lambda: on_a.running, "node a, which joined first, to start the bridge")
        renewed = clock.seconds()
        yield a.cluster.leases.renew()
        a.cluster.survivor.stop()  # it beats no more, as a node cut off from Redis
        clock.advance(a.cluster.survivor.ttl_ms / 1000 - 0.01 - (clock.seconds() - renewed))
        assert on_a.running
        state = "$SYS/broker/connection/edge/state"
        assert a.retained.get(state) is not None  # ("0": a's bridge is not connected)
        clock.advance(0.01)
        assert not on_a.running
        # (Each node's own topic: a's "0" would tell its clients the bridge is down for good,
        # once b runs it.)
        assert a.retained.get(state) is None
        server.client().delete("mqtt:lease:bridge:up")  # its TTL in Redis ran out too, after a's
        yield b.cluster.leases.renew()
        assert b.bridges.get("up").running
        yield a.cluster.leases.renew()  # (back, a finds it held by b: it runs it no more)
        assert not on_a.running and server.client().get("mqtt:lease:bridge:up") == b"b"
    finally:
        yield a.stopService()
        yield b.stopService()


@pytest_twisted.inlineCallbacks
def test_the_0_a_node_cut_off_from_redis_published_as_its_lease_ran_out_does_not_replace_the_next_holders_state(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    # Node a, cut off, stops the bridge and publishes "0" (retained, cluster-wide), which waits
    # for Redis while b takes the lease and publishes "1": written once a is back, it told every
    # node's clients the bridge was down while b ran it.
    remote = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, clock=Clock(), close_linger=0)
    remote.startService()
    state = "bridges/up/state"
    a, b, clock = yield bridged_nodes(server, remote.ports[0].getHost().port, notification_topic=state)
    try:
        on_a, on_b = a.bridges.get("up"), b.bridges.get("up")
        yield until(lambda: a.clock.advance(0) or on_a.state == "connected", "the bridge to come up on node a")
        yield until(lambda: getattr(b.retained.get(state), "payload", None) == b"1", "node b to be told 1")
        a.cluster.survivor.stop()  # cut off: it beats no more, and its batches wait
        store = a.cluster.store
        held: list[Any] = []
        real_send = store._send
        store._send = held.append  # type: ignore[method-assign]
        clock.advance(a.cluster.survivor.ttl_ms / 1000)
        assert not on_a.running and a.retained.get(state).payload == b"0"  # type: ignore[union-attr]
        server.client().delete("mqtt:lease:bridge:up")  # its TTL in Redis ran out too, after a's
        yield b.cluster.leases.renew()
        yield until(lambda: b.clock.advance(0) or on_b.state == "connected", "the bridge to come up on node b")
        yield b.cluster.store.flushed()
        store._send = real_send  # type: ignore[method-assign]
        for batch in held:  # back: what waited is written
            real_send(batch)
        yield store.flushed()
        assert unpack_retained(server.client().hget("mqtt:retained", state), 0).payload == b"1"
        yield until(lambda: getattr(a.retained.get(state), "payload", None) == b"1", "node a to be told b's 1")
        yield a.publish("after", b"x", retain=True)  # (its event comes after those of a's batch)
        yield until(lambda: b.retained.get("after") is not None, "node b to hear of a's batch")
        assert b.retained.get(state).payload == b"1"  # type: ignore[union-attr]
    finally:
        yield a.stopService()
        yield b.stopService()
        yield remote.stopService()

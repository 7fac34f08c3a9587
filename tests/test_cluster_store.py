"""The cluster's store against a real Redis: claims and their fencing epochs (a stale owner
cannot write), what a claim hands over, batches applied once, adoption, and the records of the
inboxes. Two RedisStores stand for two nodes."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from mqtt_broker.cluster.address import RedisAddress
from mqtt_broker.cluster.codec import (
    TARGETED, pack_queued, pack_retained, pack_will, targeted_head, unpack_records, unpack_retained, unpack_will,
)
from mqtt_broker.cluster.redis import Redis
from mqtt_broker.cluster.store import ACK_DELAY, RETRY_AFTER, RedisStore, _Batch
import mqtt_broker.cluster.store as store_module
from mqtt_broker.message import Message
from mqtt_broker.session import Queued, Session
from mqtt_broker.topics import Subscription

from redis_helpers import RedisServer


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def nodes(server: RedisServer) -> Iterator[tuple[RedisStore, RedisStore]]:
    server.client().flushall()
    links = [Redis(RedisAddress.parse(server.url)) for _ in range(2)]
    stores = (RedisStore(links[0], "a", reactor), RedisStore(links[1], "b", reactor))
    yield stores
    for link in links:
        pytest_twisted.blockon(link.close())


def fenced_calls(store: RedisStore) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    store.on_fenced = lambda client_id, epoch: calls.append((client_id, epoch))
    return calls


def item(payload: bytes, seq: int, qos: int = 1) -> Queued:
    return Queued(Message(topic="t", payload=payload, qos=qos), qos, False, (), None, seq)


@inlineCallbacks
def until(condition: Any, what: str, polls: int = 500) -> Any:
    """Wait (bounded: ``polls`` of 10 ms) for Redis's answers to arrive."""
    for _ in range(polls):
        if condition():
            return
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.inlineCallbacks
def test_a_claim_fences_off_the_previous_owner(nodes: tuple[RedisStore, RedisStore],
                                              server: RedisServer) -> Iterator[Deferred[Any]]:
    a, b = nodes
    refused = fenced_calls(a)
    first = yield a.claim("c", False, 0)
    assert first.previous is None and first.session is None
    session = Session("c", 60)
    a.save_session(session, None)
    a.save_subscription("c", Subscription(client_id="c", topic_filter="x/#", qos=1))
    yield a.flushed()
    second = yield b.claim("c", False, 0)
    assert second.epoch > first.epoch and second.previous == "a" and not second.current
    assert second.session is not None and list(second.session.subscriptions) == ["x/#"]
    # a's writes after the claim: refused inside Redis, whatever a believes.
    a.save_subscription("c", Subscription(client_id="c", topic_filter="stale/#", qos=1))
    a.add_delivery("c", item(b"for c", 1), None)
    yield a.flushed()
    assert refused == [("c", first.epoch)]
    redis = server.client()
    assert redis.hkeys("mqtt:subs:c") == [b"x/#"]
    assert redis.hgetall("mqtt:deliv:c") == {}
    # The message a queued for c went to c's new owner instead, as a record for c alone.
    (entry,) = redis.xrange("mqtt:inbox:b")
    ((kind, client_id, queued),) = list(unpack_records(entry[1][b"d"]))
    assert (kind, client_id, queued.message.payload) == (TARGETED, "c", b"for c")
    # b, the owner, writes.
    b.save_subscription("c", Subscription(client_id="c", topic_filter="y", qos=2))
    yield b.flushed()
    assert sorted(redis.hkeys("mqtt:subs:c")) == [b"x/#", b"y"]


@pytest_twisted.inlineCallbacks
def test_a_message_the_previous_owner_queued_does_not_reach_a_session_begun_anew(
        nodes: tuple[RedisStore, RedisStore], server: RedisServer) -> Iterator[Deferred[Any]]:
    """After a clean start on b, what a queued for the session before is dropped, not passed on
    to b as for a session that goes on (where it reached the new session)."""
    a, b = nodes
    refused = fenced_calls(a)
    first = yield a.claim("c", False, 0)
    a.save_session(Session("c", 60), None)
    yield a.flushed()
    yield b.claim("c", True, 0)
    a.add_delivery("c", item(b"for the old session", 1), None)
    yield a.flushed()
    assert refused == [("c", first.epoch)]
    redis = server.client()
    assert redis.xrange("mqtt:inbox:b") == [] and redis.hgetall("mqtt:deliv:c") == {}
    # Claimed again without a clean start, the session goes on: b's late message reaches it.
    b.save_session(Session("c", 60), None)
    yield b.flushed()
    yield a.claim("c", False, 0)
    b.add_delivery("c", item(b"for the session", 1), None)
    yield b.flushed()
    (entry,) = redis.xrange("mqtt:inbox:a")
    ((kind, client_id, queued),) = list(unpack_records(entry[1][b"d"]))
    assert (kind, client_id, queued.message.payload) == (TARGETED, "c", b"for the session")
    # Begun anew by the node that holds it already (its epoch unchanged): dropped all the same.
    redis.delete("mqtt:inbox:a")
    yield b.claim("c", False, 0)
    yield a.claim("c", False, 0)
    yield a.claim("c", True, 0)
    b.add_delivery("c", item(b"for the old session again", 2), None)
    yield b.flushed()
    assert redis.xrange("mqtt:inbox:a") == []


@pytest_twisted.inlineCallbacks
def test_a_message_passed_on_from_before_a_clean_start_does_not_reach_the_new_session(
        nodes: tuple[RedisStore, RedisStore], server: RedisServer) -> Iterator[Deferred[Any]]:
    """A node that no longer holds a session passes a message for it on with the stamp of the
    inbox entry it came in (the epochs counter when the entry was made): one from before the
    session was begun anew is dropped; one from after, or without a stamp, goes to the owner,
    in an entry stamped in its turn."""
    a, b = nodes
    redis = server.client()
    yield a.claim("c", False, 0)
    claim = yield b.claim("c", True, 0)
    since = int(redis.hget("mqtt:owner:c", "since_stamp"))
    assert since == claim.since_stamp == claim.epoch == b.since_stamps["c"]
    a.send_on("c", item(b"from before", 1), since - 1)
    yield a.flushed()
    assert redis.xrange("mqtt:inbox:b") == []
    a.send_on("c", item(b"from after", 2), since)
    a.send_on("c", item(b"without a stamp", 3), 0)
    yield a.flushed()
    entries = redis.xrange("mqtt:inbox:b")
    assert [queued.message.payload for _, fields in entries for _, _, queued in unpack_records(fields[b"d"])] == [
        b"from after", b"without a stamp"]
    assert {int(fields[b"e"]) for _, fields in entries} == {int(redis.get("mqtt:epochs"))}
    # Begun anew again by the node that holds it (its epoch unchanged, its writes going on): a
    # new stamp all the same.
    again = yield b.claim("c", True, 0)
    assert again.epoch == claim.epoch and again.since_stamp > since
    a.send_on("c", item(b"from before again", 4), since)
    yield a.flushed()
    assert len(redis.xrange("mqtt:inbox:b")) == 2
    # Claimed again without a clean start, the session keeps it; what b queued after its clean
    # start, at the epoch it held the session at, goes to a.
    goes_on = yield a.claim("c", False, 0)
    assert goes_on.since_stamp == again.since_stamp == a.since_stamps["c"]
    b.add_delivery("c", item(b"queued by b after its clean start", 5), None)
    yield b.flushed()
    ((_, fields),) = redis.xrange("mqtt:inbox:a")
    assert [queued.message.payload for _, _, queued in unpack_records(fields[b"d"])] == [
        b"queued by b after its clean start"]


@pytest_twisted.inlineCallbacks
def test_a_message_queued_in_the_copy_of_a_session_that_moved_goes_to_its_owner(
        nodes: tuple[RedisStore, RedisStore], server: RedisServer) -> Iterator[Deferred[Any]]:
    """A node keeps its copy of a session that moved (not begun anew) until the routes settle:
    what it queues there meanwhile, at the epoch it gave up, goes to the new owner (whatever
    the session's sequence numbers are); once the session is begun anew, it does not, but for
    a shared subscription's message, which goes to the member it was given to."""
    a, b = nodes
    redis = server.client()
    redis.set("mqtt:epochs", 100)
    yield a.claim("c", True, 0)  # since 101
    yield b.claim("c", False, 0)
    a.lost("c")
    a.add_delivery("c", item(b"routed to the copy", 5), None)
    yield a.flushed()
    (entry,) = redis.xrange("mqtt:inbox:b")
    ((kind, client_id, queued),) = list(unpack_records(entry[1][b"d"]))
    assert (kind, client_id, queued.message.payload) == (TARGETED, "c", b"routed to the copy")
    yield b.claim("c", True, 0)  # begun anew where it is held: since 102
    a.add_delivery("c", item(b"for its earlier life", 6), None)
    shared = item(b"shared", 7)
    shared.share = ("g", "$share/g/t")  # (dropped, the group would not have it)
    a.add_delivery("c", shared, None)
    yield a.flushed()
    payloads = [queued.message.payload for _, fields in redis.xrange("mqtt:inbox:b")
                for _, _, queued in unpack_records(fields[b"d"])]
    assert payloads == [b"routed to the copy", b"shared"]
    a.forgotten("c")  # the copy gone: nothing is kept of it
    assert a.epoch_of("c") == 0


@pytest_twisted.inlineCallbacks
def test_the_same_node_claiming_again_keeps_its_epoch(nodes: tuple[RedisStore, RedisStore]) -> Iterator[Deferred[Any]]:
    """A client reconnecting to the node that holds its session: that node's pending writes
    stay valid (the epoch does not change) and nothing is loaded (its copy is current)."""
    a, _ = nodes
    refused = fenced_calls(a)
    first = yield a.claim("c", False, 0)
    a.save_session(Session("c", 60), None)
    again = yield a.claim("c", False, 0)
    assert again.epoch == first.epoch and again.current and again.session is None
    a.save_subscription("c", Subscription(client_id="c", topic_filter="z", qos=0))
    yield a.flushed()
    assert refused == []


@pytest_twisted.inlineCallbacks
def test_a_claim_hands_over_the_whole_session(nodes: tuple[RedisStore, RedisStore]) -> Iterator[Deferred[Any]]:
    a, b = nodes
    yield a.claim("c", False, 0)
    session = Session("c", 3600)
    session.next_seq = 5
    a.save_session(session, 123.5)
    a.add_delivery("c", item(b"in flight", 2), 7)
    a.add_delivery("c", item(b"released", 3, qos=2), 8)
    a.update_delivery("c", 3, 8, True)
    for seq in (4, 5, 6):
        a.add_delivery("c", item(b"queued %d" % seq, seq), None)
    a.add_pubrel("c", 42)
    yield a.flushed()
    claim = yield b.claim("c", False, 2)  # two queued messages read now, the rest later
    s = claim.session
    assert s is not None and s.expiry == 3600 and claim.disconnected_at == 123.5 and s.stored
    assert {pid: (out.message.payload, out.released) for pid, out in s.outgoing.items()} == {
        7: (b"in flight", False), 8: (b"released", True)}
    assert [i.message.payload for i in s.queue] == [b"queued 4", b"queued 5"]
    assert s.spilled == 1 and s.loaded_seq == 5 and s.awaiting_pubrel == {42}
    assert s.next_seq == 7  # past every seq in use
    later = yield b.load_queued("c", s.loaded_seq, 10)
    assert [(i.seq, i.message.payload) for i in later] == [(6, b"queued 6")]
    first = yield b.load_queued("c", 0, 10, 1)  # (under max_bytes: the first, whatever its size)
    assert [i.seq for i in first] == [4]


@pytest_twisted.inlineCallbacks
def test_drop_expired_deletes_only_queued_messages_past_the_window_that_expired(
        nodes: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch) -> Iterator[Deferred[Any]]:
    a, b = nodes
    monkeypatch.setattr(store_module, "SWEEP_PAGE", 2)  # (several pages)
    yield a.claim("c", False, 0)
    a.save_session(Session("c", 3600), 1.0)

    def expiring(payload: bytes, seq: int, expires_at: float | None) -> Queued:
        return Queued(Message(topic="t", payload=payload, qos=1, expires_at=expires_at), 1, False, (), None, seq)
    a.add_delivery("c", expiring(b"in flight", 1, 5.0), 3)
    a.add_delivery("c", expiring(b"in memory", 2, 5.0), None)
    for seq, expires_at in [(3, 5.0), (4, None), (5, 10.0), (6, 4.0), (7, 5.5)]:
        a.add_delivery("c", expiring(b"%d" % seq, seq, expires_at), None)
    yield b.claim("other", False, 0)
    b.save_session(Session("other", 3600), 1.0)
    b.add_delivery("other", expiring(b"o", 1, 1.0), None)
    yield b.flushed()
    dropped = yield a.drop_expired("c", 2, 5.0)  # (recorded, not yet written: included)
    assert dropped == 2
    rest = yield a.load_queued("c", 0, 10)
    assert [q.seq for q in rest] == [2, 4, 5, 7]
    claim = yield b.claim("c", False, 10)
    assert claim.session is not None and list(claim.session.outgoing) == [3]
    assert [q.seq for q in claim.session.queue] == [2, 4, 5, 7]
    others = yield b.load_queued("other", 0, 10)
    assert [q.seq for q in others] == [1]


@pytest_twisted.inlineCallbacks
def test_clean_start_empties_the_session_and_the_will_goes_with_the_claim(
        nodes: tuple[RedisStore, RedisStore], server: RedisServer) -> Iterator[Deferred[Any]]:
    a, b = nodes
    yield a.claim("c", False, 0)
    a.save_session(Session("c", 60), None)
    a.arm_will("c", "user", Message(topic="will/c", payload=b"gone", qos=1), 0)
    yield a.flushed()
    redis = server.client()
    redis.set("mqtt:node:a", "a")  # a is alive: its own connection's will is its own to publish
    claim = yield b.claim("c", True, 0)
    assert claim.previous == "a" and claim.previous_alive and claim.session is None
    # It leaves Redis with the claim, which returns it: a, alive, publishes it (its delay is 0);
    # a claimant keeps a delayed will of a live owner only if its own connection went.
    assert unpack_will(claim.will)[0].payload == b"gone"
    assert redis.hget("mqtt:session:c", "will") is None and not redis.exists("mqtt:session:c")
    # a dead owner: the will comes with the claim, once.
    yield b.flushed()
    b.save_session(Session("c", 60), None)
    b.arm_will("c", None, Message(topic="will/c", payload=b"dead", qos=0), 5)
    yield b.flushed()
    claim = yield a.claim("c", False, 0)
    assert claim.previous == "b" and not claim.previous_alive
    message, username, delay, due = unpack_will(claim.will)
    assert (message.topic, message.payload, username, delay, due) == ("will/c", b"dead", None, 5, None)
    again = yield b.claim("c", False, 0)
    assert again.will is None  # handed over once


@pytest_twisted.inlineCallbacks
def test_adoption_needs_the_dead_node_to_hold_the_session(
        nodes: tuple[RedisStore, RedisStore]) -> Iterator[Deferred[Any]]:
    a, b = nodes
    yield a.claim("c", False, 0)
    adopted = yield b.claim("c", False, 0, required="x")
    assert adopted is None
    adopted = yield b.claim("c", False, 0, required="a")
    assert adopted is not None and adopted.previous == "a"
    twice = yield a.claim("c", False, 0, required="a")  # another survivor, too late
    assert twice is None


@pytest_twisted.inlineCallbacks
def test_a_batch_whose_answer_was_lost_is_not_applied_twice(
        nodes: tuple[RedisStore, RedisStore], server: RedisServer) -> Iterator[Deferred[Any]]:
    a, _ = nodes
    a.forward("b", b"an entry")
    yield a.flushed()
    assert server.client().xlen("mqtt:inbox:b") == 1
    number = int(server.client().get("mqtt:applied:a").decode().rpartition(":")[2])
    # As if the connection had dropped before the answers of that batch and the next: the
    # store asks Redis which was applied before writing again the one that was not.
    done: Deferred[None] = Deferred()
    unapplied: Deferred[None] = Deferred()
    lost = [_Batch(number, ["X", "b", b"an entry"], [done]), _Batch(number + 1, ["X", "b", b"second"], [unapplied])]
    a._in_flight.extend(lost)
    a._batches = number + 1
    a._not_written(Failure(ConnectionError("Lost connection")), lost[0])
    a._not_written(Failure(ConnectionError("Lost connection")), lost[1])
    yield done
    yield unapplied
    assert server.client().xlen("mqtt:inbox:b") == 2
    assert [fields[b"d"] for _, fields in server.client().xrange("mqtt:inbox:b")] == [b"an entry", b"second"]


@pytest_twisted.inlineCallbacks
def test_commands_keep_their_order_through_a_reconnection(server: RedisServer) -> Iterator[Deferred[Any]]:
    """While its connection is up a command goes straight to it; while Redis is away it waits in
    txredisapi's handler, and is sent before any given once the link is back."""
    redis = server.client()
    redis.delete("order")
    link = Redis(RedisAddress.parse(server.url))
    handler = link.commands.handler
    waited: list[tuple[Any, ...]] = []

    class Watched:
        def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            waited.append(args)
            return handler.execute_command(*args, **kwargs)  # type: ignore[no-any-return]

    try:
        yield link.call("PING")  # connected
        link.commands.handler = Watched()
        yield link.call("RPUSH", "order", "1")
        first = link.commands.pool[0]
        gone = first.whenDisconnected()
        first.transport.abortConnection()
        yield gone
        away = [link.call("RPUSH", "order", n) for n in ("2", "3")]
        back = yield away[0]
        assert back == 2
        yield away[1]
        yield link.call("RPUSH", "order", "4")
        assert redis.lrange("order", 0, -1) == [b"1", b"2", b"3", b"4"]
        assert waited == [("RPUSH", "order", "2"), ("RPUSH", "order", "3")]
        assert link.commands.pool[0] is not first
    finally:
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_a_command_is_on_the_socket_when_the_call_returns(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Not kept for the reactor's next turn: Redis has it while the reactor is held here."""
    redis = server.client()
    redis.delete("sent")
    link = Redis(RedisAddress.parse(server.url))
    try:
        yield link.call("PING")  # connected
        answer = link.call("RPUSH", "sent", "x")
        try:
            assert redis.blpop(["sent"], timeout=5) == (b"sent", b"x")  # blocks the reactor meanwhile
        finally:
            yield answer  # (before the link closes: cut under it, its failure went unhandled)
    finally:
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_marks_of_handled_entries_wait_for_a_batch_or_their_delay(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Marking an inbox entry handled sends nothing by itself until ACK_DELAY has passed; it
    goes with the next batch cut for another reason, and with whatever ``flushed()`` waits for."""
    server.client().flushall()
    clock = Clock()
    link = Redis(RedisAddress.parse(server.url))
    store = RedisStore(link, "b", clock)
    redis = server.client()

    def pending() -> int:
        return int(redis.xpending("mqtt:inbox:b", "nodes")["pending"])

    def give(payload: bytes) -> Deferred[Any]:
        redis.xadd("mqtt:inbox:b", {"d": payload, "e": 1})
        return store.read_inbox(">")

    def written(d: Deferred[Any]) -> Deferred[Any]:
        clock.advance(0)  # the batch is cut on the next turn of the (here, injected) clock
        return d

    try:
        yield store.create_inbox()
        ((first, _, _),) = yield give(b"1")
        store.handled(first)
        clock.advance(ACK_DELAY / 2)
        yield link.call("PING")  # after any batch sent so far, on the same connection
        assert pending() == 1
        clock.advance(ACK_DELAY / 2)  # due: the mark goes alone
        yield written(store.flushed())
        assert pending() == 0

        ((second, _, _),) = yield give(b"2")
        store.handled(second)
        store.route("x/#", True)  # another change: the mark rides in its batch at once
        yield written(store.flushed())
        assert pending() == 0 and redis.hkeys("mqtt:routes:b") == [b"x/#"]

        ((third, _, _),) = yield give(b"3")
        store.handled(third)
        yield written(store.flushed())  # flushed() means every mark so far is written
        assert pending() == 0
        clock.advance(ACK_DELAY)
        assert not clock.getDelayedCalls()
    finally:
        yield link.close()


@pytest_twisted.inlineCallbacks
def test_epochs_only_grow_whatever_happens_to_a_session(
        nodes: tuple[RedisStore, RedisStore]) -> Iterator[Deferred[Any]]:
    a, b = nodes
    epochs = []
    for store in (a, b, a):
        claim = yield store.claim("c", True, 0)
        epochs.append(claim.epoch)
        store.delete_session("c")
        store.give_up("c")
        yield store.flushed()
    assert epochs == sorted(set(epochs))


@pytest_twisted.inlineCallbacks
def test_a_will_record_round_trips(nodes: tuple[RedisStore, RedisStore]) -> Iterator[Deferred[Any]]:
    message = Message(topic="w", payload=b"\x00\x01", qos=2, retain=True, properties={"content_type": "x"})
    got, username, delay, due = unpack_will(pack_will(message, "u", 30, 12.5))
    assert (got.topic, got.payload, got.qos, got.retain, got.properties, username, delay, due) == (
        "w", b"\x00\x01", 2, True, {"content_type": "x"}, "u", 30, 12.5)
    yield nodes[0].flushed()


def test_replies_are_parsed_by_hiredis() -> None:
    """txredisapi's own parser stops reading the socket and waits a reactor turn between the
    strings of a reply: with it a node spent twice the CPU on each message from pub/sub."""
    import txredisapi

    assert txredisapi.RedisProtocol is txredisapi.HiredisProtocol
    assert issubclass(txredisapi.SubscriberProtocol, txredisapi.HiredisProtocol)


def test_a_batch_refused_for_thousands_of_sessions_keeps_every_refusal(server: RedisServer) -> None:
    """A node taken for dead (its sessions adopted) writes to 9,000 of them in one batch: Lua's
    unpack takes a few thousand values at most, and the script failed after marking the batch
    applied, keeping none of the refusals for the node to find after the error."""
    from mqtt_broker.cluster.store import BATCH
    redis = server.client()
    redis.flushall()
    ops: list[Any] = []
    for i in range(9000):
        ops += ["w", f"c{i}", 1]
    answer = redis.eval(BATCH.source, 0, "a", "incarnation:1", 1000, "mqtt:control", *ops)
    assert len(answer) == 9000
    assert redis.get("mqtt:applied:a") == b"incarnation:1"
    assert redis.lrange("mqtt:refused:a", 0, -1) == answer
    # Sent again (its answer lost), it is not applied twice, and answers the same.
    assert redis.eval(BATCH.source, 0, "a", "incarnation:1", 1000, "mqtt:control", *ops) == answer


class AwayRedis:
    """A Redis out of reach: every command fails as a lost connection does."""

    up = False
    address = RedisAddress.parse("redis://127.0.0.1:6379/0")

    def run(self, script: Any, *args: Any) -> Deferred[Any]:
        return fail(ConnectionError("Connection refused"))

    def call(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return fail(ConnectionError("Connection refused"))


def test_retained_qos0_messages_do_not_pile_up_while_redis_is_away() -> None:
    """QoS 0 retained PUBLISHes need no acknowledgement, so nothing slows their publisher while
    Redis is away: each is kept in the store's pending list until Redis is back. One topic set
    again and again needs only its last value written; memory should not grow with the count."""
    clock = Clock()
    store = RedisStore(AwayRedis(), "a", clock)  # type: ignore[arg-type]
    store.save_retained(Message(topic="t", payload=b"0", qos=0, retain=True))
    clock.advance(0)  # the first batch fails: the store waits for Redis
    assert store._recovering
    for i in range(10_000):
        store.save_retained(Message(topic="t", payload=b"x" * 100, qos=0, retain=True))
        if i % 1000 == 0:
            clock.advance(RETRY_AFTER)
    assert len(store._pending) == 1, f"{len(store._pending)} retained writes of one topic held while Redis is away"


@pytest_twisted.inlineCallbacks
def test_what_waits_for_redis_is_counted_until_redis_holds_it_outage_included() -> Iterator[Deferred[Any]]:
    """``unwritten_bytes``, by which the broker stops reading the clients that add to what waits
    for Redis: each change counts CHANGE_BYTES and the messages it carries, from when it is
    recorded until Redis has applied its batch, and through an outage, its batch sent again; a
    change undone before its batch is cut (a message acknowledged at once, a retained topic set
    again) counts no more. Nothing is lost."""
    redis_server = RedisServer()
    clock = Clock()
    link = Redis(RedisAddress.parse(redis_server.url))
    store = RedisStore(link, "a", clock)
    each = store_module.CHANGE_BYTES

    def queued(queued_item: Queued) -> int:
        packed = pack_queued(queued_item)
        return each + len(packed) + len(targeted_head("c", len(packed)))

    try:
        assert store.max_unwritten_bytes == store_module.MAX_UNWRITTEN_BYTES
        yield store.claim("c", False, 0)
        first, second, third = item(b"1" * 1000, 1), item(b"2" * 2000, 2), item(b"3" * 3000, 3)
        store.add_delivery("c", first, None)
        store.add_delivery("c", second, None)
        store.add_pubrel("c", 7)
        store.forward("b", b"an entry")
        assert store.unwritten_bytes == queued(first) + queued(second) + each + each + len(b"an entry")
        store.update_delivery("c", 1, 5, False)
        store.remove_delivery("c", 2)
        store.remove_pubrel("c", 7)
        assert store.unwritten_bytes == queued(first) + each + len(b"an entry")
        store.delete_retained("r")
        latest = Message(topic="r", payload=b"r" * 500, qos=1, retain=True)
        store.save_retained(Message(topic="r", payload=b"r" * 100, qos=1, retain=True))
        store.save_retained(latest)
        before_outage = queued(first) + each + len(b"an entry") + each + len(pack_retained(latest, clock.seconds()))
        assert store.unwritten_bytes == before_outage

        # Redis stops taking writes with the batch on its way, then is stopped: the batch waits,
        # and what is recorded meanwhile adds to it.
        redis_server.client().execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        clock.advance(0)
        assert len(store._in_flight) == 1 and store.unwritten_bytes == before_outage
        redis_server.kill()
        yield until(lambda: store._recovering, "the batch to fail")
        store.add_delivery("c", third, None)
        store.forward_parts("b", [(("c", store.epochs["c"]), b"guarded"), (None, b"not")])
        assert store.unwritten_bytes == before_outage + queued(third) + each + len(b"guarded") + len(b"not")
        redis_server.start()
        done = store.flushed()
        yield until(lambda: clock.advance(RETRY_AFTER) or done.called, "Redis to hold what waited", 1500)
        assert store.unwritten_bytes == 0 and not store._in_flight
        redis = redis_server.client()
        assert sorted(redis.hkeys("mqtt:deliv:c")) == [b"1", b"3"]
        assert [fields[b"d"] for _, fields in redis.xrange("mqtt:inbox:b")][0] == b"an entry"
        assert redis.xlen("mqtt:inbox:b") == 2
        assert unpack_retained(redis.hget("mqtt:retained", "r"), 0).payload == latest.payload
    finally:
        yield link.close()
        redis_server.close()


@pytest_twisted.inlineCallbacks
def test_a_lease_is_one_nodes_renewed_by_it_alone_and_free_once_given_up_or_expired(
        nodes: tuple[RedisStore, RedisStore], server: RedisServer) -> Iterator[Deferred[Any]]:
    a, b = nodes
    assert (yield a.lease("bridge:up", 60_000)) and not (yield b.lease("bridge:up", 60_000))
    assert (yield a.lease("bridge:up", 60_000))  # renewed
    assert 59_000 < server.client().pttl("mqtt:lease:bridge:up") <= 60_000
    yield b.give_lease("bridge:up")  # (not b's to give)
    assert server.client().get("mqtt:lease:bridge:up") == b"a"
    yield a.give_lease("bridge:up")
    assert (yield b.lease("bridge:up", 60_000)) and not (yield a.lease("bridge:up", 60_000))
    server.client().delete("mqtt:lease:bridge:up")  # (its TTL ran out: b beat no more)
    assert (yield a.lease("bridge:up", 60_000))


@pytest_twisted.inlineCallbacks
def test_a_retained_topic_a_lease_guards_changes_only_while_the_lease_is_free_or_the_writers(
        nodes: tuple[RedisStore, RedisStore], server: RedisServer) -> Iterator[Deferred[Any]]:
    """A bridge's state topic: a's "0" is written while the lease is free, refused while b holds
    it (a is told what Redis keeps, a 'K' event), written again once b gave it up."""
    a, b = nodes
    redis = server.client()
    control = redis.pubsub()
    control.subscribe("mqtt:control")
    try:
        for store in nodes:
            store.guard_retained("up/state", "bridge:up")

        def state(payload: bytes) -> Message:
            return Message(topic="up/state", payload=payload, qos=1, retain=True)
        a.save_retained(state(b"0"))  # (free: written)
        yield a.flushed()
        assert (yield b.lease("bridge:up", 60_000))
        b.save_retained(state(b"1"))
        yield b.flushed()
        a.save_retained(state(b"0"))  # (b's: refused, and a told what Redis keeps)
        yield a.flushed()
        a.delete_retained("up/state")
        yield a.flushed()
        held = redis.hget("mqtt:retained", "up/state")
        assert unpack_retained(held, 0).payload == b"1"
        yield b.give_lease("bridge:up")
        a.delete_retained("up/state")  # (free again: deleted)
        yield a.flushed()
        assert redis.hget("mqtt:retained", "up/state") is None
        events = [m["data"] for m in iter(lambda: control.get_message(timeout=0.2), None) if m["type"] == "message"]
        assert [e.split(b"\0", 2)[:2] for e in events] == [[b"R", b"a"], [b"R", b"b"], [b"K", b"a"], [b"K", b"a"],
                                                          [b"r", b"a"]]
        assert events[2:4] == [b"K\0a\0up/state\0" + held] * 2
    finally:
        control.close()

"""The stores (mqtt_broker/store): what is recorded comes back from ``load()`` of a new store,
and the SQLite store's group commit, writer thread, flushed(), damaged files and full disks.

The SQLite tests run on the real reactor (pytest-twisted): the store writes on a thread and
reports back through the reactor.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import types
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

from mqtt_broker.history import Entry
from mqtt_broker.message import Message
from mqtt_broker.session import Outgoing, Queued, Session
from mqtt_broker.store import Snapshot, StoredWill, StoreError
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.store.sqlite import SQLiteStore
import mqtt_broker.store.sqlite as sqlite_module
from mqtt_broker.topics import Subscription

from durability_helpers import CapturedLog, rows

NEVER = 0xFFFFFFFF
PROPS = {"user_property": [("k", "v"), ("k", "w"), ("ключ", "значение")], "content_type": "text/plain",
         "correlation_data": b"\x00\x01", "response_topic": "reply/here", "payload_format_indicator": 1,
         "message_expiry_interval": 60}


class Harness:
    """A store of one kind, and a fresh one over the same data (same file, or the same
    MemoryStore, which is what survives a service restart)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "data" / "mqttbroker.db"
        self.memory = MemoryStore()
        self.store: Any = None
        self.opened: list[Any] = []

    def open(self, window: int = 0) -> Snapshot:
        self.store = SQLiteStore(self.path, reactor) if self.kind == "sqlite" else self.memory
        snapshot = self.store.load(window)
        self.opened.append(self.store)
        return snapshot

    @inlineCallbacks
    def reopen(self, window: int = 0) -> Iterator[Deferred[Any]]:
        yield self.store.close()
        return self.open(window)

    @inlineCallbacks
    def close_all(self) -> Iterator[Deferred[Any]]:
        for store in self.opened:
            yield store.close()


@pytest.fixture(params=["memory", "sqlite"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, tmp_path)
    yield h
    pytest_twisted.blockon(h.close_all())


@pytest.fixture
def sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    # A failed batch is tried again only after RETRY_AFTER: soon, for tests that fail many.
    monkeypatch.setattr(sqlite_module, "RETRY_AFTER", 0.01)
    h = Harness("sqlite", tmp_path)
    yield h
    pytest_twisted.blockon(h.close_all())


def item(seq: int, topic: str = "t", payload: bytes = b"x", qos: int = 1, **kwargs: Any) -> Queued:
    message = Message(topic=topic, payload=payload, qos=qos, properties=kwargs.pop("properties", {}),
                      expires_at=kwargs.pop("expires_at", None))
    return Queued(message, qos, kwargs.pop("retain", False), kwargs.pop("subscription_ids", ()),
                  kwargs.pop("share", None), seq)


def view(delivery: Queued) -> tuple[Any, ...]:
    """What a restored delivery must keep (message.qos is the delivery's QoS after a reload)."""
    m = delivery.message
    released = delivery.released if isinstance(delivery, Outgoing) else None
    return (delivery.seq, m.topic, m.payload, delivery.qos, delivery.retain, dict(m.properties), m.expires_at,
            tuple(delivery.subscription_ids), delivery.share, released)


def by_id(snapshot: Snapshot) -> dict[str, tuple[Session, float | None]]:
    return {session.client_id: (session, at) for session, at in snapshot.sessions}


# --- everything round-trips ---------------------------------------------------------------------

SUBSCRIPTIONS = [
    Subscription(client_id="alice", topic_filter="sensors/+/temp", qos=2, no_local=True, retain_as_published=True,
                 retain_handling=2, subscription_id=7),
    Subscription(client_id="alice", topic_filter="$share/group/jobs/#", qos=1, retain_handling=1,
                 subscription_id=268435455, share_group="group"),
    Subscription(client_id="alice", topic_filter="plain", qos=0),
]
QUEUED_1 = item(1, "sensors/1/temp", b"21.5", qos=2, retain=True, properties=PROPS, expires_at=4321.25,
                subscription_ids=(7, 9))
QUEUED_2 = item(2, "jobs/1", b"\x00\xff" * 100, qos=1, share=("group", "jobs/#"))


def record_first_batch(store: Any) -> None:
    alice = Session("alice", 300)
    alice.next_seq = 5
    store.save_session(alice, 1234.5)
    store.save_session(Session("bob", NEVER), None)
    store.save_session(Session("carol", 60), 10.0)
    for subscription in SUBSCRIPTIONS:
        store.save_subscription("alice", subscription)
    store.save_subscription("alice", Subscription(client_id="alice", topic_filter="gone", qos=1))
    store.save_subscription("bob", Subscription(client_id="bob", topic_filter="#", qos=1))
    store.add_delivery("alice", QUEUED_1, None)
    store.add_delivery("alice", QUEUED_2, None)
    store.add_delivery("alice", item(3, "t/sent", b"s", qos=1), 17)
    store.add_delivery("alice", item(4, "t/released", b"r", qos=2), 18)
    store.add_delivery("alice", item(6, "t/moved", b"m", qos=1), None)
    store.add_delivery("alice", item(7, "t/dropped", b"d", qos=1), None)
    store.add_delivery("alice", item(8, "t/acked", b"a", qos=1), 20)
    for packet_id in (5, 6, 65535):
        store.add_pubrel("alice", packet_id)
    store.save_subscription("carol", Subscription(client_id="carol", topic_filter="c", qos=1))
    store.add_delivery("carol", item(1, "c", b"c", qos=1), None)
    store.add_pubrel("carol", 3)
    store.save_retained(Message(topic="status/a", payload=b"up", qos=1, retain=True, properties=PROPS,
                                expires_at=999.5))
    store.save_retained(Message(topic="status/b", payload=b"plain", qos=0, retain=True))
    store.save_retained(Message(topic="status/gone", payload=b"x", qos=0, retain=True))
    store.save_will(StoredWill("alice", "alice-user", Message(
        topic="wills/alice", payload=b"bye", qos=2, retain=True, properties={"content_type": "x",
                                                                           "user_property": [("a", "b")]},
        sender="alice", expires_at=2100.0), 2000.0))
    store.save_will(StoredWill("bob", None, Message(topic="wills/bob", payload=b"b", sender="bob"), 50.0))
    store.save_history(Entry(1, Message(topic="log/1", payload=b"one", qos=1, properties={"content_type": "c"}), 5.0))
    store.save_history(Entry(2, Message(topic="log/2", payload=b"two"), 6.0))
    store.save_history(Entry(3, Message(topic="log/3", payload=b"three", qos=2), 7.0))


def record_second_batch(store: Any) -> None:
    """Changes to what the first batch wrote, and short-lived records that never reach a batch."""
    store.update_delivery("alice", 4, 18, True)  # PUBREC came
    store.update_delivery("alice", 6, 19, False)  # sent from the queue
    store.remove_delivery("alice", 7)
    store.remove_delivery("alice", 8)
    store.remove_pubrel("alice", 6)
    store.delete_subscription("alice", "gone")
    store.add_delivery("alice", item(9, "t/quick", b"q", qos=2), None)  # queued, sent and PUBREC'd in one batch
    store.update_delivery("alice", 9, 21, False)
    store.update_delivery("alice", 9, 21, True)
    store.add_delivery("alice", item(10, "t/gone", b"g", qos=1), 22)  # acknowledged before written
    store.remove_delivery("alice", 10)
    store.add_pubrel("alice", 7)
    store.remove_pubrel("alice", 7)
    store.delete_session("carol")
    store.delete_retained("status/gone")
    store.delete_will("bob")
    store.forget_history(2)


@pytest_twisted.inlineCallbacks
def test_every_kind_of_record_round_trips(harness: Harness) -> Iterator[Deferred[Any]]:
    assert harness.open() == Snapshot()
    record_first_batch(harness.store)
    yield harness.store.flushed()
    record_second_batch(harness.store)
    yield harness.store.flushed()
    snapshot = yield harness.reopen()

    sessions = by_id(snapshot)
    assert sorted(sessions) == ["alice", "bob"]  # carol was deleted with everything of hers
    alice, alice_left = sessions["alice"]
    bob, bob_left = sessions["bob"]
    assert (alice.expiry, alice_left) == (300, 1234.5)
    assert (bob.expiry, bob_left) == (NEVER, None)
    assert alice.stored and bob.stored  # the broker records changes of restored sessions
    assert alice.subscriptions == {s.topic_filter: s for s in SUBSCRIPTIONS}
    assert bob.subscriptions == {"#": Subscription(client_id="bob", topic_filter="#", qos=1)}

    assert [view(q) for q in alice.queue] == [view(QUEUED_1), view(QUEUED_2)]
    assert alice.queued_bytes == len(QUEUED_1.message.payload) + len(QUEUED_2.message.payload)
    assert {pid: view(out) for pid, out in alice.outgoing.items()} == {
        17: view(Outgoing(*_fields(item(3, "t/sent", b"s", qos=1)), released=False)),
        18: view(Outgoing(*_fields(item(4, "t/released", b"r", qos=2)), released=True)),
        19: view(Outgoing(*_fields(item(6, "t/moved", b"m", qos=1)), released=False)),
        21: view(Outgoing(*_fields(item(9, "t/quick", b"q", qos=2)), released=True)),
    }
    assert alice.awaiting_pubrel == {5, 65535}
    assert not bob.queue and not bob.outgoing and not bob.awaiting_pubrel

    retained = {m.topic: m for m in snapshot.retained}
    assert sorted(retained) == ["status/a", "status/b"]
    a = retained["status/a"]
    assert (a.payload, a.qos, a.retain, dict(a.properties), a.expires_at) == (b"up", 1, True, PROPS, 999.5)
    b = retained["status/b"]
    assert (b.payload, b.qos, b.retain, dict(b.properties), b.expires_at) == (b"plain", 0, True, {}, None)

    assert len(snapshot.wills) == 1
    will = snapshot.wills[0]
    assert (will.client_id, will.username, will.due) == ("alice", "alice-user", 2000.0)
    m = will.message
    assert (m.topic, m.payload, m.qos, m.retain, dict(m.properties), m.sender, m.expires_at) == (
        "wills/alice", b"bye", 2, True, {"content_type": "x", "user_property": [("a", "b")]}, "alice", 2100.0)

    assert [(e.seq, e.message.topic, e.message.payload, e.message.qos, dict(e.message.properties), e.at)
            for e in snapshot.history] == [(2, "log/2", b"two", 0, {}, 6.0), (3, "log/3", b"three", 2, {}, 7.0)]


def _fields(q: Queued) -> tuple[Any, ...]:
    return (q.message, q.qos, q.retain, q.subscription_ids, q.share, q.seq)


@pytest_twisted.inlineCallbacks
def test_reloading_twice_changes_nothing(harness: Harness) -> Iterator[Deferred[Any]]:
    """Loading is only reading: a second reload sees what the first saw."""
    harness.open()
    record_first_batch(harness.store)
    record_second_batch(harness.store)
    yield harness.store.flushed()
    first = yield harness.reopen()
    second = yield harness.reopen()

    def summary(snapshot: Snapshot) -> Any:
        return sorted((s.client_id, at, s.expiry, sorted(s.subscriptions), [view(q) for q in s.queue],
                       sorted((p, view(o)) for p, o in s.outgoing.items()), sorted(s.awaiting_pubrel))
                      for s, at in snapshot.sessions)
    assert summary(first) == summary(second)


@pytest_twisted.inlineCallbacks
def test_next_seq_is_above_every_stored_delivery(harness: Harness) -> Iterator[Deferred[Any]]:
    """The broker numbers deliveries of an offline session without saving the session again,
    so after a reload the next number must come after every stored one: else two messages
    share a seq, and acknowledging one deletes the other from the store."""
    harness.open()
    session = Session("s", NEVER)
    harness.store.save_session(session, 1.0)  # saved when the client went away, next_seq 1
    for seq in (1, 2, 3):
        harness.store.add_delivery("s", item(seq, payload=b"%d" % seq), None)
    yield harness.store.flushed()
    snapshot = yield harness.reopen()
    restored = by_id(snapshot)["s"][0]
    assert restored.next_seq == 4


@pytest_twisted.inlineCallbacks
def test_each_change_of_a_delivery_finds_it_among_many(harness: Harness) -> Iterator[Deferred[Any]]:
    """Sent, released, acknowledged: each change names its message by seq, among 3,000 queued
    and a packet id used again once acknowledged; what is left reloads as it was."""
    harness.open()
    harness.store.save_session(Session("s", NEVER), 1.0)
    for seq in range(1, 3001):
        harness.store.add_delivery("s", item(seq, payload=b"%d" % seq, qos=2), None)
    for seq in range(1, 2001):
        packet_id = seq % 10 + 1
        harness.store.update_delivery("s", seq, packet_id, False)
        harness.store.update_delivery("s", seq, packet_id, True)
        harness.store.remove_delivery("s", seq)
    harness.store.update_delivery("s", 2001, 1, False)
    harness.store.update_delivery("s", 2002, 2, True)
    yield harness.store.flushed()
    snapshot = yield harness.reopen()
    restored = by_id(snapshot)["s"][0]
    assert {packet_id: (out.seq, out.released) for packet_id, out in restored.outgoing.items()} == {
        1: (2001, False), 2: (2002, True)}
    assert [queued.seq for queued in restored.queue] == list(range(2003, 3001))
    assert restored.queue[0].message.payload == b"2003"


@pytest_twisted.inlineCallbacks
def test_window_loads_the_first_queued_messages_and_the_rest_on_demand(harness: Harness) -> Iterator[Deferred[Any]]:
    harness.open()
    harness.store.save_session(Session("s", NEVER), 1.0)
    harness.store.add_delivery("s", item(1, payload=b"in flight"), 5)
    for seq in range(2, 9):
        harness.store.add_delivery("s", item(seq, payload=b"%d" % seq), None)
    yield harness.store.flushed()
    snapshot = yield harness.reopen(window=3)
    session = by_id(snapshot)["s"][0]
    assert [q.message.payload for q in session.queue] == [b"2", b"3", b"4"]
    assert list(session.outgoing) == [5]  # in-flight messages are always loaded
    assert session.spilled == 4
    assert session.loaded_seq == 4
    assert session.queued_bytes == 3
    rest = yield harness.store.load_queued("s", session.loaded_seq, 3)
    assert [(q.seq, q.message.payload) for q in rest] == [(5, b"5"), (6, b"6"), (7, b"7")]
    rest = yield harness.store.load_queued("s", 7, 10)
    assert [(q.seq, q.message.payload) for q in rest] == [(8, b"8")]


@pytest_twisted.inlineCallbacks
def test_queued_messages_are_read_up_to_max_bytes(harness: Harness) -> Iterator[Deferred[Any]]:
    """At start-up and later: no more payload bytes than max_bytes, the first one whatever its size."""
    harness.open()
    harness.store.save_session(Session("s", NEVER), 1.0)
    for seq, size in enumerate((40, 40, 40, 500, 10), 1):
        harness.store.add_delivery("s", item(seq, payload=b"x" * size), None)
    yield harness.store.flushed()
    yield harness.store.close()
    harness.store = SQLiteStore(harness.path, reactor) if harness.kind == "sqlite" else harness.memory
    harness.opened.append(harness.store)
    restored = by_id(harness.store.load(10, 100))["s"][0]
    assert [q.seq for q in restored.queue] == [1, 2] and restored.spilled == 3
    rest = yield harness.store.load_queued("s", 2, 10, 100)
    assert [q.seq for q in rest] == [3]
    rest = yield harness.store.load_queued("s", 3, 10, 100)
    assert [q.seq for q in rest] == [4]  # (alone over max_bytes: read all the same)
    rest = yield harness.store.load_queued("s", 0, 10)
    assert [q.seq for q in rest] == [1, 2, 3, 4, 5]


@pytest_twisted.inlineCallbacks
def test_load_queued_includes_what_was_recorded_before_the_call(harness: Harness) -> Iterator[Deferred[Any]]:
    harness.open()
    harness.store.save_session(Session("s", NEVER), None)
    harness.store.add_delivery("s", item(1, payload=b"one"), None)
    harness.store.add_delivery("s", item(2, payload=b"two"), None)
    loaded = yield harness.store.load_queued("s", 0, 10)  # nothing flushed yet
    assert [q.message.payload for q in loaded] == [b"one", b"two"]


@pytest_twisted.inlineCallbacks
def test_drop_expired_deletes_only_queued_messages_past_the_window_that_expired(
        harness: Harness) -> Iterator[Deferred[Any]]:
    harness.open()
    harness.store.save_session(Session("s", NEVER), 1.0)
    harness.store.add_delivery("s", item(1, payload=b"in flight", expires_at=5.0), 3)
    harness.store.add_delivery("s", item(2, payload=b"in memory", expires_at=5.0), None)
    for seq, expires_at in [(3, 5.0), (4, None), (5, 10.0), (6, 4.0), (7, 5.5)]:
        harness.store.add_delivery("s", item(seq, payload=b"%d" % seq, expires_at=expires_at), None)
    harness.store.save_session(Session("other", NEVER), 1.0)
    harness.store.add_delivery("other", item(1, payload=b"o", expires_at=1.0), None)
    dropped = yield harness.store.drop_expired("s", 2, 5.0)  # (recorded, not yet flushed: included)
    assert dropped == 2
    rest = yield harness.store.load_queued("s", 0, 10)
    assert [q.seq for q in rest] == [2, 4, 5, 7]
    snapshot = yield harness.reopen()
    sessions = by_id(snapshot)
    assert list(sessions["s"][0].outgoing) == [3]
    assert [q.seq for q in sessions["other"][0].queue] == [1]


# --- SQLite: group commit, writer thread, flushed() ----------------------------------------------

def count_writes(store: SQLiteStore) -> list[tuple[int, int]]:
    """Wrap the store's writer: each call appends (thread id, number of statements)."""
    calls: list[tuple[int, int]] = []
    original = store._write

    def write(batch: list[Any]) -> Any:
        calls.append((threading.get_ident(), len(batch)))
        return original(batch)
    store._write = write  # type: ignore[method-assign]
    return calls


@pytest_twisted.inlineCallbacks
def test_delivery_added_and_removed_before_its_batch_costs_no_write(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    store.save_session(Session("s", NEVER), None)
    yield store.flushed()
    writes = count_writes(store)
    store.add_delivery("s", item(1), 7)  # sent to an online client ...
    store.add_delivery("s", item(2, qos=2), None)  # queued, sent, PUBREC'd, PUBCOMP'd
    store.update_delivery("s", 2, 8, False)
    store.update_delivery("s", 2, 8, True)
    store.add_pubrel("s", 9)  # an inbound QoS 2 message released at once
    store.remove_delivery("s", 1)  # ... and acknowledged within the same reactor turn
    store.remove_delivery("s", 2)
    store.remove_pubrel("s", 9)
    assert [op for op in store._pending if op is not None] == []
    yield store.flushed()
    assert writes == []
    assert rows(sqlite.path, "SELECT * FROM deliveries") == []
    assert rows(sqlite.path, "SELECT * FROM awaiting_pubrel") == []


@pytest_twisted.inlineCallbacks
def test_delivery_acknowledged_after_its_batch_is_deleted(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    store.save_session(Session("s", NEVER), None)
    store.add_delivery("s", item(1), 7)
    yield store.flushed()
    assert rows(sqlite.path, "SELECT seq, packet_id FROM deliveries") == [(1, 7)]
    store.remove_delivery("s", 1)
    yield store.flushed()
    assert rows(sqlite.path, "SELECT * FROM deliveries") == []


@pytest_twisted.inlineCallbacks
def test_changes_of_one_reactor_turn_are_one_transaction(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    writes = count_writes(store)
    store.save_session(Session("s", NEVER), None)
    for seq in range(1, 501):
        store.add_delivery("s", item(seq, payload=b"%d" % seq), None)
        store.save_retained(Message(topic=f"r/{seq}", payload=b"v", retain=True))
    waiters = [store.flushed() for _ in range(10)]
    yield store.flushed()
    assert [n for _, n in writes] == [1001]
    assert all(d.called for d in waiters)
    assert rows(sqlite.path, "SELECT COUNT(*) FROM deliveries") == [(500,)]
    assert rows(sqlite.path, "SELECT COUNT(*) FROM retained") == [(500,)]


def hold_first_write(store: SQLiteStore) -> tuple[threading.Event, threading.Event]:
    """Wrap the store's writer: the first batch waits on the writer thread until the test sets
    the second event (the first says it has begun)."""
    started, release = threading.Event(), threading.Event()
    inner = store._write
    calls = []

    def slow_first(batch: list[Any]) -> Any:
        calls.append(len(batch))
        if len(calls) == 1:
            started.set()
            assert release.wait(10), "the test did not release the writer"
        return inner(batch)
    store._write = slow_first  # type: ignore[method-assign]
    return started, release


@pytest_twisted.inlineCallbacks
def writer_busy(started: threading.Event) -> Iterator[Deferred[Any]]:
    """A bounded wait for the writer thread to take its first batch."""
    for _ in range(500):
        if started.is_set():
            break
        yield deferLater(reactor, 0.01, lambda: None)
    assert started.is_set()


@pytest_twisted.inlineCallbacks
def test_changes_made_while_a_batch_is_written_share_the_next_one(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """Group commit under load: while one transaction is on disk, everything recorded meanwhile
    (over many reactor turns) waits and goes in one next transaction."""
    sqlite.open()
    store = sqlite.store
    writes = count_writes(store)
    started, release = hold_first_write(store)
    store.save_session(Session("s", NEVER), None)
    first = store.flushed()
    try:
        yield writer_busy(started)
        for seq in range(1, 101):  # a hundred reactor turns while the first batch is held
            yield deferLater(reactor, 0, lambda: None)
            store.add_delivery("s", item(seq), None)
        assert not first.called
    finally:
        release.set()
    yield store.flushed()
    assert [n for _, n in writes] == [1, 100]


@pytest_twisted.inlineCallbacks
def test_what_waits_for_the_disk_is_counted_until_it_is_written(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """``unwritten_bytes``, by which the broker stops reading publishers that outpace the disk:
    each change counts CHANGE_BYTES and its payload, from being recorded to being written,
    through the batch on the disk; one undone before its batch counts no more."""
    sqlite.open()
    store = sqlite.store
    each = sqlite_module.CHANGE_BYTES
    started, release = hold_first_write(store)
    store.save_session(Session("s", NEVER), None)
    first = store.flushed()
    try:
        yield writer_busy(started)
        assert store.unwritten_bytes == each
        store.add_delivery("s", item(1, payload=b"x" * 1000), None)
        store.add_delivery("s", item(2, payload=b"y" * 3000), 5)
        store.save_retained(Message(topic="r", payload=b"z" * 100, retain=True))
        store.add_pubrel("s", 7)
        assert store.unwritten_bytes == 5 * each + 4100
        store.remove_delivery("s", 2)  # acknowledged before its batch
        store.remove_pubrel("s", 7)
        assert store.unwritten_bytes == 3 * each + 1100
    finally:
        release.set()
    yield first
    assert store.unwritten_bytes == 2 * each + 1100  # (the next batch)
    yield store.flushed()
    assert store.unwritten_bytes == 0


@pytest_twisted.inlineCallbacks
def test_a_topics_retained_message_set_again_while_a_batch_is_written_waits_once(
        sqlite: Harness) -> Iterator[Deferred[Any]]:
    """QoS 0 retained traffic on one topic during a slow write kept a statement for every
    PUBLISH (40,000 for one row)."""
    sqlite.open()
    store = sqlite.store
    started, release = hold_first_write(store)
    store.save_session(Session("s", NEVER), None)
    try:
        yield writer_busy(started)
        for n in range(1000):
            store.save_retained(Message(topic="status", payload=b"%d" % n, retain=True))
            store.save_retained(Message(topic="gone", payload=b"%d" % n, retain=True))
        store.delete_retained("gone")
        assert len([op for op in store._pending if op is not None]) == 2
        assert store.unwritten_bytes == sqlite_module.CHANGE_BYTES * 3 + len(b"999")
    finally:
        release.set()
    yield store.flushed()
    assert rows(sqlite.path, "SELECT topic, payload FROM retained") == [("status", b"999")]


@pytest_twisted.inlineCallbacks
def test_flushed_fires_once_the_rows_are_on_disk(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    store.save_session(Session("s", NEVER), 5.0)
    store.add_delivery("s", QUEUED_1, None)
    store.save_retained(Message(topic="r", payload=b"kept", retain=True))
    assert rows(sqlite.path, "SELECT * FROM sessions") == []  # recorded, not yet written
    seen: list[Any] = []

    def check(_: None) -> None:  # another connection sees the committed rows
        seen.append(rows(sqlite.path, "SELECT client_id, disconnected_at FROM sessions"))
        seen.append(rows(sqlite.path, "SELECT seq, payload FROM deliveries"))
        seen.append(rows(sqlite.path, "SELECT topic, payload FROM retained"))
    yield store.flushed().addCallback(check)
    assert seen == [[("s", 5.0)], [(1, b"21.5")], [("r", b"kept")]]


@pytest_twisted.inlineCallbacks
def test_flushed_with_nothing_recorded_fires_at_once(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    writes = count_writes(sqlite.store)
    d = sqlite.store.flushed()
    assert d.called
    yield d
    assert writes == []


@pytest_twisted.inlineCallbacks
def test_writes_happen_on_a_thread_other_than_the_reactors(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    writes = count_writes(store)
    reactor_thread = threading.get_ident()
    store.save_session(Session("s", NEVER), None)
    assert writes == []  # recording does not write
    yield store.flushed()
    store.save_retained(Message(topic="r", payload=b"v", retain=True))
    yield store.flushed()
    assert len(writes) == 2
    assert all(thread != reactor_thread for thread, _ in writes)


@pytest_twisted.inlineCallbacks
def test_close_writes_what_is_pending(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    sqlite.store.save_session(Session("s", NEVER), 3.0)
    yield sqlite.store.close()
    assert rows(sqlite.path, "SELECT client_id, disconnected_at FROM sessions") == [("s", 3.0)]


# --- SQLite: files it cannot use -----------------------------------------------------------------

def assert_tells_what_to_do(error: StoreError, path: Path) -> None:
    text = str(error)
    assert str(path) in text
    assert "move it" in text and ("backup" in text or ".recover" in text), text


def test_random_bytes_in_place_of_the_database(tmp_path: Path) -> None:
    path = tmp_path / "mqttbroker.db"
    path.write_bytes(os.urandom(16384))
    with pytest.raises(StoreError) as caught:
        SQLiteStore(path, reactor).load()
    assert_tells_what_to_do(caught.value, path)


def test_a_directory_in_place_of_the_database(tmp_path: Path) -> None:
    path = tmp_path / "mqttbroker.db"
    path.mkdir()
    with pytest.raises(StoreError) as caught:
        SQLiteStore(path, reactor).load()
    assert str(path) in str(caught.value)


@inlineCallbacks
def refused_at_load(path: Path) -> Iterator[Deferred[Any]]:
    """Opening the database at ``path`` fails with a StoreError that tells what to do."""
    store = SQLiteStore(path, reactor)
    try:
        with pytest.raises(StoreError) as caught:
            store.load()
        assert_tells_what_to_do(caught.value, path)
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_a_damaged_properties_blob_is_refused_as_a_damaged_database(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """The pages are sound, what a row holds is not: quick_check passes, and reading the row's
    properties raised MalformedPacket, which start-up printed as a traceback."""
    sqlite.open()
    sqlite.store.save_retained(Message(topic="r", payload=b"kept", qos=1, retain=True,
                                       properties={"content_type": "text/plain"}))
    yield sqlite.store.close()
    with closing(sqlite3.connect(str(sqlite.path))) as db:
        db.execute("UPDATE retained SET properties = X'05FF000000'")  # a Content Type of 0xFF00 bytes in 3
        db.commit()
    yield refused_at_load(sqlite.path)


@pytest_twisted.inlineCallbacks
def test_damaged_table_pages_are_refused(sqlite: Harness) -> Iterator[Deferred[Any]]:
    yield fill(sqlite)
    data = bytearray(sqlite.path.read_bytes())
    page = 4096
    assert len(data) > 40 * page
    for number in (10, 20, 30):  # pages inside the tables, the header intact
        data[number * page:(number + 1) * page] = os.urandom(page)
    sqlite.path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as caught:
        SQLiteStore(sqlite.path, reactor).load()
    assert_tells_what_to_do(caught.value, sqlite.path)


@pytest_twisted.inlineCallbacks
def test_damaged_index_is_refused_at_start_up(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """A damaged primary-key index is a corrupt database too: it must stop start-up, not let
    the broker start and then fail every write that touches the index."""
    yield fill(sqlite)
    root = rows(sqlite.path, "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_sessions_1'")[0][0]
    page = rows(sqlite.path, "PRAGMA page_size")[0][0]
    data = bytearray(sqlite.path.read_bytes())
    data[(root - 1) * page:root * page] = os.urandom(page)
    sqlite.path.write_bytes(bytes(data))
    yield refused_at_load(sqlite.path)


@inlineCallbacks
def fill(h: Harness) -> Iterator[Deferred[Any]]:
    """A database of a few hundred KiB, checkpointed into the main file and closed."""
    h.open()
    for n in range(3000):
        h.store.save_session(Session(f"client-{n:05d}", NEVER), 1.0)
        h.store.save_retained(Message(topic=f"r/{n}", payload=os.urandom(64), retain=True))
    yield h.store.flushed()
    h.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    yield h.store.close()
    h.opened.remove(h.store)


# --- SQLite: a failing disk ----------------------------------------------------------------------

def fill_up(store: SQLiteStore) -> None:
    """No page more for this database: the next write that needs one fails (SQLITE_FULL)."""
    assert store._db is not None
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def make_room(store: SQLiteStore) -> None:
    assert store._db is not None
    store._db.execute("PRAGMA max_page_count = 1073741823")


@pytest_twisted.inlineCallbacks
def test_a_failing_write_fails_flushed_logs_once_and_recovers(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    store.save_session(Session("s", NEVER), None)
    yield store.flushed()
    fill_up(store)
    with CapturedLog() as log:
        errors = []
        for n in range(3):  # three failed batches, one episode
            store.save_retained(Message(topic=f"big/{n}", payload=os.urandom(200_000), retain=True))
            try:
                yield store.flushed()
            except StoreError as e:
                errors.append(str(e))
        assert len(errors) == 3
        assert all(str(sqlite.path) in e for e in errors)
        assert len(log.matching("cannot write to")) == 1, log.texts()
        assert len(log.failures()) == 1
        assert log.matching("writing to") == []

        make_room(store)
        store.save_retained(Message(topic="big/after", payload=os.urandom(200_000), retain=True))
        yield store.flushed()
        assert len(log.matching("writing to")) == 1
        # What the failed batches held is written too, once there is room.
        assert sorted(rows(sqlite.path, "SELECT topic FROM retained")) == [
            ("big/0",), ("big/1",), ("big/2",), ("big/after",)]

        fill_up(store)  # a second episode is logged again
        store.save_retained(Message(topic="big/again", payload=os.urandom(200_000), retain=True))
        with pytest.raises(StoreError):
            yield store.flushed()
        assert len(log.matching("cannot write to")) == 2
    make_room(store)


@pytest_twisted.inlineCallbacks
def test_a_failing_disk_is_written_again_only_when_its_retry_comes(
        sqlite: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deferred[Any]]:
    """While writes fail, what comes to write waits for the retry, RETRY_AFTER after the last
    failure: each change started a write of the whole backlog at once, compacted on the reactor
    thread first, and each failure the next (238,000 statements waiting: 150 ms stalls of the
    reactor, back to back)."""
    monkeypatch.setattr(sqlite_module, "RETRY_AFTER", 60.0)
    sqlite.open()
    store = sqlite.store
    writes = count_writes(store)
    fill_up(store)
    store.save_retained(Message(topic="big", payload=os.urandom(200_000), retain=True))
    with pytest.raises(StoreError):
        yield store.flushed()
    waiting = store.flushed()
    for n in range(100):  # a change at each of a hundred turns of the reactor
        store.save_retained(Message(topic=f"r/{n}", payload=b"v", retain=True))
        yield deferLater(reactor, 0, lambda: None)
    assert len(writes) == 1 and not waiting.called
    make_room(store)
    store._retry_call.reset(0)  # (the retry's time has come)
    yield waiting
    assert [n for _, n in writes] == [1, 101]


@pytest_twisted.inlineCallbacks
def test_closing_on_a_failing_disk_says_what_is_lost(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """The stop dropped them without a word."""
    sqlite.open()
    store = sqlite.store
    fill_up(store)
    store.save_session(Session("s", NEVER), None)
    store.save_retained(Message(topic="big", payload=os.urandom(200_000), retain=True))
    with CapturedLog() as log:
        yield store.close()
    [line] = log.matching("changes not written")
    assert str(sqlite.path) in line and "2 changes" in line, log.texts()


@pytest.mark.parametrize("table, change", [
    ("wills", lambda store: store.save_will(StoredWill("s", "\ud800", Message(topic="w", payload=b"x"), 1e12))),
    ("sessions", lambda store: store.save_session(Session("huge", 2**64), None)),
])
@pytest_twisted.inlineCallbacks
def test_a_change_sqlite_cannot_take_is_dropped_and_said_not_taken_for_a_failing_disk(
        sqlite: Harness, table: str, change: Any) -> Iterator[Deferred[Any]]:
    """sqlite3 cannot bind a str with a lone surrogate (an auth answer's username in a delayed
    will) nor an int beyond 64 bits, however often it tries: the batch was kept as for a disk
    that fails and tried again each second with everything after it, so that no client's change
    was written any more. The change is dropped and said once; the others are written."""
    sqlite.open()
    store = sqlite.store
    with CapturedLog() as log:
        store.save_session(Session("s", NEVER), None)
        change(store)
        store.save_retained(Message(topic="with", payload=b"v", retain=True))
        yield store.flushed()
        store.save_retained(Message(topic="after", payload=b"v", retain=True))
        yield store.flushed()
    assert rows(sqlite.path, "SELECT client_id FROM sessions") == [("s",)]
    assert rows(sqlite.path, "SELECT topic FROM retained ORDER BY topic") == [("after",), ("with",)]
    assert rows(sqlite.path, "SELECT client_id FROM wills") == []
    [line] = log.matching("dropped")
    assert str(sqlite.path) in line and table in line, log.texts()
    assert log.matching("cannot write to") == []


@pytest_twisted.inlineCallbacks
def test_changes_of_a_failed_batch_are_written_once_the_disk_has_room(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """The store recovers by itself: what was recorded in a batch that failed (a session, its
    subscription) is not simply lost, or a session created while the disk was full would be
    missing after the next restart although its later SUBSCRIBE was acknowledged."""
    sqlite.open()
    store = sqlite.store
    fill_up(store)
    store.save_session(Session("late", NEVER), None)
    store.save_retained(Message(topic="big", payload=os.urandom(200_000), retain=True))
    with pytest.raises(StoreError):
        yield store.flushed()
    make_room(store)
    store.save_subscription("late", Subscription(client_id="late", topic_filter="t", qos=1))
    yield store.flushed()  # acknowledged: the SUBACK goes out now
    snapshot = yield sqlite.reopen()
    assert [s.client_id for s, _ in snapshot.sessions] == ["late"]


@pytest_twisted.inlineCallbacks
def test_what_waits_for_a_failing_disk_stays_the_size_of_what_it_changes(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """While writes fail the broker goes on: messages are queued, sent and acknowledged, retained
    messages replaced, the history moves on. What a failed batch held and what came after it are
    written together, without what later changes undo, so that what waits does not grow with
    every message; once the disk has room, the data comes out as if every write had worked."""
    sqlite.open()
    store = sqlite.store
    store.save_session(Session("s", NEVER), None)
    store.add_delivery("s", item(1, payload=b"before"), 1)
    store.add_pubrel("s", 1)
    store.save_history(Entry(1, Message(topic="h", payload=b"1"), 1.0))
    yield store.flushed()
    fill_up(store)
    big = os.urandom(100_000)  # pages are needed: each batch fails
    for n in range(2, 202):
        store.add_delivery("s", item(n, payload=big), None)
        store.update_delivery("s", n, n % 60000 + 1, False)
        store.save_retained(Message(topic="r", payload=b"%d" % n, retain=True))
        store.save_history(Entry(n, Message(topic="h", payload=b"%d" % n), float(n)))
        store.forget_history(n - 2)  # a history of three
        store.add_pubrel("s", n)
        store.remove_pubrel("s", n)  # a QoS 2 message in, released at once
        if n > 2:
            store.remove_delivery("s", n - 1)  # the one before, acknowledged
        with pytest.raises(StoreError):
            yield store.flushed()
    waiting = store._unwritten
    # The last delivery, retained message and forgetting, and the three entries of history.
    assert len(waiting) == 6, [sql[:30] for sql, _ in waiting]
    store.remove_delivery("s", 1)
    store.remove_pubrel("s", 1)
    make_room(store)
    yield store.flushed()
    assert rows(sqlite.path, "SELECT seq, packet_id FROM deliveries") == [(201, 202)]
    assert rows(sqlite.path, "SELECT * FROM awaiting_pubrel") == []
    assert rows(sqlite.path, "SELECT payload FROM retained") == [(b"201",)]
    assert rows(sqlite.path, "SELECT seq FROM history ORDER BY seq") == [(199,), (200,), (201,)]
    assert store.unwritten_bytes == 0


def test_a_backlog_written_before_the_disk_failed_costs_one_statement_a_message_while_it_fails() -> None:
    """Sent (an UPDATE with its packet id, another when released) and acknowledged (a DELETE)
    while the disk fails: only the DELETE of each waits."""
    from mqtt_broker.store import sqlite
    batch = []
    for seq in range(1, 101):
        batch += [(sqlite._UPDATE_DELIVERY, (seq, False, "c", seq)), (sqlite._UPDATE_DELIVERY, (seq, True, "c", seq)),
                  (sqlite._DELETE_DELIVERY, ("c", seq))]
    batch.append((sqlite._UPDATE_DELIVERY, (7, False, "c", 101)))  # in flight still
    assert sqlite.compacted(batch) == [(sqlite._DELETE_DELIVERY, ("c", seq)) for seq in range(1, 101)] + [
        (sqlite._UPDATE_DELIVERY, (7, False, "c", 101))]


def test_a_log_entry_saved_and_dropped_while_the_disk_fails_costs_nothing() -> None:
    from mqtt_broker.store import sqlite
    batch = [(sqlite._SAVE_HISTORY, (5, "t", b"x", 0, None, None, 1.0)), (sqlite._DROP_HISTORY, (5,)),
             (sqlite._DROP_HISTORY, (4,))]  # 4 was written before: its drop stays
    assert sqlite.compacted(batch) == [(sqlite._DROP_HISTORY, (4,))]


def test_a_row_set_again_and_again_while_the_disk_fails_waits_once() -> None:
    """A session, its will and subscriptions saved at each of a client's reconnections, and the
    minutely alive note: only the last change of each row waits (they all did, at each retry),
    whatever came between; deleting all of a client's subscriptions stays as it was."""
    from mqtt_broker.store import sqlite
    batch: list[sqlite.Statement] = []
    for n in range(100):
        batch += [(sqlite._SAVE_SESSION, ("c", 3600, None, n)), (sqlite._SAVE_WILL, ("c", None, "w", b"", 0, 0, b"\0",
                                                                                     None, float(n))),
                  (sqlite._SAVE_SUBSCRIPTION, ("c", "t", 1, 0, 0, 0, None, None)), (sqlite._ALIVE, (float(n),)),
                  (sqlite._SAVE_SESSION, ("c", 3600, float(n), n))]
    batch += [(sqlite._DELETE_WILL, ("c",)), (sqlite._DELETE_SUBSCRIPTION, ("c", "t")),
              ("DELETE FROM subscriptions WHERE client_id = ?", ("c",)), (sqlite._SAVE_SESSION, ("d", 0, None, 1))]
    assert sqlite.compacted(batch) == [
        (sqlite._ALIVE, (99.0,)), (sqlite._SAVE_SESSION, ("c", 3600, 99.0, 99)), (sqlite._DELETE_WILL, ("c",)),
        (sqlite._DELETE_SUBSCRIPTION, ("c", "t")), ("DELETE FROM subscriptions WHERE client_id = ?", ("c",)),
        (sqlite._SAVE_SESSION, ("d", 0, None, 1))]


@pytest_twisted.inlineCallbacks
def test_a_client_coming_and_going_while_the_disk_fails_adds_nothing_that_waits(
        sqlite: Harness) -> Iterator[Deferred[Any]]:
    """End to end: 100 reconnections of a persistent client while the disk is full, then room:
    what waited is one session row (beside the message that filled the disk), and it is written."""
    from mqtt_broker import BrokerService
    from mqtt_broker.wire import Disconnect

    from protocol_helpers import connected
    store = SQLiteStore(sqlite.path, reactor)
    broker = BrokerService(endpoints=[], reactor=reactor, store=store, sys_interval=0, close_linger=0)
    broker.startService()
    try:
        connected(broker, "c", 4, clean=False).send(Disconnect())
        yield store.flushed()
        fill_up(store)
        with pytest.raises(StoreError):  # more than the file has room for
            yield broker.publish("big", b"x" * 300_000, qos=1, retain=True)
        for _ in range(100):
            connected(broker, "c", 4, clean=False).send(Disconnect())
        with pytest.raises(StoreError):
            yield store.flushed()
        assert len(store._unwritten) == 2, [sql[:40] for sql, _ in store._unwritten]  # the retained message too
        make_room(store)
        yield store.flushed()
        assert len(rows(sqlite.path, "SELECT disconnected_at FROM sessions WHERE client_id = 'c'")) == 1
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_the_brokers_publish_fires_once_the_store_holds_it(tmp_path: Path) -> Iterator[Deferred[Any]]:
    """What embedding.md promises ("a Deferred: fired once stored"): an application that exits
    when it fires loses nothing. And nothing is published once the broker has stopped (it was
    routed to a closed store)."""
    from mqtt_broker import BrokerService
    broker = BrokerService(endpoints=[], reactor=reactor, persistence="sqlite", data_dir=str(tmp_path),
                           sys_interval=0)
    # Before the start the store is not open: routed then, the message never got to the store, and
    # stopService never fired (the store waited for a write that could not begin).
    with pytest.raises(RuntimeError, match="not started"):
        broker.publish("status/app", b"early", qos=1, retain=True)
    yield deferLater(reactor, 0, lambda: None)  # (a turn of the reactor, where that write began)
    broker.startService()
    try:
        published = broker.publish("status/app", b"up", qos=1, retain=True)
        assert not published.called
        yield published
        assert rows(tmp_path / "mqttbroker.db", "SELECT payload FROM retained WHERE topic = ?",
                    ("status/app",)) == [(b"up",)]
    finally:
        yield broker.stopService()
    with pytest.raises(RuntimeError):
        broker.publish("status/app", b"down", retain=True)


@pytest_twisted.inlineCallbacks
def test_a_broker_started_again_before_its_stop_has_finished_is_told_so(tmp_path: Path) -> Iterator[Deferred[Any]]:
    """The store was still writing its last changes: opened again then, it did not read them,
    and the close, when it came, closed the new file and left the old writer thread running
    (the process could not end), with the broker running on a closed store."""
    from mqtt_broker import BrokerService
    broker = BrokerService(endpoints=[], reactor=reactor, persistence="sqlite", data_dir=str(tmp_path),
                           sys_interval=0, close_linger=0)
    broker.startService()
    broker.publish("status/app", b"up", qos=1, retain=True)
    stopped = broker.stopService()
    with pytest.raises(StoreError, match="still being closed"):
        broker.startService()
    yield stopped
    broker.startService()
    try:
        assert broker.running and broker.store.opened  # type: ignore[union-attr]
        retained = broker.retained.get("status/app")
        assert retained is not None and retained.payload == b"up"
        yield broker.publish("status/app", b"again", qos=1, retain=True)
    finally:
        yield broker.stopService()


# --- one broker a data directory; a later release's database; a disk that cannot be written ---------

@pytest_twisted.inlineCallbacks
def test_a_second_store_on_an_open_database_is_refused(tmp_path: Path) -> Iterator[Deferred[Any]]:
    """Two on one file each kept their sessions' sequence numbers in memory and wrote the same
    rows, each over the other's: acknowledged messages were lost. One broker a data directory."""
    path = tmp_path / "mqttbroker.db"
    first, second = SQLiteStore(path, reactor), SQLiteStore(path, reactor)
    first.load()
    try:
        with pytest.raises(StoreError, match=f"in use by another broker \\(process {os.getpid()}\\)"):
            second.load()
    finally:
        yield first.close()
    second.load()  # (the first has let it go)
    yield second.close()


def test_a_second_broker_process_on_the_data_directory_of_a_running_one_does_not_start(
        tmp_path: Path, broker_process: Any) -> None:
    import subprocess
    import sys

    from conftest import ROOT, free_port
    data = tmp_path / "data"
    broker_process("--persistence", "sqlite", "--data-dir", str(data))
    done = subprocess.run([sys.executable, "-m", "twisted", "mqttbroker", "--persistence", "sqlite",
                           "--endpoint", f"tcp:{free_port()}:interface=127.0.0.1", "--data-dir", str(data)],
                          cwd=ROOT, capture_output=True, timeout=30)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 1 and "Traceback" not in output, output
    assert f"mqttbroker: cannot start: {data / 'mqttbroker.db'} is in use by another broker" in output, output


@pytest_twisted.inlineCallbacks
def test_a_database_of_a_later_schema_is_refused_and_left_as_it_was(tmp_path: Path) -> Iterator[Deferred[Any]]:
    """A downgrade: it was opened, migrated and written to, whatever that release had changed."""
    from mqtt_broker.store.sqlite import SCHEMA, VERSION
    path = tmp_path / "mqttbroker.db"
    with closing(sqlite3.connect(str(path))) as db:
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {VERSION + 1}")
        db.commit()
    before = path.read_bytes()
    store = SQLiteStore(path, reactor)
    with pytest.raises(StoreError, match="written by a later release"):
        store.load()
    yield store.close()
    assert path.read_bytes() == before
    with closing(sqlite3.connect(str(path))) as db:
        db.execute("PRAGMA user_version = 0")  # (as 0.1.0 left it: taken, and marked as this release's)
        db.commit()
    store.load()
    yield store.close()
    with closing(sqlite3.connect(str(path))) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (VERSION,)


@pytest.mark.parametrize("tables", [
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'x');",
    "CREATE TABLE sessions (id INTEGER PRIMARY KEY, token TEXT); INSERT INTO sessions VALUES (1, 'x');"],
    ids=["its own tables", "a table of one of our names"])
@pytest_twisted.inlineCallbacks
def test_a_database_of_another_program_is_refused_and_left_as_it_was(
        tmp_path: Path, tables: str) -> Iterator[Deferred[Any]]:
    """Another program's SQLite file (a wrong data_dir, a file copied there) was taken over: the
    broker's tables added, its journal made WAL, its user_version set; then used, or refused as
    damaged once written to."""
    path = tmp_path / "mqttbroker.db"
    with closing(sqlite3.connect(str(path))) as db:
        db.executescript(tables)
        db.commit()
    before = path.read_bytes()
    store = SQLiteStore(path, reactor)
    try:
        with pytest.raises(StoreError, match=f"{path} is not a database of mqtt_broker"):
            store.load()
    finally:
        yield store.close()
    assert path.read_bytes() == before and not path.with_name(path.name + "-wal").exists()


@pytest_twisted.inlineCallbacks
def test_a_damaged_database_is_refused_before_anything_is_written_to_it(sqlite: Harness) -> Iterator[Deferred[Any]]:
    """Its journal was made WAL and its user_version set before quick_check found the damage."""
    yield fill(sqlite)
    data = bytearray(sqlite.path.read_bytes())
    for number in (10, 20, 30):  # pages inside the tables, the header intact
        data[number * 4096:(number + 1) * 4096] = os.urandom(4096)
    sqlite.path.write_bytes(bytes(data))
    with closing(sqlite3.connect(str(sqlite.path))) as db:
        db.execute("PRAGMA journal_mode=DELETE")  # (as another program may have left it)
    before = sqlite.path.read_bytes()
    yield refused_at_load(sqlite.path)
    assert sqlite.path.read_bytes() == before


def test_a_database_refused_for_a_value_not_of_its_columns_type_is_left_unwritten(tmp_path: Path) -> None:
    """The type check ran after the writes: a database of 0.1.0 holding text in a number's place
    was made WAL, given the newer columns, tables, user_version and application_id, then refused."""
    path = tmp_path / "mqttbroker.db"
    with closing(sqlite3.connect(str(path))) as db:
        db.execute("CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL, "
                   "properties BLOB NOT NULL, expires_at REAL)")
        db.execute("INSERT INTO retained VALUES ('t', X'01', 'one', X'00', NULL)")
        db.commit()
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        SQLiteStore(path, reactor).load()
    assert_tells_what_to_do(caught.value, path)
    assert path.read_bytes() == before and not path.with_name(path.name + "-wal").exists()


DAMAGED_ROWS = {
    "a delivery's payload as text": "INSERT INTO deliveries VALUES ('s',1,'t','text',1,0,X'00',NULL,'[]',NULL,NULL,0)",
    "a delivery's subscription ids null": "INSERT INTO deliveries VALUES ('s',1,'t',X'01',1,0,X'00',NULL,'null',NULL,NULL,0)",
    "a delivery's packet id as text": "INSERT INTO deliveries VALUES ('s',1,'t',X'01',1,0,X'00',NULL,'[]',NULL,'x',0)",
    "a session's expiry as text": "UPDATE sessions SET expiry = 'x'",
    "a session's disconnection time as text": "UPDATE sessions SET disconnected_at = 'x'",
    "a will's due time as text": "INSERT INTO wills VALUES ('w',NULL,'t',X'01',1,0,X'00',NULL,'x')",
    "a retained message's expiry as text": "INSERT INTO retained VALUES ('r',X'01',1,X'00','x',NULL)",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_ROWS))
@pytest_twisted.inlineCallbacks
def test_a_row_of_damaged_content_is_refused_as_a_damaged_database(
        tmp_path: Path, damage: str) -> Iterator[Deferred[Any]]:
    """As a damaged properties blob is: the pages are sound (quick_check passes), a value is not
    of its column's type. Start-up stopped with a TypeError traceback (twistd printed 28 lines)
    or, for a packet id, went on with it."""
    from twisted.internet.task import Clock

    from mqtt_broker import BrokerService
    from mqtt_broker.store.sqlite import APPLICATION_ID, SCHEMA, VERSION
    path = tmp_path / "mqttbroker.db"
    with closing(sqlite3.connect(str(path))) as db:
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("INSERT INTO sessions VALUES ('s', 100, 1.0, 1)")
        db.execute(DAMAGED_ROWS[damage])
        db.commit()
    clock = Clock()
    clock.advance(10)
    store = SQLiteStore(path, reactor)
    broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, store=store)
    try:
        with pytest.raises(StoreError) as caught:
            broker.startService()
        assert_tells_what_to_do(caught.value, path)
    finally:
        yield store.close()


@pytest.mark.parametrize("error, name", [("attempt to write a readonly database", "SQLITE_READONLY"),
                                         ("database or disk is full", "SQLITE_FULL"),
                                         ("disk I/O error", "SQLITE_IOERR_WRITE")])
def test_a_disk_that_cannot_be_written_is_not_taken_for_a_damaged_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str, name: str) -> None:
    """Read-only or full, the disk was taken for a damaged database, with the advice to move it
    away: sound sessions and messages lost by following it."""
    import mqtt_broker.store.sqlite as module

    def failing(*args: Any, **kwargs: Any) -> Any:
        e = sqlite3.OperationalError(error)
        e.sqlite_errorname = name  # type: ignore[attr-defined]
        raise e
    monkeypatch.setattr(module.sqlite3, "connect", failing)
    with pytest.raises(StoreError) as caught:
        SQLiteStore(tmp_path / "mqttbroker.db", reactor).load()
    assert "read-only, or full" in str(caught.value) and "move it" not in str(caught.value)


@pytest_twisted.inlineCallbacks
def test_a_lock_file_that_cannot_be_written_leaves_no_lock_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deferred[Any]]:
    """A disk full as the pid is written into mqttbroker.db.lock: a bare OSError (a traceback at
    start-up), and the lock kept: once room was made, the next load in this process was refused
    as "in use by another broker (process <its own>)"."""
    path = tmp_path / "mqttbroker.db"

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(sqlite_module, "os", types.SimpleNamespace(**{**vars(os), "write": full}))
    store = SQLiteStore(path, reactor)
    try:
        with pytest.raises(Exception) as caught:
            store.load()
    finally:
        monkeypatch.setattr(sqlite_module, "os", os)
    yield store.close()
    second = SQLiteStore(path, reactor)
    second.load()  # the disk has room again
    yield second.close()
    assert isinstance(caught.value, StoreError), repr(caught.value)


@pytest_twisted.inlineCallbacks
def test_a_broker_killed_by_sigkill_leaves_no_stale_lock(tmp_path: Path) -> Iterator[Deferred[Any]]:
    """The lock file stays behind after kill -9; the kernel released the flock: the next start
    is not refused."""
    path = tmp_path / "mqttbroker.db"
    code = ("import sys; from twisted.internet import reactor; from mqtt_broker.store.sqlite import SQLiteStore;"
            f"SQLiteStore(__import__('pathlib').Path({str(path)!r}), reactor).load(); print('ready', flush=True);"
            "sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": str(Path(sqlite_module.__file__).parents[2])}
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        with pytest.raises(StoreError, match=f"process {child.pid}"):
            SQLiteStore(path, reactor).load()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert (tmp_path / "mqttbroker.db.lock").exists()
    store = SQLiteStore(path, reactor)
    store.load()
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_a_database_locked_by_a_tool_is_not_taken_for_a_damaged_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deferred[Any]]:
    """A database another program holds a write lock on (a sqlite3 shell in a transaction, a
    VACUUM) is sound: not to be moved away as a damaged one."""
    import sqlite3
    from contextlib import closing
    path = tmp_path / "mqttbroker.db"
    store = SQLiteStore(path, reactor)
    store.load()
    yield store.close()
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite_module.sqlite3, "connect", lambda *a, **k: connect(*a, **{**k, "timeout": 0}))
    with closing(connect(str(path), isolation_level=None)) as tool:
        tool.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError) as caught:
            SQLiteStore(path, reactor).load()
        tool.execute("ROLLBACK")
    assert "move it" not in str(caught.value), str(caught.value)


# --- the same store object closed and opened again (a service stopped and started) -----------

@pytest_twisted.inlineCallbacks
def test_a_disk_still_full_after_the_store_is_opened_again_is_logged_again(sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    fill_up(store)
    store.save_retained(Message(topic="big/1", payload=os.urandom(200_000), retain=True))
    with CapturedLog() as log:
        with pytest.raises(StoreError):
            yield store.flushed()
        yield store.close()  # (what was not written is logged as lost)
        store.load()
        fill_up(store)
        store.save_retained(Message(topic="big/2", payload=os.urandom(200_000), retain=True))
        with pytest.raises(StoreError):
            yield store.flushed()
        failures = log.matching("cannot write to")
    make_room(store)
    assert len(failures) == 2, failures


@pytest_twisted.inlineCallbacks
def test_a_store_opened_again_does_not_say_writing_works_again_when_it_never_failed(
        sqlite: Harness) -> Iterator[Deferred[Any]]:
    sqlite.open()
    store = sqlite.store
    fill_up(store)
    store.save_retained(Message(topic="big/1", payload=os.urandom(200_000), retain=True))
    with pytest.raises(StoreError):
        yield store.flushed()
    yield store.close()
    with CapturedLog() as log:
        store.load()  # (a new connection has no page limit)
        store.save_retained(Message(topic="small", payload=b"x", retain=True))
        yield store.flushed()
    assert log.matching("works again") == []


@pytest_twisted.inlineCallbacks
def test_a_change_recorded_once_the_store_is_closed_is_said_lost_and_leaves_it_usable(
        sqlite: Harness) -> Iterator[Deferred[Any]]:
    """Its write failed an assertion in the reactor, and left the store writing for good: opened
    again (a service started again), it wrote nothing more, and its stop never finished."""
    sqlite.open()
    store = sqlite.store
    yield store.close()
    with CapturedLog() as log:
        store.delete_retained("status/app")
        with pytest.raises(StoreError):
            yield store.flushed()
    assert log.failures() == [] and len(log.matching("changes recorded after")) == 1
    store.load()
    store.save_retained(Message(topic="status/app", payload=b"again", retain=True))
    yield store.flushed()
    snapshot = yield sqlite.reopen()
    assert [m.payload for m in snapshot.retained] == [b"again"]


@pytest_twisted.inlineCallbacks
def test_a_change_recorded_while_closed_is_lost_when_the_store_is_opened_again_at_once(
        sqlite: Harness) -> Iterator[Deferred[Any]]:
    """Opened again before its flush came, the store wrote it, after load() read the state the
    broker takes up: the broker held what the disk no longer had."""
    sqlite.open()
    store = sqlite.store
    store.save_retained(Message(topic="status/app", payload=b"up", retain=True))
    yield store.flushed()
    yield store.close()
    with CapturedLog() as log:
        store.delete_retained("status/app")
        assert [m.payload for m in store.load().retained] == [b"up"]
        yield store.flushed()
    assert len(log.matching("changes recorded after")) == 1
    snapshot = yield sqlite.reopen()
    assert [m.payload for m in snapshot.retained] == [b"up"]

"""A slow or offline client's backlog beyond max_queued_messages waits in the store, not in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent

from protocol_helpers import FakeClient, connected, make_broker

from mqtt_broker import BrokerService
from mqtt_broker.config import BrokerConfig
from mqtt_broker.delivery import STORE_SWEEP_EVERY
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.topics import SharedGroup
from mqtt_broker.wire import Disconnect, Puback, Publish, ReasonCode, Suback


def drain(client):  # type: ignore[no-untyped-def]
    """Acknowledge what the broker sends until it sends nothing more (bounded); the payloads."""
    received = []
    for _ in range(20):
        packets = client.received()
        if not packets:
            break
        received += [p.payload for p in packets]
        for p in packets:
            client.send(Puback(packet_id=p.packet_id))
    return received


def offline_subscriber(broker, client_id="sub"):  # type: ignore[no-untyped-def]
    sub = connected(broker, client_id, clean=False)
    sub.subscribe("t", qos=1)
    sub.lose()


def test_backlog_beyond_the_memory_window_is_delivered_in_order_from_the_store() -> None:
    broker = make_broker(max_queued_messages=3, store=MemoryStore())
    offline_subscriber(broker)
    pub = connected(broker, "pub")
    for n in range(10):
        assert pub.publish("t", str(n).encode(), qos=1, packet_id=n + 1) == [Puback(packet_id=n + 1)]
    session = broker.sessions["sub"]
    assert len(session.queue) == 3 and session.spilled == 7
    assert broker.stats.messages_dropped == 0
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    received = drain(again)
    assert received == [str(n).encode() for n in range(10)]
    assert session.spilled == 0 and not session.queue and not session.outgoing


def test_store_quota_refuses_with_0x97_and_counts() -> None:
    broker = make_broker(max_queued_messages=2, max_stored_messages=3, store=MemoryStore())
    offline_subscriber(broker)
    pub = connected(broker, "pub", version=5)
    codes = [pub.publish("t", b"m", qos=1, packet_id=n + 1)[0].reason_code for n in range(7)]  # type: ignore[union-attr]
    assert codes == [0, 0, 0, 0, 0, ReasonCode.QUOTA_EXCEEDED, ReasonCode.QUOTA_EXCEEDED]
    assert broker.sessions["sub"].dropped == 2 and broker.stats.messages_dropped == 2


def test_stored_messages_that_expired_make_room_under_max_stored_messages() -> None:
    broker = make_broker(max_queued_messages=1, max_stored_messages=2, store=MemoryStore())
    offline_subscriber(broker)
    pub = connected(broker, "pub", version=5)
    short = {"message_expiry_interval": 10}
    codes = [pub.publish("t", b"old", qos=1, packet_id=n + 1, properties=short)[0].reason_code  # type: ignore[union-attr]
             for n in range(4)]
    assert codes == [0, 0, 0, ReasonCode.QUOTA_EXCEEDED]  # one in memory, two in the store
    broker.clock.advance(11)
    codes = [pub.publish("t", b"new%d" % n, qos=1, packet_id=n + 1)[0].reason_code  # type: ignore[union-attr]
             for n in range(3)]
    assert codes == [0, 0, 0]
    assert broker.stats.messages_expired == 3
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert drain(again) == [b"new0", b"new1", b"new2"]


def test_the_store_is_swept_of_expired_messages_once_a_while_not_for_each_message_dropped() -> None:
    store = MemoryStore()
    broker = make_broker(max_queued_messages=1, max_stored_messages=1, store=store)
    offline_subscriber(broker)
    sweeps = []
    drop_expired = store.drop_expired
    store.drop_expired = lambda *args: sweeps.append(args) or drop_expired(*args)  # type: ignore[method-assign]
    for n in range(3):  # (a clock that starts at 0 reads as just swept)
        broker.publish("t", b"%d" % n, qos=1)
    broker.clock.advance(STORE_SWEEP_EVERY)
    for n in range(10):
        broker.publish("t", b"%d" % n, qos=1)
    assert len(sweeps) == 1
    broker.clock.advance(STORE_SWEEP_EVERY)
    broker.publish("t", b"later", qos=1)
    assert len(sweeps) == 2


def test_without_a_store_the_queue_bound_drops_and_mqtt5_publishers_are_told() -> None:
    broker = make_broker(max_queued_messages=1)
    offline_subscriber(broker)
    pub = connected(broker, "pub", version=5)
    assert pub.publish("t", qos=1, packet_id=1)[0].reason_code == 0  # type: ignore[union-attr]
    assert pub.publish("t", qos=1, packet_id=2)[0].reason_code == ReasonCode.QUOTA_EXCEEDED  # type: ignore[union-attr]


def test_spilled_backlog_survives_a_restart_without_coming_back_into_memory() -> None:
    store = MemoryStore()
    first = make_broker(max_queued_messages=2, store=store)
    offline_subscriber(first)
    for n in range(6):
        first.publish("t", str(n).encode(), qos=1)
    first.stopService()
    second = make_broker(max_queued_messages=2, store=store)
    second.startService()
    session = second.sessions["sub"]
    assert len(session.queue) == 2 and session.spilled == 4
    again = FakeClient(second)
    again.connect("sub", clean=False)
    received = drain(again)
    assert received == [str(n).encode() for n in range(6)]


def test_a_connected_clean_session_that_stops_reading_loses_nothing() -> None:
    broker = make_broker(max_queued_messages=3, store=MemoryStore())
    sub = connected(broker, "sub", version=5)  # clean start, session expiry 0
    sub.subscribe("t", qos=1)
    sub.protocol.pauseProducing()  # its socket buffer is full: it does not read
    pub = connected(broker, "pub", version=5)
    big = b"x" * (BrokerConfig().max_held_bytes // 3 + 1)  # three are held on the connection, three queued
    codes = [pub.publish("t", str(n).encode() + big, qos=1, packet_id=n + 1)[0].reason_code  # type: ignore[union-attr]
             for n in range(10)]
    assert codes == [0] * 10 and broker.stats.messages_dropped == 0
    assert broker.sessions["sub"].spilled == 4
    sub.protocol.resumeProducing()
    received = drain(sub)
    assert received == [str(n).encode() + big for n in range(10)]
    sub.send(Disconnect())
    sub.lose()
    assert "sub" not in broker.sessions and broker.store._sessions == {}  # type: ignore[union-attr]


def backlog_read_failing(failures: list[Exception]) -> BrokerService:
    """A broker whose offline subscriber "sub" has five QoS 1 messages, three of them in the store,
    whose next reads of a backlog fail with ``failures`` (the last first)."""
    from twisted.internet.defer import fail
    store = MemoryStore()
    broker = make_broker(max_queued_messages=2, store=store)
    offline_subscriber(broker)
    for n in range(5):
        broker.publish("t", str(n).encode(), qos=1)
    read = store.load_queued
    store.load_queued = lambda *args: fail(failures.pop()) if failures else read(*args)  # type: ignore[method-assign]
    return broker


def test_a_failed_read_of_the_spilled_backlog_is_tried_again() -> None:
    from mqtt_broker.delivery import SPILLED_READ_RETRY
    broker = backlog_read_failing([OSError("disk I/O error")])
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert drain(again) == [b"0", b"1"]  # the read of the rest failed: nothing else will pump the session
    broker.reactor.advance(SPILLED_READ_RETRY)
    assert drain(again) == [b"2", b"3", b"4"]
    assert broker.sessions["sub"].spilled == 0


def test_a_read_of_the_backlog_failed_by_a_failing_write_is_not_logged_at_each_retry() -> None:
    """While the disk fails, the store fails every read behind its failed batch, and logs the
    episode once; each connected session with a backlog logged a traceback besides, each second."""
    from mqtt_broker.delivery import SPILLED_READ_RETRY
    from mqtt_broker.store import StoreError

    from durability_helpers import CapturedLog
    broker = backlog_read_failing([OSError("disk I/O error")] + [StoreError("write to the store failed")] * 5)
    again = FakeClient(broker)
    with CapturedLog() as log:
        again.connect("sub", clean=False)
        assert drain(again) == [b"0", b"1"]
        for _ in range(6):
            broker.reactor.advance(SPILLED_READ_RETRY)
    assert drain(again) == [b"2", b"3", b"4"]
    logged = log.matching("cannot read the queued messages of 'sub'")
    assert len(logged) == 1 and len(log.failures()) == 1 and "disk I/O error" in str(log.failures()[0]["log_failure"])


def backlogged_subscriber(store: MemoryStore) -> tuple[BrokerService, FakeClient]:
    """A broker with a retained message on "r" and "sub" back with a window of one: of its
    backlog of five, "0" in flight, "1" and "2" queued in memory, "3" and "4" stored."""
    broker = make_broker(max_queued_messages=3, max_inflight_messages=1, store=store)
    broker.publish("r", b"retained", qos=1, retain=True)
    offline_subscriber(broker)
    for n in range(5):
        broker.publish("t", str(n).encode(), qos=1)
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    return broker, again


def test_a_new_subscriptions_retained_message_goes_ahead_of_a_stored_backlog() -> None:
    """[MQTT-3.3.1-6]: a new subscription gets the retained messages it matches. A QoS 1 one got
    none while any of its session's backlog was in the store, though the queue in memory had
    room, and none was counted as dropped. It waits in memory behind what is there, ahead of what
    is stored (a new subscription has no order to keep with the backlog of the others), and the
    store keeps it: a restart meanwhile sends it after the backlog."""
    store = MemoryStore()
    broker, again = backlogged_subscriber(store)
    [first] = again.received()
    session = broker.sessions["sub"]
    assert first.payload == b"0" and len(session.queue) == 2 and session.spilled == 2
    assert again.subscribe("r", qos=1, packet_id=9) == [Suback(packet_id=9, reason_codes=(1,))]
    again.send(Puback(packet_id=first.packet_id))
    assert drain(again) == [b"1", b"2", b"retained", b"3", b"4"]
    assert broker.stats.messages_dropped == 0
    broker, again = backlogged_subscriber(MemoryStore())
    again.subscribe("r", qos=1, packet_id=9)
    again.lose()
    broker.stopService()
    restarted = make_broker(max_queued_messages=3, store=broker.store)
    restarted.startService()
    back = FakeClient(restarted)
    back.connect("sub", clean=False)
    assert drain(back) == [b"0", b"1", b"2", b"3", b"4", b"retained"]


def test_a_new_subscriptions_retained_message_is_not_read_back_with_the_backlog_being_read() -> None:
    """The store is reading the next of the backlog when the retained message of a new
    subscription is queued: it stays out of the store, which would read it back a second time
    (it is numbered after the backlog)."""
    store = MemoryStore()
    reads: list[tuple[Deferred[Any], tuple[Any, ...]]] = []
    read = store.load_queued
    store.load_queued = lambda *args: reads.append((Deferred(), args)) or reads[-1][0]  # type: ignore[method-assign]
    broker, again = backlogged_subscriber(store)
    [first] = again.received()
    again.send(Puback(packet_id=first.packet_id))
    [second] = again.received()
    again.send(Puback(packet_id=second.packet_id))
    [third] = again.received()  # "2": the queue is empty, the store reads "3" on
    again.subscribe("r", qos=1, packet_id=9)
    [(reading, args)] = reads
    read(*args).chainDeferred(reading)
    again.send(Puback(packet_id=third.packet_id))
    assert drain(again) == [b"retained", b"3", b"4"]
    assert broker.sessions["sub"].spilled == 0


def test_a_retained_message_queued_while_the_backlog_is_read_is_stored_as_it_is_sent() -> None:
    """docs/durability.md: a QoS 1/2 PUBLISH to a stored session goes out only once the store
    has its packet id. Kept out of the store while the backlog was read, the retained message
    of a new subscription went out unrecorded: after a restart it was not sent again
    [MQTT-4.4.0-1], and its packet id, which a QoS 2 subscriber holds until the PUBREL, was
    free for another message."""
    store = MemoryStore()
    reads: list[tuple[Deferred[Any], tuple[Any, ...]]] = []
    read = store.load_queued
    store.load_queued = lambda *args: reads.append((Deferred(), args)) or reads[-1][0]  # type: ignore[method-assign]
    broker, again = backlogged_subscriber(store)
    for _ in range(3):  # "0" to "2": the queue is empty, the store reads "3" on
        [sent] = again.received()
        again.send(Puback(packet_id=sent.packet_id))
    [_, retained] = again.subscribe("r", qos=1, packet_id=9)
    assert retained.payload == b"retained"  # type: ignore[union-attr]
    [(reading, args)] = reads
    read(*args).chainDeferred(reading)
    again.lose()
    broker.stopService()
    del store.load_queued
    restarted = make_broker(max_queued_messages=3, store=store)
    restarted.startService()
    back = FakeClient(restarted)
    back.connect("sub", clean=False)
    got: list[Any] = back.received()
    assert [(p.payload, p.dup) for p in got] == [(b"retained", True), (b"3", False), (b"4", False)]
    assert got[0].packet_id == retained.packet_id  # type: ignore[union-attr]


def test_spilled_messages_read_back_keep_to_max_queued_bytes() -> None:
    """Memory holds max_queued_bytes of a session's queue (docs/durability.md): read back from
    the store, no more than that, whatever max_queued_messages allows (at least one message)."""
    broker = make_broker(max_queued_bytes=10_000, store=MemoryStore())
    away = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 1000})
    away.subscribe("t", qos=1)
    away.lose()
    for n in range(10):
        broker.publish("t", bytes([n]) * 4000, qos=1)
    session = broker.sessions["s"]
    assert len(session.queue) == 2 and session.spilled == 8  # 8,000 bytes in memory, the rest stored
    back = FakeClient(broker, 5)
    back.connect("s", clean=False, properties={"session_expiry_interval": 1000, "receive_maximum": 1})
    got = []
    for _ in range(10):  # acknowledged one by one: the queue is read back from the store in turn
        [message] = [p for p in back.received() if hasattr(p, "payload")]
        got.append(message.payload[0])
        back.send(Puback(packet_id=message.packet_id))
        assert session.queued_bytes <= 10_000
    assert got == list(range(10)) and not session.spilled


def test_messages_waiting_in_the_store_are_counted_as_queued() -> None:
    """GET /clients/{id}'s queued and mqtt_queued_messages count every message waiting for the
    client, those past max_queued_messages waiting in the store too."""
    from mqtt_broker.admin import figures
    from mqtt_broker.admin.shapes import client_json
    broker = make_broker(max_queued_messages=2, store=MemoryStore())
    away = connected(broker, "s", 4, clean=False)
    away.subscribe("t", qos=1)
    away.lose()
    for n in range(10):
        broker.publish("t", b"%d" % n, qos=1)
    assert broker.sessions["s"].spilled == 8
    assert client_json(broker.sessions["s"])["queued"] == 10
    assert figures.read(broker).queued == 10


def test_a_message_larger_than_max_queued_bytes_is_queued_into_an_empty_queue() -> None:
    """As Mosquitto's max_queued_bytes (the same name, docs/mosquitto.md) bounds what is queued
    already: an empty queue refused every message larger than the bound, lost for good."""
    broker = make_broker(max_queued_bytes=100)
    offline_subscriber(broker)
    connected(broker, "pub").publish("t", b"x" * 200, qos=1)
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert drain(again) == [b"x" * 200]


def test_a_message_stored_while_a_connected_client_is_busy_follows_once_it_is_not() -> None:
    broker = make_broker(max_held_bytes=65536, max_queued_bytes=1000, store=MemoryStore())
    sub = connected(broker, "sub", clean=False)
    sub.subscribe("t", qos=1)
    pub = connected(broker, "pub")
    pub.send(Publish(topic="t", payload=b"a" * 70_000, qos=1, packet_id=1),  # (held: the connection is full)
             Publish(topic="t", payload=b"b" * 2000, qos=1, packet_id=2),
             Publish(topic="t", payload=b"c" * 2000, qos=1, packet_id=3))  # (past max_queued_bytes: stored)
    pub.received()
    got = drain(sub)
    pub.publish("t", b"later", qos=1, packet_id=4)
    assert got + drain(sub) == [b"a" * 70_000, b"b" * 2000, b"c" * 2000, b"later"]


def test_a_backlog_a_store_reads_at_once_is_sent_without_recursing_once_per_read() -> None:
    """With a window far wider than max_queued_messages, each read back (a MemoryStore answers at
    once) pumped the next from within itself: past the stack's depth, the rest of the backlog
    was never sent, on this connection or the next."""
    broker = make_broker(max_queued_messages=1, max_inflight_messages=2000, store=MemoryStore())
    offline_subscriber(broker)
    for n in range(2000):
        broker.publish("t", b"%d" % n, qos=1)
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert len(again.received()) == 2000 and broker.sessions["sub"].spilled == 0


def started_with_a_backlog(store: MemoryStore) -> BrokerService:
    """A started broker whose offline subscriber "sub" has five QoS 1 messages, three in ``store``."""
    broker = make_broker(max_queued_messages=2, store=store, close_linger=0)
    broker.startService()
    offline_subscriber(broker)
    for n in range(5):
        broker.publish("t", b"%d" % n, qos=1)
    return broker


def test_a_stopped_broker_reads_no_backlog_again() -> None:
    from twisted.internet.defer import fail

    from mqtt_broker.delivery import SPILLED_READ_RETRY
    from mqtt_broker.store import StoreError
    store = MemoryStore()
    broker = started_with_a_backlog(store)
    reads = []
    store.load_queued = lambda *args: reads.append(args) or fail(StoreError("write failed"))  # type: ignore[method-assign]
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    drain(again)
    broker.reactor.advance(SPILLED_READ_RETRY)
    assert len(reads) == 2  # (read again a second later)
    broker.stopService()
    broker.reactor.advance(SPILLED_READ_RETRY * 10)
    assert len(reads) == 2


def test_a_read_failing_after_the_stop_is_not_tried_again() -> None:
    """A read in flight at the stop (an SQLite read behind a flush the failing disk fails, which
    the store's close waits for) failed afterwards, and was tried again every second for ever."""
    from twisted.internet.defer import Deferred, fail

    from mqtt_broker.delivery import SPILLED_READ_RETRY
    from mqtt_broker.store import StoreError
    store = MemoryStore()
    broker = started_with_a_backlog(store)
    in_flight: list[Deferred[Any]] = []
    reads = []

    def load_queued(*args: Any) -> Deferred[Any]:
        reads.append(args)
        if not in_flight:
            in_flight.append(Deferred())
            return in_flight[0]
        return fail(StoreError("the store is closed"))
    store.load_queued = load_queued  # type: ignore[method-assign]
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert drain(again) == [b"0", b"1"] and len(reads) == 1  # (the read of the rest in flight)
    broker.stopService()
    in_flight[0].errback(StoreError("write to the store failed"))
    for _ in range(10):
        broker.reactor.advance(SPILLED_READ_RETRY)
    assert len(reads) == 1


def test_the_reread_of_a_discarded_session_leaves_the_new_sessions_alone() -> None:
    """The rereads were kept by client id: the old session's call, due first, took the new
    session's place, and the new one's then failed; its backlog was never read again."""
    from twisted.internet.defer import fail

    from mqtt_broker.delivery import SPILLED_READ_RETRY
    from mqtt_broker.store import StoreError
    store = MemoryStore()
    broker = make_broker(max_queued_messages=2, max_inflight_messages=1, store=store)
    offline_subscriber(broker)
    for n in range(5):
        broker.publish("t", b"old%d" % n, qos=1)
    read = store.load_queued
    failing = [True]
    store.load_queued = lambda *args: fail(StoreError("failed")) if failing[0] else read(*args)  # type: ignore[method-assign]
    first = FakeClient(broker)
    first.connect("sub", clean=False)
    assert drain(first) == [b"old0", b"old1"]  # the read of the rest fails: read again in a second
    first.lose()
    broker.reactor.advance(SPILLED_READ_RETRY / 2)
    second = FakeClient(broker)
    second.connect("sub", clean=True)  # the old session is discarded
    second.subscribe("t", qos=1)
    for n in range(5):
        broker.publish("t", b"new%d" % n, qos=1)
    assert drain(second) == [b"new0", b"new1", b"new2"]  # the read of the rest fails too
    failing[0] = False
    for _ in range(4):
        broker.reactor.advance(SPILLED_READ_RETRY / 2)
    assert drain(second) == [b"new3", b"new4"]


def drained(client: FakeClient, rounds: int = 5000) -> list[bytes]:
    """``drain``, for backlogs read back a few messages at a time."""
    received: list[bytes] = []
    for _ in range(rounds):
        packets = client.received()
        if not packets:
            break
        received += [p.payload for p in packets]  # type: ignore[attr-defined]
        client.send(*[Puback(packet_id=p.packet_id) for p in packets])  # type: ignore[attr-defined]
    return received


def test_a_restart_reads_no_more_of_a_backlog_than_a_running_broker_holds_in_memory() -> None:
    """max_queued_messages 0 (no count) and max_queued_bytes: a running broker holds 100 bytes of
    the queue in memory; the restart read every message of it (the whole backlog, each a Message),
    and only then cut the queue back."""
    store = MemoryStore()
    settings: dict[str, Any] = dict(max_queued_messages=0, max_queued_bytes=100, store=store)
    first = make_broker(**settings)
    first.startService()
    offline_subscriber(first)
    for n in range(3000):
        first.publish("t", b"%05d" % n + b"x" * 45, qos=1)
    assert len(first.sessions["sub"].queue) == 2 and first.sessions["sub"].spilled == 2998
    first.stopService()
    read_at_start: list[int] = []
    load = store.load
    store.load = lambda *args: (lambda snapshot: read_at_start.append(  # type: ignore[method-assign]
        len(snapshot.sessions[0][0].queue)) or snapshot)(load(*args))
    second = make_broker(**settings)
    second.startService()
    assert read_at_start == [2] and second.sessions["sub"].spilled == 2998
    again = FakeClient(second)
    again.connect("sub", clean=False)
    assert drained(again) == [b"%05d" % n + b"x" * 45 for n in range(3000)]


def test_a_backlog_is_read_back_under_max_queued_bytes() -> None:
    """Each read asked for max_queued_messages (1,000) and kept what fitted max_queued_bytes,
    one or two: every message was read again and again (499 reads brought 124,750 to deliver
    500; with 1 MB messages and a 2 MB bound, up to 1 GB at a time)."""
    store = MemoryStore()
    broker = make_broker(max_queued_bytes=100, store=store)
    offline_subscriber(broker)
    for n in range(500):
        broker.publish("t", b"%03d" % n + b"x" * 57, qos=1)
    read: list[int] = []
    load_queued = store.load_queued
    store.load_queued = lambda *args: load_queued(*args).addCallback(  # type: ignore[method-assign]
        lambda items: read.append(len(items)) or items)
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert drained(again) == [b"%03d" % n + b"x" * 57 for n in range(500)]
    assert max(read) <= 2 and sum(read) == 499


class _Walked(dict):  # type: ignore[type-arg]
    """A dict that counts the items its walks go through."""

    walked = 0

    def items(self):  # type: ignore[no-untyped-def]
        for item in super().items():
            _Walked.walked += 1
            yield item

    def __iter__(self):  # type: ignore[no-untyped-def]
        for key in super().__iter__():
            _Walked.walked += 1
            yield key


def test_a_memory_store_reads_a_backlog_back_without_walking_all_of_it_each_time() -> None:
    """Each read sorted every queued message's number: draining N messages max_queued_messages at a
    time took N / max_queued_messages walks of N (40,000 messages: 4.7 s of the reactor)."""
    store = MemoryStore()
    broker = make_broker(max_queued_messages=10, store=store)
    offline_subscriber(broker)
    for n in range(4000):
        broker.publish("t", b"%d" % n, qos=1)
    stored = store._sessions["sub"][0]
    stored.queued = _Walked(stored.queued)
    again = FakeClient(broker)
    again.connect("sub", clean=False)
    assert drained(again) == [b"%d" % n for n in range(4000)]
    assert _Walked.walked <= 3 * 4000


def test_a_restart_leaves_a_queue_without_a_count_limit_in_memory() -> None:
    """max_queued_messages 0 and max_stored_messages 10: 1,020 messages in memory, and more taken.
    Started again, the broker read 1,000 of them and counted 20 as stored, past
    max_stored_messages: the next message was refused (0x97)."""
    store = MemoryStore()
    broker = make_broker(store=store, max_queued_messages=0, max_stored_messages=10)
    broker.startService()
    offline_subscriber(broker, "s")
    for n in range(1020):
        broker.publish("t", b"%d" % n, qos=1)

    def one_more() -> int:
        publisher = connected(broker, "p", 5)
        publisher.send(Publish(topic="t", payload=b"one more", qos=1, packet_id=1))
        [ack] = [p for p in publisher.received() if isinstance(p, Puback)]
        publisher.send(Disconnect())
        return ack.reason_code
    assert one_more() == 0
    broker.stopService()
    broker.startService()
    session = broker.sessions["s"]
    assert (len(session.queue), session.spilled) == (1021, 0)
    assert one_more() == 0


class _Walks(dict):  # type: ignore[type-arg]
    walks = 0

    def values(self):  # type: ignore[no-untyped-def]
        _Walks.walks += 1
        return super().values()


def _walked(group: SharedGroup | None) -> SharedGroup | None:
    """The group, its members counting the walks through them."""
    if group is not None and type(group.members) is not _Walks:
        group.members = _Walks(group.members)
    return group


def test_a_leaving_members_messages_are_handed_on_sorting_the_group_out_once() -> None:
    """Handing on asked for each message whether a member of the group had No Local (a walk of
    the whole group each time: 1,000 members and 20,000 messages, 0.14 s became 0.6 s)."""
    from mqtt_broker.message import Message
    from mqtt_broker.session import Queued
    broker = make_broker()
    broker.startService()
    for n in range(20):
        connected(broker, f"m{n}", 5).subscribe("$share/g/t", qos=1)
    share = ("g", "$share/g/t")
    items = [Queued(Message(topic="t", payload=b"x", qos=1), 1, False, (), share, n) for n in range(2000)]
    _Walks.walks = 0
    broker.delivery.hand_on_all(items, lambda *s: _walked(broker.subscriptions.shared_group(*s)))
    assert _Walks.walks <= 10


def test_a_shared_message_goes_to_a_member_with_room_in_the_store_not_one_at_max_stored_messages() -> None:
    """Two offline members of a shared group: A has reached max_stored_messages, B has room.
    A message whose turn is A's goes to B (as for a full queue without a store), not dropped
    with 0x97 to its MQTT 5 publisher."""
    broker = make_broker(max_queued_messages=1, max_stored_messages=1, store=MemoryStore())
    a = connected(broker, "a", clean=False)
    a.subscribe("$share/g/t", qos=1)
    a.lose()
    pub = connected(broker, "pub", version=5)
    for n in range(2):  # A alone: one in memory, one in the store
        assert pub.publish("t", b"a%d" % n, qos=1, packet_id=n + 1)[0].reason_code == 0  # type: ignore[union-attr]
    b = connected(broker, "b", clean=False)
    b.subscribe("$share/g/t", qos=1)
    b.lose()
    codes = [pub.publish("t", b"m%d" % n, qos=1, packet_id=10 + n)[0].reason_code  # type: ignore[union-attr]
             for n in range(2)]
    assert codes == [0, 0]
    assert broker.stats.messages_dropped == 0



def test_a_shared_message_goes_to_an_idle_connected_member_not_a_slow_one_at_max_stored_messages() -> None:
    """Both members connected: A reads nothing (its queue and its store bound full), B is idle.
    A message whose turn is A's is dropped (0x97) though B would take it at once."""
    broker = make_broker(max_queued_messages=1, max_stored_messages=1, max_inflight_messages=1, store=MemoryStore())
    a = connected(broker, "a", clean=False)
    a.subscribe("$share/g/t", qos=1)
    pub = connected(broker, "pub", version=5)
    for n in range(3):  # A alone: one in flight, one in memory, one in the store
        assert pub.publish("t", b"a%d" % n, qos=1, packet_id=n + 1)[0].reason_code == 0  # type: ignore[union-attr]
    session = broker.sessions["a"]
    assert len(session.outgoing) == 1 and len(session.queue) == 1 and session.spilled == 1
    b = connected(broker, "b", clean=False)
    b.subscribe("$share/g/t", qos=1)
    codes = [pub.publish("t", b"m%d" % n, qos=1, packet_id=10 + n)[0].reason_code  # type: ignore[union-attr]
             for n in range(2)]
    assert codes == [0, 0]
    assert broker.stats.messages_dropped == 0


def test_a_shared_qos0_message_goes_to_a_member_with_room_not_one_full_by_max_queued_bytes() -> None:
    """Two offline members keeping QoS 0: A's queue is full by max_queued_bytes, B's empty. A
    QoS 0 message waits in memory, not in the store: one whose turn was A's was dropped."""
    broker = make_broker(max_queued_bytes=100, queue_qos0_messages=True, store=MemoryStore())
    a = connected(broker, "a", version=5, clean=False, properties={"session_expiry_interval": 100})
    a.subscribe("$share/g/t")
    a.lose()
    pub = connected(broker, "pub", version=5)
    pub.publish("t", b"a" * 90)  # A alone
    b = connected(broker, "b", version=5, clean=False, properties={"session_expiry_interval": 100})
    b.subscribe("$share/g/t")
    b.lose()
    for _ in range(2):
        pub.publish("t", b"b" * 50)
    assert (len(broker.sessions["b"].queue), broker.stats.messages_dropped) == (2, 0)


def test_what_a_leaving_member_spilled_to_the_store_is_counted_dropped_and_logged() -> None:
    """A connected member reads slowly: of four messages, one in flight, one in memory, two in
    the store. Its session ends with its connection: the first two go to another member; the
    two in the store were lost with the session, neither counted nor logged."""
    broker = make_broker(max_queued_messages=1, max_inflight_messages=1, store=MemoryStore())
    a = connected(broker, "a", version=5)
    a.subscribe("$share/g/t", qos=1)
    for n in range(4):
        broker.publish("t", b"%d" % n, qos=1)
    assert broker.sessions["a"].spilled == 2
    b = connected(broker, "b", version=5)
    b.subscribe("$share/g/t", qos=1)
    b.received()
    with capturedLogs() as events:
        a.lose()
    assert (sorted(drain(b)), broker.stats.messages_dropped) == ([b"0", b"1"], 2)
    assert [formatEvent(e) for e in events if "went with its session" in formatEvent(e)] == [
        "2 messages of 'a' in the store went with its session: those of its shared subscriptions are not "
        "handed on to another member"]

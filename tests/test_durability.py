"""What survives a restart of the broker, in-process: one BrokerService stops, the next starts on
the same store (and, on a MemoryReactorClock, the same clock, advanced in between).

The first part runs on a MemoryStore and a MemoryReactorClock; the second on a SQLiteStore and
the real reactor (pytest-twisted), for acknowledgements that wait for the commit, a failing
disk, and crashes: ``crash_copy`` takes what a kill -9 at that moment would leave on disk.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from mqtt_broker import BrokerService
from mqtt_broker.store import Store, StoreError
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.store.sqlite import SQLiteStore
import mqtt_broker.store.sqlite as sqlite_module
from mqtt_broker.protocol import PACKETS_PER_TURN
from mqtt_broker.wire import ReasonCode
from mqtt_broker.wire import (
    Connack, Connect, Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe,
    SubscriptionRequest, Unsuback, Unsubscribe, Will, encode,
)

from durability_helpers import CapturedLog, Receiver, Restarts, crash_copy, rows
from protocol_helpers import FakeClient, connected

NEVER = 0xFFFFFFFF


def persistent(version: int) -> dict[str, Any]:
    """CONNECT arguments of a session that outlives its connection."""
    if version == 5:
        return {"clean": False, "properties": {"session_expiry_interval": NEVER}}
    return {"clean": False}


def reconnect(broker: BrokerService, client_id: str, version: int = 4, **kwargs: Any) -> tuple[FakeClient, Connack]:
    client = FakeClient(broker, version)
    connack = client.connect(client_id, **(kwargs or persistent(version)))
    assert isinstance(connack, Connack) and connack.reason_code == 0, connack
    return client, connack


def subscribe(client: FakeClient, *filters: str, qos: int = 1, packet_id: int = 1, **properties: Any) -> None:
    client.send(Subscribe(packet_id=packet_id, properties=properties, subscriptions=tuple(
        SubscriptionRequest(topic_filter=f, qos=qos) for f in filters)))


def publishes(packets: list[Any]) -> list[Publish]:
    return [p for p in packets if isinstance(p, Publish)]


def answer(client: FakeClient, receiver: Receiver, packets: list[Any]) -> None:
    for packet in packets:
        for reply in receiver.handle(packet):
            client.send(reply)


# --- on a MemoryStore ----------------------------------------------------------------------------

@pytest.fixture
def restarts() -> Restarts:
    return Restarts(MemoryStore())


@pytest.mark.parametrize("version", [4, 5])
def test_session_and_subscriptions_survive_a_restart(restarts: Restarts, version: int) -> None:
    broker = restarts.start()
    s = connected(broker, "s", version, **persistent(version))
    requests = [SubscriptionRequest(topic_filter="a/+", qos=1),
                SubscriptionRequest(topic_filter="$share/g/b/#", qos=2)]
    if version == 5:
        requests.append(SubscriptionRequest(topic_filter="c", qos=2, no_local=True, retain_as_published=True,
                                            retain_handling=2))
    s.send(Subscribe(packet_id=1, subscriptions=tuple(requests),
                     properties={"subscription_identifier": 42} if version == 5 else {}))
    assert [type(p) for p in s.received()] == [Suback]
    before = sorted(broker.subscriptions_of("s"), key=lambda sub: sub.topic_filter)
    assert len(before) == len(requests)
    s.lose()

    broker = restarts.restart()
    assert sorted(broker.subscriptions_of("s"), key=lambda sub: sub.topic_filter) == before
    s, connack = reconnect(broker, "s", version)
    assert connack.session_present
    p = connected(broker, "p", 5)
    p.publish("a/1", b"one", qos=1)
    p.publish("b/x/y", b"two", qos=2)
    got = publishes(s.received())
    assert [(m.topic, m.payload, m.qos) for m in got] == [("a/1", b"one", 1), ("b/x/y", b"two", 2)]
    if version == 5:
        assert got[0].properties.get("subscription_identifier") == [42]
        p.publish("c", b"three", qos=1, retain=True)
        (three,) = publishes(s.received())
        assert three.retain  # retain as published survived


def test_subscription_made_after_a_restart_survives_the_next(restarts: Restarts) -> None:
    broker = restarts.start()
    s = connected(broker, "s", 4, clean=False)
    s.lose()
    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    subscribe(s, "later", qos=1)
    assert [type(p) for p in s.received()] == [Suback]
    s.send(Disconnect())
    broker = restarts.restart()
    assert [sub.topic_filter for sub in broker.subscriptions_of("s")] == ["later"]


def test_queued_qos1_messages_are_delivered_after_a_restart(restarts: Restarts) -> None:
    broker = restarts.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=1)
    s.received()
    s.lose()
    p = connected(broker, "p", 4)
    for n in range(3):
        assert [type(a) for a in p.publish("q", b"m%d" % n, qos=1, packet_id=n + 1)] == [Puback]

    broker = restarts.restart()
    s, connack = reconnect(broker, "s")
    assert connack.session_present
    got = publishes(s.received())
    assert [(m.payload, m.qos, m.dup) for m in got] == [(b"m0", 1, False), (b"m1", 1, False), (b"m2", 1, False)]
    for m in got:
        s.send(Puback(packet_id=m.packet_id))
    s.send(Disconnect())

    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    assert s.received() == []  # acknowledged: gone from the store too


def test_messages_queued_for_a_restored_session_survive_the_next_restart_in_order(restarts: Restarts) -> None:
    """Messages for a session that was restored and has not reconnected are numbered after
    those it already had: across two restarts they come in the order they were published."""
    broker = restarts.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=1)
    s.received()
    s.lose()
    p = connected(broker, "p", 4)
    p.publish("q", b"1", qos=1, packet_id=1)
    p.publish("q", b"2", qos=1, packet_id=2)
    broker = restarts.restart()
    p = connected(broker, "p", 4)
    p.publish("q", b"3", qos=1, packet_id=1)
    p.publish("q", b"4", qos=1, packet_id=2)
    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    got = publishes(s.received())
    assert [m.payload for m in got] == [b"1", b"2", b"3", b"4"]
    s.send(Puback(packet_id=got[0].packet_id))  # the first acknowledged, the others not yet
    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    assert [m.payload for m in publishes(s.received())] == [b"2", b"3", b"4"]


def test_messages_beyond_the_in_memory_queue_survive_a_restart(restarts: Restarts) -> None:
    restarts.settings["max_queued_messages"] = 5
    broker = restarts.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    s.received()
    s.lose()
    p = connected(broker, "p", 4)
    for n in range(12):
        p.publish("q", b"%d" % n, qos=1 + n % 2, packet_id=n + 1)
    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    receiver = Receiver()
    for _ in range(100):
        packets = s.received()
        if not packets:
            break
        answer(s, receiver, packets)
    assert receiver.payloads() == [b"%d" % n for n in range(12)]


def test_in_flight_messages_are_resent_with_dup_and_their_packet_ids(restarts: Restarts) -> None:
    broker = restarts.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    s.received()
    p = connected(broker, "p", 4)
    for n in range(3):  # three exchanges done: the next packet ids are 4 and 5
        p.publish("q", b"done", qos=1, packet_id=n + 1)
        (done,) = publishes(s.received())
        s.send(Puback(packet_id=done.packet_id))
    p.publish("q", b"one", qos=1, packet_id=10)
    p.publish("q", b"two", qos=2, packet_id=11)
    sent = publishes(s.received())
    assert [(m.payload, m.packet_id, m.dup) for m in sent] == [(b"one", 4, False), (b"two", 5, False)]

    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    again = publishes(s.received())
    assert [(m.payload, m.qos, m.packet_id, m.dup) for m in again] == [(b"one", 1, 4, True), (b"two", 2, 5, True)]


def test_qos2_message_whose_pubrec_came_resumes_with_pubrel(restarts: Restarts) -> None:
    broker = restarts.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    s.received()
    p = connected(broker, "p", 4)
    p.publish("q", b"x", qos=2, packet_id=1)
    (sent,) = publishes(s.received())
    s.send(Pubrec(packet_id=sent.packet_id))
    assert s.received() == [Pubrel(packet_id=sent.packet_id)]

    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    assert s.received() == [Pubrel(packet_id=sent.packet_id)]  # not the PUBLISH again [MQTT-4.3.3-5]
    s.send(Pubcomp(packet_id=sent.packet_id))
    s.send(Disconnect())
    broker = restarts.restart()
    s, _ = reconnect(broker, "s")
    assert s.received() == []


@pytest.mark.parametrize("version", [4, 5])
def test_inbound_qos2_awaiting_pubrel_survives_a_restart(restarts: Restarts, version: int) -> None:
    broker = restarts.start()
    watcher = connected(broker, "w", 4, clean=False)
    subscribe(watcher, "q", qos=2)
    watcher.received()
    p = connected(broker, "p", version, **persistent(version))
    assert [type(a) for a in p.publish("q", b"once", qos=2, packet_id=7)] == [Pubrec]
    receiver = Receiver()
    answer(watcher, receiver, watcher.received())

    broker = restarts.restart()
    watcher, _ = reconnect(broker, "w")
    answer(watcher, receiver, watcher.received())
    p, connack = reconnect(broker, "p", version)
    assert connack.session_present
    p.send(Publish(topic="q", payload=b"once", qos=2, packet_id=7, dup=True))  # PUBREC was lost
    assert [(type(a), a.packet_id) for a in p.received()] == [(Pubrec, 7)]
    p.send(Pubrel(packet_id=7))
    (pubcomp,) = p.received()
    assert isinstance(pubcomp, Pubcomp) and pubcomp.reason_code == 0  # the id was known
    answer(watcher, receiver, watcher.received())
    assert receiver.payloads() == [b"once"]
    p.publish("q", b"new", qos=2, packet_id=7)  # the id is free again: a new message
    answer(watcher, receiver, watcher.received())
    assert receiver.payloads() == [b"once", b"new"]


def test_retained_messages_survive_a_restart(restarts: Restarts) -> None:
    broker = restarts.start()
    p = connected(broker, "p", 5)
    props = {"content_type": "text/plain", "user_property": [("unit", "°C")], "response_topic": "back"}
    p.publish("r/kept", b"21", qos=1, retain=True, properties=props)
    p.publish("r/old", b"old", qos=0, retain=True)
    p.publish("r/old", b"", qos=0, retain=True)  # deleted
    p.publish("r/replaced", b"first", qos=1, retain=True)
    p.publish("r/replaced", b"second", qos=0, retain=True)

    broker = restarts.restart()
    s = connected(broker, "s", 5)
    subscribe(s, "r/#", qos=1)
    got = sorted(publishes(s.received()), key=lambda m: m.topic)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
        ("r/kept", b"21", 1, True), ("r/replaced", b"second", 0, True)]
    assert {k: got[0].properties[k] for k in props} == props


def test_session_expiry_counts_the_time_the_broker_was_down(restarts: Restarts) -> None:
    broker = restarts.start()
    s = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 100})
    subscribe(s, "q", qos=1)
    s.received()
    s.send(Disconnect())  # at t=0
    restarts.stop()
    restarts.reactor.advance(60)  # down for a minute
    broker = restarts.start()
    assert "s" in broker.sessions
    restarts.reactor.advance(39)
    assert "s" in broker.sessions
    restarts.reactor.advance(2)  # 101 s after the client left
    assert "s" not in broker.sessions
    s, connack = reconnect(broker, "s", 5)
    assert not connack.session_present


@pytest.mark.parametrize("version", [4, 5])
def test_persistent_client_expiration_set_later_applies_to_the_sessions_restored(restarts: Restarts,
                                                                              version: int) -> None:
    """An operator sets persistent_client_expiration to clear the sessions abandoned so far (MQTT
    3's clean session 0; MQTT 5's 4294967295, as in Mosquitto): each had never to expire, and
    restored so, none ever did. One of a finite interval keeps it."""
    broker = restarts.start()
    reconnect(broker, "abandoned", version)[0].lose()
    reconnect(broker, "for-a-day", 5, clean=False, properties={"session_expiry_interval": 86400})[0].lose()
    restarts.stop()
    restarts.settings["persistent_client_expiration"] = 3600
    broker = restarts.start()
    assert {"abandoned", "for-a-day"} <= broker.sessions.keys()
    restarts.reactor.advance(3601)
    assert "abandoned" not in broker.sessions and "for-a-day" in broker.sessions
    if version == 5:  # and a CONNECT asking for ever is told the interval it gets
        connack = reconnect(broker, "abandoned", 5)[1]
        assert connack.properties["session_expiry_interval"] == 3600


def test_session_that_expired_while_the_broker_was_down_is_gone(restarts: Restarts) -> None:
    broker = restarts.start()
    s = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 100})
    subscribe(s, "q", qos=1)
    s.received()
    s.lose()
    restarts.stop()
    restarts.reactor.advance(150)
    broker = restarts.start()
    s, connack = reconnect(broker, "s", 5)
    assert not connack.session_present
    assert broker.subscriptions_of("s") == []


def test_session_connected_when_the_broker_stopped_expires_from_then(restarts: Restarts) -> None:
    broker = restarts.start()
    connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 100})
    restarts.reactor.advance(30)
    restarts.stop()  # the client goes away with the broker, at t=30
    restarts.reactor.advance(50)
    broker = restarts.start()
    restarts.reactor.advance(49)
    assert "s" in broker.sessions
    restarts.reactor.advance(2)
    assert "s" not in broker.sessions


def _left_before_the_clock_stepped_back(restarts: Restarts, client_id: str, **connect: Any) -> BrokerService:
    """The client left at 10,000 on the clock; the broker, stopped then, starts again at 5,000 on
    a clock that stepped back meanwhile (NTP after a bad real-time clock)."""
    restarts.reactor.advance(10_000)
    connected(restarts.start(), client_id, 5, clean=False, **connect).lose()
    restarts.stop()
    restarts.reactor = MemoryReactorClock()
    restarts.reactor.advance(5_000)
    return restarts.start()


def test_a_session_restored_after_the_clock_stepped_back_ends_within_its_expiry(restarts: Restarts) -> None:
    """The system clock stepped back while the broker was down (NTP after a bad real-time
    clock): the session of a client that left at 10,000 on the old clock, restored at 5,000 on
    the new, lived 5,100 s, not at most its 100 s."""
    broker = _left_before_the_clock_stepped_back(restarts, "s", properties={"session_expiry_interval": 100})
    restarts.reactor.advance(99)
    assert "s" in broker.sessions
    restarts.reactor.advance(1)
    assert "s" not in broker.sessions


def test_a_session_restored_after_the_clock_stepped_back_counts_the_time_down_at_the_next_start(
        restarts: Restarts) -> None:
    """The time counted from was kept only in memory: each start while the clock was still behind
    counted the expiry from itself again, not the time the broker was down since."""
    broker = _left_before_the_clock_stepped_back(restarts, "s", properties={"session_expiry_interval": 100})
    restarts.reactor.advance(10)
    restarts.stop()
    restarts.reactor.advance(1_000)  # (down past the session's end, at 5,100)
    broker = restarts.start()
    assert "s" not in broker.sessions


def test_delayed_will_survives_a_restart_and_fires_at_its_time(restarts: Restarts) -> None:
    broker = restarts.start()
    will = Will(topic="wills/w", payload=b"gone", qos=1, retain=False,
                properties={"will_delay_interval": 30, "content_type": "note"})
    w = connected(broker, "w", 5, clean=False, will=will, properties={"session_expiry_interval": 300})
    w.lose()  # at t=0: the will is due at t=30
    restarts.stop()
    restarts.reactor.advance(10)
    broker = restarts.start()
    watcher = connected(broker, "watcher", 5)
    subscribe(watcher, "wills/#", qos=1)
    watcher.received()
    restarts.reactor.advance(19)
    assert watcher.received() == []
    restarts.reactor.advance(2)
    (fired,) = publishes(watcher.received())
    assert (fired.topic, fired.payload, fired.qos) == ("wills/w", b"gone", 1)
    assert fired.properties.get("content_type") == "note"
    assert "will_delay_interval" not in fired.properties
    restarts.reactor.advance(1000)
    assert watcher.received() == []


def test_a_clean_stop_publishes_the_wills_of_the_clients_connected_then(restarts: Restarts) -> None:
    """docs/durability.md: a clean stop closes every connection first, so that their wills go as
    when a connection is lost: at once, or after their delay (kept meanwhile, and published after
    the restart)."""
    broker = restarts.start()
    watcher = connected(broker, "watcher", 4, clean=False)
    subscribe(watcher, "wills/#", qos=1)
    watcher.received()
    connected(broker, "now", 4, will=Will(topic="wills/now", payload=b"now", qos=1))
    connected(broker, "later", 5, clean=False, properties={"session_expiry_interval": 300},
              will=Will(topic="wills/later", payload=b"later", qos=1, properties={"will_delay_interval": 30}))
    restarts.stop()  # at t=0, with all three connected
    restarts.reactor.advance(10)
    broker = restarts.start()
    watcher, _ = reconnect(broker, "watcher")
    restarts.reactor.advance(0)
    (now,) = publishes(watcher.received())
    assert now.payload == b"now"
    watcher.send(Puback(packet_id=now.packet_id))
    restarts.reactor.advance(19)
    assert watcher.received() == []
    restarts.reactor.advance(2)
    assert [m.payload for m in publishes(watcher.received())] == [b"later"]


def test_delayed_will_due_while_the_broker_was_down_fires_at_start(restarts: Restarts) -> None:
    broker = restarts.start()
    will = Will(topic="wills/w", payload=b"gone", qos=0, properties={"will_delay_interval": 30})
    w = connected(broker, "w", 5, clean=False, will=will, properties={"session_expiry_interval": 300})
    watcher = connected(broker, "watcher", 4, clean=False)
    subscribe(watcher, "wills/#", qos=1)
    watcher.received()
    w.lose()
    restarts.stop()
    restarts.reactor.advance(100)
    broker = restarts.start()
    watcher, _ = reconnect(broker, "watcher")
    restarts.reactor.advance(0)
    assert [m.payload for m in publishes(watcher.received())] == [b"gone"]


def test_a_delayed_will_whose_session_ends_at_the_start_is_published_then(restarts: Restarts) -> None:
    """A will goes when its delay is over or its session ends, whichever comes first
    [MQTT-3.1.3-9]: started with a shorter max_session_expiry_interval, a session that ended
    while the broker was down takes its will with it at the start, not at the will's own time."""
    broker = restarts.start()
    w = connected(broker, "w", 5, clean=False, properties={"session_expiry_interval": 1000},
                  will=Will(topic="wills/w", payload=b"gone", properties={"will_delay_interval": 500}))
    w.lose()
    restarts.stop()
    restarts.reactor.advance(100)
    restarts.settings["max_session_expiry_interval"] = 50
    broker = restarts.start()
    assert "w" not in broker.sessions
    watcher = connected(broker, "watcher", 4)
    subscribe(watcher, "wills/#")
    watcher.received()
    restarts.reactor.advance(0)
    assert [m.payload for m in publishes(watcher.received())] == [b"gone"]
    assert "w" not in broker.wills


def test_a_delayed_will_restored_after_the_clock_stepped_back_waits_no_longer_than_its_delay(
        restarts: Restarts) -> None:
    """As a session after the clock stepped back: the will of a client that left at 10,000 on
    the old clock, restored at 5,000 on the new, waited 5,030 s, not its 30 s."""
    broker = _left_before_the_clock_stepped_back(restarts, "w", properties={"session_expiry_interval": NEVER},
                                                 will=Will(topic="wills/w", payload=b"gone",
                                                           properties={"will_delay_interval": 30}))
    watcher = connected(broker, "watcher", 4)
    subscribe(watcher, "wills/#")
    watcher.received()
    restarts.reactor.advance(29)
    assert watcher.received() == []
    restarts.reactor.advance(1)
    assert [m.payload for m in publishes(watcher.received())] == [b"gone"]


def test_a_delayed_will_restored_after_the_clock_stepped_back_is_due_at_the_next_start(
        restarts: Restarts) -> None:
    """As a session's: the will's corrected due time was kept in memory only, and the next start
    counted its delay from itself again."""
    _left_before_the_clock_stepped_back(restarts, "w", properties={"session_expiry_interval": NEVER},
                                        will=Will(topic="wills/w", payload=b"gone",
                                                  properties={"will_delay_interval": 30}))
    restarts.reactor.advance(10)
    restarts.stop()
    restarts.reactor.advance(1_000)  # (down past 5,030, when it was due)
    broker = restarts.start()
    watcher = connected(broker, "watcher", 4)
    subscribe(watcher, "wills/#")
    watcher.received()
    restarts.reactor.advance(0)
    assert [m.payload for m in publishes(watcher.received())] == [b"gone"]


def test_delayed_will_of_a_client_back_before_its_time_is_not_published(restarts: Restarts) -> None:
    broker = restarts.start()
    will = Will(topic="wills/w", payload=b"gone", properties={"will_delay_interval": 30})
    w = connected(broker, "w", 5, clean=False, will=will, properties={"session_expiry_interval": 300})
    w.lose()
    broker = restarts.restart()
    watcher = connected(broker, "watcher", 4)
    subscribe(watcher, "wills/#", qos=1)
    watcher.received()
    reconnect(broker, "w", 5)  # back at t=0: the will is cancelled
    broker = restarts.restart()
    watcher = connected(broker, "watcher", 4)
    subscribe(watcher, "wills/#", qos=1)
    watcher.received()
    restarts.reactor.advance(100)
    assert watcher.received() == []


def test_message_expiry_is_measured_across_a_restart(restarts: Restarts) -> None:
    broker = restarts.start()
    s = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": NEVER})
    subscribe(s, "e", qos=1)
    s.received()
    s.lose()
    p = connected(broker, "p", 5)
    p.publish("e", b"short", qos=1, properties={"message_expiry_interval": 30})
    p.publish("e", b"long", qos=1, packet_id=2, properties={"message_expiry_interval": 100})
    p.publish("e", b"forever", qos=1, packet_id=3)
    p.publish("r", b"retained briefly", qos=1, retain=True, packet_id=4, properties={"message_expiry_interval": 30})
    restarts.stop()
    restarts.reactor.advance(40)
    broker = restarts.start()
    s, _ = reconnect(broker, "s", 5)
    got = publishes(s.received())
    assert [m.payload for m in got] == [b"long", b"forever"]  # never the expired one [MQTT-3.3.2-5]
    assert got[0].properties["message_expiry_interval"] == 60  # what is left of it [MQTT-3.3.2-6]
    assert "message_expiry_interval" not in got[1].properties
    late = connected(broker, "late", 5)
    subscribe(late, "r", qos=1)
    assert publishes(late.received()) == []


# --- on a SQLiteStore, with the real reactor ----------------------------------------------------

class SQLiteRestarts(Restarts):
    def __init__(self, path: Path, **settings: Any) -> None:
        self.path = path
        super().__init__(lambda: SQLiteStore(self.path, reactor), reactor=reactor, **settings)

    @property
    def store(self) -> SQLiteStore:
        assert self.broker is not None
        return self.broker.store  # type: ignore[return-value]

    @pytest_twisted.inlineCallbacks
    def again(self, path: Path | None = None) -> Iterator[Deferred[Any]]:
        """Stop, then start on the same file (or on ``path``, a crash copy)."""
        yield self.stop()
        if path is not None:
            self.path = path
        return self.start()


@pytest_twisted.inlineCallbacks
def test_sqlite_a_delayed_will_whose_session_ends_at_the_start_is_published_then(
        tmp_path: Path) -> Iterator[Deferred[Any]]:
    """On SQLite too (the store keeps the will with the time it is due): published at the start,
    once, where the session it outlived has ended."""
    clock = Clock()
    restarts = SQLiteRestarts(tmp_path / "mqttbroker.db", clock=clock)
    broker = restarts.start()
    w = connected(broker, "w", 5, clean=False, properties={"session_expiry_interval": 1000},
                  will=Will(topic="wills/w", payload=b"gone", qos=1, properties={"will_delay_interval": 500}))
    w.lose()
    yield restarts.store.flushed()
    yield restarts.stop()
    clock.advance(100)
    restarts.settings["max_session_expiry_interval"] = 50
    broker = restarts.start()
    try:
        watcher = connected(broker, "watcher", 4)
        subscribe(watcher, "wills/#")
        watcher.received()
        clock.advance(0)
        assert [m.payload for m in publishes(watcher.received())] == [b"gone"]
        yield restarts.store.flushed()
        with closing(sqlite3.connect(restarts.path)) as db:
            assert db.execute("SELECT count(*) FROM wills").fetchone() == (0,)
    finally:
        yield restarts.stop()


@pytest.fixture
def on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SQLiteRestarts]:
    # A failed batch is tried again only after RETRY_AFTER: soon, for the tests of a full disk.
    monkeypatch.setattr(sqlite_module, "RETRY_AFTER", 0.01)
    r = SQLiteRestarts(tmp_path / "mqttbroker.db")
    yield r
    pytest_twisted.blockon(r.stop())


def watch_written(store: SQLiteStore, look: Any) -> list[Any]:
    """Call ``look()`` as each batch comes back from the writer thread, before anyone is told."""
    seen: list[Any] = []
    original = store._written

    def written(result: Any, *args: Any) -> None:
        seen.append(look())
        original(result, *args)
    store._written = written  # type: ignore[method-assign]
    return seen


@pytest_twisted.inlineCallbacks
def test_sqlite_session_and_its_messages_survive_a_restart(on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q1", qos=1)
    subscribe(s, "q2", qos=2, packet_id=2)
    yield on_disk.store.flushed()
    assert [type(p) for p in s.received()] == [Suback, Suback]
    p = connected(broker, "p", 4, clean=False)
    p.send(Publish(topic="q1", payload=b"in flight", qos=1, packet_id=1),
           Publish(topic="q2", payload=b"released", qos=2, packet_id=2),
           Publish(topic="r", payload=b"retained", qos=1, retain=True, packet_id=3))
    yield on_disk.store.flushed()
    one, two = publishes(s.received())
    s.send(Pubrec(packet_id=two.packet_id))
    yield on_disk.store.flushed()  # PUBREL once the store knows the PUBREC [MQTT-4.3.3-5]
    assert s.received() == [Pubrel(packet_id=two.packet_id)]
    s.lose()
    p.send(Publish(topic="q1", payload=b"queued", qos=1, packet_id=4))
    yield on_disk.store.flushed()
    assert [(type(a), a.packet_id) for a in p.received()] == [(Puback, 1), (Pubrec, 2), (Puback, 3), (Puback, 4)]

    broker = yield on_disk.again()
    s, connack = reconnect(broker, "s")
    assert connack.session_present
    yield on_disk.store.flushed()  # what is resent goes out once the store holds the session's state
    got = s.received()
    assert [(type(x).__name__, getattr(x, "payload", None), x.packet_id, getattr(x, "dup", None)) for x in got] == [
        ("Publish", b"in flight", one.packet_id, True), ("Pubrel", None, two.packet_id, None),
        ("Publish", b"queued", got[2].packet_id, False)]
    late = connected(broker, "late", 4)
    subscribe(late, "r", qos=1)
    assert [m.payload for m in publishes(late.received())] == [b"retained"]

    for packet in got:  # everything acknowledged: nothing comes after the next restart
        s.send(Pubcomp(packet_id=packet.packet_id) if isinstance(packet, Pubrel) else Puback(packet_id=packet.packet_id))
    yield on_disk.store.flushed()
    broker = yield on_disk.again()
    s, connack = reconnect(broker, "s")
    assert connack.session_present and s.received() == []
    assert rows(on_disk.path, "SELECT COUNT(*) FROM deliveries") == [(0,)]


@pytest_twisted.inlineCallbacks
def test_sqlite_messages_for_a_restored_session_survive_the_next_restart(
        on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=1)
    yield on_disk.store.flushed()
    s.lose()
    p = connected(broker, "p", 4)
    p.publish("q", b"1", qos=1, packet_id=1)
    broker = yield on_disk.again()
    p = connected(broker, "p", 4)
    p.publish("q", b"2", qos=1, packet_id=1)
    yield on_disk.store.flushed()
    assert [type(a) for a in p.received()] == [Puback]
    broker = yield on_disk.again()
    s, _ = reconnect(broker, "s")
    assert [m.payload for m in publishes((yield when_stored(on_disk.store, s)))] == [b"1", b"2"]


def of_0_1_0(path: Path, table: str, row: str) -> None:
    """A database as 0.1.0 left it: ``table`` (its CREATE TABLE, without those words) with ``row``
    (its INSERT INTO, without those)."""
    with closing(sqlite3.connect(str(path))) as db:
        db.execute(f"CREATE TABLE {table}")
        db.execute(f"INSERT INTO {row}")
        db.commit()


@pytest.mark.parametrize("old_schema", [False, True], ids=["new", "of-0.1.0"])
@pytest_twisted.inlineCallbacks
def test_a_replay_after_a_restart_keeps_no_local(tmp_path: Path, old_schema: bool) -> Iterator[Deferred[Any]]:
    """The message log kept no sender on disk: after a restart, a replay with No Local sent the
    client its own messages [MQTT-3.8.3-3] (docs/message-log.md). A database of 0.1.0, whose log
    has no sender column, is given one: what it logged before has no sender and is replayed."""
    path = tmp_path / "mqttbroker.db"
    if old_schema:
        of_0_1_0(path, "history (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER "
                 "NOT NULL, properties BLOB NOT NULL, expires_at REAL, at REAL NOT NULL)",
                 "history VALUES (1, 's/before', X'6F6C64', 0, X'00', NULL, 1.0)")
    r = SQLiteRestarts(path, history_filters=["s/#"])
    try:
        broker = r.start()
        connected(broker, "me", 5).publish("s/mine", b"mine")
        connected(broker, "other", 5).publish("s/theirs", b"theirs")
        yield r.store.flushed()
        broker = yield r.again()
        me = connected(broker, "me", 5)
        me.send(Subscribe(packet_id=1, properties={"user_property": [("replay", "all")]},
                          subscriptions=(SubscriptionRequest(topic_filter="s/#", qos=0, no_local=True),)))
        got = yield when_stored(r.store, me)
        assert [p.payload for p in publishes(got)] == ([b"old", b"theirs"] if old_schema else [b"theirs"])
    finally:
        yield r.stop()


@pytest.mark.parametrize("old_schema", [False, True], ids=["new", "of-0.1.0"])
@pytest_twisted.inlineCallbacks
def test_a_retained_message_keeps_its_sender_for_no_local_after_a_restart(
        tmp_path: Path, old_schema: bool) -> Iterator[Deferred[Any]]:
    """No Local holds for retained messages too [MQTT-3.8.3-3]: a bridge with `both` was sent its
    own retained messages back at each reconnection, an old value over a newer one after an
    outage. The store kept no sender: after a restart the client was sent its own. A database of
    0.1.0 is given the column (what it retained before has no sender, and is sent)."""
    path = tmp_path / "mqttbroker.db"
    if old_schema:
        of_0_1_0(path, "retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL, "
                 "properties BLOB NOT NULL, expires_at REAL)", "retained VALUES ('s/before', X'6F6C64', 0, X'00', NULL)")
    r = SQLiteRestarts(path)
    try:
        broker = r.start()
        connected(broker, "me", 5).publish("s/mine", b"mine", retain=True)
        connected(broker, "other", 5).publish("s/theirs", b"theirs", retain=True)
        yield r.store.flushed()
        broker = yield r.again()
        me = connected(broker, "me", 5)
        me.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="s/#", qos=0, no_local=True),)))
        got = yield when_stored(r.store, me)
        assert sorted(p.payload for p in publishes(got)) == ([b"old", b"theirs"] if old_schema else [b"theirs"])
    finally:
        yield r.stop()


@pytest.mark.parametrize("qos", [1, 2])
@pytest_twisted.inlineCallbacks
def test_puback_and_pubrec_go_out_only_once_the_message_is_committed(
        on_disk: SQLiteRestarts, qos: int) -> Iterator[Deferred[Any]]:
    broker = on_disk.start()
    s = connected(broker, "s", 5, **persistent(5))
    subscribe(s, "q", qos=2)
    yield on_disk.store.flushed()
    s.lose()
    yield on_disk.store.flushed()
    p = connected(broker, "p", 5)
    committed = "SELECT COUNT(*) FROM deliveries WHERE client_id = 's'"
    seen = watch_written(on_disk.store, lambda: (p.transport.value(), rows(on_disk.path, committed)[0][0]))
    p.send(Publish(topic="q", payload=b"m", qos=qos, packet_id=9))
    assert p.transport.value() == b""  # not before the batch is written
    yield on_disk.store.flushed()
    assert seen == [(b"", 1)]  # the commit was on disk, and still no acknowledgement
    (ack,) = p.received()
    assert type(ack) is (Puback if qos == 1 else Pubrec) and (ack.packet_id, ack.reason_code) == (9, 0)


@pytest_twisted.inlineCallbacks
def test_suback_goes_out_only_once_the_subscription_is_committed(
        on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    broker = on_disk.start()
    s = connected(broker, "s", 5, **persistent(5))
    yield on_disk.store.flushed()
    committed = "SELECT topic_filter, qos, subscription_id FROM subscriptions"
    seen = watch_written(on_disk.store, lambda: (s.transport.value(), rows(on_disk.path, committed)))
    subscribe(s, "a/#", qos=2, subscription_identifier=3)
    assert s.transport.value() == b""
    yield on_disk.store.flushed()
    assert seen == [(b"", [("a/#", 2, 3)])]
    (suback,) = s.received()
    assert isinstance(suback, Suback) and suback.reason_codes == (2,)


def fill_up(store: SQLiteStore) -> None:
    assert store._db is not None
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def make_room(store: SQLiteStore) -> None:
    assert store._db is not None
    store._db.execute("PRAGMA max_page_count = 1073741823")


@pytest_twisted.inlineCallbacks
def settle(store: SQLiteStore) -> Iterator[Deferred[Any]]:
    """Wait for the store, whether its batch is written or fails."""
    try:
        yield store.flushed()
    except StoreError:
        pass


@pytest_twisted.inlineCallbacks
def test_a_subscription_changed_on_a_full_disk_stays_as_it_was(
        on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    """A SUBSCRIBE the store cannot write is refused (0x80): the subscription of that filter
    committed before stays, with its options. It was removed, from memory and, once the disk had
    room, from the disk."""
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "t", qos=1)
    yield on_disk.store.flushed()
    assert [type(x) for x in s.received()] == [Suback]
    filler = connected(broker, "filler", 5)
    yield on_disk.store.flushed()
    fill_up(on_disk.store)
    filler.publish("big", os.urandom(300_000), qos=1, retain=True)  # fails its batch
    subscribe(s, "t", "u", qos=2, packet_id=2)  # in the failing batch
    yield settle(on_disk.store)
    (suback,) = s.received()
    assert suback.reason_codes == (0x80, 0x80)
    make_room(on_disk.store)
    yield on_disk.store.flushed()
    committed = rows(on_disk.path, "SELECT topic_filter, qos FROM subscriptions WHERE client_id = 's'")
    assert [(sub.topic_filter, sub.qos) for sub in broker.subscriptions_of("s")] == [("t", 1)] == committed


@pytest_twisted.inlineCallbacks
def test_a_full_disk_stops_acknowledgements_keeps_qos0_and_recovers(
        on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    broker = on_disk.start()
    offline = connected(broker, "offline", 4, clean=False)  # makes every QoS 1/2 message a write
    subscribe(offline, "t", qos=2)
    yield on_disk.store.flushed()
    offline.lose()
    online = connected(broker, "online", 4)
    subscribe(online, "t", qos=0)
    online.received()
    p5 = connected(broker, "p5", 5)
    p3 = connected(broker, "p3", 4, clean=False)
    yield on_disk.store.flushed()
    big = os.urandom(300_000)

    def message(tag: bytes, qos: int, packet_id: int, dup: bool = False) -> Publish:
        return Publish(topic="t", payload=tag + big, qos=qos, packet_id=packet_id, dup=dup)
    fill_up(on_disk.store)
    with CapturedLog() as log:
        p5.send(message(b"p5-1", 1, 1))
        yield settle(on_disk.store)
        (ack,) = p5.received()
        assert isinstance(ack, Puback) and ack.reason_code == 0x80
        assert ack.properties.get("reason_string")
        p5.send(message(b"p5-2", 2, 2))
        yield settle(on_disk.store)
        (rec,) = p5.received()
        assert isinstance(rec, Pubrec) and rec.reason_code == 0x80
        p3.send(message(b"p3-3", 1, 3), message(b"p3-4", 2, 4))
        yield settle(on_disk.store)
        assert p3.received() == [] and not p3.closed  # MQTT 3: no acknowledgement, still connected
        p5.send(Publish(topic="t", payload=b"qos0 still flows", qos=0))
        assert [m.payload for m in publishes(online.received())][-1] == b"qos0 still flows"
        assert len(log.matching("cannot write to")) == 1, log.texts()

        make_room(on_disk.store)
        p5.send(message(b"p5-5", 1, 5), message(b"p5-6", 2, 6))
        p3.send(message(b"p3-3", 1, 3, dup=True), message(b"p3-4", 2, 4, dup=True))  # MQTT 3 sends again
        yield on_disk.store.flushed()
        assert [(type(a), a.packet_id, a.reason_code) for a in p5.received()] == [(Puback, 5, 0), (Pubrec, 6, 0)]
        assert [(type(a), a.packet_id) for a in p3.received()] == [(Puback, 3), (Pubrec, 4)]
        assert len(log.matching("writing to")) == 1
    offline, _ = reconnect(broker, "offline")
    receiver = Receiver()
    for _ in range(100):  # one large message per round
        yield on_disk.store.flushed()  # PUBREL follows PUBREC once the store has it
        packets = offline.received()
        if not packets:
            break
        answer(offline, receiver, packets)
    tags = [payload[:4] for payload in receiver.payloads()]
    assert {b"p5-5", b"p5-6", b"p3-3", b"p3-4"} <= set(tags)  # every acknowledged message
    # QoS 2 exactly once: the MQTT 3 publisher got no PUBREC and sent it again; whatever the
    # broker did with the first copy, the subscriber gets one.
    assert tags.count(b"p3-4") == 1, tags


@pytest.mark.parametrize("then", ["the disk gets room", "the broker is killed"])
@pytest_twisted.inlineCallbacks
def test_a_qos2_message_waits_for_a_full_disk_and_a_qos1_one_does_not(
        on_disk: SQLiteRestarts, tmp_path: Path, then: str) -> Iterator[Deferred[Any]]:
    """Sent while its packet id cannot be stored, a QoS 2 message would be lost by a crash: the
    restarted broker gives that id to the next message, which the subscriber, still holding the
    id until a PUBREL, takes for a resend and drops. So it waits for the disk; a QoS 1 message,
    which a crash can only repeat, goes out."""
    broker = on_disk.start()
    exact = connected(broker, "exact", 4, clean=False)
    subscribe(exact, "q", qos=2)
    once = connected(broker, "once", 4, clean=False)
    subscribe(once, "q", qos=1)
    p = connected(broker, "p", 5)
    yield on_disk.store.flushed()
    exact.received(), once.received()
    fill_up(on_disk.store)
    p.publish("q", os.urandom(300_000), qos=2, packet_id=1)  # (too large for what is left)
    yield settle(on_disk.store)
    assert p.received()[0].reason_code == 0x80
    assert len(publishes(once.received())) == 1
    assert exact.received() == []
    receiver = Receiver()
    if then == "the disk gets room":
        make_room(on_disk.store)
        yield on_disk.store.flushed()  # the store's next try
        answer(exact, receiver, exact.received())
        assert len(receiver.payloads()) == 1
        return
    crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
    make_room(on_disk.store)  # (for the store to stop: the crash copy is what restarts)
    broker = yield on_disk.again(crashed)
    exact, _ = reconnect(broker, "exact")
    connected(broker, "p2", 4).publish("q", b"after the crash", qos=2, packet_id=1)
    for _ in range(3):
        answer(exact, receiver, (yield when_stored(on_disk.store, exact)))
    assert receiver.payloads() == [b"after the crash"]


@pytest_twisted.inlineCallbacks
def test_only_a_stored_session_sent_a_qos2_message_waits_for_a_full_disk(
        on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    """The QoS 2 message of a stored publisher is held for every connection that may be sent it
    until its packet id is stored; through a failing disk, only a stored session sent it at QoS 2
    waits on. A shared group's member not chosen, and a clean session, are served."""
    broker = on_disk.start()
    kept = connected(broker, "kept", 4, clean=False)
    subscribe(kept, "q", qos=2)
    live = connected(broker, "live", 4)
    subscribe(live, "q", qos=2)
    members = [connected(broker, f"member{n}", 4, clean=False) for n in range(2)]
    for member in members:
        subscribe(member, "$share/g/q", qos=2)
    p = connected(broker, "p", 4, clean=False)
    yield on_disk.store.flushed()
    for client in (kept, live, *members):
        client.received()
    fill_up(on_disk.store)
    p.send(Publish(topic="q", payload=os.urandom(300_000), qos=2, packet_id=1))
    yield settle(on_disk.store)
    assert len(publishes(live.received())) == 1
    assert kept.received() == []
    for n, member in enumerate(members):
        subscribe(member, f"other/{n}", qos=0, packet_id=2)
    yield settle(on_disk.store)  # (refused: the disk is full)
    # The member chosen waits (its PUBLISH, then its SUBACK); the other is answered.
    assert sorted([type(x).__name__ for x in m.received()] for m in members) == [[], ["Suback"]]
    make_room(on_disk.store)
    yield on_disk.store.flushed()
    assert len(publishes(kept.received())) == 1
    assert sorted([type(x).__name__ for x in m.received()] for m in members) == [[], ["Publish", "Suback"]]


@pytest_twisted.inlineCallbacks
def test_pubcomp_waits_for_a_full_disk(on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    """Sent before the store forgets the packet id, a PUBCOMP lets the publisher use it again at
    once; after a crash the broker would take that new message for a resend and drop it."""
    broker = on_disk.start()
    p = connected(broker, "p", 4, clean=False)
    yield on_disk.store.flushed()
    p.publish("q", b"x", qos=2, packet_id=7)
    assert [type(x) for x in (yield when_stored(on_disk.store, p))] == [Pubrec]
    fill_up(on_disk.store)
    connected(broker, "filler", 5).publish("r", os.urandom(300_000), qos=1, retain=True)  # fails the batch
    p.send(Pubrel(packet_id=7))
    yield settle(on_disk.store)
    assert p.received() == []
    p.send(Pingreq())
    assert p.received() == [Pingresp()]  # ahead of the PUBCOMP: the client keeps its connection
    make_room(on_disk.store)
    yield on_disk.store.flushed()
    assert p.received() == [Pubcomp(packet_id=7)]


@pytest_twisted.inlineCallbacks
def test_a_session_begun_while_the_disk_was_full_survives_once_it_has_room(
        on_disk: SQLiteRestarts, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """The client connected (its session recorded in a batch that failed), the disk got room,
    the client subscribed and got its SUBACK, then the broker was killed: after the restart,
    its session and subscription are there."""
    broker = on_disk.start()
    p5 = connected(broker, "p5", 5)
    yield on_disk.store.flushed()
    fill_up(on_disk.store)
    p5.send(Publish(topic="big", payload=os.urandom(300_000), qos=1, retain=True, packet_id=1))
    s = connected(broker, "s", 4, clean=False)  # in the same batch as the retained message
    yield settle(on_disk.store)
    assert p5.received()[0].reason_code == 0x80
    make_room(on_disk.store)
    subscribe(s, "t", qos=1)
    yield on_disk.store.flushed()
    assert [type(p) for p in s.received()] == [Suback]
    crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")  # killed now

    broker = yield on_disk.again(crashed)
    s, connack = reconnect(broker, "s")
    assert connack.session_present
    assert [sub.topic_filter for sub in broker.subscriptions_of("s")] == ["t"]


# --- crashes: what a kill -9 would leave --------------------------------------------------------

def when_stored(store: Store, client: FakeClient) -> Deferred[list[Any]]:
    """What the client is sent once the store has written what is recorded so far: a PUBLISH
    to a stored session, and a PUBREL or PUBCOMP, go out only then."""
    return store.flushed().addCallback(lambda _: client.received())


@pytest_twisted.inlineCallbacks
def subscriber_away_and_publisher(on_disk: SQLiteRestarts) -> Iterator[Deferred[Any]]:
    """On the started broker: a subscriber "s" of "q" at QoS 2, stored and gone, and a publisher
    "p" of a session that outlives its connection, returned."""
    assert on_disk.broker is not None
    s = connected(on_disk.broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    yield on_disk.store.flushed()
    s.lose()
    return connected(on_disk.broker, "p", 5, **persistent(5))


@pytest_twisted.inlineCallbacks
def test_acknowledged_messages_survive_a_crash(on_disk: SQLiteRestarts, tmp_path: Path) -> Iterator[Deferred[Any]]:
    broker = on_disk.start()
    p = yield subscriber_away_and_publisher(on_disk)
    p.publish("q", b"one", qos=1, packet_id=1)
    p.publish("q", b"two", qos=2, packet_id=2)
    yield on_disk.store.flushed()
    assert [type(a) for a in p.received()] == [Puback, Pubrec]
    crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
    broker = yield on_disk.again(crashed)
    s, _ = reconnect(broker, "s")
    got = yield when_stored(on_disk.store, s)
    assert [m.payload for m in publishes(got)] == [b"one", b"two"]
    p, _ = reconnect(broker, "p", 5)
    p.send(Publish(topic="q", payload=b"two", qos=2, packet_id=2, dup=True))  # PUBREC lost in the crash
    yield on_disk.store.flushed()  # acknowledgements keep their order through the store
    assert [type(a) for a in p.received()] == [Pubrec]
    got = yield when_stored(on_disk.store, s)
    assert publishes(got) == []  # not routed a second time


@pytest_twisted.inlineCallbacks
def test_session_expiry_counts_the_time_down_after_a_kill_9(tmp_path: Path) -> Iterator[Deferred[Any]]:
    """A session whose client was connected when the broker was killed counted its expiry from
    the restart, as if its client had been there all the while the broker was down: after each
    crash a full expiry again. It counts from the broker's last note that it was alive (every
    ALIVE_EVERY seconds), within those seconds of the kill."""
    from mqtt_broker.broker import ALIVE_EVERY
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    on_disk = SQLiteRestarts(tmp_path / "mqttbroker.db", clock=clock)
    try:
        broker = on_disk.start()
        connected(broker, "gone", 5, clean=False, properties={"session_expiry_interval": 100})
        connected(broker, "kept", 5, clean=False, properties={"session_expiry_interval": 1000})
        yield on_disk.store.flushed()
        clock.advance(3 * ALIVE_EVERY)  # a note each time
        yield on_disk.store.flushed()
        noted = clock.seconds()
        crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")  # killed now, both connected
        clock.advance(600)  # down for ten minutes
        broker = yield on_disk.again(crashed)
        assert "gone" not in broker.sessions and "kept" in broker.sessions
        yield on_disk.store.flushed()
        assert rows(on_disk.path, "SELECT disconnected_at FROM sessions WHERE client_id = 'kept'") == [(noted,)]
    finally:
        yield on_disk.stop()


@inlineCallbacks
def s_kept_through_a_kill_9(on_disk: SQLiteRestarts, clock: MemoryReactorClock, tmp_path: Path, noted: float,
                            *also: str) -> Iterator[Deferred[Any]]:
    """Killed now and started again half a second later, the broker has the session of "s" (and
    those of ``also``), noted as connected until ``noted``, and the message acknowledged to its
    publisher for it."""
    crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
    clock.advance(0.5)
    broker = yield on_disk.again(crashed)
    assert [c for c in ("s", *also) if c not in broker.sessions] == []
    yield on_disk.store.flushed()
    assert rows(on_disk.path, "SELECT disconnected_at FROM sessions WHERE client_id = 's'") == [(noted,)]
    s, connack = reconnect(broker, "s", 5)
    got = yield when_stored(on_disk.store, s)
    assert connack.session_present and [m.payload for m in publishes(got)] == [b"acknowledged"]


@pytest_twisted.inlineCallbacks
def test_a_session_of_a_short_expiry_connected_at_a_kill_9_outlives_a_quick_restart(
        tmp_path: Path) -> Iterator[Deferred[Any]]:
    """Counted from the note a minute before the kill, a session of 20 s connected then was gone
    after a restart at once, and the messages its publishers had been acknowledged with it. The
    notes come four times within the shortest expiry of a session connected (once a second at
    most)."""
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    on_disk = SQLiteRestarts(tmp_path / "mqttbroker.db", clock=clock)
    try:
        broker = on_disk.start()
        connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 20}).subscribe("q", qos=1)
        connected(broker, "brief", 5, clean=False, properties={"session_expiry_interval": 2})
        p = connected(broker, "p", 5)
        yield on_disk.store.flushed()
        clock.advance(45)
        p.publish("q", b"acknowledged", qos=1, packet_id=1)
        yield on_disk.store.flushed()
        assert [type(a) for a in p.received()] == [Puback]
        clock.advance(10)  # killed 55 s after the start, both sessions connected
        yield on_disk.store.flushed()
        noted = clock.seconds()
        yield s_kept_through_a_kill_9(on_disk, clock, tmp_path, noted, "brief")
    finally:
        yield on_disk.stop()


@pytest_twisted.inlineCallbacks
def test_a_session_of_a_short_expiry_connected_long_after_the_last_note_outlives_a_kill_9_at_once(
        tmp_path: Path) -> Iterator[Deferred[Any]]:
    """A session of 20 s connected 50 s after the last note (the start's) and killed 2 s later,
    before the next, counted its expiry from that note: gone after a restart at once, with the
    message its publisher had been acknowledged. Its connection writes a note at once; a storm
    of such connections, no more than one a quarter of the shortest expiry."""
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    on_disk = SQLiteRestarts(tmp_path / "mqttbroker.db", clock=clock)
    alive = "SELECT value FROM meta WHERE key = 'alive'"
    try:
        broker = on_disk.start()
        p = connected(broker, "p", 5)
        yield on_disk.store.flushed()
        clock.advance(50)  # the next note is due a minute after the start
        connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 20}).subscribe("q", qos=1)
        yield on_disk.store.flushed()
        noted = clock.seconds()
        assert rows(on_disk.path, alive) == [(noted,)]
        clock.advance(1)
        connected(broker, "other", 5, clean=False, properties={"session_expiry_interval": 16})
        p.publish("q", b"acknowledged", qos=1, packet_id=1)
        yield on_disk.store.flushed()
        assert [type(a) for a in p.received()] == [Puback]
        assert rows(on_disk.path, alive) == [(noted,)]
        clock.advance(1)  # killed 2 s after "s" connected
        yield on_disk.store.flushed()
        yield s_kept_through_a_kill_9(on_disk, clock, tmp_path, noted)
    finally:
        yield on_disk.stop()


@pytest_twisted.inlineCallbacks
def test_a_clean_start_is_acknowledged_once_the_old_session_is_gone_from_the_disk(
        on_disk: SQLiteRestarts, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """Session Present 0 went out before the old session's end was committed: killed then, the
    broker brought the old session back, still awaiting PUBREL for id 5, and took the first
    message of the new session, with that id, for a resend: PUBREC and PUBCOMP, and routed to no
    one (an acknowledged QoS 2 message lost)."""
    broker = on_disk.start()
    p = yield subscriber_away_and_publisher(on_disk)
    p.publish("q", b"old", qos=2, packet_id=5)  # received, never released
    yield on_disk.store.flushed()
    assert [type(x) for x in p.received()] == [Pubrec]
    p.lose()
    p = FakeClient(broker, 5)
    p.send(Connect(client_id="p", clean_start=True, protocol_level=5, protocol_name="MQTT",
                   properties={"session_expiry_interval": NEVER}))
    assert p.received() == []  # not before the old session's end is on the disk
    yield on_disk.store.flushed()
    (connack,) = p.received()
    assert isinstance(connack, Connack) and connack.reason_code == 0 and not connack.session_present
    p.send(Publish(topic="q", payload=b"new", qos=2, packet_id=5))
    assert p.received() == []  # its PUBREC waits for the store: killed now
    broker = yield on_disk.again(crash_copy(on_disk.path, tmp_path / "crashed.db"))
    p, _ = reconnect(broker, "p", 5)
    p.send(Publish(topic="q", payload=b"new", qos=2, packet_id=5, dup=True))
    assert [type(x) for x in (yield when_stored(on_disk.store, p))] == [Pubrec]
    p.send(Pubrel(packet_id=5))
    assert [type(x) for x in (yield when_stored(on_disk.store, p))] == [Pubcomp]
    s, _ = reconnect(broker, "s")
    receiver = Receiver()
    for _ in range(4):
        answer(s, receiver, (yield when_stored(on_disk.store, s)))
    assert receiver.payloads() == [b"old", b"new"]


@pytest_twisted.inlineCallbacks
def test_a_reconnection_is_acknowledged_once_the_delayed_will_it_cancels_is_gone_from_the_disk(
        tmp_path: Path) -> Iterator[Deferred[Any]]:
    """[MQTT-3.1.3-9]: a client back before its Will Delay Interval has passed cancels its will.
    The CONNACK went before the will's deletion was committed: killed then, the restarted broker
    published the will of a client that had been told it was back."""
    clock = Clock()
    clock.advance(1_000_000)
    on_disk = SQLiteRestarts(tmp_path / "mqttbroker.db", clock=clock)
    broker = on_disk.start()
    try:
        w = connected(broker, "w", 5, clean=False, properties={"session_expiry_interval": 3600},
                      will=Will(topic="wills/w", payload=b"w is gone", qos=1,
                                properties={"will_delay_interval": 30}))
        w.lose()
        yield on_disk.store.flushed()
        clock.advance(5)
        w = FakeClient(broker, 5)
        w.send(Connect(client_id="w", clean_start=False, protocol_level=5, protocol_name="MQTT",
                       properties={"session_expiry_interval": 3600}))
        assert w.received() == []  # not before the will's end is on the disk
        (connack,) = yield when_stored(on_disk.store, w)
        assert isinstance(connack, Connack) and connack.reason_code == 0 and connack.session_present
        assert rows(on_disk.path, "SELECT client_id FROM wills") == []
        broker = yield on_disk.again(crash_copy(on_disk.path, tmp_path / "crashed.db"))  # killed now
        watcher = connected(broker, "watcher", 4)
        subscribe(watcher, "wills/#", qos=1)
        watcher.received()
        clock.advance(60)
        assert publishes(watcher.received()) == []
    finally:
        yield on_disk.stop()


@pytest_twisted.inlineCallbacks
def test_pubrel_sent_before_a_crash_is_not_followed_by_the_publish_again(
        on_disk: SQLiteRestarts, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """[MQTT-4.3.3-5]: once the broker has sent PUBREL it must not send the PUBLISH again. The
    subscriber that got the PUBREL answered PUBCOMP and forgot the packet id: a PUBLISH with it
    after a restart is a new message to it, delivered to its application a second time."""
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    yield on_disk.store.flushed()
    p = connected(broker, "p", 4)
    p.publish("q", b"exactly once", qos=2, packet_id=1)
    receiver = Receiver()
    answer(s, receiver, (yield when_stored(on_disk.store, s)))  # PUBLISH -> PUBREC
    pubrel = yield when_stored(on_disk.store, s)
    assert [type(x) for x in pubrel] == [Pubrel]
    assert rows(on_disk.path, "SELECT released FROM deliveries") == [(1,)]  # stored before the PUBREL went out
    answer(s, receiver, pubrel)  # PUBREL -> PUBCOMP
    assert receiver.payloads() == [b"exactly once"] and not receiver.awaiting_pubrel
    crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")  # killed now
    broker = yield on_disk.again(crashed)
    s, _ = reconnect(broker, "s")
    answer(s, receiver, (yield when_stored(on_disk.store, s)))
    assert receiver.payloads() == [b"exactly once"]


@pytest.mark.parametrize("crash", ["before the commit", "after the commit"])
@pytest_twisted.inlineCallbacks
def test_queued_qos2_message_goes_out_once_its_packet_id_is_stored(
        on_disk: SQLiteRestarts, tmp_path: Path, crash: str) -> Iterator[Deferred[Any]]:
    """A queued QoS 2 message is sent with packet id 4 only once the store has that id. Killed
    before: the subscriber has nothing, and gets it after the restart. Killed after: the
    subscriber has it and waits for the PUBREL; it comes again with id 4 and DUP (the subscriber
    then knows it), not as a new PUBLISH with another id, which it would deliver again."""
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    yield on_disk.store.flushed()
    p = connected(broker, "p", 4)
    receiver = Receiver()
    for n in range(3):  # packet ids 1 to 3 used and done
        p.publish("q", b"done", qos=2, packet_id=n + 1)
        answer(s, receiver, (yield when_stored(on_disk.store, s)))
        answer(s, receiver, (yield when_stored(on_disk.store, s)))
    yield on_disk.store.flushed()
    s.lose()
    p.publish("q", b"queued", qos=2, packet_id=9)
    yield on_disk.store.flushed()
    s, _ = reconnect(broker, "s")
    assert s.received() == []  # sent with packet id 4 once that is stored
    if crash == "before the commit":
        crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
        assert rows(crashed, "SELECT packet_id FROM deliveries") == [(None,)]
    (first,) = publishes((yield when_stored(on_disk.store, s)))
    assert rows(on_disk.path, "SELECT packet_id FROM deliveries") == [(4,)]
    assert first.payload == b"queued" and first.packet_id == 4
    if crash == "after the commit":  # (killed before, the broker never sent it)
        answer(s, receiver, [first])  # delivered; PUBREC sent, PUBREL awaited
        crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
    broker = yield on_disk.again(crashed)
    s, _ = reconnect(broker, "s")
    again = publishes((yield when_stored(on_disk.store, s)))
    # Sent before the crash: again with its id and DUP. Not sent: any id would do, and it is new.
    assert [(m.payload, m.dup) for m in again] == [(b"queued", crash == "after the commit")]
    if crash == "after the commit":
        assert again[0].packet_id == 4
    answer(s, receiver, again)
    assert receiver.payloads().count(b"queued") == 1


@pytest_twisted.inlineCallbacks
def test_queued_qos1_message_sent_before_a_crash_comes_again_with_dup(
        on_disk: SQLiteRestarts, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """[MQTT-3.3.1-1]: a PUBLISH sent again is marked DUP, also when it was sent from the queue
    just before a crash."""
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=1)
    yield on_disk.store.flushed()
    s.lose()
    p = connected(broker, "p", 4)
    p.publish("q", b"queued", qos=1, packet_id=1)
    yield on_disk.store.flushed()
    s, _ = reconnect(broker, "s")
    (first,) = publishes((yield when_stored(on_disk.store, s)))
    assert not first.dup
    s.send(Puback(packet_id=first.packet_id))
    crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")  # the PUBACK's deletion not written yet
    broker = yield on_disk.again(crashed)
    s, _ = reconnect(broker, "s")
    again = publishes((yield when_stored(on_disk.store, s)))
    assert [(m.payload, m.packet_id, m.dup) for m in again] == [(b"queued", first.packet_id, True)]


@pytest.mark.parametrize("crash", ["before the commit", "after the commit"])
@pytest_twisted.inlineCallbacks
def test_qos2_message_routed_before_a_crash_is_not_delivered_twice(
        on_disk: SQLiteRestarts, tmp_path: Path, crash: str) -> Iterator[Deferred[Any]]:
    """Exactly once end to end: nothing of a QoS 2 message reaches a subscriber, even a clean
    one online, before its inbound packet id is stored. Killed before the commit, no one has it
    and the publisher's resend [MQTT-4.4.0-1] is routed for the first time; killed after, the
    subscriber has it and the resend is known as one, and not routed again [MQTT-4.3.3-9]."""
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    online = connected(broker, "online", 5)
    subscribe(online, "q", qos=0)
    yield on_disk.store.flushed()
    online.received()
    p = connected(broker, "p", 4, clean=False)
    receiver = Receiver()
    for n in range(3):  # the subscriber's next packet id is 4
        p.publish("q", b"done", qos=2, packet_id=n + 1)
        answer(s, receiver, (yield when_stored(on_disk.store, s)))
        answer(s, receiver, (yield when_stored(on_disk.store, s)))
        p.send(Pubrel(packet_id=n + 1))
    yield on_disk.store.flushed()
    p.received()
    online.received()
    p.send(Publish(topic="q", payload=b"once", qos=2, packet_id=9))
    assert s.received() == [] and online.received() == []  # not before the packet id is stored
    if crash == "before the commit":  # (then the broker never sent it)
        crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
    else:
        answer(s, receiver, (yield when_stored(on_disk.store, s)))
        assert receiver.payloads()[-1] == b"once"
        assert [m.payload for m in publishes(online.received())] == [b"once"]
        crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
    broker = yield on_disk.again(crashed)
    s, _ = reconnect(broker, "s")
    answer(s, receiver, (yield when_stored(on_disk.store, s)))
    p, _ = reconnect(broker, "p")
    p.send(Publish(topic="q", payload=b"once", qos=2, packet_id=9, dup=True))
    answer(s, receiver, (yield when_stored(on_disk.store, s)))
    answer(s, receiver, (yield when_stored(on_disk.store, s)))
    assert receiver.payloads().count(b"once") == 1
    assert [type(a) for a in p.received()] == [Pubrec]


@pytest_twisted.inlineCallbacks
def test_pubcomp_goes_out_once_the_packet_id_is_forgotten_in_the_store(
        on_disk: SQLiteRestarts, tmp_path: Path) -> Iterator[Deferred[Any]]:
    """A publisher may use a packet id again as soon as it has the PUBCOMP. Were the PUBCOMP
    sent before the id's removal was written, a crash would bring the id back as awaiting
    PUBREL, and the publisher's next message with it would be taken for a resend and lost; the
    stale id would also hold one of the publisher's Receive Maximum slots for ever."""
    broker = on_disk.start()
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "q", qos=2)
    yield on_disk.store.flushed()
    p = connected(broker, "p", 5, **persistent(5))
    p.publish("q", b"first", qos=2, packet_id=7)
    yield on_disk.store.flushed()
    assert [type(a) for a in p.received()] == [Pubrec]
    p.send(Pubrel(packet_id=7))
    assert p.received() == []  # not before the removal is written
    crashed = crash_copy(on_disk.path, tmp_path / "crashed.db")
    assert rows(crashed, "SELECT packet_id FROM awaiting_pubrel") == [(7,)]
    assert [(type(a), a.packet_id) for a in (yield when_stored(on_disk.store, p))] == [(Pubcomp, 7)]
    assert rows(on_disk.path, "SELECT packet_id FROM awaiting_pubrel") == []
    # Killed before the commit: the publisher had no PUBCOMP and sends the PUBREL again.
    broker = yield on_disk.again(crashed)
    p, _ = reconnect(broker, "p", 5)
    p.send(Pubrel(packet_id=7))
    assert [(type(a), a.packet_id, a.reason_code) for a in (yield when_stored(on_disk.store, p))] == [(Pubcomp, 7, 0)]
    p.publish("q", b"second", qos=2, packet_id=7)  # the id used again: a new message
    yield on_disk.store.flushed()
    assert [(type(a), a.packet_id) for a in p.received()] == [(Pubrec, 7)]
    s, _ = reconnect(broker, "s")
    receiver = Receiver()
    for _ in range(4):
        answer(s, receiver, (yield when_stored(on_disk.store, s)))
    assert receiver.payloads() == [b"first", b"second"]


@pytest_twisted.inlineCallbacks
def test_a_refusing_pubrec_goes_out_once_the_packet_id_is_forgotten_in_the_store(
        tmp_path: Path) -> Iterator[Deferred[Any]]:
    """MQTT 5: a PUBREC of 0x80 or more ends the QoS 2 exchange, and the publisher may use the
    packet id again at once [MQTT-4.3.3-9]. Sent before the id's removal was committed, a crash
    brought the id back as awaiting PUBREL, and the publisher's next message with it was taken
    for a resend: acknowledged, and routed to no one."""
    on_disk = SQLiteRestarts(tmp_path / "mqttbroker.db", max_queued_messages=1, max_stored_messages=1)
    broker = on_disk.start()
    try:
        full = connected(broker, "full", 4, clean=False)
        subscribe(full, "q", qos=1)
        yield on_disk.store.flushed()
        full.lose()
        for _ in range(2):  # its queue in memory, and its room in the store
            yield broker.publish("q", b"fill", qos=1)
        p = connected(broker, "p", 5, **persistent(5))
        yield on_disk.store.flushed()
        p.send(Publish(topic="q", payload=b"refused", qos=2, packet_id=7))
        yield on_disk.store.flushed()  # the id, awaiting PUBREL, is committed
        assert p.received() == []  # the PUBREC that frees it waits for its removal
        (pubrec,) = yield when_stored(on_disk.store, p)
        assert isinstance(pubrec, Pubrec) and pubrec.reason_code == ReasonCode.QUOTA_EXCEEDED
        assert rows(on_disk.path, "SELECT packet_id FROM awaiting_pubrel") == []
        broker = yield on_disk.again(crash_copy(on_disk.path, tmp_path / "crashed.db"))  # killed now
        s = connected(broker, "s", 4)
        subscribe(s, "q", qos=1)
        s.received()
        p, _ = reconnect(broker, "p", 5)
        p.send(Publish(topic="q", payload=b"new", qos=2, packet_id=7))  # the id used again: a new message
        yield on_disk.store.flushed()
        (pubrec,) = yield when_stored(on_disk.store, p)
        assert pubrec.reason_code == ReasonCode.QUOTA_EXCEEDED  # ("full" has no room still)
        assert [m.payload for m in publishes(s.received())] == [b"new"]
    finally:
        yield on_disk.stop()


class HeldStore(MemoryStore):
    """A store whose batches the test writes, or fails: ``flushed()`` waits for the batch of the
    current ``generation``, which the test moves on."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0
        self.waiting: dict[int, list[Deferred[None]]] = {}
        self.asked = 0

    def flushed(self) -> Deferred[None]:
        self.asked += 1
        d: Deferred[None] = Deferred()
        self.waiting.setdefault(self.generation, []).append(d)
        return d

    def write(self, generation: int, error: Exception | None = None) -> None:
        for d in self.waiting.pop(generation):
            if error is None:
                d.callback(None)
            else:
                d.errback(error)

    def write_all(self) -> None:
        for generation in sorted(self.waiting):
            self.write(generation)


def held_broker(**settings: Any) -> tuple[HeldStore, BrokerService]:
    """A broker (on a MemoryReactorClock) whose store's batches the test writes."""
    store = HeldStore()
    return store, BrokerService(endpoints=[], reactor=MemoryReactorClock(), store=store, **settings)


def with_a_stored_publisher(**settings: Any) -> tuple[HeldStore, BrokerService, FakeClient]:
    """``held_broker``, and a publisher "p" (MQTT 5) whose session the store keeps, written."""
    store, broker = held_broker(**settings)
    publisher = connected(broker, "p", 5, clean=False, properties={"session_expiry_interval": NEVER})
    store.write_all()
    return store, broker, publisher


def test_what_the_broker_publishes_while_the_store_fails_fails_its_wait_and_goes_on() -> None:
    """BrokerService.publish's Deferred fails with StoreError then, and the admin API's publish,
    which waits for it, is answered 503; the $SYS values and a bridge's state, which go on once
    routed, do not wait for the store (their waits' failures were "Unhandled error in Deferred",
    again and again while the disk failed)."""
    import gc
    import io
    import json

    from twisted.logger import capturedLogs
    from twisted.web.test.requesthelper import DummyRequest

    from mqtt_broker.admin.api import ApiResource
    from mqtt_broker.admin.keys import hash_key
    store, broker = held_broker(http_api_keys=["ci:" + hash_key("k" * 32)])
    failures: list[Any] = []
    broker.publish("t", b"x", retain=True).addErrback(failures.append)
    request = DummyRequest([b""])
    request.method, request.path = b"POST", b"/api/v1/publish"
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + b"k" * 32])
    request.content = io.BytesIO(json.dumps({"topic": "t", "payload": "y", "retain": True}).encode())
    with capturedLogs() as events:
        assert ApiResource(broker, broker.operations).render(request)
        assert request.responseCode is None
        store.write(store.generation, StoreError("disk full"))
        gc.collect()
    assert request.responseCode == 503 and b"disk full" in b"".join(request.written)
    assert len(failures) == 1 and failures[0].check(StoreError)
    assert [e for e in events if "Unhandled error" in str(e.get("log_format", ""))] == []
    assert broker.retained.get("t").payload == b"y"  # routed all the same


def test_acknowledgements_wait_for_their_batch_together_and_in_order() -> None:
    """The PUBLISHes acknowledged within one batch of the store ask it once, and are answered in
    the order they came when that batch is written; when a batch fails, each of its MQTT 5
    PUBLISHes gets 0x80, and a QoS 2 one's packet id is free again."""
    store, broker = held_broker()
    client = connected(broker, "p", 5)
    client.received()
    asked = store.asked
    client.send(*(Publish(topic="t", payload=b"x", qos=1, packet_id=i) for i in (1, 2, 3)))
    client.send(Publish(topic="t", payload=b"x", qos=2, packet_id=4))
    assert store.asked == asked + 1 and client.received() == []
    store.generation += 1  # a batch is cut: what comes now waits for the next one
    client.send(Publish(topic="t", payload=b"x", qos=2, packet_id=5), Publish(topic="t", payload=b"x", qos=1, packet_id=6))
    assert store.asked == asked + 2 and client.received() == []

    store.write(0)
    unmatched = 0x10  # MQTT 5's "no matching subscribers": nobody subscribed to t
    assert [(type(p), p.packet_id, p.reason_code) for p in client.received()] == [
        (Puback, 1, unmatched), (Puback, 2, unmatched), (Puback, 3, unmatched), (Pubrec, 4, unmatched)]
    store.write(1, StoreError("the disk is full"))
    assert [(type(p), p.packet_id, p.reason_code) for p in client.received()] == [(Pubrec, 5, 0x80), (Puback, 6, 0x80)]
    # Packet id 5 is free: the same id is a new message, routed and acknowledged once stored.
    client.send(Publish(topic="t", payload=b"again", qos=2, packet_id=5))
    store.write(store.generation)
    assert [(type(p), p.packet_id, p.reason_code) for p in client.received()] == [(Pubrec, 5, unmatched)]


def test_a_refused_publish_is_answered_after_the_earlier_ones_waiting_for_the_store() -> None:
    """A PUBLISH that is not routed needs nothing stored, but its answer keeps its turn
    [MQTT-4.6.0-2, -3]; with nothing waiting it comes at once."""
    store, broker = held_broker()
    client = connected(broker, "p", 5)
    client.received()
    client.send(Publish(topic="$SYS/broker/x", payload=b"x", qos=1, packet_id=1))
    assert [(p.packet_id, p.reason_code) for p in client.received()] == [(1, 0x87)]  # type: ignore[attr-defined]
    client.send(Publish(topic="t", payload=b"x", qos=1, packet_id=2),
                Publish(topic="$SYS/broker/x", payload=b"x", qos=2, packet_id=3),
                Publish(topic="t", payload=b"\xff", qos=1, packet_id=4, properties={"payload_format_indicator": 1}))
    assert client.received() == []
    store.write(store.generation)
    assert [(type(p), p.packet_id, p.reason_code) for p in client.received()] == [
        (Puback, 2, 0x10), (Pubrec, 3, 0x87), (Puback, 4, 0x99)]
    client.send(Publish(topic="t", payload=b"x", qos=1, packet_id=5), Publish(topic="$SYS/x", payload=b"x", qos=1, packet_id=6))
    store.write(store.generation, StoreError("the disk is full"))
    # The refusal says why, whatever became of the store.
    assert [(p.packet_id, p.reason_code) for p in client.received()] == [(5, 0x80), (6, 0x87)]  # type: ignore[attr-defined]


def test_qos1_publishes_waiting_for_the_store_count_against_the_receive_maximum() -> None:
    """§3.3.4 [MQTT-3.3.4-7]: more QoS 1 and QoS 2 PUBLISHes than the broker's Receive Maximum
    that it has not sent a PUBACK or PUBCOMP for: DISCONNECT 0x93. A QoS 1 PUBLISH counts until
    its PUBACK goes, once the store has it; MQTT 3 has no Receive Maximum."""
    store, broker = held_broker(max_inflight_messages=3)
    client = connected(broker, "p", 5)
    client.received()
    client.send(Publish(topic="t", payload=b"x", qos=1, packet_id=1), Publish(topic="t", payload=b"x", qos=1, packet_id=2))
    store.write(store.generation)
    assert [p.packet_id for p in client.received()] == [1, 2]  # type: ignore[attr-defined]
    client.send(Publish(topic="t", payload=b"x", qos=2, packet_id=3),
                Publish(topic="t", payload=b"x", qos=1, packet_id=4), Publish(topic="$SYS/x", payload=b"x", qos=1, packet_id=5))
    assert client.received() == [] and not client.closed  # three, PUBACKs and PUBREC waiting
    client.send(Publish(topic="t", payload=b"x", qos=1, packet_id=6))
    [disconnect] = client.received()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    assert client.closed

    mqtt3 = connected(broker, "q", 4)
    mqtt3.received()
    mqtt3.send(*(Publish(topic="t", payload=b"x", qos=1, packet_id=i) for i in range(1, 6)))
    store.write_all()
    assert [p.packet_id for p in mqtt3.received()] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", [4, 5])
def test_a_stored_session_gets_a_topics_retained_message_before_a_newer_one(version: int) -> None:
    """[MQTT-4.6.0-5]: a publisher's messages to a topic reach a subscriber in the order they
    came. The retained messages went with the SUBACK, once the subscription was stored, while it
    was live from the SUBSCRIBE on: a message published meanwhile came first, and the older
    retained one last, as if it were the topic's value (20 times in 20 on a real broker with
    SQLite; never with Mosquitto). They now go at once; the SUBACK still waits for the store."""
    store = HeldStore()

    def written() -> None:
        for generation in list(store.waiting):
            store.write(generation)
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), store=store)
    publisher = FakeClient(broker)
    publisher.connect("p")
    publisher.send(Publish(topic="t", payload=b"old", retain=True))
    subscriber = FakeClient(broker, version)
    subscriber.send(Connect(client_id="s", clean_start=False, protocol_level=version, protocol_name="MQTT",
                            properties={"session_expiry_interval": 60} if version == 5 else {}))
    written()
    assert [type(p) for p in subscriber.received()] == [Connack]
    subscriber.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t"),)))
    publisher.send(Publish(topic="t", payload=b"new"))
    assert [p.payload for p in subscriber.received()] == [b"old", b"new"]  # (PUBLISHes may come before a SUBACK)
    assert store.waiting
    written()
    assert [type(p) for p in subscriber.received()] == [Suback]


@pytest.mark.parametrize("qos", [0, 1])
def test_a_new_subscription_gets_a_qos2_retained_message_once_its_packet_id_is_stored(qos: int) -> None:
    """An inbound QoS 2 message of a stored session reaches no subscriber before its packet id is
    stored (docs/durability.md). Its subscribers of before waited for it, but the retained copy
    went at once to a filter subscribed meanwhile (at QoS 0, or to a session that ends with its
    connection): killed then, the broker came back with the topic's previous retained message.
    A QoS 1 one goes at once, as it goes to the subscribers of before."""
    store, broker, publisher = with_a_stored_publisher()
    publisher.send(Publish(topic="t", payload=b"exactly once", qos=2, retain=True, packet_id=1),
                   Publish(topic="u", payload=b"at least once", qos=1, retain=True, packet_id=2))
    late = connected(broker, "late", 4)
    subscribe(late, "u", "t", qos=qos)
    assert [p.payload for p in publishes(late.received())] == [b"at least once"]
    store.write(store.generation)
    assert [p.payload for p in publishes(late.received())] == [b"exactly once"]


def test_a_replay_gets_a_qos2_message_once_its_packet_id_is_stored() -> None:
    """The message log records a message as it is routed: a replay asked for before the QoS 2
    message's packet id was stored was sent it at once, which its subscribers of before were not."""
    store, broker, publisher = with_a_stored_publisher(history_filters=["#"])
    publisher.send(Publish(topic="t", payload=b"exactly once", qos=2, packet_id=1))
    late = connected(broker, "late", 4)
    subscribe(late, "$replay/all/t", qos=0)
    assert publishes(late.received()) == []
    store.write(store.generation)
    assert [p.payload for p in publishes(late.received())] == [b"exactly once"]


@pytest.mark.parametrize("version", [4, 5])
def test_unsuback_waits_until_the_removal_is_stored(version: int) -> None:
    store, broker = held_broker()
    client = FakeClient(broker, version)
    client.send(Connect(client_id="s", clean_start=False, protocol_level=version, protocol_name="MQTT",
                        properties={"session_expiry_interval": 60} if version == 5 else {}))
    assert [type(p) for p in client.received()] == [Connack]
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="a", qos=1),)))
    store.write(store.generation)
    assert [type(p) for p in client.received()] == [Suback]
    client.send(Unsubscribe(packet_id=2, topic_filters=("a",)))
    assert client.received() == [] and store.waiting  # a crash now would bring the subscription back
    store.write(store.generation)
    assert [(type(p), p.packet_id) for p in client.received()] == [(Unsuback, 2)]
    client.send(Subscribe(packet_id=3, subscriptions=(SubscriptionRequest(topic_filter="a", qos=1),)))
    store.write(store.generation)
    client.received()
    client.send(Unsubscribe(packet_id=4, topic_filters=("a", "b")))
    store.write(store.generation, StoreError("the disk is full"))
    (unsuback,) = client.received()
    assert isinstance(unsuback, Unsuback) and unsuback.packet_id == 4
    if version == 5:  # the removal stands, and is written once the disk works
        assert unsuback.reason_codes == (0x00, 0x11)


@pytest.mark.parametrize("version", [4, 5])
def test_a_hooks_refusal_keeps_its_code_whatever_the_store_does(version: int) -> None:
    """A hook may refuse with any code, 0x97 say: behind a batch that fails, its PUBLISH is still
    a refused one (acknowledged with the hook's code), not one the store failed to keep."""
    from mqtt_broker.hooks import Refused
    store, broker = held_broker()

    @broker.hooks.on_publish
    def limit(client: Any, message: Any) -> Any:
        return Refused(ReasonCode.QUOTA_EXCEEDED, "too many") if message.topic == "limited" else None

    client = connected(broker, "p", version)
    client.received()
    client.send(Publish(topic="t", payload=b"x", qos=1, packet_id=1), Publish(topic="limited", payload=b"x", qos=1, packet_id=2))
    store.write(store.generation, StoreError("the disk is full"))
    got = [(p.packet_id, p.reason_code) for p in client.received()]  # type: ignore[attr-defined]
    assert got == ([(1, 0x80), (2, 0x97)] if version == 5 else [(2, 0)])


class BoundedStore(HeldStore):
    """A HeldStore that counts the payloads of the deliveries it has not written, as SQLiteStore
    counts what waits for its disk (``unwritten_bytes``), and bounds them."""

    max_unwritten_bytes = 4000

    def __init__(self) -> None:
        super().__init__()
        self.unwritten_bytes = 0

    def add_delivery(self, client_id: str, item: Any, packet_id: int | None) -> None:
        self.unwritten_bytes += len(item.message.payload)
        super().add_delivery(client_id, item, packet_id)

    def write(self, generation: int, error: Exception | None = None) -> None:
        if error is None:
            self.unwritten_bytes = 0
        super().write(generation, error)


def test_a_publisher_outpacing_the_disk_is_read_no_more_until_the_store_has_caught_up() -> None:
    """A slow disk (a stall of 15 s) let 40,000 QoS 1 PUBLISHes of 1 KiB to an offline session
    wait in memory for it, and their publisher was read on. Past the store's bound, the
    connection whose packets added to it is read no more (what was read is handled) until the
    store has written what it holds; while the disk fails, until it works again. Nothing is
    refused, and its client is not taken for silent meanwhile; a client adding nothing is read on."""
    store = BoundedStore()
    clock = MemoryReactorClock()
    broker = BrokerService(endpoints=[], reactor=clock, store=store, close_linger=0)
    s = connected(broker, "s", 4, clean=False)
    subscribe(s, "t", qos=1)
    store.write_all()
    s.lose()
    p = connected(broker, "p", 4, keep_alive=10)
    other = connected(broker, "other", 4)
    store.write_all()
    p.received()
    p.send(*(Publish(topic="t", payload=b"x" * 1000, qos=1, packet_id=i) for i in (1, 2, 3)))
    assert p.transport.producerState == "producing"
    p.send(Publish(topic="t", payload=b"x" * 1000, qos=1, packet_id=4),
           Publish(topic="t", payload=b"x" * 1000, qos=1, packet_id=5))
    assert p.transport.producerState == "paused"
    other.send(Pingreq())
    assert other.received() == [Pingresp()] and other.transport.producerState == "producing"
    clock.advance(60)  # (past 1.5 keepalives)
    assert not p.closed
    store.write_all()
    assert p.transport.producerState == "producing"
    assert [(type(a), a.packet_id) for a in p.received()] == [(Puback, i) for i in (1, 2, 3, 4, 5)]
    clock.advance(10)
    assert not p.closed  # its silence counts from when it was read again

    p.send(*(Publish(topic="t", payload=b"x" * 1000, qos=1, packet_id=i) for i in range(6, 11)))
    assert p.transport.producerState == "paused"
    store.write(store.generation, StoreError("the disk is full"))
    assert p.transport.producerState == "paused"
    store.write_all()
    assert p.transport.producerState == "producing"


def test_a_stored_session_that_reads_nothing_is_read_no_more_once_its_answers_fill_what_is_held() -> None:
    """A client of a stored session that publishes QoS 2 and never reads: its PUBCOMPs, and what
    is written behind them, wait for the store, then join what is held for its full socket. Past
    max_held_bytes, nothing more is read from it until it reads, as without a store (it was
    read on and the answers held grew by 200 MB in 2.5 million exchanges)."""
    store, broker = held_broker(max_held_bytes=65536)
    limit = broker.config.max_held_bytes
    client = connected(broker, "q2", 4, clean=False)
    store.write_all()
    client.received()
    client.protocol.pauseProducing()  # its socket's buffer is full: it reads nothing
    sent = 0
    while client.transport.producerState == "producing" and sent < limit:  # (bounded)
        client.send(*(packet for n in range(sent, sent + 100)
                      for packet in (Publish(topic="t", qos=2, packet_id=n % 65535 + 1), Pubrel(packet_id=n % 65535 + 1))))
        sent += 100
        store.write_all()
    assert client.transport.producerState == "paused"
    assert limit < client.protocol.pending_bytes <= limit + 100 * 8  # the answers to one read past it
    client.protocol.resumeProducing()  # its socket drained
    assert client.transport.producerState == "producing"
    answers = [type(p) for p in client.received()]
    assert (answers.count(Pubrec), answers.count(Pubcomp)) == (sent, sent)


def stored_session_of(client_id: str, store: HeldStore) -> BrokerService:
    """A broker on ``store`` with a stored session of ``client_id``, its client gone."""
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), store=store, close_linger=0)
    old = connected(broker, client_id, 5, clean=False, properties={"session_expiry_interval": NEVER})
    old.lose()
    if store.generation in store.waiting:
        store.write(store.generation)
    store.generation += 1
    assert broker.sessions[client_id].stored
    return broker


def test_a_pingresp_does_not_overtake_a_connack_held_for_the_store() -> None:
    """A clean start that ends a stored session holds its CONNACK until the end is stored; a
    PINGREQ sent right after the CONNECT was answered first [MQTT-3.2.0-1]."""
    store = HeldStore()
    broker = stored_session_of("c", store)
    client = FakeClient(broker, 5)
    client.send(Connect(client_id="c", clean_start=True, protocol_level=5), Pingreq())
    assert client.received() == []
    store.write(store.generation)
    assert [type(p) for p in client.received()] == [Connack, Pingresp]


def test_a_connection_ended_while_its_connack_is_held_gets_no_disconnect() -> None:
    """Taken over before its CONNACK went out, a connection got a DISCONNECT alone, which may not
    come before a CONNACK [MQTT-3.14.0-1]: it is closed without one."""
    store = HeldStore()
    broker = stored_session_of("c", store)
    first = FakeClient(broker, 5)
    first.send(Connect(client_id="c", clean_start=True, protocol_level=5))
    assert first.received() == []
    second = FakeClient(broker, 5)
    second.send(Connect(client_id="c", clean_start=True, protocol_level=5))
    store.write(store.generation)
    assert first.received() == [] and first.closed
    assert isinstance(second.received()[0], Connack)


@pytest.mark.parametrize("ending", ["closed", "taken over"])
def test_a_connection_ended_while_its_connack_is_held_has_no_disconnect_hook_called(ending: str) -> None:
    """on_connect: "on_disconnect comes only after a CONNACK that accepted it". The client of a
    connection ended before the store let its CONNACK go was never told it is connected."""
    store = HeldStore()
    broker = stored_session_of("c", store)
    disconnected: list[str] = []
    broker.hooks.on_disconnect(lambda client, graceful: disconnected.append(client.peer))
    first = FakeClient(broker, 5)
    first.send(Connect(client_id="c", clean_start=True, protocol_level=5))
    if ending == "closed":
        first.lose()
    else:
        FakeClient(broker, 5).send(Connect(client_id="c", clean_start=True, protocol_level=5))
    store.write_all()
    assert first.received() == [] and disconnected == []


def test_a_filter_unsubscribed_stays_gone_when_a_subscribe_before_it_is_not_stored() -> None:
    """A SUBSCRIBE replacing 'a', then an UNSUBSCRIBE of it, in one batch of the store that
    fails: the SUBSCRIBE is refused and what it replaced was put back, though the UNSUBSCRIBE,
    whose removal stands, had removed it (UNSUBACK 0x00)."""
    store, broker = held_broker(close_linger=0)
    client = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 60})
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="a", qos=0),)))
    store.write(store.generation)
    assert [p.reason_codes for p in client.received()] == [(0,)]
    store.generation += 1
    client.send(Subscribe(packet_id=2, subscriptions=(SubscriptionRequest(topic_filter="a", qos=1),)),
                Unsubscribe(packet_id=3, topic_filters=("a",)))
    store.write(store.generation, StoreError("the disk is full"))
    assert [(type(p), p.packet_id, p.reason_codes) for p in client.received()] == [
        (Suback, 2, (0x80,)), (Unsuback, 3, (0x00,))]
    assert "a" not in broker.sessions["s"].subscriptions


@pytest.mark.parametrize("version", [3, 4])
def test_an_mqtt3_suback_after_a_failed_store_carries_only_its_codes(version: int) -> None:
    """MQTT 3.1.1 [MQTT-3.9.3-2]: SUBACK codes other than 0x00, 0x01, 0x02 and 0x80 are
    reserved; the answer to a SUBSCRIBE whose batch failed kept an MQTT 5 one (0x8F here)."""
    store, broker = held_broker()
    client = FakeClient(broker, version)
    client.send(Connect(client_id="s", clean_start=False, protocol_level=version,
                        protocol_name="MQTT" if version == 4 else "MQIsdp"))
    assert [type(p) for p in client.received()] == [Connack]
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="a/#/b"),
                                                      SubscriptionRequest(topic_filter="ok"))))
    store.write(store.generation, StoreError("the disk is full"))
    assert [p.reason_codes for p in client.received()] == [(0x80, 0x80)]  # type: ignore[attr-defined]


def test_without_a_store_every_delayed_will_is_published_at_the_stop() -> None:
    """Without a store every session ends with the broker's process, so every will is due at
    the stop [MQTT-3.1.3-9], as Mosquitto publishes them at its own: that of a connection the
    stop closes, whose Will Delay Interval had not begun, and that of a client gone before,
    whose delay was still running. Both were cancelled and never published."""
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), close_linger=0)
    broker.startService()
    clients = [connected(broker, client_id, 5, properties={"session_expiry_interval": 100},
                         will=Will(topic=f"wills/{client_id}", payload=b"gone",
                                   properties={"will_delay_interval": delay}))
               for client_id, delay in (("now", 0), ("delayed", 10), ("left", 10))]
    clients[2].lose()
    broker.reactor.advance(5)  # type: ignore[attr-defined]
    published: list[str] = []
    broker.hooks.on_will(lambda client, message: published.append(message.topic))
    broker.stopService()
    assert sorted(published) == ["wills/delayed", "wills/left", "wills/now"]


def test_without_a_store_a_session_started_again_ends_without_its_will_once_more() -> None:
    """A will whose delay is longer than its session is published at the stop, its session's
    end with the process: started again in the same process, the session lives on in memory,
    its end counted from the new start, and that end publishes nothing more."""
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), close_linger=0)
    broker.startService()
    willing = FakeClient(broker, 5)
    willing.connect("d", clean=False, properties={"session_expiry_interval": 10},
                    will=Will(topic="wills/d", payload=b"gone", properties={"will_delay_interval": 100}))
    willing.lose()
    broker.reactor.advance(5)  # type: ignore[attr-defined]
    broker.stopService()
    assert broker.stats.wills_published == 1
    broker.reactor.advance(1)  # type: ignore[attr-defined]
    broker.startService()  # at 6: the session ends at 16
    broker.reactor.advance(9)  # type: ignore[attr-defined]
    assert "d" in broker.sessions
    broker.reactor.advance(1)  # type: ignore[attr-defined]
    assert "d" not in broker.sessions and broker.stats.wills_published == 1


def test_without_a_store_a_service_started_again_keeps_its_timers() -> None:
    """An embedding application may stop the service and start it again: sessions kept in
    memory still expire (counted from the new start). A delayed will was published at the
    stop, into the sessions kept in memory: a subscriber back after the start has it."""
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), close_linger=0)
    broker.startService()
    watcher = connected(broker, "w", clean=False)
    subscribe(watcher, "wills/#")
    session = FakeClient(broker, 5)
    session.connect("s", properties={"session_expiry_interval": 10})
    session.send(Disconnect())
    session.lose()
    willing = FakeClient(broker, 5)
    willing.connect("d", properties={"session_expiry_interval": 60},
                    will=Will(topic="wills/d", payload=b"gone", qos=1, properties={"will_delay_interval": 30}))
    willing.lose()
    broker.reactor.advance(5)  # type: ignore[attr-defined]
    broker.stopService()
    broker.reactor.advance(1)  # type: ignore[attr-defined]
    broker.startService()
    watcher, connack = reconnect(broker, "w")
    assert connack.session_present
    (will,) = publishes(watcher.received())
    assert will.payload == b"gone"
    watcher.send(Puback(packet_id=will.packet_id))
    broker.reactor.advance(9)  # type: ignore[attr-defined]
    assert "s" in broker.sessions
    broker.reactor.advance(1)  # type: ignore[attr-defined]
    assert "s" not in broker.sessions
    broker.reactor.advance(60)  # type: ignore[attr-defined]
    assert publishes(watcher.received()) == []


def _shared_members_away(broker: BrokerService) -> None:
    """m1 (session expiry 10 s) and m2 (1,000 s), members of $share/g/t at QoS 1, both away."""
    for name, expiry in (("m1", 10), ("m2", 1000)):
        member = connected(broker, name, 5, clean=False, properties={"session_expiry_interval": expiry})
        member.subscribe("$share/g/t", qos=1)
        member.send(Disconnect())
        member.lose()


def test_a_shared_member_whose_session_ended_while_the_broker_was_down_leaves_its_messages_to_another() -> None:
    """Unfinished messages of a member whose session ends go to another member (docs/mqtt5.md),
    when it ends while the broker is down too: at the start, once every member is back."""
    restarts = Restarts(MemoryStore())
    broker = restarts.start()
    _shared_members_away(broker)
    broker.publish("t", b"a", qos=1)
    broker.publish("t", b"b", qos=1)  # one each, in turn
    restarts.stop()
    restarts.reactor.advance(11)  # m1's session ends meanwhile
    broker = restarts.start()
    assert "m1" not in broker.sessions
    m2 = FakeClient(broker, 5)
    m2.connect("m2", clean=False, properties={"session_expiry_interval": 1000})
    assert sorted(p.payload for p in m2.received() if isinstance(p, Publish)) == [b"a", b"b"]


def test_a_restart_reads_back_no_more_than_max_queued_bytes() -> None:
    restarts = Restarts(MemoryStore(), max_queued_bytes=10_000)
    broker = restarts.start()
    away = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 1000})
    away.subscribe("t", qos=1)
    away.lose()
    for n in range(10):
        broker.publish("t", bytes([n]) * 4000, qos=1)
    broker = restarts.restart()
    session = broker.sessions["s"]
    assert session.queued_bytes <= 10_000 and len(session.queue) + session.spilled == 10
    back = FakeClient(broker, 5)
    back.connect("s", clean=False, properties={"session_expiry_interval": 1000})
    payloads = []
    for _ in range(10):
        for message in [p for p in back.received() if isinstance(p, Publish)]:
            payloads.append(message.payload[0])
            back.send(Puback(packet_id=message.packet_id))
    assert payloads == list(range(10))


def _same_service(tmp_path: Path, clock: MemoryReactorClock) -> BrokerService:
    return BrokerService(endpoints=[], reactor=reactor, clock=clock, close_linger=0,
                         store=SQLiteStore(tmp_path / "mqttbroker.db", reactor))


@pytest_twisted.inlineCallbacks
def test_a_session_that_expired_while_the_service_was_stopped_is_gone_when_it_starts_again(
        tmp_path: Path) -> Iterator[Deferred[Any]]:
    """One BrokerService stopped and started again (an embedding application may): what memory
    kept of the sessions gives way to what the store kept, where a session ended meanwhile is
    gone, with its subscriptions. (It stayed, without a timer to end it, for good.)"""
    clock = MemoryReactorClock()
    clock.advance(1000)
    broker = _same_service(tmp_path, clock)
    broker.startService()
    try:
        s = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 10})
        subscribe(s, "t", qos=1)
        yield broker.store.flushed()
        s.send(Disconnect())
        s.lose()
        yield broker.stopService()
        clock.advance(60)  # the session's 10 s pass while the service is stopped
        broker.startService()
        yield broker.store.flushed()
        assert rows(tmp_path / "mqttbroker.db", "SELECT client_id FROM sessions") == []  # gone from the store
        assert "s" not in broker.sessions  # ... and from the broker
        connected(broker, "p", 5).send(Publish(topic="t", payload=b"for nobody", qos=1, packet_id=1))
        back = FakeClient(broker, 5)
        connack = back.connect("s", clean=False, properties={"session_expiry_interval": 10})
        assert connack is not None and not connack.session_present  # [MQTT-3.2.2-3]
        yield broker.store.flushed()
        assert [x for x in back.received() if isinstance(x, Publish)] == []
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_an_ended_shared_members_messages_go_to_a_live_member_when_the_service_starts_again(
        tmp_path: Path) -> Iterator[Deferred[Any]]:
    clock = MemoryReactorClock()
    clock.advance(1000)
    broker = _same_service(tmp_path, clock)
    broker.startService()
    try:
        for name, expiry in (("m1", 10), ("m2", 1000)):
            m = connected(broker, name, 5, clean=False, properties={"session_expiry_interval": expiry})
            subscribe(m, "$share/g/t", qos=1)
            yield broker.store.flushed()
            m.send(Disconnect())
            m.lose()
        for n in range(4):
            yield broker.publish("t", b"%d" % n, qos=1)
        yield broker.stopService()
        clock.advance(60)  # m1's session ends while stopped
        broker.startService()
        yield broker.store.flushed()
        m2 = FakeClient(broker, 5)
        m2.connect("m2", clean=False, properties={"session_expiry_interval": 1000})
        got = []
        for _ in range(10):
            yield broker.store.flushed()
            for x in m2.received():
                if isinstance(x, Publish):
                    got.append(x.payload)
                    m2.send(Puback(packet_id=x.packet_id))
        assert sorted(got) == [b"0", b"1", b"2", b"3"]
    finally:
        yield broker.stopService()


def test_on_a_memory_store_too_an_expired_session_is_gone_when_the_service_starts_again() -> None:
    """MemoryStore: "state survives stopping and starting a BrokerService" (its docstring)."""
    clock = MemoryReactorClock()
    broker = BrokerService(endpoints=[], reactor=clock, close_linger=0, store=MemoryStore())
    broker.startService()
    s = connected(broker, "s", 5, clean=False, properties={"session_expiry_interval": 10})
    subscribe(s, "t", qos=1)
    s.send(Disconnect())
    s.lose()
    broker.stopService()
    clock.advance(60)
    broker.startService()
    back = FakeClient(broker, 5)
    connack = back.connect("s", clean=False, properties={"session_expiry_interval": 10})
    assert not connack.session_present


def _payloads(client: FakeClient, got: list[bytes]) -> None:
    got += [p.payload for p in client.received() if isinstance(p, Publish)]


def _reconnected(broker: BrokerService) -> FakeClient:
    """The publisher back, its CONNECT sent, without waiting for its CONNACK (behind the store)."""
    pub = FakeClient(broker, version=5)
    pub.send(Connect(client_id="pub", clean_start=False, protocol_level=5, protocol_name="MQTT",
                     properties={"session_expiry_interval": 100}))
    return pub


def _resent(broker: BrokerService, store: Any, ok: FakeClient, got: list[bytes]) -> FakeClient:
    """The publisher back, sending its QoS 2 message "b" again (DUP), the store's batches written
    and what ``ok`` got added to ``got``: the publisher's connection."""
    pub = _reconnected(broker)
    pub.send(Publish(topic="t", payload=b"b", qos=2, packet_id=2, dup=True))
    for _ in range(5):
        store.write_all()
    _payloads(ok, got)
    return pub


def test_a_qos2_resend_is_not_routed_again_when_the_0x80_pubrec_never_went_out() -> None:
    """A PUBREC 0x80 (the disk failed) ends the exchange and frees the packet id [MQTT-4.3.3-9]:
    it was freed when the PUBREC was queued, behind a PUBCOMP that waited for the disk. The
    connection ended before either went out: the client, told nothing, sent the PUBLISH again
    (DUP) as it must [MQTT-4.4.0-1], and the broker routed it a second time [MQTT-4.3.3-10]."""
    store, broker = held_broker()
    sub = connected(broker, "sub", version=5)
    sub.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=2),)))
    store.write_all()
    sub.received()
    pub = FakeClient(broker, version=5)
    pub.connect("pub", clean=False, properties={"session_expiry_interval": 100})
    store.write_all()
    pub.received()
    got: list[bytes] = []
    pub.send(Publish(topic="t", payload=b"a", qos=2, packet_id=1))
    store.write_all()
    assert [type(p) for p in pub.received()] == [Pubrec]
    store.generation += 1  # one batch: the PUBREL's end of id 1, and the PUBLISH of id 2
    pub.send(Pubrel(packet_id=1), Publish(topic="t", payload=b"b", qos=2, packet_id=2))
    store.write(store.generation, StoreError("the disk is full"))
    assert pub.received() == []  # the PUBCOMP waits for the disk, the PUBREC 0x80 behind it
    _payloads(sub, got)
    assert got == [b"a", b"b"]
    pub.lose()
    store.generation += 1
    pub = _reconnected(broker)
    pub.send(Pubrel(packet_id=1), Publish(topic="t", payload=b"b", qos=2, packet_id=2, dup=True))
    for _ in range(5):
        store.write_all()
    _payloads(sub, got)
    assert got == [b"a", b"b"]
    # (Id 1 ended in memory at its first PUBREL: 0x92 now, "not found".)
    assert [(type(p).__name__, getattr(p, "reason_code", None)) for p in pub.received()][1:] == [
        ("Pubcomp", 0x92), ("Pubrec", 0)]


def _publisher_beside_a_full_session(broker: BrokerService, store: HeldStore) -> FakeClient:
    """A publisher (MQTT 5, its session kept) connected to a broker of max_queued_messages and
    max_stored_messages 1, where an offline session on t has both full: a QoS 2 PUBLISH on t
    gets PUBREC 0x97."""
    full = FakeClient(broker, version=5)
    full.connect("full", clean=False, properties={"session_expiry_interval": 1000})
    full.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
    store.write_all()
    full.lose()
    store.write_all()
    for i in range(2):
        broker.publish("t", b"fill%d" % i, qos=1)
        store.write_all()
    pub = FakeClient(broker, version=5)
    pub.connect("pub", clean=False, properties={"session_expiry_interval": 100})
    store.write_all()
    pub.received()
    return pub


def _refused_by_a_full_session() -> tuple[HeldStore, BrokerService, FakeClient, FakeClient]:
    """A QoS 2 message to "t" that "ok" takes and a full stored session refuses (PUBREC 0x97 to
    be sent): the store, the broker, "ok" and the publisher."""
    store, broker = held_broker(max_queued_messages=1, max_stored_messages=1)
    ok = connected(broker, "ok", version=5)
    ok.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=2),)))
    pub = _publisher_beside_a_full_session(broker, store)
    ok.received()
    pub.send(Publish(topic="t", payload=b"b", qos=2, packet_id=2))
    return store, broker, ok, pub


def test_a_qos2_resend_is_not_routed_again_when_the_0x97_pubrec_never_went_out() -> None:
    """The same without a failing disk: one subscriber's full quota refuses the message (PUBREC
    0x97), whose packet id was freed at once, while the PUBREC waited for the store's batch."""
    store, broker, ok, pub = _refused_by_a_full_session()
    got: list[bytes] = []
    _payloads(ok, got)
    assert pub.received() == []  # the PUBREC 0x97 waits for the batch, and the connection ends
    pub.lose()
    store.write_all()
    pub = _resent(broker, store, ok, got)
    assert got == [b"b"]
    assert [(type(p).__name__, p.reason_code) for p in pub.received()][1:] == [("Pubrec", 0)]
    pub.send(Pubrel(packet_id=2))
    store.write_all()
    assert [type(p) for p in pub.received()] == [Pubcomp] and 2 not in broker.sessions["pub"].awaiting_pubrel


def test_a_refusing_pubrec_waiting_for_the_ids_removal_when_the_connection_ends_leaves_it_awaited() -> None:
    """The same once the store's batch came: the PUBREC 0x97 waits for the packet id's removal
    from the store, and the connection ends before it goes. The id is awaited again, in memory
    and in the store (a restart finds it too): the resend is known as one."""
    store, broker, ok, pub = _refused_by_a_full_session()
    got: list[bytes] = []
    store.write_all()
    assert pub.received() == []  # the PUBREC 0x97 waits for the id's removal
    pub.lose()
    store.write_all()
    assert [2 in session.awaiting_pubrel for session, _ in store.load().sessions if session.client_id == "pub"] == [True]
    pub = _resent(broker, store, ok, got)
    assert got == [b"b"], "the resend of a QoS 2 message was routed a second time"
    assert [(type(p).__name__, p.reason_code) for p in pub.received()][1:] == [("Pubrec", 0)]


def test_a_refusing_pubrec_for_a_transport_gone_does_not_free_its_packet_id() -> None:
    """The same when the connection is lost while the rest of its read waits, for a publish
    hook deciding on a later PUBLISH: the PUBREC 0x97, released by the store's batch, went to a
    transport that is gone, and freed the packet id all the same: the resend was routed again."""
    store, broker = held_broker(max_queued_messages=1, max_stored_messages=1)
    pending: list[Deferred[Any]] = []
    broker.hooks.on_publish(lambda client, message: (pending.append(Deferred()) or pending[-1])
                            if message.payload == b"later" else None)
    ok = connected(broker, "ok", version=5)
    ok.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=2),)))
    pub = _publisher_beside_a_full_session(broker, store)
    ok.received()
    got: list[bytes] = []
    pub.send(Publish(topic="t", payload=b"b", qos=2, packet_id=2), Publish(topic="u", payload=b"later", qos=1, packet_id=3))
    assert len(pending) == 1
    pub.lose()  # the hook decides on "later": the connection ends once it has
    store.write_all()  # the PUBREC 0x97 of packet id 2 "goes out", to nobody
    pending[0].callback(None)
    store.write_all()
    _payloads(ok, got)
    pub = _resent(broker, store, ok, got)
    assert got == [b"b"], "the resend of a QoS 2 message was routed a second time"


def test_a_refusing_pubrec_of_a_read_split_over_turns_for_a_transport_gone_does_not_free_its_id() -> None:
    """The same with no hook and no store: the connection lost between two turns of one read."""
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), max_queued_messages=1)
    full = FakeClient(broker, version=5)
    full.connect("full", clean=False, properties={"session_expiry_interval": 1000})
    full.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=1),)))
    full.lose()
    broker.publish("t", b"fill", qos=1)
    ok = connected(broker, "ok", version=5)
    ok.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t", qos=2),)))
    ok.received()
    pub = FakeClient(broker, version=5)
    pub.connect("pub", clean=False, properties={"session_expiry_interval": 100})
    pub.send_bytes(encode(Pingreq(), 5) * PACKETS_PER_TURN + encode(Publish(topic="t", payload=b"b", qos=2, packet_id=2), 5))
    pub.lose()  # before the next turn of the reactor, where the PUBLISH is handled
    broker.clock.advance(0)  # type: ignore[attr-defined]
    got: list[bytes] = []
    _payloads(ok, got)
    pub = FakeClient(broker, version=5)
    pub.connect("pub", clean=False, properties={"session_expiry_interval": 100})
    pub.send(Publish(topic="t", payload=b"b", qos=2, packet_id=2, dup=True))
    _payloads(ok, got)
    assert got == [b"b"], "the resend of a QoS 2 message was routed a second time"


def test_a_refusing_pubrec_that_went_out_frees_its_packet_id() -> None:
    """Sent, the PUBREC 0x97 ends the exchange: the client may use the id for a new message."""
    store, broker = held_broker(max_queued_messages=1, max_stored_messages=1)
    pub = _publisher_beside_a_full_session(broker, store)
    pub.send(Publish(topic="t", payload=b"b", qos=2, packet_id=2))
    assert 2 in broker.sessions["pub"].awaiting_pubrel
    store.write_all()
    assert pub.received() == []  # the store forgets the id first
    store.write_all()
    assert [(type(p).__name__, p.reason_code) for p in pub.received()] == [("Pubrec", 0x97)]
    assert 2 not in broker.sessions["pub"].awaiting_pubrel

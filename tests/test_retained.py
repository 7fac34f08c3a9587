"""Retained messages: one per topic, found by filter [MQTT-3.3.1-5], [MQTT-3.3.1-10]."""

from __future__ import annotations

from collections import Counter
from itertools import product
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_broker.message import Message
from mqtt_broker.retained import RetainedMessages
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.topics import matches, valid_topic_filter, valid_topic_name
from mqtt_broker.wire import Publish

from protocol_helpers import Held, connected, make_broker, publisher_and_subscribers


def msg(topic: str, payload: bytes = b"x", **fields: object) -> Message:
    return Message(topic=topic, payload=payload, retain=True, **fields)  # type: ignore[arg-type]


def store_all(*topics: str) -> RetainedMessages:
    retained = RetainedMessages()
    for topic in topics:
        retained.store(msg(topic, topic.encode() or b"-"))
    return retained


def matched(retained: RetainedMessages, topic_filter: str) -> list[str]:
    return sorted(m.topic for m in retained.match(topic_filter))


# --- store / replace / delete -----------------------------------------------------------------

def test_store_and_get() -> None:
    retained = RetainedMessages()
    assert len(retained) == 0 and retained.count == 0
    first = msg("a/b", b"1", qos=1)
    retained.store(first)
    assert retained.get("a/b") is first
    assert retained.get("a") is None  # only an inner level
    assert retained.get("a/b/c") is None
    assert retained.get("b") is None
    assert len(retained) == 1


def test_store_replaces_the_topics_message() -> None:
    retained = RetainedMessages()
    retained.store(msg("a/b", b"1"))
    second = msg("a/b", b"2")
    retained.store(second)
    assert retained.get("a/b") is second
    assert len(retained) == 1
    assert [m.payload for m in retained.match("a/b")] == [b"2"]


def test_empty_payload_deletes() -> None:  # [MQTT-3.3.1-10]
    retained = store_all("a/b", "a")
    retained.store(msg("a/b", b""))
    assert retained.get("a/b") is None
    assert retained.get("a") is not None
    assert len(retained) == 1
    assert matched(retained, "#") == ["a"]
    # deleting what is not there changes nothing, and an empty payload is never stored
    retained.store(msg("a/b", b""))
    retained.store(msg("x/y", b""))
    assert len(retained) == 1
    assert retained.get("x/y") is None
    assert matched(retained, "#") == ["a"]


def test_delete() -> None:
    retained = store_all("a/b/c", "a")
    assert retained.delete("a/b") is False  # an inner level holds no message
    assert retained.delete("a/b/c/d") is False
    assert retained.delete("z") is False
    assert len(retained) == 2
    assert retained.delete("a/b/c") is True
    assert retained.delete("a/b/c") is False
    assert len(retained) == 1
    assert retained.delete("a") is True
    assert len(retained) == 0
    assert list(retained) == []
    assert retained._root.children == {}  # emptied branches are pruned


def test_delete_keeps_a_message_on_an_inner_level() -> None:
    retained = store_all("a", "a/b")
    assert retained.delete("a/b") is True
    assert retained.get("a") is not None
    assert matched(retained, "a/#") == ["a"]


def test_iteration_yields_every_message_once() -> None:
    topics = ["a", "a/b", "a/b/c", "/x", "$SYS/y", "b/"]
    retained = store_all(*topics)
    assert sorted(m.topic for m in retained) == sorted(topics)
    retained.store(msg("a/b", b"new"))
    assert Counter(m.topic for m in retained) == Counter(topics)
    assert [m.payload for m in retained if m.topic == "a/b"] == [b"new"]


def in_levels(topics: list[str]) -> list[str]:
    return sorted(topics, key=lambda topic: topic.split("/"))


def test_in_order_is_by_level_as_topics_come_and_go() -> None:
    """The order of the admin API's pages, kept sorted for a wide level, follows what is stored and
    deleted after a walk."""
    topics = [f"dev/{n}" for n in range(200)] + [f"dev/{n}/status" for n in range(0, 200, 3)] + [
        "dev", "dev-x", "dev/", "/dev", "a", "$SYS/x"]
    retained = store_all(*topics)
    assert [m.topic for m in retained.in_order()] == in_levels(topics)
    live = set(topics)
    for topic, kept in [("dev/7", False), ("dev/!", True), ("dev/9/status", False), ("dev/7/x", True),
                        ("dev/3/status", False), ("dev/3", False), ("dev/~", True), ("dev/0/status", True)]:
        retained.store(msg(topic, b"x" if kept else b""))
        live = live | {topic} if kept else live - {topic}
        assert [m.topic for m in retained.in_order()] == in_levels(list(live)), topic
    assert retained.topics(3) == in_levels(list(live))[:3]


class CountedChildren(dict[str, Any]):
    """A level's children, counting how many of them are looked up."""

    looked_up = 0

    def __getitem__(self, name: str) -> Any:
        CountedChildren.looked_up += 1
        return super().__getitem__(name)


def test_a_page_in_order_sorts_a_wide_level_once_and_looks_at_its_own_messages_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /retained and /topics (each polled every 2 s by the dashboard) sorted every child of a
    level and stacked them all before the first message: 1,000,000 retained under dev/<id> made
    a page of one 350 ms, each poll. A level's names are sorted once, until a child comes or goes,
    and walked as the page asks."""
    import mqtt_broker.retained as module
    n = 20_000
    retained = store_all(*[f"dev/{i}" for i in range(n)])
    level = retained._root.children["dev"]
    level.children = CountedChildren(level.children)
    sorted_names: list[int] = []

    def counted_sorted(names: Any, **kwargs: Any) -> list[Any]:
        result = sorted(names, **kwargs)
        sorted_names.append(len(result))
        return result
    monkeypatch.setattr(module, "sorted", counted_sorted, raising=False)
    pages = []
    for _ in range(3):
        CountedChildren.looked_up = 0
        pages.append(retained.topics(1))
        assert CountedChildren.looked_up <= 2
    assert pages == [["dev/0"]] * 3
    assert sum(sorted_names) <= n + 10, sorted_names  # the wide level, once


# --- match ------------------------------------------------------------------------------------

TOPICS = ["sport", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
          "sport/tennis/player2", "sport/golf", "sport/", "/finance", "finance", "$SYS",
          "$SYS/monitor/Clients", "a/$x"]


@pytest.mark.parametrize("topic_filter, expected", [
    ("sport/tennis/player1", ["sport/tennis/player1"]),
    ("sport/tennis/player1/#", ["sport/tennis/player1", "sport/tennis/player1/ranking"]),
    ("sport/#", ["sport", "sport/", "sport/golf", "sport/tennis", "sport/tennis/player1",
                 "sport/tennis/player1/ranking", "sport/tennis/player2"]),
    ("sport/+", ["sport/", "sport/golf", "sport/tennis"]),
    ("sport/tennis/+", ["sport/tennis/player1", "sport/tennis/player2"]),
    ("sport/+/player1", ["sport/tennis/player1"]),
    ("+", ["finance", "sport"]),
    ("+/+", ["/finance", "a/$x", "sport/", "sport/golf", "sport/tennis"]),
    ("/+", ["/finance"]),
    ("#", sorted(t for t in TOPICS if not t.startswith("$"))),
    ("+/#", sorted(t for t in TOPICS if not t.startswith("$"))),
    ("+/monitor/Clients", []),
    ("$SYS/#", ["$SYS", "$SYS/monitor/Clients"]),
    ("$SYS/monitor/+", ["$SYS/monitor/Clients"]),
    ("a/+", ["a/$x"]),
    ("a/#", ["a/$x"]),
    ("nothing/#", []),
    ("sport/tennis/player1/ranking/#", ["sport/tennis/player1/ranking"]),
])
def test_match(topic_filter: str, expected: list[str]) -> None:
    retained = store_all(*TOPICS)
    assert matched(retained, topic_filter) == expected
    assert matched(retained, topic_filter) == sorted(t for t in TOPICS if matches(topic_filter, t))


def test_hash_matches_the_parent_level() -> None:  # "a/#" matches "a" [MQTT-4.7.1-2]
    retained = store_all("a")
    assert matched(retained, "a/#") == ["a"]
    retained = store_all("a/b/c")
    assert matched(retained, "a/b/#") == ["a/b/c"]
    assert matched(retained, "a/#") == ["a/b/c"]


def test_dollar_topics_not_matched_by_leading_wildcards() -> None:  # [MQTT-4.7.2-1]
    retained = store_all("$SYS/a", "$x", "$x/y/z")
    assert matched(retained, "#") == []
    assert matched(retained, "+") == []
    assert matched(retained, "+/a") == []
    assert matched(retained, "+/#") == []
    assert matched(retained, "$x/#") == ["$x", "$x/y/z"]
    assert matched(retained, "$x/+/z") == ["$x/y/z"]


# --- property: match agrees with matches() ----------------------------------------------------

LEVELS = ["a", "b", "$x", ""]

topic_names = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(
    valid_topic_name)

# every topic of up to four levels: each example also matches its filter against all of them
ALL_TOPICS = sorted({"/".join(p) for n in (1, 2, 3, 4) for p in product(LEVELS, repeat=n)} - {""})


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(LEVELS + ["+"]), min_size=0, max_size=4))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=200, deadline=None)
@given(topics=st.lists(topic_names, max_size=10),
       deleted=st.lists(topic_names, max_size=4),
       topic_filter=topic_filters().filter(valid_topic_filter))
def test_match_agrees_with_matches(topics: list[str], deleted: list[str], topic_filter: str) -> None:
    retained = RetainedMessages()
    for index, topic in enumerate(topics):
        retained.store(msg(topic, str(index).encode()))
    for topic in deleted:
        retained.store(msg(topic, b""))
    live = set(topics) - set(deleted)
    assert len(retained) == len(live)
    assert Counter(m.topic for m in retained) == Counter(live)
    expected = Counter(t for t in live if matches(topic_filter, t))
    assert Counter(m.topic for m in retained.match(topic_filter)) == expected
    for topic in live:  # the last store of a topic wins
        last = max(i for i, t in enumerate(topics) if t == topic)
        message = retained.get(topic)
        assert message is not None and message.payload == str(last).encode()
    everything = RetainedMessages()
    for topic in ALL_TOPICS:
        everything.store(msg(topic))
    assert Counter(m.topic for m in everything.match(topic_filter)) == Counter(
        t for t in ALL_TOPICS if matches(topic_filter, t))


def test_expired_messages_are_swept_from_memory_and_the_store() -> None:
    """An expired retained message goes although no SUBSCRIBE comes for it [MQTT-3.3.2-5]:
    otherwise they pile up, in memory and on disk."""
    from protocol_helpers import connected, make_broker

    from mqtt_broker.broker import RETAINED_SWEEP
    from mqtt_broker.store.memory import MemoryStore
    store = MemoryStore()
    broker = make_broker(store=store)
    broker.startService()
    publisher = connected(broker, "p", version=5)
    for n in range(100):
        publisher.publish(f"t/{n}", b"soon gone", retain=True, properties={"message_expiry_interval": 1})
    publisher.publish("t/kept", b"kept", retain=True)
    publisher.publish("t/0", b"replaced, no expiry", retain=True)
    broker.reactor.advance(RETAINED_SWEEP)  # type: ignore[attr-defined]
    assert sorted(m.topic for m in broker.retained if m.topic.startswith("t/")) == ["t/0", "t/kept"]
    assert sorted(store._retained) == ["t/0", "t/kept"]  # type: ignore[attr-defined]
    broker.stopService()


def test_expired_messages_are_swept_a_bounded_number_a_turn() -> None:
    """The sweep deletes RETAINED_EXPIRED_PER_TURN expired messages a turn of the reactor, the
    rest in the next turns (half a million expired at once held it for a second), and a
    SUBSCRIBE meanwhile gets none of those still kept [MQTT-3.3.2-5]."""
    from mqtt_broker.broker import RETAINED_EXPIRED_PER_TURN, RETAINED_SWEEP

    from protocol_helpers import TurnClock
    store = MemoryStore()
    broker = make_broker(reactor=TurnClock(), store=store, sys_interval=0)
    broker.startService()
    count = 2 * RETAINED_EXPIRED_PER_TURN + 5
    for n in range(count):
        broker.publish(f"t/{n}", b"soon gone", retain=True, properties={"message_expiry_interval": 1})
    broker.publish("t/kept", b"kept", retain=True)
    broker.clock.advance(RETAINED_SWEEP)
    assert len(broker.retained) == count + 1 - RETAINED_EXPIRED_PER_TURN
    last = f"t/{count - 1}"
    assert broker.retained.get(last) is not None
    sub = connected(broker, "sub")
    assert sub.subscribe("t/kept", last)[1:] == [Publish(topic="t/kept", payload=b"kept", retain=True)]
    broker.clock.advance(0)
    assert len(broker.retained) == count - 2 * RETAINED_EXPIRED_PER_TURN  # (and the one the SUBSCRIBE dropped)
    broker.clock.advance(0)
    assert [m.topic for m in broker.retained] == ["t/kept"]
    assert list(store._retained) == ["t/kept"]  # type: ignore[attr-defined]
    broker.stopService()


def test_expire_drops_only_what_is_due() -> None:
    retained = RetainedMessages()
    retained.store(Message(topic="a", payload=b"1", retain=True, expires_at=10.0))
    retained.store(Message(topic="b", payload=b"2", retain=True, expires_at=20.0))
    retained.store(Message(topic="c", payload=b"3", retain=True))
    assert retained.expire(10.0, 10) == ["a"] and retained.expire(15.0, 10) == []
    assert sorted(m.topic for m in retained) == ["b", "c"]
    retained.delete("b")
    assert retained.expire(100.0, 10) == [] and len(retained) == 1


def test_a_message_kept_anew_expires_by_its_own_expiry() -> None:
    retained = RetainedMessages()
    retained.store(Message(topic="later", payload=b"1", retain=True, expires_at=10.0))
    retained.store(Message(topic="later", payload=b"2", retain=True, expires_at=30.0))
    retained.store(Message(topic="sooner", payload=b"1", retain=True, expires_at=30.0))
    retained.store(Message(topic="sooner", payload=b"2", retain=True, expires_at=5.0))
    assert retained.expire(20.0, 10) == ["sooner"] and not retained.due(20.0)
    assert retained.expire(30.0, 10) == ["later"] and len(retained) == 0


def test_topics_cleared_or_kept_anew_without_an_expiry_leave_nothing_to_expire() -> None:
    """A presence topic per device (retained with an expiry, cleared when the device goes)
    kept an entry to expire per device until its expiry came, up to 2**32-1 s later."""
    retained = RetainedMessages()
    for n in range(1000):
        retained.store(Message(topic=f"cleared/{n}", payload=b"online", retain=True, expires_at=1e9))
        retained.store(msg(f"cleared/{n}", b""))
        retained.store(Message(topic=f"anew/{n}", payload=b"online", retain=True, expires_at=1e9))
        retained.store(msg(f"anew/{n}", b"offline"))
    assert (len(retained._expiring), len(retained._entries)) == (0, 0)
    retained.store(Message(topic="kept", payload=b"1", retain=True, expires_at=1e9))
    for n in range(1000):
        retained.store(Message(topic=f"cleared/{n}", payload=b"online", retain=True, expires_at=1e9))
        retained.delete(f"cleared/{n}")
        retained.store(Message(topic="sooner", payload=b"1", retain=True, expires_at=1e9 - n))
    # the dead entries ("cleared/...", "sooner"'s earlier ones) go once they are the majority
    assert len(retained._expiring) <= 2 * 51 + 2 and len(retained._entries) == 2
    assert retained.live(1e9 - 999) == 1000 + 1  # "anew/..." and "kept": "sooner" has expired
    assert retained.expire(1e9, 1000) == ["sooner", "kept"] and not retained._expiring


def test_a_message_counted_as_expired_then_kept_anew_or_deleted_counts_as_it_is_now() -> None:
    retained = RetainedMessages()
    for topic in ("anew", "deleted", "stays"):
        retained.store(Message(topic=topic, payload=b"1", retain=True, expires_at=10.0))
    assert retained.live(5.0) == 3 and retained.live(10.0) == 0 and retained.due(10.0)
    retained.store(msg("anew", b"2"))
    retained.delete("deleted")
    assert retained.live(10.0) == 1 and retained.expire(10.0, 10) == ["stays"]
    assert retained.live(1e9) == len(retained) == 1 and not retained.due(1e9)


def test_a_topic_cleared_then_kept_with_an_expiry_expires_by_it() -> None:
    retained = RetainedMessages()
    for at in (10.0, 20.0, 5.0):  # the cleared one's expiry, a later one, a sooner one
        retained.store(Message(topic="same", payload=b"1", retain=True, expires_at=10.0))
        retained.store(msg("same", b""))
        retained.store(Message(topic="same", payload=b"2", retain=True, expires_at=at))
        assert retained.expire(at - 1, 10) == [] and retained.get("same") is not None
        assert retained.expire(at, 10) == ["same"] and len(retained) == 0
        assert not retained._expiring and not retained._entries
    for n in range(100):  # enough cleared to rebuild the heap without them
        retained.store(Message(topic=f"t/{n}", payload=b"1", retain=True, expires_at=10.0))
        retained.delete(f"t/{n}")
        retained.store(Message(topic=f"t/{n}", payload=b"2", retain=True, expires_at=10.0 + n % 2))
    assert retained.expire(10.0, 1000) == [f"t/{n}" for n in range(0, 100, 2)]
    assert retained.expire(11.0, 1000) == [f"t/{n}" for n in range(1, 100, 2)]
    assert len(retained) == 0 and not retained._expiring and not retained._entries


def test_a_retained_message_keeps_one_copy_of_its_payload() -> None:
    """Kept as long as its topic is: sent live to MQTT 3.1.1 and 5 subscribers, then as
    retained to new ones of both, it held five times its payload (the PUBLISH as received,
    the payload, one encoding per kind of subscriber), then three (the payload, and its two
    retained encodings, kept for the next subscribers of a kind), one now."""
    count, size = 50, 20_000
    broker = make_broker()
    publisher, live = publisher_and_subscribers(broker, "r/#")
    with Held() as held:
        for n in range(count):
            publisher.publish(f"r/{n}", bytes([n]) * size, retain=True)
        for version in (4, 5, 4, 5):
            late = connected(broker, f"late{version}", version=version)
            assert len([p for p in late.subscribe("r/#") if isinstance(p, Publish)]) == count
            late.lose()
        for subscriber in live:
            assert len([p for p in subscriber.received() if isinstance(p, Publish)]) == count
    assert count * size <= held.bytes < 1.2 * count * size, held.bytes / (count * size)


# --- retain_available = false --------------------------------------------------------------------

def test_retained_messages_kept_from_before_are_not_sent_once_retain_is_off() -> None:
    """Started again with retain_available = false, clients are told Retain Available 0 (MQTT 5
    §3.2.2.3.5): what the store kept from before was sent all the same, RETAIN 1. It stays in
    the store, for a start with them again."""
    from durability_helpers import Restarts

    from mqtt_broker.store.memory import MemoryStore
    restarts = Restarts(MemoryStore(), sys_interval=0)
    connected(restarts.start(), "pub").publish("t", b"old", qos=1, retain=True)
    restarts.settings["retain_available"] = False
    client = connected(restarts.restart(), "sub", version=5)
    assert [p for p in client.subscribe("t", qos=1) if isinstance(p, Publish)] == []
    restarts.settings["retain_available"] = True
    client = connected(restarts.restart(), "sub", version=5)
    assert [p.payload for p in client.subscribe("t", qos=1) if isinstance(p, Publish)] == [b"old"]


def test_without_retained_messages_the_brokers_own_publish_carries_no_retain_flag() -> None:
    """$SYS values, a bridge's state and BrokerService.publish reached a Retain As Published
    subscriber with RETAIN 1 (the admin API refuses it): the flag goes, as from a bridge's remote."""
    broker = make_broker(retain_available=False, sys_interval=0)
    client = connected(broker, "sub", version=5)
    client.subscribe("t", qos=0, retain_as_published=True)
    broker.publish("t", b"x", retain=True)
    assert [p.retain for p in client.received() if isinstance(p, Publish)] == [False]


def test_a_retained_message_kept_by_a_memory_store_keeps_one_copy_of_its_payload() -> None:
    """As test_retained.test_a_retained_message_keeps_one_copy_of_its_payload, with the
    MemoryStore embedders are told to use to keep state across a restart of the service: the
    store keeps the message as routed (the PUBLISH as received, one encoding per kind of
    subscriber), not a bare copy, so each retained topic holds its payload several times."""
    count, size = 50, 20_000
    broker = make_broker(store=MemoryStore())
    broker.startService()
    publisher, live = publisher_and_subscribers(broker, "r/#")
    with Held() as held:
        for n in range(count):
            publisher.publish(f"r/{n}", bytes([n]) * size, retain=True)
        for subscriber in live:
            assert len([p for p in subscriber.received() if isinstance(p, Publish)]) == count
    assert held.bytes < 1.2 * count * size, f"held {held.bytes / (count * size):.2f} times the payloads"


def _retained_publishes(client: object) -> list[tuple[bytes, bool]]:
    return [(p.payload, p.retain) for p in client.received() if isinstance(p, Publish)]  # type: ignore[attr-defined]


def test_a_publish_hooks_retained_message_carries_no_retain_flag_without_retained_messages() -> None:
    """With retain_available = false, clients are told Retain Available 0 and the broker's own
    PUBLISHes (BrokerService.publish, $SYS, a bridge's) go without the RETAIN flag; a message a
    publish hook makes with retain=True went to a Retain As Published subscriber with RETAIN 1."""
    from test_mqtt5 import subscribe5, v5

    broker = make_broker(retain_available=False)
    broker.hooks.on_publish(lambda client, m: Message(m.topic, m.payload, m.qos, True, properties=m.properties))
    subscriber = v5(broker, "s")
    subscribe5(subscriber, "t", retain_as_published=True)
    subscriber.received()
    v5(broker, "p").publish("t", b"x")
    assert _retained_publishes(subscriber) == [(b"x", False)]


def test_a_will_hooks_retained_will_carries_no_retain_flag_without_retained_messages() -> None:
    """The same for a will a will hook makes retained (a client's own retained will is refused
    with CONNACK 0x9A [MQTT-3.2.2-13])."""
    from mqtt_broker.message import Message
    from mqtt_broker.wire import Will
    from test_mqtt5 import subscribe5, v5

    broker = make_broker(retain_available=False)
    broker.hooks.on_will(lambda client, m: Message(m.topic, m.payload, m.qos, True, properties=m.properties))
    subscriber = v5(broker, "s")
    subscribe5(subscriber, "t", retain_as_published=True)
    subscriber.received()
    v5(broker, "c", will=Will(topic="t", payload=b"bye")).lose()
    assert _retained_publishes(subscriber) == [(b"bye", False)]

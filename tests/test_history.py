"""The message log and its replay to new subscribers (mqtt_broker/history.py)."""

from __future__ import annotations

import pytest
from protocol_helpers import Held, connected, make_broker, publisher_and_subscribers

from mqtt_broker.history import MessageLog, ReplayError, parse_spec, split_replay_filter
from mqtt_broker.message import Message
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.wire import Publish, Suback, Subscribe, SubscriptionRequest


def payloads(packets):  # type: ignore[no-untyped-def]
    return [p.payload for p in packets if hasattr(p, "payload")]


def test_parse_spec() -> None:
    assert parse_spec("all") == ("all", 0)
    assert parse_spec("last:5") == ("last", 5)
    assert parse_spec("since:100.5") == ("since", 100.5)
    assert parse_spec("since:1970-01-01T00:01:40Z") == ("since", 100.0)
    for bad in ("", "last:0", "last:x", "first:3", "since:yesterday", "all:1"):
        with pytest.raises(ReplayError):
            parse_spec(bad)
    assert split_replay_filter("$replay/last:3/a/#") == ("last:3", "a/#")
    assert split_replay_filter("a/#") == (None, "a/#")


@pytest.mark.parametrize("spec", ["since:nan", "since:inf", "since:-infinity", "since:1e3", "since:1_000",
                                  "since: 100", "since:" + "9" * 400, "all:", "last: 3", "last:1_0", "last:+3",
                                  "last:\u0663", "last:" + "9" * 5000])
def test_a_spec_other_than_all_last_n_or_since_t_is_refused(spec: str) -> None:
    """docs/message-log.md: "A request that cannot be understood gets SUBACK 0x80". float() and
    int() took more than a count and a time: `since:nan` was granted and replayed nothing,
    `last:\u0663` (an Arabic-Indic three) and `last:1_0` were counts, `all:` was `all`."""
    with pytest.raises(ReplayError):
        parse_spec(spec)


def test_log_bounds_by_count_bytes_and_age() -> None:
    log = MessageLog(["a/#"], max_messages=3, max_age=10, max_bytes=0)
    for n in range(5):
        log.record(Message(topic="a/x", payload=str(n).encode()), now=n)
    assert [e.message.payload for e in log.replay("#", "all", now=5)] == [b"2", b"3", b"4"]
    assert [e.message.payload for e in log.replay("#", "all", now=13)] == [b"3", b"4"]  # age: at >= 3
    by_bytes = MessageLog(["#"], max_messages=0, max_age=0, max_bytes=6)  # (topic and payload: 3 bytes each)
    for n in range(4):
        by_bytes.record(Message(topic="t", payload=b"xx"), now=0)
    assert len(by_bytes.replay("t", "all", now=0)) == 2


def test_a_message_in_several_logs_is_replayed_once_in_order() -> None:
    log = MessageLog(["a/#", "+/b"], max_messages=10, max_age=0, max_bytes=0)
    for topic in ("a/b", "a/c", "x/b", "z"):
        log.record(Message(topic=topic, payload=topic.encode()), now=0)
    assert [e.message.topic for e in log.replay("#", "all", now=0)] == ["a/b", "a/c", "x/b"]
    assert [e.message.topic for e in log.replay("+/b", "last:1", now=0)] == ["x/b"]
    assert [e.message.topic for e in log.replay("#", "since:0", now=0)] == ["a/b", "a/c", "x/b"]


def test_v5_replay_property_then_live_without_gap_or_duplicate() -> None:
    broker = make_broker(history_filters=["sensors/#"])
    pub = connected(broker, "pub")
    for n in range(5):
        pub.publish("sensors/t", str(n).encode())
    pub.publish("sensors/t", b"last", retain=True)
    sub = connected(broker, "sub", version=5)
    sub.send(Subscribe(packet_id=1, properties={"user_property": [("replay", "last:3")]},
                       subscriptions=(SubscriptionRequest(topic_filter="sensors/#", qos=1),)))
    packets = sub.received()
    assert packets[0] == Suback(packet_id=1, reason_codes=(1,))
    assert payloads(packets[1:]) == [b"3", b"4", b"last"]  # the retained one is not sent twice
    pub.publish("sensors/t", b"live")
    assert payloads(sub.received()) == [b"live"]


def test_mqtt3_replay_through_the_filter_prefix() -> None:
    broker = make_broker(history_filters=["log/#"])
    pub = connected(broker, "pub")
    for n in range(4):
        pub.publish("log/a", str(n).encode())
    sub = connected(broker, "sub")
    packets = sub.subscribe("$replay/all/log/#")
    assert packets[0] == Suback(packet_id=1, reason_codes=(0,))
    assert payloads(packets[1:]) == [b"0", b"1", b"2", b"3"]
    assert [s.topic_filter for s in broker.subscriptions_of("sub")] == ["log/#"]
    assert sub.subscribe("$replay/sometime/log/#", packet_id=2) == [Suback(packet_id=2, reason_codes=(0x80,))]
    v5 = connected(broker, "v5", version=5)
    assert v5.subscribe("$replay/all/$replay/all/log/#") == [Suback(packet_id=1, reason_codes=(0x8F,))]
    assert broker.subscriptions_of("v5") == []
    from mqtt_broker.wire import Unsubscribe, Unsuback
    sub.send(Unsubscribe(packet_id=3, topic_filters=("$replay/all/log/#",)))
    assert sub.received() == [Unsuback(packet_id=3)]
    assert broker.subscriptions_of("sub") == []


def test_log_survives_a_restart_through_the_store() -> None:
    store = MemoryStore()
    first = make_broker(history_filters=["h/#"], history_max_messages=2, store=store)
    for n in range(3):
        first.publish("h/x", str(n).encode())
    first.stopService()
    second = make_broker(history_filters=["h/#"], history_max_messages=2, store=store)
    second.startService()
    sub = connected(second, "sub")
    assert payloads(sub.subscribe("$replay/all/h/#")[1:]) == [b"1", b"2"]
    second.publish("h/x", b"3")
    assert payloads(sub.received()) == [b"3"]


def test_a_replay_keeps_no_local_and_sends_no_retained_value_older_than_it_replayed() -> None:
    broker = make_broker(history_filters=["s/#"])
    me = connected(broker, "me", version=5)
    me.publish("s/mine", b"mine")
    other = connected(broker, "other")
    other.publish("s/t", b"old-retained", retain=True)
    other.publish("s/t", b"new")
    other.publish("s/kept", b"kept", retain=True)
    me.send(Subscribe(packet_id=1, properties={"user_property": [("replay", "all")]},
                      subscriptions=(SubscriptionRequest(topic_filter="s/#", qos=0, no_local=True),)))
    packets = me.received()[1:]
    # Its own message is not sent back [MQTT-3.8.3-3]; s/t's retained value is older than the
    # replayed "new" and does not follow it; s/kept was replayed, its retained copy not again.
    assert [(p.payload, p.retain) for p in packets] == [(b"old-retained", False), (b"new", False), (b"kept", False)]


def test_replays_of_one_subscribe_are_bounded_and_read_only_the_logs_they_could_match(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mqtt_broker import history
    broker = make_broker(history_filters=["busy/#", "quiet/#"])
    pub = connected(broker, "pub")
    for n in range(50):
        pub.publish("busy/x", b"%d" % n)
    pub.publish("quiet/x", b"q")
    compared = []
    matches = history.matches
    monkeypatch.setattr(history, "matches", lambda f, topic: compared.append(topic) or matches(f, topic))
    sub = connected(broker, "sub", version=5)
    (suback, *_) = sub.subscribe(*[f"$replay/all/quiet/{n}" for n in range(history.MAX_REPLAYS + 2)])
    assert suback.reason_codes == (0,) * history.MAX_REPLAYS + (0x97, 0x97)  # type: ignore[attr-defined]
    assert compared == ["quiet/x"] * history.MAX_REPLAYS  # quiet/n cannot match what busy/# logs


def test_an_mqtt3_client_unsubscribes_from_a_replay_since_a_time_with_an_offset() -> None:
    """The "+" of "+01:00" is no wildcard: the SUBSCRIBE was granted, its UNSUBSCRIBE closed."""
    broker = make_broker(history_filters=["log/#"])
    connected(broker, "pub").publish("log/a", b"0")
    sub = connected(broker, "sub")
    name = "$replay/since:1970-01-01T01:00:00+01:00/log/#"
    packets = sub.subscribe(name)
    assert packets[0] == Suback(packet_id=1, reason_codes=(0,)) and payloads(packets[1:]) == [b"0"]
    from mqtt_broker.wire import Unsubscribe, Unsuback
    sub.send(Unsubscribe(packet_id=2, topic_filters=(name,)))
    assert sub.received() == [Unsuback(packet_id=2)]
    assert broker.subscriptions_of("sub") == []


def test_refused_replay_filters_take_no_place_of_the_replays() -> None:
    """A refused filter reads no log: 16 of them left a valid replay after them 0x97."""
    from mqtt_broker import history
    broker = make_broker(history_filters=["log/#"])
    connected(broker, "pub").publish("log/a", b"0")
    sub = connected(broker, "sub", version=5)
    (suback, *replayed) = sub.subscribe(*["$replay/all/log/#/bad"] * history.MAX_REPLAYS, "$replay/all/log/#")
    assert suback.reason_codes == (0x8F,) * history.MAX_REPLAYS + (0,)  # type: ignore[attr-defined]
    assert payloads(replayed) == [b"0"]


@pytest.mark.parametrize("history_filters, filters", [
    ([], [f"a/{n}" for n in range(18)]),  # no message log: a "replay" property is the application's own
    (["log/#"], [f"$share/g/a/{n}" for n in range(18)]),  # a shared subscription is not replayed
    ([], ["a/1"]),
])
def test_subscriptions_that_replay_nothing_take_no_place_of_the_replays(
        history_filters: list[str], filters: list[str]) -> None:
    broker = make_broker(history_filters=history_filters)
    client = connected(broker, "c", version=5)
    properties = {"user_property": [("replay", "all" if len(filters) > 1 else "not a spec")]}
    client.send(Subscribe(packet_id=2, properties=properties,
                          subscriptions=tuple(SubscriptionRequest(topic_filter=f) for f in filters)))
    assert client.received() == [Suback(packet_id=2, reason_codes=(0,) * len(filters))]


@pytest.mark.parametrize("history_filters, topic_filter", [
    ([], "$replay/nonsense/x"),  # no message log: the $replay/ form is understood, or refused, all the same
    (["log/#"], "$replay/nonsense/$share/g/x"),  # a shared filter, which is not replayed
    ([], "$replay//x"),  # (an empty spec is one too)
    (["log/#"], "$replay//x"),
])
def test_a_replay_filter_that_cannot_be_understood_gets_0x80(history_filters: list[str], topic_filter: str) -> None:
    broker = make_broker(history_filters=history_filters)
    client = connected(broker, "c", version=5)
    client.send(Subscribe(packet_id=2, subscriptions=(SubscriptionRequest(topic_filter=topic_filter),)))
    assert client.received() == [Suback(packet_id=2, reason_codes=(0x80,))]


def test_the_store_keeps_what_the_logs_hold_whatever_a_quiet_filter_keeps() -> None:
    """A quiet filter's old entry must not keep in the store what the busy filters dropped since
    (it grew with every message, and a restart read it all back)."""
    store = MemoryStore()
    broker = make_broker(history_filters=["rare/#", "busy/#"], history_max_messages=10, store=store)
    broker.startService()
    broker.publish("rare/x", b"once")
    for n in range(300):
        broker.publish("busy/x", b"%d" % n)
    kept = store.load().history
    assert [entry.message.payload for entry in kept] == [b"once"] + [b"%d" % n for n in range(290, 300)]
    broker.stopService()


def test_without_a_store_the_log_keeps_no_trace_of_what_it_dropped() -> None:
    """The seqs of dropped entries were kept for a store that was not there: about 40 bytes per
    logged message, for as long as the broker ran."""
    broker = make_broker(history_filters=["busy/#"], history_max_messages=10)
    broker.startService()
    for n in range(300):
        broker.publish("busy/x", b"%d" % n)
    assert broker.history is not None and broker.history.take_dropped() == []
    broker.stopService()


def test_a_logged_message_keeps_one_copy_of_its_payload() -> None:
    """Once delivered to subscribers of two kinds (MQTT 3.1.1 and 5), and replayed, a logged
    message holds its payload once: not the PUBLISH as received, nor an encoding per kind."""
    count, size = 50, 20_000
    broker = make_broker(history_filters=["h/#"])
    pub, subscribers = publisher_and_subscribers(broker, "h/#")
    with Held() as held:
        for n in range(count):
            pub.publish("h/x", bytes([n]) * size)
        for sub in subscribers:
            assert len(payloads(sub.received())) == count
        late = connected(broker, "late", version=5)
        assert len(payloads(late.subscribe("$replay/all/h/#")[1:])) == count
    assert count * size <= held.bytes < 1.5 * count * size, held.bytes


def test_a_replay_no_local_kept_from_the_newest_leaves_the_retained_message_to_go() -> None:
    """docs/message-log.md: the retained message is not sent after a newer one of its topic was
    replayed. Here No Local keeps the newest (the client's own, retained) out of the replay, and
    out of the retained messages sent too [MQTT-3.8.3-3]: the older one is replayed, the client's
    own is not sent either way."""
    broker = make_broker(history_filters=["s/#"])
    connected(broker, "other").publish("s/t", b"old")
    me = connected(broker, "me", version=5)
    me.publish("s/t", b"current", retain=True)
    me.send(Subscribe(packet_id=2, properties={"user_property": [("replay", "all")]},
                      subscriptions=(SubscriptionRequest(topic_filter="s/#", qos=0, no_local=True),)))
    assert payloads(me.received()) == [b"old"]


def test_a_retained_message_replayed_is_not_sent_again_when_no_local_keeps_a_newer_one_out() -> None:
    """docs/message-log.md: the retained message is not sent again when it was among the
    replayed. The client's own newer message, kept out (No Local), made the topic count as not
    replayed: the retained "state" went a second time, with RETAIN 1."""
    broker = make_broker(history_filters=["s/#"])
    connected(broker, "other").publish("s/t", b"state", retain=True)
    me = connected(broker, "me", version=5)
    me.publish("s/t", b"mine")
    me.send(Subscribe(packet_id=2, properties={"user_property": [("replay", "all")]},
                      subscriptions=(SubscriptionRequest(topic_filter="s/#", qos=0, no_local=True),)))
    assert [(p.payload, p.retain) for p in me.received() if isinstance(p, Publish)] == [(b"state", False)]


def test_a_retained_message_the_log_dropped_does_not_follow_a_newer_message_of_its_topic_replayed() -> None:
    """Older than all the log holds, it would leave the client with an older value than the
    replayed as the topic's latest."""
    broker = make_broker(history_filters=["s/#"], history_max_messages=2)
    pub = connected(broker, "pub")
    for payload, retain in ((b"state", True), (b"1", False), (b"2", False)):
        pub.publish("s/t", payload, retain=retain)
    assert payloads(connected(broker, "sub").subscribe("$replay/all/s/#")[1:]) == [b"1", b"2"]


def test_a_retained_message_read_back_from_the_store_does_not_follow_the_replay_of_its_topic() -> None:
    """The store keeps no sign of how old a retained message is against the log: it is taken for
    older than what the log holds, and not sent again (a service started again on its store sent
    it after the replay as newer)."""
    store = MemoryStore()
    broker = make_broker(history_filters=["s/#"], store=store, close_linger=0)
    broker.startService()
    broker.publish("s/t", b"state", retain=True)
    broker.stopService()
    broker.startService()
    assert payloads(connected(broker, "sub").subscribe("$replay/all/s/#")[1:]) == [b"state"]


def test_history_max_bytes_counts_topics_and_properties_too() -> None:
    """Only payloads were counted: messages of a 1-byte payload and 20 kB of user properties
    each kept 2 MB under history_max_bytes = 10,000."""
    broker = make_broker(history_filters=["h/#"], history_max_bytes=10_000, history_max_messages=0)
    pub = connected(broker, "pub", version=5)
    with Held() as held:
        for _ in range(100):
            pub.publish("h/x", b"y", properties={"user_property": [("k", "v" * 20_000)]})
    assert broker.history is not None and len(broker.history) == 0  # (each alone is over the bound)
    assert held.bytes < 10_000 + 100 * 1000, held.bytes


def test_a_filter_and_its_replay_in_one_subscribe_replay_once() -> None:
    """A SUBSCRIBE of several filters is as many SUBSCRIBEs [MQTT-3.8.4-5]: the replay asked for
    the second applied to the first too, which had asked for none: everything came twice."""
    broker = make_broker(history_filters=["log/#"])
    pub = connected(broker, "pub")
    for n in range(3):
        pub.publish("log/a", str(n).encode())
    assert payloads(connected(broker, "sub").subscribe("log/#", "$replay/all/log/#")) == [b"0", b"1", b"2"]


def test_last_n_counts_the_messages_not_expired() -> None:
    """An expired message was one of the N: last:1 replayed nothing, though a message lives."""
    broker = make_broker(history_filters=["e/#"])
    pub = connected(broker, "pub", version=5)
    pub.publish("e/t", b"lives")
    pub.publish("e/t", b"dies", properties={"message_expiry_interval": 1})
    broker.reactor.advance(5)
    assert payloads(connected(broker, "sub").subscribe("$replay/last:1/e/#")) == [b"lives"]


@pytest.mark.parametrize("history_max_messages", [0, 3])
def test_a_service_started_again_on_its_store_keeps_its_log_once(history_max_messages: int) -> None:
    """Started again on its store (an embedding application's stop and start), the service took
    the store's log up on top of what it held: each message was logged twice, and with a bound
    the copies pushed the originals out, which the store then forgot: a later start replayed
    nothing."""
    store = MemoryStore()
    broker = make_broker(history_filters=["h/#"], history_max_messages=history_max_messages, store=store,
                         close_linger=0)
    broker.startService()
    for n in range(3):
        broker.publish("h/x", str(n).encode())
    broker.stopService()
    broker.startService()
    sub = connected(broker, "sub")
    assert [p.payload for p in sub.subscribe("$replay/all/h/#")[1:]] == [b"0", b"1", b"2"]  # type: ignore[attr-defined]
    assert [entry.message.payload for entry in store.load().history] == [b"0", b"1", b"2"]


def test_a_replayed_message_keeps_its_retain_flag_under_retain_as_published() -> None:
    """It went with RETAIN 0 whatever the subscription asked [MQTT-3.3.1-12, -13], and the
    retained copy, replayed, is not sent again: a subscriber with Retain As Published never
    learnt it was retained."""
    broker = make_broker(history_filters=["s/#"])
    connected(broker, "pub").publish("s/t", b"state", retain=True)
    connected(broker, "pub").publish("s/u", b"event")
    for as_published in (True, False):
        sub = connected(broker, "sub", version=5)
        packets = [p for p in sub.subscribe("$replay/all/s/#", retain_as_published=as_published) if isinstance(p, Publish)]
        assert [(p.payload, p.retain) for p in packets] == [(b"state", as_published), (b"event", False)]


def test_topics_that_are_not_logged_are_not_held_long_by_the_route_cache() -> None:
    """Up to 10,000 topic names of any length were kept, logged or not: 200 of 60,000 bytes held
    12 MB (10,000 of the longest, 650 MB)."""
    broker = make_broker(history_filters=["log/#"])
    pub = connected(broker, "pub")
    pub.publish("warm/up", b"x")
    with Held() as held:
        for n in range(200):
            pub.publish(f"t/{n}/" + "y" * 60_000, b"x")
    assert broker.history is not None and len(broker.history) == 0
    assert held.bytes < 1_000_000, held.bytes


def test_the_log_forgets_what_is_older_than_history_max_age_without_new_messages() -> None:
    """Entries were dropped only as a message was logged to their filter, or a replay read it:
    after a burst and silence, memory and the store held them for good (a restart read them back)."""
    from mqtt_broker.broker import RETAINED_SWEEP
    store = MemoryStore()
    broker = make_broker(history_filters=["h/#", "other/#"], history_max_age=10, history_max_messages=0, store=store)
    broker.startService()
    for n in range(100):
        broker.publish("h/x", b"%d" % n)
    broker.reactor.advance(RETAINED_SWEEP)
    assert broker.history is not None and len(broker.history) == 0
    assert store.load().history == []
    broker.stopService()



def test_one_replay_filter_repeated_is_held_to_max_replays() -> None:
    """docs/message-log.md: "one SUBSCRIBE may make 16 requests ... the filters past them get
    0x97". The quota counted distinct filters: one filter repeated was replayed each time (1,000
    copies over a log of 10,000 messages held the reactor 11 s)."""
    from mqtt_broker import history
    broker = make_broker(history_filters=["busy/#"])
    pub = connected(broker, "pub")
    for n in range(20):
        pub.publish("busy/x", b"%d" % n)
    assert broker.history is not None
    reads = []
    replay = broker.history.replay
    broker.history.replay = lambda *args: reads.append(args) or replay(*args)  # type: ignore[method-assign]
    sub = connected(broker, "sub", version=5)
    sub.send(Subscribe(packet_id=1, subscriptions=tuple(
        SubscriptionRequest(topic_filter="$replay/since:99999999999/busy/#") for _ in range(history.MAX_REPLAYS * 4))))
    [suback] = [p for p in sub.received() if not hasattr(p, "payload")]
    assert len(reads) == history.MAX_REPLAYS
    assert list(suback.reason_codes) == [0] * history.MAX_REPLAYS + [0x97] * history.MAX_REPLAYS * 3


def test_a_shared_filter_of_a_replay_name_is_refused() -> None:
    """`$share/g/$replay/last:1/s/#` was granted as a shared subscription to the literal filter
    `$replay/last:1/s/#`: neither replayed nor subscribed to s/#, the group got nothing from s/#
    (`$replay/all/$replay/all/x` is refused 0x8F, for the same reason)."""
    broker = make_broker(history_filters=["s/#"])
    client = connected(broker, "c", version=5)
    [suback] = client.subscribe("$share/g/$replay/last:1/s/#")
    assert (list(suback.reason_codes), broker.subscriptions_of("c")) == ([0x8F], [])


def test_history_max_bytes_counts_the_topics_bytes_not_its_characters() -> None:
    """history_max_bytes: "Bytes of the messages (topic, payload and properties) kept per history
    filter". A topic of 4 two-byte characters and 3 bytes of payload is 11 bytes, more than 10:
    the log keeps nothing (it counted the topic's characters)."""
    from mqtt_broker.history import MessageLog
    from mqtt_broker.message import Message
    log = MessageLog(["#"], max_messages=0, max_age=0, max_bytes=10)
    log.record(Message(topic="\u00e9" * 4, payload=b"xxx"), now=0)
    assert log.replay("#", "all", now=0) == []

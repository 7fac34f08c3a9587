"""$SYS topics: Mosquitto's names, values after a known workload, on task.Clock."""

from __future__ import annotations

import math

from admin_helpers import M_MESSAGES, N_PUBLISHERS, workload
from protocol_helpers import connected, make_broker

from mqtt_broker import __version__, compiled
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.wire import Publish


def sys_values(broker) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {m.topic.removeprefix("$SYS/broker/"): m.payload.decode() for m in broker.retained.match("$SYS/#")}


def test_values_after_a_known_workload() -> None:
    broker = make_broker()
    broker.startService()
    at_start = sys_values(broker)
    assert at_start["version"] == f"mqtt_broker version {__version__} ({'compiled' if compiled else 'pure Python'})"
    assert at_start["uptime"] == "0 seconds"
    assert at_start["clients/connected"] == "0"
    assert at_start["load/publish/received/1min"] == "0.00"
    broker, tally, done = workload(broker)
    # Values are those of the moment of the update: nothing has happened since the workload.
    broker.reactor.advance(10)
    v = sys_values(broker)
    assert v["uptime"] == "10 seconds"
    assert v["clients/connected"] == v["clients/active"] == str(done["connected"])
    assert v["clients/disconnected"] == v["clients/inactive"] == "1"
    assert v["clients/total"] == str(done["connected"] + 1)
    assert v["clients/maximum"] == str(done["connected"])   # "away" had gone before the publishers came
    assert v["clients/expired"] == "0"
    assert v["publish/messages/received"] == str(N_PUBLISHERS * M_MESSAGES)
    assert v["publish/messages/sent"] == str(N_PUBLISHERS * M_MESSAGES)  # one subscriber got every one
    assert v["publish/messages/dropped"] == "0"
    assert v["messages/received"] == str(tally.packets_from_clients)
    assert v["messages/sent"] == str(tally.packets_to_clients)
    assert v["bytes/received"] == str(tally.bytes_from_clients)
    assert v["bytes/sent"] == str(tally.bytes_to_clients)
    assert v["subscriptions/count"] == "2"
    # The workload's one retained message and the $SYS topics published at start-up.
    assert v["retained messages/count"] == str(1 + len(at_start))
    assert v["messages/stored"] == v["store/messages/count"] == str(1 + len(at_start))
    assert v["messages/inflight"] == "0"
    assert int(v["heap/current"]) > 1_000_000 and int(v["heap/maximum"]) >= int(v["heap/current"]) // 2
    # Mosquitto's damped averages per minute: one 10 s step from 0 at a rate of 600 per minute.
    rate = N_PUBLISHERS * M_MESSAGES * 6.0
    for window, seconds in (("1min", 60), ("5min", 300), ("15min", 900)):
        expected = rate * (1 - math.exp(-10 / seconds))
        assert v[f"load/publish/received/{window}"] == f"{expected:.2f}", window
        assert v[f"load/publish/sent/{window}"] == f"{expected:.2f}", window
        assert float(v[f"load/bytes/received/{window}"]) > 0
    assert v["load/connections/1min"] == f"{(N_PUBLISHERS + 2) * 6 * (1 - math.exp(-10 / 60)):.2f}"
    # Another interval with no traffic: the loads decay.
    broker.reactor.advance(10)
    later = sys_values(broker)
    assert later["load/publish/received/1min"] == f"{rate * (1 - math.exp(-10 / 60)) * math.exp(-10 / 60):.2f}"
    assert later["uptime"] == "20 seconds"


def test_store_bytes_and_loads_mean_what_mosquittos_do() -> None:
    """store/messages/bytes was the bytes of the in-memory queues alone: a broker keeping a
    10,000-byte retained message said 0. load/connections averaged the sockets accepted, as
    load/sockets does, where Mosquitto's averages the CONNECT packets."""
    from protocol_helpers import FakeClient
    broker = make_broker()
    broker.startService()
    before = sum(len(message.payload) for message in broker.retained)  # the $SYS values of the start
    connected(broker, "p").publish("kept", b"x" * 10_000, retain=True)
    sub = connected(broker, "s")
    sub.subscribe("t", qos=1)
    broker.publish("t", b"y" * 500, qos=1)  # in flight: the subscriber does not acknowledge it
    for _ in range(4):
        FakeClient(broker)  # sockets that never send a CONNECT
    broker.reactor.advance(10)
    v = sys_values(broker)
    assert int(v["store/messages/bytes"]) == before + 10_000 + 500
    assert v["load/connections/1min"] == f"{2 * 6 * (1 - math.exp(-10 / 60)):.2f}"
    assert v["load/sockets/1min"] == f"{6 * 6 * (1 - math.exp(-10 / 60)):.2f}"


def test_subscribers_get_them_by_ordinary_routing() -> None:
    broker = make_broker(sys_interval=5)
    broker.startService()
    watcher = connected(broker, "watcher")
    everything = connected(broker, "everything")
    everything.subscribe("#")
    packets = watcher.subscribe("$SYS/broker/clients/+")
    retained = {p.topic: p.payload for p in packets if isinstance(p, Publish)}
    assert retained["$SYS/broker/clients/connected"] == b"0"   # as published at start-up
    assert all(p.retain for p in packets if isinstance(p, Publish))
    broker.reactor.advance(5)
    live = {p.topic: p.payload for p in watcher.received() if isinstance(p, Publish)}
    assert live["$SYS/broker/clients/connected"] == b"2"
    assert "$SYS/broker/clients/expired" not in live   # unchanged values are not published again
    assert not [p for p in everything.received() if isinstance(p, Publish)]  # '#' does not match $SYS


def test_sys_interval_zero_turns_them_off() -> None:
    broker = make_broker(sys_interval=0)
    broker.startService()
    broker.reactor.advance(60)
    assert sys_values(broker) == {}
    assert broker.operations.sys is None


def test_not_written_to_the_store() -> None:
    store = MemoryStore()
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker import BrokerService
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), store=store)
    broker.startService()
    broker.reactor.advance(10)
    assert sys_values(broker)
    broker.publish("plain/retained", b"kept", retain=True)
    assert [m.topic for m in store.load().retained] == ["plain/retained"]


def test_stops_with_the_broker() -> None:
    broker = make_broker()
    broker.startService()
    broker.stopService()
    before = sys_values(broker)["uptime"]
    broker.reactor.advance(100)
    assert sys_values(broker)["uptime"] == before
    assert not broker.reactor.getDelayedCalls()


def test_without_retained_messages_every_value_goes_at_each_update() -> None:
    """Only the values that changed went: one that does not (the version) reached no later
    subscriber, as nothing was retained (Mosquitto keeps its $SYS values retained all the same)."""
    broker = make_broker(retain_available=False)
    broker.startService()
    subscriber = connected(broker, "s")
    subscriber.subscribe("$SYS/broker/version")
    broker.reactor.advance(broker.config.sys_interval)
    assert [p.payload.decode() for p in subscriber.received() if isinstance(p, Publish)] == [
        f"mqtt_broker version {__version__} ({'compiled' if compiled else 'pure Python'})"]


def test_a_sys_value_deleted_through_the_api_is_published_again() -> None:
    broker = make_broker()
    broker.startService()
    assert broker.delete_retained("$SYS/broker/version")
    broker.reactor.advance(broker.config.sys_interval)
    assert broker.retained.get("$SYS/broker/version") is not None

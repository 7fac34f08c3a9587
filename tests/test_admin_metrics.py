"""/metrics: the Prometheus text, parsed, after a known workload on task.Clock; the monitors."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from admin_helpers import M_MESSAGES, N_PUBLISHERS, workload
from admin_http import start_admin
from auth_helpers import RawClient
from conftest import BrokerProcess
from prometheus_client.parser import text_string_to_metric_families
from protocol_helpers import FakeClient, connected, make_broker
from twisted.logger import formatEvent

from mqtt_broker import BrokerService
from mqtt_broker.admin import metrics
from mqtt_broker.admin.metrics import Histogram
from mqtt_broker.wire import Connect, Disconnect, ReasonCode, Suback, Subscribe, SubscriptionRequest

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(broker: BrokerService) -> Samples:
    registry = metrics.registry(broker, broker.operations)
    body, content_type = metrics.render(registry)
    assert content_type.startswith("text/plain; version=")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_counters_after_a_known_workload() -> None:
    broker, tally, done = workload()
    samples = scrape(broker)
    for qos, count in enumerate(done["qos"]):
        assert value(samples, "mqtt_messages_received_total", qos=str(qos)) == count
        assert value(samples, "mqtt_messages_sent_total", qos=str(qos)) == count
    assert sum(done["qos"]) == N_PUBLISHERS * M_MESSAGES
    assert value(samples, "mqtt_bytes_received_total") == tally.bytes_from_clients
    assert value(samples, "mqtt_bytes_sent_total") == tally.bytes_to_clients
    assert value(samples, "mqtt_packets_received_total") == tally.packets_from_clients
    assert value(samples, "mqtt_packets_sent_total") == tally.packets_to_clients
    assert value(samples, "mqtt_connections_total") == done["connected"] + 1
    assert value(samples, "mqtt_connections_open") == done["connected"]
    assert value(samples, "mqtt_clients_connected") == done["connected"]
    assert value(samples, "mqtt_clients_disconnected") == done["disconnected"]
    assert value(samples, "mqtt_subscriptions") == done["subscriptions"]
    sys_topics = sum(1 for m in broker.retained if m.topic.startswith("$SYS/"))
    assert value(samples, "mqtt_retained_messages") == done["retained"] + sys_topics
    assert value(samples, "mqtt_messages_published_by_broker_total") == sys_topics
    assert value(samples, "mqtt_queued_messages") == 0 and value(samples, "mqtt_inflight_messages") == 0
    for reason in ("queue_full", "too_large", "expired"):
        assert value(samples, "mqtt_messages_dropped_total", reason=reason) == 0
    assert value(samples, "mqtt_auth_failures_total") == 0
    assert value(samples, "process_resident_memory_bytes") > 1_000_000
    assert value(samples, "process_open_fds") > 0


def test_gauges_drops_refusals_and_auth_failures() -> None:
    broker = make_broker(max_queued_messages=3, max_inflight_messages=2, sys_interval=0)
    broker.startService()

    @broker.hooks.on_connect
    def refuse_intruder(client):  # type: ignore[no-untyped-def]
        return client.client_id != "intruder"

    offline = connected(broker, "offline", clean=False)
    offline.subscribe("q/#", qos=1)
    offline.send(Disconnect())
    offline.lose()
    slow = connected(broker, "slow")
    slow.subscribe("q/#", qos=1)
    publisher = connected(broker, "publisher")
    for n in range(6):
        publisher.publish(f"q/{n}", qos=1, packet_id=n + 1)
    intruder = FakeClient(broker)
    assert intruder.connect("intruder").reason_code == 5   # MQTT 3.1.1: not authorized
    bad_version = FakeClient(broker)
    bad_version.send(Connect(client_id="old", protocol_level=2, protocol_name="MQTT"))
    samples = scrape(broker)
    # "offline" queued 3 and dropped 3; "slow" has 2 in flight (its window) and 3 queued, 1 dropped.
    assert value(samples, "mqtt_queued_messages") == 6
    assert value(samples, "mqtt_inflight_messages") == 2
    assert value(samples, "mqtt_messages_dropped_total", reason="queue_full") == 4
    assert value(samples, "mqtt_queued_bytes") == 6
    assert value(samples, "mqtt_connections_refused_total", reason="NOT_AUTHORIZED") == 1
    assert value(samples, "mqtt_connections_refused_total", reason="UNSUPPORTED_PROTOCOL_VERSION") == 1
    assert value(samples, "mqtt_auth_failures_total") == 1
    assert value(samples, "mqtt_clients_disconnected") == 1
    publisher.publish("$SYS/broker/x", qos=1, packet_id=9)   # denied: the broker's own topics
    assert value(scrape(broker), "mqtt_publishes_denied_total") == 1


def test_clients_maximum_auth_failures_and_refusing_connacks_count_what_happened(tmp_path: Path) -> None:
    """The peak counted open sockets (ones with no CONNECT yet, a taken over one), a wrong
    password counted twice as an authentication failure, and the CONNACK refusing a protocol
    version went uncounted among the packets sent."""
    from mqtt_broker.passwd import main as passwd
    assert passwd(["-c", "-b", str(tmp_path / "pw"), "alice", "alice-pw"]) == 0
    broker = make_broker(sys_interval=0, password_file=str(tmp_path / "pw"))
    broker.startService()
    idle = [FakeClient(broker) for _ in range(3)]
    first = connected(broker, "a", username="alice", password=b"alice-pw")
    connected(broker, "b", username="alice", password=b"alice-pw")
    connected(broker, "a", username="alice", password=b"alice-pw")  # takes "a" over
    first.lose()
    assert FakeClient(broker).connect("c", username="alice", password=b"wrong").reason_code == 4
    bad_version = FakeClient(broker)
    sent = value(scrape(broker), "mqtt_packets_sent_total")
    bad_version.send(Connect(client_id="old", protocol_level=2, protocol_name="MQTT"))
    samples = scrape(broker)
    assert value(samples, "mqtt_clients_maximum") == 2 == broker.attached
    assert value(samples, "mqtt_auth_failures_total") == 1
    assert value(samples, "mqtt_packets_sent_total") == sent + 1
    for client in idle:
        client.lose()


def test_too_large_and_expired_drops() -> None:
    broker = make_broker(sys_interval=0)
    broker.startService()
    small = connected(broker, "small", version=5, properties={"maximum_packet_size": 64})
    small.subscribe("big")
    away = connected(broker, "away", version=5, clean=False, properties={"session_expiry_interval": 60})
    away.subscribe("expiring", qos=1)
    away.lose()
    publisher = connected(broker, "publisher", version=5)
    publisher.publish("big", b"x" * 100)
    publisher.publish("expiring", b"x", qos=1, properties={"message_expiry_interval": 1})
    broker.reactor.advance(2)
    connected(broker, "away", version=5, clean=False, properties={"session_expiry_interval": 60})
    samples = scrape(broker)
    assert value(samples, "mqtt_messages_dropped_total", reason="too_large") == 1
    assert value(samples, "mqtt_messages_dropped_total", reason="expired") == 1
    assert value(samples, "mqtt_messages_dropped_total", reason="queue_full") == 0


def test_monitors_time_the_reactor_and_sampled_deliveries() -> None:
    broker = make_broker(sys_interval=0)
    broker.startService()
    broker.operations.site()   # builds the site and starts the monitors with the running broker
    monitors = broker.operations.monitors
    subscriber = connected(broker, "subscriber")
    subscriber.subscribe("t")
    publisher = connected(broker, "publisher")
    publisher.publish("t")   # armed at start: this one is timed
    assert monitors.delivery_latency.count == 1
    publisher.publish("t")   # not armed again until the next tenth of a second
    assert monitors.delivery_latency.count == 1
    assert broker.delivery.route_timer is None   # disarmed: unsampled messages are not timed
    broker.reactor.advance(0.1)
    publisher.publish("t")
    assert monitors.delivery_latency.count == 2
    assert len([p for p in subscriber.received()]) == 3
    broker.reactor.advance(0.25)   # due at 0.25, fires at 0.35: 0.1 s late
    broker.reactor.advance(0.75)   # due at 0.6, fires at 1.1: 0.5 s late
    assert monitors.reactor_lag.count == 2
    assert monitors.reactor_lag.sum == pytest.approx(0.6)
    samples = scrape(broker)
    assert value(samples, "mqtt_delivery_latency_seconds_count") == 2
    assert value(samples, "mqtt_reactor_lag_seconds_bucket", le="0.25") == 1
    assert value(samples, "mqtt_reactor_lag_seconds_bucket", le="1.0") == 2
    assert value(samples, "mqtt_reactor_lag_seconds_bucket", le="+Inf") == 2
    stopped = broker.stopService()
    subscriber.lose()   # the clients close their side on the broker's close, ending its linger
    publisher.lose()
    assert stopped.called
    assert broker.delivery.route_timer is None and not broker.reactor.getDelayedCalls()


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for observed in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(observed)
    assert histogram.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert (histogram.count, histogram.sum) == (4, 3.65)


@pytest_twisted.inlineCallbacks
def test_store_commits_are_timed(tmp_path: Path):  # type: ignore[no-untyped-def]
    from twisted.internet import reactor

    from mqtt_broker.store.sqlite import SQLiteStore
    store = SQLiteStore(tmp_path / "store.db", reactor)
    broker = BrokerService(endpoints=[], store=store, sys_interval=0)
    broker.startService()
    try:
        broker.operations.site()
        yield broker.publish("kept", b"x", retain=True)  # (fires once the store holds it)
        samples = scrape(broker)
        assert value(samples, "mqtt_store_commit_seconds_count") == 1
        assert 0 < value(samples, "mqtt_store_commit_seconds_sum") < 10
    finally:
        yield broker.stopService()
    assert store.commit_observers == []


def test_refused_when_max_connections_reached() -> None:
    broker = make_broker(max_connections=1, sys_interval=0)
    connected(broker, "only")
    from twisted.internet.address import IPv4Address
    assert broker.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is None
    assert value(scrape(broker), "mqtt_connections_refused_total", reason="max_connections") == 1
    assert ReasonCode.ADMINISTRATIVE_ACTION == 0x98


def test_open_connections_are_those_max_connections_counts() -> None:
    """mqtt_connections_open (the API's ``connections``) and the limit count the same: a WebSocket
    socket still upgrading and one closing after its client's close frame count, as a TCP one in
    CONNECT does, so that the broker never refuses at max_connections while showing fewer."""
    from test_websocket import WSClient, ws_connected
    from twisted.internet.address import IPv4Address
    from websocket_helpers import CLOSE
    from mqtt_broker.admin import figures

    broker = make_broker(max_connections=3, sys_interval=0)
    FakeClient(broker)  # in CONNECT
    WSClient(broker).send_bytes(b"GET /mqtt HTTP/1.1\r\n")  # upgrading
    ws_connected(broker, "closing").send(b"\x03\xe8", CLOSE)  # its socket waits for the client to read the answer
    assert broker.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is None
    assert value(scrape(broker), "mqtt_connections_open") == figures.read(broker).connections == 3


def test_subscription_refusals_are_counted_end_to_end(broker_process: type[BrokerProcess]) -> None:
    """max_subscriptions_per_client refusals, read from /metrics and /api/v1/stats of a broker
    process, after real clients were refused."""
    admin = start_admin(broker_process, "--max-subscriptions-per-client", "2")
    requests = tuple(SubscriptionRequest(topic_filter=f"limit/{n}") for n in range(4))
    v5 = RawClient(admin.broker.port, "limited-5", version=5)
    v3 = RawClient(admin.broker.port, "limited-3", version=4)
    try:
        v5.send(Subscribe(packet_id=1, subscriptions=requests[:3]))
        assert v5.next() == Suback(packet_id=1, reason_codes=(0, 0, ReasonCode.QUOTA_EXCEEDED))
        v3.send(Subscribe(packet_id=1, subscriptions=requests))
        assert v3.next() == Suback(packet_id=1, reason_codes=(0, 0, 0x80, 0x80))
    finally:
        v5.close()
        v3.close()
    body = admin.call("GET", "/metrics").body
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert value(samples, "mqtt_subscriptions_refused_total", reason="max_subscriptions_per_client") == 3
    assert admin.call("GET", "/api/v1/stats").body["subscriptions_refused"] == {"max_subscriptions_per_client": 3}
    refusals = [line for line in map(formatEvent, admin.broker.events()) if "max_subscriptions_per_client" in line]
    assert [line.split("refused ", 1)[1] for line in refusals] == [  # (the next line only at the 1001st refusal)
        "1 subscription(s) of 'limited-5' to 'limit/2': max_subscriptions_per_client (1 filters of all clients refused for it so far; "
        "logged once per thousand)"]


def test_disconnections_by_the_broker_are_counted_by_reason() -> None:
    """Each connected client the broker closes is counted under its reason code's name: an
    oversized packet, a keepalive timeout, a takeover. A client's own DISCONNECT and a refused
    CONNECT (counted with the refusals) are not."""
    broker = make_broker(max_packet_size=100, sys_interval=0)
    big = connected(broker, "big", version=5)
    answer = big.publish("t", b"x" * 200)
    assert big.closed and isinstance(answer[-1], Disconnect) and answer[-1].reason_code == 0x95
    idle = connected(broker, "idle", keep_alive=10)
    broker.reactor.advance(16)  # type: ignore[attr-defined]
    assert idle.closed
    connected(broker, "twice")
    connected(broker, "twice")
    polite = connected(broker, "polite")
    polite.send(Disconnect())
    FakeClient(broker).connect("", clean=False)  # refused at CONNECT: identifier rejected
    assert broker.stats.closed_by_reason == {
        "PACKET_TOO_LARGE": 1, "KEEP_ALIVE_TIMEOUT": 1, "SESSION_TAKEN_OVER": 1}
    samples = scrape(broker)
    assert value(samples, "mqtt_connections_closed_total", reason="PACKET_TOO_LARGE") == 1
    assert value(samples, "mqtt_connections_closed_total", reason="KEEP_ALIVE_TIMEOUT") == 1
    assert value(samples, "mqtt_connections_closed_total", reason="SESSION_TAKEN_OVER") == 1


def test_received_counts_stay_monotonic_when_a_publish_expires_while_its_hook_decides() -> None:
    """Acknowledged and not routed, it was counted as a QoS 1 message received, not as a
    message routed: the QoS 0 count, what is left of the routed ones, went below zero."""
    from twisted.internet.defer import Deferred

    from mqtt_broker.admin import figures
    broker = make_broker()
    broker.startService()
    pending: list[Deferred[None]] = []
    broker.hooks.on_publish(lambda client, message: pending.append(Deferred()) or pending[-1])
    publisher = connected(broker, "pub", version=5)
    before = figures.read(broker).publish_received
    publisher.publish("t", b"x", qos=1, properties={"message_expiry_interval": 1})
    broker.reactor.advance(5)
    pending.pop().callback(None)
    assert figures.read(broker).publish_received == before


def test_messages_a_smaller_receive_maximum_holds_back_after_a_reconnection_are_queued_not_in_flight() -> None:
    """Five sent, none acknowledged, and the client back with Receive Maximum 2: two go again,
    three wait for acknowledgements (``Outgoing.unsent``). The figures said five in flight ("sent
    and not yet acknowledged") and none queued, in /stats, /metrics, $SYS and the client's own."""
    from mqtt_broker.admin import figures
    from mqtt_broker.admin.shapes import client_json
    from mqtt_broker.wire import Publish

    broker = make_broker(sys_interval=0)
    broker.startService()
    terms = {"session_expiry_interval": 60}
    subscriber = connected(broker, "q", version=5, clean=False, properties={**terms, "receive_maximum": 5})
    subscriber.subscribe("t", qos=1)
    publisher = connected(broker, "p")
    for n in range(5):
        publisher.publish("t", b"m", qos=1, packet_id=n + 1)
    assert len(subscriber.received()) == 5
    subscriber.lose()
    subscriber = connected(broker, "q", version=5, clean=False, properties={**terms, "receive_maximum": 2})
    assert [p.dup for p in subscriber.received() if isinstance(p, Publish)] == [True, True]
    reading = figures.read(broker)
    assert (reading.inflight, reading.queued, reading.queued_bytes) == (2, 3, 3)
    samples = scrape(broker)
    assert (value(samples, "mqtt_inflight_messages"), value(samples, "mqtt_queued_messages")) == (2, 3)
    shown = client_json(broker.sessions["q"])
    assert (shown["inflight"], shown["queued"], shown["queued_bytes"]) == (2, 3, 3)


def test_a_reactor_late_each_time_is_measured_late_each_time() -> None:
    """Measured against a LoopingCall's grid, a late firing took its lateness off the next one's."""
    broker = make_broker()
    broker.startService()
    monitors = metrics.Monitors(broker)
    monitors.startService()
    clock = broker.reactor
    for _ in range(3):  # each time 0.1 s past its timer's due time
        due = getattr(monitors._lag_call, "call", monitors._lag_call).getTime()  # (a LoopingCall's, or the call)
        clock.advance(due - clock.seconds() + 0.1)
    assert monitors.reactor_lag.count == 3 and abs(monitors.reactor_lag.sum - 0.3) < 1e-9
    monitors.stopService()
    broker.reactor.advance(1)
    assert monitors.reactor_lag.count == 3  # (stopped: measured no more)

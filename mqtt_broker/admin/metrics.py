"""Prometheus metrics at ``/metrics``, read from the broker's counters at scrape time.

The hot path never calls prometheus_client: the broker counts with plain integers
(:class:`~mqtt_broker.stats.Stats`) and :class:`BrokerCollector` turns them into metric families
when Prometheus asks. Timings are observed into :class:`Histogram`, a lock-free histogram that
only the reactor thread touches: reactor lag (a timer that measures how late it fires), store
commits (per batch, not per message) and publish-to-delivery time inside the broker, sampled:
ten times a second :class:`Monitors` times the next message routed, from the moment the broker
takes it to the moment its last immediate delivery is written (a message queued for a slow or
offline client is not measured). Process figures (RSS, open fds, CPU) come from
prometheus_client's own ProcessCollector.

A node of a cluster has ``mqtt_cluster_*`` families besides. Its store is Redis, so the store's
batch timings are the round trips of its batches to Redis: they are reported as
``mqtt_cluster_redis_seconds`` (with finer buckets at the low end, where a nearby Redis answers)
instead of ``mqtt_store_commit_seconds``, whose name and meaning are the SQLite store's.

A broker with bridges has ``mqtt_bridge_*`` families besides, labelled by ``bridge`` (its
``connection``): whether it is up, what waits here for the remote, messages each way, links made,
failures, and messages no topic line maps.
"""

from __future__ import annotations

import bisect
import time
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import figures

log = Logger()

LAG_INTERVAL = 0.25
"""Seconds between two reactor lag measurements."""
SAMPLE_INTERVAL = 0.1
"""Seconds between two sampled messages for the delivery latency."""


class Histogram:
    """Cumulative buckets as Prometheus wants them, observed without a lock (reactor thread only)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs, +Inf last."""
        total = 0
        result = []
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            total += count
            result.append((bound, total))
        return result


class Monitors(Service):
    """Times the reactor, the store's commits and sampled deliveries of ``broker``."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.reactor_lag = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.delivery_latency = Histogram((5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005,
                                           0.01, 0.025, 0.05, 0.1))
        self.store_commit = Histogram(((0.0001, 0.00025) if broker.cluster is not None else ())
                                      + (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self._lag_call: Any = None
        """The next lag measurement (a DelayedCall: each armed from the last one's time, so that
        a reactor late every time is seen late each time, not only once as on a LoopingCall's grid)."""
        self._sample_call: LoopingCall | None = None
        self._expected = 0.0

    def startService(self) -> None:
        super().startService()
        clock = self.broker.clock
        self._expected = clock.seconds() + LAG_INTERVAL
        self._lag_call = clock.callLater(LAG_INTERVAL, self._measure_lag)
        self._sample_call = LoopingCall(self._arm_sample)
        self._sample_call.clock = clock
        self._sample_call.start(SAMPLE_INTERVAL, now=True)
        observers = getattr(self.broker.store, "commit_observers", None)
        if observers is not None and self.store_commit.observe not in observers:
            observers.append(self.store_commit.observe)

    def stopService(self) -> Any:
        if self._lag_call is not None and self._lag_call.active():
            self._lag_call.cancel()
        if self._sample_call is not None and self._sample_call.running:
            self._sample_call.stop()
        self._lag_call = self._sample_call = None
        self.broker.delivery.route_timer = None
        observers = getattr(self.broker.store, "commit_observers", None)
        if observers is not None and self.store_commit.observe in observers:
            observers.remove(self.store_commit.observe)
        return super().stopService()

    def _measure_lag(self) -> None:
        clock = self.broker.clock
        now = clock.seconds()
        self.reactor_lag.observe(max(0.0, now - self._expected))
        self._expected = now + LAG_INTERVAL
        self._lag_call = clock.callLater(LAG_INTERVAL, self._measure_lag)

    def _arm_sample(self) -> None:
        self.broker.delivery.route_timer = self.delivery_latency.observe  # the next message routed, once


class BrokerCollector:
    """A prometheus_client collector that reads the broker's figures at scrape time."""

    def __init__(self, broker: Any, operations: Any) -> None:
        self.broker = broker
        self.operations = operations

    def collect(self) -> Iterator[Metric]:
        f = figures.read(self.broker, self.operations.started_at, self.operations.inbox_lag)
        yield _gauge("mqtt_uptime_seconds", "Seconds since the broker started.", f.uptime)
        c = CounterMetricFamily("mqtt_messages_received", "PUBLISHes from clients routed, by QoS.", labels=["qos"])
        for qos, count in enumerate(f.publish_received):
            c.add_metric([str(qos)], count)
        yield c
        c = CounterMetricFamily("mqtt_messages_sent", "PUBLISHes delivered to clients, by QoS (resends not counted).",
                                labels=["qos"])
        for qos, count in enumerate(f.publish_sent):
            c.add_metric([str(qos)], count)
        yield c
        yield _counter("mqtt_messages_published_by_broker", "Messages published by the broker itself "
                       "(embedding API, admin API, $SYS).", f.broker_published)
        yield _counter("mqtt_wills_published", "Wills published.", f.wills_published)
        yield _counter("mqtt_messages_resent", "QoS 1/2 PUBLISHes sent again (DUP).", f.resent)
        yield _by_reason("mqtt_messages_dropped", "Messages not delivered, by reason.", f.dropped)
        yield _counter("mqtt_bytes_received", "Bytes received from clients.", f.bytes_received)
        yield _counter("mqtt_bytes_sent", "Bytes sent to clients.", f.bytes_sent)
        yield _counter("mqtt_packets_received", "MQTT packets of any type received.", f.packets_received)
        yield _counter("mqtt_packets_sent", "MQTT packets of any type sent.", f.packets_sent)
        yield _gauge("mqtt_connections_open", "Open client connections, as max_connections counts them (those in "
                     "CONNECT, lingering, or still upgrading or closing over WebSocket included).", f.connections)
        yield _counter("mqtt_connections", "Client connections accepted since start-up.", f.connections_total)
        yield _by_reason("mqtt_connections_refused", "Connections refused, by reason.", f.refused)
        yield _by_reason("mqtt_subscriptions_refused", "Topic filters of SUBSCRIBEs refused, by reason.",
                         f.subscriptions_refused)
        yield _by_reason("mqtt_connections_closed", "Connected clients the broker disconnected, by reason "
                         "(an MQTT 5 reason code name).", f.closed)
        yield _counter("mqtt_auth_failures", "Refusals for authentication or authorization at CONNECT, and "
                       "failed re-authentications.", f.auth_failures)
        yield _counter("mqtt_publishes_denied", "PUBLISHes not routed for the client's ACL, or to $SYS (logged "
                       "once per thousand).", f.publishes_denied)
        yield _gauge("mqtt_clients_connected", "Clients connected now.", f.clients_connected)
        yield _gauge("mqtt_clients_disconnected", "Sessions kept for clients that are not connected.",
                     f.clients_disconnected)
        yield _gauge("mqtt_clients_maximum", "Most clients connected at once since start-up.", f.clients_maximum)
        yield _counter("mqtt_sessions_expired", "Sessions discarded after their expiry interval.", f.clients_expired)
        yield _gauge("mqtt_subscriptions", "Subscriptions of all sessions.", f.subscriptions)
        yield _gauge("mqtt_retained_messages", "Retained messages.", f.retained)
        yield _gauge("mqtt_queued_messages", "Messages queued for clients (offline, slow or window full).", f.queued)
        yield _gauge("mqtt_queued_bytes", "Payload bytes queued for clients in memory (not those waiting in the "
                     "store, which mqtt_queued_messages counts).", f.queued_bytes)
        yield _gauge("mqtt_inflight_messages", "QoS 1/2 messages sent and not yet acknowledged.", f.inflight)
        if f.cluster is not None:
            yield from _cluster(f.cluster)
        if f.bridges is not None:
            yield from _bridges(f.bridges)
        monitors = self.operations.monitors
        if monitors is not None:
            yield _histogram("mqtt_delivery_latency_seconds", "Time from a PUBLISH being routed to its last "
                             "immediate delivery written, sampled ten times a second.", monitors.delivery_latency)
            yield _histogram("mqtt_reactor_lag_seconds", "How late a timer fires on the reactor (a busy or "
                             "blocked event loop).", monitors.reactor_lag)
            if f.cluster is not None:
                yield _histogram("mqtt_cluster_redis_seconds", "Round trip of one batch of changes to Redis "
                                 "(one script call), from its send to Redis's answer.", monitors.store_commit)
            elif getattr(self.broker.store, "commit_observers", None) is not None:
                yield _histogram("mqtt_store_commit_seconds", "Time to write one batch to the store, from "
                                 "handing it to the writer thread to its commit.", monitors.store_commit)


def _cluster(c: figures.ClusterFigures) -> Iterator[Metric]:
    yield _gauge("mqtt_cluster_nodes", "Live nodes of the cluster this node knows, itself included.", c.nodes)
    family = CounterMetricFamily("mqtt_cluster_forwarded", "Messages sent to other nodes (out, once per node) "
                                 "and received from them (in).", labels=["direction"])
    family.add_metric(["out"], c.forwarded_out)
    family.add_metric(["in"], c.forwarded_in)
    yield family
    yield _counter("mqtt_cluster_redirected", "Messages passed on to the node that took a session over.",
                   c.redirected)
    yield _counter("mqtt_cluster_claims", "Sessions claimed in Redis at CONNECT.", c.claims)
    yield _counter("mqtt_cluster_adopted", "Sessions adopted from dead nodes.", c.adopted)
    if c.inbox_lag is not None:
        yield _gauge("mqtt_cluster_inbox_lag", "Entries of this node's inbox not yet read or not yet handled, "
                     "as Redis said at the last reading ($SYS, a scrape, /stats).", c.inbox_lag)


def _bridges(bridges: list[figures.BridgeFigures]) -> Iterator[Metric]:
    up = GaugeMetricFamily("mqtt_bridge_up", "1 while the bridge's links are up, else 0.", labels=["bridge"])
    queued = GaugeMetricFamily("mqtt_bridge_queued_messages", "Messages waiting here for the remote broker "
                               "(queued, stored or in flight).", labels=["bridge"])
    messages = CounterMetricFamily("mqtt_bridge_messages", "Messages forwarded to the remote broker (out) and "
                                   "from it (in).", labels=["bridge", "direction"])
    connects = CounterMetricFamily("mqtt_bridge_connects", "Links made to the remote broker, the first one "
                                   "included.", labels=["bridge"])
    failures = CounterMetricFamily("mqtt_bridge_failures", "Connection attempts that failed and links that "
                                   "broke.", labels=["bridge"])
    dropped = CounterMetricFamily("mqtt_bridge_dropped", "Messages from either side that no topic line maps, "
                                  "or too large for the remote.", labels=["bridge"])
    for b in bridges:
        up.add_metric([b.name], 1 if b.state == "connected" else 0)
        queued.add_metric([b.name], b.queued)
        messages.add_metric([b.name, "out"], b.messages_out)
        messages.add_metric([b.name, "in"], b.messages_in)
        connects.add_metric([b.name], b.connects)
        failures.add_metric([b.name], b.failures)
        dropped.add_metric([b.name], b.dropped)
    yield from (up, queued, messages, connects, failures, dropped)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_reason(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=histogram.buckets(), sum_value=histogram.sum)


def registry(broker: Any, operations: Any) -> CollectorRegistry:
    """A registry of the broker's metrics and the process's (RSS, open fds, CPU, start time)."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(BrokerCollector(broker, operations))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition format and its content type."""
    started = time.perf_counter()
    body = generate_latest(registry)
    elapsed = time.perf_counter() - started
    if elapsed > 0.1:
        log.info("a /metrics scrape took {ms:.0f} ms", ms=elapsed * 1000)
    return body, CONTENT_TYPE_LATEST


__all__ = ["BrokerCollector", "Histogram", "Monitors", "registry", "render"]

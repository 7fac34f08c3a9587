"""The broker's figures, derived from :class:`~mqtt_broker.stats.Stats` and its state when asked.

The hot path keeps only the counters it cannot do without (see ``Stats``); everything else is
worked out here, once per report: the PUBLISHes of clients are the routed messages less the
broker's own and the wills, the QoS 0 counts are the totals less QoS 1 and 2, gauges such as
queued messages are summed over the sessions. $SYS, /metrics and the API all read this, so they
agree.

A node of a cluster has :class:`ClusterFigures` besides: its counters of messages between nodes,
and the lag of its inbox, which lives in Redis. That one is never read while a report waits:
:class:`InboxLag` keeps the last value Redis gave, and is asked to refresh at each $SYS interval
and each scrape.

A broker with bridges has a :class:`BridgeFigures` for each: its state and its bridge's counters
(:class:`~mqtt_broker.bridge.BridgeStats`), read from the bridge when asked.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import __version__, compiled

log = Logger()

VERSION = f"mqtt_broker version {__version__} ({'compiled' if compiled else 'pure Python'})"


@dataclass(slots=True)
class ClusterFigures:
    """A cluster node's part of a reading."""

    node: str
    nodes: int
    """Live nodes this node knows, itself included."""
    forwarded_out: int
    """Messages sent to other nodes, once per node."""
    forwarded_in: int
    """Messages received from other nodes."""
    redirected: int
    """Messages passed on to the node that took a session over."""
    claims: int
    """Sessions claimed in Redis at CONNECT."""
    adopted: int
    """Sessions taken from dead nodes."""
    inbox_lag: int | None
    """Entries of this node's inbox not yet read or not yet handled, as Redis last said (None:
    not known yet)."""


@dataclass(slots=True)
class BridgeFigures:
    """One bridge's part of a reading."""

    name: str
    """The bridge's ``connection``."""
    state: str
    """stopped, connecting, connected or waiting (to reconnect)."""
    address: str
    """The remote's ``host:port`` connected or last tried."""
    queued: int
    """Messages waiting here for the remote: queued, stored or in flight."""
    messages_out: int
    """Messages sent to the remote."""
    messages_in: int
    """Messages received from the remote."""
    connects: int
    """Links made: the first connection and each reconnection."""
    failures: int
    """Connection attempts that failed, and links that broke."""
    dropped: int
    """Messages that no topic line maps."""
    last_error: str
    """Why the last attempt failed or the last link broke (empty once connected)."""


class InboxLag:
    """The last known lag of this node's inbox. ``refresh()`` asks Redis and returns at once; the
    answer replaces ``value`` when it comes. One question at a time: while one is on its way (Redis
    slow or away), more calls do nothing, so a stalled Redis never piles questions up."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.value: int | None = None
        self._asking = False
        self._failing = False

    def refresh(self) -> None:
        if self._asking:
            return
        self._asking = True
        asked = maybeDeferred(self.cluster.store.describe_nodes)
        asked.addCallbacks(self._answered, self._failed)
        asked.addBoth(self._done)

    def _answered(self, nodes: list[dict[str, Any]]) -> None:
        self._failing = False
        for node in nodes:
            if node["id"] == self.cluster.node:
                self.value = node["inbox"]["unread"] + node["inbox"]["unhandled"]

    def _failed(self, failure: Failure) -> None:
        if not self._failing:  # once per outage: the cluster itself logs Redis's comings and goings
            self._failing = True
            log.warn("could not read this node's inbox lag from Redis ({error}); the last known value "
                     "is reported meanwhile", error=failure.getErrorMessage())

    def _done(self, result: Any) -> Any:
        self._asking = False
        return result


@dataclass(slots=True)
class Figures:
    """One reading of the broker: counters since start-up and gauges of now."""

    uptime: float
    clients_connected: int
    clients_disconnected: int
    """Sessions that outlive their connection and have none now."""
    clients_maximum: int
    clients_expired: int
    connections: int
    """Open client connections, as max_connections counts them (``BrokerService.open_connections``):
    those in CONNECT, lingering, or still upgrading or closing over WebSocket included."""
    connections_total: int
    connects: int
    """CONNECT packets received (connections_total counts sockets)."""
    refused: dict[str, int]
    """Connections refused, by reason."""
    subscriptions_refused: dict[str, int]
    """Topic filters of SUBSCRIBEs refused, by reason."""
    closed: dict[str, int]
    """Connected clients the broker disconnected, by reason."""
    auth_failures: int
    publishes_denied: int
    """PUBLISHes not routed for the client's ACL, or to $SYS (logged once per thousand)."""
    publish_received: list[int]
    """PUBLISHes from clients that were routed, by QoS."""
    publish_sent: list[int]
    """PUBLISHes delivered to clients, by QoS (resends not counted), once they went to the
    transport (see ``Stats.unsent``)."""
    broker_published: int
    wills_published: int
    dropped: dict[str, int]
    """Messages not delivered: queue_full, too_large, expired."""
    resent: int
    packets_received: int
    packets_sent: int
    bytes_received: int
    bytes_sent: int
    subscriptions: int
    retained: int
    queued: int
    queued_bytes: int
    """Of the queued messages, those in memory (the store's are not counted)."""
    stored_bytes: int
    """Payload bytes of the retained, queued (in memory) and in-flight messages."""
    inflight: int
    memory: int
    """Resident set size, in bytes."""
    memory_maximum: int
    cluster: ClusterFigures | None = None
    """None for a broker that is not a node of a cluster."""
    bridges: list[BridgeFigures] | None = None
    """None for a broker without bridges."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def clients_total(self) -> int:
        return self.clients_connected + self.clients_disconnected

    @property
    def publish_received_total(self) -> int:
        return sum(self.publish_received)

    @property
    def publish_sent_total(self) -> int:
        return sum(self.publish_sent)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        if self.cluster is None:
            data.pop("cluster")
        if self.bridges is None:
            data.pop("bridges")
        data.update(clients_total=self.clients_total, publish_received_total=self.publish_received_total,
                    publish_sent_total=self.publish_sent_total, dropped_total=self.dropped_total)
        return data


def read(broker: Any, started_at: float | None = None, inbox_lag: InboxLag | None = None) -> Figures:
    """The figures of ``broker`` now; ``started_at`` (clock time) gives the uptime, ``inbox_lag``
    a cluster node's last known inbox lag."""
    stats = broker.stats
    connected = disconnected = queued = queued_bytes = inflight = inflight_bytes = moved_subscriptions = 0
    for session in broker.sessions.values():
        if broker.moved_away(session.client_id):
            moved_subscriptions += len(session.subscriptions)  # (still routed to, until the routes settle)
            continue
        if session.connection is not None:
            connected += 1
        else:
            disconnected += 1
        # Those a smaller Receive Maximum holds back after a reconnection wait: queued, not in flight.
        held_back = session.unsent
        queued += len(session.queue) + session.spilled + held_back
        inflight += len(session.outgoing) - held_back
        held_back_bytes = held_back and sum(len(out.message.payload) for out in session.outgoing.values() if out.unsent)
        queued_bytes += session.queued_bytes + held_back_bytes
        inflight_bytes += sum(len(out.message.payload) for out in session.outgoing.values()) - held_back_bytes
    routed_from_clients = (stats.messages_received - stats.broker_published - stats.wills_published
                           - stats.routed_from_nodes)
    received = [routed_from_clients - stats.received_by_qos[1] - stats.received_by_qos[2],
                stats.received_by_qos[1], stats.received_by_qos[2]]
    # Counted when written; what the connections hold, or held and lost, has not gone (yet).
    unwritten = list(stats.unsent)
    for connection in broker.connections:
        if connection.pending_bytes:
            connection.count_unwritten(unwritten)
    sent = [stats.messages_sent - stats.sent_by_qos[1] - stats.sent_by_qos[2] - unwritten[0],
            stats.sent_by_qos[1] - unwritten[1], stats.sent_by_qos[2] - unwritten[2]]
    now = broker.clock.seconds()
    memory = resident_memory()
    return Figures(
        uptime=max(0.0, now - started_at) if started_at is not None else 0.0,
        clients_connected=connected, clients_disconnected=disconnected,
        clients_maximum=max(stats.clients_maximum, connected), clients_expired=stats.sessions_expired,
        connections=broker.open_connections(), connections_total=stats.connections_total,
        refused=dict(stats.refused_by_reason), subscriptions_refused=dict(stats.subscriptions_refused),
        closed=dict(stats.closed_by_reason),
        auth_failures=stats.auth_failures, publishes_denied=stats.publishes_denied,
        publish_received=received, publish_sent=sent,
        broker_published=stats.broker_published, wills_published=stats.wills_published,
        dropped={"queue_full": stats.messages_dropped - stats.dropped_too_large,
                 "too_large": stats.dropped_too_large, "expired": stats.messages_expired},
        resent=stats.resent - unwritten[3], packets_received=stats.packets_received,
        packets_sent=stats.messages_sent + stats.resent + stats.control_packets_sent - sum(unwritten),
        bytes_received=stats.bytes_received, bytes_sent=stats.bytes_sent,
        subscriptions=broker.subscriptions.count - moved_subscriptions, retained=len(broker.retained),
        queued=queued, queued_bytes=queued_bytes, inflight=inflight,
        stored_bytes=broker.retained.bytes + queued_bytes + inflight_bytes, connects=stats.connects,
        memory=memory, memory_maximum=max(memory, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        cluster=cluster_figures(broker.cluster, inbox_lag) if broker.cluster is not None else None,
        bridges=[bridge_figures(bridge) for bridge in broker.bridges] if broker.bridges is not None else None)


def cluster_figures(cluster: Any, inbox_lag: InboxLag | None) -> ClusterFigures:
    """A cluster node's figures; ``inbox_lag`` is asked again for the next reading."""
    stats = cluster.stats
    lag = inbox_lag.value if inbox_lag is not None else None
    if inbox_lag is not None:
        inbox_lag.refresh()
    return ClusterFigures(
        node=cluster.node, nodes=len(cluster.nodes) + 1, forwarded_out=stats.forwarded_out,
        forwarded_in=stats.forwarded_in, redirected=stats.redirected, claims=stats.claims, adopted=stats.adopted,
        inbox_lag=lag)


def bridge_figures(bridge: Any) -> BridgeFigures:
    """The figures of one :class:`~mqtt_broker.bridge.Bridge` now."""
    stats = bridge.stats
    return BridgeFigures(
        name=bridge.connection, state=bridge.state, address=bridge.address, queued=bridge.queued,
        messages_out=stats.messages_out, messages_in=stats.messages_in, connects=stats.connects,
        failures=stats.failures, dropped=stats.dropped, last_error=bridge.last_error)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory() -> int:
    """This process's resident set size in bytes (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["BridgeFigures", "ClusterFigures", "Figures", "InboxLag", "VERSION", "bridge_figures", "cluster_figures",
           "read", "resident_memory"]

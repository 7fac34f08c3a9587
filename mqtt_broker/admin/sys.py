"""The ``$SYS/broker/...`` topics, with Mosquitto's names and meanings.

Every ``sys_interval`` seconds (on the broker's clock) the values are worked out and those that
changed are published retained through ``BrokerService.publish``, so they reach subscribers by
ordinary routing: hooks that authorize subscriptions (ACLs) apply to them as to any topic, and a
``#`` subscription does not see them [MQTT-4.7.2-1]. They are not written to the store.

Where Mosquitto measures something a Python broker does not have, the nearest figure is given:
``heap/current`` and ``heap/maximum`` are the resident set size and its peak, in bytes.
``messages/*`` count MQTT packets of every type, as in Mosquitto; ``publish/messages/*`` the
PUBLISHes routed from clients and delivered to them (Mosquitto counts every PUBLISH it reads, one
it denies too, and its resends). The ``load/...`` figures are Mosquitto's: exponentially damped moving averages, per
minute, over 1, 5 and 15 minutes.

A node of a cluster adds ``cluster/...`` (Mosquitto has none): its id, the live nodes, messages
forwarded to and from other nodes, passed on to a session's new owner, sessions adopted from dead
nodes, and its inbox lag. The lag is asked of Redis at each update and the answer published at the
next one: an update never waits for Redis, and the lag is left out until Redis has answered once.

A broker with bridges adds ``bridges/count`` and, for each bridge, ``bridges/<connection>/...``
(Mosquitto has only ``connection/<remote_clientid>/state``, 1 or 0, or its
``notification_topic``, which the bridge itself keeps):

- ``state``: stopped, connecting, connected or waiting (to reconnect);
- ``queued``: messages waiting here for the remote (queued, stored or in flight);
- ``messages/sent``, ``messages/received``: messages forwarded to the remote and from it;
- ``messages/dropped``: messages from either side that no topic line maps, or larger than the
  other side takes, and QoS 0 ones this broker could not take as fast as the remote sent them;
- ``connects``: links made, the first connection included (so reconnections are one less);
- ``failures``: connection attempts that failed and links that broke.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import figures
from .figures import BridgeFigures, ClusterFigures, Figures, InboxLag

log = Logger()

PREFIX = "$SYS/broker/"

WINDOWS = (("1min", 60.0), ("5min", 300.0), ("15min", 900.0))

# Each load figure: its name under $SYS/broker/load/ and the counter it averages.
LOADS: tuple[tuple[str, Callable[[Figures], int]], ...] = (
    ("messages/received", lambda f: f.packets_received),
    ("messages/sent", lambda f: f.packets_sent),
    ("bytes/received", lambda f: f.bytes_received),
    ("bytes/sent", lambda f: f.bytes_sent),
    ("publish/received", lambda f: f.publish_received_total),
    ("publish/sent", lambda f: f.publish_sent_total),
    ("publish/dropped", lambda f: f.dropped_total),
    ("connections", lambda f: f.connects),
    ("sockets", lambda f: f.connections_total),
)


def values(f: Figures) -> dict[str, str]:
    """The $SYS topics (without the ``$SYS/broker/`` prefix) other than the loads, as Mosquitto
    writes them."""
    stored = f.retained + f.queued + f.inflight
    return {
        "version": figures.VERSION,
        "uptime": f"{int(f.uptime)} seconds",
        "clients/connected": str(f.clients_connected),
        "clients/active": str(f.clients_connected),  # Mosquitto's older name
        "clients/disconnected": str(f.clients_disconnected),
        "clients/inactive": str(f.clients_disconnected),
        "clients/total": str(f.clients_total),
        "clients/maximum": str(f.clients_maximum),
        "clients/expired": str(f.clients_expired),
        "messages/received": str(f.packets_received),
        "messages/sent": str(f.packets_sent),
        "messages/stored": str(stored),
        "store/messages/count": str(stored),
        "store/messages/bytes": str(f.stored_bytes),
        "messages/inflight": str(f.inflight),
        "publish/messages/received": str(f.publish_received_total),
        "publish/messages/sent": str(f.publish_sent_total),
        "publish/messages/dropped": str(f.dropped_total),
        "bytes/received": str(f.bytes_received),
        "bytes/sent": str(f.bytes_sent),
        "retained messages/count": str(f.retained),
        "subscriptions/count": str(f.subscriptions),
        "heap/current": str(f.memory),
        "heap/maximum": str(f.memory_maximum),
        **(cluster_values(f.cluster) if f.cluster is not None else {}),
        **(bridge_values(f.bridges) if f.bridges is not None else {}),
    }


def cluster_values(c: ClusterFigures) -> dict[str, str]:
    """A cluster node's $SYS topics (without the ``$SYS/broker/`` prefix)."""
    found = {
        "cluster/node": c.node,
        "cluster/nodes": str(c.nodes),
        "cluster/messages/forwarded/sent": str(c.forwarded_out),
        "cluster/messages/forwarded/received": str(c.forwarded_in),
        "cluster/messages/redirected": str(c.redirected),
        "cluster/sessions/adopted": str(c.adopted),
    }
    if c.inbox_lag is not None:
        found["cluster/inbox/lag"] = str(c.inbox_lag)
    return found


def bridge_values(bridges: list[BridgeFigures]) -> dict[str, str]:
    """The $SYS topics of a broker's bridges (without the ``$SYS/broker/`` prefix)."""
    found = {"bridges/count": str(len(bridges))}
    for b in bridges:
        prefix = f"bridges/{b.name}/"
        found.update({
            prefix + "state": b.state,
            prefix + "queued": str(b.queued),
            prefix + "messages/sent": str(b.messages_out),
            prefix + "messages/received": str(b.messages_in),
            prefix + "messages/dropped": str(b.dropped),
            prefix + "connects": str(b.connects),
            prefix + "failures": str(b.failures),
        })
    return found


class SysTopics(Service):
    """Publishes the $SYS topics of ``broker`` every ``interval`` seconds from start-up.

    ``started_at`` is the clock time uptime counts from (the operations service's start);
    ``inbox_lag``, on a cluster node, the last known lag of its inbox.
    """

    def __init__(self, broker: Any, interval: float, started_at: Callable[[], float | None],
                 inbox_lag: InboxLag | None = None) -> None:
        self.broker = broker
        self.interval = interval
        self._started_at = started_at
        self._inbox_lag = inbox_lag
        self._call: LoopingCall | None = None
        self._published: dict[str, str] = {}
        self._last: tuple[float, dict[str, int]] | None = None
        self.loads: dict[str, float] = {}
        """Current load averages by full topic name (per minute)."""

    def startService(self) -> None:
        super().startService()
        self._published.clear()
        self._last = None
        self.loads = {f"load/{name}/{window}": 0.0 for name, _ in LOADS for window, _ in WINDOWS}
        self._call = LoopingCall(self.update)
        self._call.clock = self.broker.clock
        self._call.start(self.interval, now=True).addErrback(
            lambda failure: log.failure("$SYS updates stopped", failure))

    def stopService(self) -> Any:
        if self._call is not None and self._call.running:
            self._call.stop()
        self._call = None
        return super().stopService()

    def update(self) -> None:
        """Work the values out now and publish those that changed (all of them the first time)."""
        now = self.broker.clock.seconds()
        reading = figures.read(self.broker, self._started_at(), self._inbox_lag)
        current = values(reading)
        counters = {name: count(reading) for name, count in LOADS}
        first = self._last is None
        if self._last is not None:
            then, previous = self._last
            elapsed = now - then
            if elapsed > 0:
                for name, count in counters.items():
                    per_minute = (count - previous[name]) * 60.0 / elapsed
                    for window, seconds in WINDOWS:
                        key = f"load/{name}/{window}"
                        # Mosquitto's calc_load: new = rate + e^(-dt/window) * (old - rate).
                        self.loads[key] = per_minute + math.exp(-elapsed / seconds) * (self.loads[key] - per_minute)
        self._last = (now, counters)
        for key, load in self.loads.items():
            current[key] = f"{load:.2f}"
        broker = self.broker
        publish, retained = broker.route_own, broker.retained
        # Without retained messages, each value goes at each update: a later subscriber gets it
        # within one interval (Mosquitto's $SYS values are retained whatever retain_available says).
        every = first or not broker.config.retain_available
        for name, value in current.items():
            if every or self._published.get(name) != value or retained.get(PREFIX + name) is None:
                # (a value deleted since, through the admin API, goes again)
                self._published[name] = value
                publish(PREFIX + name, value.encode(), qos=0, retain=True)


__all__ = ["SysTopics", "values", "bridge_values", "cluster_values", "PREFIX", "LOADS", "WINDOWS"]

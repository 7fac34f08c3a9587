"""The broker's counters."""

from __future__ import annotations


class Stats:
    """Counters kept with plain integer arithmetic on the hot path; ``mqtt_broker.admin`` reads
    them ($SYS, Prometheus) when it reports, so counting costs one ``+=`` and nothing more.

    Where a count can be derived it is not kept: PUBLISHes from clients are the routed messages
    less the broker's own and the wills, and the QoS 0 figures are the totals less QoS 1 and 2
    (``*_by_qos[0]`` stays 0), so the QoS 0 path pays for no counter of its own.
    """

    __slots__ = ("messages_received", "messages_sent", "messages_dropped", "messages_expired",
                 "connections_total", "connections_refused", "broker_published", "wills_published",
                 "received_by_qos", "sent_by_qos", "dropped_too_large", "resent", "bytes_received",
                 "bytes_sent", "packets_received", "control_packets_sent", "refused_by_reason",
                 "subscriptions_refused", "closed_by_reason", "auth_failures", "sessions_expired", "clients_maximum",
                 "publishes_denied", "routed_from_nodes", "connects", "unsent")

    def __init__(self) -> None:
        self.messages_received = self.messages_sent = self.messages_dropped = 0
        self.messages_expired = self.connections_total = self.connections_refused = 0
        self.connects = 0
        """CONNECT packets received (connections_total counts the sockets accepted)."""
        self.broker_published = self.wills_published = 0
        """Routed messages that came from ``BrokerService.publish`` and from wills."""
        self.received_by_qos = [0, 0, 0]
        self.sent_by_qos = [0, 0, 0]
        self.dropped_too_large = 0
        """Of messages_dropped, those above a client's maximum packet size (the rest: queue full)."""
        self.resent = 0
        self.bytes_received = self.bytes_sent = 0
        self.packets_received = self.control_packets_sent = 0
        """MQTT packets of any type in; packets out other than PUBLISH."""
        self.unsent = [0, 0, 0, 0, 0]
        """Of the packets counted as sent (when written), those a connection held and lost with
        it, never handed to its transport (held for the store, for a full socket, or gathered
        when the broker aborted it), by kind: PUBLISHes sent the first time at QoS 0, 1 and 2,
        PUBLISHes sent again (DUP), other packets (see ``protocol.count_kinds``). The figures
        take them off, and those held at the time, so that they count what went, as bytes_sent
        does (a QoS 1/2 message among them goes again, DUP, on the next connection)."""
        self.refused_by_reason: dict[str, int] = {}
        """Connections refused, by reason (a ReasonCode name, or max_connections)."""
        self.subscriptions_refused: dict[str, int] = {}
        """Topic filters of SUBSCRIBEs refused, by reason (max_subscriptions_per_client, or
        NOT_AUTHORIZED by the client's ACL)."""
        self.closed_by_reason: dict[str, int] = {}
        """Connected clients the broker disconnected, by the reason code's name (PACKET_TOO_LARGE,
        KEEP_ALIVE_TIMEOUT, PROTOCOL_ERROR, SESSION_TAKEN_OVER, ...)."""
        self.auth_failures = self.sessions_expired = self.clients_maximum = 0
        self.publishes_denied = 0
        """PUBLISHes not routed for the client's ACL (or to $SYS): logged ``once_per_thousand``."""
        self.routed_from_nodes = 0
        """Of messages_received, those a node of a cluster routed for another node (forwarded in):
        not PUBLISHes of its own clients."""


def once_per_thousand(count: int, added: int = 1) -> bool:
    """Whether the event that raised ``count`` by ``added`` is logged: the first, then the one
    that passes each thousand more (1001, 2001, ...). For what any client can repeat by the
    thousand a second (a refusal, a drop): one line each would be megabytes of log a second."""
    return (count - 1) // 1000 != (count - added - 1) // 1000


__all__ = ["Stats", "once_per_thousand"]

"""What a node of a cluster does with every message routed on it: which other nodes it goes to
(once to each; this one too, through its own inbox, for a QoS 2 message of a session Redis
keeps), which member of a shared subscription gets it, and the records for them.

This is the cluster's part of a message's path, compiled with the rest of that path; node.py
(Redis, nodes joining and dying, sessions moving) works at the seams, not per message.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Final

from ..message import Message
from ..topics import ClientMatch, SharedGroup, SharedGroups, Subscription, SubscriptionTree, Turns, split_shared
from .codec import HANDED, pack_forwarded


ORIGIN: Final = 6
"""The length of the part of a message's cluster id that names the node (and its start) that
gave the id (``origin_of``)."""


def origin_of(cluster_id: bytes) -> bytes:
    """The part of a message's cluster id that names the node, in one of its lives, that gave it."""
    return cluster_id[:ORIGIN]


class ClusterStats:
    """Counters of a node, plain integers read by $SYS and the metrics: messages sent to other
    nodes (once per node), records received from them, messages passed on to a session's new
    owner, sessions claimed at CONNECT and adopted from dead nodes."""

    __slots__ = ("forwarded_out", "forwarded_in", "redirected", "claims", "adopted")

    def __init__(self) -> None:
        self.forwarded_out = 0
        self.forwarded_in = 0
        self.redirected = 0
        self.claims = 0
        self.adopted = 0


class Run:
    """Records for one node's inbox, made one after the other, with one guard: None, or the
    (client, epoch) that must still hold the client's session when Redis writes them."""

    __slots__ = ("guard", "records")

    def __init__(self, guard: tuple[str, int] | None, record: bytes) -> None:
        self.guard = guard
        self.records = [record]


class Forwarding:
    """Sends each message routed on this node to the other nodes holding a matching filter.

    ``routes`` holds the other nodes' filters (a Subscription per (node, filter)). QoS 1 and 2
    records wait for the store's next batch (``collect`` asks for one, told the length of the
    records made, which wait in memory meanwhile; ``take_outgoing`` hands them over), and so do
    messages handed on (``hand_on``); QoS 0 records go at the end of the reactor's turn through
    ``send_qos0``, one write per node."""

    def __init__(self, node: str, clock: Any, stats: ClusterStats,
                 deliver_shared: Callable[[Message, tuple[str, str], SharedGroup], int],
                 collect: Callable[[int], None], send_qos0: Callable[[str, bytes], None],
                 epoch_of: Callable[[str], int] = lambda client_id: 0) -> None:
        self.node = node
        self.clock = clock
        self.stats = stats
        self.routes = SubscriptionTree()
        self._filters: dict[str, set[str]] = {}
        """Each node's filters in ``routes``: what one node holds is found without walking every
        node's (50,000 filters a node, a node joining took half a second of the reactor)."""
        self._idle: set[tuple[str, str]] = set()
        """(node, shared filter): routes whose members on that node are all offline."""
        self._connected_here: set[str] = set()
        """The shared filters held here with a member connected here."""
        self._deliver_shared = deliver_shared
        self._collect = collect
        self._send_qos0 = send_qos0
        self._epoch_of = epoch_of
        self.pending_here: dict[str, int] = {}
        """How many messages of each client are on their way to this node's subscribers through
        its inbox (``through_inboxes``) and not back yet (``came_back``): a will of the client
        goes that way too while there are any, after them (``Cluster.will_follows``)."""
        self._outgoing: dict[str, list[Run]] = {}
        """The records for each node's inbox (QoS 1/2 messages, and a will coming after its
        client's messages here), in the order they were made: runs of records with one guard
        each (see ``through_inboxes``)."""
        self._qos0: dict[str, list[bytes]] = {}
        self._qos0_scheduled = False
        self._turns = Turns()
        self._ids = 0
        self._id_prefix = os.urandom(ORIGIN)
        self.moving: dict[str, set[bytes]] = {}
        """Sessions that moved here lately (the cluster adds and removes them), with the ids of
        the QoS 1/2 messages delivered to each since: see ``first_time``."""

    def add_route(self, node: str, topic_filter: str, awake: bool = True) -> None:
        """Another node holds a filter now (a shared one not ``awake``: no member connected)."""
        key = (node, topic_filter)
        group, _ = split_shared(topic_filter)
        self.routes.add(Subscription(client_id=node, topic_filter=topic_filter, share_group=group))
        self._filters.setdefault(node, set()).add(topic_filter)
        if awake:
            self._idle.discard(key)
        else:
            self._idle.add(key)

    def remove_route(self, node: str, topic_filter: str) -> None:
        """Another node no longer holds a filter."""
        self.routes.remove(node, topic_filter)
        self._idle.discard((node, topic_filter))
        filters = self._filters.get(node)
        if filters is not None:
            filters.discard(topic_filter)
            if not filters:
                del self._filters[node]

    def replace_routes(self, node: str, routes: dict[str, bool]) -> None:
        """A node's whole set of filters (as ``filters_of`` gives them): what changed changes."""
        held = self.filters_of(node)
        for topic_filter in held.keys() - routes.keys():
            self.remove_route(node, topic_filter)
        for topic_filter, awake in routes.items():
            if held.get(topic_filter) is not awake:
                self.add_route(node, topic_filter, awake)

    def connected_here(self, topic_filter: str, connected: bool) -> None:
        """Whether a shared filter held here has a member connected here."""
        if connected:
            self._connected_here.add(topic_filter)
        else:
            self._connected_here.discard(topic_filter)

    def forget(self, node: str) -> None:
        """A node is gone: nothing is routed to it any more."""
        for topic_filter in list(self._filters.get(node, ())):
            self.remove_route(node, topic_filter)

    def filters_of(self, node: str) -> dict[str, bool]:
        """The filters routed to a node, each with whether it is awake (see ``add_route``)."""
        idle = self._idle
        return {topic_filter: (node, topic_filter) not in idle for topic_filter in self._filters.get(node, ())}

    def nodes(self) -> set[str]:
        """The nodes something is routed to."""
        return set(self._filters)

    def forward(self, message: Message, groups: SharedGroups) -> int:
        """Send the message once to each other node holding a matching filter, and give each
        shared subscription to one member across the cluster (here, or on the node chosen).
        Returns how many nodes and shared members it went to."""
        by_node, node_groups = self.routes.match(message.topic)
        if not by_node and not node_groups and not groups:
            return 0
        targets: dict[str, list[tuple[str, str]]] = {}
        count = self._choose(message, by_node, node_groups, groups, targets, True)
        if not targets:
            return count
        if message.qos and message.cluster_id is None:
            self.identify(message)
        now: float = self.clock.seconds()
        if message.qos:
            made = 0
            for node, shares in targets.items():
                record = pack_forwarded(message, tuple(shares), now)
                self._add(node, None, record)
                made += len(record)
            self._collect(made)
        else:
            for node, shares in targets.items():
                self._add_qos0(node, pack_forwarded(message, tuple(shares), now))
        self.stats.forwarded_out += len(targets)
        return count + len(targets)

    def _choose(self, message: Message, by_node: list[ClientMatch], node_groups: SharedGroups, groups: SharedGroups,
                targets: dict[str, list[tuple[str, str]]], deliver_here: bool) -> int:
        """Add to ``targets`` the nodes holding a matching filter and those chosen for shared
        subscriptions (with the subscriptions each was chosen for). Returns the shared members
        here given the message at once (none unless ``deliver_here``: this node is a target then)."""
        for match in by_node:
            targets[match.client_id] = []
        if groups or node_groups:
            return self._share(message, groups, node_groups, targets, deliver_here)
        return 0

    def _add_qos0(self, node: str, record: bytes) -> None:
        records = self._qos0.get(node)
        if records is None:
            self._qos0[node] = [record]
        else:
            records.append(record)
        if not self._qos0_scheduled:
            self._qos0_scheduled = True
            self.clock.callLater(0, self._flush_qos0)

    def _add(self, node: str, guard: tuple[str, int] | None, record: bytes) -> None:
        runs = self._outgoing.get(node)
        if runs is None:
            self._outgoing[node] = [Run(guard, record)]
            return
        last = runs[-1]
        if last.guard == guard:
            last.records.append(record)
        else:
            runs.append(Run(guard, record))

    def through_inboxes(self, message: Message, groups: SharedGroups, sessions_here: bool,
                        fenced_by: str | None) -> tuple[int, bool]:
        """Send a message to each node with a matching filter, this one too (``sessions_here``:
        its sessions match), through the nodes' inboxes, in the order of the other records for
        them. ``fenced_by``: a client whose QoS 2 PUBLISH it is, whose session Redis keeps; its
        records are written by the batch that records the packet id, and only if the session is
        still this node's then: a session claimed meanwhile by another node has its publisher
        send the message again there, where it is routed for the first time (routed here at
        once, it would be routed twice). A will goes this way unfenced, after what its client
        published (``fenced_by`` None); at QoS 0, to the other nodes as the client's QoS 0
        messages went, by pub/sub. Returns how many nodes it goes to, and whether this one is
        among them."""
        by_node, node_groups = self.routes.match(message.topic)
        targets: dict[str, list[tuple[str, str]]] = {self.node: []} if sessions_here else {}
        self._choose(message, by_node, node_groups, groups, targets, False)
        if not targets:
            return 0, False
        if message.cluster_id is None:  # (a QoS 0 will too: see made_here)
            self.identify(message)
        guard = None if fenced_by is None else (fenced_by, self._epoch_of(fenced_by))
        now: float = self.clock.seconds()
        made = 0
        for node, shares in targets.items():
            record = pack_forwarded(message, tuple(shares), now)
            if message.qos or node == self.node:
                self._add(node, guard, record)
                made += len(record)
            else:
                self._add_qos0(node, record)
        self._collect(made)
        here = self.node in targets
        sender = message.sender
        if here and sender is not None:
            self.pending_here[sender] = self.pending_here.get(sender, 0) + 1
        self.stats.forwarded_out += len(targets) - here
        return len(targets), here

    def hand_on(self, message: Message, share: tuple[str, str], declined: tuple[str, ...] = (),
                awake_only: bool = False) -> int:
        """A message for a shared subscription that no member here may have (one a member left
        unfinished, say): to the other nodes' members of the group, in turn, through the node's
        inbox whatever its QoS (it may have been acknowledged to its publisher long ago), but
        those of the nodes that ``declined`` it already; ``awake_only``: only to a node with a
        connected member. Returns 0 if no other node holds the group so (it is dropped, as on
        one node)."""
        _, node_groups = self.routes.match(message.topic)
        nodes = sorted({node for held, group in node_groups if held == share for node in group.members}
                       - set(declined))
        awake = [node for node in nodes if (node, share[1]) not in self._idle]
        if awake_only:
            nodes = awake
        if not nodes:
            return 0
        nodes = awake or nodes
        node = nodes[self._turns.next(share) % len(nodes)]
        if message.qos and message.cluster_id is None:
            self.identify(message)
        # (A node with offline members, handing on to a connected one, has not declined it.)
        declined = declined if awake_only else (*declined, self.node)
        record = pack_forwarded(message, (share,), self.clock.seconds(), HANDED, declined)
        self._add(node, None, record)
        self._collect(len(record))
        self.stats.forwarded_out += 1
        return 1

    def first_time(self, client_id: str, message_id: bytes) -> bool:
        """Whether the session has not had this message yet, counting it as had from now on. Until
        the routes have settled, a message may reach a session that moved here lately by two ways
        (routed here, and passed on from the node that had the session): it gets it once."""
        seen = self.moving.get(client_id)
        if seen is None:
            return True
        if message_id in seen:
            return False
        seen.add(message_id)
        return True

    def came_back(self, sender: str | None) -> None:
        """A message of ``through_inboxes`` came back from this node's inbox: one fewer of its
        sender's on their way (``pending_here``)."""
        if sender is not None:
            left = self.pending_here.get(sender, 0) - 1
            if left > 0:
                self.pending_here[sender] = left
            else:
                self.pending_here.pop(sender, None)

    def forget_sender(self, client_id: str) -> None:
        """The client went to another node: what Redis refused of its messages never comes back."""
        self.pending_here.pop(client_id, None)

    def made_here(self, cluster_id: bytes) -> bool:
        """Whether a message with this id was identified by this node (since it started)."""
        return cluster_id.startswith(self._id_prefix)

    def identify(self, message: Message) -> None:
        """A QoS 1/2 message leaving this node gets an id, by which a session that moves while
        it is on its way gets it once."""
        self._ids += 1
        message.cluster_id = self._id_prefix + self._ids.to_bytes(8, "big")

    def _share(self, message: Message, groups: SharedGroups, node_groups: SharedGroups,
               targets: dict[str, list[tuple[str, str]]], deliver_here: bool = True) -> int:
        """Each shared subscription's member, in turn over the cluster: delivered here when it
        is this node (unless not ``deliver_here``), otherwise added to ``targets``. Returns the
        deliveries made here."""
        count = 0
        local = dict(groups)
        remote: dict[tuple[str, str], list[str]] = {}
        for share, group in node_groups:
            remote[share] = list(group.members)
        for share in {*local, *remote}:
            nodes = ([self.node] if share in local else []) + sorted(remote.get(share, []))
            candidates = self._awake_first(nodes, share[1])
            chosen = candidates[self._turns.next(share) % len(candidates)]
            if chosen == self.node and deliver_here:
                count += self._deliver_shared(message, share, local[share])
            else:
                targets.setdefault(chosen, []).append(share)
        return count

    def _awake_first(self, nodes: list[str], topic_filter: str) -> list[str]:
        """The nodes with a connected member of a shared subscription, or all of them if none
        has one (then an offline member's session gets the message, as on one broker)."""
        idle, here = self._idle, self.node
        here_awake = topic_filter in self._connected_here
        if not idle and (here_awake or here not in nodes):
            return nodes
        awake = [node for node in nodes if (here_awake if node == here else (node, topic_filter) not in idle)]
        return awake or nodes

    def send_record(self, node: str, record: bytes) -> None:
        """A record for a node's inbox, after the messages sent there so far."""
        self._add(node, None, record)
        self._collect(len(record))

    def take_outgoing(self) -> dict[str, list[Run]]:
        """The records waiting for each node's inbox, in runs, handed over once."""
        outgoing, self._outgoing = self._outgoing, {}
        return outgoing

    def _flush_qos0(self) -> None:
        self._qos0_scheduled = False
        qos0, self._qos0 = self._qos0, {}
        for node, records in qos0.items():
            self._send_qos0(node, b"".join(records))


__all__ = ["ClusterStats", "Forwarding", "Run"]

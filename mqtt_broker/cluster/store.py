"""The Store of a cluster node, in Redis: sessions, retained messages, and the node's messages
to other nodes and routes, written in batches that Redis applies at once. The only module that
knows the keys and channels (the keys are in the Lua scripts beside it too, under ``mqtt:``).

Changes are recorded on the reactor thread and written as one script call per batch; while a
batch is on its way the next one collects what comes meanwhile (group commit), so under load one
round trip carries many messages. ``flushed()`` fires, in order, when Redis has applied every
change recorded so far: the broker acknowledges a QoS 1/2 PUBLISH then, so a message forwarded
to another node is acknowledged only once that node's inbox holds it.

When Redis is away, a batch waits and is written when it is back (acknowledgements wait with it;
nothing is acknowledged that Redis does not hold). A batch whose answer was lost with the
connection may have been applied or not: the marker it leaves in Redis tells, so it is written
again only if it was not. What waits meanwhile is bounded (``unwritten_bytes``): past
MAX_UNWRITTEN_BYTES the broker reads no more from the clients that add to it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from importlib import resources
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..history import Entry
from ..logged import shortened
from ..message import Message
from ..session import Queued, Session
from ..store import CHANGE_BYTES, MAX_UNWRITTEN_BYTES, Snapshot, StoredWill, call, fire
from ..topics import Subscription
from .codec import TARGETED, pack_queued, pack_retained, pack_subscription, pack_will, targeted_head, unpack_queued, \
    unpack_retained, unpack_subscription
from .redis import READ_BLOCK, Redis, Script
from .replies import Claim, InboxEntry, TakenWill, inbox_entries, inbox_entry, taken_wills

log = Logger()

RETRY_AFTER = 1.0
"""Seconds between tries of a batch whose answer was lost, while Redis is away."""


def _script(name: str) -> Script:
    return Script(name, resources.files(__package__).joinpath(f"lua/{name}.lua").read_text())


BATCH, CLAIM, FORGET, HEARTBEAT, LEASE, QUEUED, ROUTES, WILLS = (
    _script(name) for name in ("batch", "claim", "forget", "heartbeat", "lease", "queued", "routes", "wills"))


INBOX_GROUP = "nodes"
"""The consumer group of every inbox: each node reads its own inbox as the consumer of its id,
and a survivor a dead node's as the consumer of its own."""


DROPPED_MARKER_TTL = 7 * 24 * 3600
"""Seconds a dropped node's last batch marker stays in Redis (see ``RedisStore.drop_node``)."""
ACK_DELAY = 0.05
"""Seconds the mark that an inbox entry is handled may wait for a batch to go with, when the
entry's messages were for clean sessions only (nothing else to write): with `appendfsync always`
Redis then syncs its file once per window of messages (the sending node's batch, with this
node's read) instead of twice. A node killed meanwhile has those entries handled again, by
itself when it restarts or by the node that adopts its inbox; the clean sessions they were for
ended with it."""

SWEEP_PAGE = 500
"""Queued messages ``drop_expired`` reads from Redis at a time."""

MAX_IN_FLIGHT = 1
"""Batches sent to Redis and not yet answered, at most. One: Redis answers a connection's
commands in order, but an error answer to one batch (Redis still loading its files after a
restart, say) would not stop a later one from being applied before it is sent again, and the
marker of the last batch applied assumes they are applied in order. (Measured: two or more in
flight gave no more throughput, the round trip being short next to the work around it.)"""


class _Batch:
    __slots__ = ("number", "ops", "waiters", "started", "size")

    def __init__(self, number: int, ops: list[Any], waiters: list[Deferred[None]], size: int = 0) -> None:
        self.number, self.ops, self.waiters, self.started = number, ops, waiters, 0.0
        self.size = size
        """What the batch counts in ``RedisStore.unwritten_bytes`` until Redis has applied it."""


def _size(op: tuple[Any, ...]) -> int:
    """What a change counts in ``RedisStore.unwritten_bytes``: CHANGE_BYTES and the bytes it carries
    (as ``_record`` was told them), taken off when it is undone or replaced in the pending batch."""
    return CHANGE_BYTES + sum(len(value) for value in op if isinstance(value, bytes))


class RedisStore:
    """``RedisStore(redis, node, reactor)``: the Store protocol, plus what the cluster records
    through it (messages for other nodes, routes, claims)."""

    opened = True
    keeps_history = False
    """The message log stays in each node's memory (``save_history`` keeps nothing)."""

    def __init__(self, redis: Redis, node: str, reactor: Any, inbox_maxlen: int = 1_000_000) -> None:
        self._retained_pending: dict[str, int] = {}
        """Topics this node set or deleted, with how many of those changes have not come back on
        the control channel yet (see ``retained_news``)."""
        self.redis = redis
        self.node = node
        # Pub/sub ignores the database number: clusters on one Redis, each on a database of its
        # own, keep apart by their channels' names. (Database 0's are those of earlier releases.)
        db = redis.address.db
        self._channels = f"mqtt:{db}:" if db else "mqtt:"
        self.control = f"{self._channels}control"
        """The channel of the cluster's events: routes, retained messages, claims, nodes leaving."""
        self.reactor = reactor
        self.inbox_maxlen = inbox_maxlen
        self.epochs: dict[str, int] = {}
        """The epoch this node holds each of its clients' sessions at (claim)."""
        self.since_stamps: dict[str, int] = {}
        """When each of those sessions was last begun anew (Claim.since_stamp)."""
        self.wills_in_hand: set[int] = set()
        """The ids of the wills this node took (claims, ``take_left_will``, ``take_wills``) that
        no batch has yet marked published, kept or dropped (``will_done``)."""
        self._given_up: dict[str, int] = {}
        """The epochs of sessions another node claimed from this one, while this node keeps a copy
        (until ``forgotten``): what it still writes for one is refused and passed on as queued at
        that epoch, so that a session begun anew since does not get it."""
        self.on_fenced: Callable[[str, int], None] | None = None
        """Called with (client id, epoch) when Redis refused changes made at that epoch: another
        node has claimed the session since."""
        self.generation = 0
        self._pending: list[tuple[Any, ...] | None] = []
        self._handled: list[Any] = []
        """The inbox entries routed since the last batch ("A" changes)."""
        self._ack_timer = False
        self._queued_at: dict[tuple[str, int], int] = {}
        """Messages queued by the pending batch: (client id, seq) -> index in _pending."""
        self._pubrels_at: dict[tuple[str, int], int] = {}
        self._retained_at: dict[str, int] = {}
        """Retained topics the pending batch changes: topic -> index in _pending."""
        self._leased_topics: dict[str, str] = {}
        """Retained topics this node changes only under a lease (``guard_retained``): topic -> lease."""
        self._waiters: list[Deferred[None]] = []
        self.unwritten_bytes = 0
        """What the changes recorded and not yet applied by Redis hold (pending, on their way,
        or waiting for Redis to be back), and the records the cluster collects for the next
        batch (``collect``): CHANGE_BYTES and the bytes each carries. Past ``max_unwritten_bytes``,
        the broker reads no more from a client whose packets add to it until ``flushed()``."""
        self.max_unwritten_bytes = MAX_UNWRITTEN_BYTES
        self._collected = 0
        """What the records ``collect`` was told of count in ``unwritten_bytes`` until
        ``before_batch`` records them (as changes, counted anew)."""
        self._scheduled = False
        self._in_flight: deque[_Batch] = deque()
        self._recovering = False
        self._abandoned = False
        self._closing: Deferred[None] | None = None
        self._incarnation = os.urandom(6).hex()
        """This process's token: in the markers of its batches, and its node's heartbeat key."""
        self._batches = 0
        self._failing = False
        self.commit_observers: list[Callable[[float], None]] = []
        """Called with the seconds each batch took, from its send to Redis's answer."""
        self.gather: Callable[..., None] = call
        self.before_batch: Callable[[], None] | None = None
        """Called before a batch is cut, after ``collect()`` said there is something to record
        (the cluster's messages for other nodes, gathered per node)."""
        self._collect = False

    # --- the Store protocol: reading ------------------------------------------------------

    def load(self, window: int = 0, max_bytes: int = 0) -> Snapshot:
        """Nothing at start-up: each session is read when its client connects (``claim``), and the
        retained messages by the cluster once Redis answers."""
        return Snapshot()

    def load_queued(self, client_id: str, after_seq: int, limit: int, max_bytes: int = 0) -> Deferred[list[Queued]]:
        # (max_bytes: counted on the records Redis keeps, a little larger than their payloads.)
        def read(_: Any) -> Deferred[list[Queued]]:
            return self.redis.run(QUEUED, client_id, after_seq, limit, max_bytes).addCallback(
                lambda reply: [unpack_queued(item, int(seq)) for seq, item in reply if item is not None])
        return self.flushed().addCallback(read)

    @inlineCallbacks
    def drop_expired(self, client_id: str, after_seq: int, now: float) -> Any:
        """Delete the queued messages of a session numbered after ``after_seq`` that expired by
        ``now``; fires with how many, once Redis has deleted them. Read SWEEP_PAGE at a time: a
        session at max_stored_messages may hold many."""
        yield self.flushed()
        count = 0
        while True:
            reply = yield self.redis.run(QUEUED, client_id, after_seq, SWEEP_PAGE)
            for seq, packed in reply:
                after_seq = int(seq)
                if packed is not None and unpack_queued(packed, after_seq).message.expired(now):
                    self.remove_delivery(client_id, after_seq)
                    count += 1
            if len(reply) < SWEEP_PAGE:
                break
        yield self.flushed()
        return count

    # --- the Store protocol: changes to sessions ------------------------------------------

    def epoch_of(self, client_id: str) -> int:
        """The epoch this node's writes of the client's session carry."""
        epoch = self.epochs.get(client_id)
        return epoch if epoch is not None else self._given_up.get(client_id, 0)

    def save_session(self, session: Session, disconnected_at: float | None) -> None:
        c = session.client_id
        self._record("S", c, self.epoch_of(c), session.expiry, "" if disconnected_at is None else repr(disconnected_at),
                     session.next_seq)

    def delete_session(self, client_id: str) -> None:
        self._record("D", client_id, self.epoch_of(client_id))

    def save_subscription(self, client_id: str, subscription: Subscription) -> None:
        packed = pack_subscription(subscription)
        self._record("U", client_id, self.epoch_of(client_id), subscription.topic_filter, packed,
                     carried=len(packed))

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        self._record("u", client_id, self.epoch_of(client_id), topic_filter)

    def add_delivery(self, client_id: str, item: Queued, packet_id: int | None) -> None:
        packed = pack_queued(item)
        # The head of the record that sends the message to the session's new owner, should
        # another node have claimed it: the script appends the item itself.
        head = targeted_head(client_id, len(packed))
        # A shared subscription's message queued in a copy of a session that moved goes to the
        # member all the same, begun anew or not (the group would lose it): at epoch 0, which
        # Redis refuses and compares with no clean start.
        epoch = self.epoch_of(client_id) if item.share is None else self.epochs.get(client_id, 0)
        index = self._record("Q", client_id, epoch, item.seq, packed, "" if packet_id is None else packet_id, 0, head,
                             carried=len(packed) + len(head))
        self._queued_at[(client_id, item.seq)] = index

    def update_delivery(self, client_id: str, seq: int, packet_id: int, released: bool) -> None:
        index = self._queued_at.get((client_id, seq))
        if index is not None:  # still in the pending batch: change it there
            op = self._pending[index]
            assert op is not None
            self._pending[index] = (*op[:5], packet_id, int(released), op[7])
            return
        self._record("M", client_id, self.epoch_of(client_id), seq, packet_id, int(released))

    def remove_delivery(self, client_id: str, seq: int) -> None:
        index = self._queued_at.pop((client_id, seq), None)
        if index is not None:  # never written: nothing to remove
            op = self._pending[index]
            assert op is not None
            self._pending[index] = None
            self.unwritten_bytes -= CHANGE_BYTES + len(op[4]) + len(op[7])  # (_size: its message and head)
            return
        self._record("q", client_id, self.epoch_of(client_id), seq)

    def add_pubrel(self, client_id: str, packet_id: int) -> None:
        self._pubrels_at[(client_id, packet_id)] = self._record("P", client_id, self.epoch_of(client_id), packet_id)

    def remove_pubrel(self, client_id: str, packet_id: int) -> None:
        index = self._pubrels_at.pop((client_id, packet_id), None)
        if index is not None:
            self._drop(index)
            return
        self._record("p", client_id, self.epoch_of(client_id), packet_id)

    def save_will(self, will: StoredWill) -> None:
        """A delayed will: due at ``will.due``."""
        c = will.client_id
        packed = pack_will(will.message, will.username, 0, will.due)
        self._record("W", c, self.epoch_of(c), packed, carried=len(packed))

    def arm_will(self, client_id: str, username: str | None, message: Message, delay: int) -> None:
        """The will of a connected client, for the node that finds its connection gone."""
        packed = pack_will(message, username, delay, None)
        self._record("W", client_id, self.epoch_of(client_id), packed, carried=len(packed))

    def delete_will(self, client_id: str) -> None:
        self._record("w", client_id, self.epoch_of(client_id))

    def save_retained(self, message: Message) -> None:
        packed = pack_retained(message, self.reactor.seconds())
        topic = message.topic
        self._retained_written(topic, ("R", topic, packed, self._leased_topics.get(topic, "")), len(packed))

    def delete_retained(self, topic: str) -> None:
        self._retained_written(topic, ("r", topic, self._leased_topics.get(topic, "")), 0)

    def guard_retained(self, topic: str, lease: str) -> None:
        """The retained message of ``topic`` is the holder's of the lease ``lease`` (a bridge's
        state): Redis applies this node's changes of it only while this node holds the lease or
        no node does, and tells the node what it keeps instead (``retained_news``)."""
        self._leased_topics[topic] = lease

    def _retained_written(self, topic: str, op: tuple[Any, ...], carried: int) -> None:
        # A change of a topic the next batch changes already replaces it: while Redis is away, a
        # publisher of retained messages (at QoS 0, slowed only past max_unwritten_bytes) would
        # otherwise fill the bound with one topic's changes.
        earlier = self._retained_at.get(topic)
        if earlier is not None:
            self._drop(earlier)
            self._pending[earlier] = op
            self.unwritten_bytes += CHANGE_BYTES + carried
        else:
            self._retained_pending[topic] = self._retained_pending.get(topic, 0) + 1
            self._retained_at[topic] = self._record(*op, carried=carried)

    def retained_news(self, node: str, topic: str, refused: bool = False) -> bool:
        """A change of a retained topic that Redis applied, or a change of this node's that it
        ``refused`` (told with what Redis keeps instead: ``guard_retained``), told on the control
        channel: whether this node's replica is to take it. Not this node's own change (the
        replica has it already), but its refused one unless another change of the topic by this
        node is on its way; nor another node's change while one of this node's is on its way:
        Redis applied that one before this node's, whose event comes after (events keep Redis's
        order)."""
        pending = self._retained_pending
        if node != self.node:
            return topic not in pending
        left = pending.pop(topic, 0) - 1
        if left > 0:
            pending[topic] = left
            return False
        return refused

    def retained_pending(self, topic: str) -> bool:
        """Whether a change of the topic's retained message by this node is on its way."""
        return topic in self._retained_pending

    def retained_reread(self) -> None:
        """The control channel was away (events lost): the replica is read from Redis again."""
        self._retained_pending.clear()

    def expire_retained(self, topic: str) -> None:
        """The topic's retained message expired: Redis drops it if it still holds that one."""
        self._record("e", topic, repr(self.reactor.seconds()))

    def save_history(self, entry: Entry) -> None:
        """The message log stays in each node's memory in a cluster."""

    def forget_history(self, before_seq: int) -> None:
        pass

    def drop_history(self, seqs: list[int]) -> None:
        pass

    # --- what the cluster records ---------------------------------------------------------

    def forward(self, node: str, entry: bytes) -> None:
        """Records for a node's inbox (pack_forwarded's, or a CLEARED answer), this node's too."""
        self._record("X", node, entry, carried=len(entry))

    def forward_parts(self, node: str, parts: list[tuple[tuple[str, int] | None, bytes]]) -> None:
        """Messages for a node's inbox (this node's too), in one entry, in order: each part with
        its guard, the (client, epoch) whose session must still be this node's for the part to go
        (a client's QoS 2 messages, the epoch they were published at: see
        ``Forwarding.through_inboxes``), or None."""
        self._record("Y", node, len(parts), *(value for guard, records in parts
                                               for value in (*(guard or ("", 0)), records)),
                     carried=sum(len(records) for _, records in parts))

    def handled(self, entry_id: bytes, node: str = "") -> None:
        """An entry of this node's inbox (or of a dead ``node``'s) is routed: what it queued is
        in the same batch. When it queued nothing (its messages went to clean sessions only),
        the mark waits up to ACK_DELAY for a batch to ride in."""
        self._handled += ("A", node, entry_id)
        if not self._scheduled and not self._ack_timer:
            self._ack_timer = True
            self.reactor.callLater(ACK_DELAY, self._acks_due)

    def _acks_due(self) -> None:
        """The marks waited long enough: they make a change of their own, for the next batch."""
        self._ack_timer = False
        if self._handled:
            self._record(*self._handled)
            self._handled = []

    def subscriptions_of(self, client_id: str) -> Deferred[list[Subscription]]:
        def read(reply: list[bytes]) -> list[Subscription]:
            return [unpack_subscription(client_id, reply[j].decode(), reply[j + 1]) for j in range(0, len(reply), 2)]
        return self.redis.call("HGETALL", f"mqtt:subs:{client_id}").addCallback(read)

    def route(self, topic_filter: str, held: bool, awake: bool = True) -> None:
        """This node's sessions hold a filter now, or no longer; a shared one held with no
        member connected here is not ``awake``."""
        self._record(("F" if awake else "I") if held else "f", topic_filter)

    def lost(self, client_id: str) -> None:
        """Another node claimed the client: this node no longer counts it as its own."""
        epoch = self.epochs.pop(client_id, None)
        if epoch is not None:
            self._given_up[client_id] = epoch
        self.since_stamps.pop(client_id, None)
        self._record("x", client_id)

    def given_up(self, client_id: str) -> bool:
        """Whether another node claimed the client and this node still keeps a copy."""
        return client_id in self._given_up

    def forgotten(self, client_id: str) -> None:
        """This node's copy of a session another node claimed is gone."""
        self._given_up.pop(client_id, None)

    def send_on(self, client_id: str, item: Queued, stamp: int, kind: int = TARGETED) -> None:
        """A message for a session this node does not hold, from an inbox entry of ``stamp``
        (0: none): Redis passes it to the node that holds the session, or drops it if the
        session is gone or was begun anew since the entry was made. (HELD: one sent round
        through an inbox for a session that moved lately, see ``node.Barrier``.)"""
        packed = pack_queued(item)
        head = targeted_head(client_id, len(packed), kind)
        self._record("T", client_id, stamp, packed, head, carried=len(packed) + len(head))

    def give_up(self, client_id: str) -> None:
        """The node no longer holds the client (its session ended)."""
        epoch = self.epochs.pop(client_id, None)
        self.since_stamps.pop(client_id, None)
        if epoch is not None:
            self._record("E", client_id, epoch)

    # --- membership, routes and inboxes (read and written at once, not in batches) --------

    def qos0_channel(self, node: str) -> str:
        """The channel a node's QoS 0 messages come by."""
        return f"{self._channels}qos0:{node}"

    def register(self, ttl_ms: int) -> Deferred[tuple[bool, bool]]:
        """Beat, alive for ``ttl_ms``, as one of the cluster's members: fires with whether this
        process is the node now, and whether the node was not a member. The node's heartbeat key
        holds a token of this process: while another process's holds it (alive, with this node's
        id), nothing is changed."""
        return self.redis.run(HEARTBEAT, "beat", self.node, self._incarnation, ttl_ms).addCallback(
            lambda reply: (bool(reply[0]), bool(reply[1])))

    def leave(self) -> Deferred[Any]:
        """Stop being alive at once: the survivors adopt what this node held. (Nothing, if
        another process is the node now.)"""
        return self.flushed().addCallback(
            lambda _: self.redis.run(HEARTBEAT, "leave", self.node, self._incarnation, self.control))

    def lease(self, name: str, ttl_ms: int) -> Deferred[bool]:
        """Take the lease ``name`` if it is free, or renew it if this node holds it, for
        ``ttl_ms`` from when Redis applies it: whether this node holds it now."""
        return self.redis.run(LEASE, "take", name, self.node, ttl_ms).addCallback(bool)

    def give_lease(self, name: str) -> Deferred[Any]:
        """Free the lease ``name`` if this node holds it, once what it recorded so far is written
        (the next holder's claims see it)."""
        return self.flushed().addCallback(lambda _: self.redis.run(LEASE, "give", name, self.node, 0))

    @inlineCallbacks
    def members(self) -> Any:
        """The cluster's nodes, and which of them are alive: (members, alive)."""
        members = [m.decode() for m in (yield self.redis.call("SMEMBERS", "mqtt:nodes"))]
        alive = yield DeferredList([self.redis.call("EXISTS", f"mqtt:node:{m}") for m in members],
                                   fireOnOneErrback=True, consumeErrors=True)
        return members, {m for m, (_, value) in zip(members, alive) if value}

    def routes_of(self, node: str) -> Deferred[tuple[int, dict[str, bool]]]:
        """A node's filters, each with whether it is awake (see ``route``), and the version
        they are at: its route events (control channel) carry the version each makes."""
        def read(reply: list[Any]) -> tuple[int, dict[str, bool]]:
            version, fields = reply
            return int(version), {fields[j].decode(): fields[j + 1] != b"0" for j in range(0, len(fields), 2)}
        return self.redis.run(ROUTES, node).addCallback(read)

    def clients_of(self, node: str) -> Deferred[list[str]]:
        return self.redis.call("SMEMBERS", f"mqtt:clients:{node}").addCallback(lambda ids: [c.decode() for c in ids])

    @inlineCallbacks
    def retained(self) -> Any:
        """Every retained message of the cluster."""
        found: list[Message] = []
        cursor: Any = b"0"
        for _ in range(1_000_000):  # bounded: HSCAN ends when its cursor is back to 0
            cursor, items = yield self.redis.call("HSCAN", "mqtt:retained", cursor, "COUNT", 1000)
            now = self.reactor.seconds()
            found += [unpack_retained(items[j], now) for j in range(1, len(items), 2)]
            if cursor in (b"0", 0):
                break
        return found

    @inlineCallbacks
    def describe_nodes(self) -> Any:
        """Each member of the cluster as the admin API shows it: id, alive, the filters it
        holds, the clients it holds, and its inbox (entries kept, not yet read, read and not yet
        handled)."""
        members, alive = yield self.members()
        described = []
        for node in sorted(members):
            routes = yield self.redis.call("HLEN", f"mqtt:routes:{node}")
            clients = yield self.redis.call("SCARD", f"mqtt:clients:{node}")
            length = yield self.redis.call("XLEN", f"mqtt:inbox:{node}")
            lag = pending = 0
            try:
                for group in (yield self.redis.call("XINFO", "GROUPS", f"mqtt:inbox:{node}")):
                    fields = {group[j].decode(): group[j + 1] for j in range(0, len(group), 2)}
                    lag, pending = int(fields.get("lag") or 0), int(fields.get("pending") or 0)
                    if lag:
                        # Redis's lag counts the entries trimmed unread too, for good: nothing is
                        # unread once the group has read the last one written.
                        stream = yield self.redis.call("XINFO", "STREAM", f"mqtt:inbox:{node}")
                        last = {stream[j].decode(): stream[j + 1] for j in range(0, len(stream), 2)}
                        lag = 0 if fields.get("last-delivered-id") == last.get("last-generated-id") else min(
                            lag, int(length))
            except Exception:
                pass  # no inbox yet
            described.append({"id": node, "alive": node in alive, "filters": int(routes), "clients": int(clients),
                              "inbox": {"length": int(length), "unread": lag, "unhandled": pending}})
        return described

    def locate(self, client_id: str) -> Deferred[dict[str, Any] | None]:
        """Which node holds a client's session, and at which epoch (None: no node does)."""
        def found(reply: list[bytes]) -> dict[str, Any] | None:
            fields = {reply[j].decode(): reply[j + 1].decode() for j in range(0, len(reply), 2)}
            return {"node": fields["node"], "epoch": int(fields["epoch"])} if "node" in fields else None
        return self.redis.call("HGETALL", f"mqtt:owner:{client_id}").addCallback(found)

    def publish_qos0(self, node: str, data: bytes) -> Deferred[Any]:
        return self.redis.call("PUBLISH", self.qos0_channel(node), data, apply_timeout=False)

    def create_inbox(self) -> Deferred[Any]:
        def exists(failure: Failure) -> None:
            if "BUSYGROUP" not in failure.getErrorMessage():
                failure.raiseException()
        # From the first entry: a node dropped as dead and back finds what others wrote since.
        return self.redis.call("XGROUP", "CREATE", f"mqtt:inbox:{self.node}", INBOX_GROUP, "0", "MKSTREAM"
                               ).addErrback(exists)

    def read_inbox(self, since: str) -> Deferred[list[InboxEntry]]:
        """Entries of this node's inbox, waiting up to two seconds for some: those given before
        and not yet handled (``since`` "0"), or new ones (">")."""
        return self.redis.read("XREADGROUP", "GROUP", INBOX_GROUP, self.node, "COUNT", 100, "BLOCK", int(READ_BLOCK * 1000),
                               "STREAMS", f"mqtt:inbox:{self.node}", since).addCallback(inbox_entries)

    @inlineCallbacks
    def take_inbox(self, dead: str, cursor: str) -> Any:
        """Entries of a dead node's inbox for this node to handle: first those given to any node
        and not handled (from ``cursor``), then, once those are done, those never given.
        Returns (next cursor, entries); no entries and cursor "0-0": the inbox is empty. An
        entry given and trimmed since comes without its data."""
        stream = f"mqtt:inbox:{dead}"
        try:
            reply = yield self.redis.call("XAUTOCLAIM", stream, INBOX_GROUP, self.node, 0, cursor, "COUNT", 100)
            cursor = reply[0].decode()
            entries = [inbox_entry(entry_id, fields) for entry_id, fields in reply[1]]
            # Given and trimmed since (cluster_inbox_maxlen): Redis tells their ids once, as it
            # takes them out of the pending ones (Redis 7).
            entries += [(entry_id, None, 0) for entry_id in (reply[2] if len(reply) > 2 else ())]
            if cursor == "0-0":
                entries += inbox_entries((yield self.redis.call("XREADGROUP", "GROUP", INBOX_GROUP, self.node, "COUNT",
                                                           100, "STREAMS", stream, ">")))
        except Exception as e:
            if "NOGROUP" in str(e):  # no inbox, or never read: nothing was left
                return "0-0", []
            raise
        return cursor, entries

    @inlineCallbacks
    def trimmed_unread(self, node: str) -> Any:
        """How many entries of a node's inbox were trimmed (cluster_inbox_maxlen) before they
        were given to any node, once the last one written was given (else 0): Redis counts
        them, for good, with the entries written and not given (its group's lag)."""
        try:
            groups = yield self.redis.call("XINFO", "GROUPS", f"mqtt:inbox:{node}")
            stream = yield self.redis.call("XINFO", "STREAM", f"mqtt:inbox:{node}")
        except Exception as e:
            if "no such key" in str(e):  # (no inbox, or dropped meanwhile)
                return 0
            raise
        last = {stream[j].decode(): stream[j + 1] for j in range(0, len(stream), 2)}
        for group in groups:  # (none: written to by other nodes, never read)
            fields = {group[j].decode(): group[j + 1] for j in range(0, len(group), 2)}
            if fields.get("name") == INBOX_GROUP.encode() and fields.get("last-delivered-id") == last.get(
                    "last-generated-id"):
                return int(fields.get("lag") or 0)
        return 0

    def take_left_will(self, node: str, client_id: str) -> Deferred[TakenWill | None]:
        """The will of a client another node claimed while ``node`` looked alive, if ``node``
        never heard of the claim (it would have published the will itself): taken, once,
        whichever nodes ask."""
        return self.redis.run(WILLS, "left", self.node, node, client_id).addCallback(
            lambda reply: next(iter(self._in_hand(reply)), None))

    def take_wills(self, node: str) -> Deferred[list[TakenWill]]:
        """The wills a dead ``node`` took and did not finish; this node's own: those it took
        before a restart, or by a claim whose answer was lost (not those it is handling)."""
        return self.redis.run(WILLS, "due", self.node, node).addCallback(self._in_hand)

    def _in_hand(self, reply: list[Any]) -> list[TakenWill]:
        wills = [will for will in taken_wills(reply) if will.id not in self.wills_in_hand]
        self.wills_in_hand.update(will.id for will in wills)
        return wills

    def will_done(self, will_id: int) -> None:
        """A will this node took is published, kept or dropped: in the same batch as its
        messages, so that the node that adopts this one, should it die first, does it instead."""
        self._record("L", will_id)
        self.flushed().addBoth(lambda _: self.wills_in_hand.discard(will_id))

    def forget_node(self, dead: str) -> Deferred[bool]:
        """A dead node's sessions are adopted: its routes go, and the others are told. False (and
        nothing done) if the node is alive again."""
        return self.redis.run(FORGET, "forget", dead, self.control).addCallback(bool)

    def drop_node(self, dead: str) -> Deferred[bool]:
        """The last of a dead node: its inbox, read to the end, its membership and its routes'
        version. Its last batch's marker stays a week (``DROPPED_MARKER_TTL``): a node taken for
        dead that comes back from a partition may still send that batch again, which the marker
        keeps from being applied twice; a node id made afresh at each start leaves nothing for
        good. False (and nothing done) if the node is alive again."""
        return self.redis.run(FORGET, "drop", dead, self.control, DROPPED_MARKER_TTL).addCallback(bool)

    def node_alive(self, node: str) -> Deferred[bool]:
        return self.redis.call("EXISTS", f"mqtt:node:{node}").addCallback(bool)

    @inlineCallbacks
    def claim(self, client_id: str, clean_start: bool, window: int, required: str = "", max_bytes: int = 0,
              withdraw: Deferred[None] | None = None) -> Any:
        """Take the client's session (``Deferred[Claim | None]``), sent once this node's changes
        so far are written (so that the claim sees them) and Redis is reachable. ``withdraw``
        fired before then, it never is (CancelledError): Redis has nothing of it; fired after,
        it changes nothing (Redis may have applied it). None when ``required`` names a node
        that no longer holds it, or that is alive (another than this one: taken for dead, it
        beat again). Of its queued messages, the first ``window`` (0: all) are read, and with
        ``max_bytes`` no more bytes than that (counted on the records Redis keeps; the first
        whatever its size)."""
        known = self.epochs.get(client_id, 0)
        sendable = self._sendable()
        if withdraw is not None:
            withdraw.addCallback(lambda _: sendable.cancel())  # (sent, the wait is over: nothing to cancel)
        yield sendable
        reply = yield self.redis.run(CLAIM, client_id, self.node, "1" if clean_start else "0", known, window,
                                     required, max_bytes, self.control)
        if reply is None:
            return None
        claim = Claim(reply, client_id)
        self.epochs[client_id] = claim.epoch
        if claim.will_id is not None:
            self.wills_in_hand.add(claim.will_id)
        self._given_up.pop(client_id, None)
        self.since_stamps[client_id] = claim.since_stamp
        return claim

    @inlineCallbacks
    def _sendable(self) -> Any:
        """Fires once this node's changes so far are written and Redis is reachable, when a
        command given to it goes (given while Redis is away, it would wait in txredisapi's
        queue, out of reach of a withdrawal, to be sent whenever Redis is back). Cancelled
        before, it waits no more."""
        yield self.flushed()
        while not self.redis.up:
            yield self.redis.when_up()

    # --- writing --------------------------------------------------------------------------

    def _record(self, *op: Any, carried: int = 0) -> int:
        """Add a change to the pending batch (``carried``: the length of the bytes among its
        values, its messages); returns its index there."""
        self._pending.append(op)
        self.unwritten_bytes += CHANGE_BYTES + carried
        if not self._scheduled:
            self._scheduled = True
            self.reactor.callLater(0, self._flush)
        return len(self._pending) - 1

    def _drop(self, index: int) -> None:
        """Take the change at ``index`` out of the pending batch."""
        op = self._pending[index]
        assert op is not None
        self._pending[index] = None
        self.unwritten_bytes -= _size(op)

    def collect(self, carried: int = 0) -> None:
        """``before_batch`` has something to record in the next batch (``carried``: the length
        of the records it holds for it, counted meanwhile in ``unwritten_bytes``: while Redis is
        away they wait there): from now on a ``flushed()`` waits for it."""
        if carried:
            self.unwritten_bytes += CHANGE_BYTES + carried
            self._collected += CHANGE_BYTES + carried
        if not self._collect:
            self._collect = True
            if not self._scheduled:
                self._scheduled = True
                self.reactor.callLater(0, self._flush)

    def flushed(self) -> Deferred[None]:
        if not self._pending and not self._in_flight and not self._waiters and not self._collect and not self._handled:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        if not self._scheduled:
            self._scheduled = True
            self.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        """Cut a batch and send it, when fewer than MAX_IN_FLIGHT are on their way (then what is
        recorded meanwhile makes the next batch: group commit)."""
        self._scheduled = False
        if self._recovering or len(self._in_flight) >= MAX_IN_FLIGHT:
            return  # sent when an answer comes
        if self._collect and self.before_batch is not None:
            self._collect = False
            self.unwritten_bytes -= self._collected  # (recorded now, they count as changes)
            self._collected = 0
            self.before_batch()
        ops = [value for op in self._pending if op is not None for value in op]
        ops += self._handled
        waiters, self._waiters = self._waiters, []
        self._pending, self._handled = [], []
        self._queued_at.clear()
        self._pubrels_at.clear()
        self._retained_at.clear()
        self.generation += 1
        if not ops:
            if self._in_flight:  # nothing new: they wait for what is on its way
                self._in_flight[-1].waiters += waiters
            else:
                self.gather(fire, waiters)
            return
        self._batches += 1
        # (What is counted is this batch's, but for the batches on their way and what waits to be collected.)
        size = self.unwritten_bytes - self._collected - sum(sent.size for sent in self._in_flight)
        batch = _Batch(self._batches, ops, waiters, size)
        self._in_flight.append(batch)
        self._send(batch)

    def _send(self, batch: _Batch) -> None:
        batch.started = time.perf_counter()
        marker = f"{self._incarnation}:{batch.number}"
        self.redis.run(BATCH, self.node, marker, self.inbox_maxlen, self.control, *batch.ops).addCallbacks(
            self._written, self._not_written, callbackArgs=(batch,), errbackArgs=(batch,))

    def _written(self, refused: list[bytes], batch: _Batch) -> None:
        if not self._in_flight or self._in_flight[0] is not batch:
            return  # (answered after it was sent again: done already)
        self._in_flight.popleft()
        self.unwritten_bytes -= batch.size
        self._works_again()
        elapsed = time.perf_counter() - batch.started
        for observe in self.commit_observers:
            observe(elapsed)
        self._refused(refused)  # (before the waiters go on)
        self.gather(fire, batch.waiters)
        if self._pending or self._waiters or self._collect:
            self._flush()

    def _refused(self, refused: list[bytes]) -> None:
        """Redis refused a batch's changes to these sessions ('client\\0epoch'): another node
        has them. Told before the batch's waiters go on, so that nothing of those sessions is
        acknowledged as written (a QoS 2 PUBLISH whose routing was refused with its packet id)."""
        if self.on_fenced is not None:
            for entry in refused:
                client_id, _, epoch = entry.decode().rpartition("\0")
                try:
                    self.on_fenced(client_id, int(epoch))
                except Exception:  # (the batch's waiters, and the store, go on all the same)
                    log.failure("letting go of {client_id!r}, whose session another node holds",
                                client_id=shortened(client_id))

    def _not_written(self, failure: Failure, batch: _Batch) -> None:
        """A batch failed, or its answer was lost with the connection (and so those sent after
        it): once Redis answers again, the marker of the last batch applied tells which were,
        and the others are sent again, in order. Their waiters wait meanwhile: nothing is
        acknowledged before Redis has it."""
        if self._recovering or self._abandoned:
            return
        self._recovering = True
        if not self._failing:
            self._failing = True
            log.warn("a batch of changes to Redis failed ({error}); it is written again once Redis answers; "
                     "QoS 1/2 acknowledgements wait until then", error=failure.getErrorMessage())
        self.reactor.callLater(RETRY_AFTER, self._recover)

    def _works_again(self) -> None:
        if self._failing:
            self._failing = False
            log.info("writing to Redis works again")

    def _recover(self) -> None:
        def applied(answers: list[Any]) -> None:
            value, refused = answers
            incarnation, _, number = (value or b"").decode().partition(":")
            last = int(number) if incarnation == self._incarnation else 0
            while self._in_flight and self._in_flight[0].number <= last:
                batch = self._in_flight.popleft()
                self.unwritten_bytes -= batch.size
                if batch.number == last:  # (what it found refused, kept with the marker: one batch in flight)
                    self._refused(refused)
                self.gather(fire, batch.waiters)
            self._recovering = False
            if not self._in_flight:  # (else: once one of those sent again is written)
                self._works_again()
            for batch in self._in_flight:
                self._send(batch)
            self._flush()

        def retry(_: Any) -> None:
            if not self._abandoned:
                self.reactor.callLater(RETRY_AFTER, self._recover)
        gatherResults([self.redis.call("GET", f"mqtt:applied:{self.node}"),
                       self.redis.call("LRANGE", f"mqtt:refused:{self.node}", 0, -1)],
                      consumeErrors=True).addCallbacks(applied, retry)

    def close(self) -> Deferred[None]:
        """Fires once what was recorded is written, or once the node gives Redis up (``abandon``)."""
        if self._abandoned:
            return succeed(None)
        self._closing = self.flushed()
        return self._closing.addErrback(_given_up)

    def abandon(self) -> None:
        """The node stops with Redis out of reach: what waits to be written is given up (none of it
        was acknowledged), and the store tries no more."""
        self._abandoned = True
        if self._closing is not None:
            self._closing.cancel()


def _given_up(failure: Failure) -> None:
    failure.trap(CancelledError)


__all__ = ["RedisStore"]

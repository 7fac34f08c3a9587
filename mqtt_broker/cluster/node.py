"""A node of a cluster: the broker's link to the other nodes, through Redis.

The broker calls it at a few seams (see :class:`Cluster`): a client connects (claim its
session), a client's connection comes or goes (its will, its shared subscriptions' connected
members), a session ended, a filter or a shared group's member comes or goes here. What is done with
every message routed here (forward it to the nodes that want it) is its ``forwarding``
(:mod:`mqtt_broker.cluster.forwarding`, compiled), which the broker's routing calls directly;
this module keeps the routes it uses current. It calls the broker back to route what other
nodes forward, to take sessions it adopts from a dead node, and to let go of sessions another
node claimed. Redis keys and scripts stay in :mod:`mqtt_broker.cluster.store`.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..config import ConfigError
from ..connect import NEVER
from ..deadlines import cancel
from ..logged import shortened
from ..message import Message
from ..session import Queued, Session
from ..topics import SharedGroup, SubscriptionTree, Subscription, but_its_sender, matches, terms
from .address import RedisAddress
from .codec import (
    BARRIER, CLEARED, FORWARDED, HANDED, HELD, TARGETED, pack_barrier, pack_cleared, unpack_records, unpack_retained,
)
from .forwarding import ClusterStats, Forwarding, origin_of
from .leases import Leases
from .redis import RECONNECT_MAX_DELAY, Redis
from .replies import Claim, InboxEntry
from .store import RedisStore
from .survivor import Survivor

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from ..broker import BrokerService

log = Logger()

JOIN_WARNING = 5.0
"""Seconds between warnings while a starting node cannot reach Redis."""
JOIN_RETRY = 1.0
"""Seconds before a join that met an error is tried again."""
LEAVE_TIMEOUT = 5.0
"""Seconds a stopping node waits for Redis to take what it has not written yet and its leaving."""


def node_id(config: Any) -> str:
    """``cluster_node_id``, or a stable id kept in ``data_dir`` (made at the first start).
    Raises ConfigError naming the file when ``data_dir`` cannot keep it."""
    if config.cluster_node_id:
        return config.cluster_node_id
    path = Path(config.data_dir) / "cluster-node-id"
    try:
        kept = _kept_id(path)
        if kept:
            return kept
        made = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        if kept is not None:
            # Left by a crash while it was written in place (as releases before this one did):
            # the id it was to hold is lost either way, and two nodes that took "" would be one.
            log.warn("{path} holds no id: this node is {node}", path=str(path), node=made)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(path, made + "\n")
        return made
    except OSError as e:
        raise ConfigError(f"cannot keep the cluster node id in {path}: {e.strerror or e}", "data_dir") from None


def _kept_id(path: Path) -> str | None:
    """The id kept in ``path`` ("" if it holds none, or no text); None if there is no such file."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return ""


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it: a crash or a full disk leaves it
    as it was, never half written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(temporary, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class NodeIdTaken(Exception):
    """Another process is this node: it beats with the node's id (``cluster_node_id``)."""


OWNED_AT_ONCE = 1000
"""Sessions whose holder ``Cluster.check_owned`` asks Redis about at once."""
BARRIER_TIMEOUT = 1.0
"""Seconds a session that moved here waits for its previous node's CLEARED answer (which takes a
few Redis round trips) before it is given what it holds back all the same."""

Waiting = tuple[Queued, int, bytes, bool]
"""A message for a client that waits, for its claim or for a ``Barrier``: the stamp and id of the
inbox entry it came in, whether it came HELD."""


class Barrier:
    """A session that moved here from a live node, while it counts as moving (``moved_here``). A
    message another node forwards here for it may overtake one that node sent to the previous
    node before it knew of this one, which the previous node passes on through Redis a batch
    later. So what is forwarded (or published) here for the session goes round through this
    node's inbox (HELD records, durable and in order) while the previous node's answer is awaited
    or others are on their way round, and waits there until the previous node has answered a
    BARRIER record put in its inbox after the first of them came: it answers once it has passed
    on what its inbox held before, so the passed-on messages arrive here first [MQTT-4.6.0-6]. One
    BARRIER per node of origin, as each switched to this node at its own time (this node is one
    of them: what it sent the previous node before the move goes before what is published here
    after it); none to a node gone, and none waited for past BARRIER_TIMEOUT."""

    __slots__ = ("previous", "cleared", "asked", "round", "held", "ending")

    def __init__(self, previous: str) -> None:
        self.previous: str | None = previous
        """None once that node is gone (then nothing more is asked of it)."""
        self.cleared: set[bytes] = set()
        """The origins (``origin_of``) whose earlier messages for the session are here."""
        self.asked: dict[bytes, IDelayedCall] = {}
        """The origins asked about and not answered yet, with the call that stops waiting."""
        self.round: set[bytes] = set()
        """The ids of the messages sent round and not back yet: while any are, the next message
        goes round too. (Counted as had when they came: back, they are not checked again.)"""
        self.held: list[Waiting] = []
        """The HELD records back and waiting for the answers."""
        self.ending = False
        """The session's time as moving is over, but for what is on its way round (``round``)."""

    def clear(self) -> None:
        """Nothing more is waited for: the timers are cancelled."""
        for timer in self.asked.values():
            if timer.active():
                timer.cancel()
        self.asked.clear()


class Cluster:
    """This node's part in a cluster. ``store`` is the node's Store (in Redis)."""

    def __init__(self, broker: BrokerService, reactor: Any) -> None:
        config = broker.config
        self.broker = broker
        self.clock = broker.clock
        self.node = node_id(config)
        self.address = RedisAddress.parse(config.cluster)
        self.redis = Redis(self.address, on_up=self._redis_up, on_down=self._redis_down,
                           tls_ca_file=config.cluster_tls_ca_file)
        self.store = RedisStore(self.redis, self.node, reactor, config.cluster_inbox_maxlen)
        self.store.on_fenced = self._fenced
        self.store.before_batch = self._collect
        self.stats = ClusterStats()
        self.awake: dict[str, set[str]] = {}
        """The connected members of each shared subscription held here, by its filter."""
        self._shares: dict[str, bool] = {}
        """The shared subscriptions held here, with whether the other nodes were told that a
        member is connected."""
        self._shares_changed: set[str] = set()
        """Shared subscriptions whose members came or went since the last batch: what the other
        nodes are told is decided then, so that a change undone in the meantime (a client taking
        its own session over) tells them nothing."""
        self._route_versions: dict[str, int] = {}
        """The version of each other node's routes that the replica is at (see ``load_routes``)."""
        self._retained_reads: list[set[str]] = []
        """For each read of the retained messages under way, the topics an event changed since it began."""
        self._route_reads: dict[str, list[list[tuple[int, bytes, str]]]] = {}
        """The route events of each node whose routes are being read, one list per read."""
        self.forwarding = Forwarding(self.node, self.clock, self.stats, self._deliver_shared, self.store.collect,
                                     self._send_qos0, self.store.epoch_of)
        self.nodes: dict[str, float] = {}
        """The live nodes other than this one, with the time each was last seen."""
        self._qos0_unanswered = 0
        """The bytes of QoS 0 messages for other nodes sent to Redis and not answered yet."""
        self._claiming: dict[str, list[Waiting]] = {}
        """Clients whose claim is under way, with the messages for them that came meanwhile (see
        ``deliver_targeted``)."""
        self._waiting: dict[bytes, int] = {}
        """The entries of this node's inbox with messages that wait for claims, and how many:
        each is marked handled once they are queued; read again meanwhile (after an outage,
        from the first entry given), it is not handled twice."""
        self._overtaken: dict[str, tuple[int, bool]] = {}
        """Clients whose claim here is under way and that another node claimed since, the news
        coming before the answer: that node's epoch, and whether its connection started clean."""
        self.survivor = Survivor(self)
        self.leases = Leases(self.store, self.clock, self.survivor.ttl_ms)
        """What only one node of the cluster runs at a time (the bridges), renewed at each heartbeat."""
        self._settle = 4 * self.survivor.ttl_ms / 1000 + 1.0
        """Seconds after a session moves until every node routes for it where it is now: the
        previous owner's death noticed, its inbox read, the routes replaced."""
        self._moving_for = 2 * self._settle
        """Seconds a session that moved here counts as moving (``moved_here``): longer than the
        copy its previous node keeps, ``_settle`` from when that node heard of the move, so that
        what the copy passes on in its last moment, a batch or more later, is known for a second
        copy (a QoS 2 message went out twice, ``_settle`` after a move)."""
        self.started = False
        self._join_warning: Any = None
        self._join_retry: Deferred[None] | None = None
        self._reading = False
        self._checking_owned = False
        self._down_since: float | None = None
        self.ready: Deferred[None] = Deferred()
        """Fires once the node has joined (its routes, retained messages and sessions loaded)."""
        self._listening: Deferred[None] = Deferred()
        """Fires once the control channel is listened to: routes and retained messages are read
        after that, so that no change falls between the reading and the listening."""
        self._moving = self.forwarding.moving  # (the routing of messages published here checks it too)
        self._barriers: dict[str, Barrier] = {}
        """The sessions that moved here from live nodes lately: see ``Barrier``."""

    # --- starting and stopping --------------------------------------------------------------

    @inlineCallbacks
    def start(self) -> Any:
        """Join: register, learn the routes and retained messages, take back this node's own
        sessions (a restart), and start reading the inbox and beating. A step Redis answers with
        an error (a Redis still loading its files, out of memory, the connection lost) is tried
        again, from the start, every JOIN_RETRY seconds while the node runs."""
        self.started = True
        self._join_warning = self.clock.callLater(JOIN_WARNING, self._still_joining)
        self.redis.on_subscribed = self._subscribed
        self.redis.subscribe(self.store.control, self._control)
        self.redis.subscribe(self.store.qos0_channel(self.node), self._qos0_received)
        yield self._listening
        for attempt in itertools.count():
            try:
                yield self._join()
                break
            except NodeIdTaken:
                self.id_taken()
                return
            except Exception as e:
                if not self.started:
                    return
                if not attempt:  # (then _still_joining says it goes on)
                    log.warn("cluster node {node} could not join through Redis at {address} ({error}); trying again",
                             node=self.node, address=str(self.address), error=str(e)[:300] or type(e).__name__)
                self._join_retry = deferLater(self.clock, JOIN_RETRY, lambda: None)
                try:
                    yield self._join_retry
                except CancelledError:  # (stopped meanwhile)
                    return
        if not self.started:  # (stopped while Redis answered the last step)
            return
        self.survivor.start()
        self.leases.renew()
        self._read_inbox("0")
        log.info("cluster node {node} joined through Redis at {address} ({nodes} other nodes)",
                 node=self.node, address=str(self.address), nodes=len(self.nodes))
        cancel(self._join_warning)
        self.ready.callback(None)

    @inlineCallbacks
    def _join(self) -> Any:
        yield self._take_id()
        yield self.store.create_inbox()
        yield self.load_routes()
        yield self._load_retained()
        self.announce_all()
        yield self.survivor.adopt(self.node)  # this node's sessions before a restart, if any

    @inlineCallbacks
    def _take_id(self) -> Any:
        """Register, once no other process holds the node's heartbeat key. One that does is waited
        for, a key's life and a heartbeat (this node before a kill -9, its last beat not expired
        yet); still there, it is another process with this node's id: raises NodeIdTaken."""
        ttl_ms, heartbeat = self.survivor.ttl_ms, self.broker.config.cluster_heartbeat
        deadline = self.clock.seconds() + ttl_ms / 1000 + heartbeat
        for attempt in itertools.count():
            held, _ = yield self.store.register(ttl_ms)
            if held:
                return
            if self.clock.seconds() >= deadline:
                raise NodeIdTaken()
            if not attempt:
                log.info("cluster node {node}: another process beats with its id (this node before a restart?); "
                         "waiting up to {seconds:.1f} s for its heartbeat key to expire", node=self.node,
                         seconds=deadline - self.clock.seconds())
            self._join_retry = deferLater(self.clock, heartbeat, lambda: None)
            yield self._join_retry

    def id_taken(self) -> None:
        """Another process is this node (it holds the node's heartbeat key): this one stops, the
        broker with it (``BrokerService.give_up``), so that the two never read one inbox nor take
        one node's sessions."""
        if not self.started:
            return
        self.started = False
        log.critical("cluster node {node}: another process beats with this node's id in Redis at {address}; "
                     "two processes must never share a cluster_node_id (a copied data_dir, a cloned machine, "
                     "a typo): this one stops", node=self.node, address=str(self.address))
        self.broker.give_up()

    def unready(self) -> str | None:
        """Why this node cannot take new clients now (their CONNECTs wait for Redis, and are
        refused after cluster_claim_timeout), or None: for readiness probes."""
        if not self.ready.called:
            return "the cluster node has not joined yet (Redis not reached)"
        if self._down_since is not None:
            return "Redis is unreachable: new connections wait for it"
        silent = self.clock.seconds() - self.survivor.answered_at
        if silent > self.survivor.ttl_ms / 1000:
            return f"Redis has answered no heartbeat for {silent:.0f} s: new connections wait for it"
        return None

    def unsure_of_sessions(self) -> bool:
        """Whether another node may have adopted this node's sessions without its knowing yet
        (Redis out of reach or silent for a heartbeat key's life, or being asked who holds
        them): what only their owner may do (publish a delayed will) waits."""
        return self.unready() is not None or self._checking_owned

    def holds(self, client_id: str) -> bool:
        """Whether this node holds the client's session, as far as it knows."""
        return client_id in self.store.epochs

    def still_holds(self, client_id: str) -> Deferred[bool]:
        """Whether this node holds the client's session still once what it recorded so far is
        written: a write Redis refused as the session's (another node claimed it, the news not
        here yet) has let it go by then."""
        epoch = self.store.epochs.get(client_id)
        return self.store.flushed().addCallback(lambda _: epoch is not None and self.store.epochs.get(client_id) == epoch)

    def _still_joining(self) -> None:
        if not self.ready.called and self.started:
            log.warn("cluster node {node} has not reached Redis at {address} yet: check the address, the "
                     "password and the TLS settings (cluster, cluster_tls_ca_file); still trying",
                     node=self.node, address=str(self.address))
            self._join_warning = self.clock.callLater(JOIN_WARNING, self._still_joining)

    def stop(self) -> Deferred[Any]:
        """Leave: what this node's sessions hold stays in Redis for the survivors to adopt. With
        Redis out of reach, the node leaves without telling it after LEAVE_TIMEOUT (the others
        take it for dead when its heartbeats stop), so that a stop does not wait for Redis."""
        self.started = False
        for barrier in self._barriers.values():  # (what they hold stays unhandled in the inbox, read again)
            barrier.clear()
        self._barriers.clear()
        cancel(self._join_warning)
        if self._join_retry is not None:
            self._join_retry.cancel()
        self.survivor.stop()
        self.leases.give_up()  # (sent before the leaving, which waits for the same writes)
        leaving = self.store.leave().addTimeout(LEAVE_TIMEOUT, self.clock)
        leaving.addErrback(self._left_without_redis)
        return leaving.addBoth(lambda _: self.redis.close())

    def _left_without_redis(self, failure: Any) -> None:
        if failure.check(TimeoutError):
            log.warn("leaving the cluster: Redis did not answer in {timeout} s; the other nodes take this node "
                     "for dead when its heartbeats stop", timeout=LEAVE_TIMEOUT)
            self.store.abandon()
        else:
            log.warn("leaving the cluster: {error}", error=failure.getErrorMessage())

    # --- the broker's seams -----------------------------------------------------------------

    def claim(self, client_id: str, clean_start: bool) -> Deferred[bool]:
        """Take the client's session before its CONNACK: load it if another node (or this node
        before a restart) had it, and make that node let go. False if Redis did not answer in
        time (the client is refused with 0x88). A claim not sent by then (this node's changes
        before it, or Redis, out of reach) is withdrawn; one sent goes on, and a session it
        takes once the client is gone is kept here as if its client had just disconnected."""
        self.stats.claims += 1
        self._claiming.setdefault(client_id, [])
        answer: Deferred[bool] = Deferred()
        config = self.broker.config
        withdraw: Deferred[None] = Deferred()
        timer = self.clock.callLater(config.cluster_claim_timeout, self._claim_late, client_id, answer, withdraw)
        self.store.claim(client_id, clean_start, config.max_queued_messages, "", config.max_queued_bytes,
                         withdraw).addCallbacks(
            self._claimed, self._not_claimed, callbackArgs=(client_id, clean_start, answer, timer),
            errbackArgs=(client_id, answer, timer))
        return answer

    def _claim_late(self, client_id: str, answer: Deferred[bool], withdraw: Deferred[None]) -> None:
        log.warn("Redis has not handed over the session of {client_id!r} in time: the client is refused",
                 client_id=shortened(client_id))
        answer.callback(False)
        # Not yet sent, it would be once Redis is back, minutes later perhaps, and take the
        # session from the connection the client has made to another node since (0x8E there).
        withdraw.callback(None)

    def _claimed(self, claim: Claim | None, client_id: str, clean_start: bool, answer: Deferred[bool],
                 timer: Any) -> None:
        assert claim is not None
        broker = self.broker
        ran_out = claim.session is not None and claim.disconnected_at is not None and claim.session.expiry != NEVER \
            and claim.disconnected_at + claim.session.expiry <= self.clock.seconds()
        if ran_out:  # (on a node that died before it could end it): not resumed, and its will is due
            self.store.delete_session(client_id)
            claim.session = None
        if not claim.current:
            local = broker.sessions.get(client_id)
            if local is not None:  # a copy from before another node had it: stale
                broker.forget_session(client_id)
            if claim.session is not None:
                broker.sessions[client_id] = claim.session
                for subscription in claim.session.subscriptions.values():
                    broker.subscriptions.add(subscription)
                if claim.previous is not None and claim.previous != self.node:
                    self.moved_here(client_id, claim.previous if claim.previous_alive else None)
        self._deliver_held(client_id)
        if timer.active():
            timer.cancel()
            answer.callback(True)  # the connection attaches now, if it is still there
        session = broker.sessions.get(client_id)
        attached = session is not None and session.connection is not None
        expiry = claim.session.expiry if claim.session is not None else 0
        if claim.will is not None:
            if ran_out:
                # Ended by this node's clock, not yet by the live previous owner's, which takes
                # the session for one that goes on and drops the will: it is due now.
                self.survivor.will_found(client_id, claim.will, ended=True, expiry=0, taken=claim.will_id)
            elif not claim.previous_alive:
                # (no session kept: it ended with its connection on the dead node [MQTT-3.1.3-9])
                self.survivor.will_found(client_id, claim.will, ended=clean_start or claim.session is None,
                                         connecting=attached, expiry=expiry, taken=claim.will_id)
            elif not (attached or clean_start or not expiry):
                # The live previous owner published it unless it was delayed: then it was for
                # the new connection to cancel, which went, so it is due after its delay.
                self.survivor.will_found(client_id, claim.will, ended=False, expiry=expiry, delayed_only=True)
        overtaken = self._overtaken.pop(client_id, None)
        if overtaken is not None and overtaken[0] > claim.epoch:  # claimed since by another node
            self._let_go(client_id, overtaken[1])
            return
        if attached:
            return
        # The client went (or was refused) before it could attach: the session is this node's
        # now all the same (Redis says so), as if its client had just disconnected.
        if session is not None:
            broker.left_unattached(session, ended=clean_start)
        elif client_id in self.store.epochs:
            self.store.give_up(client_id)

    def _not_claimed(self, failure: Any, client_id: str, answer: Deferred[bool], timer: Any) -> None:
        self._overtaken.pop(client_id, None)
        if timer.active():
            timer.cancel()
            answer.callback(False)
        self._deliver_held(client_id)  # to the session's owner, through Redis
        if failure.check(CancelledError):
            return  # withdrawn before it was sent (_claim_late): Redis has nothing of it
        log.warn("could not claim the session of {client_id!r} in Redis: {error}",
                 client_id=shortened(client_id), error=failure.getErrorMessage())
        # Redis may have applied the claim and lost only its answer: once it answers again,
        # what it says this node holds and this node does not know is taken as at a restart.
        survivor = self.survivor
        self.store.flushed().addCallback(lambda _: survivor.adopt(self.node)).addErrback(survivor.failed)

    def will_follows(self, client_id: str) -> bool:
        """Whether a will of the client goes through this node's inbox, after its messages on
        their way there (not while Redis is away: this node's clients are served all the same)."""
        return client_id in self.forwarding.pending_here and self.unready() is None

    def claiming(self, client_id: str) -> bool:
        """Whether the client's claim is under way here (its connection waits for it)."""
        return client_id in self._claiming

    def _deliver_held(self, client_id: str) -> None:
        """The claim ended: the messages that came for the client meanwhile are delivered (those
        a ``Barrier`` sent round wait for it again, their entries with them)."""
        self._deliver_waiting(client_id, self._claiming.pop(client_id, []), hold_again=True)

    def _deliver_waiting(self, client_id: str, waited: list[Waiting], hold_again: bool = False) -> None:
        """Messages for the client that waited (for its claim, or its previous node's answer) are
        delivered (or sent on), and the inbox entries they came in marked handled after them, in
        the same batch or a later one. While the client's claim is under way here they wait for
        it instead; ``hold_again``: those back from a ``Barrier``'s round may wait for it again."""
        waiting = self._waiting
        claiming = self._claiming.get(client_id)
        for item, stamp, entry_id, held in waited:
            if claiming is not None:  # (the client connects here again: after its claim, entries and all)
                claiming.append((item, stamp, entry_id, held))
                continue
            self.deliver_targeted(client_id, item, stamp, entry_id if hold_again and held else None, held=held)
            waiting[entry_id] -= 1
            if not waiting[entry_id]:
                del waiting[entry_id]
                self.store.handled(entry_id)

    def _deliver_shared(self, message: Message, share: tuple[str, str], group: SharedGroup) -> int:
        return self.broker.delivery.to_group(message, share, group)

    def _collect(self) -> None:
        """Before the store cuts a batch: the records for the nodes' inboxes (this node's too) go
        in it, one entry per node (so a publisher acknowledged after the batch is acknowledged
        after the inboxes hold its message), and what changed about the shared subscriptions'
        members here."""
        for node, runs in self.forwarding.take_outgoing().items():
            if len(runs) == 1 and runs[0].guard is None:
                self.store.forward(node, b"".join(runs[0].records))
            else:
                self.store.forward_parts(node, [(run.guard, b"".join(run.records)) for run in runs])
        for topic_filter in self._shares_changed:
            awake = bool(self.awake.get(topic_filter))
            if self._shares.get(topic_filter, awake) != awake:  # (held, and changed)
                self._shares[topic_filter] = awake
                self.store.route(topic_filter, True, awake)
        self._shares_changed.clear()

    def _send_qos0(self, node: str, data: bytes) -> None:
        # Dropped, as QoS 0 may be, while Redis is out of reach, and past the store's bound while
        # it answers slower than they come (hung, its connection up till a reply timer drops it):
        # held for Redis, they grew without bound.
        size = len(data)
        if not self.store.redis.up or self._qos0_unanswered + size > self.store.max_unwritten_bytes:
            return
        self._qos0_unanswered += size
        self.store.publish_qos0(node, data).addBoth(self._qos0_answered, size)  # (an error too: fire and forget)

    def _qos0_answered(self, _: Any, size: int) -> None:
        self._qos0_unanswered -= size

    def filter_changed(self, topic_filter: str, held: bool) -> None:
        """This node's sessions hold a filter now, or no longer (from the subscription tree). A
        shared one is announced with whether a member is connected here: the other nodes give
        its messages to nodes with a connected member first, as one broker gives them to
        connected members first."""
        if not topic_filter.startswith("$share/"):
            self.store.route(topic_filter, held)
        elif held:
            awake = self._shares[topic_filter] = bool(self.awake.get(topic_filter))
            self.store.route(topic_filter, True, awake)
        else:
            self._shares.pop(topic_filter, None)
            self.awake.pop(topic_filter, None)
            self.forwarding.connected_here(topic_filter, False)
            self.store.route(topic_filter, False)

    def member_changed(self, subscription: Subscription, joined: bool) -> None:
        """A client joined a shared subscription here, or left it (from the subscription tree)."""
        session = self.broker.sessions.get(subscription.client_id)
        self._member(subscription.topic_filter, subscription.client_id,
                     joined and session is not None and session.connection is not None)

    def _members_changed(self, session: Session, connected: bool) -> None:
        for subscription in session.subscriptions.values():
            if subscription.share_group is not None:
                self._member(subscription.topic_filter, session.client_id, connected)

    def _member(self, topic_filter: str, client_id: str, connected: bool) -> None:
        """Count a member of a shared subscription as connected here, or not; what the other
        nodes are told is decided at the next batch (``_collect``)."""
        members = self.awake.get(topic_filter)
        if connected:
            if members is None:
                members = self.awake[topic_filter] = set()
            members.add(client_id)
        elif members is None or client_id not in members:
            return
        else:
            members.discard(client_id)
        self.forwarding.connected_here(topic_filter, bool(members))
        self._shares_changed.add(topic_filter)
        self.store.collect()

    def connected(self, session: Session, connection: Any) -> None:
        """A client is connected: its will goes to Redis, for whichever node finds the
        connection gone should this node die; its shared subscriptions have a connected
        member here."""
        self._members_changed(session, True)
        will = connection.will
        if will is not None:
            client = connection.client
            self.store.arm_will(session.client_id, client.username if client else None, will, connection.will_delay)

    def disconnected(self, session: Session, had_will: bool) -> None:
        """The client's connection ended: its will is this node's to publish (or not), as on a
        single broker (a delayed one is saved again, with its time). Its shared subscriptions
        have one connected member fewer here."""
        self._members_changed(session, False)
        if had_will:
            self.store.delete_will(session.client_id)

    def released(self, client_id: str) -> None:
        """The client's session ended on this node."""
        self.store.give_up(client_id)

    # --- other nodes' messages --------------------------------------------------------------

    def _read_inbox(self, since: str) -> None:
        """Read this node's inbox: first what it was given before a restart and never finished
        (``since`` "0", then the last entry read), then what is new (">")."""
        if not self.started or self._reading:
            return
        self._reading = True
        self.store.read_inbox(since).addCallbacks(self._inbox_read, self._inbox_failed, callbackArgs=(since,))

    def _inbox_read(self, entries: list[InboxEntry], since: str) -> None:
        self.broker.gathered(self._handle_entries, entries)
        if since != ">":
            # The entries given before and not handled come in order: the next read goes on
            # after these (some may wait for claims, unmarked yet), then come the new ones.
            since = entries[-1][0].decode() if entries else ">"
        self._inbox_handled(None, since)

    def _handle_entries(self, entries: list[InboxEntry]) -> None:
        trimmed = 0
        for entry_id, data, stamp in entries:
            if entry_id in self._waiting:
                continue  # (read again: its message waits for a claim already)
            if data is None:  # trimmed away since it was read
                trimmed += 1
            else:
                try:
                    self._handle_entry(bytes(data), stamp, entry_id)
                except Exception:
                    # (read again, it would fail again, and stop every entry after it for good)
                    log.failure("reading the entry {entry_id} of this node's inbox: the rest of it is passed over",
                                entry_id=entry_id)
            if entry_id not in self._waiting:
                self.store.handled(entry_id)
        if trimmed:
            log.warn("{count} entries of this node's inbox were trimmed (cluster_inbox_maxlen) before they were "
                     "handled: their messages are lost", count=trimmed)

    def _inbox_handled(self, _: Any, since: str) -> None:
        self._reading = False
        self._read_inbox(since)

    def _inbox_failed(self, failure: Any) -> None:
        self._reading = False
        if self.started:
            if "NOGROUP" in failure.getErrorMessage():
                # Taken for dead while it was away, this node had its inbox dropped by the
                # survivor that adopted what it held; other nodes may have written to it since.
                log.warn("this node's inbox was dropped (taken for dead while away): made again")
                self.store.create_inbox().addErrback(lambda _: None)
            self.clock.callLater(1.0, self._read_inbox_again)

    def _read_inbox_again(self) -> None:
        """Read the entries given and not yet handled, once the store has written what it holds
        (the marks of the entries handled before an outage among it): none is handled twice."""
        self.store.flushed().addBoth(lambda _: self._read_inbox("0"))

    def _handle_entry(self, data: bytes, stamp: int, entry_id: bytes) -> None:
        # (Record by record: one that fails, to be read or routed, loses none before it, and
        # one that fails to be routed none after it.)
        for kind, first, second in unpack_records(data):
            try:
                self._handle_record(kind, first, second, stamp, entry_id)
            except Exception:
                log.failure("routing a message of the entry {entry_id} of this node's inbox: it is passed over",
                            entry_id=entry_id)

    def _handle_record(self, kind: int, first: Any, second: Any, stamp: int, entry_id: bytes) -> None:
        if kind == TARGETED or kind == HELD:  # (Redis passes these on one to an entry)
            if kind == TARGETED:  # (a HELD one was counted when it first came)
                self.stats.forwarded_in += 1
            counted = kind == HELD and self._back_from_round(first, second)
            self.deliver_targeted(first, second, stamp, entry_id, held=counted)
            return
        if kind == BARRIER:  # (what this node's inbox held before is routed: passed on in the batches so far)
            self.store.forward(first, pack_cleared(*second))
            return
        if kind == CLEARED:
            self._cleared(first, second, self._barriers.get(first))
            return
        delivery = self.broker.delivery
        back = kind == FORWARDED and first.cluster_id is not None and self.forwarding.made_here(first.cluster_id)
        if back:  # one this node sent itself (Forwarding.through_inboxes), counted then
            self.forwarding.came_back(first.sender)
        else:
            self.stats.forwarded_in += 1
        if self.expired_on_its_way(first):
            return  # (not routed: counted as received by no node, nor taken for counted by the next)
        if back:
            delivery.received_before = True
        elif kind == FORWARDED:  # routed here, but published on another node
            self.broker.stats.routed_from_nodes += 1
        # Nothing of a QoS 2 message reaches a client before the store holds that this entry
        # is handled: after a crash it is handled again, so it must not have gone out.
        delivery.routing_waits_for_store = first.qos == 2
        try:
            if kind == HANDED:
                delivery.handed(first, *second)
            elif self._moving and first.qos:
                self._route_while_moving(first, second, stamp)
            else:
                delivery.route(first, second)
        finally:
            delivery.routing_waits_for_store = delivery.received_before = False

    def _route_while_moving(self, message: Message, shares: tuple[tuple[str, str], ...], stamp: int) -> None:
        """Route a forwarded message, the sessions that moved here lately apart: to each of
        those, only if it has not had the message by the other way. (A shared subscription's
        message comes by one way only, to one node: any member here may have it.)"""
        sessions = self.broker.sessions
        moving = {c: sessions.pop(c) for c in self._moving if c in sessions}
        try:
            self.broker.delivery.route(message, ())
        finally:
            sessions.update(moving)
        if shares:
            self.broker.delivery.to_groups(message, shares)
        if moving:
            former = SubscriptionTree()
            for session in moving.values():
                for subscription in session.subscriptions.values():
                    if subscription.share_group is None:
                        former.add(subscription)
            self.deliver_formerly(message, former, stamp, direct=True)

    def _qos0_received(self, data: bytes) -> None:
        self.broker.gathered(self._route_qos0, data)

    def _route_qos0(self, data: bytes) -> None:
        stats, route = self.broker.stats, self.broker.delivery.route
        try:
            for kind, message, shares in unpack_records(data):
                self.stats.forwarded_in += 1
                stats.routed_from_nodes += 1
                try:
                    route(message, shares)
                except Exception:
                    log.failure("routing a QoS 0 message from another node: it is passed over")
        except Exception:
            log.failure("reading QoS 0 messages from another node: the rest of them are passed over")

    def expired_on_its_way(self, message: Message) -> bool:
        """Whether a message read from an inbox expired before it came (read late): not sent, as
        a queued one that expired is not [MQTT-3.3.2-5]; but for one published with an interval
        of 0, which is sent as on one broker."""
        if message.expires_at is not None and message.properties.get("message_expiry_interval") and \
                message.expired(self.clock.seconds()):
            self.broker.stats.messages_expired += 1
            return True
        return False

    def deliver_targeted(self, client_id: str, item: Queued, stamp: int, entry_id: bytes | None = None,
                         direct: bool = False, held: bool = False) -> None:
        """A message for one session (its previous owner's writes were fenced off, say), from
        an inbox entry of ``stamp``: not for the session if it was begun anew since the entry
        was made. A shared subscription's message goes to the member it was given to all the
        same (dropped, the group would not have it). While the session's claim is under way
        here, the message waits for it if it came alone in an entry of this node's inbox
        (``entry_id``), else goes through Redis to the session's owner: either way its entry is
        marked handled only once it is queued (or sent on). ``direct``: forwarded (or
        published) here for a session that moved here lately; ``held``: back from its round
        through this node's inbox for such a session, counted as had when it came. For a
        session with a ``Barrier``, either may go round or wait instead of going to it."""
        if self.expired_on_its_way(item.message):
            return
        claiming = self._claiming.get(client_id)
        if claiming is not None and entry_id is not None:
            # Its entry stays unhandled until the message is queued: a node that dies first
            # leaves it to be read again.
            self._waiting[entry_id] = self._waiting.get(entry_id, 0) + 1
            claiming.append((item, stamp, entry_id, held))
            return
        if item.share is not None:
            stamp = 0
        session = self.broker.sessions.get(client_id)
        if claiming is None and session is not None and client_id in self.store.epochs:
            if stamp and stamp < self.store.since_stamps.get(client_id, 0):
                return  # for the session's earlier life
            security = self.broker.security
            if security is not None and session.identity is not None and not security.can_read(
                    session.identity, item.message.topic):
                if item.share is not None:  # another member of its group may read it
                    self.broker.delivery.hand_on_to_group(item.message, item.share)
                return
            cluster_id = item.message.cluster_id
            # (A shared subscription's copy comes by one way only, and as well as the session's
            # own copy, if it has a subscription of its own that matches.)
            if cluster_id is not None and item.share is None and not held and \
                    not self.forwarding.first_time(client_id, cluster_id):
                return  # it came by the other way already
            if item.share is None and client_id in self._moving:
                # Routed by the subscriptions of the copy the session's previous owner keeps
                # until the routes settle (or a dead node's): what the session holds here now
                # decides, the subscriptions its client dropped or changed since included
                # [MQTT-3.10.4-2].
                message = item.message
                subs = [s for s in session.subscriptions.values() if s.share_group is None
                        and matches(s.topic_filter, message.topic) and not (s.no_local and message.sender == client_id)]
                if not subs:
                    return
                granted, as_published, ids, _ = terms(subs)
                item = Queued(message, min(granted, message.qos), message.retain and as_published, ids)
                barrier = self._barriers.get(client_id)
                if barrier is not None and cluster_id is not None:
                    if direct and self._sent_round(client_id, barrier, item, stamp):
                        return
                    if held and entry_id is not None and self._held_back(client_id, barrier, item, stamp, entry_id):
                        return
            self.broker.delivery.deliver(session, item.message, item.qos, item.retain, item.subscription_ids, item.share)
        elif direct and claiming is not None and client_id in self._barriers:
            # (The client connects here again: what comes for the session meanwhile keeps its
            # barrier, back from its round once the claim is answered.)
            cluster_id = item.message.cluster_id
            if cluster_id is not None and self.forwarding.first_time(client_id, cluster_id):
                barrier = self._barriers[client_id]
                self._ask(client_id, barrier, origin_of(cluster_id))
                self._go_round(client_id, barrier, item, stamp)
        else:  # not here (any more, or not yet): Redis passes it to the session's owner, if any
            self.stats.redirected += 1
            # (One counted as had here stays HELD: if it comes back here, it is not checked again.)
            self.store.send_on(client_id, item, stamp, HELD if held else TARGETED)

    def _back_from_round(self, client_id: str, item: Queued) -> bool:
        """A HELD record is read: whether it is one this node sent round for a session's
        ``Barrier`` (and counted as had then), which then has it on its way round no more. Any
        other, read again after a restart or from a dead node's inbox, is checked as a message
        that may have come by two ways."""
        barrier = self._barriers.get(client_id)
        cluster_id = item.message.cluster_id
        if barrier is None or cluster_id is None or cluster_id not in barrier.round:
            return False
        barrier.round.discard(cluster_id)  # (back, whether it is delivered or not)
        return True

    def _sent_round(self, client_id: str, barrier: Barrier, item: Queued, stamp: int) -> bool:
        """Whether a message forwarded (or published) here for a session with a ``Barrier`` goes
        round through this node's inbox, and so sent: while an answer is awaited (its origin is
        asked about, if it never was) or others are on their way round."""
        cluster_id = item.message.cluster_id
        assert cluster_id is not None
        self._ask(client_id, barrier, origin_of(cluster_id))
        if not barrier.asked and not barrier.round:
            return False
        self._go_round(client_id, barrier, item, stamp)
        return True

    def _go_round(self, client_id: str, barrier: Barrier, item: Queued, stamp: int) -> None:
        """Send a message round through this node's inbox: a HELD record (``_back_from_round``)."""
        barrier.round.add(item.message.cluster_id or b"")
        self.store.send_on(client_id, item, stamp, HELD)

    def _held_back(self, client_id: str, barrier: Barrier, item: Queued, stamp: int, entry_id: bytes) -> bool:
        """Whether a message back from its round waits for the previous node's answers, its entry
        unhandled meanwhile."""
        if not barrier.asked:
            if barrier.ending and not barrier.round:
                self._stop_moving(client_id)
            return False
        self._waiting[entry_id] = self._waiting.get(entry_id, 0) + 1
        barrier.held.append((item, stamp, entry_id, True))
        return True

    def _ask(self, client_id: str, barrier: Barrier, origin: bytes) -> None:
        """Ask the session's previous node about the messages of ``origin``, if not done yet."""
        if origin not in barrier.cleared and origin not in barrier.asked and barrier.previous is not None:
            # (After what this node routed to the previous node so far, in its inbox.)
            self.forwarding.send_record(barrier.previous, pack_barrier(self.node, client_id, origin))
            barrier.asked[origin] = self.clock.callLater(BARRIER_TIMEOUT, self._cleared, client_id, origin, barrier)

    def _previous_gone(self, node: str) -> None:
        """A node left, or its sessions were adopted: the sessions that moved here from it wait
        for its answers no more (a request would make its inbox again)."""
        for client_id, barrier in list(self._barriers.items()):
            if barrier.previous == node:
                barrier.previous = None
                for origin in list(barrier.asked):
                    self._cleared(client_id, origin, barrier)

    def goes_round(self, client_id: str, message: Message, qos: int, retain: bool, ids: tuple[int, ...]) -> bool:
        """Whether a message published here for a session that moved here lately goes round
        through this node's inbox (see ``Barrier``), and so sent, instead of to the session at
        once: it would overtake those published here a moment before, which went to the previous
        node."""
        barrier = self._barriers.get(client_id)
        return barrier is not None and self._sent_round(client_id, barrier, Queued(message, qos, retain, ids), 0)

    def _cleared(self, client_id: str, origin: bytes, barrier: Barrier | None) -> None:
        """The previous node has passed on what it had for the client from ``origin``, or has
        not answered in time: what waits for no other answer goes to the session."""
        if barrier is None or self._barriers.get(client_id) is not barrier or not self.started:
            return
        timer = barrier.asked.pop(origin, None)
        if timer is not None and timer.active():
            timer.cancel()
        barrier.cleared.add(origin)
        if not barrier.asked:
            held, barrier.held = barrier.held, []
            self._deliver_waiting(client_id, held)

    def deliver_formerly(self, message: Message, former: SubscriptionTree, stamp: int,
                          shares: tuple[tuple[str, str], ...] = (), everyone: bool = True,
                          direct: bool = False) -> None:
        """A message from a dead node's inbox: to each session it held that matches (only to
        a member of each of ``shares`` unless ``everyone``), here if this node adopted it, else
        passed on to the node that claimed it since. (``direct``: one forwarded here, for the
        sessions that moved here lately.)"""
        if self.expired_on_its_way(message):
            return
        by_client, groups = former.match(message.topic)
        targets: list[tuple[str, int, bool, tuple[int, ...], tuple[str, str] | None]] = []
        for m in by_client if everyone else ():
            granted, as_published, ids = m.qos, m.retain_as_published, m.subscription_ids
            if m.no_local and message.sender == m.client_id:
                # Its own message: by its subscriptions without No Local only [MQTT-3.8.3-3].
                subs = [s for s in m.subscriptions if not s.no_local]
                if not subs:
                    continue
                granted, as_published, ids, _ = terms(subs)
            targets.append((m.client_id, min(granted, message.qos), message.retain and as_published, ids, None))
        matched = set()
        for share, group in groups:  # the sending node chose that node for these groups' members
            if share not in shares:
                continue
            members = but_its_sender(list(group.members.values()), message.sender)
            if not members:
                continue
            matched.add(share)
            member = members[0]
            targets.append((member.client_id, min(member.qos, message.qos),
                            message.retain and member.retain_as_published,
                            (member.subscription_id,) if member.subscription_id else (), share))
        for client_id, qos, retain, ids, chosen in targets:
            self.deliver_targeted(client_id, Queued(message, qos, retain, ids, chosen), stamp, direct=direct)
        for share in shares:
            if share not in matched:  # its members there ended with the node: another member has it
                here = dict(self.broker.subscriptions.match(message.topic)[1]).get(share)
                self.broker.delivery.hand_on(message, share, here)

    # --- the control channel ----------------------------------------------------------------

    def _control(self, data: bytes) -> None:
        kind, _, rest = data.partition(b"\0")
        parts = rest.split(b"\0", 2 if kind in (b"R", b"K") else -1)  # (a retained message may hold a NUL)
        node = parts[0].decode()
        if kind in (b"R", b"r", b"K"):
            topic = parts[1].decode()
            if kind == b"K" and node != self.node:
                return  # (another node's change, refused: nothing changed)
            for changed in self._retained_reads:
                changed.add(topic)
            if not self.store.retained_news(node, topic, refused=kind == b"K"):
                return
            if kind == b"K":  # this node's change, refused: what Redis keeps instead
                if parts[2]:
                    self.broker.retained.store(unpack_retained(parts[2], self.clock.seconds()))
                else:
                    self.broker.retained.delete(topic)
                return
        if node == self.node:
            if kind == b"G":  # taken for dead (paused past its heartbeats): its routes went
                self.announce_all()
            return
        if kind in (b"F", b"f", b"I"):
            self._route_event(node, int(parts[2]), kind, parts[1].decode())
        elif kind == b"R":
            self.broker.retained.store(unpack_retained(parts[2], self.clock.seconds()))
        elif kind == b"r":
            self.broker.retained.delete(parts[1].decode())
        elif kind == b"C":
            # (parts[4]: whether the claim found this node alive, and so left it the will: a
            # node taken for dead while it was not, its survivor publishes it)
            self._claimed_elsewhere(parts[1].decode(), int(parts[2]), parts[3] == b"1",
                                    len(parts) < 5 or parts[4] != b"0")
        elif kind == b"B":  # a node left: what it held is adopted at once
            self.nodes.pop(node, None)
            self._previous_gone(node)
            self.survivor.left()
        elif kind == b"G":  # a dead node's sessions are adopted: its routes go
            self._route_event(node, int(parts[1]), kind, "")

    def _route_event(self, node: str, version: int, kind: bytes, topic_filter: str) -> None:
        for events in self._route_reads.get(node, ()):
            events.append((version, kind, topic_filter))
        if version > self._route_versions.get(node, 0):
            self._route_versions[node] = version
            self._change_route(node, kind, topic_filter)

    def _change_route(self, node: str, kind: bytes, topic_filter: str) -> None:
        if kind == b"G":
            self.nodes.pop(node, None)
            self._route_versions.pop(node, None)  # (silent for long already: its own events are all in)
            self.forwarding.forget(node)
            self._previous_gone(node)
            return
        self.nodes.setdefault(node, self.clock.seconds())
        if kind != b"f":
            self.forwarding.add_route(node, topic_filter, kind == b"F")
        else:
            self.forwarding.remove_route(node, topic_filter)

    def _claimed_elsewhere(self, client_id: str, epoch: int, clean: bool, will_left: bool = True) -> None:
        """Another node took a session this node held: its connection here is closed (0x8E),
        and the session's copy here forgotten (the new owner has it, from Redis)."""
        if client_id in self._claiming:  # (the answer to this node's own claim is yet to come)
            self._overtaken[client_id] = (epoch, clean)
        held = self.store.epochs.get(client_id)
        if held is not None and held < epoch:
            self._let_go(client_id, clean, will_left)

    def _fenced(self, client_id: str, epoch: int) -> None:
        """Redis refused changes to a session this node wrote at ``epoch``: another node has
        claimed it (the control channel's news may have been lost). Whether the claim left this
        node the session's will (it found this node alive) or took it (it found it dead: the
        claimant publishes it), Redis says: the news said it."""
        if self.store.epochs.get(client_id) == epoch:
            self._let_go(client_id, False, will_left=False)
            self.store.take_left_will(self.node, client_id).addCallback(
                lambda taken: self.survivor.left_will_found(client_id, taken)).addErrback(
                lambda failure: log.failure("reading the will a claim left to this node", failure))

    def _let_go(self, client_id: str, clean: bool, will_left: bool = True) -> None:
        """Close the client's connection here. The session ended if the other node's connection
        started clean, or if it was to end with its connection (Redis never had it): then the
        copy goes at once. Otherwise the copy stays until the routes have settled, so that what
        is still routed to it here is passed on (by the store, whose writes for it are refused
        now) to its new owner rather than lost."""
        session = self.broker.sessions.get(client_id)
        ended = clean or (session is not None and not session.expiry)
        self._end_barrier(client_id)
        self.store.lost(client_id)
        self.broker.let_go(client_id, ended, will_left)
        self.forwarding.forget_sender(client_id)
        if session is None:
            self.store.forgotten(client_id)
            return
        self._members_changed(session, False)  # (its connection here is detached, not closed)
        if ended:
            self._forget_copy(client_id, session, True)
        else:
            self.clock.callLater(self._settle, self._forget_copy, client_id, session, False)

    def moved_away(self, client_id: str) -> bool:
        """Whether the client's session here is a copy kept after another node claimed it."""
        return self.store.given_up(client_id)

    def _forget_copy(self, client_id: str, session: Session, ended: bool) -> None:
        self.broker.forget_session(client_id, session, ended=ended)
        if client_id not in self.store.epochs:  # (not claimed back meanwhile)
            self.store.forgotten(client_id)

    def moved_here(self, client_id: str, previous: str | None = None) -> None:
        """A session moved here (from ``previous``, a live node): while it counts as moving
        (``_moving_for``), a message it has had (what it brought among them) is not delivered to
        it again by a second way, and what is forwarded here for it does not overtake what
        ``previous`` passes on."""
        session = self.broker.sessions.get(client_id)
        brought = [*session.queue, *session.outgoing.values()] if session is not None else ()
        seen = self._moving[client_id] = {i.message.cluster_id for i in brought if i.message.cluster_id is not None}
        self._end_barrier(client_id)
        if previous is not None:
            self._barriers[client_id] = Barrier(previous)
        self.clock.callLater(self._moving_for, self._settled, client_id, seen)

    def _settled(self, client_id: str, seen: set[bytes], last: bool = False) -> None:
        """The session's time as moving is over: it counts as moving no more once no message for
        it is on its way round through the inbox (the next one would overtake it), or after
        ``_settle`` more at most (``last``)."""
        if self._moving.get(client_id) is not seen or not self.started:  # (moved here again since; stopped)
            return
        barrier = self._barriers.get(client_id)
        if barrier is not None and not last and barrier.round:
            barrier.ending = True
            self.clock.callLater(self._settle, self._settled, client_id, seen, True)
            return
        self._stop_moving(client_id)

    def _stop_moving(self, client_id: str) -> None:
        self._moving.pop(client_id, None)
        self._end_barrier(client_id)

    def _end_barrier(self, client_id: str) -> None:
        """What waits for the previous node's answers (``Barrier``) goes now."""
        barrier = self._barriers.pop(client_id, None)
        if barrier is not None:
            barrier.clear()
            self._deliver_waiting(client_id, barrier.held)

    # --- Redis coming and going ---------------------------------------------------------------

    def _redis_down(self) -> None:
        if not self.started:
            return
        self._down_since = self.clock.seconds()
        log.warn("Redis at {address} is unreachable: local clients are still served; the acknowledgements "
                 "of what Redis is to hold, new connections and messages to other nodes wait for it",
                 address=str(self.address))

    def _redis_up(self) -> None:
        if self._down_since is None:
            return
        log.info("Redis at {address} is back after {seconds:.1f}s", address=str(self.address),
                 seconds=self.clock.seconds() - self._down_since)
        self._down_since = None
        # Other nodes were cut off too and may reconnect later than this one: none is judged dead
        # before it could have reconnected and beaten again.
        self.survivor.judge_after(self.survivor.ttl_ms / 1000 + 2 * RECONNECT_MAX_DELAY)
        if self.started:
            self.survivor.register()  # (gone again: the next beat registers)
            self.announce_all()
            self._read_inbox_again()
            self.check_owned().addErrback(self.failed_rereading)

    def _subscribed(self) -> None:
        """The control channel is listened to, for the first time or again after losing its
        connection: then what was said on it meanwhile is read from Redis, the routes and the
        retained messages (the latter once this node's own changes made meanwhile are written:
        they are the newest)."""
        if not self._listening.called:
            self._listening.callback(None)
        elif self.started:  # (joining too: what it read may predate what it missed)
            self.check_owned().addErrback(self.failed_rereading)
            self.store.retained_reread()
            self.load_routes().addErrback(self.failed_rereading)
            self.store.flushed().addBoth(lambda _: self._load_retained()).addErrback(self.failed_rereading)

    @inlineCallbacks
    def check_owned(self) -> Any:
        """Let go of the sessions another node claimed while the news of it could not come (a
        node cut off, or paused, long enough to be taken for dead, its sessions adopted): an
        idle client makes no write that Redis would refuse. A thousand sessions at a time, the
        reactor free between them (its heartbeats among what it does)."""
        if self._checking_owned:
            return
        held = list(self.store.epochs.items())
        self._checking_owned = True
        try:
            for first in range(0, len(held), OWNED_AT_ONCE):
                some = held[first:first + OWNED_AT_ONCE]
                owners = yield DeferredList([self.store.locate(client_id) for client_id, _ in some],
                                            fireOnOneErrback=True, consumeErrors=True)
                for (client_id, epoch), (_, owner) in zip(some, owners):
                    if owner is not None and (owner["node"], owner["epoch"]) != (self.node, epoch):
                        self._fenced(client_id, epoch)
        finally:
            self._checking_owned = False

    def failed_rereading(self, failure: Any) -> None:
        if self.started:  # (stopping cuts the connection under it)
            log.failure("reading again what the cluster changed while this node could not hear of it", failure)

    def announce_all(self) -> None:
        """Write this node's whole set of filters again (after an outage, events may be lost)."""
        for topic_filter in self.broker.subscriptions.filters():
            self.store.route(topic_filter, True, self._shares.get(topic_filter, True))

    @inlineCallbacks
    def load_routes(self, only: str | None = None) -> Any:
        """Other nodes' filters (or ``only``'s), from Redis, in place of the replica's: after an
        outage the events of filters let go were lost too, and a node dropped meanwhile holds
        none. Each node's set is read with its version, and its events that came during the
        read (by another connection: before or after the answer was made) are applied again
        over it if they are newer."""
        forwarding = self.forwarding
        if only:
            nodes = {only}
        else:
            members, live = yield self.store.members()
            now = self.clock.seconds()
            for node in live - {self.node}:  # (known at once, not at the first heartbeat)
                self.nodes.setdefault(node, now)
            nodes = {*members, *forwarding.nodes()}
        for node in nodes - {self.node}:
            events: list[tuple[int, bytes, str]] = []
            reads = self._route_reads.setdefault(node, [])
            reads.append(events)
            try:
                version, routes = yield self.store.routes_of(node)
            finally:
                reads.remove(events)
                if not reads:
                    del self._route_reads[node]
            forwarding.replace_routes(node, routes)
            self._route_versions[node] = version  # (lower after Redis lost its data: it starts again)
            for event in events:
                self._route_event(node, *event)

    @inlineCallbacks
    def _load_retained(self) -> Any:
        """The cluster's retained messages, from Redis, in place of this node's replica (after
        an outage it missed events: deletions too). A topic whose message changed here while
        Redis was read, by an event or a client, keeps the change: it is the newer."""
        retained = self.broker.retained
        before = {message.topic: message for message in retained}
        changed: set[str] = set()
        self._retained_reads.append(changed)
        try:
            loaded = {message.topic: message for message in (yield self.store.retained())}
        finally:
            self._retained_reads.remove(changed)
        now = self.clock.seconds()
        for topic in before.keys() | loaded.keys():
            if topic in changed or self.store.retained_pending(topic) or retained.get(topic) is not before.get(
                    topic) or topic.startswith("$SYS/"):
                continue  # changed meanwhile (a deletion too), or the broker's own (never in Redis)
            message, had = loaded.get(topic), before.get(topic)
            if message is None or message.expired(now):
                retained.delete(topic)
            elif had is not None and message == had and (message.sender, message.expires_at) == (
                    had.sender, had.expires_at):
                # As far as this node can tell, the one it had (Redis keeps no cluster id).
                retained.store(message, logged=retained.logged(topic))
            else:
                retained.store(message)


__all__ = ["Cluster", "ClusterStats", "node_id"]

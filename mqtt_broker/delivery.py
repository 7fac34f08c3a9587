"""Routing and delivery, the broker's hot path: a message goes to every matching session, sent
at once or queued (in memory, or spilled to the store), tracked until acknowledged, and resent
(MQTT 3) when no acknowledgement comes.

:class:`Delivery` is a part of :class:`~mqtt_broker.broker.BrokerService` (``broker.delivery``),
which makes the state it works on and gives it references to it; a class of its own, not a base
of the service (a Twisted ``MultiService``), so that it compiles to a native class (``setup.py``).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import Logger

from .logged import shortened
from .message import Message, bare
from .session import NO_HELD_BACK, Outgoing, Queued, Session
from .stats import once_per_thousand
from .store import StoreError
from .topics import SharedGroup, SharedGroups, Subscription, Turns, but_its_sender, terms
from .wire.packets import MQTT_5

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from .auth import Security
    from .stats import Stats
    from .config import BrokerConfig
    from .history import MessageLog
    from .protocol import MQTTProtocol
    from .retained import RetainedMessages
    from .store import Store
    from .topics import SubscriptionTree

log = Logger(__name__)  # compiled, Logger() would not find the module from the stack

READ_PAGE = 1000
"""Queued messages of a session read from the store at a time without max_queued_messages."""
SPILLED_READ_RETRY = 1.0
"""Seconds before reading a session's spilled messages again after the store failed to."""
STORE_SWEEP_EVERY = 10.0
"""Seconds at least between two deletions of a session's expired messages from the store, which
reads every message it keeps for the session."""


class Delivery:
    """Routing, delivery, the queues and the acknowledgements of what is sent. Its references
    are to the state of the ``BrokerService`` that makes it, which never replaces them."""

    def __init__(self, broker: Any) -> None:
        self.config: BrokerConfig = broker.config
        self.clock: IReactorTime = broker.clock
        self.stats: Stats = broker.stats
        self.sessions: dict[str, Session] = broker.sessions
        """Every session, connected or not, by client id."""
        self.subscriptions: SubscriptionTree = broker.subscriptions
        self.retained: RetainedMessages = broker.retained
        self.store: Store | None = broker.store
        self.history: MessageLog | None = broker.history
        self.security: Security | None = broker.security
        self.cluster: Any = broker.cluster
        self.forwarding: Any = broker.cluster.forwarding if broker.cluster is not None else None
        """The cluster's forwarding (mqtt_broker.cluster.forwarding), when there is a cluster."""
        self._share_turns = Turns()
        """Per shared subscription (group, filter): the count of messages given out, whose
        remainder picks the next member."""
        self.routing_waits_for_store = False
        """While True, what ``route`` sends to a client waits for the store to make durable what
        is recorded so far (a QoS 2 PUBLISH whose packet id has just been recorded)."""
        self.through_inboxes = False
        """In a cluster, True for the next ``route`` only (which clears it): the message goes to
        each matching node through its inbox, this one's too (``Forwarding.through_inboxes``): a
        QoS 2 PUBLISH of a session Redis keeps, and a will after its client's messages."""
        self.fenced_by: str | None = None
        """With ``through_inboxes``: the client whose QoS 2 PUBLISH it is, whose session must
        still be this node's when Redis writes the records."""
        self.received_before = False
        """True for the next ``route`` only (which clears it): the message comes back from this
        node's inbox (``through_inboxes``), counted as received when it was published here."""
        self._uncommitted: dict[str, Message] = {}
        """Topic -> the retained message a QoS 2 PUBLISH kept there whose packet id the store has
        not committed yet (``_kept_uncommitted``)."""
        self._uncommitted_batch: list[Message] = []
        """Those of them kept while the store's generation was ``_uncommitted_generation``: one
        ``flushed()`` of the store covers them all."""
        self._uncommitted_generation = -1
        self.route_timer: Callable[[float], None] | None = None
        """Given the seconds the next message takes to route (a sample for the metrics), then None."""
        self._reading: Session | None = None
        """The session whose spilled messages ``_load_spilled`` asks the store for, while it asks."""
        self._rereads: dict[Session, Any] = {}
        """Session -> the call that reads its spilled messages again after a failed read."""
        self.stopped = False
        """The broker stopped (``stop``, until it starts again): its store is closed, and read no
        more. ``BrokerService.stopped`` says this."""

    # --- routing (the hot path) ---------------------------------------------------------

    def route(self, message: Message, shares: tuple[tuple[str, str], ...] | None = None) -> int:
        """Store a retained message and deliver a message to every matching session (and, in
        a cluster, forward it to the other nodes that hold a matching filter). Returns the number
        of sessions (and nodes) it was delivered, queued or forwarded to.

        ``shares``: the message was forwarded by another node of the cluster, which chose this
        node for these shared subscriptions (group, filter); it goes to this node's sessions only,
        and its origin has stored it if it is retained. With ``through_inboxes``, it goes to the
        nodes' inboxes only, and the count is of nodes."""
        timer = self.route_timer
        if timer is not None:
            self.route_timer = None
            started = time.perf_counter()
            count = self.route(message, shares)
            timer(time.perf_counter() - started)
            return count
        if message.properties and message.expires_at is None and "message_expiry_interval" in message.properties:
            # (A message from another node of a cluster comes with its expiry time.)
            message.expires_at = self.clock.seconds() + message.properties["message_expiry_interval"]
        if message.retain and not self.config.retain_available:
            message.retain = False  # (a hook's, or a will hook's: the clients were told there are none)
        elif message.retain and shares is None:
            kept = bare(message)
            self.retained.store(kept)
            # $SYS values are made afresh at start-up: a stored one would only be stale.
            if self.store is not None and not message.topic.startswith("$SYS/"):
                if message.payload:
                    self.store.save_retained(kept)
                    if self.routing_waits_for_store or self.fenced_by is not None:
                        self._kept_uncommitted(kept)
                else:
                    self.store.delete_retained(message.topic)
        # Published here: logged once, as it reaches the subscribers here (a replay asked for
        # before then has it live only), or at once if it goes to none.
        to_log = self.history is not None and (shares is None or self.received_before)
        by_client, groups = self.subscriptions.match(message.topic)
        if self.through_inboxes and self.forwarding is not None and shares is None:
            self.through_inboxes = False
            count, here = self.forwarding.through_inboxes(message, groups, bool(by_client), self.fenced_by)
            if to_log and not here:
                self._log(message)
            # Counted now, with its QoS (Publishing._routed), whenever it reaches the sessions here.
            self.stats.messages_received += 1
            return count
        if to_log:
            self._log(message)
        if self.received_before:
            self.received_before = False
        else:
            self.stats.messages_received += 1
        if self.routing_waits_for_store:
            self._wait_for_store(by_client, groups)
        moving = False
        if self.forwarding is not None:
            if message.qos and message.cluster_id is None:
                # Before a copy of a session here has it: one that moved to another node lately
                # passes it on there, where it must be known as the one forwarded there too.
                self.forwarding.identify(message)
            moving = message.cluster_id is not None and bool(self.forwarding.moving)
        sessions = self.sessions
        sender = message.sender
        count = 0
        security = self.security
        for client_id, subs, granted, as_published, ids, no_local in by_client:
            session = sessions.get(client_id)
            if session is None:
                continue
            if moving and not self.forwarding.first_time(client_id, message.cluster_id):
                continue  # moved here lately, it had this message by the other way already
            if security is not None and session.identity is not None and not security.can_read(
                    session.identity, message.topic):
                continue
            if no_local and client_id == sender:
                subs = [s for s in subs if not s.no_local]  # [MQTT-3.8.3-3]
                if not subs:
                    continue
                granted, as_published, ids, _ = terms(subs)
            qos = granted if granted < message.qos else message.qos
            if moving and self.cluster.goes_round(client_id, message, qos, message.retain and as_published, ids):
                count += 1  # (after what the session's previous node passes on: cluster.node.Barrier)
                continue
            self.deliver(session, message, qos, message.retain and as_published, ids)
            count += 1
        if shares is not None:
            return count + self.to_groups(message, shares, groups) if shares else count
        # In a cluster it chooses the members of shared subscriptions cluster-wide. Not for $SYS:
        # every node publishes the same names about itself, so each node's stay its own.
        if self.forwarding is not None and not (message.topic[0] == "$" and message.topic.startswith("$SYS/")):
            return count + self.forwarding.forward(message, groups)
        for share, group in groups:
            count += self.deliver_shared(message, share, group)
        return count

    def to_groups(self, message: Message, shares: tuple[tuple[str, str], ...], groups: SharedGroups | None = None) -> int:
        """A message another node of a cluster chose this node for, for these shared
        subscriptions: each group's, as ``to_group`` gives it. ``groups``: the topic's, matched
        already."""
        if groups is None:
            groups = self.subscriptions.match(message.topic)[1]
            if self.routing_waits_for_store:
                self._wait_for_store((), groups)
        held = dict(groups)
        # (Routed just now, on another node's clock: not checked for expiry here, or every message
        # of interval 0 would be dropped.)
        return sum([self.to_group(message, share, held.get(share)) for share in shares])

    def hand_on(self, message: Message, share: tuple[str, str], group: SharedGroup | None,
                pool: list[Subscription] | None = None) -> int:
        """A message for a shared subscription's group (one a member left unfinished, say), if it
        has not expired meanwhile: ``to_group``."""
        if message.expired(self.clock.seconds()):  # queued, it expired meanwhile [MQTT-3.3.2-5]
            self.stats.messages_expired += 1
            return 0
        return self.to_group(message, share, group, pool)

    def hand_on_to_group(self, message: Message, share: tuple[str, str]) -> int:
        """``hand_on`` to the members ``share``'s group has here (or elsewhere in a cluster)."""
        return self.hand_on(message, share, self.subscriptions.shared_group(*share))

    def to_group(self, message: Message, share: tuple[str, str], group: SharedGroup | None,
                 pool: list[Subscription] | None = None) -> int:
        """A message for a shared subscription's group, whose members here are ``group``'s: to
        one of them, or in a cluster to a member on another node if none here may have it, or
        if those here are all offline and another node has one connected (connected members
        first, as on one broker). ``pool``: theirs, as ``shared_pool`` gave it."""
        if pool is None:
            pool = self.shared_pool(message.topic, share, group, message.sender) if group is not None else []
        forwarding = self.forwarding
        if forwarding is None or message.topic.startswith("$SYS/"):  # ($SYS: each node's stays its own)
            return self._deliver_to(message, share, pool, group) if pool else 0
        if not pool:
            return forwarding.hand_on(message, share)
        if self.sessions[pool[0].client_id].connection is None and forwarding.hand_on(message, share, awake_only=True):
            return 1
        return self._deliver_to(message, share, pool, group)

    def handed(self, message: Message, shares: tuple[tuple[str, str], ...], declined: tuple[str, ...] = ()) -> int:
        """A message that other nodes, ``declined``, had no member of these shared subscriptions
        for (the last one left it unfinished, say): to a member of each here. If none here may
        have it either (none is left, or the ACL lets none read it), it is handed on to a node
        that has not declined it yet; otherwise it is dropped. (Its expiry was checked where it
        waited: on this node's clock, one handed on just after it was routed there, with an
        interval of 0, would be taken for expired.)"""
        held = dict(self.subscriptions.match(message.topic)[1])
        if self.routing_waits_for_store:
            self._wait_for_store((), [(share, held[share]) for share in shares if share in held])
        count = 0
        for share in shares:
            group = held.get(share)
            done = self.deliver_shared(message, share, group) if group is not None else 0
            if not done and self.forwarding is not None:
                done = self.forwarding.hand_on(message, share, declined)
            count += done
        return count

    def _wait_for_store(self, by_client: Any, groups: SharedGroups) -> None:
        """Every connection that may be sent the message being routed waits for the store. (Not
        through a failing disk: a stored session that is sent it at QoS 2 waits for its own
        record, ``_send``.)"""
        sessions = self.sessions
        client_ids = [match[0] for match in by_client]
        client_ids += [member.client_id for _, group in groups for member in group.connected]
        for client_id in client_ids:
            session = sessions.get(client_id)
            if session is not None and session.connection is not None:
                session.connection.wait_for_store()

    def _kept_uncommitted(self, kept: Message) -> None:
        """A QoS 2 PUBLISH of a stored session (here or in Redis) kept a retained message before
        the store has committed its packet id: until then a new subscription gets it only behind
        the store (``deliver_retained``), as the subscriptions it is routed to now do. Killed
        meanwhile, the broker restarts with the topic's previous retained message, and its
        publisher sends it again."""
        assert self.store is not None
        if self._uncommitted_generation != self.store.generation or not self._uncommitted_batch:
            stored = self.store.flushed()
            if stored.called:  # (a store that keeps every change as it is recorded)
                return
            self._uncommitted_batch = []
            self._uncommitted_generation = self.store.generation
            stored.addBoth(self._retained_committed, self._uncommitted_batch)
        self._uncommitted_batch.append(kept)
        self._uncommitted[kept.topic] = kept

    def _retained_committed(self, _: object, batch: list[Message]) -> None:
        """The store wrote (or failed to write: sent all the same, as to the subscriptions it
        was routed to) the batch of these retained messages' packet ids."""
        uncommitted = self._uncommitted
        for kept in batch:
            if uncommitted.get(kept.topic) is kept:
                del uncommitted[kept.topic]
        batch.clear()

    def _log(self, message: Message) -> None:
        assert self.history is not None
        entry = self.history.record(message, self.clock.seconds())
        if entry is None:
            return
        if self.store is not None:
            self.store.save_history(entry)
        self.forget_dropped()

    def forget_dropped(self) -> None:
        """The entries no log holds any more go from the store too (taken without a store too,
        or they pile up)."""
        assert self.history is not None
        dropped = self.history.take_dropped()
        if dropped and self.store is not None:
            self.store.drop_history(dropped)

    def deliver_shared(self, message: Message, share: tuple[str, str], group: SharedGroup) -> int:
        """One member of a shared group gets the message: connected members in turn, or an
        offline member's session if none is connected."""
        pool = self.shared_pool(message.topic, share, group, message.sender)
        return self._deliver_to(message, share, pool, group) if pool else 0

    def _deliver_to(self, message: Message, share: tuple[str, str], pool: list[Subscription],
                    group: SharedGroup | None = None) -> int:
        """``deliver_shared`` to a member of ``pool``, as ``shared_pool`` gave it (not empty) for
        ``group``: the one whose turn it is, or the next that would not drop it (too large for
        its client, a full queue, a QoS 0 subscription of a session offline), if one would not.
        Of the group's own list of connected members, only those that may have it."""
        sessions = self.sessions
        size = len(pool)
        turn = self._share_turns.next(share)
        checked = group is None or pool is not group.connected
        first: Subscription | None = None  # the first that may have it: it counts it if every one would drop it
        for step in range(size):
            member = pool[(turn + step) % size]
            if not checked and not self._may_have(member, message.topic, message.sender):
                continue
            if first is None:
                first = member
            if size == 1 or not self._drops(sessions[member.client_id], message, min(member.qos, message.qos)):
                chosen = member
                break
        else:
            if first is None:
                return 0
            chosen = first
        ids = (chosen.subscription_id,) if chosen.subscription_id else ()
        self.deliver(sessions[chosen.client_id], message, min(chosen.qos, message.qos),
                     message.retain and chosen.retain_as_published, ids, share)  # [MQTT-3.3.1-12, -13]
        return 1

    def _drops(self, session: Session, message: Message, qos: int) -> bool:
        """Whether ``deliver`` would drop the message at this QoS for the session now: larger
        than its client takes (its topic and payload alone), or not sent at once and with no
        room left: with a store (QoS 1/2), max_stored_messages of its already there (what its
        queue has no room for spills there); otherwise its queue full, by count or by
        max_queued_bytes (what expired in it not swept: if every member would drop it,
        ``deliver`` sweeps the first's)."""
        connection, config = session.connection, self.config
        if connection is not None and len(message.payload) + len(message.topic) > connection.max_send_size:
            return True
        if connection is None:
            if not qos and not config.queue_qos0_messages:
                return True
        elif connection.pending_bytes < config.max_held_bytes and not session.queue and not session.spilled and (
                not qos or len(session.outgoing) < connection.send_quota):
            return False
        if qos and self.store is not None:  # to the store: dropped past max_stored_messages
            return 0 < config.max_stored_messages <= session.spilled
        return 0 < config.max_queued_messages <= len(session.queue) or not session.takes(
            len(message.payload), config.max_queued_bytes)

    def shared_pool(self, topic: str, share: tuple[str, str], group: SharedGroup,
                    sender: str | None = None) -> list[Subscription]:
        """The members of a shared group that a message on ``topic`` (from ``sender``) may go to:
        those connected that may read it, or if none is, those whose sessions are kept; not its
        sender, if a bridge (``but_its_sender``). If the connected member whose turn is next
        may have it, the group's own list of connected members, as it is (``_deliver_to``
        passes over those that may not): a message costs the same whatever the group's size.
        Otherwise the group is gone through, member by member."""
        connected = group.connected
        if connected and self._may_have(connected[self._share_turns.peek(share) % len(connected)], topic, sender):
            return connected
        members = but_its_sender(list(group.members.values()), sender)
        sessions = self.sessions
        if self.security is not None:
            can_read = self.security.can_read
            members = [m for m in members if m.client_id not in sessions or sessions[m.client_id].identity is None
                       or can_read(sessions[m.client_id].identity, topic)]
        online = [m for m in members if m.client_id in sessions and sessions[m.client_id].connection is not None]
        return online or [m for m in members if m.client_id in sessions]

    def _may_have(self, member: Subscription, topic: str, sender: str | None) -> bool:
        """Whether a connected member of a shared group may have a message on ``topic`` from
        ``sender``: its client may read the topic, and it is not the sender's own with No Local
        (``but_its_sender``)."""
        if member.no_local and member.client_id == sender:
            return False
        security = self.security
        if security is None:
            return True
        identity = self.sessions[member.client_id].identity
        return identity is None or security.can_read(identity, topic)

    def hand_on_all(self, items: list[Queued], group_of: Callable[[str, str], SharedGroup | None]) -> None:
        """``hand_on`` for the unfinished messages of a member whose session ended: each group's
        pool is sorted out once per topic, not once per message (a thousand members and tens of
        thousands of messages held the reactor for seconds)."""
        pools: dict[tuple[tuple[str, str], str, str | None], list[Subscription]] = {}
        groups: dict[tuple[str, str], tuple[SharedGroup | None, bool]] = {}
        for item in items:
            share, message = item.share, item.message
            assert share is not None
            known = groups.get(share)
            if known is None:
                found = group_of(*share)
                no_local = found is not None and any(m.no_local for m in found.members.values())  # (see shared_pool)
                known = groups[share] = (found, no_local)
            group, no_local = known
            key = (share, message.topic if self.security is not None else "", message.sender if no_local else None)
            pool = pools.get(key)
            if pool is None:
                pool = pools[key] = [] if group is None else self.shared_pool(message.topic, share, group, message.sender)
            self.hand_on(message, share, group, pool)

    def deliver(self, session: Session, message: Message, qos: int, retain: bool,
                subscription_ids: tuple[int, ...] = (), share: tuple[str, str] | None = None) -> None:
        """Send a message to a session now, or queue it if it cannot take it now: in memory up to
        max_queued_messages, then (QoS 1/2 of a stored session) in the store only, up to
        max_stored_messages. What cannot be queued is dropped, counted in ``message.refused``."""
        connection = session.connection
        if connection is not None and connection.pending_bytes < self.config.max_held_bytes and not session.queue \
                and not session.spilled:
            if not qos:
                if connection.send_publish(message, 0, retain, 0, False, subscription_ids):
                    self.stats.messages_sent += 1
                return
            if len(session.outgoing) < connection.send_quota:
                self._send_tracked(session, Outgoing(message, qos, retain, subscription_ids, share))
                return
        elif connection is None and not qos and not self.config.queue_qos0_messages:
            return  # QoS 0 is not kept for offline sessions unless asked to
        config = self.config
        # QoS 1/2 is queued as the Outgoing it becomes when sent: one object, not two.
        item = (Outgoing if qos else Queued)(message, qos, retain, subscription_ids, share)
        room = session.has_room(item, config.max_queued_messages, config.max_queued_bytes)
        if not room and session.queue and not session.spilled and self.sweep(session):
            room = session.has_room(item, config.max_queued_messages, config.max_queued_bytes)
        bound = config.max_stored_messages
        if qos and bound and session.spilled >= bound and self.store is not None:
            self.sweep_store(session)  # (a store that answers at once makes room for this message)
            room = session.has_room(item, config.max_queued_messages, config.max_queued_bytes)
        if qos and self.store is not None and (session.spilled or not room):
            if not session.stored:  # a session that ends with its connection spills too
                session.stored = True
                self.store.save_session(session, None)
            if not bound or session.spilled < bound:
                self._item(session, item, stored=True)
                session.spilled += 1
                return
            session.dropped += 1
        elif session.enqueue(item, config.max_queued_messages, config.max_queued_bytes):
            if qos and session.stored:
                self._item(session, item, stored=True)
                session.loaded_seq = item.seq
            return
        message.refused += 1
        self.stats.messages_dropped += 1
        self._warn_full(session, 1)  # (session.dropped counted above)

    def sweep(self, session: Session) -> bool:
        """Make room in a full queue: the messages in it that expired go, as they would have
        when sent [MQTT-3.3.2-5]. Once a second at most: a queue a flood keeps full is not
        walked for each message it drops. Returns whether any went."""
        now = self.clock.seconds()
        if now - session.swept_at < 1.0:
            return False
        return self._drop_expired(session, now)

    def _drop_expired(self, session: Session, now: float) -> bool:
        """Take what expired out of a session's queue (swept now); returns whether any went."""
        session.swept_at = now
        expired = session.drop_expired(now)
        self.stats.messages_expired += len(expired)
        for item in expired:
            self.forget(session, item)
        return bool(expired)

    def sweep_store(self, session: Session) -> None:
        """Make room under max_stored_messages: the messages of the session that expired go from
        its queue and from the store, for those that come next. Every STORE_SWEEP_EVERY at most
        (counted from the last sweep of its queue in memory too)."""
        drop_expired = getattr(self.store, "drop_expired", None)
        now = self.clock.seconds()
        if drop_expired is None or session.loading or now - session.swept_at < STORE_SWEEP_EVERY:
            return
        self._drop_expired(session, now)
        session.loading = True  # (no read of the spilled messages meanwhile: it would count some twice)
        drop_expired(session.client_id, session.loaded_seq, now).addCallbacks(
            self._store_swept, self._store_sweep_failed, callbackArgs=(session,), errbackArgs=(session,))

    def _store_swept(self, count: int, session: Session) -> None:
        session.loading = False
        if self.sessions.get(session.client_id) is session and session.spilled:  # (not discarded, or cleared)
            session.spilled = max(0, session.spilled - count)
            self.stats.messages_expired += count
        if session.connection is not None:
            self.pump(session)

    def _store_sweep_failed(self, failure: Any, session: Session) -> None:
        if not failure.check(StoreError):  # (a write that failed: the store logs that once per episode)
            log.failure("cannot delete the expired messages of {client_id!r} from the store", failure,
                        client_id=shortened(session.client_id))
        self._store_swept(0, session)

    def full(self, session: Session, qos: int) -> bool:
        """Whether the retained messages a subscription of ``qos`` sends the session now would
        neither go at once nor wait in its queue in memory: a long run of deliveries stops there
        rather than drop them one by one, holding up the reactor. They are not spilled to the
        store either (``deliver_retained``): each filter of a SUBSCRIBE sends them again, and "#"
        a thousand times over in 4 KB would put a million copies there in one read. (Its bytes
        bound is the caller's, message by message: ``too_large_to_queue``.)"""
        config = self.config
        connection = session.connection
        if connection is not None and connection.pending_bytes < config.max_held_bytes and not session.queue \
                and not session.spilled:
            return False
        if config.max_queued_messages and len(session.queue) >= config.max_queued_messages:
            return True
        return not qos and connection is None and not config.queue_qos0_messages

    def deliver_retained(self, session: Session, message: Message, qos: int, subscription_ids: tuple[int, ...]) -> None:
        """``deliver`` a retained message a new subscription matches, which the session is not
        ``full`` for and not ``too_large_to_queue``. While the session's backlog waits in the
        store, a QoS 1/2 one waits in memory, behind what is there and ahead of what is stored:
        only the messages its subscriptions had before keep their order behind those; the new
        subscription has none to keep with them, and what it gets live comes after. One a QoS 2
        PUBLISH kept goes behind the store until it has committed its packet id."""
        if self._uncommitted and self._uncommitted.get(message.topic) is message and session.connection is not None:
            session.connection.wait_for_store()
        if not (qos and session.spilled):
            self.deliver(session, message, qos, True, subscription_ids)
            return
        item = Outgoing(message, qos, True, subscription_ids)
        # Numbered after the backlog, it is left out of ``loaded_seq``: only an empty queue is read
        # into, and once sent the store has it in flight, not queued. But a read of the backlog
        # under way (``loading``) could bring it back a second time: then the store has it only
        # once it is sent, with its packet id (``_send_tracked``).
        if not session.loading:
            self._item(session, item, stored=True)
        session.push(item)

    def too_large_to_queue(self, session: Session, message: Message) -> bool:
        """Whether a retained message would wait in the session's queue and go past
        max_queued_bytes there, once what expired in it went (as ``deliver`` sweeps it)."""
        size, limit = len(message.payload), self.config.max_queued_bytes
        return not session.takes(size, limit) and (not self.sweep(session) or not session.takes(size, limit))

    def drop(self, session: Session, count: int) -> None:
        """``count`` messages dropped for the session at once (see ``full``)."""
        self.stats.messages_dropped += count
        session.dropped += count
        self._warn_full(session, count)

    @staticmethod
    def _warn_full(session: Session, count: int) -> None:
        """A warning for the first message dropped for a session, then one per thousand."""
        if once_per_thousand(session.dropped, count):
            log.warn("queue of {client_id!r} is full: {dropped} messages dropped so far",
                     client_id=shortened(session.client_id), dropped=session.dropped)

    def _item(self, session: Session, item: Queued, stored: bool = False) -> Queued:
        """Number a QoS 1/2 message of a stored session; ``stored``: record it as queued now
        (otherwise ``_send_tracked`` records it with its packet id)."""
        if session.stored:
            item.seq = session.next_seq
            session.next_seq += 1
            if stored:
                assert self.store is not None
                self.store.add_delivery(session.client_id, item, None)
        return item

    def forget(self, session: Session, item: Queued) -> None:
        """A delivery is done with (acknowledged, expired or dropped): the store forgets it."""
        if item.seq and session.stored:
            assert self.store is not None
            self.store.remove_delivery(session.client_id, item.seq)

    def _send_tracked(self, session: Session, item: Queued) -> None:
        """Send a QoS 1/2 message with a new packet id and track it until acknowledged. Of a
        stored session, a numbered one is in the store already (queued); one not numbered yet
        is numbered and recorded now."""
        connection = session.connection
        assert connection is not None
        packet_id = session.allocate_packet_id()
        if session.stored:
            # On the wire only once the store has it with its packet id: after a crash it is
            # sent again with the same id, which the client knows [MQTT-4.3.3-2, -4.4.0-1].
            assert self.store is not None
            if item.seq:
                self.store.update_delivery(session.client_id, item.seq, packet_id, False)
            else:
                self.store.add_delivery(session.client_id, self._item(session, item), packet_id)
            connection.wait_for_store(item.qos == 2)
        if not connection.send_publish(item.message, item.qos, item.retain, packet_id, False, item.subscription_ids):
            self.forget(session, item)
            return  # too large for the client: discarded as if delivered [MQTT-3.1.2-25]
        if type(item) is not Outgoing:
            item = Outgoing(item.message, item.qos, item.retain, item.subscription_ids, item.share, item.seq)
        item.sent_at = self.clock.seconds()  # type: ignore[attr-defined]
        session.track(packet_id, item)  # type: ignore[arg-type]
        stats = self.stats
        stats.messages_sent += 1
        stats.sent_by_qos[item.qos] += 1
        if session.retry_call is None and self.config.retry_interval and connection.version != MQTT_5:
            self.schedule_retry(session)

    def resume(self, session: Session) -> None:
        """After CONNACK: resend what was in flight [MQTT-4.4.0-1], then send what was queued."""
        connection = session.connection
        assert connection is not None
        session.unsent = 0
        session.held_back = NO_HELD_BACK
        if session.outgoing:
            self._resend(session, connection)
        self.pump(session)

    def _resend(self, session: Session, connection: MQTTProtocol) -> None:
        if session.stored:  # what was recorded last may not be written yet
            connection.wait_for_store(any(out.qos == 2 for out in session.outgoing.values()))
        now = self.clock.seconds()
        # A PUBREL is never held back [MQTT-3.3.4-10], and its message is in flight until PUBCOMP:
        # the PUBRELs take their places of the Receive Maximum first [MQTT-4.9.0-2].
        resent = sum(1 for out in session.outgoing.values() if out.released)
        for packet_id, out in list(session.outgoing.items()):
            out.sent_at = now
            out.unsent = False  # decided afresh for this connection's Receive Maximum
            if out.released:
                connection.send_pubrel(packet_id, again=True)
            elif resent >= connection.send_quota:
                session.hold_back(packet_id, out)  # the client's Receive Maximum [MQTT-4.9.0-2]: sent as acks come
            elif connection.send_publish(out.message, out.qos, out.retain, packet_id, True, out.subscription_ids):
                resent += 1
            elif self._release_unsendable(session, connection, packet_id, out):
                resent += 1
            else:
                del session.outgoing[packet_id]
                self.forget(session, out)
        if session.outgoing:
            self.schedule_retry(session)

    def pump(self, session: Session) -> None:
        """Send queued messages while the connection and its in-flight window allow; expired
        messages are dropped, never delivered [MQTT-3.3.2-5]."""
        connection = session.connection
        now = None
        # While writes are gathered, the transport cannot say it is full: stop past max_held_bytes,
        # so that the write that follows fills it and it asks to resume us later.
        held = self.config.max_held_bytes
        # Read rights again as each message goes: they may have changed since it was queued (a
        # reload, another user taking the session over, a session queued for before a restart).
        security = self.security
        identity = session.identity if security is not None else None
        while True:
            queue = session.queue
            while queue and connection is not None and connection.pending_bytes < held:
                head = queue[0]
                if head.qos and len(session.outgoing) >= connection.send_quota:
                    return
                session.dequeue()
                expires_at = head.message.expires_at
                if expires_at is not None:
                    now = now or self.clock.seconds()
                    if expires_at <= now:
                        self.stats.messages_expired += 1
                        self.forget(session, head)
                        continue
                if identity is not None and security is not None and not security.can_read(
                        identity, head.message.topic):
                    self.forget(session, head)
                    if head.share is not None:  # (a member that may read it may have it)
                        self.hand_on_to_group(head.message, head.share)
                    continue
                if head.qos:
                    self._send_tracked(session, head)
                elif connection.send_publish(head.message, 0, head.retain, 0, False, head.subscription_ids):
                    self.stats.messages_sent += 1
            # Spilled messages the store reads at once (a MemoryStore) are sent in this same loop.
            if queue or not session.spilled or session.loading or not self._load_spilled(session):
                return

    def _load_spilled(self, session: Session) -> bool:
        """Bring the next spilled messages of a session back from the store into its queue.
        True if the store answered at once with some: then they are not pumped from within the
        read (a store that always answers at once would take that recursion past the stack's
        depth), the caller sends them."""
        assert self.store is not None
        session.loading = True
        config = self.config
        limit = config.max_queued_messages or READ_PAGE
        # (Room for one at least, whatever its size: as _spilled_loaded keeps them.)
        max_bytes = max(1, config.max_queued_bytes - session.queued_bytes) if config.max_queued_bytes else 0
        self._reading = session
        try:
            self.store.load_queued(session.client_id, session.loaded_seq, limit, max_bytes).addCallbacks(
                self._spilled_loaded, self._spilled_failed, callbackArgs=(session,), errbackArgs=(session,))
        finally:
            self._reading = None
        return not session.loading and bool(session.queue)

    def _spilled_loaded(self, items: list[Queued], session: Session) -> None:
        session.loading = False
        if self.sessions.get(session.client_id) is not session or not session.spilled:
            return  # discarded, or cleared, while reading
        if not items:
            session.spilled = 0
        else:
            max_bytes = self.config.max_queued_bytes
            if max_bytes:  # memory holds max_queued_bytes (and at least one message): the rest stays stored
                size, kept = session.queued_bytes, 0
                for item in items:
                    size += len(item.message.payload)
                    if size > max_bytes and kept:
                        break
                    kept += 1
                items = items[:kept]
            session.push(*items)
            session.loaded_seq = items[-1].seq
            session.spilled -= len(items)
        if self._reading is not session:  # (read at once: _load_spilled's caller pumps)
            self.pump(session)

    def _spilled_failed(self, failure: Any, session: Session) -> None:
        if not failure.check(StoreError):  # (a write that failed: the store logs that once per episode)
            log.failure("cannot read the queued messages of {client_id!r} back from the store", failure,
                        client_id=shortened(session.client_id))
        # Read again later: a session with nothing else in flight may never be pumped again.
        # ``loading`` stays set until then, so that nothing else starts a read meanwhile.
        if not self.stopped:
            self._rereads[session] = self.clock.callLater(SPILLED_READ_RETRY, self._read_spilled_again, session)

    def _read_spilled_again(self, session: Session) -> None:
        del self._rereads[session]
        session.loading = False
        if self.sessions.get(session.client_id) is session:
            self.pump(session)

    def stop(self) -> None:
        """The broker stops: no more reads of a closed store (``stopped`` until it starts again)."""
        self.stopped = True
        for call in self._rereads.values():
            call.cancel()
        self._rereads.clear()

    def acknowledged(self, session: Session, packet_id: int) -> bool:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) ended a message; False if it was not in flight."""
        out = session.untrack(packet_id)
        if out is None:
            return False
        if out.unsent:
            session.unsent -= 1
        self.forget(session, out)
        connection = session.connection
        # One held back goes if a slot is free: an acknowledgement of one held back (the client
        # had it from the connection before) frees none [MQTT-4.9.0-2].
        if session.unsent and connection is not None and len(session.outgoing) - session.unsent < connection.send_quota:
            if self._send_held_back(session, connection):
                return True
        if session.queue or session.spilled:
            self.pump(session)
        return True

    def _send_held_back(self, session: Session, connection: MQTTProtocol) -> bool:
        """Send the next message held back, in the order they were held back. Returns whether
        one went (or, for one its client may no longer read, its PUBREL)."""
        held, outgoing = session.held_back, session.outgoing
        sent = False
        while held:
            next_id = held.popleft()
            out = outgoing.get(next_id)
            if out is None or not out.unsent:
                continue  # acknowledged or released since (its id may name a message sent since)
            if self._unreadable(session, connection, next_id, out):
                if next_id in outgoing:  # released: a PUBREL went
                    sent = True
                    break
                continue
            out.unsent = False
            session.unsent -= 1
            if session.stored:  # its record may not be written yet
                connection.wait_for_store(out.qos == 2)
            if connection.send_publish(out.message, out.qos, out.retain, next_id, True, out.subscription_ids) \
                    or self._release_unsendable(session, connection, next_id, out):
                sent = True
                break
            del outgoing[next_id]  # dropped, as if delivered [MQTT-3.1.2-25]
            self.forget(session, out)
        if not session.unsent:
            session.held_back = NO_HELD_BACK
        return sent

    def _unreadable(self, session: Session, connection: MQTTProtocol, packet_id: int, out: Outgoing) -> bool:
        """Whether a message in flight, to be sent again, may no longer be read by its client (a
        reload took the right away since it was first sent): then it is not. A QoS 1 one is
        dropped (handed to another member of its shared group), a QoS 2 one released as
        ``_release_unsendable`` releases it: the client may hold its packet id."""
        security, identity = self.security, session.identity
        if security is None or identity is None or security.can_read(identity, out.message.topic):
            return False
        if not self._release_unsendable(session, connection, packet_id, out):
            del session.outgoing[packet_id]
            if out.unsent:
                session.unsent -= 1
            self.forget(session, out)
            if out.share is not None:
                self.hand_on_to_group(out.message, out.share)
        return True

    def _release_unsendable(self, session: Session, connection: MQTTProtocol, packet_id: int, out: Outgoing) -> bool:
        """A QoS 2 message sent before that no longer fits the client's Maximum Packet Size
        (its topic alias gone with the connection, a smaller maximum) is dropped as if delivered
        [MQTT-3.1.2-25], but the client may hold its packet id until a PUBREL [MQTT-4.3.3-10]:
        one goes, and the id is free once the PUBCOMP comes (0x92 from a client that never had
        the message). Returns False for QoS 1, whose id the client holds nothing for."""
        if out.qos != 2:
            return False
        if self.released(session, packet_id):
            connection.wait_for_store(exact=True)
        connection.send_pubrel(packet_id, again=True)
        return True

    def released(self, session: Session, packet_id: int) -> bool:
        """PUBREC for an outgoing QoS 2 message: from now on only PUBCOMP is awaited. Returns
        whether the store records it (then the PUBREL waits for the store)."""
        out = session.outgoing[packet_id]
        out.released = True
        if out.unsent:
            out.unsent = False
            session.unsent -= 1
        if out.seq and session.stored:
            assert self.store is not None
            self.store.update_delivery(session.client_id, out.seq, packet_id, True)
            return True
        return False

    def await_pubrel(self, session: Session, packet_id: int) -> bool:
        """An inbound QoS 2 message is being routed; until its PUBREL, a resend is not routed
        again. Returns whether the store records it."""
        session.expect_pubrel(packet_id)
        if session.stored:
            assert self.store is not None
            self.store.add_pubrel(session.client_id, packet_id)
            return True
        return False

    def pubrel_received(self, session: Session, packet_id: int) -> bool:
        """PUBREL for an inbound QoS 2 message; False if none was awaited with that id."""
        if packet_id not in session.awaiting_pubrel:
            return False
        session.awaiting_pubrel.discard(packet_id)
        if session.stored:
            assert self.store is not None
            self.store.remove_pubrel(session.client_id, packet_id)
        return True

    def remaining_expiry(self, message: Message) -> int | None:
        """Seconds left of a message's expiry interval, rounded up, for forwarding [MQTT-3.3.2-6]:
        0 for one sent on at once with the interval 0 it was published with."""
        if message.expires_at is None:
            return None
        # (Less a millisecond: a float's rounding would make an interval sent on at once one more.)
        left = max(0, math.ceil(message.expires_at - self.clock.seconds() - 0.001))
        # Never more than it came with: in a cluster, ``expires_at`` may be another node's clock
        # time, a little ahead of this one's.
        given = message.properties.get("message_expiry_interval")
        return left if given is None or left <= given else given

    def schedule_retry(self, session: Session) -> None:
        """MQTT 3 only: resend what stays unacknowledged after retry_interval (MQTT 5 resends
        only on reconnect [MQTT-4.4.0-1])."""
        if self.config.retry_interval and session.retry_call is None and session.connection is not None \
                and session.connection.version != MQTT_5:
            session.retry_call = self.clock.callLater(self.config.retry_interval, self._retry, session)

    def _retry(self, session: Session) -> None:
        """Resend QoS 1/2 messages unacknowledged for retry_interval (MQTT 3 only)."""
        session.retry_call = None
        connection = session.connection
        if connection is None or not session.outgoing:
            return
        if connection.paused:
            # What was sent before has not left yet (its socket takes nothing): a copy more would
            # only be held behind it, without bound for a client that never reads.
            session.retry_call = self.clock.callLater(self.config.retry_interval, self._retry, session)
            return
        now = self.clock.seconds()
        deadline = now - self.config.retry_interval
        dropped = False
        for packet_id, out in list(session.outgoing.items()):
            if out.sent_at <= deadline:
                if out.released:
                    connection.send_pubrel(packet_id, again=True)
                elif self._unreadable(session, connection, packet_id, out):
                    if packet_id not in session.outgoing:
                        dropped = True
                        continue
                else:
                    connection.send_publish(out.message, out.qos, out.retain, packet_id, True)
                if out.unsent:
                    out.unsent = False
                    session.unsent -= 1
                out.sent_at = now
        if session.outgoing:
            oldest = min(out.sent_at for out in session.outgoing.values())
            session.retry_call = self.clock.callLater(
                max(oldest + self.config.retry_interval - now, 0.001), self._retry, session)
        if dropped and (session.queue or session.spilled):
            self.pump(session)

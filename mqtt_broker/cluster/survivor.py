"""What a node of a cluster does about the others dying.

Each node beats in Redis (a key with a TTL); one silent past ``cluster_missed_heartbeats``
beats is dead, and the survivor chosen for it (the lowest id of the live nodes) adopts what it
held: its sessions, its connected clients' wills, and what is left in its inbox. A restarted
node takes back its own sessions the same way. Exactly one node adopts a session: the claim in
Redis succeeds only while the dead node still holds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from ..message import Client
from ..store import StoredWill
from ..topics import SubscriptionTree
from ..wire import MQTT_5
from .codec import BARRIER, CLEARED, FORWARDED, HELD, TARGETED, unpack_records, unpack_will
from .replies import TakenWill

if TYPE_CHECKING:
    from .node import Cluster

log = Logger()


class Survivor:
    """The heartbeats of one node, and its adoption of what dead nodes (and itself, before a
    restart) held."""

    def __init__(self, cluster: Cluster) -> None:
        config = cluster.broker.config
        self.cluster = cluster
        self.ttl_ms = int(config.cluster_heartbeat * config.cluster_missed_heartbeats * 1000)
        """How long a node's heartbeat key lives: silent that long, it is dead."""
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = cluster.clock
        self._judge_after = 0.0
        """Clock time before which no node is judged dead (after this node's own outage)."""
        self._adopting: set[str] = set()
        self.answered_at = 0.0
        """Clock time of the last heartbeat Redis answered: a Redis that stalls keeps the
        connection up and answers nothing (see ``Cluster.unready``)."""

    def start(self) -> None:
        """Beat from now on; judge others once they could have beaten since this node joined."""
        self.answered_at = self.cluster.clock.seconds()  # (the joining's registration just was)
        self.judge_after(self.ttl_ms / 1000)
        self._heartbeat.start(self.cluster.broker.config.cluster_heartbeat, now=False)

    def stop(self) -> None:
        """Beat no more (the node leaves)."""
        if self._heartbeat.running:
            self._heartbeat.stop()

    def judge_after(self, seconds: float) -> None:
        """Take no node for dead in the next ``seconds`` (it may not have been able to beat)."""
        self._judge_after = self.cluster.clock.seconds() + seconds

    def left(self) -> None:
        """A node said it left: what it held is adopted at once, without waiting for its
        heartbeat key to expire."""
        self.cluster.clock.callLater(0, lambda: self.check_nodes(True).addErrback(self.failed))

    def failed(self, failure: Any) -> None:
        if self.cluster.started:  # (stopping cuts the connection under it)
            log.failure("checking the cluster's nodes", failure)

    def _beat(self) -> None:
        cluster = self.cluster
        if not cluster.redis.up:
            return
        # (a member again if it was taken for dead and dropped: paused longer than its lives)
        self.register()
        cluster.leases.renew()
        cluster.redis.ping_subscribed()
        self.check_nodes().addErrback(self.failed)

    def register(self) -> None:
        """Join the members again, and beat. A node that was not a member any more (taken for
        dead while paused, and dropped) writes its routes again: they went with it. One whose
        id another process beats with (it took this one for dead) stops."""
        def answered(result: tuple[bool, bool]) -> None:
            cluster = self.cluster
            held, added = result
            if not held:
                if cluster.ready.called:  # (while joining: the join waits for the id)
                    cluster.id_taken()
                return
            silent = cluster.clock.seconds() - self.answered_at > self.ttl_ms / 1000
            self.answered_at = cluster.clock.seconds()
            if added and cluster.started:
                cluster.announce_all()
            if silent and cluster.started:  # (paused long enough to be taken for dead: who holds its sessions?)
                cluster.check_owned().addErrback(cluster.failed_rereading)
        self.cluster.store.register(self.ttl_ms).addCallbacks(answered, lambda _: None)

    @inlineCallbacks
    def check_nodes(self, now_judge: bool = False) -> Any:
        """Learn the nodes that joined, and adopt what the dead ones held, if this node is the
        survivor chosen for it (the lowest id of the live nodes)."""
        cluster = self.cluster
        try:
            members, live = yield cluster.store.members()
        except Exception:
            return
        now = cluster.clock.seconds()
        nodes, me = cluster.nodes, cluster.node
        for member in live - {me} - set(nodes):
            nodes[member] = now
            yield cluster.load_routes(member)
        for member in set(nodes) - live:
            del nodes[member]
        if now < self._judge_after and not now_judge:
            return
        dead = [m for m in members if m not in live and m != me]
        if dead and min(live | {me}) == me:
            for member in dead:
                yield self.adopt(member)

    @inlineCallbacks
    def adopt(self, dead: str) -> Any:
        """Take every session ``dead`` held (this node's own id: those it held before a
        restart), publish the wills of its clients that were connected, and deliver what is left
        in its inbox to the sessions it held, wherever they are now. Fires when done, or at once
        if this adoption is under way already."""
        if dead in self._adopting:
            return
        self._adopting.add(dead)
        cluster = self.cluster
        broker, store, here = cluster.broker, cluster.store, cluster.node
        try:
            clients = yield store.clients_of(dead)
            former = SubscriptionTree()
            """The subscriptions of every session the dead node held, for its inbox."""
            adopted = 0
            for client_id in clients:
                if client_id in broker.sessions and dead == here:
                    continue
                claim = yield store.claim(client_id, False, broker.config.max_queued_messages, dead,
                                          broker.config.max_queued_bytes)
                if claim is None and dead != here and (yield store.node_alive(dead)):
                    break  # (taken for dead, it beat again: what it holds is its own)
                if claim is None:  # another node claimed it meanwhile (its client reconnected)
                    # (left while the dead node looked alive: it never published it)
                    self.left_will_found(client_id, (yield store.take_left_will(dead, client_id)))
                    if dead != here:
                        for subscription in (yield store.subscriptions_of(client_id)):
                            former.add(subscription)
                    continue
                local = broker.sessions.get(client_id)
                if local is not None and local.connection is not None:
                    # Its client connected here meanwhile, and its claim came first: the session
                    # is its connection's, whose will (taken out of Redis by this claim) goes back.
                    cluster.connected(local, local.connection)
                    if claim.will_id is not None:
                        store.will_done(claim.will_id)
                    continue
                if claim.will is not None:
                    # (kept even if its client is connecting here: the connection, once it
                    # attaches, cancels it, and one refused leaves it due [MQTT-3.1.3-9])
                    self.will_found(client_id, claim.will, ended=claim.session is None,
                                    expiry=claim.session.expiry if claim.session is not None else 0,
                                    taken=claim.will_id)
                if claim.session is None:
                    store.give_up(client_id)
                    continue
                for subscription in claim.session.subscriptions.values():
                    former.add(subscription)
                if client_id in broker.sessions:  # a copy from before the dead node had it: stale
                    broker.forget_session(client_id)
                if not broker.take_session(claim.session, claim.disconnected_at):
                    broker.wills.end(client_id, publish=True)  # (its session ended while it waited)
                # (its own sessions, taken back at a restart, too: the inbox entries it reads
                # again may hold what they have, the mark of an entry dropped as a copy lost)
                cluster.moved_here(client_id)
                adopted += 1
            yield store.flushed()  # (a will this node finished since is not taken for one it did not)
            wills = yield store.take_wills(dead)
            if dead != here:  # (and its own, which a step of an earlier adoption took, its answer lost)
                wills += yield store.take_wills(here)
            for taken in wills:
                # A will the node took (a dead node's session's) and did not finish: as it would have.
                session = broker.sessions.get(taken.client_id)
                self.will_found(taken.client_id, taken.will, ended=taken.ended, expiry=taken.expiry, taken=taken.id,
                                connecting=taken.back or session is not None and session.connection is not None)
            if dead != here:
                cluster.stats.adopted += adopted
                log.info("adopted {count} sessions of node {dead}, which is gone", count=adopted, dead=dead)
                told = yield self._drain(dead, former, 0)
                # Nodes that had not yet heard of the death may still have written to the dead
                # node's inbox: read it again once its routes are gone everywhere, then drop it.
                # A node back meanwhile (a pause over) keeps what it has announced and been sent
                # since: its routes, its inbox, its membership.
                if (yield store.forget_node(dead)):
                    yield deferLater(cluster.clock, 2 * self.ttl_ms / 1000, lambda: None)
                    if not (yield store.node_alive(dead)):
                        yield self._drain(dead, former, told)
                        if (yield store.drop_node(dead)):
                            return
                log.info("node {dead} is alive again: what it holds now is its own", dead=dead)
            elif adopted:
                log.info("took back {count} sessions of this node from before its restart", count=adopted)
        finally:
            self._adopting.discard(dead)

    @inlineCallbacks
    def _drain(self, dead: str, former: SubscriptionTree, told: int) -> Any:
        """Deliver what is left in a dead node's inbox: what it was given and did not finish,
        then what it was never given. Each entry is marked handled in the batch that delivers it,
        so a survivor that dies meanwhile leaves the rest to the next one. A node that beats
        again (taken for dead, it was paused) reads the rest itself. The entries trimmed before
        they were handled are told (but for the ``told`` first never given); returns how many
        were never given, once the inbox is read to its end."""
        cluster = self.cluster
        store = cluster.store
        cursor = "0-0"
        trimmed = 0
        for _ in range(1_000_000):  # bounded: an inbox holds at most cluster_inbox_maxlen entries
            if (yield store.node_alive(dead)):
                break
            cursor, entries = yield store.take_inbox(dead, cursor)
            for entry_id, data, stamp in entries:
                if data is None:
                    trimmed += 1
                else:
                    try:
                        self._deliver_entry(bytes(data), stamp, former)
                    except Exception:  # (one damaged entry must not leave the rest of the inbox)
                        log.failure("reading the entry {entry_id} of {dead}'s inbox: the rest of it is passed over",
                                    entry_id=entry_id, dead=dead)
                store.handled(entry_id, dead)
            yield store.flushed()
            if not entries and cursor == "0-0":
                unread = yield store.trimmed_unread(dead)
                trimmed += max(unread - told, 0)
                told = unread
                break
        if trimmed > 0:
            log.warn("{count} entries of node {dead}'s inbox were trimmed (cluster_inbox_maxlen) before they were "
                     "handled: their messages are lost", count=trimmed, dead=dead)
        return told

    def _deliver_entry(self, data: bytes, stamp: int, former: SubscriptionTree) -> None:
        cluster = self.cluster
        for kind, first, second in unpack_records(data):
            try:
                if kind == TARGETED or kind == HELD:  # (a HELD one checked as any: its node is gone)
                    cluster.deliver_targeted(first, second, stamp)
                elif kind == BARRIER or kind == CLEARED:
                    continue  # (a BARRIER's asker stopped waiting long ago; a CLEARED answered the dead node)
                else:
                    cluster.deliver_formerly(first, former, stamp, shares=second if kind == FORWARDED else second[0],
                                             everyone=kind == FORWARDED)
            except Exception:
                log.failure("delivering a message of a dead node's inbox: it is passed over")

    def left_will_found(self, client_id: str, taken: TakenWill | None) -> None:
        """The will a claim left to a node that never heard of it (``store.take_left_will``'s
        answer), if any, which the claimant's connection made due: published now, or dropped if
        delayed (its client came back within the delay [MQTT-3.1.3-9])."""
        if taken is not None:
            self.will_found(client_id, taken.will, ended=taken.ended, expiry=0, connecting=True, taken=taken.id)

    def will_found(self, client_id: str, data: bytes, ended: bool, expiry: int, connecting: bool = False,
                   delayed_only: bool = False, taken: int | None = None) -> None:
        """A will no live node will publish: its client's connection was on a node that is dead
        (or on this node before a restart), so it ended then [MQTT-3.1.2-8]; or, ``delayed_only``,
        a delayed one a live previous owner left to a new connection that went. Published now if
        its delay is 0 or the session ends; dropped if the client is connecting again (it came
        back within the delay [MQTT-3.1.3-9]: ``connecting``); otherwise due after its delay, or
        at the time a delayed will was given. ``delayed_only``: only if it had a delay.
        ``taken``: the will's id in Redis (``RedisStore.wills_in_hand``), marked done in the batch
        that publishes, keeps or drops it."""
        message, username, delay, due = unpack_will(data)
        if delayed_only and due is None and not delay:
            return
        store = self.cluster.store
        done = (lambda: store.will_done(taken)) if taken is not None else None
        broker = self.cluster.broker
        message.sender = client_id
        client = Client(client_id=client_id, username=username, peer="", protocol_version=MQTT_5,
                        clean_start=False, keep_alive=0)
        if ended or (due is None and not delay):
            broker.wills.publish(client, message, then=done)
            return
        if not connecting:
            due = due if due is not None else self.cluster.clock.seconds() + min(delay, expiry)
            broker.wills.schedule(client, message, due)
            # In the session in Redis again: for the next node, should this one die first.
            store.save_will(StoredWill(client_id, username, message, due))
        if done is not None:
            done()


__all__ = ["Survivor"]

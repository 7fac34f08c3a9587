"""The wills of clients whose connections ended other than by a normal DISCONNECT: published at
once, or after their Will Delay Interval unless the client connects again first or its session
ends sooner [MQTT-3.1.3-9], only if its client may still publish to the topic when it goes, and
as the will hooks decide. In a cluster, a will follows its client's QoS 2 messages still on
their way to this node's subscribers through its inbox."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .auth import Identity
from .deadlines import Deadlines
from .logged import shortened
from .message import Client, Message, bare, unsendable
from .store import StoredWill
from .topics import reserved

if TYPE_CHECKING:
    from .broker import BrokerService

log = Logger()


class Wills:
    """The wills of one broker, and those waiting for their delay (by client id)."""

    def __init__(self, broker: BrokerService) -> None:
        self.broker = broker
        self._delayed: dict[str, tuple[Any, Client, Message, Identity | None]] = {}
        """Client id -> (its entry in ``_due_times``, or None while a cluster confirms it is due;
        the client; the will; the connection's identity)."""
        self._due_times = Deadlines(broker.clock, self._due, WILLS_PUBLISHED_PER_TURN)
        """The delays of the wills waiting, on one timer: a fleet's come due together (the
        clients a stop closed), published WILLS_PUBLISHED_PER_TURN a turn of the reactor."""
        self._deciding: dict[str, _Deciding] = {}

    def __len__(self) -> int:
        return len(self._delayed)

    def __contains__(self, client_id: object) -> bool:
        """Whether the client's will waits for its delay."""
        return client_id in self._delayed

    def __iter__(self) -> Iterator[str]:
        return iter(self._delayed)

    def publish(self, client: Client, will: Message, identity: Identity | None = None,
                then: Callable[[], None] | None = None) -> None:
        """Publish a client's will, if the client may still publish to its topic (never to
        ``$SYS``): the rules may have changed since its CONNECT (a reload), as Mosquitto checks a
        will when it sends it. ``identity``: the connection's; without it (a will restored from
        the store, or from another node of a cluster), the rules of the client's user name apply.
        ``then`` is called once it is published or refused, in the same turn."""
        broker = self.broker
        cluster = broker.cluster
        # Decided now: a will hook may answer after the session has gone.
        through_inboxes = cluster is not None and cluster.will_follows(client.client_id)
        security = broker.security
        if reserved(will.topic) or security is not None and not security.can_publish(
                identity or Identity(client_id=client.client_id, username=client.username), will.topic):
            # (As for a PUBLISH. A bridge's will is on $SYS, as Mosquitto names it: its CONNECT
            # is accepted.)
            log.info("will of {client_id!r} to {topic!r} not published: not allowed",
                     client_id=shortened(client.client_id), topic=shortened(will.topic))
        elif not broker.hooks.has_will:
            broker.stats.wills_published += 1
            self._route(will, through_inboxes)
        else:
            deciding = self._deciding.get(client.client_id)
            if deciding is None:
                deciding = self._deciding[client.client_id] = _Deciding()
            deciding.wills += 1
            broker.hooks.decide("will", client, will).addCallback(self._decided, will, client, through_inboxes, then)
            return
        if then is not None:
            then()

    def _decided(self, answer: Any, will: Message, client: Client, through_inboxes: bool,
                 then: Callable[[], None] | None) -> None:
        try:
            if answer is not None and not isinstance(answer, Message):
                return  # refused
            # (A Message of the hook's own is routed as a copy: the hook may answer with it again.)
            message = will if answer is None or answer is will else bare(answer)
            message.sender = will.sender  # (a new Message has none): still the client's
            # (A hook may have changed it in place, or made another.)
            problem = unsendable(message, self.broker.clock.seconds())
            if problem is not None:
                log.error("a will hook made the will of {client_id!r} one that cannot be sent ({problem})",
                          client_id=shortened(client.client_id), problem=problem)
                return
            self.broker.stats.wills_published += 1
            self._route(message, through_inboxes)
        finally:
            if then is not None:
                then()
            self._answered(client.client_id)

    def _answered(self, client_id: str) -> None:
        deciding = self._deciding[client_id]
        deciding.wills -= 1
        if not deciding.wills:
            del self._deciding[client_id]
            for waiting in deciding.waiting:
                if not waiting.called:  # (gave up: timed out, or its connection gone)
                    waiting.callback(None)

    def deciding(self, client_id: str) -> bool:
        """Whether a will hook decides on a will of the client here."""
        return client_id in self._deciding

    def decided(self, client_id: str, within: float) -> Deferred[None] | None:
        """For a new connection of the client, before its CONNACK: None if no will of
        the client waits for a will hook here; else a Deferred that fires once each has been
        decided (published or not), so that it goes out before anything the new connection
        publishes, or after ``within`` seconds. Cancelled, it fires at once."""
        deciding = self._deciding.get(client_id)
        if deciding is None:
            return None
        waiting: Deferred[None] = Deferred(_go_on)
        deciding.waiting.append(waiting)
        return waiting.addTimeout(within, self.broker.clock)

    def _route(self, will: Message, through_inboxes: bool) -> None:
        delivery = self.broker.delivery
        delivery.through_inboxes = through_inboxes
        try:
            delivery.route(will)
        finally:
            delivery.through_inboxes = False

    def delay(self, client: Client, will: Message, identity: Identity | None, delay: float) -> None:
        """Publish the will of a connection that just ended in ``delay`` seconds, unless its
        client connects again before; the store keeps it meanwhile, for a restart."""
        broker = self.broker
        self._wait(client, will, identity, delay)
        if broker.store is not None:
            broker.store.save_will(StoredWill(client.client_id, client.username, will, broker.clock.seconds() + delay))

    def schedule(self, client: Client, will: Message, due: float) -> None:
        """Publish a will kept elsewhere (the store, another node of a cluster) at clock time
        ``due`` (at once if it is past), unless its client connects again before."""
        self._wait(client, will, None, max(0.0, due - self.broker.clock.seconds()))

    def end(self, client_id: str, publish: bool, in_store: bool = True) -> None:
        """The client connected again, or its session ended: its will waits no more, published
        now if ``publish`` (the session ended) or dropped; ``in_store``: the store's copy goes
        too (not when another node of a cluster took the client: the will is that node's)."""
        pending = self._delayed.pop(client_id, None)
        if pending is None:
            return
        if pending[0] is not None:
            self._due_times.forget(pending[0])
        store = self.broker.store
        if in_store and store is not None:
            store.delete_will(client_id)
        if publish:
            self.publish(*pending[1:])

    def drop_revoked(self, revoked: Callable[[Identity], str | None]) -> None:
        """After a reload: the delayed wills of clients whose credentials ``revoked`` says are no
        longer accepted go unpublished, as those of connected ones (they no longer speak for
        their clients)."""
        for client_id, (_, _, _, identity) in list(self._delayed.items()):
            why = revoked(identity) if identity is not None else None
            if why is not None:
                log.info("the delayed will of {client_id!r} is dropped after the reload: {why}",
                         client_id=shortened(client_id), why=why)
                self.end(client_id, publish=False)

    def stop(self) -> None:
        """The broker stops, once it has closed its connections: no will waits from now on. With
        a store, the delayed ones are left to it, for the next start; without one, every session
        ends with the broker's process, so they are due now [MQTT-3.1.3-9] and published, as
        Mosquitto publishes them at its stop (a service started again in the same process keeps
        the sessions, their wills gone)."""
        publish = self.broker.store is None
        for client_id in list(self._delayed):
            self.end(client_id, publish, in_store=False)
        self._due_times.stop()

    def _wait(self, client: Client, will: Message, identity: Identity | None, delay: float) -> None:
        entry = self._due_times.watch(client.client_id, self.broker.clock.seconds() + delay)
        self._delayed[client.client_id] = (entry, client, will, identity)

    def _due(self, client_id: str) -> float | None:
        """A will's delay is over (called by ``_due_times``): published, unless a cluster
        must say first; returns when to be called again, if it must wait."""
        cluster = self.broker.cluster
        if cluster is not None and cluster.unsure_of_sessions():
            # Cut off from Redis, or paused, long enough to be taken for dead: the session may
            # have been adopted, its will taken by the survivor. Decided once Redis has said.
            return self.broker.clock.seconds() + 1.0
        pending = self._delayed[client_id]
        store = self.broker.store
        if store is not None:
            store.delete_will(client_id)
        if cluster is not None and cluster.holds(client_id):
            # Another node may have claimed the session, its news not here yet: published once
            # Redis has deleted the will as this node's (a write of the session's owner). Until
            # then it stays here, for the news to end as it says.
            waiting = (None, *pending[1:])
            self._delayed[client_id] = waiting
            cluster.still_holds(client_id).addCallback(self._confirmed, client_id, waiting)
            return None
        del self._delayed[client_id]
        self.publish(*pending[1:])
        return None

    def _confirmed(self, held: bool, client_id: str, waiting: tuple[Any, Client, Message, Identity | None]) -> None:
        if held and self._delayed.get(client_id) is waiting:
            del self._delayed[client_id]
            self.publish(*waiting[1:])


@dataclass
class _Deciding:
    """A client's wills that will hooks decide on, and its new connections waiting for them."""

    wills: int = 0
    waiting: list[Deferred[None]] = field(default_factory=list)


def _go_on(waiting: Deferred[None]) -> None:
    waiting.callback(None)


WILLS_PUBLISHED_PER_TURN = 1000
"""How many of the delayed wills whose time came are published in one turn of the reactor; the
others wait for the next turns, reads and writes between (a fleet's come due together)."""


__all__ = ["WILLS_PUBLISHED_PER_TURN", "Wills"]

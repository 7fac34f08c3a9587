"""Where the broker keeps what must survive it: sessions, their messages, retained messages, wills.

The broker calls a :class:`Store` on the reactor thread. Each call only records a change; the
store writes them in batches (group commit) and ``flushed()`` says when everything recorded so
far is durable, which is when the broker acknowledges a QoS 1/2 PUBLISH or a SUBSCRIBE.
Implementations: :class:`~mqtt_broker.store.sqlite.SQLiteStore` (the default of
``twistd mqttbroker``) and :class:`~mqtt_broker.store.memory.MemoryStore` (a reference that keeps
state across service restarts within one process). With ``persistence = "memory"`` the broker
has no store at all and pays nothing for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from twisted.internet.defer import Deferred

from ..history import Entry
from ..message import Message
from ..session import Queued, Session
from ..topics import Subscription


class StoreError(Exception):
    """The store cannot be opened, read or written; the message says which file and what to do."""


@dataclass(slots=True)
class StoredWill:
    client_id: str
    username: str | None
    message: Message
    due: float
    """Clock time at which the delayed will is published."""


@dataclass(slots=True)
class Snapshot:
    """Everything a store holds, read at start-up."""

    sessions: list[tuple[Session, float | None]] = field(default_factory=list)
    """Each session (with subscriptions, queued and in-flight messages, inbound QoS 2 state)
    and the clock time its client disconnected (None: it was connected when the broker stopped)."""
    retained: list[Message] = field(default_factory=list)
    wills: list[StoredWill] = field(default_factory=list)
    history: list[Entry] = field(default_factory=list)
    """The message log, oldest first."""
    alive_at: float | None = None
    """The last clock time the broker noted it was alive (a store's optional ``alive(now)``),
    None if never: a session connected when the broker stopped went away then."""


class Store(Protocol):
    """What the broker needs from a store. Every method but ``load`` and ``flushed`` records a
    change and returns at once; deliveries are named by (client id, ``Queued.seq``)."""

    generation: int
    """Changes whenever the changes recorded so far start being written: a ``flushed()`` asked
    for while it keeps one value covers every change recorded while it keeps that value (so a
    connection waits for the store once per batch, not once per message)."""

    gather: Callable[..., None]
    """``gather(function, *args)`` runs what follows a written batch (the ``flushed()``
    Deferreds firing); the broker sets it so that the acknowledgements a batch releases are
    gathered and sent in one write per connection. By default it just calls ``function``."""

    @property
    def opened(self) -> bool:
        """Whether changes can be recorded yet (SQLite's file is opened by ``load``)."""

    def load(self, window: int = 0, max_bytes: int = 0) -> Snapshot:
        """Open the store and read it (blocking, at start-up). Of each session's queued
        messages only the first ``window`` (0: all) are read, and with ``max_bytes`` no more
        payload bytes than that (the first one whatever its size); the rest are counted in
        ``Session.spilled`` and read later with load_queued. Raises StoreError."""

    def load_queued(self, client_id: str, after_seq: int, limit: int, max_bytes: int = 0) -> Deferred[list[Queued]]:
        """The queued (not yet sent) messages of a session numbered after ``after_seq``, in
        order, at most ``limit`` and, with ``max_bytes``, no more payload bytes than that (the
        first one whatever its size); everything recorded before the call is included."""

    def save_session(self, session: Session, disconnected_at: float | None) -> None: ...

    def delete_session(self, client_id: str) -> None:
        """Forget a session with its subscriptions, messages and QoS 2 state."""

    def save_subscription(self, client_id: str, subscription: Subscription) -> None: ...

    def delete_subscription(self, client_id: str, topic_filter: str) -> None: ...

    def save_retained(self, message: Message) -> None: ...

    def delete_retained(self, topic: str) -> None: ...

    def add_delivery(self, client_id: str, item: Queued, packet_id: int | None) -> None:
        """A QoS 1/2 message for a session: queued (no packet id yet) or sent."""

    def update_delivery(self, client_id: str, seq: int, packet_id: int, released: bool) -> None: ...

    def remove_delivery(self, client_id: str, seq: int) -> None:
        """The client acknowledged the message (or it was dropped)."""

    def add_pubrel(self, client_id: str, packet_id: int) -> None: ...

    def remove_pubrel(self, client_id: str, packet_id: int) -> None: ...

    def save_will(self, will: StoredWill) -> None: ...

    def save_history(self, entry: Entry) -> None:
        """A message of the message log."""

    def forget_history(self, before_seq: int) -> None:
        """Entries older than ``before_seq`` left every log."""

    def drop_history(self, seqs: list[int]) -> None:
        """These entries left every log."""

    def delete_will(self, client_id: str) -> None: ...

    def flushed(self) -> Deferred[None]:
        """Fires when every change recorded so far is durable; fails with StoreError if the
        write failed. The Deferreds fire in the order they were asked for."""

    def close(self) -> Deferred[None]: ...

    # Optional: ``keeps_history = False`` says that ``save_history`` keeps nothing (the message
    # log stays in memory, and ``load`` gives none back to take its place).
    #
    # Optional: ``drop_expired(client_id, after_seq, now) -> Deferred[int]`` deletes the queued
    # messages of a session numbered after ``after_seq`` that expired by ``now`` and fires with
    # how many (everything recorded before the call included): expired messages then make room
    # under max_stored_messages.
    #
    # Optional: ``alive(now: float) -> None`` records that the broker is alive at clock time
    # ``now`` (the broker calls it every minute, ``broker.ALIVE_EVERY``, down to every second,
    # ``ALIVE_SOONEST``, once sessions of short expiries have connected), for ``load`` to give as
    # ``Snapshot.alive_at``: the sessions whose clients were connected when the broker was
    # killed then count their expiry from then rather than from the restart.
    #
    # Optional: ``unwritten_bytes`` and ``max_unwritten_bytes`` (ints) say what the changes
    # recorded and not yet written hold in memory, and the most they should: a connection whose
    # packets take ``unwritten_bytes`` past ``max_unwritten_bytes`` is read no more until a
    # ``flushed()`` asked for then fires (while it fails, until one fires without failing).


MAX_UNWRITTEN_BYTES = 8 * 1024 * 1024
"""The most that changes waiting to be written (a store's ``unwritten_bytes``: to the disk, to
Redis) hold before the broker stops reading the clients that add to them, until the store has
caught up: a slow, failing or unreachable store then slows its publishers instead of growing the
broker's memory with every message. Not a setting: a store that keeps up writes a batch long
before the next one holds as much, so the bound costs nothing then, and a larger one would only
hold more in memory when it does not. It also bounds the backlog a failing disk leaves, which
each attempt to write it goes through."""

CHANGE_BYTES = 256
"""What ``unwritten_bytes`` counts for a change beside the message bytes it carries: about what
it takes in memory besides (its tuple or statement, strings, encoded properties; an
acknowledgement's DELETE, with no payload, 150 bytes), so that many small changes are bounded as
large ones are."""


def fire(waiters: list[Deferred[None]], error: Exception | None = None) -> None:
    """Fire the ``flushed()`` Deferreds of a batch, in order."""
    for d in waiters:
        if error is None:
            d.callback(None)
        else:
            d.errback(error)


def call(function: Callable[..., None], *args: object) -> None:
    """``Store.gather`` until the broker sets its own."""
    function(*args)


def first_within(items: Iterable[Queued], limit: int, max_bytes: int) -> list[Queued]:
    """The first ``limit`` of ``items`` and, with ``max_bytes``, no more payload bytes than that
    (the first one whatever its size)."""
    first: list[Queued] = []
    size = 0
    for item in items:
        if len(first) >= limit:
            break
        size += len(item.message.payload)
        if max_bytes and size > max_bytes and first:
            break
        first.append(item)
    return first


__all__ = ["Store", "StoreError", "Snapshot", "StoredWill", "fire", "call", "first_within"]

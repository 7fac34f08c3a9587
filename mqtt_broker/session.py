"""One client's session state: subscriptions, messages in flight both ways, the offline queue.

A session is plain data that the broker drives; it never sees a socket or the reactor (the
broker passes times in), so it can be saved by a store and tested alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .message import Message
from .topics import Subscription
from .wire.packets import init_arguments

if TYPE_CHECKING:
    from .protocol import MQTTProtocol


@dataclass(slots=True)
class Queued:
    """A message waiting for the client: offline, or its window or socket buffer is full."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...] = ()
    share: tuple[str, str] | None = None
    """(group, filter) when it came through a shared subscription: on session end it goes to
    another member of the group."""
    seq: int = 0
    """Its number within the session, naming it in the store (QoS 1/2 of stored sessions)."""

    # The dataclasses' own __init__s, written out (as Message's is): compiled, these are native.
    def __init__(self, message: Message, qos: int, retain: bool, subscription_ids: tuple[int, ...] = (),
                 share: tuple[str, str] | None = None, seq: int = 0) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.subscription_ids = subscription_ids
        self.share = share
        self.seq = seq

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return init_arguments(self)


@dataclass(slots=True)
class Outgoing(Queued):
    """A QoS 1/2 message sent to the client and not yet completely acknowledged."""

    sent_at: float = 0.0
    released: bool = False
    """QoS 2: PUBREC received and PUBREL sent; only PUBCOMP is awaited."""
    unsent: bool = False
    """To be resent after a reconnect, once the client's Receive Maximum allows."""

    def __init__(self, message: Message, qos: int, retain: bool, subscription_ids: tuple[int, ...] = (),
                 share: tuple[str, str] | None = None, seq: int = 0, sent_at: float = 0.0,
                 released: bool = False, unsent: bool = False) -> None:
        Queued.__init__(self, message, qos, retain, subscription_ids, share, seq)  # slots=True: no super()
        self.sent_at = sent_at
        self.released = released
        self.unsent = unsent


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise TypeError("a session's shared empty collection: replace it with one of its own first")


def _shared_empty(kind: type, *adders: str) -> Any:
    """An empty collection of this kind for idle sessions to share, which refuses to be added to
    (so that no session can write into another's): it reads as an empty one does, and removing
    from it finds nothing. A class made here, since mypyc's native classes cannot take a function
    as a method."""
    methods = dict.fromkeys(adders, _refuse)
    # Hashable by identity, so that it can be a dataclass field's default.
    return type(f"Empty{kind.__name__.title()}", (kind,), {"__slots__": (), "__hash__": object.__hash__, **methods})()


NO_PUBRELS: Final[set[int]] = _shared_empty(set, "add", "update", "__ior__", "symmetric_difference_update", "__ixor__")
"""The awaited PUBRELs of a session that has awaited none yet: an empty set costs 216 bytes, for
each of thousands of idle sessions. Only ``Session.expect_pubrel`` adds to it; it makes the set."""

_DICT_ADDERS: Final = ("__setitem__", "setdefault", "update", "__ior__")

NO_SUBSCRIPTIONS: Final[dict[str, Subscription]] = _shared_empty(dict, *_DICT_ADDERS)
"""The subscriptions of a session that has none yet (an empty dict costs 64 bytes, for each of
thousands of idle sessions); ``Session.subscribe`` makes the dict."""

NO_OUTGOING: Final[dict[int, Outgoing]] = _shared_empty(dict, *_DICT_ADDERS)
"""The messages in flight of a session that has sent none yet; ``Session.track`` makes the dict."""

_DEQUE_ADDERS: Final = ("append", "appendleft", "extend", "extendleft", "insert", "__iadd__")

NO_HELD_BACK: Final[deque[int]] = _shared_empty(deque, *_DEQUE_ADDERS)
"""The ``held_back`` packet ids of a session that holds none back; ``Session.hold_back`` makes the deque."""

CROWDED: Final = 64
"""Messages in flight from which the packet ids that acknowledgements free are kept (the last
CROWDED of them) for ``Session.allocate_packet_id``. A client that acknowledges out of order (the
newest only) leaves the one free id up to a whole window behind ``_next_id``, and a window may be
65535 (max_inflight_messages): walking to it took 4 ms for each message. With fewer in flight,
walks are short and nothing is kept."""

NO_QUEUE: Final[deque[Queued]] = _shared_empty(deque, *_DEQUE_ADDERS)
"""The queue of a session that has queued nothing yet (a deque costs 600 bytes even empty, for
each of thousands of idle sessions). Only ``Session.push`` and ``enqueue`` add to a queue; they
make the deque."""


@dataclass(slots=True, eq=False)
class Session:
    client_id: str
    expiry: int = 0
    """Seconds the session outlives its connection: 0 not at all, 0xFFFFFFFF for ever (MQTT 3:
    clean session 1 is 0, clean session 0 is persistent_client_expiration or for ever)."""
    subscriptions: dict[str, Subscription] = NO_SUBSCRIPTIONS
    outgoing: dict[int, Outgoing] = NO_OUTGOING
    queue: deque[Queued] = NO_QUEUE
    queued_bytes: int = 0
    awaiting_pubrel: set[int] = NO_PUBRELS
    """Inbound QoS 2 packet ids whose PUBLISH was routed; a repeat must not be routed again."""
    connection: MQTTProtocol | None = None
    dropped: int = 0
    """Messages discarded because the queue was full."""
    expiry_deadline: Any = None
    """Its entry in the broker's ``expiries`` while it waits to expire (see mqtt_broker.deadlines)."""
    retry_call: Any = None
    stored: bool = False
    """Whether the store has this session (it outlives its connection and there is a store)."""
    spilled: int = 0
    """Queued QoS 1/2 messages kept only in the store, after those in ``queue``: a slow or
    offline client's backlog beyond max_queued_messages does not stay in memory."""
    loading: bool = False
    """Spilled messages are being read back from the store."""
    identity: Any = None
    """The auth Identity of its client, for read rights (None: no security, or restored and
    not yet reconnected)."""
    loaded_seq: int = 0
    """The highest seq brought into memory; spilled messages all come after it."""
    next_seq: int = 1
    unsent: int = 0
    """How many of ``outgoing`` wait to be resent (their ``unsent`` flag)."""
    held_back: deque[int] = NO_HELD_BACK
    """The packet ids of those, in the order they are to go: each acknowledgement that frees a
    slot finds the next at once, however many are in flight. It may still hold ids no longer
    held back (acknowledged or released since), passed over as they come."""
    swept_at: float = 0.0
    """When its full queue was last rid of the messages in it that expired."""
    as_published: bool = False
    """Whether it had a subscription with Retain As Published since an MQTT 3 client last resumed
    it: messages routed with that option may wait in it with the RETAIN 1 of a retained one."""
    freed: deque[int] | None = None
    """Packet ids acknowledgements freed while CROWDED were in flight, the newest last; it may
    hold ids in flight again since, passed over as they come."""
    _next_id: int = 1

    def __init__(self, client_id: str, expiry: int = 0) -> None:
        # The fields above with their defaults, written out as Queued's are (one per CONNECT).
        self.client_id = client_id
        self.expiry = expiry
        self.subscriptions = NO_SUBSCRIPTIONS
        self.outgoing = NO_OUTGOING
        self.queue = NO_QUEUE
        self.queued_bytes = 0
        self.awaiting_pubrel = NO_PUBRELS
        self.connection = None
        self.dropped = 0
        self.expiry_deadline = None
        self.retry_call = None
        self.stored = False
        self.spilled = 0
        self.loading = False
        self.identity = None
        self.loaded_seq = 0
        self.next_seq = 1
        self.unsent = 0
        self.held_back = NO_HELD_BACK
        self.swept_at = 0.0
        self.as_published = False
        self.freed = None
        self._next_id = 1

    def __reduce__(self) -> tuple[Any, ...]:
        # Compiled, copy and pickle make it by calling its class, whose __init__ takes two of its
        # fields; its state, as each build's own __getstate__ gives it, sets them all after.
        return Session, (self.client_id, self.expiry), self.__getstate__()

    def allocate_packet_id(self) -> int:
        """A packet id not in use by any outgoing message [MQTT-2.3.1-2]: the next in order, or,
        when that one is in flight, one an acknowledgement freed lately (``freed``). Always finds
        one: the broker keeps fewer than max_inflight_messages (at most 65535) in flight."""
        packet_id = self._next_id
        outgoing = self.outgoing
        if packet_id in outgoing:
            freed = self.freed
            while freed:
                reused = freed.pop()
                if reused not in outgoing:
                    return reused  # (_next_id stays: the ids past it are still to come in order)
        while packet_id in outgoing:
            packet_id = packet_id % 65535 + 1
        self._next_id = packet_id % 65535 + 1
        return packet_id

    def subscribe(self, subscription: Subscription) -> None:
        if self.subscriptions is NO_SUBSCRIPTIONS:
            self.subscriptions = {}
        self.subscriptions[subscription.topic_filter] = subscription
        if subscription.retain_as_published:
            self.as_published = True

    def track(self, packet_id: int, item: Outgoing) -> None:
        """A QoS 1/2 message is in flight with this packet id."""
        if self.outgoing is NO_OUTGOING:
            self.outgoing = {}
        self.outgoing[packet_id] = item

    def untrack(self, packet_id: int) -> Outgoing | None:
        """The message in flight with this packet id is acknowledged: returns it (None if no
        message is in flight with it). With CROWDED still in flight after it, the id freed is
        kept in ``freed`` for ``allocate_packet_id``."""
        outgoing = self.outgoing
        out = outgoing.pop(packet_id, None)
        if out is not None and len(outgoing) >= CROWDED:
            if self.freed is None:
                self.freed = deque(maxlen=CROWDED)
            self.freed.append(packet_id)
        return out

    def hold_back(self, packet_id: int, item: Outgoing) -> None:
        """A message in flight with this packet id is to be resent once the client's Receive
        Maximum allows, after those held back before it."""
        item.unsent = True
        self.unsent += 1
        if self.held_back is NO_HELD_BACK:
            self.held_back = deque()
        self.held_back.append(packet_id)

    def expect_pubrel(self, packet_id: int) -> None:
        """An inbound QoS 2 PUBLISH with this id was routed: its PUBREL is awaited."""
        if self.awaiting_pubrel is NO_PUBRELS:
            self.awaiting_pubrel = set()
        self.awaiting_pubrel.add(packet_id)

    @property
    def persistent(self) -> bool:
        return self.expiry != 0

    def has_room(self, item: Queued, max_messages: int, max_bytes: int) -> bool:
        """Whether the in-memory queue can take one more message (an empty one takes one of any
        size, as Mosquitto's does: its max_queued_bytes bounds what is queued already)."""
        return not (max_messages and len(self.queue) >= max_messages) and self.takes(len(item.message.payload), max_bytes)

    def takes(self, size: int, max_bytes: int) -> bool:
        """Whether the in-memory queue has room for ``size`` more payload bytes under
        ``max_bytes`` (0: no bound; an empty queue takes any size)."""
        return not (max_bytes and self.queue and self.queued_bytes + size > max_bytes)

    def enqueue(self, item: Queued, max_messages: int, max_bytes: int) -> bool:
        """Queue a message for later delivery; False (and counted) when the queue is full."""
        if not self.has_room(item, max_messages, max_bytes):
            self.dropped += 1
            return False
        self.push(item)
        return True

    def push(self, *items: Queued) -> None:
        """Queue messages whatever the bounds (they are back from the store, which kept them)."""
        if self.queue is NO_QUEUE:
            self.queue = deque()
        self.queue.extend(items)
        self.queued_bytes += sum(len(item.message.payload) for item in items)

    def drop_expired(self, now: float) -> list[Queued]:
        """Take the messages that expired out of the queue; returns them."""
        kept: deque[Queued] = deque()
        expired: list[Queued] = []
        for item in self.queue:
            if item.message.expired(now):
                expired.append(item)
            else:
                kept.append(item)
        if expired:
            self.queue = kept
            self.queued_bytes -= sum(len(item.message.payload) for item in expired)
        return expired

    def dequeue(self) -> Queued:
        item = self.queue.popleft()
        self.queued_bytes -= len(item.message.payload)
        return item

    def clear(self) -> None:
        self.subscriptions = NO_SUBSCRIPTIONS
        self.outgoing = NO_OUTGOING
        self.freed = None
        self.unsent = 0
        self.held_back = NO_HELD_BACK
        self.queue = NO_QUEUE
        self.queued_bytes = 0
        self.spilled = 0
        self.awaiting_pubrel = NO_PUBRELS

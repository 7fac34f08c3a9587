"""A store in this process's memory: the reference implementation of the Store interface.

Nothing survives the process; state survives stopping and starting a BrokerService, which makes
it the store to embed where a restart of the service (not of the process) must keep sessions.
"""

from __future__ import annotations

import copy

from twisted.internet.defer import Deferred, succeed

from ..message import Message
from ..session import Outgoing, Queued, Session
from ..topics import Subscription
from ..history import Entry
from . import Snapshot, StoredWill, call, first_within


class _Stored:
    """A session as the store keeps it: its messages by sequence number, which is how the broker
    names them, so that each change finds its message at once however many are queued."""

    __slots__ = ("session", "queued", "outgoing", "packets")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.queued: dict[int, Queued] = {}
        """By sequence number, in its order."""
        self.outgoing: dict[int, tuple[int, Outgoing]] = {}
        """By sequence number: the packet id and the message in flight."""
        self.packets: dict[int, int] = {}
        """The sequence number of the message in flight under each packet id."""


class MemoryStore:
    generation = 0
    """Never changes: every change is kept as it is recorded."""
    gather = staticmethod(call)
    opened = True

    def __init__(self) -> None:
        self._sessions: dict[str, tuple[_Stored, float | None]] = {}
        self._retained: dict[str, Message] = {}
        self._wills: dict[str, StoredWill] = {}
        self._history: dict[int, Entry] = {}

    def load(self, window: int = 0, max_bytes: int = 0) -> Snapshot:
        sessions = []
        for stored, disconnected_at in self._sessions.values():
            kept_session = stored.session
            session = Session(kept_session.client_id, kept_session.expiry)
            session.stored = True
            session.subscriptions = dict(kept_session.subscriptions)
            for packet_id, out in stored.outgoing.values():
                session.track(packet_id, copy.copy(out))
            queued = list(stored.queued.values())
            kept = first_within(queued, window or len(queued), max_bytes)
            session.push(*(copy.copy(item) for item in kept))
            session.spilled = len(queued) - len(kept)
            session.loaded_seq = kept[-1].seq if kept else 0
            session.awaiting_pubrel = set(kept_session.awaiting_pubrel)
            session.next_seq = kept_session.next_seq
            sessions.append((session, disconnected_at))
        history = [self._history[seq] for seq in sorted(self._history)]
        return Snapshot(sessions, list(self._retained.values()), list(self._wills.values()), history)

    def save_history(self, entry: Entry) -> None:
        self._history[entry.seq] = entry

    def forget_history(self, before_seq: int) -> None:
        for seq in [s for s in self._history if s < before_seq]:
            del self._history[seq]

    def drop_history(self, seqs: list[int]) -> None:
        for seq in seqs:
            self._history.pop(seq, None)

    def load_queued(self, client_id: str, after_seq: int, limit: int, max_bytes: int = 0) -> Deferred[list[Queued]]:
        known = self._sessions.get(client_id)
        if known is None:
            return succeed([])
        # (Those up to after_seq still here are the few read and not yet sent: the walk is short.)
        after = (item for seq, item in known[0].queued.items() if seq > after_seq)
        return succeed([copy.copy(item) for item in first_within(after, limit, max_bytes)])

    def drop_expired(self, client_id: str, after_seq: int, now: float) -> Deferred[int]:
        known = self._sessions.get(client_id)
        if known is None:
            return succeed(0)
        queued = known[0].queued
        expired = [seq for seq, item in queued.items() if seq > after_seq and item.message.expired(now)]
        for seq in expired:
            del queued[seq]
        return succeed(len(expired))

    def _stored(self, client_id: str) -> _Stored:
        return self._sessions[client_id][0]

    def save_session(self, session: Session, disconnected_at: float | None) -> None:
        known = self._sessions.get(session.client_id)
        stored = known[0] if known else _Stored(Session(session.client_id))
        stored.session.expiry = session.expiry
        stored.session.next_seq = max(stored.session.next_seq, session.next_seq)
        self._sessions[session.client_id] = (stored, disconnected_at)

    def delete_session(self, client_id: str) -> None:
        self._sessions.pop(client_id, None)

    def save_subscription(self, client_id: str, subscription: Subscription) -> None:
        self._stored(client_id).session.subscribe(copy.copy(subscription))

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        self._stored(client_id).session.subscriptions.pop(topic_filter, None)

    def save_retained(self, message: Message) -> None:
        self._retained[message.topic] = message

    def delete_retained(self, topic: str) -> None:
        self._retained.pop(topic, None)

    def add_delivery(self, client_id: str, item: Queued, packet_id: int | None) -> None:
        stored = self._stored(client_id)
        stored.session.next_seq = max(stored.session.next_seq, item.seq + 1)
        if packet_id is None:
            queued = stored.queued
            out_of_order = queued and item.seq < next(reversed(queued))
            queued[item.seq] = copy.copy(item)
            if out_of_order:  # (never so far: the broker numbers a session's messages in order)
                stored.queued = dict(sorted(queued.items()))
        else:
            self._track(stored, packet_id, Outgoing(item.message, item.qos, item.retain,
                                                    item.subscription_ids, item.share, item.seq))

    def _track(self, stored: _Stored, packet_id: int, out: Outgoing) -> None:
        # A packet id names one message in flight: one it named before is done with.
        self._untrack(stored, out.seq)
        before = stored.packets.get(packet_id)
        if before is not None:
            del stored.outgoing[before]
        stored.packets[packet_id] = out.seq
        stored.outgoing[out.seq] = (packet_id, out)

    @staticmethod
    def _untrack(stored: _Stored, seq: int) -> None:
        known = stored.outgoing.pop(seq, None)
        if known is not None:
            del stored.packets[known[0]]

    def update_delivery(self, client_id: str, seq: int, packet_id: int, released: bool) -> None:
        stored = self._stored(client_id)
        item = stored.queued.pop(seq, None)
        if item is not None:
            self._track(stored, packet_id, Outgoing(item.message, item.qos, item.retain,
                                                    item.subscription_ids, item.share, item.seq))
        known = stored.outgoing.get(seq)
        if known is not None:
            known[1].released = released

    def remove_delivery(self, client_id: str, seq: int) -> None:
        stored = self._stored(client_id)
        stored.queued.pop(seq, None)
        self._untrack(stored, seq)

    def add_pubrel(self, client_id: str, packet_id: int) -> None:
        self._stored(client_id).session.expect_pubrel(packet_id)

    def remove_pubrel(self, client_id: str, packet_id: int) -> None:
        self._stored(client_id).session.awaiting_pubrel.discard(packet_id)

    def save_will(self, will: StoredWill) -> None:
        self._wills[will.client_id] = will

    def delete_will(self, client_id: str) -> None:
        self._wills.pop(client_id, None)

    def flushed(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

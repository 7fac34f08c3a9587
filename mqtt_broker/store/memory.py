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
from . import Snapshot, StoredWill, call


class MemoryStore:
    generation = 0
    """Never changes: every change is kept as it is recorded."""
    gather = staticmethod(call)
    opened = True

    def __init__(self) -> None:
        self._sessions: dict[str, tuple[Session, float | None]] = {}
        self._retained: dict[str, Message] = {}
        self._wills: dict[str, StoredWill] = {}
        self._history: dict[int, Entry] = {}

    def load(self, window: int = 0) -> Snapshot:
        sessions = []
        for stored, disconnected_at in self._sessions.values():
            session = Session(stored.client_id, stored.expiry)
            session.stored = True
            session.subscriptions = dict(stored.subscriptions)
            session.outgoing = {k: copy.copy(v) for k, v in stored.outgoing.items()}
            queued = sorted(stored.queue, key=lambda item: item.seq)
            kept = queued[:window] if window else queued
            session.push(*(copy.copy(item) for item in kept))
            session.spilled = len(queued) - len(kept)
            session.loaded_seq = kept[-1].seq if kept else 0
            session.awaiting_pubrel = set(stored.awaiting_pubrel)
            session.next_seq = stored.next_seq
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

    def load_queued(self, client_id: str, after_seq: int, limit: int) -> Deferred[list[Queued]]:
        known = self._sessions.get(client_id)
        queued = sorted((i for i in known[0].queue if i.seq > after_seq), key=lambda i: i.seq) if known else []
        return succeed([copy.copy(item) for item in queued[:limit]])

    def drop_expired(self, client_id: str, after_seq: int, now: float) -> Deferred[int]:
        known = self._sessions.get(client_id)
        if known is None:
            return succeed(0)
        queue = known[0].queue
        expired = [i for i in queue if i.seq > after_seq and i.message.expired(now)]
        for item in expired:
            queue.remove(item)
        return succeed(len(expired))

    def _session(self, client_id: str) -> Session:
        return self._sessions[client_id][0]

    def save_session(self, session: Session, disconnected_at: float | None) -> None:
        known = self._sessions.get(session.client_id)
        stored = known[0] if known else Session(session.client_id)
        stored.expiry = session.expiry
        stored.next_seq = max(stored.next_seq, session.next_seq)
        self._sessions[session.client_id] = (stored, disconnected_at)

    def delete_session(self, client_id: str) -> None:
        self._sessions.pop(client_id, None)

    def save_subscription(self, client_id: str, subscription: Subscription) -> None:
        self._session(client_id).subscribe(copy.copy(subscription))

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        self._session(client_id).subscriptions.pop(topic_filter, None)

    def save_retained(self, message: Message) -> None:
        self._retained[message.topic] = message

    def delete_retained(self, topic: str) -> None:
        self._retained.pop(topic, None)

    def add_delivery(self, client_id: str, item: Queued, packet_id: int | None) -> None:
        session = self._session(client_id)
        session.next_seq = max(session.next_seq, item.seq + 1)
        if packet_id is None:
            session.push(copy.copy(item))
        else:
            session.track(packet_id, Outgoing(item.message, item.qos, item.retain, item.subscription_ids,
                                              item.share, item.seq))

    def update_delivery(self, client_id: str, seq: int, packet_id: int, released: bool) -> None:
        session = self._session(client_id)
        for item in list(session.queue):
            if item.seq == seq:
                session.queue.remove(item)
                session.track(packet_id, Outgoing(item.message, item.qos, item.retain,
                                                  item.subscription_ids, item.share, item.seq))
        for out in session.outgoing.values():
            if out.seq == seq:
                out.released = released

    def remove_delivery(self, client_id: str, seq: int) -> None:
        session = self._session(client_id)
        for item in [i for i in session.queue if i.seq == seq]:
            session.queue.remove(item)
        for packet_id in [p for p, out in session.outgoing.items() if out.seq == seq]:
            del session.outgoing[packet_id]

    def add_pubrel(self, client_id: str, packet_id: int) -> None:
        self._session(client_id).expect_pubrel(packet_id)

    def remove_pubrel(self, client_id: str, packet_id: int) -> None:
        awaiting = self._session(client_id).awaiting_pubrel
        if packet_id in awaiting:
            awaiting.discard(packet_id)

    def save_will(self, will: StoredWill) -> None:
        self._wills[will.client_id] = will

    def delete_will(self, client_id: str) -> None:
        self._wills.pop(client_id, None)

    def flushed(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

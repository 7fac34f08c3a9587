"""What Redis answers, read into the broker's objects: a claim of a session (with the session it
hands over), and the entries of an inbox."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..session import Outgoing, Session
from .codec import records_of_0_1_0, unpack_queued, unpack_subscription


class Claim:
    """What ``RedisStore.claim`` found: the new epoch, the previous owner, and the session."""

    __slots__ = ("epoch", "previous", "previous_alive", "will", "will_id", "current", "since_stamp", "session",
                 "disconnected_at")

    def __init__(self, reply: list[Any], client_id: str) -> None:
        self.epoch = int(reply[0])
        self.previous: str | None = reply[1].decode() if reply[1] else None
        self.previous_alive = bool(reply[2])
        self.will: bytes | None = reply[3] or None
        """The session's will, taken out of Redis (pack_will): the previous owner's to publish
        if it is alive, but for a delayed one of a session that goes on."""
        self.will_id = self.epoch if self.will is not None and not self.previous_alive else None
        """A dead previous owner's will is this node's, kept in Redis under this id until it is
        published, kept or dropped (``RedisStore.will_done``)."""
        self.current = bool(reply[4])
        """The caller held the session already: its copy is current."""
        self.since_stamp = int(reply[5])
        """The epochs counter when the session was last begun anew (0: never): what came for it
        in an inbox entry stamped lower was meant for its earlier life."""
        self.session: Session | None = None
        self.disconnected_at: float | None = None
        if len(reply) > 6:
            self.session, self.disconnected_at = read_session(client_id, reply)


class TakenWill(NamedTuple):
    """A will no live node will publish, taken by this node (wills.lua)."""

    id: int
    """Its id in Redis, until it is published, kept or dropped (``RedisStore.will_done``)."""
    client_id: str
    will: bytes
    """pack_will's."""
    ended: bool
    """Its session ended: due at once, delayed or not."""
    back: bool
    """Its client connected again: dropped if delayed [MQTT-3.1.3-9]."""
    expiry: int
    """Its session's expiry interval, otherwise."""


def taken_wills(reply: list[Any]) -> list[TakenWill]:
    """The wills of a wills.lua answer: id, 'flag\\0client\\0will', ..."""
    wills = []
    for j in range(0, len(reply), 2):
        flag, client_id, will = bytes(reply[j + 1]).split(b"\0", 2)
        wills.append(TakenWill(int(reply[j]), client_id.decode(), will, flag == b"0", flag == b"c",
                               int(flag) if flag.isdigit() else 0))
    return wills


InboxEntry = tuple[bytes, bytes | None, int]
"""An inbox entry: its id, its data (None: trimmed since it was given) and its stamp, the epochs
counter when it was made (batch.lua; 0: none)."""


def inbox_entry(entry_id: bytes, fields: list[bytes] | None) -> InboxEntry:
    if not fields:
        return entry_id, None, 0
    if len(fields) < 4:  # no stamp: written by 0.1.0
        try:
            return entry_id, records_of_0_1_0(fields[1]), 0
        except (ValueError, IndexError):
            return entry_id, fields[1], 0  # (passed over as it is read)
    return entry_id, fields[1], int(fields[3])


def inbox_entries(reply: Any) -> list[InboxEntry]:
    """The entries of an XREADGROUP answer."""
    if not reply:
        return []
    return [inbox_entry(entry_id, fields) for entry_id, fields in reply[0][1]]


def read_session(client_id: str, reply: list[Any]) -> tuple[Session | None, float | None]:
    fields, subs, inflight, queued, count, pubrel, last_queued = reply[6:13]
    if not fields:
        return None, None
    meta = {fields[j].decode(): fields[j + 1] for j in range(0, len(fields), 2)}
    session = Session(client_id, int(meta["expiry"]))
    session.stored = True
    session.next_seq = int(meta["next_seq"])
    disconnected_at = float(meta["disconnected_at"]) if meta.get("disconnected_at") else None
    for j in range(0, len(subs), 2):
        topic_filter = subs[j].decode()
        session.subscribe(unpack_subscription(client_id, topic_filter, subs[j + 1]))
    for seq, state, item in sorted(inflight, key=lambda entry: int(entry[0])):
        if item is None:
            continue
        queued_item = unpack_queued(item, int(seq))
        packet_id, released = state.decode().split(":")
        session.track(int(packet_id), Outgoing(queued_item.message, queued_item.qos, queued_item.retain,
                                               queued_item.subscription_ids, queued_item.share, queued_item.seq,
                                               released=released == "1"))
    items = [unpack_queued(item, int(seq)) for seq, item in queued if item is not None]
    if items:
        session.push(*items)
        session.loaded_seq = items[-1].seq
    session.spilled = int(count) - len(items)
    session.awaiting_pubrel = {int(packet_id) for packet_id in pubrel}
    last = max([session.next_seq - 1, int(last_queued), *(out.seq for out in session.outgoing.values())])
    session.next_seq = last + 1
    return session, disconnected_at


__all__ = ["Claim", "InboxEntry", "TakenWill", "inbox_entries", "inbox_entry", "read_session", "taken_wills"]

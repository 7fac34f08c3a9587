"""What the nodes of a cluster write to Redis and to each other, as bytes.

A message travels as the MQTT 5 PUBLISH it would be sent as (topic, payload, QoS, retain flag
and properties, decoded again with the broker's own codec), preceded by what routing needs
besides: the publisher's client id (No Local) and, when the message was forwarded, the shared
subscriptions the sending node chose the receiving node for. Session state (subscriptions,
queued and in-flight messages, a will) is a small JSON header and, for a message, its PUBLISH.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Final, Iterator

from ..message import Message
from ..session import Queued
from ..topics import Subscription
from ..wire import MQTT_5, decode_publish, publish_template

# Record kinds of an inbox entry: a message to route to the node's matching sessions, a message
# for one session (its writes were fenced off on the node that routed it), or a message that the
# last member of a shared subscription on another node left unfinished, for a member here.
FORWARDED: Final = 0
TARGETED: Final = 1
HANDED: Final = 2
# While a session that moved settles on its new node (see Cluster.moved_here): a message for it
# that the node sends round through its own inbox, to be held there until the session's previous
# node has passed on what it had before (HELD); a node's request to that node (BARRIER), which
# answers once it has passed on what its inbox held before the request (CLEARED).
HELD: Final = 3
BARRIER: Final = 4
CLEARED: Final = 5

_EXPIRING: Final = 0x80
"""Set in the kind of a FORWARDED or HANDED record whose message expires: the clock time it
expires at follows the cluster id, so that a record read late (from a dead node's inbox, say)
does not give the message its whole interval again."""

_MANY: Final = 0x40
"""Set in the kind of a FORWARDED or HANDED record whose count of shares takes four bytes, not
two: nothing bounds how many shared groups of a topic the clients of a node hold."""

_FORWARDED_NO_ID: Final = bytes((FORWARDED, 0))
"""The head of a FORWARDED record of a message without a cluster id or an expiry (QoS 0)."""


def pack_message(message: Message, now: float) -> bytes:
    """The message as an MQTT 5 PUBLISH; an expiry is carried as the interval left at ``now``."""
    properties = message.properties
    if message.expires_at is not None:
        left = max(1, math.ceil(message.expires_at - now))
        # Never more than it came with: ``expires_at`` may be another node's clock time, a
        # little ahead of this one's [MQTT-3.3.2-6].
        given = properties.get("message_expiry_interval")
        properties = {**properties, "message_expiry_interval": left if given is None or left <= given else given}
    return publish_template(message.topic, message.payload, message.qos, message.retain, properties, MQTT_5,
                            1 if message.qos else 0)[0]


def unpack_message(data: bytes) -> Message:
    """The message of a PUBLISH (``pack_message``)."""
    message = decode_publish(data, MQTT_5, Message)
    assert isinstance(message, Message)
    message.packet_id = 0
    message.frame = None
    return message


_CLOCK: Final = struct.Struct(">d")
_RETAINED: Final = struct.Struct(">Bd")
"""The head of a retained message as Redis keeps it: a version (never a PUBLISH's first byte),
then the clock time it expires at."""

_RETAINED_SENT: Final = 1
"""The version whose head is followed by the publisher's client id (No Local), then the PUBLISH;
version 0 (before it) has the PUBLISH at once."""


def pack_retained(message: Message, now: float) -> bytes:
    """A retained message as Redis keeps it: the clock time it expires at (0: never), so that a
    node that loads it later knows how long it has left, its publisher, then its PUBLISH."""
    return (_RETAINED.pack(_RETAINED_SENT, message.expires_at or 0.0) + _string(message.sender or "")
            + pack_message(message, now))


def unpack_retained(data: bytes, now: float) -> Message:
    """The message of ``pack_retained``, or of an older release's: a PUBLISH alone (as 0.1.0
    kept them) expires its interval after ``now``, and neither it nor a version 0 record knows
    its publisher."""
    version = data[0]
    if version > _RETAINED_SENT:
        message = unpack_message(data)
        interval = message.properties.get("message_expiry_interval")
        message.expires_at = now + interval if interval else None
    else:
        pos = _RETAINED.size
        sender = ""
        if version == _RETAINED_SENT:
            sender, pos = _read_string(data, pos)
        message = unpack_message(data[pos:])
        message.expires_at = _CLOCK.unpack_from(data, 1)[0] or None
        message.sender = sender or None
    message.retain = True
    return message


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    size = data[pos] << 8 | data[pos + 1]  # (compiled, cheaper than a Struct: one per record at least)
    return data[pos + 2:pos + 2 + size].decode("utf-8"), pos + 2 + size


def _read_u32(data: bytes, pos: int) -> int:
    return data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]


def pack_forwarded(message: Message, shares: tuple[tuple[str, str], ...], now: float,
                   kind: int = FORWARDED, declined: tuple[str, ...] = ()) -> bytes:
    """One record of an inbox entry: a message for the receiving node to route (or, HANDED,
    to give to a member of each of ``shares`` only; ``declined``: the nodes that had none for
    it, which it is not handed to again)."""
    body = pack_message(message, now)
    cluster_id, expires_at = message.cluster_id, message.expires_at
    many = len(shares) > 0xFFFF
    if cluster_id is None and expires_at is None and kind == FORWARDED and not many:
        head = _FORWARDED_NO_ID
    else:
        ident = cluster_id or b""
        flags = (0 if expires_at is None else _EXPIRING) | (_MANY if many else 0)
        head = bytes((kind | flags, len(ident))) + ident
        if expires_at is not None:
            head += _CLOCK.pack(expires_at)
    # (The count of shares in two bytes, as every release wrote it; in four, flagged _MANY, past
    # 65,535: a client may hold that many shared groups of a topic.)
    parts = [head, _string(message.sender or ""), len(shares).to_bytes(4 if many else 2, "big")]
    for group, topic_filter in shares:
        parts += [_string(group), _string(topic_filter)]
    if kind == HANDED:
        parts += [len(declined).to_bytes(2, "big"), *[_string(node) for node in declined]]
    parts += [len(body).to_bytes(4, "big"), body]
    return b"".join(parts)


def pack_targeted(client_id: str, item: bytes) -> bytes:
    """One record of an inbox entry: a queued message (``pack_queued``) for one session."""
    return targeted_head(client_id, len(item)) + item


def targeted_head(client_id: str, size: int, kind: int = TARGETED) -> bytes:
    """What precedes a queued message of ``size`` bytes in a TARGETED (or HELD) record."""
    return bytes((kind,)) + _string(client_id) + size.to_bytes(4, "big")


def pack_barrier(node: str, client_id: str, origin: bytes) -> bytes:
    """A BARRIER record: ``node`` asks for a CLEARED answer about the client's messages from the
    node whose message ids begin with ``origin``."""
    return bytes((BARRIER,)) + _string(node) + _string(client_id) + bytes((len(origin),)) + origin


def pack_cleared(client_id: str, origin: bytes) -> bytes:
    """The CLEARED answer to a BARRIER record."""
    return bytes((CLEARED,)) + _string(client_id) + bytes((len(origin),)) + origin


Record = tuple[int, Any, Any]
"""(FORWARDED, message, shares), (HANDED, message, (shares, declined nodes)), (TARGETED or HELD,
client id, Queued), (BARRIER, node, (client id, origin)) or (CLEARED, client id, origin)."""


def unpack_records(data: bytes) -> Iterator[Record]:
    """The records of an inbox entry (or of a QoS 0 write), one by one: those before a damaged
    one are read whatever follows them."""
    pos, end = 0, len(data)
    while pos < end:
        flags = data[pos]
        kind = flags & ~(_EXPIRING | _MANY)
        if kind == FORWARDED or kind == HANDED:
            size = data[pos + 1]
            cluster_id = data[pos + 2:pos + 2 + size] or None
            expires_at: float | None = None
            if flags & _EXPIRING:
                expires_at = _CLOCK.unpack_from(data, pos + 2 + size)[0]
                size += _CLOCK.size
            sender, pos = _read_string(data, pos + 2 + size)
            if flags & _MANY:
                count = _read_u32(data, pos)
                pos += 4
            else:
                count = data[pos] << 8 | data[pos + 1]
                pos += 2
            shares: list[tuple[str, str]] = []
            for _ in range(count):
                group, pos = _read_string(data, pos)
                topic_filter, pos = _read_string(data, pos)
                shares.append((group, topic_filter))
            declined: list[str] = []
            if kind == HANDED:
                count = data[pos] << 8 | data[pos + 1]
                pos += 2
                for _ in range(count):
                    node, pos = _read_string(data, pos)
                    declined.append(node)
            size = _read_u32(data, pos)
            if pos + 4 + size > end:
                raise ValueError("a record cut short in an inbox entry")
            message = unpack_message(data[pos + 4:pos + 4 + size])
            message.sender = sender or None
            message.cluster_id = cluster_id
            message.expires_at = expires_at
            pos += 4 + size
            yield kind, message, (tuple(shares), tuple(declined)) if kind == HANDED else tuple(shares)
        elif kind == TARGETED or kind == HELD:
            client_id, pos = _read_string(data, pos + 1)
            size = _read_u32(data, pos)
            if pos + 4 + size > end:
                raise ValueError("a record cut short in an inbox entry")
            queued = unpack_queued(data[pos + 4:pos + 4 + size], 0)
            pos += 4 + size
            yield kind, client_id, queued
        elif kind == BARRIER or kind == CLEARED:
            node = ""
            if kind == BARRIER:
                node, pos = _read_string(data, pos + 1)
                client_id, pos = _read_string(data, pos)
            else:
                client_id, pos = _read_string(data, pos + 1)
            size = data[pos]
            if pos + 1 + size > end:
                raise ValueError("a record cut short in an inbox entry")
            origin = data[pos + 1:pos + 1 + size]
            pos += 1 + size
            yield (kind, node, (client_id, origin)) if kind == BARRIER else (kind, client_id, origin)
        else:
            raise ValueError(f"unknown record kind {kind} in an inbox entry")


def records_of_0_1_0(data: bytes) -> bytes:
    """The records of an inbox entry as 0.1.0 wrote them, in the layout read now (messages left
    in an inbox across an upgrade): its FORWARDED records counted their shares in one byte."""
    parts: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        kind = data[pos]
        if kind == FORWARDED:
            _, counted = _read_string(data, pos + 2 + data[pos + 1])  # (past the cluster id and the sender)
            count = data[counted]
            after = counted + 1
            for _ in range(count):  # a group, a filter
                after = _read_string(data, _read_string(data, after)[1])[1]
            after += 4 + _read_u32(data, after)
            parts += [data[pos:counted], count.to_bytes(2, "big"), data[counted + 1:after]]
        elif kind == TARGETED:
            _, after = _read_string(data, pos + 1)
            after += 4 + _read_u32(data, after)
            parts.append(data[pos:after])
        else:
            raise ValueError(f"unknown record kind {kind} in an inbox entry of 0.1.0")
        pos = after
    return b"".join(parts)


def _headed(head: bytes) -> bytes:
    """The JSON head of a queued message or a will, after its length: in two bytes, as every
    release wrote it, or, for a head longer than that counts, a length of 0 (no head is empty:
    a JSON list) and the length in four. JSON writes each character past ASCII as \\uXXXX (6
    bytes, 12 past the BMP): a client id or a user name MQTT allows (65,535 bytes) may take
    196,596, and a message's subscription identifiers are as many as its session's matching
    subscriptions."""
    size = len(head)
    if size <= 0xFFFF:
        return size.to_bytes(2, "big") + head
    return b"\0\0" + size.to_bytes(4, "big") + head


def _read_head(data: bytes) -> tuple[Any, int]:
    """The JSON head of ``_headed`` and where what follows it begins."""
    size = data[0] << 8 | data[1]
    if size:
        return json.loads(data[2:2 + size]), 2 + size
    size = _read_u32(data, 2)
    return json.loads(data[6:6 + size]), 6 + size


def pack_queued(item: Queued) -> bytes:
    """A queued or in-flight message of a session: its terms and its PUBLISH. The expiry is kept
    as clock time, as the SQLite store keeps it."""
    cluster_id = item.message.cluster_id
    head = json.dumps([item.qos, item.retain, list(item.subscription_ids), item.share, item.message.expires_at,
                       item.message.sender, cluster_id.hex() if cluster_id else None],
                      separators=(",", ":")).encode()
    message = item.message
    body = publish_template(message.topic, message.payload, message.qos, message.retain, message.properties,
                            MQTT_5, 1 if message.qos else 0)[0]
    return _headed(head) + body


def unpack_queued(data: bytes, seq: int) -> Queued:
    (qos, retain, ids, share, expires_at, sender, cluster_id), pos = _read_head(data)
    message = unpack_message(data[pos:])
    message.expires_at = expires_at
    message.sender = sender
    message.cluster_id = bytes.fromhex(cluster_id) if cluster_id else None
    return Queued(message, qos, retain, tuple(ids), tuple(share) if share else None, seq)  # type: ignore[arg-type]


def pack_subscription(s: Subscription) -> bytes:
    return json.dumps([s.qos, s.no_local, s.retain_as_published, s.retain_handling, s.subscription_id,
                       s.share_group], separators=(",", ":")).encode()


def unpack_subscription(client_id: str, topic_filter: str, data: bytes) -> Subscription:
    qos, no_local, as_published, handling, subscription_id, group = json.loads(data)
    return Subscription(client_id=client_id, topic_filter=topic_filter, qos=qos, no_local=no_local,
                        retain_as_published=as_published, retain_handling=handling,
                        subscription_id=subscription_id, share_group=group)


def pack_will(message: Message, username: str | None, delay: int, due: float | None) -> bytes:
    """A client's will as a session keeps it: ``due`` None while its client is connected (armed:
    published by whoever finds the connection gone), else the clock time it is due."""
    head = json.dumps([username, delay, due], separators=(",", ":")).encode()
    return _headed(head) + pack_message(message, 0.0)


def unpack_will(data: bytes) -> tuple[Message, str | None, int, float | None]:
    (username, delay, due), pos = _read_head(data)
    return unpack_message(data[pos:]), username, delay, due


__all__ = ["pack_message", "unpack_message", "pack_forwarded", "pack_targeted", "targeted_head", "unpack_records", "records_of_0_1_0",
           "pack_queued", "unpack_queued", "pack_subscription", "unpack_subscription", "pack_will",
           "unpack_will", "pack_retained", "unpack_retained", "FORWARDED", "TARGETED", "HANDED"]

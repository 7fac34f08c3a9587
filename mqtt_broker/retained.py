"""Retained messages, kept in a tree of topic levels so a filter finds its matches directly."""

from __future__ import annotations

import itertools
from heapq import heapify, heappop, heappush
from typing import Iterator

from .history import MessageLog
from .message import NOT_CACHED, Message


_SORTED_KEPT_FROM = 64
"""A level with this many children or more keeps their names sorted, once ``in_order`` walked
it, until a child comes or goes; a narrower one is sorted at each walk, which costs less than a
list kept at each of a million levels of one child."""


class _Level:
    __slots__ = ("children", "message", "order", "logged")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.message: Message | None = None
        self.logged = 0
        """``RetainedMessages.logged`` of ``message``."""
        self.order: list[str] | None = None
        """The children's names sorted, kept for ``in_order``; None when not known."""

    def sorted_names(self) -> list[str]:
        """The children's names sorted (kept for the next walk if the level is wide)."""
        order = self.order
        if order is None:
            order = sorted(self.children)
            if len(order) >= _SORTED_KEPT_FROM:
                self.order = order
        return order


class RetainedMessages:
    """The last retained message of every topic [MQTT-3.3.1-5]."""

    def __init__(self, kept: bool = True, log: MessageLog | None = None) -> None:
        self.kept = kept
        """False without retained messages (``retain_available`` off): nothing is kept, whether
        restored from the store or told by another node of a cluster."""
        self.log = log
        """The message log, if any, whose progress each message notes as it is kept (``logged``)."""
        self._root = _Level()
        self.count = 0
        self.bytes = 0
        """The payload bytes of the messages kept."""
        self._expiring: list[tuple[float, int, str]] = []
        """A heap of (time, order, topic) (the order spares comparing topics): a topic's message
        expires no sooner than its entry's time. Kept anew with a later expiry, the entry stays
        and is moved on when its time comes (a topic kept anew every few seconds adds none)."""
        self._entries: dict[str, tuple[float, int, str]] = {}
        """Topic -> its entry in ``_expiring``. The others there are dead (their topic was
        deleted, or kept anew without an expiry or with a sooner one): they wait for their time,
        which may be years away, and the heap is rebuilt without them once they are the majority
        (as ``Deadlines`` does), so a topic per device cleared when it goes leaves nothing."""
        self._dead = 0
        self._order = itertools.count()
        self._lapsed: dict[str, Message] = {}
        """Topic -> its message, found expired (``_lapse``) and not deleted yet, in the order they
        expired: out of ``_expiring`` and ``_entries``, each is looked at once after its time,
        however often ``live`` asks."""

    def store(self, message: Message, logged: int | None = None) -> None:
        """Keep ``message`` for its topic; an empty payload deletes what was kept [MQTT-3.3.1-10].
        It keeps no encoding from now on (``NOT_CACHED``). ``logged``: see ``logged``; by default
        the log's last seq, the message being kept now."""
        if not self.kept:
            return
        if not message.payload:
            self.delete(message.topic)
            return
        message.encoded = NOT_CACHED
        if self._lapsed:
            self._lapsed.pop(message.topic, None)
        expires_at = message.expires_at
        if expires_at is None:
            self._forget(message.topic)
        else:
            entry = self._entries.get(message.topic)
            if entry is None or expires_at < entry[0]:
                self._forget(message.topic)
                entry = self._entries[message.topic] = (expires_at, next(self._order), message.topic)
                heappush(self._expiring, entry)
        node = self._root
        for level in message.topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Level()
                node.order = None
            node = child
        if node.message is None:
            self.count += 1
        else:
            self.bytes -= len(node.message.payload)
        self.bytes += len(message.payload)
        node.message = message
        node.logged = logged if logged is not None else self.log.last_seq if self.log is not None else 0

    def delete(self, topic: str) -> bool:
        path = [self._root]
        levels = topic.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        if path[-1].message is None:
            return False
        self.bytes -= len(path[-1].message.payload)
        path[-1].message = None
        self.count -= 1
        if self._lapsed:
            self._lapsed.pop(topic, None)
        self._forget(topic)
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.children or node.message is not None:
                break
            del path[depth - 1].children[levels[depth - 1]]
            path[depth - 1].order = None
        return True

    def expire(self, now: float, limit: int) -> list[str]:
        """Delete the messages whose expiry has passed [MQTT-3.3.2-5], looking at no more than
        ``limit`` of them (``due`` tells whether more are left); their topics."""
        if len(self._lapsed) < limit:
            self._lapse(now, limit - len(self._lapsed))
        topics = list(itertools.islice(self._lapsed, limit))
        for topic in topics:
            self.delete(topic)
        return topics

    def _lapse(self, now: float, limit: int | None = None) -> None:
        """Move the messages whose expiry has passed by ``now`` to ``_lapsed``, looking at no
        more than ``limit`` entries of ``_expiring`` (None: at every one due)."""
        expiring, entries, lapsed = self._expiring, self._entries, self._lapsed
        looked = 0
        while expiring and expiring[0][0] <= now and (limit is None or looked < limit):
            looked += 1
            entry = heappop(expiring)
            topic = entry[2]
            if entries.get(topic) is not entry:
                self._dead -= 1
                continue
            message = self.get(topic)
            assert message is not None and message.expires_at is not None  # (else it had no entry)
            if message.expires_at <= now:
                del entries[topic]
                lapsed[topic] = message
            else:  # kept anew, to expire later
                entry = entries[topic] = (message.expires_at, next(self._order), topic)
                heappush(expiring, entry)

    def due(self, now: float) -> bool:
        """Whether a message may have expired by ``now`` that ``expire`` has not deleted."""
        return bool(self._lapsed) or (bool(self._expiring) and self._expiring[0][0] <= now)

    def get(self, topic: str) -> Message | None:
        node = self._level(topic)
        return None if node is None else node.message

    def logged(self, topic: str) -> int:
        """The seq of the last message logged when the topic's retained message was kept here:
        the topic's logged messages up to it are older, those after it newer, or the retained
        message itself (one published here is kept, then logged). 0 when not known (read from the
        store at start-up) or without a log: as old as any logged."""
        node = self._level(topic)
        return 0 if node is None else node.logged

    def _level(self, topic: str) -> _Level | None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node

    def match(self, topic_filter: str) -> list[Message]:
        """Every retained message whose topic matches a (non-shared) filter."""
        return list(self.matching(topic_filter))

    def matching(self, topic_filter: str) -> Iterator[Message]:
        """The retained messages whose topics match a (non-shared) filter, found as they are
        asked for: a SUBSCRIBE that can take a few of a million walks no further. (The tree may
        not change while it is walked.)"""
        return _matching(self._root, topic_filter.split("/"), 0)

    def topics(self, limit: int) -> list[str]:
        """The first ``limit`` topics, ordered level by level (``in_order``)."""
        return [message.topic for message in itertools.islice(self.in_order(), limit)]

    def in_order(self) -> Iterator[Message]:
        """The messages by topic, level by level (as ``topic.split("/")`` compare), found as they
        are asked for: the admin API's pages of what may be a million walk no further than their
        end. A level of a million children (``dev/<id>``) is sorted at the first walk after one
        of them came or went, not at each. (The tree may not change while it is walked.)"""
        root = self._root
        stack = [(root, iter(root.sorted_names()))]
        while stack:
            node, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = node.children[name]
            if child.message is not None:
                yield child.message
            if child.children:
                stack.append((child, iter(child.sorted_names())))

    def live(self, now: float, limit: int | None = None) -> int:
        """How many are kept and not expired (``expire`` deletes those within a minute). A
        message is looked at once after its time, by the first call (or ``expire``) that comes;
        with ``limit``, no more than that many are looked at, and those not looked at yet count
        as kept."""
        self._lapse(now, limit)
        return self.count - len(self._lapsed)

    def _forget(self, topic: str) -> None:
        """The topic's entry to expire, if any, is dead: its message is gone, or has another
        expiry or none."""
        if self._entries.pop(topic, None) is None:
            return
        self._dead += 1
        expiring = self._expiring
        if self._dead == len(expiring):
            expiring.clear()
            self._dead = 0
        elif self._dead > 50 and self._dead * 2 > len(expiring):
            entries = self._entries
            expiring[:] = [entry for entry in expiring if entries.get(entry[2]) is entry]
            heapify(expiring)
            self._dead = 0

    def __iter__(self) -> Iterator[Message]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.message is not None:
                yield node.message
            stack.extend(node.children.values())

    def __len__(self) -> int:
        return self.count


def _matching(node: _Level, levels: list[str], index: int) -> Iterator[Message]:
    if index == len(levels):
        if node.message is not None:
            yield node.message
        return
    level = levels[index]
    if level == "#":
        # "a/#" matches "a" itself too [MQTT-4.7.1-2]; no leading wildcard matches "$" topics.
        stack = [node] if index else [c for name, c in node.children.items() if not name.startswith("$")]
        if index and node.message is not None:
            yield node.message
            stack = list(node.children.values())
        while stack:
            current = stack.pop()
            if current.message is not None:
                yield current.message
            stack.extend(current.children.values())
    elif level == "+":
        for name, child in node.children.items():
            if index or not name.startswith("$"):
                yield from _matching(child, levels, index + 1)
    else:
        exact = node.children.get(level)
        if exact is not None:
            yield from _matching(exact, levels, index + 1)

"""The message log: messages published to configured topic filters, kept (bounded) so that a new
subscriber can ask for them before the live ones.

A subscriber asks with an MQTT 5 subscription user property ``replay`` (or, for any version,
by subscribing to ``$replay/{spec}/{filter}``), where spec is ``all``, ``last:N`` (the last N
matching messages) or ``since:T`` (T an ISO 8601 time, or seconds since the epoch). The broker
sends the matching logged messages, oldest first, then goes on with live ones: both happen in one
reactor turn, so there is neither a gap nor a duplicate between them.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Iterable

from .message import Message, bare
from .topics import MAX_CACHED_TOPIC_LENGTH, filters_overlap, matches
from .wire.properties import encode_properties

REPLAY_PREFIX = "$replay/"
MAX_REPLAYS = 16
"""Replay requests one SUBSCRIBE may make; each reads the logs, the others are refused (0x97)."""


@dataclass(slots=True)
class Entry:
    seq: int
    message: Message
    at: float
    """Clock time it was published."""
    holders: int = 0
    """The logs that hold it: when the last one drops it, it is dropped from the store too."""
    size: int = 0
    """What ``history_max_bytes`` counts of it: its topic, payload and properties."""


class ReplayError(ValueError):
    """A replay request that cannot be understood."""


# A spec's N and seconds, in ASCII digits: int() and float() take more (other scripts' digits,
# "_", spaces, signs, exponents, nan and inf).
_COUNT = re.compile("[0-9]+")
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def parse_spec(spec: str) -> tuple[str, float]:
    """``all`` -> ("all", 0); ``last:N`` -> ("last", N); ``since:T`` -> ("since", epoch seconds),
    T an ISO 8601 time (the broker's local time without a UTC offset) or seconds in decimal."""
    kind, _, value = spec.partition(":")
    try:
        if spec == "all":
            return "all", 0
        if kind == "last" and _COUNT.fullmatch(value) and int(value) > 0:
            return "last", int(value)
        if kind == "since" and _SECONDS.fullmatch(value):
            seconds = float(value)
            if math.isfinite(seconds):  # (float() gives inf from 310 digits on)
                return "since", seconds
        elif kind == "since":
            return "since", datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:  # (not a time; or more digits than int() takes)
        pass
    raise ReplayError(f"replay request {spec!r} is not all, last:N or since:TIME")


def split_replay_filter(topic_filter: str) -> tuple[str | None, str]:
    """``$replay/last:10/a/#`` -> ("last:10", "a/#"); any other filter -> (None, filter)."""
    if not topic_filter.startswith(REPLAY_PREFIX):
        return None, topic_filter
    spec, _, inner = topic_filter[len(REPLAY_PREFIX):].partition("/")
    return spec, inner


class MessageLog:
    """One bounded log per configured filter; a message that matches several is kept once."""

    def __init__(self, filters: Iterable[str], max_messages: int, max_age: float, max_bytes: int) -> None:
        self.filters = list(filters)
        self.max_messages = max_messages
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._routes: dict[str, tuple[int, ...]] = {}
        """Topic -> indexes of the filters it matches (bounded cache)."""
        self._empty()

    def _empty(self) -> None:
        self._logs: list[deque[Entry]] = [deque() for _ in self.filters]
        self._sizes = [0] * len(self.filters)
        self._seq = 0
        self._dropped: list[int] = []
        """Seqs of the entries every log has dropped since ``take_dropped``."""

    def record(self, message: Message, now: float) -> Entry | None:
        """Log a message if its topic matches a configured filter; returns its entry."""
        topic = message.topic
        targets = self._routes.get(topic)
        if targets is None:
            targets = tuple(i for i, f in enumerate(self.filters) if matches(f, topic))
            if len(topic) <= MAX_CACHED_TOPIC_LENGTH:  # (10,000 of the longest would hold 650 MB)
                if len(self._routes) >= 10_000:
                    self._routes.clear()
                self._routes[topic] = targets
        if not targets:
            return None
        self._seq += 1
        # Topic and properties too: a 1-byte payload may come with 64 KiB of topic and megabytes
        # of user properties, which the log keeps as well.
        size = len(topic.encode("utf-8", "surrogatepass")) + len(message.payload) + (
            len(encode_properties(message.properties)) if message.properties else 0)
        entry = Entry(self._seq, bare(message), now, len(targets), size)
        for i in targets:
            self._logs[i].append(entry)
            self._sizes[i] += size
            self._trim(i, now)
        return entry

    def _trim(self, index: int, now: float) -> None:
        log = self._logs[index]
        while log and ((self.max_messages and len(log) > self.max_messages)
                       or (self.max_bytes and self._sizes[index] > self.max_bytes)
                       or (self.max_age and log[0].at < now - self.max_age)):
            entry = log.popleft()
            self._sizes[index] -= entry.size
            entry.holders -= 1
            if not entry.holders:
                self._dropped.append(entry.seq)

    def expire(self, now: float) -> None:
        """Drop what every log holds past its bounds by ``now`` (past history_max_age: a quiet
        filter's log is not trimmed by new messages); ``take_dropped`` tells which went."""
        for index in range(len(self._logs)):
            self._trim(index, now)

    def take_dropped(self) -> list[int]:
        """The seqs of the entries no log holds any more, since the last call (for the store:
        one quiet filter's old entries must not keep what the busy ones dropped)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def replay(self, topic_filter: str, spec: str, now: float) -> list[Entry]:
        """The entries of the logged messages that match ``topic_filter``, oldest first, as
        ``spec`` asks. Raises ReplayError for a spec that cannot be understood."""
        kind, value = parse_spec(spec)
        seen: dict[int, Entry] = {}
        for index, log in enumerate(self._logs):
            self._trim(index, now)
            if not filters_overlap(self.filters[index], topic_filter):
                continue  # nothing logged there can match
            for entry in log:
                if entry.seq not in seen and matches(topic_filter, entry.message.topic):
                    seen[entry.seq] = entry
        entries = [seen[seq] for seq in sorted(seen) if not seen[seq].message.expired(now)]
        if kind == "last":
            entries = entries[-int(value):]
        elif kind == "since":
            entries = [e for e in entries if e.at >= value]
        # Copies, whose messages' encodings go with their deliveries rather than stay in the log
        # (held by no log).
        return [replace(e, message=bare(e.message), holders=0) for e in entries]

    def restore(self, entries: Iterable[Entry]) -> None:
        """Take up logged entries read from a store (oldest first), in place of what it held (a
        service started again on its store)."""
        self._empty()
        for entry in entries:
            self._seq = max(self._seq, entry.seq - 1)
            if self.record(entry.message, entry.at) is None:  # its filter is no longer logged
                self._dropped.append(entry.seq)

    @property
    def last_seq(self) -> int:
        """The seq of the last message logged (0 before any): the next one's is greater."""
        return self._seq

    @property
    def oldest_seq(self) -> int:
        """The seq of the oldest entry any log still holds (everything older can be forgotten)."""
        heads = [log[0].seq for log in self._logs if log]
        return min(heads) if heads else self._seq + 1

    def __len__(self) -> int:
        return len({e.seq for log in self._logs for e in log})

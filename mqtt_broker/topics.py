"""Topic names and filters (MQTT section 4.7): validation, the subscription trie and its match cache."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Final, Iterator, NamedTuple

MAX_CACHED_TOPICS: Final = 10_000
MAX_CACHED_MATCHES: Final = 100_000
"""Clients' and shared groups' matches the cache holds at most, whatever the topics: 10,000
topics each matching 1,000 clients held 1.7 GB (a match is about 170 bytes). A group is one
match, whatever its size: the cache holds the group, not a copy of its members."""
MAX_RECENT_TOPICS: Final = 10_000
MAX_CACHED_TOPIC_LENGTH: Final = 1024
"""Longer topic names are matched each time and not listed as recent: 10,000 of the longest
(65,535 bytes) would hold 650 MB, for as long as nothing else is routed."""
MAX_SHARE_TURNS: Final = 10_000
MAX_TOPIC_LEVELS: Final = 128
"""Levels a topic name or filter may have (EMQX's default too): matching walks a tree level by
level, and a topic of thousands of levels would exhaust the interpreter's stack."""


def valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic: not empty, no wildcard [MQTT-3.3.2-2], [MQTT-4.7.3-1], at most
    MAX_TOPIC_LEVELS levels, and one an MQTT string can carry."""
    return bool(topic) and "+" not in topic and "#" not in topic and not too_deep(topic) and not too_long(topic)


def too_deep(topic: str) -> bool:
    """Whether a topic name or filter has more than MAX_TOPIC_LEVELS levels."""
    return len(topic) >= MAX_TOPIC_LEVELS and topic.count("/") >= MAX_TOPIC_LEVELS


def too_long(topic: str) -> bool:
    """Whether a topic name or filter is longer than an MQTT string, 65,535 bytes of UTF-8
    [MQTT-1.5.4]. (One decoded from a packet never is; an application's may be.)"""
    return len(topic) > 16_383 and len(topic.encode("utf-8", "surrogatepass")) > 65_535


def valid_topic_filter(topic_filter: str) -> bool:
    """A SUBSCRIBE filter: ``#`` only as the whole last level, ``+`` only as a whole level
    [MQTT-4.7.1-2, -3]; a ``$share/{group}/{filter}`` has a non-empty group without wildcards
    and a valid filter; at most MAX_TOPIC_LEVELS levels (a shared one's after its prefix, as the
    topics it matches have them)."""
    if not topic_filter or too_long(topic_filter):
        return False
    group, inner = split_shared(topic_filter)
    if group is not None:
        if not group or "+" in group or "#" in group or not inner:
            return False
        topic_filter = inner
    return not too_deep(topic_filter) and wildcards_in_place(topic_filter)


def wildcards_in_place(topic_filter: str) -> bool:
    """Whether a filter keeps MQTT's rules for its wildcards: ``#`` only as the whole last
    level, ``+`` only as a whole level [MQTT-4.7.1-2, -3] (the rest of ``valid_topic_filter``
    is this broker's own limits, and the shape of a shared subscription)."""
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def reserved(topic: str) -> bool:
    """Whether nobody may publish to the topic: ``$SYS`` is the broker's own, and ``$share``
    names shared subscriptions (a message there could reach no subscription but another group's,
    and retained, none)."""
    return topic[:1] == "$" and (topic.startswith("$SYS") or topic.startswith("$share"))


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/g/a/b`` -> ("g", "a/b"); any other filter -> (None, filter)."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    _, group, *rest = topic_filter.split("/", 2)
    return group, rest[0] if rest else ""


def has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Whether a (non-shared) filter matches a topic name, ``$`` rule included [MQTT-4.7.2-1]."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def filter_intersection(a: str, b: str) -> str | None:
    """The filter that matches exactly the topic names both (valid, non-shared) filters match, or
    None when no topic name matches both: ``a/+`` and ``+/b`` give ``a/b``, ``a/#`` and ``a``
    give ``a`` (``#`` also matches the parent level [MQTT-4.7.1-2]), ``#`` and ``$SYS/x`` give
    None (a filter starting with a wildcard matches no ``$`` topic [MQTT-4.7.2-1])."""
    a_levels, b_levels = a.split("/"), b.split("/")
    a_first, b_first = a_levels[0], b_levels[0]
    if (a_first in ("+", "#") and b_first.startswith("$")) or (b_first in ("+", "#") and a_first.startswith("$")):
        return None
    meet: list[str] = []
    for index in range(max(len(a_levels), len(b_levels))):
        x = a_levels[index] if index < len(a_levels) else None
        y = b_levels[index] if index < len(b_levels) else None
        if x == "#" or y == "#":
            meet += b_levels[index:] if x == "#" else a_levels[index:]
            break
        if x is None or y is None or (x != y and x != "+" and y != "+"):
            return None
        meet.append(y if x == "+" else x)
    # One empty level ("+" and "/#" meet there) is the empty string, no topic name [MQTT-4.7.3-1].
    return "/".join(meet) or None


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic name matches both (valid, non-shared) filters: ``a/+`` and ``+/b`` do
    (``a/b``), ``a/#`` and ``a`` do, ``#`` and ``$SYS/x`` do not [MQTT-4.7.2-1]."""
    return filter_intersection(a, b) is not None


@dataclass(slots=True, kw_only=True)
class Subscription:
    """One filter of one client's session, with the options it was granted."""

    client_id: str
    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None
    share_group: str | None = None


class SharedGroup:
    """The members of one shared subscription (group, filter), and apart from them those whose
    clients are connected, kept up to date as they come and go: a message picks one by its turn
    without looking at the others, whatever the group's size."""

    __slots__ = ("members", "connected", "_places")

    def __init__(self) -> None:
        self.members: dict[str, Subscription] = {}
        """Client id -> its subscription, connected or not."""
        self.connected: list[Subscription] = []
        """The members whose clients are connected, in no particular order (one that leaves
        takes the last one's place)."""
        self._places: dict[str, int] = {}
        """Client id -> its index in ``connected``."""

    def add(self, subscription: Subscription, connected: bool) -> None:
        """Add or replace a member's subscription."""
        client_id = subscription.client_id
        self.members[client_id] = subscription
        place = self._places.get(client_id)
        if place is not None:
            self.connected[place] = subscription
        self.set_connected(client_id, connected)

    def remove(self, client_id: str) -> Subscription | None:
        """Take a member out; its subscription, or None if it was none."""
        self.set_connected(client_id, False)
        return self.members.pop(client_id, None)

    def set_connected(self, client_id: str, connected: bool) -> None:
        """A member's client connected, or went away (a client that is no member: nothing)."""
        places = self._places
        place = places.get(client_id)
        if connected:
            subscription = self.members.get(client_id)
            if place is None and subscription is not None:
                places[client_id] = len(self.connected)
                self.connected.append(subscription)
        elif place is not None:
            del places[client_id]
            last = self.connected.pop()
            if last.client_id != client_id:
                self.connected[place] = last
                places[last.client_id] = place


class _Node:
    __slots__ = ("children", "subscribers", "shared")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscribers: dict[str, Subscription] = {}
        self.shared: dict[str, SharedGroup] = {}

    def empty(self) -> bool:
        return not (self.children or self.subscribers or self.shared)


class ClientMatch(NamedTuple):
    """One client's subscriptions matching a topic, and what they come to, worked out once per
    topic rather than once per message."""

    client_id: str
    subscriptions: list[Subscription]
    qos: int
    """The highest QoS granted."""
    retain_as_published: bool
    """Whether any keeps the retain flag."""
    subscription_ids: tuple[int, ...]
    no_local: bool
    """Whether any has No Local: then, for the client's own messages, the rest are worked out
    again without those."""


SharedGroups = list[tuple[tuple[str, str], SharedGroup]]
"""The shared groups a topic matches: ((group, shared filter), the group)."""

Match = tuple[list[ClientMatch], SharedGroups]
"""What a topic matches: a ClientMatch per subscribed client, and its SharedGroups."""


class SubscriptionTree:
    """Every session's subscriptions, by filter level, with a cache of topic -> subscribers."""

    def __init__(self) -> None:
        self._root = _Node()
        self._cache: dict[str, Match] = {}
        self._cached_matches = 0
        """The matches (a client's, a group member's) the cached results hold in all."""
        self.count = 0
        self.watch: Callable[[str, bool], None] | None = None
        """Called with (filter, True) when a filter gets its first subscriber and (filter,
        False) when it loses its last (a cluster node tells the others which filters it holds)."""
        self.watch_shared: Callable[[Subscription, bool], None] | None = None
        """Called, before ``watch``, with (subscription, True) when a client joins a shared group
        and (subscription, False) when it leaves (a cluster node tells the others which groups
        have a connected member here)."""
        self.recent: OrderedDict[str, None] = OrderedDict()
        """Topic names routed lately, oldest first, at most MAX_RECENT_TOPICS (for the admin API).
        Kept up to date from cache misses only: a topic in the cache was recorded at its miss, and
        the cache is cleared on every change of subscriptions and when full, so it costs cache
        hits nothing."""

    def add(self, subscription: Subscription, connected: bool = False) -> bool:
        """Add or replace a client's subscription; True when it replaced one [MQTT-3.8.4-3].
        ``connected``: whether its client is, for a shared one (see ``set_connected``)."""
        group, inner = split_shared(subscription.topic_filter)
        node = self._root
        for level in inner.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        shared = None
        if group is None:
            members = node.subscribers
        else:
            shared = node.shared.get(group)
            if shared is None:
                shared = node.shared[group] = SharedGroup()
            members = shared.members
        previous = members.get(subscription.client_id)
        if previous is not None and previous == subscription:
            if shared is not None:
                shared.set_connected(subscription.client_id, connected)
            return True  # the same again (a client subscribing again as it reconnects): matches stand
        replaced = previous is not None
        first = not members
        if shared is None:
            members[subscription.client_id] = subscription
        else:
            shared.add(subscription, connected)
        if not replaced:
            self.count += 1
            if group is not None and self.watch_shared is not None:
                self.watch_shared(subscription, True)
        if first and self.watch is not None:
            self.watch(subscription.topic_filter, True)
        if self._cache:
            self._cache.clear()
            self._cached_matches = 0
        return replaced

    def remove(self, client_id: str, topic_filter: str) -> bool:
        """Remove a client's subscription; False when it had none for that filter."""
        group, inner = split_shared(topic_filter)
        path = [self._root]
        for level in inner.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        if group is None:
            removed = node.subscribers.pop(client_id, None)
            left = bool(node.subscribers)
        else:
            shared = node.shared.get(group)
            removed = shared.remove(client_id) if shared is not None else None
            left = shared is not None and bool(shared.members)
        if removed is None:
            return False
        if group is not None:
            if not left:
                del node.shared[group]
            if self.watch_shared is not None:
                self.watch_shared(removed, False)
        self.count -= 1
        if not left and self.watch is not None:
            self.watch(topic_filter, False)
        if self._cache:
            self._cache.clear()
            self._cached_matches = 0
        # Prune the branch that is now empty, so the tree does not keep dead filters.
        levels = inner.split("/")
        for depth in range(len(levels), 0, -1):
            if not path[depth].empty():
                break
            del path[depth - 1].children[levels[depth - 1]]
        return True

    def match(self, topic: str) -> Match:
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        by_client: dict[str, list[Subscription]] = {}
        groups: dict[tuple[str, str], SharedGroup] = {}
        levels = topic.split("/")
        self._collect(self._root, levels, 0, topic.startswith("$"), by_client, groups)
        result: Match = ([ClientMatch(client_id, subs, *terms(subs)) for client_id, subs in by_client.items()],
                         list(groups.items()))
        if len(topic) > MAX_CACHED_TOPIC_LENGTH:
            return result
        size = len(result[0]) + len(result[1])
        if size > MAX_CACHED_MATCHES:
            return result
        if len(self._cache) >= MAX_CACHED_TOPICS or self._cached_matches + size > MAX_CACHED_MATCHES:
            self._cache.clear()
            self._cached_matches = 0
        self._cache[topic] = result
        self._cached_matches += size
        recent = self.recent
        if topic in recent:
            recent.move_to_end(topic)
        else:
            recent[topic] = None
            if len(recent) > MAX_RECENT_TOPICS:
                recent.popitem(last=False)
        return result

    def _collect(self, node: _Node, levels: list[str], index: int, dollar: bool,
                 by_client: dict[str, list[Subscription]], groups: dict[tuple[str, str], SharedGroup]) -> None:
        wild = not (dollar and index == 0)
        if wild:
            multi = node.children.get("#")
            if multi is not None:
                _gather(multi, levels, by_client, groups)
        if index == len(levels):
            _gather(node, levels, by_client, groups)
            return
        child = node.children.get(levels[index])
        if child is not None:
            self._collect(child, levels, index + 1, dollar, by_client, groups)
        if wild:
            child = node.children.get("+")
            if child is not None:
                self._collect(child, levels, index + 1, dollar, by_client, groups)

    def shared_group(self, group: str, topic_filter: str) -> SharedGroup | None:
        """One shared subscription group (``topic_filter`` is the whole ``$share/...`` filter),
        or None if it has no member."""
        node: _Node | None = self._root
        for level in split_shared(topic_filter)[1].split("/"):
            node = node.children.get(level) if node is not None else None
        return node.shared.get(group) if node is not None else None

    def set_connected(self, subscription: Subscription, connected: bool) -> None:
        """The client of a shared subscription held here connected, or went away: its group
        counts it among its connected members, or no longer (``SharedGroup.connected``). A
        subscription of no group: nothing."""
        group = split_shared(subscription.topic_filter)[0]
        if group is None:
            return
        shared = self.shared_group(group, subscription.topic_filter)
        if shared is not None:
            shared.set_connected(subscription.client_id, connected)

    def filters(self) -> list[str]:
        """Every filter some client holds, once (shared ones as ``$share/{group}/{filter}``)."""
        stack = [self._root]
        found = []
        while stack:
            node = stack.pop()
            if node.subscribers:
                found.append(next(iter(node.subscribers.values())).topic_filter)
            for shared in node.shared.values():
                found.append(next(iter(shared.members.values())).topic_filter)
            stack.extend(node.children.values())
        return found

    def __iter__(self) -> Iterator[Subscription]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield from node.subscribers.values()
            for shared in node.shared.values():
                yield from shared.members.values()
            stack.extend(node.children.values())


class Turns:
    """Whose turn it is in each shared group: a count per group, for at most ``limit`` groups,
    since groups come and go with their members and the counts only spread messages evenly.
    Once that many are counted, all are forgotten at once; from then on a group counted afresh
    starts at a random turn: from 0, more groups in use than the limit would each be forgotten
    before its next message, and give every message to its first member."""

    def __init__(self, limit: int = MAX_SHARE_TURNS) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._limit = limit
        self._forgotten = False

    def next(self, share: tuple[str, str]) -> int:
        """The turn of the group's next message."""
        turn = self.peek(share)
        if len(share[1]) <= MAX_CACHED_TOPIC_LENGTH:
            self._counts[share] = turn + 1
        return turn

    def peek(self, share: tuple[str, str]) -> int:
        """The turn ``next`` gives next, without taking it (for the longest filters, whose
        turns are not kept, one at random, as each of theirs is)."""
        counts = self._counts
        if len(share[1]) > MAX_CACHED_TOPIC_LENGTH:
            return random.getrandbits(30)  # (not kept: 10,000 of the longest would hold 650 MB)
        turn = counts.get(share)
        if turn is None:
            if len(counts) >= self._limit:
                counts.clear()
                self._forgotten = True
            turn = counts[share] = random.getrandbits(30) if self._forgotten else 0
        return turn

    def __len__(self) -> int:
        return len(self._counts)


def but_its_sender(members: list[Subscription], sender: str | None) -> list[Subscription]:
    """A shared group's members that may have a message from ``sender``: not the sender if its
    subscription has No Local, a bridge, which is not sent back what it publishes (no client may
    ask for it on a shared subscription [MQTT-3.8.3-4])."""
    if sender is None or not any(m.no_local for m in members):
        return members
    return [m for m in members if not (m.no_local and m.client_id == sender)]


def terms(subs: list[Subscription]) -> tuple[int, bool, tuple[int, ...], bool]:
    """What overlapping subscriptions of one client come to: one copy at the highest granted QoS,
    carrying every matching subscription identifier [MQTT-3.3.4-3, -5] (see ClientMatch)."""
    return (max(s.qos for s in subs), any(s.retain_as_published for s in subs),
            tuple(s.subscription_id for s in subs if s.subscription_id), any(s.no_local for s in subs))


def _gather(node: _Node, levels: list[str], by_client: dict[str, list[Subscription]],
            groups: dict[tuple[str, str], SharedGroup]) -> None:
    for client_id, subscription in node.subscribers.items():
        found = by_client.get(client_id)
        if found is None:
            by_client[client_id] = [subscription]
        else:
            found.append(subscription)
    # The group itself, not a copy of its members: (group, filter) names one node's group.
    for group, shared in node.shared.items():
        groups[(group, next(iter(shared.members.values())).topic_filter)] = shared

"""Topic access rules: Mosquitto's ``acl_file``, and the rules an authenticator hands out.

The ``acl_file`` format, read as Mosquitto 2.0 reads it::

    # rules before any "user" line apply to anonymous clients (no username)
    topic read public/#
    user alice
    topic readwrite alice/#          # access: read, write, readwrite (the default) or deny
    topic deny alice/secret
    pattern readwrite devices/%c/#   # %c: client id, %u: username; applies to every client

How a check is decided, as in Mosquitto's ``mosquitto_acl_check_default``:

1. The client's own rules (its ``user`` section, or the anonymous rules): a matching ``deny``
   refuses; else a matching rule that grants the access allows.
2. Otherwise the patterns, with ``%c``/``%u`` replaced (a pattern with ``%u`` is skipped for a
   client without a username). If the username or client id contains ``+``, ``#`` or ``/``
   this step refuses outright: substituted, such a name would widen the pattern or reach
   into another client's tree. (Mosquitto 2.0 checks ``+`` and ``#`` only; ``/`` is ours.)
   A matching ``deny`` pattern refuses; else a matching pattern that grants allows.
3. Otherwise refused. A filter that does not start with ``$`` never matches a ``$`` topic, so
   reading ``$SYS`` takes a rule such as ``topic read $SYS/#``.

Each message is checked for ``read`` when it is delivered, retained messages included. A
SUBSCRIBE is refused when its filter matches no topic the client may read
(:meth:`AclFile.can_subscribe`); Mosquitto grants every SUBSCRIBE and delivers nothing on such a
filter. With ``user alice``, ``topic readwrite alice/#`` and ``topic read shared/#``, alice's
``bob/#`` is refused; ``#``, ``+/x`` and ``shared/+/x`` are granted and filtered on delivery.

:class:`AccessRules` are the other kind: lists of filters carried by a JWT or an HTTP answer,
where ``%c`` and ``%u`` are replaced the same way (:meth:`AccessRules.for_client`). Pure
Python, no Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..topics import filter_intersection, matches, split_shared, valid_topic_filter
from .files import BLANKS, lines_of, read_utf8

DENY, READ, WRITE = 0, 1, 2
READWRITE = READ | WRITE
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READWRITE, "deny": DENY}
_SUBSTITUTION = re.compile(r"%[cu]")
DANGEROUS = frozenset("+#/")
"""Characters that make a username or client id unfit for ``%u``/``%c`` substitution."""


class AclFileError(ValueError):
    """An ACL file that cannot be read; ``str()`` names the file and line."""


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether a topic filter matches a topic name, as ``mosquitto_topic_matches_sub``: a ``$``
    topic is matched only by a filter that starts with ``$`` [MQTT-4.7.2-1]."""
    return matches(topic_filter, topic)


def filter_covers(granted: str, requested: str) -> bool:
    """Whether every topic ``requested`` can match is matched by ``granted`` (both valid,
    non-shared filters): ``a/#`` covers ``a/+/b`` and ``a``; ``a/+`` does not cover ``a/#``."""
    if requested in ("#", "/#"):
        # Their "#" matches no topic with zero levels below: that would be "", no topic name
        # [MQTT-4.7.3-1]. So "+/#" covers "#", and "+/+/#" covers "/#".
        requested = requested[:-1] + "+/#"
    if (granted[:1] == "$") != (requested[:1] == "$") and requested[:1] not in ("+", "#"):
        return False
    granted_levels = granted.split("/")
    requested_levels = requested.split("/")
    for index, level in enumerate(granted_levels):
        if level == "#":
            return True
        if index >= len(requested_levels):
            return False
        wanted = requested_levels[index]
        if wanted == "#" or (wanted == "+" and level != "+") or (level != "+" and level != wanted):
            return False
    if len(requested_levels) == len(granted_levels):
        return True
    # "a" is covered by "a/#" only, handled above; a longer request ending in "#" by nothing.
    return False


def substitute(pattern: str, client_id: str, username: str | None) -> str:
    """``pattern`` with ``%c`` replaced by the client id and ``%u`` by the username (nothing
    without one), in one pass like Mosquitto's: a substituted name is never scanned again, so a
    client id of "%u" stays literal. Check :func:`unfit_for_patterns` first, and
    :func:`reaches_dollar` after."""
    return _SUBSTITUTION.sub(lambda m: client_id if m.group() == "%c" else username or "", pattern)


def reaches_dollar(pattern: str, substituted: str) -> bool:
    """Whether a substitution made a pattern a ``$`` topic's (``%c/#`` for a client named
    ``$SYS``): the broker's own topics are not for a name to reach, and such a pattern is left
    out, unless it denies."""
    return substituted.startswith("$") and not pattern.startswith("$")


def unfit_for_patterns(client_id: str, username: str | None) -> bool:
    """Whether a client gets no pattern at all: its username or client id contains ``+``, ``#``
    or ``/``, which, substituted, would widen a pattern or reach into another client's tree."""
    return (username is not None and not DANGEROUS.isdisjoint(username)) or not DANGEROUS.isdisjoint(client_id)


@dataclass(frozen=True, slots=True)
class AccessRules:
    """Topic filters one client may publish to and subscribe to (and so read), handed out by an
    authenticator (JWT claims, an HTTP answer). When an :class:`Identity` carries rules, they
    alone decide for that client; ``acl_file`` is not consulted. Filters may hold ``%c`` and
    ``%u``, replaced by :meth:`for_client` as ``acl_file`` patterns are."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    @classmethod
    def from_lists(cls, publish: Iterable[str], subscribe: Iterable[str]) -> AccessRules:
        """Rules from two lists of filters; raises ValueError on a filter that is not valid."""
        publish, subscribe = tuple(publish), tuple(subscribe)
        for topic_filter in publish + subscribe:
            if (not isinstance(topic_filter, str) or not valid_topic_filter(topic_filter)
                    or topic_filter.startswith("$share/")):
                raise ValueError(f"not a topic filter: {topic_filter!r}")
        return cls(publish, subscribe)

    def for_client(self, client_id: str, username: str | None) -> AccessRules:
        """These rules for one client: ``%c``/``%u`` replaced as in ``acl_file`` patterns. A
        filter with ``%u`` is left out for a client without a username, and every filter with
        ``%c`` or ``%u`` when the client id or username contains ``+``, ``#`` or ``/`` (as
        ``acl_file`` gives such a client no pattern); so is one that the substitution leaves
        invalid (an empty username) or makes a ``$`` topic's (:func:`reaches_dollar`). Filters
        without either are kept as they are."""
        unfit = unfit_for_patterns(client_id, username)

        def applied(filters: tuple[str, ...]) -> tuple[str, ...]:
            kept = []
            for topic_filter in filters:
                if _SUBSTITUTION.search(topic_filter):
                    if unfit or (username is None and "%u" in topic_filter):
                        continue
                    substituted = substitute(topic_filter, client_id, username)
                    if not valid_topic_filter(substituted) or reaches_dollar(topic_filter, substituted):
                        continue
                    topic_filter = substituted
                kept.append(topic_filter)
            return tuple(kept)

        return AccessRules(applied(self.publish), applied(self.subscribe))

    def can_publish(self, topic: str) -> bool:
        return any(filter_matches(granted, topic) for granted in self.publish)

    def can_read(self, topic: str) -> bool:
        return any(filter_matches(granted, topic) for granted in self.subscribe)

    def can_subscribe(self, topic_filter: str) -> bool:
        """A filter is allowed when one of the ``subscribe`` filters covers it; for a shared
        subscription (``$share/{group}/{filter}``) the filter inside is checked.

        Stricter than the read-overlap test of :meth:`AclFile.can_subscribe`, and kept so: here
        the ``subscribe`` filters are an explicit permission to subscribe (``commands/d1/+``
        grants that filter and narrower ones, not ``commands/#`` or ``#``). The same list is what
        the client reads, and a filter covered by one of them matches a topic it may read (every
        valid filter matches some topic), so a filter allowed here never goes unread."""
        group, inner = split_shared(topic_filter)
        return any(filter_covers(granted, inner) for granted in self.subscribe)


class Unrestricted(AccessRules):
    """Rules that allow every topic, ``$`` ones too: a bridge's own session's, the broker's, past
    every ACL as Mosquitto lets a bridge (``$SYS`` stays the broker's to publish to)."""

    __slots__ = ()

    def can_publish(self, topic: str) -> bool:
        return True

    def can_read(self, topic: str) -> bool:
        return True

    def can_subscribe(self, topic_filter: str) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ``topic`` or ``pattern`` line."""

    access: int
    """DENY (0), READ (1), WRITE (2) or READWRITE (3)."""
    topic: str
    uses_username: bool = False
    uses_client_id: bool = False


@dataclass(frozen=True, slots=True)
class AclFile:
    """A parsed ``acl_file``. Rules keep Mosquitto's order: ``deny`` rules are checked before
    the others (in Mosquitto they are put at the front of their list)."""

    anonymous: tuple[AclRule, ...] = ()
    users: dict[str, tuple[AclRule, ...]] = field(default_factory=dict)
    patterns: tuple[AclRule, ...] = ()
    source: str = ""

    @classmethod
    def parse(cls, text: str, source: str = "") -> AclFile:
        """Read the text of an ACL file; raises AclFileError naming the line, where Mosquitto
        refuses to start (unknown keyword or access, missing username, invalid filter)."""
        anonymous: list[AclRule] = []
        users: dict[str, list[AclRule]] = {}
        patterns: list[AclRule] = []
        current = anonymous
        for number, line in enumerate(lines_of(text), 1):
            where = f"{source}, line {number}" if source else f"line {number}"
            line = line.rstrip(BLANKS)
            if line.lstrip(" ").startswith("#"):
                continue
            # Mosquitto splits on spaces only (strtok with " "): a tab is part of a word.
            words = line.lstrip(" ").split(" ", 1)
            keyword = words[0]
            rest = words[1].lstrip(" ") if len(words) > 1 else ""
            if not keyword:
                continue
            if keyword in ("topic", "pattern"):
                if not rest:
                    raise AclFileError(f"{where}: empty topic")
                first, _, topic = rest.partition(" ")
                topic = topic.strip(BLANKS)
                if topic:
                    if first not in _ACCESS:
                        raise AclFileError(f"{where}: unknown access {first!r} "
                                           "(read, write, readwrite or deny)")
                    access = _ACCESS[first]
                else:
                    # "topic read" alone grants readwrite on the topic "read", as in Mosquitto.
                    topic, access = first, READWRITE
                if not valid_topic_filter(topic) or len(topic.encode("utf-8")) > 65535:
                    raise AclFileError(f"{where}: invalid topic filter {topic!r}")
                if keyword == "topic":
                    current.append(AclRule(access, topic))
                else:
                    patterns.append(AclRule(access, topic, "%u" in topic, "%c" in topic))
            elif keyword == "user":
                username = rest.strip(BLANKS)
                if not username:
                    raise AclFileError(f"{where}: missing username")
                current = users.setdefault(username, [])
            else:
                raise AclFileError(f"{where}: unknown keyword {keyword!r} (topic, user or pattern)")
        return cls(_deny_first(anonymous), {name: _deny_first(rules) for name, rules in users.items()},
                   _deny_first(patterns), source)

    @classmethod
    def load(cls, path: str | Path) -> AclFile:
        """Read an ACL file; raises AclFileError (a ValueError) naming it."""
        return cls.parse(read_utf8(path, AclFileError), str(path))

    def check(self, client_id: str, username: str | None, topic: str, access: int) -> bool:
        """Whether the client may ``access`` (READ or WRITE) ``topic``."""
        for rule in self._own(username):
            if filter_matches(rule.topic, topic):
                if rule.access == DENY:
                    return False
                if rule.access & access:
                    return True
        for rule_access, pattern in self._patterns_for(client_id, username):
            if filter_matches(pattern, topic):
                if rule_access == DENY:
                    return False
                if rule_access & access:
                    return True
        return False

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        """Whether ``topic_filter`` (a valid filter, maybe ``$share/{group}/...``: the filter
        inside is checked) matches some topic the client may read. False means no message could
        ever be delivered on it, so the SUBSCRIBE is refused instead of granted in silence
        (Mosquitto grants it); :meth:`check` still filters each message on a granted one.

        Exact without ``deny`` rules: granted when some rule that grants ``read`` overlaps the
        filter. With them, a rule's overlap with the filter (itself a filter) counts as unreadable
        only when one ``deny`` rule that would be consulted for it covers all of it (for a pattern:
        the client's own ``deny`` rules and the ``deny`` patterns; for an own rule: its own ``deny``
        rules). Several denies that only together cover it do not refuse it: working that out is
        a set cover over filters, so such a filter is granted and filtered on delivery. Never
        refuses a filter that matches a readable topic."""
        _, inner = split_shared(topic_filter)
        own = self._own(username)
        own_denies = [rule.topic for rule in own if rule.access == DENY]
        for rule in own:
            if rule.access & READ and _readable_part(inner, rule.topic, own_denies):
                return True
        patterns = list(self._patterns_for(client_id, username))
        denies = own_denies + [pattern for access, pattern in patterns if access == DENY]
        return any(access & READ and _readable_part(inner, pattern, denies) for access, pattern in patterns)

    def _own(self, username: str | None) -> tuple[AclRule, ...]:
        """The client's own rules: the anonymous ones without a username, else its section's."""
        return self.anonymous if username is None else self.users.get(username, ())

    def _patterns_for(self, client_id: str, username: str | None) -> Iterator[tuple[int, str]]:
        """(access, filter) of each pattern that applies to the client, ``%c``/``%u`` replaced;
        none for a client unfit for patterns."""
        if not self.patterns or unfit_for_patterns(client_id, username):
            return
        for rule in self.patterns:
            if rule.uses_username and username is None:
                continue
            pattern = rule.topic
            if rule.uses_username or rule.uses_client_id:
                pattern = substitute(pattern, client_id, username)
                if rule.access != DENY and reaches_dollar(rule.topic, pattern):
                    continue  # (a deny still denies)
            yield rule.access, pattern


def _readable_part(topic_filter: str, granted: str, denies: list[str]) -> bool:
    """Whether ``granted`` overlaps ``topic_filter`` in topics that no single one of ``denies``
    covers all of."""
    overlap = filter_intersection(topic_filter, granted)
    return overlap is not None and not any(filter_covers(deny, overlap) for deny in denies)


def _deny_first(rules: list[AclRule]) -> tuple[AclRule, ...]:
    return tuple([r for r in rules if r.access == DENY] + [r for r in rules if r.access != DENY])


__all__ = ["AccessRules", "AclFile", "AclFileError", "AclRule", "filter_matches", "filter_covers", "substitute",
           "unfit_for_patterns", "reaches_dollar", "DENY", "READ", "WRITE", "READWRITE", "DANGEROUS"]

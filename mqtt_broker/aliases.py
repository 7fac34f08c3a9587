"""MQTT 5 topic aliases of one connection, both ways (section 3.3.2.3.4)."""

from __future__ import annotations

from collections import OrderedDict

from .wire.codes import MQTTError, ProtocolError, ReasonCode


class InboundAliases:
    """Aliases the client sets on its PUBLISHes, up to the maximum we announced."""

    __slots__ = ("maximum", "_topics")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._topics: dict[int, str] = {}

    def resolve(self, topic: str, alias: int) -> str:
        """The topic of a PUBLISH that carries an alias; sets the alias if a topic is given."""
        if not 0 < alias <= self.maximum:
            raise MQTTError(f"topic alias {alias} outside 1..{self.maximum}", ReasonCode.TOPIC_ALIAS_INVALID)  # [MQTT-3.3.2-9]
        if topic:
            self._topics[alias] = topic
            return topic
        known = self._topics.get(alias)
        if known is None:
            raise ProtocolError(f"topic alias {alias} used before it was set")  # a Protocol Error (MQTT 5 §3.3.4)
        return known


class OutboundAliases:
    """Aliases we use towards the client, up to its Topic Alias Maximum.

    Policy: the most recently used topics keep their aliases. A new topic takes a free alias,
    or else the alias of the least recently used topic. Memory follows the aliases in use, not
    the maximum (a client may announce 65,535 and be sent one topic).
    """

    __slots__ = ("maximum", "_aliases", "_free", "_next")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._aliases: OrderedDict[str, int] = OrderedDict()
        self._free: list[int] = []
        """Aliases given back by ``forget``."""
        self._next = 1
        """The lowest alias never handed out."""

    def assign(self, topic: str) -> tuple[int, bool]:
        """(alias, known): when ``known`` the topic may be sent empty; else send it with the alias."""
        aliases = self._aliases
        alias = aliases.get(topic)
        if alias is not None:
            aliases.move_to_end(topic)
            return alias, True
        if self._free:
            alias = self._free.pop()
        elif self._next <= self.maximum:
            alias = self._next
            self._next += 1
        else:
            _, alias = aliases.popitem(last=False)
        aliases[topic] = alias
        return alias, False

    def forget(self, topic: str) -> None:
        """Undo an assignment whose PUBLISH was not sent."""
        alias = self._aliases.pop(topic, None)
        if alias is not None:
            self._free.append(alias)

"""A bridge's settings: one ``[[bridge]]`` table of the TOML file, with Mosquitto's names.

Read by :class:`~mqtt_broker.config.BrokerConfig`; nothing here opens a connection.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..topics import MAX_TOPIC_LEVELS, matches, too_deep, too_long, valid_topic_filter, valid_topic_name

PROTOCOLS = {"mqttv31": 3, "mqttv311": 4, "mqttv50": 5}


class BridgeConfigError(ValueError):
    """A bad ``[[bridge]]`` table: ``key`` names the setting."""

    def __init__(self, reason: str, key: str | None = None) -> None:
        self.reason, self.key = reason, key
        super().__init__(f"{key}: {reason}" if key else reason)


@dataclass(frozen=True)
class BridgeTopic:
    """One ``topic`` line: ``pattern [[[out|in|both] qos] local-prefix remote-prefix]``.

    Out: the bridge subscribes to ``local_prefix + pattern`` here and publishes what it gets to
    the remote with ``local_prefix`` taken off (where the topic starts with it) and
    ``remote_prefix`` put before; in: the other way round."""

    pattern: str
    """The topic filter, without the prefixes; empty when both prefixes are the topics."""
    direction: str = "out"
    """``out`` (from here to the remote), ``in`` (from the remote to here) or ``both``."""
    qos: int = 0
    """The QoS of the bridge's subscriptions, here and on the remote."""
    local_prefix: str = ""
    """Put before the pattern on this broker."""
    remote_prefix: str = ""
    """Put before the pattern on the remote."""

    @classmethod
    def parse(cls, line: str) -> BridgeTopic:
        """A topic line as Mosquitto reads it: words between spaces, ``""`` for an empty pattern
        or prefix (nothing else is quoted: a topic may hold quotes and backslashes)."""
        words = ["" if word == '""' else word for word in line.split()]
        if not words or len(words) > 5 or len(words) == 4:
            raise BridgeConfigError(f"{line!r} is not: pattern [[[out|in|both] qos] local-prefix remote-prefix]",
                                    "topic")
        values: dict[str, Any] = {"pattern": words[0]}
        if len(words) > 1:
            values["direction"] = words[1].lower()  # (as Mosquitto reads it: OUT, In)
        if len(words) > 2:
            if not (words[2].isascii() and words[2].isdigit()):
                raise BridgeConfigError(f"{line!r}: QoS {words[2]!r} is not 0, 1 or 2", "topic")
            values["qos"] = int(words[2])
        if len(words) == 5:
            values["local_prefix"], values["remote_prefix"] = words[3], words[4]
        return cls(**values)

    def __post_init__(self) -> None:
        if self.direction not in ("out", "in", "both"):
            raise BridgeConfigError(f"direction {self.direction!r} is not out, in or both", "topic")
        if self.qos not in (0, 1, 2):
            raise BridgeConfigError(f"QoS {self.qos!r} is not 0, 1 or 2", "topic")
        for prefix in (self.local_prefix, self.remote_prefix):
            if "+" in prefix or "#" in prefix:
                raise BridgeConfigError(f"prefix {prefix!r} holds a wildcard", "topic")
        if not self.pattern and not (self.local_prefix and self.remote_prefix):
            raise BridgeConfigError("an empty pattern needs both prefixes (they are then the topics)", "topic")
        for topic_filter in (self.local_filter, self.remote_filter):
            if not valid_topic_filter(topic_filter) or "\x00" in topic_filter:
                raise BridgeConfigError(f"{topic_filter!r} is not a valid topic filter", "topic")
            # The messages of a shared subscription come under their topics, which no line maps.
            if topic_filter.startswith("$share/"):
                raise BridgeConfigError(f"{topic_filter!r}: a shared subscription cannot be bridged", "topic")
        if self.incoming and (self.local_filter == "$SYS" or self.local_filter.startswith("$SYS/")):
            raise BridgeConfigError(f"{self.local_filter!r}: this broker takes no PUBLISH to $SYS topics, a "
                                    "bridge's neither (bring them in under a local prefix)", "topic")

    @property
    def outgoing(self) -> bool:
        return self.direction in ("out", "both")

    @property
    def incoming(self) -> bool:
        return self.direction in ("in", "both")

    @property
    def local_filter(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote_filter(self) -> str:
        return self.remote_prefix + self.pattern

    def to_remote(self, topic: str) -> str | None:
        """The remote topic of a local one, or None if this line does not send it out."""
        if self.outgoing and matches(self.local_filter, topic):
            return _swap_prefix(topic, self.local_prefix, self.remote_prefix)
        return None

    def to_local(self, topic: str) -> str | None:
        """The local topic of a remote one, or None if this line does not bring it in."""
        if self.incoming and matches(self.remote_filter, topic):
            return _swap_prefix(topic, self.remote_prefix, self.local_prefix)
        return None


def _swap_prefix(topic: str, prefix: str, other: str) -> str:
    # As Mosquitto's bridge: the level a "#" pattern matches above it ("a" for "a/#") does not
    # start with the prefix, and keeps its name under the other one.
    return other + topic.removeprefix(prefix)


def mapped_problem(topic: str) -> str | None:
    """Why a topic a line mapped cannot be published (its prefix swapped: "" for "r/" with no
    local prefix, too deep or too long with a longer one); None if it can."""
    if not topic:
        return "an empty topic"
    if too_deep(topic):
        return f"more than {MAX_TOPIC_LEVELS} levels"
    if too_long(topic):
        return "a topic longer than 65,535 bytes"
    return None


_SCALARS: dict[str, type] = {"str": str, "bool": bool, "int": int, "str | None": str}


def _type_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` is not of a scalar field's type (by its annotation); None if it is, or if
    the field is not a scalar (the lists and restart_timeout are checked as they are read)."""
    expected = _SCALARS.get(kind)
    if expected is None or (value is None and kind == "str | None"):
        return None
    # bool is an int subclass: "qos = true" is a mistake, not 1.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return f"expected {expected.__name__}, got {value!r}"
    return None


def _address(text: str) -> tuple[str, int]:
    """host:port, host (port 1883), [IPv6]:port or [IPv6]."""
    address = text.strip()
    host, _, port = address.rpartition(":")
    if not host or address.endswith("]"):
        host, port = address, "1883"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # (::1 would be read as host ":" and port 1)
        raise BridgeConfigError(f"{text!r} is not host:port (an IPv6 address goes in brackets: [::1]:1883)",
                                "addresses")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise BridgeConfigError(f"{text!r} is not host:port", "addresses")
    return host, int(port)


@dataclass(frozen=True)
class BridgeConfig:
    """One bridge to another MQTT broker. The names are Mosquitto's bridge settings."""

    connection: str
    """The bridge's name, unique among the bridges: the admin API and the dashboard show it, and
    the ``$SYS/broker/bridges/<connection>/...`` topics are named after it."""
    addresses: list[str]
    """``host:port`` (port 1883 when left out), tried in turn when one cannot be reached."""
    topic: list[BridgeTopic]
    """What goes which way: Mosquitto's topic lines, ``pattern [[[out|in|both] qos] local-prefix
    remote-prefix]``, or tables with the same keys (see :class:`BridgeTopic`)."""
    remote_clientid: str = ""
    """Empty: ``<hostname>.<connection>``, as Mosquitto names it."""
    local_clientid: str = ""
    """The bridge's session on this broker, which queues what the remote has not taken yet.
    Empty: ``local.<remote_clientid>``."""
    remote_username: str | None = None
    """The username the bridge connects to the remote with; none when not set."""
    remote_password: str | None = None
    """The password sent with ``remote_username``."""
    cleansession: bool = False
    """Whether the remote forgets the bridge's session (and what it queued for it) when the link
    drops. The session on this broker is always kept, so nothing queued here is lost; the QoS 2
    messages the remote was part way through may be lost or come twice (docs/bridges.md)."""
    bridge_protocol_version: str = "mqttv311"
    """The MQTT version spoken to the remote: ``mqttv31``, ``mqttv311`` or ``mqttv50`` (with which
    a remote that speaks 3.1.1 only is spoken to in 3.1.1, until the bridge is restarted)."""
    keepalive_interval: int = 60
    """Keepalive asked of the remote, in seconds (0 to 65535)."""
    restart_timeout: tuple[float, float] = (5.0, 30.0)
    """Seconds before reconnecting: ``[base, cap]`` backs off exponentially from base to cap, with
    jitter; a single number waits that long every time."""
    try_private: bool = True
    """Tell an MQTT 3 remote that this is a bridge (bit 7 of the protocol level), so that it does
    not send back what the bridge publishes. MQTT 5 uses No Local instead."""
    notifications: bool = True
    """Publish the link's state, 1 or 0, retained, on ``notification_topic``: here, and on the
    remote unless notifications_local_only (there, the bridge's will publishes the 0)."""
    notification_topic: str = ""
    """Where the state is published, here and on the remote. Empty:
    ``$SYS/broker/connection/<remote_clientid>/state``, as Mosquitto names it."""
    notifications_local_only: bool = False
    """Publish the state notifications on this broker only, not on the remote."""
    bridge_outgoing_retain: bool = True
    """Keep the retain flag of what goes out (false: the remote gets no retained messages)."""
    bridge_attempt_unsubscribe: bool = True
    """UNSUBSCRIBE at the remote the filters of the out topics (not of an in topic too) as the
    link comes up, when the remote kept the bridge's session, as Mosquitto does: a topic changed
    from in or both to out stops coming in. False for a remote that refuses such UNSUBSCRIBEs."""
    bridge_max_packet_size: int = 0
    """Largest packet sent to the remote, in bytes, as Mosquitto's (with an MQTT 5 remote, the
    smaller of this and its Maximum Packet Size); 0: the remote's only. What comes from the
    remote is bounded by max_packet_size."""
    bridge_cafile: str = ""
    """CA certificates (PEM) the remote's certificate must chain to: setting it (or the other
    bridge_* files) makes the link TLS. The remote's name is checked against its address."""
    bridge_certfile: str = ""
    """Client certificate (PEM) the bridge presents to the remote; goes with bridge_keyfile."""
    bridge_keyfile: str = ""
    """Private key (PEM) of bridge_certfile."""
    bridge_insecure: bool = False
    """TLS without checking the remote's name (its chain is still checked): for tests only. With
    bridge_cafile, bridge_certfile or bridge_tls: alone, it is refused."""
    bridge_tls: bool = False
    """TLS with the platform's trusted CAs, when no bridge_cafile is given."""

    def __post_init__(self) -> None:
        if not self.connection or any(c in self.connection for c in "/+#\x00") or not self.connection.isprintable():
            raise BridgeConfigError(f"{self.connection!r} is not a name (no /, + or #)", "connection")
        if not self.addresses:
            raise BridgeConfigError("at least one host:port is needed", "addresses")
        for address in self.addresses:
            _address(address)
        if not self.topic:
            raise BridgeConfigError("at least one topic is needed", "topic")
        if self.bridge_protocol_version not in PROTOCOLS:
            raise BridgeConfigError(f"{self.bridge_protocol_version!r} is not one of {', '.join(PROTOCOLS)}",
                                    "bridge_protocol_version")
        if not 0 <= self.keepalive_interval <= 65535:
            raise BridgeConfigError(f"{self.keepalive_interval} is out of range (0..65535)", "keepalive_interval")
        base, cap = self.restart_timeout
        if not 0 < base <= cap < math.inf:
            raise BridgeConfigError(f"{list(self.restart_timeout)} is not base <= cap, both above 0 and finite",
                                    "restart_timeout")
        if self.bridge_max_packet_size < 0:
            raise BridgeConfigError("must be 0 or more", "bridge_max_packet_size")
        if bool(self.bridge_certfile) != bool(self.bridge_keyfile):
            raise BridgeConfigError("bridge_certfile and bridge_keyfile go together", "bridge_certfile")
        if self.remote_password is not None and self.remote_username is None:
            raise BridgeConfigError("a password needs remote_username", "remote_password")
        for f in dataclasses.fields(self):  # (no path, address or MQTT string holds U+0000 [MQTT-1.5.4-2])
            value = getattr(self, f.name)
            texts = value if isinstance(value, list) and f.name != "topic" else [value]
            if f.name != "remote_password" and any(isinstance(t, str) and "\x00" in t for t in texts):
                raise BridgeConfigError("holds U+0000", f.name)
        if self.bridge_insecure and not self.tls:
            raise BridgeConfigError("is for a TLS link: give bridge_cafile, bridge_certfile or bridge_tls",
                                    "bridge_insecure")
        # Published from the start: a topic no PUBLISH can carry would stop the bridge there.
        state_topic = self.state_topic
        if self.notifications and not valid_topic_name(state_topic):  # (U+0000 refused above)
            raise BridgeConfigError(f"{state_topic!r} is not a topic name",
                                    "notification_topic" if self.notification_topic else "remote_clientid")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BridgeConfig:
        """A bridge from its TOML table; raises BridgeConfigError naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(values)
        for key in values:
            if key not in fields:
                raise BridgeConfigError("unknown bridge setting", str(key))
        for key in ("connection", "addresses", "topic"):
            if key not in values:
                raise BridgeConfigError("missing", key)
        addresses = values["addresses"]
        if isinstance(addresses, str):
            addresses = [a for a in addresses.replace(",", " ").split() if a]
        if not (isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)):
            raise BridgeConfigError(f"expected host:port strings, got {values['addresses']!r}", "addresses")
        values["addresses"] = addresses
        topics = values["topic"]
        if isinstance(topics, (str, Mapping)):
            topics = [topics]
        parsed = []
        for entry in topics if isinstance(topics, list) else [topics]:
            if isinstance(entry, BridgeTopic):
                parsed.append(entry)
            elif isinstance(entry, str):
                parsed.append(BridgeTopic.parse(entry))
            elif isinstance(entry, Mapping):
                topic_fields = {f.name: f for f in dataclasses.fields(BridgeTopic)}
                unknown = set(entry) - set(topic_fields)
                if unknown:
                    raise BridgeConfigError(f"unknown topic setting {sorted(unknown)[0]!r}", "topic")
                for name, value in entry.items():
                    problem = _type_problem(str(topic_fields[name].type), value)
                    if problem:
                        raise BridgeConfigError(f"{name}: {problem}", "topic")
                if "pattern" not in entry:
                    raise BridgeConfigError("a topic table needs a pattern", "topic")
                parsed.append(BridgeTopic(**entry))
            else:
                raise BridgeConfigError(f"{entry!r} is not a topic line or table", "topic")
        values["topic"] = parsed
        if "restart_timeout" in values:
            timeout = values["restart_timeout"]
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
                timeout = (timeout, timeout)
            if not (isinstance(timeout, (list, tuple)) and len(timeout) == 2 and all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) for t in timeout)):
                raise BridgeConfigError(f"{timeout!r} is not seconds or [base, cap]", "restart_timeout")
            values["restart_timeout"] = (float(timeout[0]), float(timeout[1]))
        for name, value in values.items():
            problem = _type_problem(str(fields[name].type), value)
            if problem:  # (a password is not echoed)
                raise BridgeConfigError(problem.partition(", got")[0] if name == "remote_password" else problem, name)
        return cls(**values)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [_address(a) for a in self.addresses]

    @property
    def version(self) -> int:
        return PROTOCOLS[self.bridge_protocol_version]

    @property
    def tls(self) -> bool:
        return bool(self.bridge_cafile or self.bridge_certfile or self.bridge_tls)

    @property
    def remote_client_id(self) -> str:
        return self.remote_clientid or f"{socket.gethostname()}.{self.connection}"

    @property
    def local_client_id(self) -> str:
        return self.local_clientid or f"local.{self.remote_client_id}"

    @property
    def state_topic(self) -> str:
        """The topic of the link's state notifications, on both brokers."""
        return self.notification_topic or f"$SYS/broker/connection/{self.remote_client_id}/state"

    def to_remote(self, topic: str) -> str | None:
        """The remote topic of a local message: by the first ``topic`` line with a prefix that
        sends it; else the topic itself, if a line without prefixes sends it; else None."""
        return _first_mapping(self.topic, topic, BridgeTopic.to_remote)

    def to_local(self, topic: str) -> str | None:
        """The local topic of a remote message, as :meth:`to_remote` finds it."""
        return _first_mapping(self.topic, topic, BridgeTopic.to_local)


def _first_mapping(lines: list[BridgeTopic], topic: str, way: Callable[[BridgeTopic, str], str | None]) -> str | None:
    # Mosquitto's bridge maps by the lines with a prefix alone, in their order, wherever the
    # others are: a line without lets a message through, but does not keep it from being mapped.
    through = None
    for line in lines:
        mapped = way(line, topic)
        if mapped is not None:
            if line.local_prefix or line.remote_prefix:
                return mapped
            through = mapped
    return through


__all__ = ["BridgeConfig", "BridgeConfigError", "BridgeTopic", "mapped_problem"]

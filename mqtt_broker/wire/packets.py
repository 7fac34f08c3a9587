"""One class per MQTT control packet, shared by MQTT 3.1, 3.1.1 and 5.0; immutable but for
``Publish`` and ``Connect``, which are built for every message and every connection.

Fields that exist only in MQTT 5 (properties, reason codes) keep their defaults when a 3.x
packet is decoded, and are left out when one is encoded for 3.x.
"""

from __future__ import annotations

import copyreg
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final, Mapping, NoReturn, Union

from mypy_extensions import mypyc_attr

Properties = Mapping[str, Any]
"""MQTT 5 properties by name (``"message_expiry_interval"``). ``user_property`` is a list of
``(name, value)`` pairs and ``subscription_identifier`` a list of ints; every other value is an
int, a str or bytes."""



class _NoProperties(dict[str, Any]):
    """The shared empty property set: immutable and hashable, so it can be a dataclass default,
    and a dict, so that ``if properties`` and ``.get`` cost no Python-level call."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return 0

    def _immutable(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("NO_PROPERTIES is immutable")

    # One def each: mypyc takes neither a chained assignment in a class body nor a function
    # assigned as a method of a compiled class.
    def __setitem__(self, key: str, value: Any) -> NoReturn:
        self._immutable()

    def __delitem__(self, key: str) -> NoReturn:
        self._immutable()

    def setdefault(self, *args: Any) -> NoReturn:
        self._immutable()

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._immutable()

    def pop(self, *args: Any) -> NoReturn:
        self._immutable()

    def popitem(self) -> NoReturn:
        self._immutable()

    def clear(self) -> NoReturn:
        self._immutable()

    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]  # mypy wants __or__'s result type
        self._immutable()

    def __repr__(self) -> str:
        return "{}"

    def __reduce__(self) -> str:
        # Copied and pickled as the one it is: compiled, two of them compare unequal.
        return "NO_PROPERTIES"


NO_PROPERTIES: Final[Properties] = _NoProperties()

# Final (one name to a line): the compiled modules use the values, not a lookup of the name.
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14
AUTH: Final = 15

# Protocol levels as they appear in CONNECT.
MQTT_3_1: Final = 3
MQTT_3_1_1: Final = 4
MQTT_5: Final = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True, kw_only=True)
class Connect:
    # Not frozen, and its __init__ written out: one is decoded for every connection, and a
    # frozen dataclass's __init__ sets each field through object.__setattr__, interpreted even
    # when compiled; this one is native.
    protocol_name: str = "MQTT"
    protocol_level: int = MQTT_3_1_1
    clean_start: bool = True
    keep_alive: int = 0
    client_id: str = ""
    will: Will | None = None
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)  # hooks and logs may print a Connect
    properties: Properties = NO_PROPERTIES
    bridge: bool = False
    """MQTT 3.1/3.1.1 only: the client is a bridge (bit 7 of the protocol level, Mosquitto's
    try_private): it is not sent back the messages it publishes, and gets the retain flag as
    published."""

    def __init__(self, *, protocol_name: str = "MQTT", protocol_level: int = MQTT_3_1_1, clean_start: bool = True,
                 keep_alive: int = 0, client_id: str = "", will: Will | None = None, username: str | None = None,
                 password: bytes | None = None, properties: Properties = NO_PROPERTIES, bridge: bool = False) -> None:
        self.protocol_name = protocol_name
        self.protocol_level = protocol_level
        self.clean_start = clean_start
        self.keep_alive = keep_alive
        self.client_id = client_id
        self.will = will
        self.username = username
        self.password = password
        self.properties = properties
        self.bridge = bridge


@dataclass(frozen=True, slots=True, kw_only=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@mypyc_attr(allow_interpreted_subclasses=True)  # a FrameReader's publish_type, compiled (Message) or not
@dataclass(slots=True)
class Publish:
    # Not frozen, and positional arguments allowed: this is the packet of the hot path, and
    # a frozen __init__ costs an object.__setattr__ call per field, keyword arguments twice the
    # time of positional ones.
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = NO_PROPERTIES
    frame: bytes | None = field(default=None, compare=False, repr=False)
    """The whole packet as received, when a FrameReader decoded it: a broker can forward these
    bytes as they are instead of encoding the message again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Puback:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Pubrec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Pubrel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Pubcomp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionRequest:
    """One topic filter of a SUBSCRIBE with its options (the last three are MQTT 5 only)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[SubscriptionRequest, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES


def init_arguments(obj: Any) -> tuple[Any, tuple[object, ...]]:
    """``__reduce__`` of a dataclass that writes its ``__init__`` out, or is frozen: compiled, copy
    and pickle make one by calling its class, so they must pass its arguments, keyword-only ones
    by keyword (Python's default makes it empty, then sets its fields, which a frozen one refuses
    with FrozenInstanceError)."""
    fields = [f for f in dataclasses.fields(obj) if f.init]
    arguments = tuple(getattr(obj, f.name) for f in fields if not f.kw_only)
    keywords = {f.name: getattr(obj, f.name) for f in fields if f.kw_only}
    if keywords:
        return _called, (type(obj), arguments, keywords)
    return type(obj), arguments


def _called(cls: type, arguments: tuple[object, ...], keywords: dict[str, object]) -> Any:
    return cls(*arguments, **keywords)


# Registered for copy and pickle rather than given a __reduce__ each (or a base class for it):
# the frozen classes are copied and pickled as in the pure-Python build, compiled too.
for _frozen in (Will, Connack, Puback, Pubrec, Pubrel, Pubcomp, SubscriptionRequest, Subscribe, Suback,
                Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect, Auth):
    copyreg.pickle(_frozen, init_arguments)


Packet = Union[
    Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Suback,
    Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect, Auth,
]

PACKET_TYPES: Final[dict[type, int]] = {
    Connect: CONNECT, Connack: CONNACK, Publish: PUBLISH, Puback: PUBACK, Pubrec: PUBREC,
    Pubrel: PUBREL, Pubcomp: PUBCOMP, Subscribe: SUBSCRIBE, Suback: SUBACK,
    Unsubscribe: UNSUBSCRIBE, Unsuback: UNSUBACK, Pingreq: PINGREQ, Pingresp: PINGRESP,
    Disconnect: DISCONNECT, Auth: AUTH,
}

"""Which packet a client may send in which state of its connection: the one place that decides.

A connection starts AWAITING_CONNECT; a CONNECT moves it to CONNECTING while the broker (and any
connect hook) decides, or to AUTHENTICATING while an MQTT 5 enhanced authentication exchanges
AUTH packets, then CONNECTED; anything that ends it moves it to CLOSED, after which input is
ignored.
"""

from __future__ import annotations

from enum import Enum

from .message import Message
from .wire.codes import ProtocolError
from .wire.packets import (
    MQTT_5, Auth, Connect, Disconnect, Packet, Pingreq, Puback, Pubcomp, Publish, Pubrec, Pubrel,
    Subscribe, Unsubscribe,
)


class State(Enum):
    AWAITING_CONNECT = "awaiting CONNECT"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    CLOSED = "closed"

    # Members are singletons and compare by identity: hashed by identity too, in C, where
    # Enum's own __hash__ is a Python function (a state is looked up per packet).
    __hash__ = object.__hash__


# A client's PUBLISH is decoded into a Message (the protocol's reader is made so).
_FROM_CLIENT_CONNECTED = frozenset({
    Message, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Unsubscribe, Pingreq, Disconnect,
})

LEGAL: dict[State, frozenset[type]] = {
    State.AWAITING_CONNECT: frozenset({Connect}),  # [MQTT-3.1.0-1]
    # Input is held back while a CONNECT is being decided, so nothing arrives in CONNECTING.
    State.CONNECTING: frozenset(),
    State.AUTHENTICATING: frozenset({Auth, Disconnect}),  # [MQTT-3.1.2-30]
    State.CONNECTED: _FROM_CLIENT_CONNECTED,
    State.CLOSED: frozenset(),
}


def check(state: State, packet: Packet, version: int) -> None:
    """Raise ProtocolError if ``packet`` may not arrive from a client in ``state``."""
    kind = type(packet)
    if kind in LEGAL[state] or (kind is Auth and state is State.CONNECTED and version == MQTT_5):
        return
    if kind is Connect:
        raise ProtocolError("second CONNECT on a connection")  # [MQTT-3.1.0-2]
    name = "PUBLISH" if issubclass(kind, Publish) else kind.__name__.upper()
    if state is State.AWAITING_CONNECT:
        raise ProtocolError(f"{name} before CONNECT")
    raise ProtocolError(f"a client may not send {name}")

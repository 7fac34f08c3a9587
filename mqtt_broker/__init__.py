"""mqtt_broker: an MQTT 3.1, 3.1.1 and 5.0 broker on Twisted.

Names are imported on first use, so that ``import mqtt_broker.wire`` (the sans-IO codec) does not
pull in Twisted.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"

_EXPORTS = {
    "BrokerService": "broker", "BrokerConfig": "config", "ConfigError": "config",
    "Hooks": "hooks", "Refused": "hooks", "Client": "message", "Message": "message",
    "Subscription": "topics", "ReasonCode": "wire.codes",
}

# Written out, and the imports below as "X as X": type checkers read them (mypy --strict
# refuses names a package does not export explicitly).
__all__ = ["BrokerService", "BrokerConfig", "ConfigError", "Hooks", "Refused", "Client", "Message",
           "Subscription", "ReasonCode", "__version__", "compiled"]

if TYPE_CHECKING:
    compiled: bool
    """Whether the modules built with mypyc (the codec, topic matching, the message path) run compiled; False when
    the package was installed as pure Python (MQTT_BROKER_COMPILE=0, or no C compiler)."""

    from .broker import BrokerService as BrokerService
    from .config import BrokerConfig as BrokerConfig, ConfigError as ConfigError
    from .hooks import Hooks as Hooks, Refused as Refused
    from .message import Client as Client, Message as Message
    from .topics import Subscription as Subscription
    from .wire.codes import ReasonCode as ReasonCode


def __getattr__(name: str) -> Any:
    if name == "compiled":
        from importlib.machinery import ExtensionFileLoader

        from .wire import codec  # the compiled modules are built together: one tells for all
        value: Any = isinstance(codec.__loader__, ExtensionFileLoader)
    elif name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'mqtt_broker' has no attribute {name!r}")
    globals()[name] = value
    return value

"""mqtt_broker: an MQTT 3.1, 3.1.1 and 5.0 broker on Twisted."""

from .broker import BrokerService
from .config import BrokerConfig, ConfigError
from .hooks import Hooks, Refused
from .message import Client, Message
from .topics import Subscription
from .wire.codes import ReasonCode

__version__ = "0.1.0"

__all__ = [
    "BrokerService", "BrokerConfig", "ConfigError", "Hooks", "Refused", "Client", "Message",
    "Subscription", "ReasonCode", "__version__",
]

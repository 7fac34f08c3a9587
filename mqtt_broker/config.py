"""Broker settings: one dataclass, read from TOML, keyword arguments or the command line.

Names follow Mosquitto's where Mosquitto has the setting, so its users' knowledge carries over.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A setting that is unknown or has a bad value; the message names the key."""


def _setting(default: Any, help: str, minimum: int | None = 0, maximum: int | None = None) -> Any:
    metadata = {"help": help, "min": minimum, "max": maximum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    endpoints: list[str] = _setting(
        ["tcp:1883"], "Twisted endpoint strings to listen on (tcp:, ssl:, unix:, ...).")
    max_packet_size: int = _setting(
        16 * 1024 * 1024, "Largest packet accepted from a client, in bytes; larger ones close "
        "the connection (MQTT 5: DISCONNECT 0x95).", 2, 268_435_460)
    max_inflight_messages: int = _setting(
        20, "QoS 1/2 messages sent to a client and not yet acknowledged, per client.", 1, 65535)
    max_queued_messages: int = _setting(
        1000, "Messages queued per client while it is offline or slow; 0 for no limit. "
        "Messages beyond it are dropped and counted.")
    max_queued_bytes: int = _setting(
        0, "Payload bytes queued per client; 0 for no limit.")
    queue_qos0_messages: bool = _setting(
        False, "Queue QoS 0 messages for offline persistent sessions too.")
    max_keepalive: int = _setting(
        65535, "Largest keepalive a client may ask for, in seconds. An MQTT 3 client asking "
        "for more (or for 0) is refused with 'identifier rejected', as in Mosquitto.", 0, 65535)
    max_connections: int = _setting(
        -1, "Simultaneous client connections; -1 for no limit.", -1)
    max_qos: int = _setting(2, "Highest QoS the broker accepts and grants.", 0, 2)
    retain_available: bool = _setting(True, "Whether retained messages are supported.")
    allow_zero_length_clientid: bool = _setting(
        True, "Accept an empty client id (with clean session) and assign one.")
    auto_id_prefix: str = _setting("auto-", "Prefix of the client ids the broker assigns.")
    persistent_client_expiration: int = _setting(
        0, "Seconds after which a disconnected persistent session is discarded; 0 for never.")
    connect_timeout: float = _setting(
        10.0, "Seconds a new connection has to send CONNECT before it is closed.")
    retry_interval: float = _setting(
        20.0, "Seconds before an unacknowledged QoS 1/2 message is sent again to an MQTT 3 "
        "client on the same connection; 0 to resend only on reconnect. MQTT 5 forbids "
        "resending on a live connection, so it only ever resends on reconnect.")
    set_tcp_nodelay: bool = _setting(True, "Disable Nagle's algorithm on client sockets.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = type(f.default) if f.default is not dataclasses.MISSING else list
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{f.name}: expected {kind.__name__}, got {value!r}")
            if kind is list and not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{f.name}: expected a list of strings, got {value!r}")
            low, high = f.metadata["min"], f.metadata["max"]
            if kind in (int, float) and ((low is not None and value < low) or (high is not None and value > high)):
                raise ConfigError(f"{f.name}: {value!r} is out of range "
                                  f"({low if low is not None else '-inf'}..{high if high is not None else 'inf'})")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings") -> BrokerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown setting {key!r}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> BrokerConfig:
        """Read a TOML file; raises ConfigError naming the file and key on any problem."""
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        try:
            return cls.from_mapping(values, str(path))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> BrokerConfig:
        return self.from_mapping({**dataclasses.asdict(self), **changes})


def settings() -> list[dataclasses.Field[Any]]:
    """The settings, in declaration order, for documentation and the command line."""
    return list(dataclasses.fields(BrokerConfig))

"""Helpers for the bridge tests: our broker with ``[[bridge]]`` tables, and waiting for a bridge's
state through its retained ``$SYS/broker/connection/<remote_clientid>/state`` topic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho_helpers import PahoClient

from mqtt_broker.mosquitto import _toml as toml_value


def write_config(path: Path, settings: dict[str, Any], bridges: list[dict[str, Any]]) -> Path:
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    for bridge in bridges:
        lines.append("\n[[bridge]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in bridge.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class StateWatcher:
    """A client of our broker that follows a bridge's state topic (Mosquitto's, named by the
    bridge's ``remote_clientid``, without a ``notification_topic``)."""

    def __init__(self, port: int, remote_clientid: str) -> None:
        self.client = PahoClient(port, version=mqtt.MQTTv5)
        self.topic = f"$SYS/broker/connection/{remote_clientid}/state"
        self.client.subscribe(self.topic, 0)

    def wait_for(self, state: bytes) -> None:
        """Until the state topic says ``state`` (bounded by the client's WAIT per message)."""
        for _ in range(50):
            message = self.client.message()
            if message.topic == self.topic and message.payload == state:
                return
        raise AssertionError(f"{self.topic} never became {state!r}")

    def close(self) -> None:
        self.client.close()

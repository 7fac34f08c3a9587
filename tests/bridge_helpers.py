"""Helpers for the bridge tests: our broker with ``[[bridge]]`` tables, and waiting for a bridge's
state through its retained ``$SYS/broker/connection/<remote_clientid>/state`` topic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho_helpers import PahoClient
from protocol_helpers import make_broker
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from mqtt_broker import BrokerService
from mqtt_broker.mosquitto import _toml as toml_value

ATTEMPT_DELAY = 0.3
"""HostnameEndpoint's pause between attempts at an address's IPs: it sees an attempt fail at the next."""


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


class Bridged:
    """A broker in this process, on a MemoryReactorClock, with one bridge (named "up"), and a
    remote broker that the test joins it to: the bridge's attempt to reach the remote is the fake
    reactor's, and the test decides how it ends (``refuse``, ``accept``)."""

    def __init__(self, bridge: dict[str, Any], reactor: MemoryReactorClock | None = None, **settings: Any) -> None:
        self.reactor = reactor or MemoryReactorClock()
        settings.setdefault("sys_interval", 0)
        self.broker = BrokerService(endpoints=[], reactor=self.reactor, bridge=[bridge], **settings)
        self.remote = make_broker(sys_interval=0)
        self.pumps: list[iosim.IOPump] = []
        self.broker.startService()
        self.remote.startService()
        self.bridge = self.broker.bridges.get("up")

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def refuse(self) -> None:
        """The last connection attempt fails, as a closed port makes it."""
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        self.reactor.advance(ATTEMPT_DELAY)

    def accept(self) -> None:
        """The last connection attempt reaches the remote broker."""
        host, port, factory = self.reactor.tcpClients[-1][:3]
        client = factory.buildProtocol(IPv4Address("TCP", host, port))
        server = self.remote.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + len(self.pumps)))
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                                        greet=False))
        self.settle()

    def settle(self) -> None:
        """Until nothing more crosses (bounded): twice nothing, as a turn of either reactor may
        still write what the last pump brought."""
        quiet = 0
        for _ in range(50):
            moved = any([pump.pump() for pump in self.pumps])
            self.reactor.advance(0)
            self.remote.reactor.advance(0)
            quiet = 0 if moved else quiet + 1
            if quiet == 2:
                return
        raise AssertionError("the bridge kept talking")

    def step(self) -> None:
        """One exchange across the link, and a turn of each reactor."""
        for pump in self.pumps:
            pump.pump()
        self.reactor.advance(0)
        self.remote.reactor.advance(0)

    def drop(self) -> None:
        """The link to the remote is cut."""
        pump = self.pumps[-1]
        pump.clientIO.abortConnection()
        self.settle()
        self.pumps.remove(pump)

    def reconnect(self) -> None:
        """The bridge's next attempt (after its restart_timeout, 5 s at most), accepted."""
        before = self.attempts
        self.reactor.advance(6)
        assert self.attempts > before
        self.accept()
        assert self.bridge.state == "connected", self.bridge.last_error

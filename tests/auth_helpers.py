"""Helpers for the security tests: a real Mosquitto on a loopback port, a raw MQTT client
(the project's own codec over a blocking socket, so every reply is seen in order), a log
capture that checks no password leaks into the log, and what a reload came to."""

from __future__ import annotations

import getpass
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any, TypeVar

from conftest import free_port, wait_for_port
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mqtt_broker.wire import Connack, Connect, FrameReader, encode
from mqtt_broker.wire.packets import MQTT_5, Packet

WAIT = 10.0
T = TypeVar("T")


def reloaded(reload: Deferred[T]) -> T:
    """What a reload came to (raised, if it failed). Its files are read in the reactor's thread
    pool: with a reactor that has none (a task.Clock), in place, so it has fired."""
    outcome: list[Any] = []
    reload.addBoth(outcome.append)
    assert outcome, "the reload has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[no-any-return]


class Mosquitto:
    """``mosquitto -c`` with the given settings, on a free loopback port; ``stop()`` ends it."""

    def __init__(self, directory: Path, **settings: str | list[str]) -> None:
        """``settings``: a list is its key's lines, in order (a bridge's ``topic`` lines)."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        self.config = directory / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false",
                 # Started as root, Mosquitto switches to this user: stay who we are, so that it can
                 # read the test's files.
                 f"user {getpass.getuser()}", "log_dest stdout", "log_type all"]
        lines += [f"{key} {value}" for key, values in settings.items()
                  for value in (values if isinstance(values, list) else [values])]
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = directory / f"mosquitto-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=self._log,
                                        stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.process)  # type: ignore[arg-type]
        except Exception:
            self.stop()
            raise RuntimeError("mosquitto did not start:\n" + self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        self._log.close()


class RawClient:
    """One MQTT connection; ``next()`` returns the broker's packets in the order it sent them."""

    def __init__(self, port: int, client_id: str, username: str | None = None, password: bytes | None = None,
                 version: int = MQTT_5, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
                 **connect: Any) -> None:
        """Connects and reads the CONNACK; ``tls``: over TLS, the server named ``localhost``;
        ``connect``: more fields of the CONNECT (properties, keep_alive, ...)."""
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=WAIT)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.reader = FrameReader(version=version)
        self.pending: list[Packet] = []
        self.send(Connect(protocol_name="MQTT" if version > 3 else "MQIsdp", protocol_level=version,
                          client_id=client_id, username=username, password=password, **connect))
        connack = self.next()
        assert isinstance(connack, Connack), connack
        self.connack = connack

    def send(self, packet: Packet) -> None:
        self.sock.sendall(encode(packet, self.version))

    def next(self) -> Packet | None:
        """The next packet, or None once the broker closed the connection."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def until(self, kind: type) -> tuple[Packet | None, list[Packet]]:
        """Read up to the first packet of ``kind``; returns it and the packets before it."""
        seen: list[Packet] = []
        while True:
            packet = self.next()
            if packet is None or isinstance(packet, kind):
                return packet, seen
            seen.append(packet)

    def close(self) -> None:
        self.sock.close()


class LogCapture:
    """Every log event formatted while it is active (a context manager)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _observe(self, event: dict[str, object]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()  # type: ignore[attr-defined]
        self.lines.append(text)

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self._observe)

    def text(self) -> str:
        return "\n".join(self.lines)

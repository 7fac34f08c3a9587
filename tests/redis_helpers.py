"""A real redis-server for the cluster tests: its own process on a free loopback port, with the
append-only file fsynced at every write (the setting the cluster's durability promise assumes),
in a directory of its own; killed, stopped and started again on the same port and data."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from conftest import free_port, terminate, wait_for_port


class RedisServer:
    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="mqttbroker-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert redis_server() is not None, "redis-server is not installed (./scripts/test installs it)"
        self.log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)
        client = self.client()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # loading the append-only file
            try:
                client.ping()
                return
            except redis.exceptions.BusyLoadingError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not finish loading")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def kill(self) -> None:
        """SIGKILL: what the append-only file holds is what survives."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            terminate(self.process)
            self.log.close()

    def close(self) -> None:
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def redis_server() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0

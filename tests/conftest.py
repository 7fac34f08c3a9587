"""Shared fixtures: a broker run as a real process on a loopback port."""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.logger import globalLogPublisher

import mqtt_broker

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOT = Path(mqtt_broker.__file__).resolve().parent.parent
"""Where the tests import mqtt_broker from: this checkout, or the build scripts/test installed. A
Python subprocess that is given it on PYTHONPATH runs the same build as the tests."""


_HANDED_OUT: set[int] = set()


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # (Linux's default)


_EPHEMERAL_START = _ephemeral_ports_start()


def free_port() -> int:
    """A loopback port nothing listens on now, below the kernel's range of ephemeral ports, and
    never one this test run handed out before. A port the kernel hands out for binding to 0 is
    one it may give the next outgoing connection of any process (a Redis Sentinel's to its
    master took a broker's port before the broker listened on it), and two listeners of one
    test (a broker's MQTT and HTTP ports) must not get the same one."""
    for _ in range(1000):
        port = random.randrange(10_000, _EPHEMERAL_START)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # (in use)
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range in 1,000 tries")


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses every connection for the whole test: bound, not listening.
    A port from free_port() is free only until something else on the machine binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 15.0,
                  host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on the port (a bounded readiness poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"broker exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not ended ten seconds later."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


_LIMITED = ("import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)); "
            "runpy.run_module('twisted', run_name='__main__', alter_sys=True)")
"""``python -m twisted`` allowed as many open files as its first argument says (the hard limit
too: the broker raises its soft limit to the hard one)."""


class BrokerProcess:
    """``python -m twisted mqttbroker`` on a free loopback port."""

    def __init__(self, *args: str, port: int | None = None, cwd: Path = ROOT,
                 listen: str = "tcp:{port}:interface=127.0.0.1", data_dir: Path | None = None,
                 open_files: int | None = None) -> None:
        self.port = port or free_port()
        # Its own directory, removed at stop: the log is kept in memory from then on.
        self._log_dir = Path(tempfile.mkdtemp(prefix="mqttbroker-log-"))
        self.log_path = self._log_dir / f"mqttbroker-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self._stopped_output: str | None = None
        endpoint = ["--endpoint", listen.format(port=self.port)] if listen else []
        # A fresh SQLite store per broker unless the test names one (--data-dir/--persistence).
        self._own_data_dir = data_dir is None and not any(
            a.startswith(("--data-dir", "--persistence")) for a in args)
        if self._own_data_dir:
            data_dir = Path(tempfile.mkdtemp(prefix="mqttbroker-data-"))
        self.data_dir = data_dir
        store = ["--data-dir", str(data_dir)] if data_dir is not None else []
        python = [sys.executable, "-m", "twisted"]
        if open_files is not None:  # its RLIMIT_NOFILE (not preexec_fn: the tests run threads)
            python = [sys.executable, "-c", _LIMITED, str(open_files)]
        self.process = subprocess.Popen(
            [*python, "mqttbroker", *endpoint, *store, *args],
            cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.process)
        except Exception:
            self.stop()
            raise RuntimeError("broker did not start:\n" + self.output()) from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        if self._stopped_output is not None:
            return self._stopped_output
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The events logged so far (Twisted's JSON event stream). Each record ends with a
        newline: the last one may be still being written, and is left for the next call."""
        return [json.loads(record) for record in self.output().split("\x1e") if record.endswith("\n")]

    def stop(self) -> None:
        terminate(self.process)
        if self._stopped_output is None:
            self._stopped_output = self.output()
            self.log.close()
            shutil.rmtree(self._log_dir, ignore_errors=True)
        if self._own_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def broker_process() -> Iterator[type[BrokerProcess]]:
    """A factory: ``broker_process("--max-qos", "1")`` starts one; all are stopped after the test."""
    started: list[BrokerProcess] = []

    def start(*args: str, **kwargs: object) -> BrokerProcess:
        broker = BrokerProcess(*args, **kwargs)  # type: ignore[arg-type]
        started.append(broker)
        return broker

    yield start  # type: ignore[misc]
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_process: type[BrokerProcess]) -> BrokerProcess:
    """A broker process with default settings."""
    return broker_process()


def assert_every_field_set(made: Any, **given: Any) -> None:
    """A dataclass whose ``__init__`` is written out (native when compiled) sets every field: to
    what the call gave (``given``), else to its default. A field added to the class and not to the
    ``__init__`` would be a slot left unset."""
    for f in dataclasses.fields(made):
        value = getattr(made, f.name)  # AttributeError for an unset slot
        if f.name in given:
            assert value == given[f.name], f.name
        elif f.default is not dataclasses.MISSING:
            assert value == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert value == f.default_factory(), f.name
        else:
            raise AssertionError(f"{f.name} has no default and was not given")


_unhandled: list[str] = []


def _watch_unhandled(event: dict[str, Any]) -> None:
    failure = event.get("log_failure")
    if "Unhandled error in Deferred" in str(event.get("log_format", "")):
        _unhandled.append(repr(failure.value) if failure is not None else "")
    elif failure is not None and _unhandled and not _unhandled[-1]:  # (Twisted logs it next)
        _unhandled[-1] = repr(failure.value)


globalLogPublisher.addObserver(_watch_unhandled)


@pytest.fixture(autouse=True)
def no_unhandled_errors() -> Iterator[None]:
    """Fail the test that left a Deferred failing with nothing to handle it: collected later,
    its "Unhandled error in Deferred" was logged in whichever test collected garbage next (the
    young generations only: what a test made is there, and a whole collection per test would
    take a minute per thousand tests)."""
    yield
    gc.collect(1)
    found, _unhandled[:] = list(_unhandled), []
    assert not found, f"Deferreds failed with nothing to handle them: {found}"

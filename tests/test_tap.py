"""The twistd plugin's options and service, without running the reactor (as conch's test_tap) but
where a reload reads files in its thread pool."""

from __future__ import annotations

import dataclasses
import gc
import socket
import weakref
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from mqtt_broker import BrokerService
from mqtt_broker.broker import with_backlog
from mqtt_broker.config import BrokerConfig, settings

# As a server, twistd mqttbroker keeps its state in SQLite unless told otherwise.
TWISTD_DEFAULTS = BrokerConfig(persistence="sqlite")
from mqtt_broker.tap import GC_THRESHOLD, Options, makeService, tune_gc

from auth_helpers import reloaded
from conftest import free_port

# List settings (endpoints, websocket_endpoints, ...) have repeatable flags of their own.
FIELDS = [f for f in settings() if f.default is not dataclasses.MISSING]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def other_value(f: dataclasses.Field[Any]) -> tuple[str, Any]:
    """A valid value other than the default, as typed on the command line and as parsed."""
    default = f.default
    if isinstance(default, bool):
        return ("false", False) if default else ("true", True)
    if isinstance(default, int):
        high = f.metadata["max"]
        value = default + 1 if high is None or default + 1 <= high else default - 1
        return str(value), value
    if isinstance(default, float):
        return str(default + 0.5), default + 0.5
    assert isinstance(default, str)
    choices = f.metadata.get("choices")
    if choices:
        other = next(c for c in choices if c != default)
        return other, other
    if f.name == "cluster":  # a URL
        return "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"
    return default + "x", default + "x"


def bad_values(f: dataclasses.Field[Any]) -> list[str]:
    """Command-line values the setting must refuse."""
    kind = type(f.default)
    low, high = f.metadata["min"], f.metadata["max"]
    values: dict[type, list[str]] = {
        bool: ["maybe", "", "2"], int: ["x", "1.5", "", "0x10"], float: ["x", "", "nan", "inf"], str: []}
    out_of_range = [str(low - 1)] if low is not None else []
    out_of_range += [str(high + 1)] if high is not None else []
    return values[kind] + (out_of_range if kind in (int, float) else [])


@pytest.fixture(autouse=True)
def sighup_handler() -> Iterator[None]:
    """makeService sets the process's SIGHUP handler: each test leaves it as it was."""
    import signal
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text('endpoints = ["tcp:1884", "tcp:1885"]\nmax_qos = 1\nretain_available = false\n')
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that something else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# --- options ------------------------------------------------------------------------------

def test_no_arguments() -> None:
    options = parse()
    assert options["broker_config"] == TWISTD_DEFAULTS
    assert options["broker_config"].endpoints == ["tcp:1883"]


def test_version_names_the_build(capsys: pytest.CaptureFixture[str]) -> None:
    import mqtt_broker
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--version"])
    assert exited.value.code == 0
    build = "compiled" if mqtt_broker.compiled else "pure Python"
    assert capsys.readouterr().out.startswith(f"mqtt_broker {mqtt_broker.__version__} ({build})\nTwisted ")


def test_repeated_endpoint() -> None:
    options = parse("--endpoint", "tcp:1884", "-e", "tcp:1885:interface=127.0.0.1",
                    "--endpoint=unix:/tmp/mqtt.sock")
    assert options["broker_config"].endpoints == [
        "tcp:1884", "tcp:1885:interface=127.0.0.1", "unix:/tmp/mqtt.sock"]


def test_options_are_independent() -> None:
    parse("--endpoint", "tcp:1884")
    assert parse()["broker_config"].endpoints == ["tcp:1883"]


@pytest.mark.parametrize("name", [f.name for f in FIELDS])
def test_every_setting_is_a_flag(name: str) -> None:
    f = next(f for f in FIELDS if f.name == name)
    text, value = other_value(f)
    assert value != f.default
    config = parse(flag(name), text)["broker_config"]
    assert getattr(config, name) == value and type(getattr(config, name)) is type(f.default)
    assert config == TWISTD_DEFAULTS.replace(**{name: value})


@pytest.mark.parametrize("text,value", [
    ("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True),
    ("false", False), ("False", False), ("no", False), ("off", False), ("0", False)])
def test_bool_flag_spellings(text: str, value: bool) -> None:
    assert parse("--retain-available", text)["broker_config"].retain_available is value


def test_int_accepted_for_float_flag() -> None:
    config = parse("--connect-timeout", "3")["broker_config"]
    assert config.connect_timeout == 3.0 and type(config.connect_timeout) is float


def test_config_file_is_read(config_file: Path) -> None:
    config = parse("--config", str(config_file))["broker_config"]
    assert config == TWISTD_DEFAULTS.replace(endpoints=["tcp:1884", "tcp:1885"], max_qos=1, retain_available=False)
    assert parse("-c", str(config_file))["broker_config"] == config


def test_flags_override_config_file(config_file: Path) -> None:
    config = parse("--config", str(config_file), "--max-qos", "2")["broker_config"]
    assert config.max_qos == 2
    assert config.retain_available is False  # the file still applies where no flag is given
    assert config.endpoints == ["tcp:1884", "tcp:1885"]


def test_flag_order_does_not_matter(config_file: Path) -> None:
    config = parse("--max-qos", "0", "--config", str(config_file))["broker_config"]
    assert config.max_qos == 0


def test_endpoint_flags_replace_config_endpoints(config_file: Path) -> None:
    config = parse("--config", str(config_file), "--endpoint", "tcp:1886")["broker_config"]
    assert config.endpoints == ["tcp:1886"]
    assert config.max_qos == 1


@pytest.mark.parametrize("name,text", [(f.name, text) for f in FIELDS for text in bad_values(f)])
def test_bad_flag_value_names_the_flag(name: str, text: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse(flag(name), text)
    assert str(caught.value).startswith(flag(name) + ": ")


def test_bad_flag_value_messages() -> None:
    with pytest.raises(usage.UsageError, match=r"^--max-qos: 3 is out of range \(0\.\.2\)$"):
        parse("--max-qos", "3")
    with pytest.raises(usage.UsageError, match=r"^--max-qos: expected int, got 'two'$"):
        parse("--max-qos", "two")
    with pytest.raises(usage.UsageError, match=r"^--retain-available: expected bool, got 'maybe'$"):
        parse("--retain-available", "maybe")


@pytest.mark.parametrize("description", ["tcp:notaport", "nosuchtransport:1883", "tcp:1883:nosuchoption=1",
                                         "ssl:8883:nosuchoption=1", ""])
def test_bad_endpoint_names_the_flag(description: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse("--endpoint", "tcp:1884", "--endpoint", description)
    assert str(caught.value).startswith(f"--endpoint {description!r}: ")


def test_endpoint_files_are_left_to_start_up() -> None:
    """twistd enters --rundir after parsing options, so a relative key path cannot be checked yet."""
    config = parse("--endpoint", "ssl:8883:privateKey=key.pem:certKey=cert.pem")["broker_config"]
    assert config.endpoints == ["ssl:8883:privateKey=key.pem:certKey=cert.pem"]


@pytest.mark.parametrize("description", ["tcp:0:127.0.0.1:10", "tcp6:0:10", "unix:{tmp}/mqtt.sock:666:10",
                                         "haproxy:tcp:0:127.0.0.1:10", "tcp:0:backlog=10"])
def test_a_backlog_given_by_position_is_the_listeners(tmp_path: Path, description: str) -> None:
    """Twisted's endpoints take a backlog by position too (tcp:PORT:INTERFACE:BACKLOG): the
    listen_backlog added where no backlog= was written gave it twice, and start-up was a TypeError."""
    from twisted.internet import reactor

    from mqtt_broker.auth.tls import server_endpoint
    description = description.format(tmp=tmp_path)
    config = parse("--endpoint", description)["broker_config"]
    assert with_backlog(description, config.listen_backlog) == description
    endpoint = server_endpoint(reactor, with_backlog(description, config.listen_backlog))
    assert getattr(endpoint, "_wrappedEndpoint", endpoint)._backlog == 10


@pytest.mark.parametrize("description", ["tcp:0", "tcp:0:127.0.0.1", "tcp6:0", "unix:/run/mqtt.sock:666",
                                         "ssl:0:k.pem:c.pem:SSLv23_METHOD:127.0.0.1", "mqtts:0:caCerts=ca.pem",
                                         "haproxy:tcp:0:interface=127.0.0.1"])
def test_a_listener_without_a_backlog_gets_listen_backlog(description: str) -> None:
    assert with_backlog(description, 1024) == description + ":backlog=1024"


def test_an_encrypted_key_is_refused_as_such_without_asking_for_its_passphrase(tmp_path: Path) -> None:
    """Twisted's ssl: parser reads the key as it parses, and OpenSSL asks a terminal for the
    passphrase of an encrypted one: twistd waited at start-up for someone to type it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(private, hashes.SHA256()))
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"passphrase")))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(usage.UsageError) as caught:
        parse("--endpoint", f"ssl:8883:privateKey={key}:certKey={cert}")
    assert f"privateKey={key} is encrypted" in str(caught.value)


def test_the_help_gives_twistds_defaults() -> None:
    assert "(in data_dir; the default of twistd mqttbroker). [default: sqlite]" in " ".join(Options().getUsage().split())


def test_bad_endpoint_in_config_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('endpoints = ["tcp:notaport"]\n')
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path))
    assert str(caught.value).startswith(f"{path}: endpoints 'tcp:notaport': ")


def test_no_endpoint_at_all(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("endpoints = []\n")
    with pytest.raises(usage.UsageError, match="no endpoint to listen on"):
        parse("--config", str(path))
    assert parse("--config", str(path), "-e", "tcp:1884")["broker_config"].endpoints == ["tcp:1884"]


def test_unknown_config_key(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("max_qos = 1\nmaximum_qos = 1\n")
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path))
    assert str(caught.value) == f"{path}: maximum_qos: unknown setting"


def test_bad_config_value(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("max_qos = 5\n")
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path), "--max-qos", "1")
    assert str(caught.value) == f"{path}: max_qos: 5 is out of range (0..2)"


def test_unreadable_config(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path))
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_invalid_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("max_qos = = 1\n")
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path))
    assert str(caught.value).startswith(f"{path}: not valid TOML: ")


def test_unknown_flag() -> None:
    with pytest.raises(usage.UsageError, match="max-qoss"):
        parse("--max-qoss", "1")


def test_help_mentions_every_setting() -> None:
    for text in (str(Options()), Options().getUsage()):
        for f in FIELDS:
            assert flag(f.name) + "=" in text, f.name
        assert "--endpoint=" in text and "--config=" in text
        assert "tcp:1883" in text


# --- the service --------------------------------------------------------------------------

def test_make_service(config_file: Path) -> None:
    options = parse("--config", str(config_file), "--max-qos", "0", "--endpoint", "tcp:0")
    service = makeService(options)
    assert isinstance(service, BrokerService)
    assert IService.providedBy(service)
    assert service.config == options["broker_config"]
    assert service.config == TWISTD_DEFAULTS.replace(endpoints=["tcp:0"], max_qos=0, retain_available=False)
    assert not service.running and service.ports == []


def test_sighup_names_the_settings_only_a_restart_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changed in the file, an acl_file path or allow_anonymous was kept as it was, and all the
    log said was that the files were read again."""
    import signal

    from twisted.logger import capturedLogs

    from mqtt_broker import tap
    path = tmp_path / "broker.toml"
    path.write_text("max_qos = 2\nallow_anonymous = true\n")
    monkeypatch.chdir(tmp_path)
    options = parse("--config", "broker.toml", "--endpoint", "tcp:0")
    monkeypatch.chdir("/")  # as twistd's --rundir does after parsing
    service = makeService(options)
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)  # from the start
    with capturedLogs() as events:
        tap.reload(service, options)
    assert [e for e in events if e["log_level"].name == "warn"] == []
    path.write_text("max_qos = 1\nallow_anonymous = false\n")
    with capturedLogs() as events:
        tap.reload(service, options)
    [warning] = [e for e in events if e["log_level"].name == "warn"]
    assert warning["names"] == "max_qos, allow_anonymous"
    path.write_text("max_qos = 7\n")
    with capturedLogs() as events:
        tap.reload(service, options)
    [warning] = [e for e in events if e["log_level"].name == "warn"]
    assert "max_qos" in warning["error"] and "a restart may fail" in warning["log_format"]


@pytest.mark.parametrize("setting, value, named", [
    ("password_file", "{tmp}/absent", "absent"), ("acl_file", "{tmp}/absent", "absent"),
    ("jwt_secret_file", "{tmp}/absent", "absent"), ("jwt_algorithms", "RS256", "jwt_secret_file")])
@pytest_twisted.ensureDeferred
async def test_sighup_names_a_changed_file_that_would_stop_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     setting: str, value: str, named: str) -> None:
    """A new password_file that cannot be read was named as changed, only a restart applying it;
    the restart then failed on it. It is named as what would stop a restart."""
    from twisted.logger import capturedLogs

    path = tmp_path / "broker.toml"
    path.write_text("allow_anonymous = true\n")
    monkeypatch.chdir(tmp_path)
    options = parse("--config", "broker.toml", "--endpoint", "tcp:0")
    service = makeService(options)
    path.write_text(f'allow_anonymous = true\n{setting} = "{value.format(tmp=tmp_path)}"\n')
    with capturedLogs() as events:
        problems = await service.reload()  # (the files a restart would read, in the thread pool)
    [warning] = [e for e in events if e["log_level"].name == "warn"]
    assert warning["names"] == setting
    changed, problem = problems
    assert changed.endswith(f"until it restarts: {setting}")
    assert problem.startswith("a restart would fail: ") and named in problem, problem
    [error] = [e for e in events if e["log_level"].name == "error"]
    assert error["error"] in problem


@pytest_twisted.ensureDeferred
async def test_the_files_a_restart_would_read_are_read_in_the_thread_pool(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a setting changed (waiting for a restart), every reload parsed password_file again on
    the reactor, to tell whether a restart would fail: 0.46 s for 100,000 users."""
    import threading

    from mqtt_broker.auth.passwords import PasswordFile, PasswordHash
    on_the_reactor: list[bool] = []
    load = PasswordFile.load.__func__  # type: ignore[attr-defined]

    def watched(cls: type[PasswordFile], path: str | Path) -> PasswordFile:
        on_the_reactor.append(threading.current_thread() is threading.main_thread())
        return load(cls, path)  # type: ignore[no-any-return]
    (tmp_path / "pw").write_text(f"alice:{PasswordHash.create(b'a', iterations=101)}\n")
    path = tmp_path / "broker.toml"
    path.write_text(f'password_file = "{tmp_path / "pw"}"\nmax_qos = 2\n')
    service = makeService(parse("--config", str(path), "--endpoint", "tcp:0"))
    path.write_text(f'password_file = "{tmp_path / "pw"}"\nmax_qos = 1\n')
    monkeypatch.setattr(PasswordFile, "load", classmethod(watched))
    assert await service.reload() == [
        "settings changed since the broker started are not applied until it restarts: max_qos"]
    assert on_the_reactor == [False, False]  # the reload's, and the restart's


@pytest_twisted.ensureDeferred
async def test_a_reload_over_the_admin_api_reads_the_configuration_file_again(tmp_path: Path) -> None:
    """docs/operations.md: POST /config/reload names what could not be read again. The file of
    --config was read again on SIGHUP only: over the API, one that would stop a restart was
    answered {"reloaded": true}."""
    import json

    from twisted.web.test.requesthelper import DummyRequest

    from mqtt_broker.admin.api import ApiResource
    from mqtt_broker.admin.keys import hash_key
    path = tmp_path / "broker.toml"
    path.write_text(f'max_qos = 2\nhttp_api_keys = ["{hash_key("k")}"]\n')
    service = makeService(parse("--config", str(path), "--endpoint", "tcp:0"))
    api = ApiResource(service, service.operations)

    async def reload() -> Any:
        request = DummyRequest([b""])
        request.method, request.path = b"POST", b"/api/v1/config/reload"
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer k"])
        finished = request.notifyFinish()
        body = api.render(request)
        if not isinstance(body, bytes):
            await finished
            body = b"".join(request.written)
        return json.loads(body)
    assert await reload() == {"reloaded": True, "problems": []}
    path.write_text("max_qos = = 1\n")
    answer = await reload()
    assert answer["reloaded"] is False and str(path) in answer["problems"][0], answer
    path.write_text(f'max_qos = 1\nhttp_api_keys = ["{hash_key("k")}"]\n')
    assert (await reload())["problems"] == ["settings changed since the broker started are not applied until it restarts: max_qos"]


def test_make_service_defaults() -> None:
    service = makeService(parse())
    assert isinstance(service, BrokerService)
    assert service.config == TWISTD_DEFAULTS
    assert not service.running


def test_start_on_busy_port_raises(busy_port: int) -> None:
    service = makeService(parse("--endpoint", f"tcp:{busy_port}:interface=127.0.0.1"))
    with pytest.raises(CannotListenError):
        service.startService()
    assert not service.running and service.ports == []
    service.stopService()
    assert not service.running


def test_a_start_that_fails_closes_its_unix_socket_at_once(tmp_path: Path, busy_port: int) -> None:
    """Its file and lock are gone before the start raises: an application may end there, without
    the reactor's next turn (in which a stop closes listeners)."""
    service = makeService(parse("--persistence", "memory", "--endpoint", f"unix:{tmp_path}/mqtt.sock",
                                "--endpoint", f"tcp:{busy_port}:interface=127.0.0.1"))
    with pytest.raises(CannotListenError):
        service.startService()
    assert list(tmp_path.iterdir()) == [] and service.ports == []
    service.stopService()


def test_start_listens_and_stop_closes() -> None:
    """TCP listen is synchronous, so a started service accepts connections without a running
    reactor; closing the port is a delayed call, and the store's last write comes back from its
    thread, which this test runs by hand."""
    from twisted.internet import reactor

    port = free_port()
    service = makeService(parse("--endpoint", f"tcp:{port}:interface=127.0.0.1"))
    service.startService()
    try:
        assert service.running and len(service.ports) == 1
        host = service.ports[0].getHost()
        assert isinstance(host, IPv4Address) and (host.host, host.port) == ("127.0.0.1", port)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        stopped: list[Any] = []
        service.stopService().addBoth(stopped.append)
        for _ in range(3000):  # (the store's last write comes back from its thread through the reactor)
            if stopped:
                break
            reactor.runUntilCurrent()  # type: ignore[attr-defined]
            reactor.doIteration(0.01)  # type: ignore[attr-defined]
    assert stopped == [None]
    assert not service.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


class _Node:
    next: _Node


def test_a_running_broker_added_to_a_running_parent_is_not_started_again() -> None:
    """MultiService.addService starts what is added to a running parent: the broker listened a
    second time, and the $SYS update and retained sweep of its first start ran on after the stop."""
    reactor = MemoryReactorClock()
    parent = MultiService()
    parent.startService()
    broker = BrokerService(endpoints=["tcp:1883"], reactor=reactor)
    broker.startService()
    broker.setServiceParent(parent)
    assert len(reactor.tcpServers) == 1
    assert parent.stopService().called
    reactor.advance(100)
    assert not broker.running and reactor.getDelayedCalls() == []


class _SlowToStop(Service):
    def __init__(self) -> None:
        self.stopped: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stopped


def test_the_brokers_stop_waits_for_a_child_service_that_stops_later() -> None:
    """The broker is a MultiService (docs/embedding.md), whose stop waits for its children's, an
    application's service added to it among them: their Deferreds were dropped, and the broker's
    fired while they were still stopping."""
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), sys_interval=0)
    child = _SlowToStop()
    child.setServiceParent(broker)
    broker.startService()
    stopped = broker.stopService()
    assert not stopped.called
    child.stopped.callback(None)
    assert stopped.called


def test_a_twistd_broker_tunes_its_collector() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD and gc.get_freeze_count() > 10_000
        # From an empty young generation: had it been near its threshold, a collection between
        # making the cycle and dropping it would move the cycle on to an older generation, which
        # the collection below does not look at (it failed so, depending on the tests before).
        gc.collect()
        node = _Node()
        node.next = node
        garbage = weakref.ref(node)
        del node
        # Cycles still go by themselves: once more new containers than the young generation's
        # threshold are alive, the next allocation collects, with no gc.collect() asked for.
        alive = [[] for _ in range(GC_THRESHOLD[0] + 1)]
        assert garbage() is None and gc.isenabled()
        del alive
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# --- run by twistd ------------------------------------------------------------------------

def twistd(tmp_path: Path, *args: str, options: tuple[str, ...] = (), before: str = "") -> tuple[int, str]:
    """``twistd -n OPTIONS mqttbroker ARGS`` in tmp_path, to its end: its exit status and its output.
    ``before``: Python statements the process runs first."""
    import os
    import subprocess
    import sys

    from conftest import PACKAGE_ROOT
    done = subprocess.run([sys.executable, "-c", f"{before}\nfrom twisted.scripts.twistd import run; run()", "-n", *options,
                           "mqttbroker", "--persistence", "memory", *args],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    return done.returncode, done.stdout.decode(errors="replace")


def test_twistd_says_a_start_up_failure_in_one_line(tmp_path: Path, busy_port: int) -> None:
    """A port in use was the last line of forty lines of traceback."""
    status, output = twistd(tmp_path, "--endpoint", f"tcp:{busy_port}:interface=127.0.0.1")
    assert status == 1, output
    [line] = [line for line in output.splitlines() if "mqttbroker: " in line]
    assert line.endswith(f"mqttbroker: cannot start: Couldn't listen on 127.0.0.1:{busy_port}: "
                         f"[Errno 98] Address already in use."), output
    assert "Traceback" not in output and "File " not in output, output
    assert not (tmp_path / "twistd.pid").exists()  # removed, as for any exception


@pytest.mark.parametrize("failure", ["busy-port", "unusable-data-dir"])
def test_a_start_that_fails_leaves_no_unix_socket_or_lock_behind(tmp_path: Path, busy_port: int, failure: str) -> None:
    """Twisted closes a listener (unlinks a UNIX socket and releases its lock) at the reactor's
    next turn, which a twistd that fails to start never runs: the socket file and its lock,
    naming the PID, stayed on disk."""
    (tmp_path / "run").mkdir()
    (tmp_path / "file").write_text("")
    then = (["--endpoint", f"tcp:{busy_port}:interface=127.0.0.1"] if failure == "busy-port"
            else ["--persistence", "sqlite", "--data-dir", str(tmp_path / "file")])
    status, output = twistd(tmp_path, "--endpoint", f"unix:{tmp_path}/run/mqtt.sock", *then)
    assert status == 1 and "mqttbroker: cannot start: " in output, output
    assert list((tmp_path / "run").iterdir()) == []


def test_twistd_listens_over_the_unix_socket_and_lock_left_by_a_broker_of_its_process_id(tmp_path: Path,
                                                                                          busy_port: int) -> None:
    """A container's process 1 killed (the OOM killer) and restarted with its filesystem kept is
    process 1 again: its socket's lock named a live process, itself, and every start failed with
    "Cannot acquire lock". (The busy port ends the start once the socket is listened on.)"""
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "mqtt.sock"
    left = (f"import os, socket\nsocket.socket(socket.AF_UNIX).bind({str(path)!r})\n"
            f"os.symlink(str(os.getpid()), {f'{path}.lock'!r})")
    status, output = twistd(tmp_path, "--endpoint", f"unix:{path}", "--endpoint", f"tcp:{busy_port}:interface=127.0.0.1",
                            before=left)
    assert status == 1 and f"MQTT broker listening on unix:{path}" in output, output
    [line] = [line for line in output.splitlines() if "mqttbroker: " in line]
    assert line.endswith(f"mqttbroker: cannot start: Couldn't listen on 127.0.0.1:{busy_port}: "
                         f"[Errno 98] Address already in use."), output


def test_twistd_says_an_unusable_key_file_under_rundir_in_one_line(tmp_path: Path) -> None:
    """A relative key path is checked at start-up (under --rundir), where a file that is no PEM
    was a traceback: one line, as for an absolute path."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    (rundir / "server.pem").write_text("not a certificate\n")
    status, output = twistd(tmp_path, "--endpoint", "ssl:0:interface=127.0.0.1:privateKey=server.pem",
                            options=("--pidfile=", "--rundir", str(rundir)))
    assert status == 1 and "Traceback" not in output and "File " not in output, output
    [line] = [line for line in output.splitlines() if "mqttbroker: " in line]
    assert "mqttbroker: cannot start: endpoints: 'ssl:0:" in line and "server.pem" in line, output


def test_twistd_says_a_file_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    status, output = twistd(tmp_path, "--endpoint", "tcp:0:interface=127.0.0.1",
                            "--password-file", str(tmp_path / "missing"))
    assert (status, output.strip()) == (1, f"mqttbroker: cannot start: password_file: {tmp_path / 'missing'}: "
                                           "cannot read: No such file or directory")
    (tmp_path / "file").write_text("")
    status, output = twistd(tmp_path, "--endpoint", "tcp:0:interface=127.0.0.1", "--persistence", "sqlite",
                            "--data-dir", str(tmp_path / "file"))
    assert status == 1 and "Traceback" not in output, output
    assert output.splitlines()[-1].endswith(f"mqttbroker: cannot start: cannot use the data directory "
                                            f"{tmp_path / 'file'}: File exists"), output


def test_twistd_says_a_data_dir_that_cannot_keep_the_cluster_node_id_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    status, output = twistd(tmp_path, "--endpoint", "tcp:0:interface=127.0.0.1", "--cluster",
                            "redis://127.0.0.1:1/0", "--data-dir", str(tmp_path / "file"))
    assert (status, output.strip()) == (1, f"mqttbroker: cannot start: data_dir: cannot keep the cluster node id "
                                           f"in {tmp_path / 'file' / 'cluster-node-id'}: Not a directory")



@pytest.mark.parametrize("listener", ["--endpoint", "--websocket", "--http"])
def test_twistd_says_a_tls_file_it_cannot_read_in_one_line(tmp_path: Path, listener: str) -> None:
    """A key or certificate path with a typo in it ended twistd with forty lines of traceback."""
    missing = tmp_path / "server.pem"
    endpoint = f"ssl:0:interface=127.0.0.1:privateKey={missing}:certKey={missing}"
    status, output = twistd(tmp_path, listener, endpoint, *(("--endpoint", "tcp:0:interface=127.0.0.1")
                                                             if listener != "--endpoint" else ()))
    key = {"--endpoint": "endpoints", "--websocket": "websocket_endpoints", "--http": "http_endpoints"}[listener]
    assert status == 1 and "Traceback" not in output and "File " not in output, output
    [line] = [line for line in output.splitlines() if "mqttbroker: " in line]
    assert line.endswith(f"mqttbroker: cannot start: {key}: {endpoint!r}: {missing}: "
                         "cannot read: No such file or directory"), output


@pytest.mark.parametrize("endpoint", ["tcp:70000:interface=127.0.0.1", "unix:{tmp}/missing/mqtt.sock"],
                         ids=["port-out-of-range", "unix-missing-directory"])
def test_twistd_says_a_listener_it_cannot_open_in_one_line(tmp_path: Path, endpoint: str) -> None:
    """Twisted's parser takes either; the listen failed with OverflowError or FileNotFoundError,
    the last line of a traceback."""
    endpoint = endpoint.format(tmp=tmp_path)
    status, output = twistd(tmp_path, "--endpoint", endpoint)
    assert status == 1 and "Traceback" not in output and "File " not in output, output
    [line] = [line for line in output.splitlines() if "mqttbroker: " in line]
    assert f"mqttbroker: cannot start: endpoints: {endpoint!r}: " in line, output


def test_twistd_says_a_ca_file_it_cannot_read_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    status, output = twistd(tmp_path, "--endpoint", "tcp:0:interface=127.0.0.1", "--cluster",
                            "rediss://127.0.0.1:1/0", "--cluster-tls-ca-file", str(missing))
    assert (status, output.strip()) == (1, f"mqttbroker: cannot start: cluster_tls_ca_file: {missing}: "
                                           "cannot read: No such file or directory")
    missing.write_text("not a certificate\n")
    status, output = twistd(tmp_path, "--endpoint", "tcp:0:interface=127.0.0.1", "--cluster",
                            "rediss://127.0.0.1:1/0", "--cluster-tls-ca-file", str(missing))
    assert (status, output.strip()) == (1, f"mqttbroker: cannot start: cluster_tls_ca_file: {missing}: "
                                           "holds no PEM certificate")

def test_twistd_says_a_bad_setting_without_the_whole_help(tmp_path: Path) -> None:
    """twistd printed the 150 lines of --help above the one that said what was wrong."""
    status, output = twistd(tmp_path, "--max-packet-size", "big")
    assert (status, output) == (1, "mqttbroker: --max-packet-size: expected int, got 'big' (--help lists the settings)\n")
    status, output = twistd(tmp_path, "--max-packet-sise", "1")
    assert status == 1 and output.startswith("mqttbroker: option --max-packet-sise not recognized"), output


def test_an_application_s_options_still_raise_usage_errors() -> None:
    """Only a runner's (twistd's) options end the process; parsed by an application, they raise."""
    with pytest.raises(usage.UsageError, match="expected int"):
        parse("--max-packet-size", "big")


# --- what a bad setting's message says ---------------------------------------------------------

def test_no_password_of_a_url_is_told_in_an_error(tmp_path: Path) -> None:
    """The URL was echoed whole (stderr, the journal, a reload's warning, the API's problems)."""
    from twisted.logger import capturedLogs, formatEvent

    from mqtt_broker.config import ConfigError
    path = tmp_path / "broker.toml"
    path.write_text('cluster = "redis://:s3cret-pw@127.0.0.1:63799x/0"\n')
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path), "--endpoint", "tcp:0")
    assert "cluster: 'redis://:********@127.0.0.1:63799x/0': a bad port" in str(caught.value)
    path.write_text("max_qos = 2\n")
    service = makeService(parse("--config", str(path), "--endpoint", "tcp:0", "--persistence", "memory"))
    path.write_text('max_qos = 2\ncluster = "redis://:s3cret-pw@127.0.0.1:6379/zero"\n')
    with capturedLogs() as events:
        problems = reloaded(service.reload())
    assert problems and "cluster" in problems[0]
    assert "s3cret-pw" not in " ".join(formatEvent(e) for e in events) + " ".join(problems)
    options = parse("--endpoint", "tcp:0", "--persistence", "memory",
                    "--http-auth-url", "ftp://user:s3cret-pw@127.0.0.1/auth")
    with pytest.raises(ConfigError) as raised:
        makeService(options)
    assert str(raised.value) == "http_auth_url: 'ftp://user:********@127.0.0.1/auth' is not an http:// or https:// URL"


@pytest.mark.parametrize("url", ["redis://:s3cr#et@host:6379", "redis://user:s3cr#et@host:6379/0",
                                 "redis://user:s3cr/et@host:6379", "http://user:s3cr#et@auth.example/check",
                                 "http://user:s3cr/et@auth.example/"])
def test_no_password_holding_what_ends_a_urls_authority_is_told(url: str) -> None:
    """A password may hold an unescaped #, ? or /, which ends the authority as a URL parser reads
    it: the error told it (its port, as parsed, was part of the password)."""
    from mqtt_broker.auth.http_auth import HttpAuthenticator
    from mqtt_broker.config import ConfigError
    with pytest.raises(ValueError) as caught:
        if url.startswith("redis"):
            BrokerConfig.from_mapping({"cluster": url})
        else:
            HttpAuthenticator(url)
    assert isinstance(caught.value, ConfigError) and "s3cr" not in str(caught.value)


@pytest.mark.parametrize("text", ['http_api_keys = "Zx9-my-admin-key"\n', 'http_api_keys = ["Zx9-my-admin-key", 7]\n'])
def test_an_admin_key_of_the_wrong_type_is_not_echoed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path), "--endpoint", "tcp:0")
    assert "http_api_keys" in str(caught.value) and "Zx9-my-admin-key" not in str(caught.value)


@pytest.mark.parametrize("key", ["password_file", "acl_file", "jwt_secret_file", "endpoints"])
def test_a_nul_in_a_file_setting_or_an_endpoint_is_a_one_line_error(tmp_path: Path, key: str) -> None:
    """TOML strings may hold \\u0000: open() then raised ValueError ("embedded null byte") in the
    service, a traceback (a unix: endpoint's at listen)."""
    if key == "endpoints":
        text = f'endpoints = ["unix:{tmp_path}/mq\\u0000tt.sock"]\n'
    else:
        text = f'endpoints = ["tcp:0:interface=127.0.0.1"]\n{key} = "pw\\u0000d"\n'
    (tmp_path / "broker.toml").write_text(text)
    status, output = twistd(tmp_path, "--config", "broker.toml", options=("--pidfile=",))
    assert status == 1 and "Traceback" not in output, output[-600:]
    assert [line for line in output.splitlines() if "mqttbroker: " in line and key in line and "U+0000" in line]


@pytest.mark.parametrize("settings", [{"auto_id_prefix": "id\u0000"}, {"response_information": "reply/\u0000/{client_id}"}])
def test_a_string_sent_to_clients_holds_no_nul(settings: dict[str, Any]) -> None:
    """[MQTT-1.5.4-2]: each CONNACK carrying it was malformed."""
    from mqtt_broker.config import ConfigError
    with pytest.raises(ConfigError, match=f"{next(iter(settings))}: holds U\\+0000"):
        BrokerConfig(**settings)


@pytest.mark.parametrize("url", ["http://127.0.0.1:port/auth", "http://[::1/auth"])
def test_a_bad_http_auth_url_is_refused_at_start(url: str) -> None:
    """A bad port was taken, and every CONNECT then refused with a critical error logged; an
    unclosed IPv6 address ended the start with a traceback naming no setting."""
    from protocol_helpers import make_broker

    from mqtt_broker.config import ConfigError
    with pytest.raises(ConfigError, match=r"http_auth_url: .*: a bad port, or an unclosed \[IPv6 address\]"):
        make_broker(http_auth_url=url)


def test_an_unreadable_jwks_file_is_said_once(tmp_path: Path) -> None:
    from protocol_helpers import make_broker

    from mqtt_broker.config import ConfigError
    missing = tmp_path / "jwks.json"
    with pytest.raises(ConfigError) as caught:
        make_broker(jwt_jwks_file=str(missing))
    assert str(caught.value) == f"jwt_jwks_file: {missing}: cannot read: No such file or directory"

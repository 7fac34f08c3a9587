"""Moving from Mosquitto: real-world mosquitto.conf files (tests/mosquitto_configs/) converted,
started, and checked with the same clients against the same file run in Mosquitto."""

from __future__ import annotations

import getpass
import queue
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from auth_helpers import RawClient
from conftest import BrokerProcess, free_port, terminate, wait_for_port
from paho_helpers import PahoClient

from mqtt_broker.bridge.config import BridgeTopic
from mqtt_broker.mosquitto import convert, main
from mqtt_broker.wire import Connack
from mqtt_broker.wire.packets import MQTT_3_1_1, MQTT_5

CONFIGS = Path(__file__).parent / "mosquitto_configs"
USERS = {"alice": "wonderland", "admin": "s3cret", "bob": "builder"}
LOOPBACKS = ["tcp:1883:interface=127.0.0.1", "tcp6:1883:interface=\\:\\:1"]
"""Mosquitto 2's listeners without a listener (where the machine has an IPv6 loopback)."""


def materialize(name: str, directory: Path, **values: Any) -> Path:
    """Copy a config (and what it includes) with its placeholders filled in."""
    source = CONFIGS / name
    target = directory / "conf" / name
    if source.is_dir():
        shutil.copytree(source, target)
        config = target / "mosquitto.conf"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        for path in CONFIGS.glob(source.stem + ".*"):
            shutil.copy(path, target.parent / path.name)
        config = target
    for path in [config, *config.parent.rglob("*.conf"), *config.parent.glob("*.acl")]:
        text = path.read_text()
        for key, value in {"user": getpass.getuser(), "dir": directory, "here": path.parent, **values}.items():
            text = text.replace("{" + key + "}", str(value))
        path.write_text(text)
    return config


def password_file(directory: Path) -> None:
    path = directory / "passwords"
    path.write_text("")
    for user, password in USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, timeout=30)


class Server:
    """A broker running a mosquitto.conf: Mosquitto itself, or ours through --mosquitto-config."""

    def __init__(self, kind: str, config: Path, port: int, directory: Path) -> None:
        self.kind, self.port = kind, port
        (directory / "data").mkdir(exist_ok=True)
        if kind == "mosquitto":
            self.log = open(directory / "mosquitto.out", "wb")
            self.process = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(config)], stdout=self.log,
                                            stderr=subprocess.STDOUT)
            wait_for_port(port, self.process)  # type: ignore[arg-type]
        else:
            self.ours = BrokerProcess("--mosquitto-config", str(config), port=port, listen="", data_dir=directory / "ours")
            self.process = self.ours.process

    def stop(self) -> None:
        if self.kind == "mosquitto":
            terminate(self.process)  # type: ignore[arg-type]
            self.log.close()
        else:
            self.ours.stop()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(kind: str, name: str, port: int, **values: Any) -> Server:
        directory = tmp_path / kind
        directory.mkdir(exist_ok=True)
        password_file(directory)
        server = Server(kind, materialize(name, directory, port=port, **values), port, directory)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def login(port: int, username: str | None, password: str | None, version: int) -> int:
    # Keepalive 60, as clients send: an MQTT 3 client asking for none where max_keepalive is set is
    # refused by Mosquitto from 2.0.12 on, and here, but not by the 2.0.11 of Debian 12.
    client = RawClient(port, f"login-{username}", username=username,
                       password=password.encode() if password is not None else None, version=version,
                       keep_alive=60)
    client.sock.close()
    assert isinstance(client.connack, Connack)
    return client.connack.reason_code


LOGINS = [("alice", "wonderland"), ("alice", "wrong"), ("nobody", "x"), (None, None), ("admin", "s3cret")]


def logins(port: int) -> list[tuple[Any, ...]]:
    return [(user, password, version, login(port, user, password, version) == 0)
            for user, password in LOGINS for version in (MQTT_3_1_1, MQTT_5)]


@pytest.mark.parametrize("kind", ["mosquitto", "ours"])
def test_debian_default_with_a_local_listener(run: Callable[..., Server], kind: str) -> None:
    port = free_port()
    server = run(kind, "debian", port)
    outcomes = logins(port)
    assert outcomes == [(u, p, v, (u, p) in (("alice", "wonderland"), ("admin", "s3cret"))) for u, p, v, _ in outcomes]
    server.stop()


def acl_outcomes(port: int) -> dict[str, bool]:
    """Who may publish and read what under edge.acl, seen by a subscriber that may read all."""
    admin = PahoClient(port, client_id="admin-watch", username="admin", password="s3cret")
    admin.subscribe("#", 1)
    outcomes: dict[str, bool] = {}
    for user, topic in [("alice", "sensors/alice/temp"), ("alice", "sensors/bob/temp"), ("alice", "commands/alice"),
                        ("bob", "devices/bob/status"), ("bob", "devices/alice/status"), ("bob", "broadcast/all")]:
        client = PahoClient(port, client_id=f"pub-{user}", username=user, password=USERS[user])
        client.publish(topic, f"{user} {topic}".encode(), 1)
        outcomes[f"{user} publishes {topic}"] = not admin.no_message(0.5)
        client.close()
    for user, topic in [("alice", "commands/alice"), ("alice", "commands/bob"), ("bob", "broadcast/news"),
                        ("bob", "sensors/alice/temp")]:
        client = PahoClient(port, client_id=f"sub-{user}", username=user, password=USERS[user])
        client.subscribe(topic, 1)
        admin.publish(topic, b"to " + user.encode(), 1)
        outcomes[f"{user} reads {topic}"] = not client.no_message(0.5)
        client.close()
    admin.close()
    return outcomes


def test_edge_broker_with_tls_passwords_and_acls(run: Callable[..., Server], tmp_path: Path) -> None:
    from test_tls import make_certs
    certs = tmp_path / "certs"
    make_certs(certs)
    seen = {}
    for kind in ("mosquitto", "ours"):
        port, tls_port = free_port(), free_port()
        server = run(kind, "edge.conf", port, tls_port=tls_port, certs=certs)
        wait_for_port(tls_port, server.process)  # type: ignore[arg-type]
        tls_client = PahoClient(tls_port, client_id="tls", username="alice", password="wonderland",
                                ca_certs=str(certs / "ca.pem"))
        tls_client.close()
        seen[kind] = (logins(port), acl_outcomes(port))
        server.stop()
    assert seen["ours"] == seen["mosquitto"]
    logins_seen, acl = seen["ours"]
    assert acl["alice publishes sensors/alice/temp"] and not acl["alice publishes sensors/bob/temp"]
    assert acl["bob publishes devices/bob/status"] and not acl["bob publishes devices/alice/status"]
    assert acl["alice reads commands/alice"] and not acl["alice reads commands/bob"]


@pytest.mark.parametrize("kind", ["mosquitto", "ours"])
def test_bridge_to_a_cloud_broker(run: Callable[..., Server], tmp_path: Path, kind: str) -> None:
    from auth_helpers import Mosquitto
    cloud_broker = Mosquitto(tmp_path, allow_anonymous="true")
    try:
        port = free_port()
        run(kind, "cloud-bridge.conf", port, cloud_port=cloud_broker.port)
        cloud = PahoClient(cloud_broker.port)
        cloud.subscribe("edge1/#", 1)
        edge = PahoClient(port)
        edge.subscribe("commands/#", 1)
        # The bridge may still be connecting: publish until the first message crosses.
        for attempt in range(100):
            edge.publish("sensors/probe", str(attempt).encode(), 1)
            if not cloud.no_message(0.1):
                break
        else:
            raise AssertionError("the bridge never forwarded")
        edge.publish("sensors/temp", b"21", 1)
        got = cloud.message()
        while got.topic == "edge1/sensors/probe":
            got = cloud.message()
        assert (got.topic, got.payload) == ("edge1/sensors/temp", b"21")
        cloud.publish("edge1/commands/reboot", b"now", 1)
        got = edge.message()
        assert (got.topic, got.payload) == ("commands/reboot", b"now")
        cloud.close()
        edge.close()
    finally:
        cloud_broker.stop()


@pytest.mark.parametrize("kind", ["mosquitto", "ours"])
def test_websocket_listener(run: Callable[..., Server], kind: str) -> None:
    port, ws_port = free_port(), free_port()
    server = run(kind, "websockets.conf", port, ws_port=ws_port)
    wait_for_port(ws_port, server.process)  # type: ignore[arg-type]
    received: list[bytes] = []
    ws = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ws", transport="websockets")
    ws.ws_set_options(path="/mqtt")
    import queue
    messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    ws.on_message = lambda c, u, m: messages.put(m)
    subscribed: queue.Queue[Any] = queue.Queue()
    ws.on_subscribe = lambda c, u, mid, rcs, props: subscribed.put(rcs)
    ws.connect("127.0.0.1", ws_port)
    ws.loop_start()
    try:
        ws.subscribe("chat/#", 1)
        subscribed.get(timeout=10)
        tcp = PahoClient(port)
        tcp.publish("chat/room", b"hello over TCP", 1)
        received.append(messages.get(timeout=10).payload)
        tcp.close()
    finally:
        ws.disconnect()
        ws.loop_stop()
    assert received == [b"hello over TCP"]


# --- the conversion itself ------------------------------------------------------------------

def test_the_debian_default_file_converts_with_notes(tmp_path: Path) -> None:
    config = materialize("debian", tmp_path, port=18830)
    conversion = convert(config)
    settings = conversion.settings
    assert settings["endpoints"] == ["tcp:18830:interface=127.0.0.1"]
    assert settings["persistence"] == "sqlite" and settings["data_dir"] == f"{tmp_path}/data"
    assert settings["allow_anonymous"] is False
    assert settings["password_file"] == f"{tmp_path}/passwords"
    notes = {(Path(n.source).name, n.line, n.text.split()[0]) for n in conversion.notes}
    assert notes == {("mosquitto.conf", 6, "pid_file"), ("mosquitto.conf", 8, "persistence"),
                     ("mosquitto.conf", 11, "log_dest"), ("local.conf", 2, "user")}
    conversion.config()  # valid settings


def test_persistence_true_says_mosquittos_database_is_not_read(tmp_path: Path) -> None:
    """The store starts empty beside Mosquitto's mosquitto.db: the retained messages and sessions
    Mosquitto kept are gone after the move, and nothing said so."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883\npersistence true\npersistence_location {tmp_path}/\n")
    (note,) = [n for n in convert(path).notes if "mosquitto.db" in n.why]
    assert (note.line, note.text, note.carried) == (2, "persistence true", True)
    assert note.why == ("as the SQLite store, which does not read Mosquitto's database (mosquitto.db): the broker "
                        "starts without the retained messages, sessions and queued messages Mosquitto kept")
    path.write_text("listener 1883\npersistence true\npersistence false\n")
    assert convert(path).notes == []


def test_no_listener_is_local_only_and_anonymous(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("persistence false\n")
    settings = convert(path).settings
    assert settings["endpoints"] == LOOPBACKS
    assert settings["allow_anonymous"] is True and settings["persistence"] == "memory"


def test_no_listener_answers_on_the_ipv6_loopback_too(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 without a listener opens 127.0.0.1 and ::1 (port 1883, "Opening ipv6
    listen socket", mosquitto_pub -h ::1 answered); converted, only 127.0.0.1 answered."""
    if not socket.has_ipv6:
        pytest.fail("the machine has no IPv6 loopback")
    path = tmp_path / "m.conf"
    path.write_text("persistence false\n")
    conversion = convert(path)
    port = free_port()  # (for 1883, which this machine may have in use)
    conversion.settings["endpoints"] = [e.replace(":1883:", f":{port}:") for e in conversion.settings["endpoints"]]
    config = tmp_path / "converted.toml"
    config.write_text(conversion.toml())
    broker = BrokerProcess("--config", str(config), port=port, listen="")
    try:
        wait_for_port(port, broker.process, host="::1")
        client = RawClient(port, "six", host="::1", version=MQTT_3_1_1)
        client.sock.close()
        assert isinstance(client.connack, Connack) and client.connack.reason_code == 0
    finally:
        broker.stop()


def test_no_listener_leaves_the_ipv6_loopback_out_where_there_is_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As Mosquitto opens what it can: a broker that failed to start on ::1 would be no answer."""
    import mqtt_broker.mosquitto
    monkeypatch.setattr(mqtt_broker.mosquitto, "_ipv6_loopback", lambda: False)
    path = tmp_path / "m.conf"
    path.write_text("persistence false\n")
    assert convert(path).settings["endpoints"] == ["tcp:1883:interface=127.0.0.1"]


def test_tls_listeners_become_ssl_or_mqtts_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 8883\ncertfile /c/server.pem\nkeyfile /c/server.key\n"
                    "listener 8884 ::1\ncertfile /c/s.pem\nkeyfile /c/s.key\ncafile /c/ca.pem\nrequire_certificate true\n"
                    "use_identity_as_username true\n"
                    "listener 0 /run/mqtt.sock\nlistener 9001\nprotocol websockets\n")
    settings = convert(path).settings
    assert settings["endpoints"] == [
        "ssl:8883:privateKey=/c/server.key:certKey=/c/server.pem",
        "mqtts:8884:interface=\\:\\:1:privateKey=/c/s.key:certKey=/c/s.pem:caCerts=/c/ca.pem:requireCertificate=yes",
        "unix:/run/mqtt.sock:mode=770"]
    assert settings["websocket_endpoints"] == ["tcp:9001"]
    assert settings["use_identity_as_username"] is True


def test_a_listener_that_requires_a_certificate_without_cafile_is_refused(tmp_path: Path) -> None:
    """Without the CA the listener could not ask for a client certificate: it would let in
    clients without one."""
    path = tmp_path / "m.conf"
    path.write_text("listener 8883\ncertfile /c/s.pem\nkeyfile /c/s.key\ncapath /c/certs\nrequire_certificate true\n")
    with pytest.raises(ValueError, match=r"m.conf:1: require_certificate needs cafile"):
        convert(path)


def test_per_listener_security_applies_to_every_listener_or_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("per_listener_settings true\nlistener 1883\nallow_anonymous false\npassword_file passwd\n"
                    "acl_file acl\nlistener 1884 127.0.0.1\nallow_anonymous false\npassword_file passwd\nacl_file acl\n")
    settings = convert(path).settings
    assert settings["allow_anonymous"] is False
    assert settings["password_file"] == str(tmp_path / "passwd") and settings["acl_file"] == str(tmp_path / "acl")
    for second, differ in (("allow_anonymous true\npassword_file passwd\n", "allow_anonymous is"),
                           ("password_file other\n", "password_file is"), ("", "password_file is"),
                           ("password_file passwd\nallow_zero_length_clientid false\n", "allow_zero_length_clientid is"),
                           ("auto_id_prefix x-\n", "password_file, auto_id_prefix are")):
        # Anonymous clients let in on the first listener, another file, no file at all; clients
        # without a client id let in, or named otherwise (Mosquitto's security settings too).
        path.write_text(f"per_listener_settings true\nlistener 1883\npassword_file passwd\nlistener 1884\n{second}")
        with pytest.raises(ValueError, match=rf"m.conf:4: this listener's {differ} not the first one's"):
            convert(path)


@pytest.mark.parametrize("first, second, noted", [
    ("max_qos 1", "max_qos 1", None),
    ("max_qos 1", "max_qos 2", "max_qos 2"),  # the last listener's applies to both
    ("max_qos 1", "", "max_qos 1"),  # the second listener had Mosquitto's default, 2
    ("max_topic_alias 0", "max_topic_alias 0", None),
    ("max_topic_alias 0", "", "max_topic_alias 0"),  # the second listener had Mosquitto's default, 10
])
def test_per_listener_settings_made_global_are_noted_when_the_listeners_differ(
        tmp_path: Path, first: str, second: str, noted: str | None) -> None:
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883\n{first}\nlistener 1884\n{second}\n")
    conversion = convert(path)
    key, value = (second or first).split()
    assert conversion.settings[key] == int(value)
    if noted is None:
        assert conversion.notes == []
        return
    (note,) = conversion.notes
    assert note.text == noted and note.line == (4 if noted == second else 2)
    assert str(note).endswith(f"'{noted}': {key} differs between the listeners: here it is global, "
                              f"{noted.split()[1]} for every listener")


@pytest.mark.parametrize("naming", ["use_identity_as_username true", "use_subject_as_username true"])
def test_a_listener_naming_clients_by_certificate_is_refused_where_another_listeners_false_is_taken(
        tmp_path: Path, naming: str) -> None:
    """Global here: the false of the line read last applied to the listener whose clients
    Mosquitto names by their certificate too, and there a client with any certificate of the CA
    was taken by the username it gave, with that user's ACL rights (Mosquitto 2.0.11 names it by
    its certificate: seen). True taken over a listener's false only refuses that listener's
    clients without a certificate: converted, noted."""
    tls = "certfile s.crt\nkeyfile s.key\ncafile ca.crt\nrequire_certificate true\n"
    path = tmp_path / "m.conf"
    path.write_text(f"allow_anonymous true\nacl_file acl\nlistener 8883\n{tls}{naming}\n"
                    f"listener 1884\nuse_identity_as_username false\n")
    with pytest.raises(ValueError, match=r"m.conf:10: use_identity_as_username false would apply to every listener "
                                         r"here, the one of /.*m.conf:3 too"):
        convert(path)
    path.write_text(f"allow_anonymous true\nlistener 1884\nuse_identity_as_username false\n"
                    f"listener 8883\n{tls}{naming}\n")
    conversion = convert(path)
    assert conversion.settings["use_identity_as_username"] is True
    assert [n.why for n in conversion.notes if "differs" in n.why] == [
        "use_identity_as_username differs between the listeners: here it is global, True for every listener"]


@pytest.mark.parametrize("listeners, carried", [("listener 1883\n", False), ("port 1884\n", True), ("", False)])
def test_max_topic_alias_before_any_listener_is_the_default_listeners(
        tmp_path: Path, listeners: str, carried: bool) -> None:
    """Mosquitto 2.0.11 gives it to its default listener, which a listener line alone does not
    open: that listener still grants Topic Alias Maximum 10 (its CONNACK, seen)."""
    path = tmp_path / "m.conf"
    path.write_text(f"max_topic_alias 0\n{listeners}")
    conversion = convert(path)
    if carried:
        assert conversion.settings["max_topic_alias"] == 0 and conversion.notes == []
    else:
        assert "max_topic_alias" not in conversion.settings
        assert [n.why for n in conversion.notes] == [
            "before any listener line it is the default listener's (of a port line), and there is none: the "
            "listeners keep Mosquitto's default, 10"]


def test_max_connections_of_each_listener_are_added_up(tmp_path: Path) -> None:
    """Mosquitto counts each listener's connections; here one limit counts them all."""
    path = tmp_path / "m.conf"
    for second, total in (("max_connections 20\n", 30), ("", -1)):
        path.write_text(f"listener 1883\nmax_connections 10\nlistener 1884\n{second}")
        conversion = convert(path)
        assert conversion.settings["max_connections"] == total
        assert [n.why for n in conversion.notes] == [
            f"each listener's in Mosquitto: here one limit of the broker's connections, {total} (the listeners' "
            f"added up)"]


def test_what_cannot_be_carried_over_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nplugin_opt_config_file /etc/dynsec.json\nper_listener_settings true\n"
                    "http_dir /srv/www\nretry_interval 20\nmemory_limit 1000000\nautosave_interval 60\n"
                    "store_clean_interval 10\n")
    notes = [(n.line, n.why) for n in convert(path).notes]
    assert notes[0] == (2, "Mosquitto plugins do not load here")
    assert notes[1][0] == 3 and "every listener" in notes[1][1]
    assert notes[2] == (4, "no per-listener equivalent here")
    assert notes[3] == (5, "no equivalent setting here")
    assert notes[4][0] == 6 and notes[4][1].startswith("no memory limit here")
    assert notes[5][0] == 7 and "SQLite" in notes[5][1]
    # Another release's, maybe (2.0.11 refuses it): no misspelling of one of 2.0.11's
    assert notes[6] == (8, "no setting of Mosquitto 2.0.11 (which refuses to start with it), nor here")


@pytest.mark.parametrize("line", ["local_password l0cal-s3cret", "auth_opt_pg_password db-s3cret",
                                  "plugin_opt_pg_password db-s3cret", "tls_engine_kpass_sha1 s3cret",
                                  "ldap_bind_secret s3cret"])
def test_a_line_not_carried_over_is_named_by_its_key_alone(
        tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Its value may be a password: the notes go to stderr (the journal, under systemd) at every
    # start with --mosquitto-config, and into the converted file.
    from mqtt_broker.tap import Options
    path = tmp_path / "m.conf"
    path.write_text("listener 1883 127.0.0.1\nallow_anonymous true\nconnection b1\naddress 127.0.0.1:1884\n"
                    f"topic a/# both 1\n{line}\n")
    key = line.split()[0]
    assert [str(note) for note in convert(path).notes] == [
        f"{path}:6: {key!r} not carried over: {convert(path).notes[0].why}"]
    assert main(["from-mosquitto", str(path)]) == 0
    Options().parseOptions(["--mosquitto-config", str(path)])
    out, err = capsys.readouterr()
    assert f"{path}:6: {key!r} not carried over" in err
    assert "s3cret" not in out + err


@pytest.mark.parametrize("line", ["plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                                  "auth_plugin /usr/lib/mosquitto-go-auth.so", "check_retain_source true"])
def test_what_checks_clients_in_mosquitto_and_not_here_is_refused(tmp_path: Path, line: str) -> None:
    """A plugin (dynamic security, say) refuses what the rest of the file allows: with
    allow_anonymous true, Mosquitto 2.0.11 with dynamic security answers an anonymous PUBLISH
    with 0x87. Noted and dropped, anyone could publish and read everything here;
    check_retain_source, the same for retained messages of publishers who lost the right."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883 127.0.0.1\nallow_anonymous true\n{line}\n")
    with pytest.raises(ValueError, match=f"m.conf:3: {line.split()[0]} is not supported here"):
        convert(path)
    path.write_text("listener 1883\ncheck_retain_source false\nallow_anonymous true\n")
    assert convert(path).notes == []


@pytest.mark.parametrize("line, why", [
    ("acl_flie /etc/mosquitto/acl", "acl_flie is no setting of Mosquitto's, which refuses to start so: acl_file?"),
    ("  allow_anonymus false", "allow_anonymus is no setting of Mosquitto's, which refuses to start so: "
                               "allow_anonymous?")])
def test_a_misspelt_key_is_refused(tmp_path: Path, line: str, why: str) -> None:
    """A misspelt key is no setting to Mosquitto, which refuses the file; noted and dropped, the
    ACL it was to read, say, was not applied here."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883 127.0.0.1\nallow_anonymous true\n{line}\n")
    with pytest.raises(ValueError) as refused:
        convert(path)
    assert str(refused.value) == f"{path}:3: {why}"
    mosquitto = subprocess.run(["/usr/sbin/mosquitto", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert mosquitto.returncode != 0 and "Unknown configuration variable" in mosquitto.stderr + mosquitto.stdout


@pytest.mark.parametrize("value", ["1", "true # every client needs one"])
def test_require_certificate_is_read_as_mosquitto_reads_a_boolean(tmp_path: Path, value: str) -> None:
    """Mosquitto with ``require_certificate 1`` (or a comment after ``true``) refuses a client
    without a certificate; the converter compared the text with "true" and let every client in."""
    path = tmp_path / "m.conf"
    tls = "certfile /c/server.pem\nkeyfile /c/server.key\n"
    path.write_text(f"listener 8883\n{tls}cafile /c/ca.pem\nrequire_certificate {value}\n")
    (endpoint,) = convert(path).settings["endpoints"]
    assert endpoint.endswith(":requireCertificate=yes"), endpoint
    path.write_text(f"listener 8883\n{tls}capath /c/certs\nrequire_certificate {value}\n")
    with pytest.raises(ValueError, match="require_certificate needs cafile"):
        convert(path)
    path.write_text(f"listener 8883\n{tls}cafile /c/ca.pem\nrequire_certificate yes\n")
    with pytest.raises(ValueError, match="m.conf:5: 'yes' is not true, false, 1 or 0"):
        convert(path)


def test_a_comment_after_the_words_of_a_line_is_not_read_as_more_words(tmp_path: Path) -> None:
    """As Mosquitto 2.0.11 reads them: a listener on every interface, a WebSocket listener, and a
    bridge connecting to its one address (the words after it were taken for hosts named "the"
    and "cloud", and sent the bridge's CONNECT, password included, when the first was down)."""
    path = tmp_path / "m.conf"
    path.write_text("listener 18835 # the main one\nlistener 9001 127.0.0.1 # local\n"
                    "protocol websockets # for the browsers\nallow_anonymous true\n"
                    "connection up\naddress 127.0.0.1:18845 # the cloud\ntopic # out 0\n")
    conversion = convert(path)
    assert conversion.settings["endpoints"] == ["tcp:18835"]
    assert conversion.settings["websocket_endpoints"] == ["tcp:9001:interface=127.0.0.1"]
    (bridge,) = conversion.bridges
    assert bridge["addresses"] == ["127.0.0.1:18845"]
    path.write_text("listener 9001\nprotocol http\n")
    with pytest.raises(ValueError, match="m.conf:2: protocol is mqtt or websockets, not 'http'"):
        convert(path)
    path.write_text("listener 99999\n")  # (it was converted, to a broker that cannot start)
    with pytest.raises(ValueError, match="m.conf:1: invalid port 99999"):
        convert(path)


def test_a_comment_not_in_utf8_is_read_as_mosquitto_reads_it(tmp_path: Path) -> None:
    """Mosquitto reads bytes: a Latin-1 comment starts it. Another line that is not UTF-8 is
    refused with its file and line (it was refused with only the codec's message)."""
    path = tmp_path / "m.conf"
    path.write_bytes(b"# R\xe9seau local\nlistener 1883\nallow_anonymous true\n")
    assert convert(path).settings["endpoints"] == ["tcp:1883"]
    path.write_bytes(b"listener 1883\nauto_id_prefix caf\xe9\n")
    with pytest.raises(ValueError, match="m.conf:2: not UTF-8 \\(byte 19\\)"):
        convert(path)


@pytest.mark.parametrize("first, refused", [
    ("per_listener_settings true\nallow_anonymous true\n", None),  # the default listener's: there is none
    ("per_listener_settings true\nport 1883\nallow_anonymous true\n", 4),  # the second keeps false
    ("per_listener_settings true\nallow_anonymous true\nbind_address 127.0.0.1\n", 4),
    ("allow_anonymous true\nper_listener_settings true\n", 2),  # Mosquitto refuses it too
])
def test_per_listener_security_before_the_first_listener_is_the_default_listeners(
        tmp_path: Path, first: str, refused: int | None) -> None:
    """Mosquitto 2 refuses anonymous clients on `listener 1884` in each case: the allow_anonymous
    before it belongs to the default listener only, and one not set is false."""
    path = tmp_path / "m.conf"
    path.write_text(f"{first}listener 1884 127.0.0.1\n")
    if refused is not None:
        with pytest.raises(ValueError, match=rf"m.conf:{refused}: "):
            convert(path)
        return
    conversion = convert(path)
    assert conversion.settings["allow_anonymous"] is False
    assert [(n.line, n.why) for n in conversion.notes][1] == (
        2, "with per_listener_settings true it is the default listener's (of a port line) only, and there is none")


def test_per_listener_security_given_alike_to_the_default_listener_and_the_others(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("per_listener_settings true\nallow_anonymous true\npassword_file passwd\nport 1883\n"
                    "listener 1884\nallow_anonymous true\npassword_file passwd\n")
    settings = convert(path).settings
    assert settings["allow_anonymous"] is True and settings["password_file"] == str(tmp_path / "passwd")
    assert settings["endpoints"] == ["tcp:1883", "tcp:1884"]
    path.write_text("per_listener_settings true\nlistener 1883\nallow_anonymous false\nlistener 1884\n")
    assert convert(path).settings["allow_anonymous"] is False  # not set is false: the same
    path.write_text("per_listener_settings true\nallow_anonymous true\n")  # no listener: local only
    assert convert(path).settings["allow_anonymous"] is True


def test_a_port_line_keeps_the_default_listeners_bind_address(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("bind_address 127.0.0.1\nport 1884\n")
    assert convert(path).settings["endpoints"] == ["tcp:1884:interface=127.0.0.1"]


@pytest.mark.parametrize("setting, message", [
    ("bind_interface lo", "bind_interface is not supported here: give bind_address with the interface's address"),
    ("mount_point tenant1/", "mount_point is not supported here: the listener's clients would not be kept under"),
    # Mosquitto 2.0.11 makes the client id the username (the ACL's %c patterns then name the user),
    # takes only clients with the pre-shared key, refuses revoked certificates and other client ids.
    ("use_username_as_clientid true", "use_username_as_clientid is not supported here: clients would keep the "
                                      "client ids they give"),
    ("psk_hint sensors", "psk_hint is not supported here: the listener would let in clients without the key, over "
                         "plain TCP"),
    ("crlfile /etc/mosquitto/crl.pem", "crlfile is not supported here: clients with revoked certificates would"),
    ("clientid_prefixes sec-", "clientid_prefixes is not supported here: clients with any client id would be let in"),
])
def test_listener_settings_that_would_open_the_listener_more_are_refused(
        tmp_path: Path, setting: str, message: str) -> None:
    path = tmp_path / "m.conf"
    for text in (f"listener 1883\n{setting}\n", f"{setting}\nlistener 1883\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"m.conf:{text.splitlines().index(setting) + 1}: {message}"):
            convert(path)


@pytest.mark.parametrize("naming", ["use_identity_as_username true", "use_subject_as_username true"])
def test_naming_clients_by_certificate_is_taken_from_a_tls_listener_only(tmp_path: Path, naming: str) -> None:
    """Mosquitto 2.0.11 names clients by their certificate only on a listener with certfile and
    keyfile, and ignores the setting on another (anonymous and password clients let in: seen);
    global here, it refused every client of every listener (none has a certificate)."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883 127.0.0.1\n{naming}\nallow_anonymous true\n")
    conversion = convert(path)
    config = conversion.config()
    assert not config.use_identity_as_username and config.certificate_identity != "subject"
    (note,) = conversion.notes
    assert (note.line, note.text, note.carried) == (2, naming, False)
    assert note.why == ("a listener without TLS (certfile and keyfile): Mosquitto names no client by a certificate "
                        "there, and ignores it")
    tls = "certfile s.crt\nkeyfile s.key\ncafile ca.crt\nrequire_certificate true\n"
    path.write_text(f"listener 8883\n{tls}use_identity_as_username false\nlistener 1883\n{naming}\n")
    conversion = convert(path)
    assert conversion.settings.get("use_identity_as_username") is False
    assert [(n.line, n.carried) for n in conversion.notes] == [(8, False)]


@pytest.mark.parametrize("kind", ["mosquitto", "ours"])
def test_use_identity_as_username_on_a_listener_without_tls_lets_its_clients_in(tmp_path: Path, kind: str) -> None:
    port = free_port()
    password_file(tmp_path)
    config = tmp_path / "m.conf"
    config.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nuse_identity_as_username true\n"
                      f"allow_anonymous true\npassword_file {tmp_path}/passwords\n")
    server = Server(kind, config, port, tmp_path)
    try:
        let_in = [login(port, user, password, MQTT_3_1_1) == 0 for user, password in LOGINS[:4]]
        assert let_in == [True, False, False, True]  # alice, alice wrong, nobody, anonymous
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["mosquitto", "ours"])
def test_an_offline_session_keeps_max_queued_messages_with_persistence_too(tmp_path: Path, kind: str) -> None:
    """Mosquitto 2.0.11 keeps the first max_queued_messages of an offline session's messages,
    persistence or not; converted, persistence true let the store take every one past them."""
    port = free_port()
    config = tmp_path / "m.conf"
    config.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                      f"persistence true\npersistence_location {tmp_path}/data/\nmax_queued_messages 10\n")
    server = Server(kind, config, port, tmp_path)
    try:
        keeper = PahoClient(port, "keeper", clean=False)
        keeper.subscribe("t/x", 1)
        keeper.close()
        publisher = PahoClient(port, "publisher")
        for number in range(30):
            publisher.publish("t/x", str(number).encode(), 1)
        publisher.close()
        keeper = PahoClient(port, "keeper", clean=False)
        received = []
        for _ in range(30):
            try:
                received.append(int(keeper.messages.get(timeout=1.0).payload))
            except queue.Empty:
                break
        keeper.close()
        assert received == list(range(10))
    finally:
        server.stop()


@pytest.mark.parametrize("lines, queued, stored, noted", [
    ("max_queued_messages 10\n", 9, 1, (4, "max_queued_messages 10", "max_queued_messages 9 in memory and "
                                        "max_stored_messages 1: 10 QoS 1/2 messages of a session in all")),
    ("", 999, 1, (3, "persistence true", "max_queued_messages 999 in memory and max_stored_messages 1: 1000 QoS "
                                         "1/2 messages of a session in all")),
    ("max_queued_messages 1\n", 1, 1, (4, "max_queued_messages 1", "max_stored_messages 1: 2 QoS 1/2 messages of "
                                       "a session in all, one more than Mosquitto keeps")),
    ("max_queued_messages 0\nmax_queued_bytes 500\n", 0, 1, (5, "max_queued_bytes 500", "max_stored_messages 1: "
                                                             "one message more than max_queued_bytes takes in memory "
                                                             "may wait in the store")),
    ("max_queued_messages 0\n", 0, 0, None),
])
def test_persistence_bounds_a_sessions_messages_in_memory_and_store_together(
        tmp_path: Path, lines: str, queued: int, stored: int, noted: tuple[int, str, str] | None) -> None:
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883\nallow_anonymous true\npersistence true\n{lines}")
    conversion = convert(path)
    config = conversion.config()
    assert (config.max_queued_messages, config.max_stored_messages) == (queued, stored)
    found = [(n.line, n.text, n.why) for n in conversion.notes if "max_stored_messages" in n.why]
    assert [(line, text) for line, text, _ in found] == ([noted[:2]] if noted else [])
    if noted:
        assert found[0][2].startswith(f"with the store (persistence true): {noted[2]}")


def test_use_username_as_clientid_false_is_what_happens_here(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nuse_username_as_clientid false\n")
    assert convert(path).notes == []


def test_use_subject_as_username_names_clients_by_their_certificates_subject(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    tls = "certfile s.crt\nkeyfile s.key\ncafile ca.crt\nrequire_certificate true\n"
    path.write_text(f"listener 8883\n{tls}use_subject_as_username true\n")
    conversion = convert(path)
    assert conversion.settings["use_identity_as_username"] is True
    assert conversion.settings["certificate_identity"] == "subject"
    (note,) = conversion.notes
    assert note.line == 6 and note.carried and "as Mosquitto writes it" in note.why
    path.write_text(f"listener 8883\n{tls}use_subject_as_username false\n")
    assert "certificate_identity" not in convert(path).settings
    # One way of naming clients for every listener here: the common name on one, the subject on another, refused.
    for first, second in (("use_identity_as_username", "use_subject_as_username"),
                          ("use_subject_as_username", "use_identity_as_username")):
        path.write_text(f"listener 8883\n{tls}{first} true\nlistener 8884\n{tls}{second} true\n")
        with pytest.raises(ValueError, match=r"m.conf:12: one listener names clients by their certificate's"):
            convert(path)


def test_use_identity_as_username_false_leaves_a_listeners_use_subject_as_username_true(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 names a listener's clients by their certificate where either setting is
    true (checked: `use_subject_as_username true` then `use_identity_as_username false`, a client
    with a certificate and the username "admin" is named "CN=client,O=...", and its PUBLISH to a
    topic only admin may write is denied). Converted, the false line was taken over the subject
    one: the client was "admin", with admin's ACL rights (with allow_anonymous true and no
    password file, usernames are taken as given)."""
    path = tmp_path / "m.conf"
    tls = "certfile s.crt\nkeyfile s.key\ncafile ca.crt\nrequire_certificate true\n"
    path.write_text(f"listener 8883\n{tls}use_subject_as_username true\nuse_identity_as_username false\n"
                    f"allow_anonymous true\n")
    conversion = convert(path)
    assert (conversion.settings["use_identity_as_username"], conversion.settings["certificate_identity"]) == (
        True, "subject")
    assert [note.line for note in conversion.notes if not note.carried] == [7]


def test_bind_address_is_the_default_listeners_wherever_it_is(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 listens on 0.0.0.0:1883 and 127.0.0.1:18832 here: bind_address, as port,
    is the default listener's."""
    path = tmp_path / "m.conf"
    path.write_text("listener 18832 127.0.0.1\nbind_address 0.0.0.0\n")
    assert convert(path).settings["endpoints"] == ["tcp:1883:interface=0.0.0.0", "tcp:18832:interface=127.0.0.1"]


@pytest.mark.parametrize("text, endpoints", [
    # Mosquitto 2.0's conf.c: a listener setting before any listener line, other than its default,
    # opens the default listener on every interface (still in the local-only mode, which lets
    # anonymous clients in: see below).
    ("max_connections 100\n", ["tcp:1883"]),
    ("max_qos 1\nlistener 1884\n", ["tcp:1883", "tcp:1884"]),
    ("use_identity_as_username true\ncafile ca.crt\ncertfile s.crt\nkeyfile s.key\n",
     ["ssl:1883:privateKey=s.key:certKey=s.crt"]),  # (no require_certificate: no client certificate asked)
    ("max_connections -1\nmax_qos 2\nprotocol mqtt\nuse_identity_as_username false\n",
     LOOPBACKS),  # their defaults: still local only
    ("max_qos 02\nmax_connections -5\n", LOOPBACKS),  # read as numbers: 2, and -1
    ("require_certificate true\n", ["tcp:1883"]),  # (checked: Mosquitto 2.0.11 opens 1883 for it alone)
])
def test_listener_settings_before_any_listener_open_mosquittos_default_listener(
        tmp_path: Path, text: str, endpoints: list[str]) -> None:
    path = tmp_path / "m.conf"
    path.write_text(text)
    assert convert(path).settings["endpoints"] == endpoints


@pytest.mark.parametrize("text, noted", [
    # Mosquitto 2.0.11, each seen (in a network namespace of its own): without a listener, port or
    # bind_address line it stays local only, and lets anonymous clients in on the default listener
    # it opens on every interface, allow_anonymous false or not; here they are refused.
    ("max_qos 1\n", 1),
    ("max_connections 5\n", 1),
    ("socket_domain ipv4\n", 1),
    ("allow_anonymous false\nmax_qos 1\n", 1),
    ("per_listener_settings true\nmax_qos 1\n", 2),
    ("per_listener_settings true\npassword_file pw\n", 2),
    ("allow_anonymous false\n", 1),  # (no listener: 127.0.0.1 only, anonymous clients let in)
    ("per_listener_settings true\nallow_anonymous false\n", 2),
    # The default listener's own allow_anonymous false with per_listener_settings, a port line:
    # Mosquitto refuses them too. Anonymous clients given allow_anonymous true: let in alike.
    ("per_listener_settings true\nallow_anonymous false\nmax_qos 1\n", None),
    ("max_qos 1\nport 18899\n", None),
    ("max_qos 1\nbind_address 127.0.0.1\n", None),
    ("max_qos 1\nallow_anonymous true\n", None),
    ("persistence false\n", None),
])
def test_mosquittos_local_only_mode_letting_anonymous_clients_in_is_noted_where_they_are_refused_here(
        tmp_path: Path, text: str, noted: int | None) -> None:
    (tmp_path / "pw").write_text("")
    path = tmp_path / "m.conf"
    path.write_text(text)
    conversion = convert(path)
    local_only = [(note.line, note.why) for note in conversion.notes if "local-only" in note.why]
    assert local_only == ([] if noted is None else [(noted, (
        "Mosquitto 2 without a listener, port or bind_address line stays in its local-only mode, which lets "
        "anonymous clients in (on every interface where a listener setting opens its default listener); here "
        "they are refused: allow_anonymous true lets them in"))])
    if noted is not None:
        assert conversion.settings["allow_anonymous"] is False

def test_a_boolean_or_a_number_is_the_first_word_of_its_line(tmp_path: Path) -> None:
    """Mosquitto reads no more of such a line: the rest may be a comment."""
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nallow_anonymous true # the sensors\nmax_queued_messages 5000 # per client\n"
                    "persistent_client_expiration 2d  # then forgotten\n")
    settings = convert(path).settings
    assert settings["allow_anonymous"] is True and settings["max_queued_messages"] == 5000
    assert settings["persistent_client_expiration"] == 2 * 86400



def refused(tmp_path: Path, text: str, message: str) -> None:
    """The converter refuses a mosquitto.conf of this text with this message."""
    path = tmp_path / "m.conf"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        convert(path)

@pytest.mark.parametrize("line, message", [
    ("persistent_client_expiration 3600", "'3600' is not a valid duration"),  # a unit is needed
    ("max_keepalive 0", "max_keepalive must be 10 to 65535"),
    ("max_keepalive 9", "max_keepalive must be 10 to 65535"),
    ("max_packet_size 0", "max_packet_size must be 20 or more"),
    ("max_packet_size 19", "max_packet_size must be 20 or more"),
    ("persistent_client_expiration 0d", "'0d' is not a valid duration"),
])
def test_values_mosquitto_refuses_to_start_with_are_refused(tmp_path: Path, line: str, message: str) -> None:
    """Mosquitto 2.0.11: "Error: Invalid max_keepalive value (0)." and the like."""
    refused(tmp_path, f"listener 1883\n{line}\n", rf"m.conf:2: {message}")


@pytest.mark.parametrize("lines, bad", [
    ("password_file /etc/p\nlistener 1884\npassword_file /etc/q\n", 4),  # global: once in the file
    ("acl_file /etc/a\nacl_file /etc/a\n", 3),
    ("persistence_location /var/lib/m/\npersistence_location /var/lib/m/\n", 3),
    ("certfile /c\nkeyfile /k\ncertfile /c\n", 4),  # once per listener
    ("bind_address 127.0.0.1\nlistener 1884\nbind_address 127.0.0.1\n", 4),  # the default listener's
    ("per_listener_settings true\nlistener 1884\nacl_file /a\nacl_file /b\n", 5),
])
def test_a_setting_mosquitto_takes_once_given_twice_is_refused(tmp_path: Path, lines: str, bad: int) -> None:
    """Mosquitto 2.0.11: "Error: Duplicate password_file value in configuration." Taking the last
    one would convert a file Mosquitto does not start with, and maybe not the one meant."""
    refused(tmp_path, f"listener 1883\n{lines}", rf"m.conf:{bad}: .* is given twice")


def test_settings_mosquitto_takes_once_per_listener_may_be_given_for_each(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("per_listener_settings true\nlistener 1883\nacl_file /a\ncertfile /c\nkeyfile /k\n"
                    "psk_file /p\nlistener 1884\nacl_file /a\ncertfile /c\nkeyfile /k\npsk_file /p\n")
    assert len(convert(path).config().endpoints) == 2  # (Mosquitto 2.0.11 starts with it)
    refused(tmp_path, "listener 1883\npsk_file /p\nlistener 1884\npsk_file /p\n", "m.conf:4: psk_file is given twice")


@pytest.mark.parametrize("lines, size, noted", [
    ("", 268_435_460, False),  # Mosquitto's default: no limit but MQTT's
    ("max_packet_size 5000\n", 5000, False),
    ("max_packet_size 300000000\n", 268_435_460, False),  # (Mosquitto takes more; MQTT allows no more)
    ("message_size_limit 1000\n", 1000, True),  # whole packets: never more than Mosquitto lets through
    ("max_packet_size 500\nmessage_size_limit 1000\n", 500, True),
    ("message_size_limit 0\n", 268_435_460, False),
])
def test_the_packet_size_limit_is_mosquittos(tmp_path: Path, lines: str, size: int, noted: bool) -> None:
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883\n{lines}")
    conversion = convert(path)
    assert conversion.settings["max_packet_size"] == size
    assert conversion.config().max_packet_size == size
    assert [n.text for n in conversion.notes if n.carried] == (["message_size_limit 1000"] if noted else [])


def test_a_relative_password_file_is_the_config_files_and_noted(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\npassword_file passwd\nacl_file /etc/mosquitto/acl\n")
    conversion = convert(path)
    assert conversion.settings["password_file"] == str(tmp_path / "passwd")
    (note,) = conversion.notes
    assert (note.line, note.carried) == (2, True)
    assert note.why == f"a relative path: Mosquitto opens it from the directory it runs in, this broker {tmp_path}/passwd"


def test_include_dir_is_read_in_mosquittos_order(tmp_path: Path) -> None:
    included = tmp_path / "conf.d"
    included.mkdir()
    (included / "a-open.conf").write_text("allow_anonymous true\n")
    (included / "Z-lockdown.conf").write_text("allow_anonymous false\n")
    for name in ("b.conf", "A.conf", "a.conf", "_u.conf", ".h.conf", ".conf", "x.CONF"):
        (included / name).write_text(f"retry_interval {name}\n")
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\ninclude_dir conf.d\n")
    conversion = convert(path)
    assert conversion.settings["allow_anonymous"] is False  # Z-lockdown.conf comes after a-open.conf
    # Each character compared in upper case first, then as it is: "_" after the letters (the
    # first note is the relative include_dir's own).
    assert [n.text.split()[1] for n in conversion.notes] == ["conf.d", ".h.conf", "A.conf", "a.conf", "b.conf",
                                                              "_u.conf"]


def test_a_missing_include_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\ninclude_dir conf.d\n")
    with pytest.raises(ValueError, match=r"m.conf:2: unable to open include_dir '.*/conf.d': No such file"):
        convert(path)


BRIDGE = ("listener 1883\nconnection cloud\naddress 127.0.0.1:8883\nremote_username edge1\nremote_password secret\n"
          "topic # out\n")


@pytest.mark.parametrize("setting, message", [
    ("bridge_capath /etc/ssl/certs", "bridge_capath is not supported here: give bridge_cafile"),
    ("bridge_identity edge1", "bridge_identity: TLS-PSK is not supported here: give bridge_cafile"),
    ("bridge_psk 0123abcd", "bridge_psk: TLS-PSK is not supported here: give bridge_cafile"),
    # (the three above: noted only, the bridge would connect without TLS, its password in clear)
    ("restart_timeout", "restart_timeout takes one or two numbers"),
    ("restart_timeout soon", ""), ("restart_timeout 1 2 3", "restart_timeout takes one or two numbers"),
    ("keepalive_interval abc", ""), ("bridge_max_packet_size big", ""),
])
def test_bridge_settings_are_refused_with_their_line(tmp_path: Path, setting: str, message: str) -> None:
    refused(tmp_path, f"{BRIDGE}{setting}\n", rf"m.conf:7: {message}")


def test_bridge_capath_with_bridge_cafile_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text(f"{BRIDGE}bridge_capath /etc/ssl/certs\nbridge_cafile /c/ca.pem\n")
    conversion = convert(path)
    assert [(n.line, n.why) for n in conversion.notes] == [
        (7, "the remote's certificate is checked against bridge_cafile only")]
    assert conversion.config().bridge[0].tls


@pytest.mark.parametrize("tls", ["", "bridge_cafile /c/ca.pem\n"])
def test_bridge_insecure_is_carried_over_with_tls_and_noted_without(tmp_path: Path, tls: str) -> None:
    """Without TLS settings Mosquitto's bridge connects without TLS all the same; here the
    setting alone is refused (it would promise TLS): left out, with a note."""
    path = tmp_path / "m.conf"
    path.write_text(f"{BRIDGE}bridge_insecure true\n{tls}")
    conversion = convert(path)
    bridge = conversion.config().bridge[0]
    if tls:
        assert bridge.bridge_insecure and bridge.tls and conversion.notes == []
    else:
        assert not bridge.bridge_insecure and not bridge.tls
        assert [(n.line, n.why) for n in conversion.notes] == [
            (7, "without TLS settings it changes nothing (Mosquitto connects without TLS, as this bridge does)")]


def test_mosquitto_booleans_and_unlimited_inflight_messages(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nallow_anonymous 1\nretain_available 0\nmax_inflight_messages 0\n"
                    "connection cloud\naddress 127.0.0.1:1884\ntopic # out\ncleansession 0\n")
    conversion = convert(path)
    settings = conversion.settings
    assert settings["allow_anonymous"] is True and settings["retain_available"] is False
    assert settings["max_inflight_messages"] == 65535 and conversion.bridges[0]["cleansession"] is False
    assert [str(n).split(": ", 1)[1] for n in conversion.notes] == [
        "'max_inflight_messages 0': no limit in Mosquitto: 65535 here, the most there can be"]
    conversion.config()  # valid settings
    path.write_text("allow_anonymous yes\n")
    with pytest.raises(ValueError, match=r"m.conf:1: 'yes' is not a valid bool"):
        convert(path)


def test_bridges_convert_to_bridge_tables(tmp_path: Path) -> None:
    config = materialize("cloud-bridge.conf", tmp_path, port=1, cloud_port=2)
    conversion = convert(config)
    assert conversion.bridges == [{
        "connection": "cloud", "addresses": ["127.0.0.1:2"], "remote_clientid": "edge1", "cleansession": False,
        "bridge_protocol_version": "mqttv311", "keepalive_interval": 30, "restart_timeout": [1.0, 5.0],
        "notifications": True, "topic": ['sensors/# out 1 "" edge1/', 'commands/# in 1 "" edge1/']}]
    bridge = conversion.config().bridge[0]
    assert bridge.to_remote("sensors/a") == "edge1/sensors/a"


def test_a_bridge_address_is_split_at_its_last_colon_as_mosquitto_splits_it(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 takes what follows the last colon for the port, and knows no brackets
    ([::1] is a host name to it): `address ::1:28832` connects to ::1, port 28832 (seen). It was
    refused here, asking for the [::1]:1883 Mosquitto itself does not take."""
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nconnection c\naddress ::1:28832, fe80::1%eth0:8883 h:1884 h\ntopic a out\n")
    conversion = convert(path)
    assert conversion.bridges[0]["addresses"] == ["[::1]:28832", "[fe80::1%eth0]:8883", "h:1884", "h"]
    assert conversion.config().bridge[0].endpoints == [("::1", 28832), ("fe80::1%eth0", 8883), ("h", 1884),
                                                       ("h", 1883)]
    # ::1 alone is host ":", port 1 to Mosquitto (seen: "Connecting bridge c (::1)", never connected).
    refused(tmp_path, "listener 1883\nconnection c\naddress 127.0.0.1:1 ::1\ntopic a out\n",
            r"m.conf:3: bridge address '::1': Mosquitto takes what follows its last colon for the port, and ':' "
            r"for the host")


def test_bridge_attempt_unsubscribe_is_carried_over(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("connection cloud\naddress 127.0.0.1:1884\ntopic # out\nbridge_attempt_unsubscribe false\n")
    conversion = convert(path)
    assert conversion.bridges[0]["bridge_attempt_unsubscribe"] is False and not conversion.notes
    assert conversion.config().bridge[0].bridge_attempt_unsubscribe is False


def test_the_command_writes_toml_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = materialize("edge.conf", tmp_path, port=1884, tls_port=8884, certs=tmp_path)
    assert main(["from-mosquitto", str(config)]) == 0
    out, err = capsys.readouterr()
    settings = tomllib.loads(out)
    assert settings["endpoints"][0] == "tcp:1884:interface=127.0.0.1"
    assert settings["persistent_client_expiration"] == 2 * 86400
    assert settings["max_inflight_messages"] == 40
    assert settings["connection_messages"] is True
    assert "log_type" in err and "connection_messages" not in err  # named, with their lines
    assert f"{config}:19:" in err


def test_the_command_refuses_what_would_not_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.conf"
    path.write_text("max_qos 7\n")
    assert main(["from-mosquitto", str(path)]) == 1
    assert "max_qos" in capsys.readouterr().err
    assert main(["from-mosquitto", str(tmp_path / "missing.conf")]) == 1
    assert "No such file" in capsys.readouterr().err
    path.write_text("listener 1883\nbind_interface lo\n")
    assert main(["from-mosquitto", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"mqttbroker-config: {path}:2: bind_interface")  # named once


def test_the_installed_command_runs(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883 127.0.0.1\nallow_anonymous true\n")
    result = subprocess.run([sys.executable, "-m", "mqtt_broker.mosquitto", "from-mosquitto", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["endpoints"] == ["tcp:1883:interface=127.0.0.1"]


@pytest.mark.parametrize("line, setting, value", [
    ("max_connections 0", "max_connections", -1), ("max_connections -5", "max_connections", -1),
    ("max_queued_messages -1", "max_queued_messages", 0), ("max_queued_bytes -1", "max_queued_bytes", 0),
    ("max_inflight_messages -1", "max_inflight_messages", 65535),
])
@pytest.mark.parametrize("where", ["after a listener", "before any"])
def test_limits_mosquitto_takes_for_none_are_none_here(
        tmp_path: Path, line: str, setting: str, value: int, where: str) -> None:
    """Mosquitto 2.0.11 starts with these (checked), and takes them for no limit: copied as they
    were, the file was refused (below zero), or every connection was (a limit of 0)."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883\n{line}\n" if where == "after a listener" else f"{line}\n")
    assert getattr(convert(path).config(), setting) == value



# --- what Mosquitto 2.0.11 does, seen with the binary ---------------------------------------------

def test_each_file_starts_at_the_default_listener_and_the_including_one_goes_on_where_it_was(tmp_path: Path) -> None:
    """A listener's section ended with its file: "allow_anonymous true" after it, in another file,
    is the default listener's in Mosquitto (not opened: its listeners refuse anonymous clients);
    converted, it let them in."""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("allow_anonymous true\n")
    path = tmp_path / "m.conf"
    path.write_text("per_listener_settings true\nlistener 18866 127.0.0.1\ninclude_dir conf.d\n")
    assert convert(path).settings["allow_anonymous"] is False
    (tmp_path / "conf.d" / "a.conf").write_text("listener 18865 127.0.0.1\n")
    path.write_text("per_listener_settings true\ninclude_dir conf.d\nallow_anonymous true\n")
    assert convert(path).settings["allow_anonymous"] is False
    path.write_text("per_listener_settings true\nlistener 18866 127.0.0.1\ninclude_dir conf.d\nallow_anonymous true\n")
    with pytest.raises(ValueError, match=r"m.conf:4: allow_anonymous of a listener section an include_dir came "
                                         r"between \(with a listener of its own\): Mosquitto's reading of it is undefined"):
        convert(path)  # (Mosquitto writes it to a listener it has moved since: seen losing it)


@pytest.mark.parametrize("files, setting, expected", [
    ({"\u00e9.conf": "allow_anonymous false\n", "z.conf": "allow_anonymous true\n"}, "allow_anonymous", False),
    # (a name that ends first is compared by its NUL with the other's next char, signed)
    ({"x.conf": "listener 18883 127.0.0.1\n", "x.conf\u00e9.conf": "listener 18884 127.0.0.1\n"}, "endpoints",
     ["tcp:18884:interface=127.0.0.1", "tcp:18883:interface=127.0.0.1"]),
])
def test_include_dir_reads_names_beyond_ascii_as_mosquitto(tmp_path: Path, files: dict[str, str], setting: str,
                                                           expected: Any) -> None:
    (tmp_path / "conf.d").mkdir()
    for name, text in files.items():
        (tmp_path / "conf.d" / name).write_text(text)
    path = tmp_path / "m.conf"
    path.write_text("include_dir conf.d\nallow_anonymous true\n" if setting == "endpoints" else
                    "listener 1883 127.0.0.1\ninclude_dir conf.d\n")
    assert convert(path).settings[setting] == expected


def test_an_unreadable_included_file_is_named_with_the_include_dir_line(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "broken.conf").symlink_to(tmp_path / "nowhere")
    refused(tmp_path, "listener 1883 127.0.0.1\ninclude_dir conf.d\n",
            r"m.conf:2: include_dir: cannot read '.*broken.conf': No such file")


@pytest.mark.parametrize("option", ["certfile /c.pem\nkeyfile /k.pem\n", "cafile /ca.pem\n", "protocol websockets\n"])
def test_a_unix_socket_listener_with_tls_or_websocket_is_refused(tmp_path: Path, option: str) -> None:
    """Mosquitto speaks TLS on one (converted, it was plain, no client certificate asked for) and
    refuses WebSocket there (converted, it was plain MQTT)."""
    refused(tmp_path, f"listener 0 {tmp_path}/mqtt.sock\n{option}allow_anonymous true\n",
            r"m.conf:1: a Unix socket listener takes neither TLS nor WebSocket here")


def test_an_empty_path_is_refused(tmp_path: Path) -> None:
    """Mosquitto: "Empty password_file value"; converted, it was the file's directory."""
    refused(tmp_path, "listener 1883 127.0.0.1\npassword_file\n", r"m.conf:2: an empty value")


def test_a_connections_section_goes_on_past_a_listener_line(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("connection b\naddress 127.0.0.1:18839\nlistener 18833 127.0.0.1\nallow_anonymous true\n"
                    "topic sensors/# out 1\n")
    conversion = convert(path)
    assert conversion.bridges[0]["topic"] == ["sensors/# out 1"] and conversion.notes == []
    assert conversion.config().bridge[0].topic[0].pattern == "sensors/#"


def test_a_topic_line_with_a_local_prefix_alone_or_more_than_five_words(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883 127.0.0.1\nconnection b\naddress 127.0.0.1:1884\ntopic sensors/# out 1 local/\n"
                    "topic cmd/# in 1 here/ there/ extra\n")
    conversion = convert(path)
    first, second = conversion.config().bridge[0].topic
    assert (first.local_filter, first.remote_filter) == ("local/sensors/#", "sensors/#")
    assert (second.local_filter, second.remote_filter) == ("here/cmd/#", "there/cmd/#")
    assert [(n.line, n.why) for n in conversion.notes] == [(5, "the words after the fifth are left out, as Mosquitto does")]


@pytest.mark.parametrize("line, expected, why", [
    ("a/# out 1 # the sensors", "a/# out 1", None),
    ("a/# out # the sensors", "a/# out 0", None),
    ("a/# both #1 l/ r/", "a/# both 0", None),
    ('a/# out 1 l/ # the cloud', 'a/# out 1 l/ ""', None),
    ("a/# in 2 l/ r/ # the cloud", "a/# in 2 l/ r/", None),
    ("# out 1", "# out 1", None),
    ("a/# out 1x", "a/# out 1", "QoS '1x' is read as 1, as Mosquitto reads it (C's atoi)"),
    ("a/# out 2#", "a/# out 2", "QoS '2#' is read as 2, as Mosquitto reads it (C's atoi)"),
])
def test_a_topic_line_is_read_as_mosquitto_reads_it(tmp_path: Path, line: str, expected: str,
                                                    why: str | None) -> None:
    """As Mosquitto 2.0.11 reads them (seen): past the direction, a word that begins with "#"
    starts a comment, and the QoS is read by C's atoi (its leading digits, 0 without any). A
    comment was read as a prefix, or a QoS, and the file refused."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883 127.0.0.1\nconnection b\naddress 127.0.0.1:1884\ntopic {line}\n")
    conversion = convert(path)
    assert [BridgeTopic.parse(t) for t in conversion.bridges[0]["topic"]] == [BridgeTopic.parse(expected)]
    assert [n.why for n in conversion.notes] == ([why] if why else [])


def test_a_comment_in_place_of_a_topic_lines_direction_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, "listener 1883 127.0.0.1\nconnection b\naddress 127.0.0.1:1884\ntopic a/# # the sensors\n",
            r"m.conf:4: .*direction '#'")


@pytest.mark.parametrize("line", ["max_qos 3", "topic sensors/# sideways 1"])
def test_a_value_refused_names_its_file_and_line(tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883 127.0.0.1\nconnection b\naddress 127.0.0.1:1884\n{line}\n")
    assert main(["from-mosquitto", str(path)]) == 1
    assert f"{path}:4: " in capsys.readouterr().err


def test_the_toml_written_holds_any_character(tmp_path: Path) -> None:
    """Written as JSON escapes, a character outside the BMP made surrogates, which TOML refuses."""
    path = tmp_path / "m.conf"
    path.write_text("listener 1883 127.0.0.1\nauto_id_prefix \U0001F642\x7f-\nconnection cloud\n"
                    "address 127.0.0.1:1884\ntopic sensors/\U0001F321/# out 1\n")
    parsed = tomllib.loads(convert(path).toml(str(path)))
    assert parsed["auto_id_prefix"] == "\U0001F642\x7f-"
    assert parsed["bridge"][0]["topic"] == ["sensors/\U0001F321/# out 1"]


@pytest.mark.parametrize("line", ["allow_zero_length_clientid false", "password_file pw"])
def test_a_per_listener_security_line_before_any_listener_opens_the_default_listener(tmp_path: Path, line: str) -> None:
    """As Mosquitto 2.0.11's config__read: port 1883 on every interface (seen listening)."""
    (tmp_path / "pw").write_text("")
    path = tmp_path / "m.conf"
    second = "password_file pw\n" if "password_file" in line else "allow_zero_length_clientid false\n"
    path.write_text(f"per_listener_settings true\n{line}\nlistener 18851 127.0.0.1\n{second}")
    assert convert(path).settings["endpoints"] == ["tcp:1883", "tcp:18851:interface=127.0.0.1"]
    path.write_text(f"per_listener_settings true\n{line}\nlistener 18851 127.0.0.1\nallow_anonymous true\n{second}")
    with pytest.raises(ValueError, match="m.conf:3: this listener's allow_anonymous is not the first one's"):
        convert(path)  # (the default listener refuses anonymous clients)


def test_a_connection_section_an_include_came_between_is_refused(tmp_path: Path) -> None:
    """Mosquitto writes its lines to a connection it has moved since (undefined)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.conf").write_text("connection other\naddress 127.0.0.1:2\ntopic b/# out\n")
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nconnection b\naddress 127.0.0.1:1\ninclude_dir d\ntopic a/# out\n")
    refused(tmp_path, path.read_text(), r"m.conf:5: topic of a connection section an include_dir came between")


def test_a_bridge_line_outside_a_connection_section_is_refused(tmp_path: Path) -> None:
    """Mosquitto: "Invalid bridge configuration"; each included file starts outside any."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.conf").write_text("topic c/# both 0\n")
    refused(tmp_path, "listener 1883\nconnection b\naddress 127.0.0.1:1\ntopic a/# both 0\ninclude_dir d\n",
            r"t.conf:1: topic outside a connection section, which Mosquitto refuses")


def test_a_refused_connection_name_and_a_second_auto_id_prefix(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nconnection a+b\naddress 127.0.0.1:1\ntopic a/# both 0\n")
    with pytest.raises(ValueError, match=r"m.conf:2: bridge\[1\].connection: 'a\+b' is not a name"):
        convert(path).config()
    refused(tmp_path, "listener 1883\nauto_id_prefix x-\nauto_id_prefix y-\n", r"m.conf:3: auto_id_prefix is given twice")


def test_max_topic_alias_of_the_default_listener_and_another_is_what_the_note_says(tmp_path: Path) -> None:
    path = tmp_path / "m.conf"
    path.write_text("max_topic_alias 5\nport 18895\nlistener 18896 127.0.0.1\nmax_topic_alias 7\n")
    conversion = convert(path)
    assert conversion.settings["max_topic_alias"] == 7
    assert [n.why for n in conversion.notes] == [
        "max_topic_alias differs between the listeners: here it is global, 7 for every listener"]



# --- what Mosquitto 2.0.11 refuses or reads otherwise, a second look ------------------------------------

@pytest.mark.parametrize("line, message", [
    ("listener 0", "a listener on port 0 needs a Unix socket path"),
    ("port 0", "port 0 is no port"),
    ("message_size_limit 300000000", "message_size_limit must be 0 to 268435455"),
    ("auto_id_prefix", "auto_id_prefix may not be empty"),
    ("connection a\naddress 127.0.0.1:1\ntopic a\nstart_type manual", "start_type manual is not supported"),
    ("tls_version tlsv1.3", "tls_version tlsv1.3"),
])
def test_a_value_mosquitto_refuses_to_start_with_is_refused(tmp_path: Path, line: str, message: str) -> None:
    """Each was converted: port 0 to tcp:0 (a port the kernel picks, on every interface), a limit
    past MQTT's, a bridge that connects where Mosquitto says it does not support manual starts;
    tls_version tlsv1.3 only noted, letting TLS 1.2 clients in where Mosquitto refuses them."""
    refused(tmp_path, f"listener 1883\n{line}\nallow_anonymous true\n", rf"m.conf:\d+: .*{message}")


def test_a_listener_of_port_0_with_a_relative_socket_path_is_a_unix_socket(tmp_path: Path) -> None:
    """Mosquitto takes any path after port 0 as a Unix socket's; it became tcp:0:interface=mqtt.sock."""
    path = tmp_path / "m.conf"
    path.write_text("listener 0 mqtt.sock\nallow_anonymous true\n")
    assert convert(path).settings["endpoints"] == ["unix:mqtt.sock:mode=770"]


@pytest.mark.parametrize("lines", [
    "bridge_cafile /etc/ca.pem\nbridge_cafile /etc/other.pem\n",
    "bridge_certfile /etc/c.pem\nbridge_certfile /etc/other.pem\n",
    "bridge_keyfile /etc/k.pem\nbridge_keyfile /etc/other.pem\n",
    "remote_username u\nremote_username v\n",
    "remote_username u\nremote_password p\nremote_password q\n",
    "clientid c1\nremote_clientid c2\n",
    "local_clientid l1\nlocal_clientid l2\n",
    "notification_topic n/1\nnotification_topic n/2\n",
    "address 127.0.0.1:2\n",
])
def test_a_bridge_setting_mosquitto_takes_once_given_twice_is_refused(tmp_path: Path, lines: str) -> None:
    """Mosquitto refuses each ("Duplicate bridge ... value in configuration", "Invalid bridge
    configuration" for a second address line); the last one was converted."""
    refused(tmp_path, f"listener 1883\nconnection a\naddress 127.0.0.1:1\ntopic a\n{lines}", r"m.conf:\d+: .*twice")


@pytest.mark.parametrize("value", ["0", "3"])
def test_a_bridge_keepalive_below_5_is_mosquittos_5(tmp_path: Path, value: str) -> None:
    """Mosquitto: "keepalive interval too low, using 5 seconds"; 0 left the bridge without
    keepalive (a remote gone without a word never noticed)."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883\nconnection a\naddress 127.0.0.1:1\ntopic a\nkeepalive_interval {value}\n")
    conversion = convert(path)
    [bridge] = conversion.config().bridge
    assert bridge.keepalive_interval == 5 and any("5 seconds" in note.why for note in conversion.notes)


@pytest.mark.parametrize("line, key, listeners", [
    ("max_qos 2", "max_qos", 1),
    ("use_identity_as_username false", "use_identity_as_username", True),
])
def test_an_included_files_default_listener_setting_leaves_the_listeners_own(
        tmp_path: Path, line: str, key: str, listeners: object) -> None:
    """An include_dir file starts at Mosquitto's default listener: a listener setting there, at
    its default, is that unopened listener's (Mosquitto's CONNACK still says Maximum QoS 1); it
    was taken as the global setting, over the including file's listener's."""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text(f"{line}\n")
    main = tmp_path / "m.conf"
    main.write_text(f"listener 8883\ncertfile /c\nkeyfile /k\ncafile /ca\nrequire_certificate true\n"
                    f"{key} {'1' if listeners == 1 else 'true'}\ninclude_dir {tmp_path / 'conf.d'}\n")
    assert convert(main).settings[key] == listeners


def test_a_listener_with_cafile_and_no_require_certificate_asks_no_client_for_one(tmp_path: Path) -> None:
    """Mosquitto verifies client certificates only with require_certificate true: a client with a
    certificate of another CA connects. Converted to mqtts:...:requireCertificate=no, the
    listener asked for one, and that client's handshake failed."""
    import socket
    import ssl

    from test_tls import make_certs
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    make_certs(ours)
    make_certs(theirs)
    port = free_port()
    config = tmp_path / "m.conf"
    config.write_text(f"listener {port} 127.0.0.1\ncertfile {ours}/server.pem\nkeyfile {ours}/server.key\n"
                      f"cafile {ours}/ca.pem\nallow_anonymous true\n")
    broker = BrokerProcess("--mosquitto-config", str(config), port=port, listen="", data_dir=tmp_path / "data")
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(ours / "ca.pem"))
        context.load_cert_chain(str(theirs / "client.pem"), str(theirs / "client.key"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03tls")
                assert tls.recv(4) == b"\x20\x02\x00\x00"
    finally:
        broker.stop()


def test_the_note_on_a_per_listener_value_names_the_value_taken(tmp_path: Path) -> None:
    """A listener's max_qos 1, then a file of include_dir setting max_qos 0 (Mosquitto's default
    listener's there, which it opens): 0 is taken for every listener, and the note said 1."""
    included = tmp_path / "conf.d"
    included.mkdir()
    (included / "a.conf").write_text("max_qos 0\n")
    main = tmp_path / "mosquitto.conf"
    main.write_text(f"listener 1884\nmax_qos 1\ninclude_dir {included}\n")
    conversion = convert(main)
    [note] = [n for n in conversion.notes if "max_qos differs" in n.why]
    assert (conversion.settings["max_qos"], note.why, note.text) == (
        0, "max_qos differs between the listeners: here it is global, 0 for every listener", "max_qos 0")


# --- where Mosquitto 2.0.11 reads a file its own way ---------------------------------------------

def test_socket_domain_ipv6_is_not_dropped_in_silence(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 with `listener 1883` + `socket_domain ipv6` logs "Opening ipv6 listen
    socket" and listens on IPv6 only (IPV6_V6ONLY). Converted, the line is dropped without a
    note and the listener becomes tcp:1883, IPv4 only: IPv6 clients are refused, IPv4 ones
    (which Mosquitto does not listen for) let in. docs/mosquitto.md: what it cannot carry
    over it names, "instead of dropping it"."""
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nsocket_domain ipv6\nallow_anonymous true\n")
    conversion = convert(path)
    endpoints = conversion.settings["endpoints"]
    noted = [str(note) for note in conversion.notes if note.line == 2]
    assert any(e.startswith("tcp6:") for e in endpoints) or noted, (
        f"socket_domain ipv6 dropped in silence: endpoints {endpoints}, no note")


@pytest.mark.parametrize("text,line", [("listener 1883 ::\n", 1), ("listener 1883 ::0\n", 1),
                                       ("bind_address ::\n", 1), ("port 1884\nbind_address 0::0\n", 2)])
def test_a_listener_on_the_ipv6_wildcard_address_is_named_as_socket_domain_ipv6_is(
        tmp_path: Path, text: str, line: int) -> None:
    """Mosquitto 2.0.11's `listener 1883 ::` is an IPv6 socket alone (IPV6_V6ONLY; checked:
    mosquitto_pub -h ::1 is let in, -h 127.0.0.1 gets "Connection refused"). Converted, it is
    tcp:1883:interface=\\:\\:, which takes IPv4 clients too where the system maps them, and
    nothing said so, where the same listener given by socket_domain ipv6 is named."""
    path = tmp_path / "m.conf"
    path.write_text(text + "allow_anonymous true\n")
    conversion = convert(path)
    noted = [note.why for note in conversion.notes if note.line == line]
    assert any("IPv4" in why for why in noted), f"IPv4 clients let in where Mosquitto takes none, not named: {noted}"


@pytest.mark.parametrize("line", ["certfile {dir}/server.pem", "keyfile {dir}/server.key"])
def test_a_listener_with_certfile_or_keyfile_alone_converts_to_toml_that_starts(
        tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Mosquitto 2.0.11 starts with a listener given certfile alone (or keyfile alone): it
    listens on plain TCP there (checked: a plain CONNECT is answered). mqttbroker-config exits 0
    with an ssl: endpoint of an empty certKey= (or privateKey=), which the broker's endpoint
    parser refuses, so the TOML written does not start. docs/mosquitto.md: "It refuses a file
    that would not start (naming the file and line ...)"."""
    (tmp_path / "server.pem").write_text("x")
    (tmp_path / "server.key").write_text("x")
    path = tmp_path / "m.conf"
    path.write_text(f"listener 8883 127.0.0.1\n{line.format(dir=tmp_path)}\nallow_anonymous true\n")
    status = main(["from-mosquitto", str(path)])
    out, err = capsys.readouterr()
    if status == 0:
        settings = tomllib.loads(out)
        empty = [e for e in settings["endpoints"] if "certKey=:" in e + ":" or "privateKey=:" in e]
        assert not empty, f"mqttbroker-config wrote an endpoint with an empty file: {empty}"


def test_a_relative_include_dir_is_noted_as_a_relative_password_file_is(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 opens a relative include_dir from the directory it runs in (checked:
    `mosquitto -c ../inc/m.conf` from another directory: "Error: Unable to open include_dir
    'conf.d'", exit 3; run from inc/, it loads conf.d/a.conf). The converter reads the config
    file's directory instead, without a note, so it converts other files than Mosquitto reads
    (or a file Mosquitto refuses to start with). A relative password_file, read the same way, is
    noted (docs/mosquitto.md: "the config file's directory's, noted (Mosquitto opens it from the
    directory it runs in)")."""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text("allow_anonymous true\n")
    path = tmp_path / "m.conf"
    path.write_text("listener 1883 127.0.0.1\ninclude_dir conf.d\n")
    conversion = convert(path)
    assert conversion.settings["allow_anonymous"] is True  # (read from the config file's directory)
    noted = [str(note) for note in conversion.notes if note.line == 2]
    assert noted, "a relative include_dir is read from the config file's directory, not noted"


def test_a_unix_socket_listener_is_not_opened_to_every_local_user(tmp_path: Path) -> None:
    """Mosquitto 2.0.11's `listener 0 /path.sock` makes the socket srwxrwx--- (0770, checked with
    umask 0022 and 0000): local users outside its user and group cannot connect. Converted, it is
    `unix:/path.sock`, which Twisted binds with mode 0666: every local user can connect (with
    allow_anonymous true, as such sockets often have, without a password). docs/mosquitto.md: the
    converter refuses "what would make the broker more open than Mosquitto with the same file"."""
    from twisted.internet import reactor

    from mqtt_broker.auth.tls import server_endpoint
    path = tmp_path / "m.conf"
    path.write_text(f"listener 0 {tmp_path / 'mqtt.sock'}\nallow_anonymous true\n")
    [description] = convert(path).config().endpoints
    endpoint = server_endpoint(reactor, description)
    mode = endpoint._mode  # (what listenUNIX chmods the socket to)
    assert mode & 0o007 == 0, f"{description!r}: the socket is made {oct(mode)}, Mosquitto's 0o770"


def test_an_include_dir_in_an_included_file_is_not_followed(tmp_path: Path) -> None:
    """Mosquitto 2.0.11 reads include_dir in the main file only (conf.c: level 0): one in an
    included file is passed over (checked: m.conf includes conf.d/, whose a.conf has
    `include_dir more/`, whose b.conf has `allow_anonymous true`; Mosquitto logs "Loading config
    file .../conf.d/a.conf" only, and answers an anonymous CONNECT with 0x05, not authorised).
    The converter follows it and lets anonymous clients in: more open than Mosquitto with the
    same file, which docs/mosquitto.md says it refuses."""
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "more").mkdir()
    (tmp_path / "conf.d" / "a.conf").write_text(f"include_dir {tmp_path / 'more'}\n")
    (tmp_path / "more" / "b.conf").write_text("allow_anonymous true\n")
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883 127.0.0.1\ninclude_dir {tmp_path / 'conf.d'}\n")
    try:
        config = convert(path).config()
    except ValueError:
        return  # (refused: fine too)
    assert config.allow_anonymous is False, "anonymous clients let in by a file Mosquitto never reads"


@pytest.mark.parametrize("value", ["0.5", "0.05"])
def test_sys_interval_is_read_as_mosquittos_whole_seconds(tmp_path: Path, value: str) -> None:
    """Mosquitto 2.0.11 reads sys_interval as an integer (atoi): `sys_interval 0.5` is 0, no
    $SYS at all (checked: mosquitto_sub -t '$SYS/broker/uptime' -W 2 times out; with
    `sys_interval 1` it gets "0 seconds"). Converted, 0.5 becomes $SYS updates twice a second,
    and 0.05 (which Mosquitto starts with, $SYS off) is refused as out of range."""
    path = tmp_path / "m.conf"
    path.write_text(f"listener 1883 127.0.0.1\nsys_interval {value}\n")
    conversion = convert(path)
    try:
        interval = conversion.config().sys_interval
    except ValueError as e:
        pytest.fail(f"sys_interval {value}, which Mosquitto starts with ($SYS off), refused: {e}")
    noted = [str(note) for note in conversion.notes if note.line == 2]
    assert interval == 0 or noted, f"sys_interval {value}: $SYS every {interval} s here, none in Mosquitto"


def test_two_listeners_of_one_port_on_addresses_that_meet_are_refused(tmp_path: Path) -> None:
    """Mosquitto listens with both an IPv4 socket on 1883 (socket_domain ipv4) and an IPv6 one
    (socket_domain ipv6, IPV6_V6ONLY); here :: takes IPv4 clients too (Linux's bindv6only 0), and
    the second bind failed: the converted file did not start. Refused, naming the line, as two
    plain listeners of one port are (which Mosquitto cannot open either)."""
    path = tmp_path / "m.conf"
    path.write_text("listener 1883\nsocket_domain ipv4\nlistener 1883\nsocket_domain ipv6\nallow_anonymous true\n")
    with pytest.raises(ValueError, match=r"m.conf:3: listener 1883 takes the port of the listener of .*m.conf:1"):
        convert(path)
    path.write_text("listener 1883\nlistener 1883 127.0.0.1\n")
    with pytest.raises(ValueError, match=r"m.conf:2: listener 1883 takes the port"):
        convert(path)
    path.write_text("listener 1883 0.0.0.0\nlistener 1883 ::0\n")  # (:: spelt otherwise)
    with pytest.raises(ValueError, match=r"m.conf:2: listener 1883 takes the port"):
        convert(path)
    path.write_text("listener 1883 127.0.0.1\nlistener 1883 ::1\nlistener 1884\n")
    assert convert(path).settings["endpoints"] == ["tcp:1883:interface=127.0.0.1", "tcp:1883:interface=\\:\\:1",
                                                   "tcp:1884"]

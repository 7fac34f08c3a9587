"""Authentication and ACLs enforced by the running broker, with real clients."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt
import paho.mqtt.client as mqtt
import pytest
from auth_helpers import RawClient
from paho_helpers import PahoClient
from twisted.logger import formatEvent

from mqtt_broker.wire import (Connect, Disconnect, FrameReader, Pingreq, Pingresp, Puback, Publish, Suback, Subscribe,
                              SubscriptionRequest, encode)

ACL = """\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic read public/#
topic write public/#
"""


def passwords(path: Path) -> Path:
    for user, password in (("alice", "wonderland"), ("bob", "builder")):
        subprocess.run([sys.executable, "-m", "mqtt_broker.passwd", "-b", *(["-c"] if user == "alice" else []),
                        str(path), user, password], check=True, timeout=60)
    return path


@pytest.fixture
def secured(broker_process, tmp_path):  # type: ignore[no-untyped-def]
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    broker = broker_process("--password-file", str(passwords(tmp_path / "passwd")), "--acl-file", str(acl),
                            "--allow-anonymous", "false")
    broker.acl = acl
    return broker


def connect_code(port: int, username: str | None, password: str | None, version: int = 4) -> int:
    """The CONNACK code, read off the wire (paho translates MQTT 3 codes into MQTT 5 ones)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(encode(Connect(client_id=f"probe-{username}", protocol_level=version, username=username,
                                   password=password.encode() if password is not None else None), version))
        reader = FrameReader(version=version)
        packets: list = []
        while not packets:
            data = raw.recv(4096)
            assert data, "closed without CONNACK"
            packets = reader.feed(data)
        return packets[0].reason_code  # type: ignore[no-any-return]


def test_passwords_and_anonymous_refusals(secured) -> None:  # type: ignore[no-untyped-def]
    assert connect_code(secured.port, "alice", "wonderland") == 0
    assert connect_code(secured.port, "alice", "Tr0ub4dor-guess") == 4          # bad user name or password
    assert connect_code(secured.port, "mallory", "x") == 4
    assert connect_code(secured.port, None, None) == 5                # not authorized
    assert connect_code(secured.port, "alice", "Tr0ub4dor-guess", 5) == 0x86
    assert connect_code(secured.port, None, None, 5) == 0x87
    assert "wonderland" not in secured.output() and "Tr0ub4dor" not in secured.output()


def login(port: int, user: str, password: str, version: int = mqtt.MQTTv311) -> PahoClient:
    client = PahoClient(port, f"{user}{version}", version=version, username=user, password=password)
    assert client.reason == 0
    return client


def test_acl_on_publish_subscribe_and_delivery(secured) -> None:  # type: ignore[no-untyped-def]
    alice = login(secured.port, "alice", "wonderland")
    bob = login(secured.port, "bob", "builder")
    alice.subscribe("#", qos=1)  # granted (it matches what she may read); read rights apply per message
    bob.publish("alice/x", b"from bob", qos=1)      # bob has no rules: dropped, still acknowledged
    bob.publish("public/x", b"bob public", qos=1)   # likewise
    alice.publish("alice/x", b"mine", qos=1)
    alice.publish("public/news", b"news", qos=1)
    alice.publish("secret/x", b"nope", qos=1)       # no write right: not routed
    assert [alice.message().payload for _ in range(2)] == [b"mine", b"news"]
    assert alice.no_message()
    v5 = login(secured.port, "alice", "wonderland", mqtt.MQTTv5)
    info = v5.client.publish("secret/x", b"nope", qos=1)
    assert v5.event("publish")[1].value == 0x87     # MQTT 5 is told: not authorized
    info.wait_for_publish(5)
    for c in (alice, bob, v5):
        c.close()


def test_subscribe_refused_where_nothing_could_be_read(broker_process, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Unlike Mosquitto, which grants every filter and delivers nothing on one the client may
    never read: SUBACK 0x80 in MQTT 3.1 and 3.1.1, 0x87 (not authorized) in MQTT 5. A filter
    matching some readable topic is granted, and each message on it is still checked."""
    (tmp_path / "acl").write_text("user alice\ntopic readwrite alice/#\ntopic read shared/#\n"
                                  "user bob\ntopic readwrite bob/#\ntopic readwrite shared/#\n")
    broker = broker_process("--password-file", str(passwords(tmp_path / "passwd")),
                            "--acl-file", str(tmp_path / "acl"), "--allow-anonymous", "false")
    clients = [RawClient(broker.port, f"alice-{version}", "alice", b"wonderland", version=version)
               for version in (3, 4, 5)]
    bob = RawClient(broker.port, "bob", "bob", b"builder", version=4)
    try:
        for client in clients:
            client.send(Subscribe(packet_id=1, subscriptions=tuple(
                SubscriptionRequest(topic_filter=f, qos=1) for f in ("bob/#", "#", "shared/+/x", "$share/g/bob/+"))))
            suback = client.next()
            refused = 0x87 if client.version == 5 else 0x80
            assert isinstance(suback, Suback) and suback.reason_codes == (refused, 1, 1, refused)
        for packet_id, topic in enumerate(["bob/x", "shared/a/x"], 1):
            bob.send(Publish(topic=topic, payload=b"from bob", qos=1, packet_id=packet_id))
            ack = bob.next()
            assert isinstance(ack, Puback) and ack.reason_code == 0
        for client in clients:
            # bob/x came first and matches "#", but she may not read it: not delivered.
            message = client.next()
            assert isinstance(message, Publish) and message.topic == "shared/a/x"
    finally:
        for client in clients + [bob]:
            client.close()


def test_sighup_reloads_the_acl_and_a_bad_file_keeps_the_old_rules(secured) -> None:  # type: ignore[no-untyped-def]
    alice = login(secured.port, "alice", "wonderland")
    assert [code.value for code in alice.subscribe("bob/#", qos=1)] == [0x80]  # nothing there she may read
    secured.acl.write_text(ACL + "topic readwrite bob/#\n")
    secured.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    granted = False
    while not granted and time.monotonic() < deadline:  # the reload is asynchronous to us
        granted = [code.value for code in alice.subscribe("bob/#", qos=1)] == [1]
    assert granted  # a refused filter is granted once subscribed again under the new rules
    alice.publish("bob/x", b"after", qos=1)
    assert alice.message().payload == b"after"
    secured.acl.write_text("topic sideways everything\n")  # not a valid rule
    secured.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "sideways" not in secured.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "sideways" in secured.output()
    while not alice.messages.empty():
        alice.messages.get()
    alice.publish("bob/x", b"still", qos=1)
    assert alice.message().payload == b"still"  # the old rules stay in force
    alice.close()


def test_clients_cannot_publish_to_sys_even_without_security(broker) -> None:  # type: ignore[no-untyped-def]
    watcher = PahoClient(broker.port, "watcher")
    watcher.subscribe("$SYS/#")
    writer = PahoClient(broker.port, "writer")
    writer.publish("$SYS/broker/uptime", b"forged", qos=1)
    while True:  # the broker's own $SYS messages may come; the forged one must not
        try:
            message = watcher.messages.get(timeout=0.5)
        except Exception:
            break
        assert message.payload != b"forged"
    watcher.close()
    writer.close()


def test_sighup_disconnects_clients_whose_password_changed_or_was_removed(secured, tmp_path) -> None:  # type: ignore[no-untyped-def]
    passwd_file = tmp_path / "passwd"
    subprocess.run([sys.executable, "-m", "mqtt_broker.passwd", "-b", str(passwd_file), "carol", "c4rol"],
                   check=True, timeout=60)
    secured.process.send_signal(signal.SIGHUP)
    for _ in range(100):  # bounded: the signal handler queues the reload on the reactor
        if connect_code(secured.port, "carol", "c4rol") == 0:
            break
    carol = RawClient(secured.port, "carol-1", "carol", b"c4rol", version=5)
    alice = RawClient(secured.port, "alice-1", "alice", b"wonderland", version=5)
    bob = RawClient(secured.port, "bob-1", "bob", b"builder", version=4)
    alice_again = RawClient(secured.port, "alice-2", "alice", b"wonderland", version=4)
    assert {c.connack.reason_code for c in (carol, alice, bob, alice_again)} == {0}
    subprocess.run([sys.executable, "-m", "mqtt_broker.passwd", "-b", str(passwd_file), "alice", "new one"],
                   check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "mqtt_broker.passwd", "-D", str(passwd_file), "bob"],
                   check=True, timeout=60)
    secured.process.send_signal(signal.SIGHUP)
    # MQTT 5 is told why (0x87 not authorized), MQTT 3 is closed; reads wait for it, bounded by
    # the socket timeout.
    disconnect = alice.next()
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x87
    assert alice.next() is None and bob.next() is None and alice_again.next() is None
    carol.send(Pingreq())  # whose entry did not change: still connected
    assert isinstance(carol.next(), Pingresp)
    assert connect_code(secured.port, "alice", "new one") == 0
    assert connect_code(secured.port, "bob", "builder") == 4
    output = secured.output()
    logged = "\n".join(map(formatEvent, secured.events()))
    assert f"disconnecting client 'alice-1' after the reload: the password of 'alice' changed in {passwd_file}" \
        in logged
    assert f"disconnecting client 'bob-1' after the reload: user 'bob' is no longer in {passwd_file}" in logged
    assert "disconnecting client 'alice-2'" in logged and "carol-1' after the reload" not in logged
    assert "wonderland" not in output and "new one" not in output
    for client in (carol, alice, bob, alice_again):
        client.close()


def test_client_id_and_username_in_token_filters(broker_process, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A JWT's publish/subscribe claims with %c and %u, as acl_file patterns: each client gets
    its own tree, and a client id with "/" or "+" gets none of the substituted filters ("a/b"
    would reach into the tree of "a", "+" into everyone's)."""
    secret = b"a secret of thirty-two bytes or more!"
    (tmp_path / "secret").write_bytes(secret)
    broker = broker_process("--jwt-secret-file", str(tmp_path / "secret"), "--allow-anonymous", "false")
    claims = {"sub": "alice", "exp": int(time.time()) + 3600, "publish": ["devices/%c/#"],
              "subscribe": ["devices/%c/#", "inbox/%u/#", "broadcast/#"]}
    token = jwt.encode(claims, secret, algorithm="HS256").encode()

    def subscribe(client: RawClient, *filters: str) -> tuple[int, ...]:
        client.send(Subscribe(packet_id=1, subscriptions=tuple(SubscriptionRequest(topic_filter=f, qos=1)
                                                               for f in filters)))
        suback = client.next()
        assert isinstance(suback, Suback)
        return suback.reason_codes

    delivered: list[str] = []

    def publish(client: RawClient, topic: str) -> int:
        client.send(Publish(topic=topic, payload=b"x", qos=1, packet_id=7))
        puback, before = client.until(Puback)  # a message to itself may come first
        assert isinstance(puback, Puback)
        delivered.extend(p.topic for p in before if isinstance(p, Publish))
        return puback.reason_code

    clients = [RawClient(broker.port, client_id, None, token) for client_id in ("dev-1", "a/b", "+", "%u")]
    dev, slashed, plus, percent = clients
    try:
        assert subscribe(dev, "devices/dev-1/#", "inbox/alice/#", "devices/dev-2/#", "inbox/bob/#",
                         "devices/+/#") == (1, 1, 0x87, 0x87, 0x87)
        assert publish(dev, "devices/dev-1/temp") == 0 and publish(dev, "devices/dev-2/temp") == 0x87
        assert delivered == ["devices/dev-1/temp"]
        for unfit in (slashed, plus):  # no substituted filter at all; the literal one stays
            assert subscribe(unfit, "devices/a/b/#", "devices/+/#", "devices/#", "inbox/alice/#",
                             "broadcast/#") == (0x87, 0x87, 0x87, 0x87, 1)
            assert publish(unfit, "devices/a/b/x") == 0x87
        # One pass: the client id "%u" is not the username.
        assert subscribe(percent, "devices/alice/#", "devices/%u/#") == (0x87, 1)
    finally:
        for client in clients:
            client.close()


def test_relative_files_are_read_from_rundir_at_start_as_at_each_sighup(tmp_path: Path) -> None:
    """docs/twistd.md: relative paths in the settings are relative to --rundir. twistd makes the
    service before it enters --rundir: a relative password_file was read at start from the
    directory twistd was started in, and from --rundir at each SIGHUP, which changed who could
    log in with nothing changed on disk."""
    from conftest import free_port, terminate, wait_for_port

    from mqtt_broker.passwd import main as passwd
    launch, rundir = tmp_path / "launch", tmp_path / "run"
    launch.mkdir()
    rundir.mkdir()
    assert passwd(["-c", "-b", str(launch / "pw"), "alice", "alice-pw"]) == 0
    assert passwd(["-c", "-b", str(rundir / "pw"), "bob", "bob-pw"]) == 0
    port = free_port()
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "--rundir", str(rundir), "mqttbroker",
             "--endpoint", f"tcp:{port}:interface=127.0.0.1", "--persistence", "memory", "--password-file", "pw",
             "--allow-anonymous", "false"], cwd=launch, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        assert (connect_code(port, "alice", "alice-pw"), connect_code(port, "bob", "bob-pw")) == (4, 0), \
            log.read_text(errors="replace")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reloaded" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and process.poll() is None, log.read_text(errors="replace")
            time.sleep(0.05)
        assert (connect_code(port, "alice", "alice-pw"), connect_code(port, "bob", "bob-pw")) == (4, 0), \
            log.read_text(errors="replace")
    finally:
        terminate(process)


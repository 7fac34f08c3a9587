"""Authentication and ACLs enforced by the running broker, with real clients."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho_helpers import PahoClient

from mqtt_broker.wire import Connect, FrameReader, encode

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
    alice.subscribe("#", qos=1)  # granted, as by Mosquitto: read rights apply per message
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


def test_sighup_reloads_the_acl_and_a_bad_file_keeps_the_old_rules(secured) -> None:  # type: ignore[no-untyped-def]
    alice = login(secured.port, "alice", "wonderland")
    alice.subscribe("bob/#", qos=1)
    alice.publish("bob/x", b"before", qos=1)
    assert alice.no_message()
    secured.acl.write_text(ACL + "topic readwrite bob/#\n")
    secured.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    got = None
    while got is None and time.monotonic() < deadline:  # the reload is asynchronous to us
        alice.publish("bob/x", b"after", qos=1)
        try:
            got = alice.messages.get(timeout=0.2)
        except Exception:
            pass
    assert got is not None and got.payload == b"after"
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

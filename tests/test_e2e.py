"""End to end: the broker as users run it, with paho-mqtt clients on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import paho.mqtt.client as mqtt
from conftest import PACKAGE_ROOT, ROOT, free_port, wait_for_port
from paho_helpers import PahoClient

from mqtt_broker.wire import Connect, FrameReader, Will, encode


def test_paho_mqtt5_clients_connect_to_a_broker_of_the_protocols_largest_packet_size(
        broker_process) -> None:  # type: ignore[no-untyped-def]
    """A mosquitto.conf without message_size_limit converts to max_packet_size 268,435,460:
    paho-mqtt 2 refused a CONNACK saying so (it wants 1-268,435,455), and never connected."""
    broker = broker_process("--max-packet-size", "268435460")
    sub = PahoClient(broker.port, "sub", version=mqtt.MQTTv5)
    assert not sub.reason.is_failure
    assert [int(rc.value) for rc in sub.subscribe("e2e/#", qos=1)] == [1]
    pub = PahoClient(broker.port, "pub", version=mqtt.MQTTv5)
    pub.publish("e2e/big", b"x" * 100_000, qos=1)
    assert sub.message().payload == b"x" * 100_000
    pub.close()
    sub.close()


def test_qos_round_trips(broker) -> None:  # type: ignore[no-untyped-def]
    sub = PahoClient(broker.port, "sub")
    assert [int(rc.value) for rc in sub.subscribe("e2e/#", qos=2)] == [2]
    pub = PahoClient(broker.port, "pub")
    for qos in (0, 1, 2):
        pub.publish(f"e2e/{qos}", f"q{qos}".encode(), qos=qos)
        message = sub.message()
        assert (message.topic, message.payload, message.qos) == (f"e2e/{qos}", f"q{qos}".encode(), qos)
    pub.close()
    sub.close()


def test_persistent_session_across_reconnect(broker) -> None:  # type: ignore[no-untyped-def]
    sub = PahoClient(broker.port, "persist", clean=False)
    sub.subscribe("p/t", qos=1)
    sub.close()
    pub = PahoClient(broker.port, "pub")
    for n in range(10):
        pub.publish("p/t", str(n).encode(), qos=1)
    again = PahoClient(broker.port, "persist", clean=False)
    assert again.flags.session_present
    assert [again.message().payload for _ in range(10)] == [str(n).encode() for n in range(10)]
    again.close()
    pub.close()


def test_retained_and_will(broker) -> None:  # type: ignore[no-untyped-def]
    watcher = PahoClient(broker.port, "watcher")
    watcher.subscribe("wills/#", qos=1)
    # A raw client that disappears without DISCONNECT: its will must be published.
    raw = socket.create_connection(("127.0.0.1", broker.port))
    raw.sendall(encode(Connect(client_id="doomed", keep_alive=30,
                               will=Will(topic="wills/doomed", payload=b"gone", qos=1, retain=True))))
    assert FrameReader().feed(raw.recv(4))[0].reason_code == 0  # type: ignore[union-attr]
    raw.close()
    will = watcher.message()
    assert (will.topic, will.payload) == ("wills/doomed", b"gone")
    late = PahoClient(broker.port, "late")
    late.subscribe("wills/+", qos=1)
    retained = late.message()
    assert retained.retain and retained.payload == b"gone"
    watcher.close()
    late.close()


def test_takeover(broker) -> None:  # type: ignore[no-untyped-def]
    first = PahoClient(broker.port, "same")
    first.client.reconnect_delay_set(60, 120)  # keep paho from reconnecting and taking it back
    second = PahoClient(broker.port, "same")
    assert first.event("disconnect")
    second.subscribe("t")
    second.publish("t", b"mine")
    assert second.message().payload == b"mine"
    second.close()
    first.client.loop_stop()


def test_mqtt5_client_basic_round_trip(broker) -> None:  # type: ignore[no-untyped-def]
    sub = PahoClient(broker.port, "v5sub", version=mqtt.MQTTv5)
    sub.subscribe("v5/t", qos=1)
    pub = PahoClient(broker.port, "v5pub", version=mqtt.MQTTv5)
    pub.publish("v5/t", b"five", qos=1)
    assert sub.message().payload == b"five"
    sub.close()
    pub.close()


def test_embedding_example() -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "embed.py"), str(port)],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        client = PahoClient(port, "embedded")
        client.subscribe("#", qos=1)
        status = client.message()  # published retained by the example at start-up
        assert (status.topic, status.payload, status.retain) == ("status/app", b"up", True)
        client.publish("secret/x", b"hidden", qos=1)
        client.publish("open/x", b"visible", qos=1)
        assert client.message().payload == b"visible"  # the hook dropped the secret one
        client.close()
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert b"connecting: embedded" in output


def test_tac_file_runs_under_twistd() -> None:
    port = free_port()
    tac = (ROOT / "examples" / "broker.tac").read_text().replace('"tcp:1883"', f'"tcp:{port}:interface=127.0.0.1"')
    path = ROOT / "tests" / f".broker-{port}.tac"
    path.write_text(tac)
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    process = subprocess.Popen([*twistd, "-ny", str(path), "--pidfile", ""],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        client = PahoClient(port, "tac")
        client.subscribe("x")
        client.close()
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
        path.unlink()
    assert b"bye tac" in output

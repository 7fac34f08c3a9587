"""Bridges end to end: our broker (a real process) bridged to a real Mosquitto, and to another of
ours, with real clients on both sides."""

from __future__ import annotations

import os
import queue
import signal
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from auth_helpers import Mosquitto
from bridge_helpers import StateWatcher, write_config
from conftest import BrokerProcess
from paho_helpers import WAIT, PahoClient


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Any]:
    started: list[Mosquitto] = []

    def start(**settings: str | list[str]) -> Mosquitto:
        m = Mosquitto(tmp_path, allow_anonymous="true", **settings)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


def bridged(broker_process: Any, tmp_path: Path, remote_port: int, *, settings: dict[str, Any] | None = None,
            data_dir: Path | None = None, name: str = "cloud", port: int | None = None,
            **bridge: Any) -> BrokerProcess:
    """Our broker with one bridge to ``remote_port``, started and connected."""
    table = {"connection": name, "addresses": [f"127.0.0.1:{remote_port}"], "restart_timeout": [0.2, 1.0],
             "remote_clientid": f"edge-{name}", **bridge}
    config = write_config(tmp_path / f"bridge-{name}.toml", settings or {}, [table])
    extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
    ours = broker_process("--config", str(config), *extra, port=port)
    watcher = StateWatcher(ours.port, table["remote_clientid"])
    try:
        watcher.wait_for(b"1")
    finally:
        watcher.close()
    return ours


VERSIONS = [pytest.param("mqttv311", id="v311"), pytest.param("mqttv50", id="v5")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_out_and_in_with_prefixes(broker_process: Any, mosquitto: Any, tmp_path: Path, version: str, qos: int) -> None:
    remote = mosquitto()
    ours = bridged(broker_process, tmp_path, remote.port, bridge_protocol_version=version,
                   topic=[f"# out {qos} factory/ edge1/", f"# in {qos} commands/ cloud/edge1/"])
    cloud = PahoClient(remote.port)
    cloud.subscribe("edge1/#", 2)
    local = PahoClient(ours.port)
    local.subscribe("commands/#", 2)

    local.publish("factory/line1/temp", b"21.5", qos)
    got = cloud.message()
    assert (got.topic, got.payload, got.qos) == ("edge1/line1/temp", b"21.5", qos)

    cloud.publish("cloud/edge1/line1/stop", b"now", qos)
    got = local.message()
    assert (got.topic, got.payload, got.qos) == ("commands/line1/stop", b"now", qos)

    # Nothing outside the topic lines crosses, either way.
    local.publish("elsewhere/x", b"no", 1)
    cloud.publish("cloud/other/x", b"no", 1)
    assert cloud.no_message() and local.no_message()
    cloud.close()
    local.close()


@pytest.mark.parametrize("edge", ["mosquitto", "ours"])
def test_topics_are_mapped_as_by_mosquittos_own_bridge(broker_process: Any, mosquitto: Any, tmp_path: Path,
                                                       edge: str) -> None:
    """The same topic lines in a Mosquitto bridge and in ours, each to a Mosquitto: the line with
    a prefix maps what a line without one sends too, whatever their order; and r, the level r/#
    matches above it, keeps its name under the local prefix."""
    lines = ["a/# out 1", '# out 1 "" pre/', "# in 1 l/ r/"]
    remote = mosquitto()
    cloud = PahoClient(remote.port)
    cloud.publish("r", b"above", 1, retain=True)  # (retained: it comes in whenever the bridge subscribes)
    cloud.publish("r/x", b"under", 1, retain=True)
    for topic in ("a/#", "c", "pre/a/#", "pre/c"):
        cloud.subscribe(topic, 1)
    if edge == "mosquitto":
        port = mosquitto(connection="cloud", address=f"127.0.0.1:{remote.port}", remote_clientid="edge-cloud",
                         topic=lines).port
        watcher = StateWatcher(port, "edge-cloud")
        watcher.wait_for(b"1")
        watcher.close()
    else:
        port = bridged(broker_process, tmp_path, remote.port, topic=lines).port
    local = PahoClient(port)
    local.subscribe("l/#", 1)
    assert sorted(local.message().topic for _ in range(2)) == ["l/r", "l/x"]
    local.publish("a/b", b"a", 1)
    local.publish("c", b"c", 1)
    assert sorted(cloud.message().topic for _ in range(2)) == ["pre/a/b", "pre/c"]
    assert cloud.no_message() and local.no_message()
    cloud.close()
    local.close()


def test_v5_properties_cross_the_bridge(broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    from paho.mqtt.properties import Properties
    from paho.mqtt.packettypes import PacketTypes
    remote = mosquitto()
    ours = bridged(broker_process, tmp_path, remote.port, bridge_protocol_version="mqttv50", topic=["data/# out 1"])
    cloud = PahoClient(remote.port, version=mqtt.MQTTv5)
    cloud.subscribe("data/#", 1)
    local = PahoClient(ours.port, version=mqtt.MQTTv5)
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("origin", "edge")]
    properties.ResponseTopic = "replies/edge"
    properties.CorrelationData = b"\x01\x02"
    properties.MessageExpiryInterval = 3600
    local.publish("data/x", b"v", 1, properties=properties)
    got = cloud.message()
    assert got.properties.UserProperty == [("origin", "edge")]
    assert got.properties.ResponseTopic == "replies/edge"
    assert got.properties.CorrelationData == b"\x01\x02"
    assert 3590 <= got.properties.MessageExpiryInterval <= 3600
    cloud.close()
    local.close()


def test_retained_messages_go_out_and_come_in(broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    remote = mosquitto()
    cloud = PahoClient(remote.port)
    cloud.publish("config/edge1", b"v2", 1, retain=True)
    ours = bridged(broker_process, tmp_path, remote.port, topic=["status/# out 1", "config/# in 1"])
    # The state says both links are up; the retained message the remote sends for the bridge's
    # SUBSCRIBE crosses after that (a turn later at least). Once a subscriber here has it, live or
    # retained, it is kept here: the broker stores a retained message before it delivers it.
    probe = PahoClient(ours.port)
    probe.subscribe("config/#", 1)
    assert probe.message().payload == b"v2"
    local = PahoClient(ours.port)
    assert local.subscribe("config/#", 1)
    got = local.message()
    assert (got.topic, got.payload, got.retain) == ("config/edge1", b"v2", True)
    # Likewise out: our PUBACK says nothing of the remote; once a subscriber there has the
    # message, the remote keeps it (Mosquitto stores a retained message before it delivers it).
    cloud.subscribe("status/#", 1)
    local.publish("status/edge1", b"online", 1, retain=True)
    assert cloud.message().payload == b"online"
    later = PahoClient(remote.port)
    later.subscribe("status/#", 1)
    got = later.message()
    assert (got.topic, got.payload, got.retain) == ("status/edge1", b"online", True)
    for client in (cloud, probe, local, later):
        client.close()


class Remote:
    """The broker at the other end, stopped and started again on the same port and store."""

    def __init__(self, kind: str, tmp_path: Path, broker_process: Any, mosquitto: Any) -> None:
        self.kind = kind
        self.store = tmp_path / "remote-store"
        self.store.mkdir()
        self._broker_process, self._mosquitto = broker_process, mosquitto
        self.port = 0
        self.start()

    def start(self) -> None:
        if self.kind == "mosquitto":
            if self.port:
                self.process = _restart(self.process)
            else:
                self.process = self._mosquitto(persistence="true", persistence_location=f"{self.store}/")
                self.port = self.process.port
        else:
            self.process = self._broker_process(port=self.port or None, data_dir=self.store)
            self.port = self.process.port

    def stop(self) -> None:
        self.process.stop()

    def qos2_traffic(self) -> dict[str, int]:
        """What a Mosquitto remote logged of QoS 2 PUBLISHes, new (d0) and resent (d1), from the
        bridge and to the subscriber: when a message arrives twice, which side sent it twice."""
        if self.kind != "mosquitto":
            return {}
        text = self.process.log_path.read_text(errors="replace")
        return {line: text.count(line) for line in (
            "Received PUBLISH from edge-cloud (d0, q2", "Received PUBLISH from edge-cloud (d1, q2",
            "Sending PUBLISH to cloud-sub (d0, q2", "Sending PUBLISH to cloud-sub (d1, q2")}


@pytest.mark.parametrize("kind", ["mosquitto", "ours"])
def test_remote_down_for_a_while_every_message_arrives(broker_process: Any, mosquitto: Any, tmp_path: Path,
                                                      kind: str) -> None:
    """QoS 1 and 2 published while the remote is down are queued here and delivered after it is
    back; QoS 2 once."""
    remote = Remote(kind, tmp_path, broker_process, mosquitto)
    ours = bridged(broker_process, tmp_path, remote.port, topic=["q/# out 2"])
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    cloud.subscribe("q/#", 2)
    local = PahoClient(ours.port)
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"1")
    for n in range(20):
        local.publish(f"q/{n % 2 + 1}", f"before {n}".encode(), n % 2 + 1)
    before = {cloud.message().payload for _ in range(20)}
    assert before == {f"before {n}".encode() for n in range(20)}

    cloud.close()
    remote.stop()
    watcher.wait_for(b"0")
    for n in range(200):
        local.publish(f"q/{n % 2 + 1}", f"during {n}".encode(), n % 2 + 1)
    remote.start()
    watcher.wait_for(b"1")
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    payloads = arrived_once_each(cloud, "during", 200)
    if kind == "ours":
        # In order per QoS level [MQTT-4.6.0-6]. (Mosquitto 2.0.11 may reorder what it queued for
        # an offline client with what arrives as it reconnects, so it is not asked this.)
        for qos in (1, 2):
            assert [p for p in dict.fromkeys(payloads) if int(p.split()[1]) % 2 + 1 == qos] == [
                f"during {n}".encode() for n in range(200) if n % 2 + 1 == qos]
    for client in (cloud, local, watcher):
        client.close()


def arrived_once_each(cloud: PahoClient, tag: str, count: int) -> list[bytes]:
    """The payloads of the messages "tag n" ``cloud`` is sent, in the order they come, once it
    has every one for n below ``count`` (QoS 1 for even n, QoS 2 for odd n) and nothing more
    comes: a QoS 2 one only once. Any other message can only be an earlier QoS 1 one sent again
    (at least once): one sent as the links went down, whose acknowledgement was lost with them."""
    wanted = {f"{tag} {n}".encode() for n in range(count)}
    payloads: list[bytes] = []
    others: list[bytes] = []
    for _ in range(10 * count):
        done = wanted <= set(payloads)
        try:
            payload = cloud.messages.get(timeout=0.5 if done else WAIT).payload
        except queue.Empty:
            assert done, f"{len(wanted - set(payloads))} of the {tag} messages never came"
            break
        (payloads if payload in wanted else others).append(payload)
    else:
        raise AssertionError(f"messages kept coming: {len(payloads) + len(others)}")
    assert all(p.startswith(b"before ") and int(p.split()[1]) % 2 == 0 for p in others), others
    qos2 = [p for p in payloads if int(p.split()[1]) % 2]
    assert len(qos2) == len(set(qos2)) == count // 2
    return payloads


def test_remote_never_reached_yet_every_message_arrives(broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    """QoS 1 and 2 published before the bridge has ever reached the remote (down as our broker
    starts) are queued here and delivered once it is up, as Mosquitto's bridge does; QoS 2 once."""
    remote = Remote("mosquitto", tmp_path, broker_process, mosquitto)
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    cloud.subscribe("q/#", 2)
    cloud.close()
    remote.stop()
    table = {"connection": "cloud", "addresses": [f"127.0.0.1:{remote.port}"], "restart_timeout": [0.2, 1.0],
             "remote_clientid": "edge-cloud", "topic": ["q/# out 2"]}
    ours = broker_process("--config", str(write_config(tmp_path / "bridge.toml", {}, [table])))
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"0")
    local = PahoClient(ours.port)
    for n in range(20):
        local.publish(f"q/{n % 2 + 1}", f"early {n}".encode(), n % 2 + 1)  # acknowledged: queued here
    remote.start()
    watcher.wait_for(b"1")
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    arrived_once_each(cloud, "early", 20)
    for client in (cloud, local, watcher):
        client.close()


def test_a_remote_of_a_lower_maximum_qos_gets_what_was_queued_at_a_higher_one(
        broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    """Mosquitto with max_qos 1 (an MQTT 5 CONNACK's Maximum QoS 1): QoS 2 messages queued here
    before the remote was reached go to it at QoS 1, and are done here once it has them. They
    stayed in flight here: once its Receive Maximum (20) of them were, nothing went out."""
    remote = Remote("mosquitto", tmp_path, broker_process, mosquitto)
    remote.process.config.write_text(remote.process.config.read_text() + "max_qos 1\n")
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    cloud.subscribe("q/#", 1)
    cloud.close()
    remote.stop()
    table = {"connection": "cloud", "addresses": [f"127.0.0.1:{remote.port}"], "restart_timeout": [0.2, 1.0],
             "remote_clientid": "edge-cloud", "topic": ["q/# out 2"], "bridge_protocol_version": "mqttv50"}
    ours = broker_process("--config", str(write_config(tmp_path / "bridge.toml", {}, [table])))
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"0")
    local = PahoClient(ours.port)
    for n in range(25):
        local.publish("q/t", f"early {n}".encode(), 2)  # acknowledged: queued here
    remote.start()
    watcher.wait_for(b"1")
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    local.publish("q/t", b"once up", 1)
    wanted = {f"early {n}".encode() for n in range(25)} | {b"once up"}
    got: list[bytes] = []
    while not wanted <= set(got):
        try:
            got.append(cloud.messages.get(timeout=WAIT).payload)
        except queue.Empty:
            raise AssertionError(f"{len(wanted - set(got))} of the 26 messages never came") from None
    assert cloud.no_message(0.5) and len(got) == 26  # each once
    for client in (cloud, local, watcher):
        client.close()


def test_what_the_remote_queued_at_qos2_comes_in_once_max_qos_here_is_1(broker_process: Any, mosquitto: Any,
                                                                        tmp_path: Path) -> None:
    """The bridge's session at Mosquitto subscribed at QoS 2, then this broker restarted with
    max_qos 1: Mosquitto sends what it queued at QoS 2. Taken at QoS 2, it made this broker close
    the bridge's link (0x9B), and it came again at each reconnection: nothing crossed."""
    remote = mosquitto()
    data = tmp_path / "ours"
    data.mkdir()
    ours = bridged(broker_process, tmp_path, remote.port, data_dir=data, topic=["in/# in 2"])
    local = PahoClient(ours.port, client_id="local-sub", clean=False)
    local.subscribe("in/#", 1)
    local.close()
    ours.stop()
    cloud = PahoClient(remote.port)
    for n in range(3):
        cloud.publish("in/x", f"queued {n}".encode(), 2)
    ours = bridged(broker_process, tmp_path, remote.port, data_dir=data, topic=["in/# in 2"], settings={"max_qos": 1})
    local = PahoClient(ours.port, client_id="local-sub", clean=False)
    cloud.publish("in/x", b"once up", 2)
    assert [local.message().payload for _ in range(4)] == [b"queued 0", b"queued 1", b"queued 2", b"once up"]
    assert local.no_message(0.5)
    cloud.close()
    local.close()


def test_a_topic_changed_from_both_to_out_stops_coming_in_from_mosquitto(broker_process: Any, mosquitto: Any,
                                                                        tmp_path: Path) -> None:
    """Mosquitto kept the bridge's session (cleansession false) and its subscription of the
    topic: it went on sending what the bridge only dropped."""
    remote = mosquitto()
    ours = bridged(broker_process, tmp_path, remote.port, topic=["t/# both 1", "marker in 1"])
    ours.stop()
    ours = bridged(broker_process, tmp_path, remote.port, topic=["t/# out 1", "marker in 1"])
    local = PahoClient(ours.port)
    local.subscribe("marker", 1)
    cloud = PahoClient(remote.port)
    cloud.publish("t/x", b"from the cloud", 1)
    cloud.publish("marker", b"after it", 1)
    assert local.message().payload == b"after it"  # (Mosquitto sends in order: t/x would have gone first)
    remote.stop()  # (its log is complete)
    sent = [line for line in remote.log_path.read_text(errors="replace").splitlines()
            if "Sending PUBLISH to edge-cloud" in line and "'t/x'" in line]
    assert sent == []
    local.close()
    cloud.close()


def remote_state(port: int, topic: str) -> bytes | None:
    """The retained message of ``topic`` on the broker at ``port`` (None: none)."""
    client = PahoClient(port)
    try:
        client.subscribe(topic, 0)
        return client.messages.get(timeout=2).payload
    except queue.Empty:
        return None
    finally:
        client.close()


@pytest.mark.parametrize("edge", ["ours", "mosquitto"])
def test_a_stopped_bridge_leaves_the_remote_saying_so(broker_process: Any, mosquitto: Any, tmp_path: Path,
                                                      edge: str) -> None:
    """The broker that bridges stops (SIGTERM): the remote's state of the link says 0, as when
    Mosquitto's bridge stops. It kept saying 1: the bridge's own DISCONNECT discards the will that
    says 0 when a link fails."""
    remote = mosquitto()
    topic = "$SYS/broker/connection/edge-cloud/state"
    if edge == "ours":
        ours: Any = bridged(broker_process, tmp_path, remote.port, topic=["q/# out 1"])
    else:
        ours = mosquitto(connection="cloud", address=f"127.0.0.1:{remote.port}", remote_clientid="edge-cloud",
                         topic="q/# out 1")
    for _ in range(20):
        if remote_state(remote.port, topic) == b"1":
            break
    assert remote_state(remote.port, topic) == b"1"
    ours.stop()
    for _ in range(20):  # (Mosquitto's bridge: the remote publishes its will once it sees the close)
        if remote_state(remote.port, topic) == b"0":
            break
    assert remote_state(remote.port, topic) == b"0"


def _restart(remote: Mosquitto) -> Mosquitto:
    """The same Mosquitto again, on the same port and store."""
    import subprocess
    from conftest import wait_for_port
    remote._log = open(remote.log_path, "ab")
    remote.process = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(remote.config)],
                                      stdout=remote._log, stderr=subprocess.STDOUT)
    wait_for_port(remote.port, remote.process)  # type: ignore[arg-type]
    return remote


def test_ours_killed_with_messages_queued_for_the_remote(broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    """What our broker acknowledged while the remote was away is in its store: after a kill -9
    and a restart on the same data directory it goes out, QoS 2 once."""
    remote = Remote("mosquitto", tmp_path, broker_process, mosquitto)
    data = tmp_path / "ours"
    data.mkdir()
    ours = bridged(broker_process, tmp_path, remote.port, data_dir=data, topic=["q/# out 2"])
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    cloud.subscribe("q/#", 2)
    cloud.close()
    remote.stop()
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"0")
    watcher.close()
    local = PahoClient(ours.port)
    for n in range(100):
        local.publish(f"q/{n % 2 + 1}", f"queued {n}".encode(), n % 2 + 1)  # acknowledged: stored
    os.kill(ours.pid, signal.SIGKILL)
    ours.process.wait(10)
    remote.start()
    bridged(broker_process, tmp_path, remote.port, data_dir=data, topic=["q/# out 2"])
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    payloads = []
    while len(set(payloads)) < 100:
        payloads.append(cloud.message().payload)
    assert cloud.no_message(0.5)
    assert set(payloads) == {f"queued {n}".encode() for n in range(100)}
    qos2 = [p for p in payloads if int(p.split()[1]) % 2]
    assert len(qos2) == len(set(qos2)) == 50
    cloud.close()


@pytest.mark.parametrize("qos", [1, 2])
def test_ours_killed_while_the_remote_sends(broker_process: Any, mosquitto: Any, tmp_path: Path, qos: int) -> None:
    """What comes in from the remote is acknowledged to it only once routed and stored here: a
    kill -9 in the middle of a stream loses nothing (and, at QoS 2, doubles nothing)."""
    remote = mosquitto()
    data = tmp_path / "ours"
    data.mkdir()
    ours = bridged(broker_process, tmp_path, remote.port, data_dir=data, topic=[f"cmd/# in {qos}"])
    local = PahoClient(ours.port, client_id="local-sub", clean=False)
    local.subscribe("cmd/#", qos)
    cloud = PahoClient(remote.port)
    for n in range(300):
        cloud.client.publish("cmd/x", f"c {n}".encode(), qos)
    first = [local.message().payload for _ in range(30)]
    os.kill(ours.pid, signal.SIGKILL)
    ours.process.wait(10)
    # The same subscriber reconnects by itself once the broker is back on its port, with what it
    # had received (a QoS 2 message reaches paho's application at its PUBREL, method B).
    bridged(broker_process, tmp_path, remote.port, data_dir=data, port=ours.port, topic=[f"cmd/# in {qos}"])
    payloads = list(first)
    while len(set(payloads)) < 300:
        payloads.append(local.message().payload)
    assert local.no_message(0.5)
    assert set(payloads) == {f"c {n}".encode() for n in range(300)}
    if qos == 2:
        assert len(payloads) == 300  # once each
    cloud.close()
    local.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_two_of_ours_bridged_both_ways_do_not_loop(broker_process: Any, tmp_path: Path, version: str) -> None:
    remote = broker_process()
    ours = bridged(broker_process, tmp_path, remote.port, bridge_protocol_version=version, topic=["shared/# both 1"])
    on_a, on_b = PahoClient(ours.port), PahoClient(remote.port)
    for client in (on_a, on_b):
        client.subscribe("shared/#", 1)
    on_a.publish("shared/from-a", b"a", 1)
    on_b.publish("shared/from-b", b"b", 1)
    for client in (on_a, on_b):
        got = sorted((client.message().topic, client.message().topic))
        assert got == ["shared/from-a", "shared/from-b"]
        assert client.no_message(0.5)  # once each, and nothing coming round again
    on_a.close()
    on_b.close()


def test_failover_to_the_next_address(broker_process: Any, mosquitto: Any, tmp_path: Path,
                                       refused_port: int) -> None:
    remote = mosquitto()
    dead = refused_port
    ours = bridged(broker_process, tmp_path, remote.port, topic=["f/# out 1"],
                   addresses=[f"127.0.0.1:{dead}", f"127.0.0.1:{remote.port}"])
    cloud = PahoClient(remote.port)
    cloud.subscribe("f/#", 1)
    PahoClient(ours.port).publish("f/x", b"via the second address", 1)
    assert cloud.message().payload == b"via the second address"
    cloud.close()


def _server_certificate(certs: Path, name: str) -> tuple[Path, Path]:
    """A server certificate for ``name`` only, signed by the test CA of ``certs``."""
    import subprocess
    key, csr, pem = certs / f"{name}.key", certs / f"{name}.csr", certs / f"{name}.pem"
    ext = certs / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    for command in (
            ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-subj", f"/CN={name}", "-out", csr],
            ["openssl", "x509", "-req", "-in", csr, "-CA", certs / "ca.pem", "-CAkey", certs / "ca.key",
             "-CAcreateserial", "-days", "2", "-out", pem, "-extfile", ext]):
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=30)
    return pem, key


@pytest.mark.parametrize("server_name, connects", [("localhost", True), ("elsewhere.example", False)])
def test_tls_bridge_checks_the_remote_name(broker_process: Any, mosquitto: Any, tmp_path: Path,
                                           server_name: str, connects: bool) -> None:
    from cluster_helpers import wait_until
    from test_tls import make_certs
    certs = tmp_path / "certs"
    make_certs(certs)
    pem, key = (certs / "server.pem", certs / "server.key") if connects else _server_certificate(certs, server_name)
    remote = mosquitto(certfile=str(pem), keyfile=str(key))
    table = {"connection": "tls", "addresses": [f"localhost:{remote.port}"], "topic": ["t/# out 1"],
             "bridge_cafile": str(certs / "ca.pem"), "restart_timeout": [0.2, 1.0], "remote_clientid": "edge-tls"}
    if connects:
        ours = bridged(broker_process, tmp_path, remote.port, name="tls", **{k: v for k, v in table.items()
                                                                            if k not in ("connection", "restart_timeout")})
        cloud = PahoClient(remote.port, ca_certs=str(certs / "ca.pem"))
        cloud.subscribe("t/#", 1)
        PahoClient(ours.port).publish("t/x", b"over TLS", 1)
        assert cloud.message().payload == b"over TLS"
        cloud.close()
        return
    config = write_config(tmp_path / "tls.toml", {}, [table])
    ours = broker_process("--config", str(config))

    def failures() -> list[str]:
        return [event["why"] for event in ours.events() if event.get("log_format") == "bridge {name}: {why}"]
    wait_until(failures, "the bridge's failure to be logged")
    why = failures()
    assert why and all("DNSMismatch" in w for w in why), why  # refused for its name, not for anything else
    assert "New bridge connected" not in remote.log_path.read_text()
    watcher = StateWatcher(ours.port, "edge-tls")
    watcher.wait_for(b"0")
    watcher.close()


def _client_chain(directory: Path) -> tuple[Path, Path, Path]:
    """A root CA, an intermediate it signs and a client certificate the intermediate signs; returns
    the root, the client's chain file (its certificate, then the intermediate's) and its key."""
    import subprocess
    directory.mkdir()
    root, chain, key = directory / "root.pem", directory / "chain.pem", directory / "edge.key"
    ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
    (directory / "intermediate.ext").write_text(ca)
    (directory / "edge.ext").write_text("basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [["openssl", "req", "-x509", *new_key, "-keyout", directory / "root.key", "-subj", "/CN=root CA",
                 "-days", "2", "-out", root, "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"]]
    for name, issuer in (("intermediate", "root"), ("edge", "intermediate")):
        commands += [["openssl", "req", "-new", *new_key, "-keyout", directory / f"{name}.key", "-subj", f"/CN={name}",
                      "-out", directory / f"{name}.csr"],
                     ["openssl", "x509", "-req", "-in", directory / f"{name}.csr", "-CA", directory / f"{issuer}.pem",
                      "-CAkey", directory / f"{issuer}.key", "-CAcreateserial", "-days", "2",
                      "-out", directory / f"{name}.pem", "-extfile", directory / f"{name}.ext"]]
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=30)
    chain.write_bytes((directory / "edge.pem").read_bytes() + (directory / "intermediate.pem").read_bytes())
    return root, chain, key


@pytest.mark.parametrize("insecure", [False, True], ids=["name-checked", "bridge_insecure"])
def test_tls_bridge_sends_the_chain_of_its_certificate_file(broker_process: Any, mosquitto: Any, tmp_path: Path,
                                                             insecure: bool) -> None:
    """bridge_certfile is a chain file, as Mosquitto's is: a remote that trusts only the root
    needs the intermediates that follow the bridge's certificate."""
    from test_tls import make_certs
    certs = tmp_path / "certs"
    make_certs(certs)
    root, chain, key = _client_chain(tmp_path / "clients")
    remote = mosquitto(certfile=str(certs / "server.pem"), keyfile=str(certs / "server.key"), cafile=str(root),
                       require_certificate="true")
    # (bridged waits for the bridge's state topic to say it is connected)
    bridged(broker_process, tmp_path, remote.port, addresses=[f"localhost:{remote.port}"], topic=["t/# out 1"],
            bridge_cafile=str(certs / "ca.pem"), bridge_certfile=str(chain), bridge_keyfile=str(key),
            bridge_insecure=insecure)


def test_remote_credentials(broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    """remote_username/remote_password log in; a refused login is logged with its reason code and
    retried with back-off, and nothing crosses meanwhile."""
    import subprocess
    from cluster_helpers import wait_until
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "edge", "secret"], check=True, timeout=30)
    remote = Mosquitto(tmp_path, allow_anonymous="false", password_file=str(passwords))
    try:
        ours = bridged(broker_process, tmp_path, remote.port, topic=["c/# out 1"], remote_username="edge",
                       remote_password="secret")
        cloud = PahoClient(remote.port, username="edge", password="secret", client_id="cloud")
        cloud.subscribe("c/#", 1)
        PahoClient(ours.port).publish("c/x", b"logged in", 1)
        assert cloud.message().payload == b"logged in"
        config = write_config(tmp_path / "wrong.toml", {}, [{
            "connection": "wrong", "addresses": [f"127.0.0.1:{remote.port}"], "topic": ["c/# out 1"],
            "remote_username": "edge", "remote_password": "nope", "restart_timeout": [0.1, 0.2]}])
        wrong = broker_process("--config", str(config))

        def refusals() -> list[str]:
            return [event["why"] for event in wrong.events()
                    if event.get("log_format") == "bridge {name}: {why}"]
        wait_until(lambda: len(refusals()) >= 2, "two refused attempts")
        assert all(why == "CONNECT refused with reason code 0x05" for why in refusals()), refusals()
        PahoClient(wrong.port).publish("c/y", b"never", 1)
        assert cloud.no_message(0.5)
        cloud.close()
    finally:
        remote.stop()


def test_the_queue_for_the_remote_is_bounded_and_drops_are_counted(broker_process: Any, mosquitto: Any,
                                                                   tmp_path: Path) -> None:
    """Without a store, what waits for the remote is bounded by max_queued_messages like any
    session's queue: beyond it messages are dropped, counted and logged; the rest goes out."""
    import json
    import urllib.request

    from admin_http import KEY
    from cluster_helpers import wait_until
    from conftest import free_port

    from mqtt_broker.admin.keys import hash_key
    remote = Remote("mosquitto", tmp_path, broker_process, mosquitto)
    http = free_port()
    ours = bridged(broker_process, tmp_path, remote.port, topic=["q/# out 1"],
                   settings={"persistence": "memory", "max_queued_messages": 10,
                             "http_endpoints": [f"tcp:{http}:interface=127.0.0.1"],
                             "http_api_keys": ["ci:" + hash_key(KEY)]})
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    cloud.subscribe("q/#", 1)
    cloud.close()
    remote.stop()
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"0")
    local = PahoClient(ours.port)
    for n in range(30):
        local.publish("q/x", f"m {n}".encode(), 1)

    def bridge_now() -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{http}/api/v1/bridges/cloud",
                                         headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)
    # Between its attempts to reach the remote the bridge is "waiting"; each attempt (the first
    # 0.2 s after the link went down, then every 0.2 to 1 s) makes it "connecting" for a while
    # (a refused attempt is noticed some 0.3 s later): this may come in the middle of one.
    bridge: dict[str, Any] = {}

    def between_attempts() -> bool:
        bridge.update(bridge_now())
        return bridge["state"] != "connecting"
    wait_until(between_attempts, "the bridge between two attempts to reach the remote", 10)
    assert bridge["queued"] == 10 and bridge["state"] == "waiting"
    full = [event for event in ours.events()
            if event.get("log_format", "").startswith("queue of {client_id!r} is full")]
    assert [(event["client_id"], event["dropped"]) for event in full] == [("local.edge-cloud", 1)]
    remote.start()
    watcher.wait_for(b"1")
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    got = [cloud.message().payload for _ in range(10)]
    assert got == [f"m {n}".encode() for n in range(10)]  # the first ten, in order
    assert cloud.no_message(0.5)
    for client in (cloud, local, watcher):
        client.close()


@pytest.mark.parametrize("kind", ["mosquitto", "ours"])
def test_remote_stopped_mid_stream(broker_process: Any, mosquitto: Any, tmp_path: Path, kind: str) -> None:
    """The remote stops while messages are on their way through the bridge (some in flight on the
    link) and comes back: every QoS 1/2 message arrives, QoS 2 once.

    The subscriber at the remote is offline across the remote's restart, so what it receives is
    what the bridge delivered. (Mosquitto 2.0.11 resends a QoS 2 PUBLISH, DUP set, after a restart
    to a client connected across it whose PUBREC it had already answered with PUBREL; the client
    then takes that message twice. That is not the bridge's leg.)"""
    remote = Remote(kind, tmp_path, broker_process, mosquitto)
    ours = bridged(broker_process, tmp_path, remote.port, topic=["q/# out 2"])
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    cloud.subscribe("q/#", 2)
    cloud.close()
    probe = PahoClient(remote.port)  # says when the stream is under way
    probe.subscribe("q/#", 0)
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"1")
    local = PahoClient(ours.port)
    total = 400
    infos = [local.client.publish(f"q/{n % 2 + 1}", f"m {n}".encode(), n % 2 + 1) for n in range(total)]
    for _ in range(40):
        probe.message()
    remote.stop()
    probe.close()
    watcher.wait_for(b"0")
    remote.start()
    watcher.wait_for(b"1")
    for info in infos:
        info.wait_for_publish(timeout=10)  # all acknowledged by our broker
    cloud = PahoClient(remote.port, client_id="cloud-sub", clean=False)
    payloads: list[bytes] = []
    while len(set(payloads)) < total:
        payloads.append(cloud.message().payload)
    assert cloud.no_message(0.5)
    assert set(payloads) == {f"m {n}".encode() for n in range(total)}
    qos2 = [p for p in payloads if int(p.split()[1]) % 2]
    twice = sorted({p for p in qos2 if qos2.count(p) > 1})
    assert len(qos2) == len(set(qos2)) == total // 2, (twice, remote.qos2_traffic())
    for client in (cloud, local, watcher):
        client.close()


def test_what_the_remote_cannot_take_does_not_stop_the_bridge(broker_process: Any, tmp_path: Path) -> None:
    """An MQTT 5 remote's CONNACK says what it takes: a packet over its Maximum Packet Size is
    dropped and counted, and retained messages lose the flag when it has none; sent anyway, either
    would make it close the link, and the message come again at each reconnection. (The bridge's
    first CONNECT, whose will is retained, is refused with 0x9A; the next one's is not.)"""
    remote = broker_process("--config", str(write_config(
        tmp_path / "remote.toml", {"max_packet_size": 300, "retain_available": False}, [])))
    ours = bridged(broker_process, tmp_path, remote.port, bridge_protocol_version="mqttv50", topic=["up/# out 1"])
    watcher = StateWatcher(ours.port, "edge-cloud")
    cloud = PahoClient(remote.port, version=mqtt.MQTTv5)
    cloud.subscribe("up/#", 1)
    local = PahoClient(ours.port)
    local.publish("up/big", b"x" * 1000, 1)
    local.publish("up/kept", b"retained", 1, retain=True)
    local.publish("up/small", b"small", 1)
    got = [cloud.message() for _ in range(2)]
    assert [(m.topic, m.payload, m.retain) for m in got] == [("up/kept", b"retained", False), ("up/small", b"small", False)]
    assert cloud.no_message(0.5)
    assert watcher.client.message().payload == b"1" and watcher.client.no_message(0.2)  # the link stayed up
    dropped = [event for event in ours.events() if str(event.get("why", "")).startswith("larger than the remote")]
    assert [event["topic"] for event in dropped] == ["up/big"]
    for client in (cloud, local, watcher):
        client.close()


def test_a_message_lowered_to_qos_0_crosses_without_dup_or_packet_id() -> None:
    """Sent again after a reconnection (DUP set) to a remote whose Maximum QoS is now 0: at QoS 0
    neither DUP nor a packet id may be on the wire [MQTT-3.3.1-2, MQTT-2.2.1-2]."""
    from mqtt_broker.bridge import Bridge
    from mqtt_broker.wire import MQTT_5, Publish, decode_publish, encode

    for qos in (1, 2):
        again = Publish("here/t", b"x", qos, False, True, 7, {})
        crossing = Bridge._crossing(again, "there/t", False, MQTT_5, 0)
        assert (crossing.qos, crossing.dup, crossing.packet_id) == (0, False, 0)
        assert decode_publish(encode(crossing, MQTT_5), MQTT_5).dup is False  # (a DUP at QoS 0 is refused)
        kept = Bridge._crossing(again, "there/t", False, MQTT_5, 1)
        assert (kept.qos, kept.dup, kept.packet_id) == (1, True, 7)


def test_a_topic_alias_from_a_remote_that_was_allowed_none_closes_the_link_with_0x94() -> None:
    """The link's CONNECT announces no Topic Alias Maximum (0): an alias from the remote is a
    protocol error, DISCONNECT 0x94 (3.3.2.3.4). Passed on, its message went on with an empty
    topic, or with the topic the PUBLISH before it set."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mqtt_broker.bridge.link import Link
    from mqtt_broker.wire import MQTT_5, Connack, Connect, Publish, decode, encode

    received: list[Any] = []
    lost: list[str] = []
    link = Link("remote", Connect(protocol_level=MQTT_5, client_id="b", keep_alive=0), Clock(), 1 << 20,
                lambda link, connack: None, lambda link, packet: received.append(packet),
                lambda link, why: lost.append(why))
    transport = StringTransport()
    link.makeConnection(transport)
    link.dataReceived(encode(Connack(), MQTT_5))
    transport.clear()
    link.dataReceived(encode(Publish(topic="r/x", payload=b"1", properties={"topic_alias": 1}), MQTT_5)
                      + encode(Publish(topic="", payload=b"2", properties={"topic_alias": 1}), MQTT_5))
    assert received == [] and link.closed
    assert decode(transport.value(), MQTT_5).reason_code == 0x94  # type: ignore[union-attr]


@pytest.mark.parametrize("data, code", [
    pytest.param(b"\x30\x82\x01" + b"\x00\x01x" + b"\x00" + b"p" * 126, 0x95, id="larger than the link takes"),
    pytest.param(b"\x36\x05\x00\x01x\x00\x00", 0x81, id="malformed"),
    pytest.param(b"\x40\x02\x00\x00", 0x82, id="protocol error"),
])
@pytest.mark.parametrize("version", [4, 5])
def test_a_bad_packet_from_the_remote_closes_an_mqtt5_link_with_disconnect_and_its_reason_code(
        data: bytes, code: int, version: int) -> None:
    """[MQTT-4.13.1], 3.1.2.11.4 (0x95 for a packet over the CONNECT's Maximum Packet Size). An
    MQTT 3 link is closed without one: its DISCONNECT is a normal end, which discards the will."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mqtt_broker.bridge.link import Link
    from mqtt_broker.wire import Connack, Connect, decode, encode

    link = Link("remote", Connect(protocol_level=version, client_id="b", keep_alive=0), Clock(), 128,
                lambda link, connack: None, lambda link, packet: None, lambda link, why: None)
    transport = StringTransport()
    link.makeConnection(transport)
    link.dataReceived(encode(Connack(), version))
    transport.clear()
    link.dataReceived(data)
    assert link.closed and "bad packet" in link.why
    if version == 5:
        assert decode(transport.value(), version).reason_code == code  # type: ignore[union-attr]
        assert transport.disconnecting
    else:
        assert transport.value() == b""


def test_an_mqtt5_link_is_told_a_311_remote_refused_its_protocol_level() -> None:
    """The remote answers 20 02 00 01 (3.1.1's refusal of the level): the link called it a bad
    packet from the server, not a refusal it could say why of."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mqtt_broker.bridge.link import Link
    from mqtt_broker.wire import MQTT_5, Connect, ReasonCode

    link = Link("remote", Connect(protocol_level=MQTT_5, client_id="b"), Clock(), 1 << 20,
                lambda link, connack: None, lambda link, packet: None, lambda link, why: None)
    link.makeConnection(StringTransport())
    link.dataReceived(b"\x20\x02\x00\x01")
    assert link.refused == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION and "bad packet" not in link.why


def test_a_retained_message_of_the_remote_crosses_to_a_broker_without_retain(broker_process: Any, mosquitto: Any,
                                                                           tmp_path: Path) -> None:
    """retain_available = false here: the remote's retained message crosses without the flag, as
    toward a remote without retain. Sent retained, this broker closed the link (0x9A), and the
    remote sent it again at each reconnection: the link never stayed up."""
    remote = mosquitto()
    cloud = PahoClient(remote.port)
    cloud.publish("config/edge1", b"v2", 1, retain=True)
    table = {"connection": "cloud", "addresses": [f"127.0.0.1:{remote.port}"], "restart_timeout": [0.2, 1.0],
             "remote_clientid": "edge-cloud", "topic": ["config/# in 1"]}
    ours = broker_process("--config", str(write_config(tmp_path / "b.toml", {"retain_available": False}, [table])))
    local = PahoClient(ours.port)
    local.subscribe("config/#", 1)
    for n in range(50):  # (the state is not retained here: live messages until the link carries one)
        cloud.publish("config/live", b"live %d" % n, 1)
        if not local.no_message(0.2):
            break
    else:
        raise AssertionError("no live message crossed")
    assert not [e for e in ours.events() if "0x9a" in str(e.get("why", ""))]
    for client in (cloud, local):
        client.close()


def test_a_remote_qos0_message_not_the_utf8_it_says_is_dropped_and_the_link_stays(
        broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    """Mosquitto passes on an MQTT 5 QoS 0 message whose payload format indicator says UTF-8 and
    whose payload is not; this broker closes a connection for one (0x99): both links went down,
    and with them the QoS 0 messages on their way."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    remote = mosquitto()
    ours = bridged(broker_process, tmp_path, remote.port, bridge_protocol_version="mqttv50", topic=["c/# in 1"])
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"1")
    local = PahoClient(ours.port)
    local.subscribe("c/#", 1)
    cloud = PahoClient(remote.port, version=mqtt.MQTTv5)
    utf8 = Properties(PacketTypes.PUBLISH)
    utf8.PayloadFormatIndicator = 1
    cloud.publish("c/bad", b"\xff\xfe", 0, properties=utf8)
    cloud.publish("c/ok", b"ok", 0)
    assert local.message().payload == b"ok"
    assert watcher.client.no_message(1.0)  # (the link stayed up: no state 0)
    for client in (local, cloud, watcher):
        client.close()


def test_an_mqtt3_remote_message_over_max_packet_size_is_dropped_and_the_link_stays(
        broker_process: Any, mosquitto: Any, tmp_path: Path) -> None:
    """An MQTT 3.1.1 remote cannot be told the largest packet the bridge takes (this broker's
    max_packet_size). The link was closed for a larger one, and the remote sent it again at each
    reconnection: nothing crossed either way again. It is acknowledged, dropped and logged, and
    what follows crosses."""
    remote = mosquitto()
    ours = bridged(broker_process, tmp_path, remote.port, topic=["c/# in 1"], settings={"max_packet_size": 300})
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"1")
    local = PahoClient(ours.port)
    local.subscribe("c/#", 1)
    cloud = PahoClient(remote.port)
    cloud.publish("c/big", b"x" * 1000, 1)
    cloud.publish("c/ok", b"ok", 1)
    assert local.message().payload == b"ok"
    assert watcher.client.no_message(1.0)  # (the link stayed up: no state 0)
    dropped = [e for e in ours.events() if str(e.get("why", "")).startswith("larger than max_packet_size")]
    assert [e["topic"] for e in dropped] == ["c/big"]
    for client in (local, cloud, watcher):
        client.close()


@pytest.mark.parametrize("qos", [0, 1])
def test_a_message_at_this_brokers_maximum_packet_size_goes_out(broker_process: Any, mosquitto: Any,
                                                                 tmp_path: Path, qos: int) -> None:
    """max_packet_size = 300 here, and an MQTT 3.1.1 client's PUBLISH of 300 bytes. Sent to the
    bridge's MQTT 5 session, it is a byte longer (the properties' length): the bridge's link to
    this broker failed on it, went down and came up again, and was sent it again (QoS 1) for
    ever; nothing else crossed."""
    remote = mosquitto()
    ours = bridged(broker_process, tmp_path, remote.port, topic=["up/# out 1"], settings={"max_packet_size": 300})
    cloud = PahoClient(remote.port)
    cloud.subscribe("up/#", 1)
    local = PahoClient(ours.port)
    # 1 + 2 (remaining length) + 2 + 4 (topic) + 2 (packet id, QoS 1) + payload = 300
    local.publish("up/x", b"p" * (289 if qos else 291), qos)
    local.publish("up/after", b"small", 1)
    got = [cloud.message().topic for _ in range(2)]
    assert got == ["up/x", "up/after"]
    watcher = StateWatcher(ours.port, "edge-cloud")
    assert watcher.client.message().payload == b"1" and watcher.client.no_message(1.0)  # (the link stayed up)
    for client in (cloud, local, watcher):
        client.close()


def retained_becomes(port: int, topic: str, payload: bytes) -> None:
    """Wait (bounded) until a new subscriber of ``topic`` at ``port`` is sent ``payload`` retained."""
    for _ in range(20):
        client = PahoClient(port)
        try:
            client.subscribe(topic, 1)
            if client.messages.get(timeout=2).payload == payload:
                return
        except queue.Empty:
            pass
        finally:
            client.close()
    raise AssertionError(f"{payload!r} never became the retained message of {topic} at {port}")


@pytest.mark.parametrize("remote_kind, version", [("ours", "mqttv311"), ("mosquitto", "mqttv311"),
                                                  ("mosquitto", "mqttv50")])
def test_a_retained_message_bridged_out_does_not_come_back_stale(
        broker_process: Any, mosquitto: Any, tmp_path: Path, remote_kind: str, version: str) -> None:
    """One bridge, `both`. A retained v1 goes out; the link breaks (the remote stopped); v2 is
    retained here and waits for the remote. As the link came back, the remote sent the bridge its
    retained messages again for its SUBSCRIBE, v1 among them, though it came from the bridge: v1
    replaced v2 here, while the remote had v2. Ours honours No Local; Mosquitto sends a bridge its
    own retained messages for a SUBSCRIBE (with Retain Handling 1, MQTT 5, only for a new
    subscription), and the bridge, whose session it kept (cleansession false), does not
    subscribe there again."""
    remote = broker_process() if remote_kind == "ours" else mosquitto()
    ours = bridged(broker_process, tmp_path, remote.port, topic=["shared/# both 1"], keepalive_interval=1,
                   bridge_protocol_version=version)
    watcher = StateWatcher(ours.port, "edge-cloud")
    watcher.wait_for(b"1")
    local = PahoClient(ours.port)
    local.publish("shared/x", b"v1", 1, retain=True)
    retained_becomes(remote.port, "shared/x", b"v1")
    os.kill(remote.process.pid, signal.SIGSTOP)  # (the link breaks; the remote keeps what it has)
    try:
        watcher.wait_for(b"0")
        local.publish("shared/x", b"v2", 1, retain=True)
    finally:
        os.kill(remote.process.pid, signal.SIGCONT)
    watcher.wait_for(b"1")
    retained_becomes(remote.port, "shared/x", b"v2")
    here = PahoClient(ours.port)
    here.subscribe("shared/x", 1)
    assert here.message().payload == b"v2" and here.no_message(1.0)
    here.close()
    for client in (local, watcher):
        client.close()

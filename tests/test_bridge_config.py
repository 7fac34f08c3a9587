"""Bridge settings ([[bridge]] tables with Mosquitto's names), the bridge bit of CONNECT
(try_private) and how the broker treats a client that sets it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from protocol_helpers import connected, make_broker

from mqtt_broker.bridge.config import BridgeConfig, BridgeTopic
from mqtt_broker.config import BrokerConfig, ConfigError
from mqtt_broker.tap import Options
from mqtt_broker.wire import Connect, Publish, decode, encode
from mqtt_broker.wire.packets import MQTT_3_1, MQTT_3_1_1, MQTT_5


def bridge(**values: object) -> BridgeConfig:
    return BridgeConfig.from_mapping({"connection": "cloud", "addresses": ["h:1883"], "topic": ["#"], **values})


@pytest.mark.parametrize("line, expected", [
    ("sensors/#", BridgeTopic("sensors/#", "out", 0, "", "")),
    ("sensors/# both", BridgeTopic("sensors/#", "both", 0)),
    ("sensors/# in 2", BridgeTopic("sensors/#", "in", 2)),
    ('# out 1 "" edge1/', BridgeTopic("#", "out", 1, "", "edge1/")),
    ('"" out 1 local/state remote/state', BridgeTopic("", "out", 1, "local/state", "remote/state")),
])
def test_topic_lines_as_mosquitto_writes_them(line: str, expected: BridgeTopic) -> None:
    assert BridgeTopic.parse(line) == expected


@pytest.mark.parametrize("line, why", [
    ("a/# sideways", "direction 'sideways'"),
    ("a/# out 3", "QoS 3"),
    ("a/# out x", "QoS 'x'"),
    ("a/# out 1 local/", "is not: pattern"),
    ("a/#/b", "not a valid topic filter"),
    ("a out 0 x/+/ y/", "holds a wildcard"),
    ('"" out 0 "" remote/', "an empty pattern needs both prefixes"),
])
def test_bad_topic_lines_say_why(line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        BridgeTopic.parse(line)


def test_prefixes_map_topics_both_ways() -> None:
    config = bridge(topic=["# out 1 factory/ edge1/", "cmd/# in 2 local/ cloud/edge1/", "both/# both"])
    assert config.to_remote("factory/line/temp") == "edge1/line/temp"
    assert config.to_remote("cmd/x") is None  # an in line sends nothing out
    assert config.to_local("cloud/edge1/cmd/stop") == "local/cmd/stop"
    assert config.to_local("edge1/line/temp") is None
    assert config.to_remote("both/a") == config.to_local("both/a") == "both/a"
    exact = bridge(topic=['"" out 1 local/state remote/state'])
    assert exact.to_remote("local/state") == "remote/state"
    assert exact.to_remote("local/state/x") is None
    # "#" matches its parent level too: the prefixes' own level, when both end one.
    assert config.to_remote("factory") == "edge1"
    assert config.to_local("cloud/edge1/cmd") == "local/cmd" and config.to_local("cloud/edge1") is None
    one_sided = BridgeTopic(pattern="#", direction="both", local_prefix="", remote_prefix="cloud/")
    assert one_sided.to_local("cloud") is None  # it would be the empty topic here
    assert one_sided.to_local("cloud/a") == "a" and one_sided.to_remote("a") == "cloud/a"


def test_defaults_follow_mosquitto() -> None:
    import socket
    config = bridge()
    assert config.remote_client_id == f"{socket.gethostname()}.cloud"
    assert config.local_client_id == f"local.{socket.gethostname()}.cloud"
    assert config.remote_notification_topic == f"$SYS/broker/connection/{socket.gethostname()}.cloud/state"
    assert (config.cleansession, config.try_private, config.notifications, config.bridge_outgoing_retain) == (
        False, True, True, True)
    assert config.version == 4 and config.keepalive_interval == 60
    assert bridge(addresses="a:1 [::1]:2, c").endpoints == [("a", 1), ("::1", 2), ("c", 1883)]
    assert bridge(restart_timeout=10).restart_timeout == (10.0, 10.0)


def test_the_toml_file_takes_bridge_tables(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('max_qos = 1\n\n[[bridge]]\nconnection = "a"\naddresses = ["h:1"]\ntopic = ["x/# out 1"]\n\n'
                    '[[bridge]]\nconnection = "b"\naddresses = ["h:2"]\nbridge_protocol_version = "mqttv50"\n'
                    'topic = [{pattern = "y/#", direction = "in", qos = 2, local_prefix = "l/"}]\n')
    config = BrokerConfig.from_file(path)
    assert [b.connection for b in config.bridge] == ["a", "b"]
    assert config.bridge[1].topic == [BridgeTopic("y/#", "in", 2, "l/", "")]
    assert config.replace(max_qos=2).bridge == config.bridge  # survives a copy


@pytest.mark.parametrize("values, key, why", [
    ({"start_type": "lazy"}, "bridge[1].start_type", "unknown bridge setting"),
    ({"topic": ["a out 5"]}, "bridge[1].topic", "QoS 5"),
    ({"addresses": ["h:99999"]}, "bridge[1].addresses", "not host:port"),
    ({"addresses": []}, "bridge[1].addresses", "at least one"),
    ({"bridge_protocol_version": "mqttv6"}, "bridge[1].bridge_protocol_version", "not one of"),
    ({"cleansession": "yes"}, "bridge[1].cleansession", "expected bool"),
    ({"keepalive_interval": 70000}, "bridge[1].keepalive_interval", "out of range"),
    ({"restart_timeout": [30, 5]}, "bridge[1].restart_timeout", "base <= cap"),
    ({"bridge_certfile": "c.pem"}, "bridge[1].bridge_certfile", "go together"),
    ({"connection": "a/b"}, "bridge[1].connection", "not a name"),
])
def test_bad_bridge_settings_name_their_key(values: dict[str, object], key: str, why: str) -> None:
    table = {"connection": "cloud", "addresses": ["h:1883"], "topic": ["#"], **values}
    with pytest.raises(ConfigError) as caught:
        BrokerConfig(bridge=[table])
    assert caught.value.key == key
    assert why in caught.value.reason


def test_two_bridges_cannot_share_a_name_or_session() -> None:
    table = {"connection": "cloud", "addresses": ["h:1883"], "topic": ["#"]}
    with pytest.raises(ConfigError, match="connection 'cloud'"):
        BrokerConfig(bridge=[table, table])
    with pytest.raises(ConfigError, match="local_client_id 'x'"):
        BrokerConfig(bridge=[{**table, "local_clientid": "x"}, {**table, "connection": "b", "local_clientid": "x"}])


def test_bridges_have_no_command_line_flag() -> None:
    options = Options()
    assert "bridge" not in options and "--bridge" not in str(options)
    with pytest.raises(Exception):
        options.parseOptions(["--bridge", "x"])


# --- the bridge bit ---------------------------------------------------------------------

@pytest.mark.parametrize("level", [MQTT_3_1, MQTT_3_1_1])
def test_the_bridge_bit_round_trips(level: int) -> None:
    packet = Connect(protocol_name="MQIsdp" if level == 3 else "MQTT", protocol_level=level, client_id="b", bridge=True)
    data = encode(packet)
    assert data[2 + 2 + len(packet.protocol_name)] == 0x80 | level
    assert decode(data) == packet


def test_the_bridge_bit_is_not_a_level_of_mqtt_5() -> None:
    from mqtt_broker.wire import UnsupportedProtocolVersion
    data = bytearray(encode(Connect(protocol_level=MQTT_5, client_id="b")))
    data[8] = 0x85
    with pytest.raises(UnsupportedProtocolVersion):
        decode(bytes(data))


def test_a_bridge_is_not_sent_back_what_it_publishes_and_gets_retain_as_published() -> None:
    broker = make_broker()
    bridge_client = connected(broker, "bridge", bridge=True)
    plain = connected(broker, "plain")
    for client in (bridge_client, plain):
        client.subscribe("t/#", qos=1)
    bridge_client.publish("t/from-bridge", b"1", retain=True)
    assert [p.topic for p in plain.received() if isinstance(p, Publish)] == ["t/from-bridge"]
    assert not [p for p in bridge_client.received() if isinstance(p, Publish)]
    echoed = plain.publish("t/from-plain", b"2", retain=True)
    got = [p for p in bridge_client.received() if isinstance(p, Publish)]
    assert [(p.topic, p.retain) for p in got] == [("t/from-plain", True)]  # as published
    got = [p for p in echoed if isinstance(p, Publish)]
    assert [(p.topic, p.retain) for p in got] == [("t/from-plain", False)]  # a plain subscriber's


# --- reconnecting -------------------------------------------------------------------------

def test_back_off_doubles_from_base_to_cap_with_jitter_and_restart_skips_it() -> None:
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    from mqtt_broker import BrokerService
    reactor = MemoryReactorClock()
    broker = BrokerService(endpoints=[], reactor=reactor, sys_interval=0, bridge=[{
        "connection": "b", "addresses": ["127.0.0.1:1"], "topic": ["t/#"], "restart_timeout": [1, 8]}])
    broker.startService()
    bridge = broker.bridges.get("b")
    delays = []
    for _ in range(6):
        attempts = len(reactor.tcpClients)
        reactor.tcpClients[-1][2].clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
        reactor.advance(0.3)  # HostnameEndpoint learns of the failure at its next step
        assert bridge.state == "waiting" and "refused" in bridge.last_error
        delays.append(bridge._retry_call.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
        assert len(reactor.tcpClients) == attempts + 1  # and it tries again, then
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8]):
        assert max(1, ceiling / 2) <= delay <= ceiling
    assert len(set(delays[3:])) == 3  # jitter: clients of one remote do not come back in step
    assert bridge.stats.failures == 6
    reactor.tcpClients[-1][2].clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
    reactor.advance(0.3)
    attempts = len(reactor.tcpClients)
    bridge.restart()
    assert len(reactor.tcpClients) == attempts + 1 and bridge.state == "connecting"
    broker.stopService()
    assert bridge.state == "stopped"


def test_every_bridge_setting_has_a_docstring() -> None:
    """The docs render each [[bridge]] key from the docstring after its field."""
    import ast
    import dataclasses
    import inspect
    import textwrap

    for cls in (BridgeConfig, BridgeTopic):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
        documented = {statement.target.id for statement, following in zip(body, body[1:])
                      if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                      and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                      and isinstance(following.value.value, str) and following.value.value.strip()}
        for f in dataclasses.fields(cls):
            assert f.name in documented, f"{cls.__name__}.{f.name}"


def test_back_off_stays_at_its_cap_however_long_the_remote_is_down() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker import BrokerService
    reactor = MemoryReactorClock()
    broker = BrokerService(endpoints=[], reactor=reactor, sys_interval=0, bridge=[{
        "connection": "b", "addresses": ["127.0.0.1:1"], "topic": ["t/#"], "restart_timeout": [1.5, 8]}])
    bridge = broker.bridges.get("b")
    bridge._attempt = 5000  # days of a remote that refuses, at the cap
    bridge._failed("refused")
    assert 4 <= bridge._retry_call.getTime() - reactor.seconds() <= 8 and bridge._attempt == 5001
    bridge._cancel_retry()


# --- one bridge in-process, to a remote played by the test -------------------------------------

class FakeRemote:
    """A bridge of an in-process broker (a MemoryReactorClock), whose remote the test plays:
    ``up()`` lets the bridge connect and answers its CONNECT and SUBSCRIBE; ``send`` is what the
    remote sends; ``received()`` what the bridge sent it."""

    def __init__(self, version: int = 4, **bridge: Any) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from mqtt_broker import BrokerService
        self.reactor = MemoryReactorClock()
        self.version = version
        self.broker = BrokerService(endpoints=[], reactor=self.reactor, sys_interval=0, **{
            "max_packet_size": bridge.pop("max_packet_size", 65536), "bridge": [{
                "connection": "b", "addresses": ["127.0.0.1:1"], "restart_timeout": [1, 1], **bridge}]})
        self.broker.startService()
        self.bridge = self.broker.bridges.get("b")
        self.protocol: Any = None

    def up(self, session_present: bool = False, granted: tuple[int, ...] = (2,)) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from mqtt_broker.wire import Connack, Suback
        self.reactor.advance(1)  # the back-off
        self.reactor.advance(0.3)  # HostnameEndpoint's steps to its attempt
        self.protocol = self.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.send(Connack(session_present=session_present, reason_code=0), Suback(packet_id=1, reason_codes=granted))
        assert self.bridge.state == "connected"  # type: ignore[union-attr]
        self.transport.clear()

    def send(self, *packets: Any) -> None:
        for packet in packets:
            self.protocol.dataReceived(encode(packet, self.version))
        self.reactor.advance(0)

    def received(self) -> list[Any]:
        from mqtt_broker.wire import FrameReader
        packets = FrameReader(version=self.version).feed(self.transport.value())
        self.transport.clear()
        return packets

    def down(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure
        self.protocol.connectionLost(Failure(ConnectionLost()))
        self.reactor.advance(0)  # the local link closes too
        assert self.bridge.state == "waiting"  # type: ignore[union-attr]


def payloads(client: Any) -> list[bytes]:
    return [p.payload for p in client.received() if isinstance(p, Publish)]


def test_a_remote_that_starts_a_new_session_may_use_its_qos2_ids_again() -> None:
    """The bridge's session here keeps the remote's ids of the QoS 2 messages awaiting PUBREL;
    a remote with a new session (Session Present 0) sends no PUBREL for them and may send a new
    message with the same id, which must not be taken for a resend."""
    from mqtt_broker.wire import Pubrec
    remote = FakeRemote(topic=["in/# in 2"])
    subscriber = connected(remote.broker, "sub")
    subscriber.subscribe("in/#", qos=2)
    for payload in (b"first", b"second"):
        remote.up(session_present=False)
        remote.send(Publish(topic="in/a", payload=payload, qos=2, packet_id=1))
        assert [p for p in remote.received() if isinstance(p, Pubrec)] == [Pubrec(packet_id=1)]
        assert payloads(subscriber) == [payload]
        remote.down()  # before its PUBREL
    remote.up(session_present=True)  # the PUBREL can come: the id stays known
    assert remote.broker.sessions["local.vm.b"].awaiting_pubrel == {1}
    remote.broker.stopService()


def test_an_mqtt_3_1_remote_says_nothing_of_its_session() -> None:
    """MQTT 3.1's CONNACK has no Session Present (the byte is 0): the remote may have kept its
    session and send an unreleased QoS 2 message again, which is then a resend."""
    remote = FakeRemote(version=3, topic=["in/# in 2"], bridge_protocol_version="mqttv31", cleansession=False)
    subscriber = connected(remote.broker, "sub")
    subscriber.subscribe("in/#", qos=2)
    remote.up()
    remote.send(Publish(topic="in/a", payload=b"once", qos=2, packet_id=5))
    remote.down()  # the PUBREC did not reach it
    remote.up()
    remote.send(Publish(topic="in/a", payload=b"once", qos=2, packet_id=5, dup=True))
    assert payloads(subscriber) == [b"once"]
    remote.broker.stopService()


def test_a_message_from_the_remote_too_large_here_is_dropped_and_acknowledged() -> None:
    """Mapped to its local topic and re-encoded as MQTT 5, a message may go over this broker's
    Maximum Packet Size: it is dropped and counted, acknowledged to the remote, and what comes
    after it is delivered."""
    from mqtt_broker.wire import Puback
    remote = FakeRemote(max_packet_size=200, topic=["# in 1 a/much/longer/local/prefix/for/what/comes/in/ r/"])
    subscriber = connected(remote.broker, "sub")
    subscriber.subscribe("#", qos=1)
    remote.up(granted=(1,))
    for n in range(25):  # beyond the Receive Maximum of what waits for the local side
        remote.send(Publish(topic="r/x", payload=b"p" * 150, qos=1, packet_id=n + 1))
    remote.send(Publish(topic="r/x", payload=b"small", qos=1, packet_id=26))
    assert [p.packet_id for p in remote.received() if isinstance(p, Puback)] == list(range(1, 27))
    assert payloads(subscriber) == [b"small"]
    assert remote.bridge.stats.dropped == 25 and not remote.bridge._inbound  # type: ignore[union-attr]
    remote.broker.stopService()


def test_a_message_from_the_remote_on_too_deep_a_topic_is_dropped_and_acknowledged() -> None:
    """This broker would close the local link for it, and the remote would send it again."""
    from mqtt_broker.topics import MAX_TOPIC_LEVELS
    from mqtt_broker.wire import Puback
    remote = FakeRemote(topic=["# in 1"])
    subscriber = connected(remote.broker, "sub")
    subscriber.subscribe("#", qos=1)
    remote.up(granted=(1,))
    remote.send(Publish(topic="/".join(["a"] * (MAX_TOPIC_LEVELS + 1)), payload=b"deep", qos=1, packet_id=1),
                Publish(topic="a/b", payload=b"fine", qos=1, packet_id=2))
    assert [p.packet_id for p in remote.received() if isinstance(p, Puback)] == [1, 2]
    assert payloads(subscriber) == [b"fine"] and remote.bridge.stats.dropped == 1  # type: ignore[union-attr]
    assert remote.bridge.state == "connected"  # type: ignore[union-attr]
    remote.broker.stopService()

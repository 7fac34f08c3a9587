"""Bridge settings ([[bridge]] tables with Mosquitto's names), the bridge bit of CONNECT
(try_private) and how the broker treats a client that sets it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from auth_helpers import LogCapture
from bridge_helpers import Bridged
from protocol_helpers import FakeClient, connected, make_broker

from mqtt_broker.bridge.config import BridgeConfig, BridgeTopic
from mqtt_broker.config import BrokerConfig, ConfigError
from mqtt_broker.tap import Options
from mqtt_broker.wire import (
    Connack, Connect, FrameReader, Pingreq, Pingresp, Puback, Publish, Pubrel, Subscribe, decode, encode,
)
from mqtt_broker.wire.packets import MQTT_3_1, MQTT_3_1_1, MQTT_5


def bridge(**values: object) -> BridgeConfig:
    return BridgeConfig.from_mapping({"connection": "cloud", "addresses": ["h:1883"], "topic": ["#"], **values})


@pytest.mark.parametrize("line, expected", [
    ("sensors/#", BridgeTopic("sensors/#", "out", 0, "", "")),
    ("sensors/# both", BridgeTopic("sensors/#", "both", 0)),
    ("sensors/# in 2", BridgeTopic("sensors/#", "in", 2)),
    ('# out 1 "" edge1/', BridgeTopic("#", "out", 1, "", "edge1/")),
    ('"" out 1 local/state remote/state', BridgeTopic("", "out", 1, "local/state", "remote/state")),
    # Words between spaces, nothing quoted but "": both are in topic names Mosquitto bridges.
    ("it's/# out 1", BridgeTopic("it's/#", "out", 1)),
    ("a\\b/# in 2 \"\" x/", BridgeTopic("a\\b/#", "in", 2, "", "x/")),
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
    ('# in 1 "" $share/g/', "a shared subscription cannot be bridged"),
    ("$share/g/a/# out 1", "a shared subscription cannot be bridged"),
    ("$SYS/remote/# in 1", "no PUBLISH to \\$SYS"),
    ('# both 1 $SYS/r/ r/', "no PUBLISH to \\$SYS"),
    ('# in 1 "" r\x00/', "not a valid topic filter"),
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
    # "#" matches its parent level too, which does not start with the prefix: it is kept.
    assert config.to_remote("factory") == "edge1/factory"
    assert config.to_local("cloud/edge1/cmd") == "local/cmd" and config.to_local("cloud/edge1") is None
    one_sided = BridgeTopic(pattern="#", direction="both", local_prefix="", remote_prefix="cloud/")
    assert one_sided.to_local("cloud") == "cloud"
    assert one_sided.to_local("cloud/a") == "a" and one_sided.to_remote("a") == "cloud/a"


@pytest.mark.parametrize("line, way, topic, mapped", [
    ("# out 1 local/ remote/", "out", "local/a", "remote/a"),
    ("# out 1 local/ remote/", "out", "local", "remote/local"),
    ("# both 1 l/ r/", "out", "l", "r/l"),
    ("# both 1 l/ r/", "in", "r", "l/r"),
    ("# both 1 l/ r/", "in", "r/a", "l/a"),
    ('# out 1 here/ ""', "out", "here", "here"),
    ('# out 1 here/ ""', "out", "here/a", "a"),
    ('# in 1 here/ ""', "in", "a/b", "here/a/b"),
    ('# in 1 here/ ""', "in", "here/c", "here/here/c"),
    ('sensors/# out 1 "" edge1/', "out", "sensors", "edge1/sensors"),
    ('"" both 1 loc/one rem/one', "out", "loc/one", "rem/one"),
    ('"" both 1 loc/one rem/one', "in", "rem/one", "loc/one"),
    ("+/x in 1 l/ r/", "in", "r/a/x", "l/a/x"),
])
def test_a_line_maps_a_topic_as_mosquittos_bridge_does(line: str, way: str, topic: str, mapped: str) -> None:
    """As Mosquitto 2.0.11 maps them (seen): a topic that matches the line's prefix and pattern
    loses the one prefix if it starts with it, as a string, and gets the other in any case. So
    the level a "#" pattern matches above it ("local" for "local/#") keeps its name, under the
    other prefix; it was mapped to that prefix's own level ("remote"), or dropped when the other
    prefix was empty."""
    config = bridge(topic=[line])
    assert (config.to_remote(topic) if way == "out" else config.to_local(topic)) == mapped


def test_the_first_line_with_a_prefix_that_matches_maps_a_topic_and_one_without_lets_it_through() -> None:
    """As Mosquitto's bridge, whatever the order of the lines: a line without prefixes maps
    nothing, but a message it matches that no line with a prefix maps goes as it is."""
    out = bridge(topic=["a/# out 1", '# out 1 "" pre/', '# out 1 "" other/'])
    assert (out.to_remote("a/b"), out.to_remote("c")) == ("pre/a/b", "pre/c")
    into = bridge(topic=["r/# in 1", "# in 1 l/ r/", "x/# in 1"])
    assert (into.to_local("r/a"), into.to_local("r"), into.to_local("x/y")) == ("l/a", "l/r", "x/y")
    assert into.to_local("y") is None  # no line brings it in
    both = bridge(topic=["l/# both 1", "# both 1 l/ r/"])
    assert (both.to_remote("l/a"), both.to_local("r/a"), both.to_local("l/a")) == ("r/a", "l/a", "l/a")
    # A line with prefixes maps only the way it carries messages.
    one_way = bridge(topic=["# out 1 l/ r/", "# both 1"])
    assert (one_way.to_local("r/a"), one_way.to_remote("l/a")) == ("r/a", "r/a")


def test_defaults_follow_mosquitto() -> None:
    import socket
    config = bridge()
    assert config.remote_client_id == f"{socket.gethostname()}.cloud"
    assert config.local_client_id == f"local.{socket.gethostname()}.cloud"
    assert config.state_topic == f"$SYS/broker/connection/{socket.gethostname()}.cloud/state"
    assert (config.cleansession, config.try_private, config.notifications, config.bridge_outgoing_retain) == (
        False, True, True, True)
    assert config.version == 4 and config.keepalive_interval == 60
    assert bridge(addresses="a:1 [::1]:2, c").endpoints == [("a", 1), ("::1", 2), ("c", 1883)]
    assert bridge(addresses=["[::1]", "[fe80::1%eth0]:8883"]).endpoints == [("::1", 1883), ("fe80::1%eth0", 8883)]
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
    ({"addresses": ["::1"]}, "bridge[1].addresses", "an IPv6 address goes in brackets"),
    ({"addresses": ["::1:1883"]}, "bridge[1].addresses", "an IPv6 address goes in brackets"),
    ({"addresses": []}, "bridge[1].addresses", "at least one"),
    ({"bridge_protocol_version": "mqttv6"}, "bridge[1].bridge_protocol_version", "not one of"),
    ({"cleansession": "yes"}, "bridge[1].cleansession", "expected bool"),
    ({"keepalive_interval": 70000}, "bridge[1].keepalive_interval", "out of range"),
    ({"restart_timeout": [30, 5]}, "bridge[1].restart_timeout", "base <= cap"),
    ({"bridge_certfile": "c.pem"}, "bridge[1].bridge_certfile", "go together"),
    ({"connection": "a/b"}, "bridge[1].connection", "not a name"),
    ({"addresses": 5}, "bridge[1].addresses", "expected host:port strings, got 5"),
    ({"addresses": {"h": 1883}}, "bridge[1].addresses", "expected host:port strings"),
    ({"addresses": ["h:\u0661\u0668\u0668\u0663"]}, "bridge[1].addresses", "not host:port"),
    ({"topic": [{"pattern": 5}]}, "bridge[1].topic", "pattern: expected str, got 5"),
    ({"topic": [{"pattern": "a/#", "qos": True}]}, "bridge[1].topic", "qos: expected int, got True"),
    ({"topic": [{"pattern": "a/#", "local_prefix": 1}]}, "bridge[1].topic", "local_prefix: expected str"),
    ({"topic": [{"qos": 1}]}, "bridge[1].topic", "needs a pattern"),
    ({"restart_timeout": [1, float("inf")]}, "bridge[1].restart_timeout", "finite"),
    ({"notification_topic": "state/+"}, "bridge[1].notification_topic", "not a topic name"),
    ({"remote_clientid": "edge#1"}, "bridge[1].remote_clientid", "not a topic name"),
    ({"remote_clientid": "edge\x001", "notifications": False}, "bridge[1].remote_clientid", "U+0000"),
    ({"local_clientid": "l\x00"}, "bridge[1].local_clientid", "U+0000"),
    ({"remote_username": "u\x00"}, "bridge[1].remote_username", "U+0000"),
    ({"bridge_cafile": "/etc/ssl/a\x00b.pem"}, "bridge[1].bridge_cafile", "U+0000"),
    ({"addresses": ["h\x00ost:1883"]}, "bridge[1].addresses", "U+0000"),
    ({"bridge_insecure": True}, "bridge[1].bridge_insecure", "is for a TLS link"),
])
def test_bad_bridge_settings_name_their_key(values: dict[str, object], key: str, why: str) -> None:
    table = {"connection": "cloud", "addresses": ["h:1883"], "topic": ["#"], **values}
    with pytest.raises(ConfigError) as caught:
        BrokerConfig(bridge=[table])
    assert caught.value.key == key
    assert why in caught.value.reason


WRONG_TYPES: list[object] = [5, 1.5, True, "x", None, [1], ["x"], {"a": 1}, [{"pattern": 5}]]


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(BridgeConfig)])
def test_a_wrongly_typed_bridge_value_is_refused_by_its_key(key: str) -> None:
    """Whatever a TOML value is, a [[bridge]] key gets a ConfigError naming it (never a TypeError
    out of the checks, which would stop twistd with a traceback)."""
    for value in WRONG_TYPES:
        table = {"connection": "cloud", "addresses": ["h:1883"], "topic": ["#"], "remote_username": "u",
                 key: value}
        try:
            BrokerConfig(bridge=[table])
        except ConfigError as e:
            # (one that has the type may still be refused, with another key: bridge_keyfile="x")
            assert e.key == f"bridge[1].{key}" or "expected" not in e.reason, (value, e)


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


def test_a_bridge_is_not_sent_back_what_it_publishes_through_a_shared_subscription() -> None:
    """Its plain subscription kept its own messages from it, its $share/g/t did not: the member
    chosen was not checked against the sender (a loop between two brokers). With another member
    in the group, that one has it."""
    broker = make_broker()
    bridge_client = connected(broker, "bridge", bridge=True)
    assert [p.reason_codes for p in bridge_client.subscribe("t", "$share/g/t", qos=1)] == [(1, 1)]  # type: ignore[attr-defined]
    assert [p for p in bridge_client.publish("t", b"mine") if isinstance(p, Publish)] == []
    other = connected(broker, "other")
    other.subscribe("$share/g/t", qos=1)
    for n in range(2):
        bridge_client.publish("t", b"%d" % n)
    assert [p.payload for p in other.received() if isinstance(p, Publish)] == [b"0", b"1"]
    assert [p for p in bridge_client.received() if isinstance(p, Publish)] == []


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

    def __init__(self, version: int = 4, settings: dict[str, Any] | None = None, **bridge: Any) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from mqtt_broker import BrokerService
        self.reactor = MemoryReactorClock()
        self.version = version
        self.broker = BrokerService(endpoints=[], reactor=self.reactor, sys_interval=0, **(settings or {}), **{
            "max_packet_size": bridge.pop("max_packet_size", 65536), "bridge": [{
                "connection": "b", "addresses": ["127.0.0.1:1"], "restart_timeout": [1, 1], **bridge}]})
        self.broker.startService()
        self.bridge = self.broker.bridges.get("b")
        self.protocol: Any = None
        self._early: list[Any] = []

    def up(self, session_present: bool = False, granted: tuple[int, ...] = (2,),
           properties: dict[str, Any] | None = None) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from mqtt_broker.wire import Connack, Suback, Unsuback, Unsubscribe
        self.reactor.advance(1)  # the back-off
        self.reactor.advance(0.3)  # HostnameEndpoint's steps to its attempt
        self.protocol = self.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.send(Connack(session_present=session_present, reason_code=0, properties=properties or {}))
        sent = self.received()
        self.send(*(Suback(packet_id=p.packet_id, reason_codes=granted) if isinstance(p, Subscribe)
                    else Unsuback(packet_id=p.packet_id, reason_codes=(0,) * len(p.topic_filters))
                    for p in sent if isinstance(p, (Subscribe, Unsubscribe))))
        assert self.bridge.state == "connected"  # type: ignore[union-attr]
        self._early = sent + self.received()  # (what the bridge sent as the link came up: received() has it)

    def send(self, *packets: Any) -> None:
        for packet in packets:
            self.protocol.dataReceived(encode(packet, self.version))
        self.reactor.advance(0)

    def received(self) -> list[Any]:
        from mqtt_broker.wire import FrameReader
        packets = self._early + FrameReader(version=self.version).feed(self.transport.value())
        self.transport.clear()
        self._early = []
        return packets

    def down(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure
        self.protocol.connectionLost(Failure(ConnectionLost()))
        self.reactor.advance(0)  # the local link closes too
        assert self.bridge.state == "waiting"  # type: ignore[union-attr]


def payloads(client: Any) -> list[bytes]:
    return [p.payload for p in client.received() if isinstance(p, Publish)]


def linked_before(remote: FakeRemote) -> None:
    """A first link, to a remote without a session (the bridge's session here is new): the next
    links resume the one it starts."""
    remote.up()
    remote.down()


def restarted_while_away(remote: FakeRemote, *lines: BridgeTopic) -> None:
    """The bridge, once connected, started again with these topic lines while the remote is away."""
    remote.up()
    remote.down()
    bridge: Any = remote.bridge
    bridge.stopService()
    bridge.config = dataclasses.replace(bridge.config, topic=list(lines))
    bridge.startService()
    remote.reactor.advance(0)


def queue(remote: FakeRemote, qos: int, *payloads: bytes) -> None:
    """Messages for the remote, published here before the bridge reached it (queued)."""
    from mqtt_broker.wire import Pubrel
    remote.reactor.advance(0)  # the bridge's session is made (primed)
    publisher = connected(remote.broker, "pub")
    for n, payload in enumerate(payloads, 1):
        publisher.publish("out/t", payload, qos=qos, packet_id=n)
        if qos == 2:
            publisher.send(Pubrel(packet_id=n))
    remote.reactor.advance(0)
    assert remote.bridge.queued == len(payloads)  # type: ignore[union-attr]


def test_a_queued_qos2_message_the_remote_takes_at_qos1_is_completed_here() -> None:
    """The session subscribed at the topic line's QoS before the remote's Maximum QoS was known:
    the remote's PUBACK is the session's PUBREC, and the session's PUBREL is answered here (it
    stayed in flight for good, and the remote's window filled with such messages)."""
    from mqtt_broker.wire import Puback, Pubrel
    remote = FakeRemote(version=5, bridge_protocol_version="mqttv50", topic=["out/# out 2"], notifications=False)
    queue(remote, 2, b"early 1", b"early 2")
    remote.up(properties={"maximum_qos": 1, "receive_maximum": 2})
    sent = [p for p in remote.received() if isinstance(p, Publish)]
    assert [(p.payload, p.qos) for p in sent] == [(b"early 1", 1), (b"early 2", 1)]
    remote.send(*(Puback(packet_id=p.packet_id) for p in sent))
    assert remote.bridge.queued == 0  # type: ignore[union-attr]
    assert not [p for p in remote.received() if isinstance(p, Pubrel)]  # (QoS 1 there: nothing to release)
    connected(remote.broker, "pub2").publish("out/t", b"later", qos=1, packet_id=1)
    remote.reactor.advance(0)
    assert payloads(remote) == [b"later"]  # the remote's window of 2 is free
    assert remote.bridge._lowered == {}  # type: ignore[union-attr]
    remote.broker.stopService()


def test_a_queued_qos2_message_the_remote_refuses_at_qos1_is_done_here() -> None:
    from mqtt_broker.wire import Puback
    remote = FakeRemote(version=5, bridge_protocol_version="mqttv50", topic=["out/# out 2"], notifications=False)
    queue(remote, 2, b"refused")
    remote.up(properties={"maximum_qos": 1})
    (sent,) = [p for p in remote.received() if isinstance(p, Publish)]
    remote.send(Puback(packet_id=sent.packet_id, reason_code=0x87))
    assert remote.bridge.queued == 0 and remote.bridge._lowered == {}  # type: ignore[union-attr]
    remote.broker.stopService()


@pytest.mark.parametrize("version", [4, 5])
def test_a_qos2_message_from_the_remote_above_max_qos_1_here_is_taken_at_qos1_and_completed(version: int) -> None:
    """The remote's session subscribed at QoS 2 before max_qos was lowered here, and resends what
    it had in flight: taken at QoS 2, this broker closed the link for it (0x9B), and it came
    again at each reconnection. This broker's PUBACK is the remote's PUBREC; its PUBREL is
    answered here."""
    from mqtt_broker.wire import Pubcomp, Pubrec
    remote = FakeRemote(version=version, bridge_protocol_version="mqttv50" if version == 5 else "mqttv311",
                        settings={"max_qos": 1}, topic=["in/# in 2"], notifications=False)
    subscriber = connected(remote.broker, "sub")
    subscriber.subscribe("in/#", qos=1)
    linked_before(remote)
    remote.up(session_present=True, granted=(1,))
    remote.received()
    remote.send(Publish(topic="in/x", payload=b"queued at 2", qos=2, dup=True, packet_id=7))
    assert [(p.payload, p.qos) for p in subscriber.received() if isinstance(p, Publish)] == [(b"queued at 2", 1)]
    assert remote.received() == [Pubrec(packet_id=7)]
    remote.send(Pubrel(packet_id=7))
    assert remote.received() == [Pubcomp(packet_id=7)]
    assert (remote.bridge.state, remote.bridge._inbound, remote.bridge._lowered_in) == (  # type: ignore[union-attr]
        "connected", set(), set())
    assert not remote.broker.sessions["local.vm.b"].awaiting_pubrel
    remote.broker.stopService()


def test_a_qos2_message_from_the_remote_above_max_qos_dropped_here_is_refused_as_qos2() -> None:
    from mqtt_broker.wire import Pubcomp, Pubrec
    remote = FakeRemote(max_packet_size=200, settings={"max_qos": 1},
                        topic=["# in 2 a/much/longer/local/prefix/for/what/comes/in/ r/"], notifications=False)
    linked_before(remote)
    remote.up(session_present=True, granted=(1,))
    remote.received()
    remote.send(Publish(topic="r/x", payload=b"p" * 150, qos=2, packet_id=7))
    assert remote.received() == [Pubrec(packet_id=7)]
    remote.send(Pubrel(packet_id=7))
    assert remote.received() == [Pubcomp(packet_id=7)]
    assert remote.bridge.stats.dropped == 1 and not remote.bridge._lowered_in  # type: ignore[union-attr]
    remote.broker.stopService()


@pytest.mark.parametrize("qos", [1, 2])
def test_a_message_from_the_remote_above_max_qos_0_here_is_acknowledged_to_it_at_once(qos: int) -> None:
    from mqtt_broker.wire import Pubcomp, Pubrec
    remote = FakeRemote(settings={"max_qos": 0}, topic=["in/# in 2"], notifications=False)
    subscriber = connected(remote.broker, "sub")
    subscriber.subscribe("in/#")
    linked_before(remote)
    remote.up(session_present=True, granted=(0,))
    remote.received()
    remote.send(Publish(topic="in/x", payload=b"queued", qos=qos, packet_id=7))
    assert payloads(subscriber) == [b"queued"]
    assert remote.received() == [Puback(packet_id=7) if qos == 1 else Pubrec(packet_id=7)]
    if qos == 2:
        remote.send(Pubrel(packet_id=7))
        assert remote.received() == [Pubcomp(packet_id=7)]
    assert remote.bridge.state == "connected" and not remote.bridge._lowered_in  # type: ignore[union-attr]
    remote.broker.stopService()


@pytest.mark.parametrize("qos", [1, 2])
def test_queued_messages_the_remote_takes_at_qos0_are_acknowledged_here_and_sent_once(qos: int) -> None:
    remote = FakeRemote(version=5, bridge_protocol_version="mqttv50", topic=[f"out/# out {qos}"],
                        notifications=False)
    queue(remote, qos, b"once")
    remote.up(properties={"maximum_qos": 0})
    sent = [p for p in remote.received() if isinstance(p, Publish)]
    assert [(p.payload, p.qos, p.dup) for p in sent] == [(b"once", 0, False)]
    assert remote.bridge.queued == 0  # type: ignore[union-attr]
    remote.down()
    remote.up(session_present=True, properties={"maximum_qos": 0})
    assert payloads(remote) == []  # it was, with DUP set at QoS 0 (a malformed PUBLISH), each time
    remote.broker.stopService()


def test_a_topic_lines_new_qos_is_the_sessions_from_the_start() -> None:
    """Started again with the line's QoS raised while the remote is away: the session subscribes
    at it at once, so what is published meanwhile at QoS 1 queues (an offline session does not
    queue QoS 0: it was lost)."""
    remote = FakeRemote(topic=["q/# out 0"], notifications=False)
    restarted_while_away(remote, BridgeTopic("q/#", "out", 1))
    assert [(s.topic_filter, s.qos) for s in remote.broker.subscriptions_of("local.vm.b")] == [("q/#", 1)]
    connected(remote.broker, "pub").publish("q/t", b"during the outage", qos=1, packet_id=1)
    remote.up()
    assert [(p.payload, p.qos) for p in remote.received() if isinstance(p, Publish)] == [(b"during the outage", 1)]
    remote.broker.stopService()


def test_a_remote_that_refuses_a_qos1_will_gets_one_at_qos0() -> None:
    """A remote of Maximum QoS 0 refuses a CONNECT whose will is QoS 1 (0x9B, Mosquitto and this
    broker alike): the bridge's next CONNECT has its will at QoS 0, as it drops retain on 0x9A
    (Mosquitto's own bridge tries again with the same will for ever)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from mqtt_broker.wire import Connack, Connect
    remote = FakeRemote(version=5, bridge_protocol_version="mqttv50", topic=["out/# out 1"])
    remote.reactor.advance(1)
    remote.reactor.advance(0.3)
    protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    (first,) = FrameReader(version=5).feed(transport.value())
    assert isinstance(first, Connect) and first.will is not None and first.will.qos == 1
    protocol.dataReceived(encode(Connack(reason_code=0x9B), 5))
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    remote.reactor.advance(0)
    assert remote.bridge.state == "waiting"  # type: ignore[union-attr]
    remote.up(properties={"maximum_qos": 0})
    (connect,) = [p for p in remote.received() if isinstance(p, Connect)]
    assert connect.will is not None and (connect.will.qos, connect.will.payload) == (0, b"0")
    remote.broker.stopService()


@pytest.mark.parametrize("how", ["stopService", "restart"])
def test_a_stopped_bridge_tells_the_remote_it_is_disconnected(how: str) -> None:
    """Its own DISCONNECT discards the will that says so when the link fails: the state goes
    first (as Mosquitto's stop leaves "0" there)."""
    from mqtt_broker.wire import Disconnect
    remote = FakeRemote(topic=["q/# out 0"], remote_clientid="edge")
    remote.up()
    remote.received()
    getattr(remote.bridge, how)()
    remote.reactor.advance(0)
    sent = remote.received()
    assert [type(p) for p in sent] == [Publish, Disconnect]
    assert (sent[0].topic, sent[0].payload, sent[0].retain) == ("$SYS/broker/connection/edge/state", b"0", True)
    remote.broker.stopService()


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


def test_a_bridge_whose_session_here_is_new_starts_a_new_session_at_the_remote() -> None:
    """Its session here new (persistence "memory", a new data_dir, another local_clientid), the
    bridge numbers its messages from 1 again: a session resumed at the remote held the ids of the
    last run's QoS 2 messages it had PUBREC'd, awaiting their PUBREL, and took the new ones for
    resends, dropped [MQTT-4.3.3-9]. That session is ended, and the one the bridge starts there
    outlasts the link: what comes for it meanwhile comes in at the next."""
    from mqtt_broker.wire import Pubrec
    bridged = Bridged({**_BRIDGE, "topic": ["q/# out 2", "r/# in 1"]}, persistence="memory")
    last_run = connected(bridged.remote, "edge", clean=False)
    for n in (1, 2, 3):
        assert last_run.publish("q/old", b"last run", qos=2, packet_id=n) == [Pubrec(packet_id=n)]
    last_run.lose()
    there = connected(bridged.remote, "there")
    there.subscribe("q/#", qos=2)
    there.received()
    for _ in range(3):  # (each at once after the last)
        bridged.accept()
        bridged.reactor.advance(0)
    # Asked to resume, with no session here: a Session Present 1 closes the link; a clean start
    # ends that session there, and lasts as long as its connection, which the bridge ends.
    assert [pump.client._wrappedProtocol.connect.clean_start for pump in bridged.pumps] == [False, True, False]
    assert bridged.bridge.state == "connected"
    here = connected(bridged.broker, "here", clean=False)
    here.subscribe("r/#", qos=1)
    publisher = connected(bridged.broker, "pub")
    for n in (1, 2, 3):
        publisher.publish("q/new", f"new {n}".encode(), qos=2, packet_id=n)
        publisher.send(Pubrel(packet_id=n))
    bridged.settle()
    assert [p.payload for p in there.received() if isinstance(p, Publish)] == [b"new 1", b"new 2", b"new 3"]
    bridged.drop()
    connected(bridged.remote, "cloud").publish("r/x", b"while away", qos=1)
    bridged.reconnect()
    assert not bridged.bridge.remote.connect.clean_start
    assert [p.payload for p in here.received() if isinstance(p, Publish)] == [b"while away"]


def answered(remote: FakeRemote, connack: Connack) -> list[Any]:
    """What the bridge sends at its next attempt, answered with ``connack``, on which it closes
    the link and connects again."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    remote.reactor.advance(1.3)
    protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode(connack, remote.version))
    assert transport.disconnecting
    protocol.connectionLost(None)
    remote.reactor.advance(0)
    return FrameReader(version=remote.version).feed(transport.value())


@pytest.mark.parametrize("version", [3, 5])
def test_a_new_session_here_starts_the_remotes_anew_at_the_first_connect(version: int) -> None:
    """An MQTT 3.1 CONNACK does not say whether a session was resumed: as with MQTT 5, the first
    CONNECT asks for a clean start. An MQTT 3 session so started lasts as long as its connection
    [MQTT-3.1.2-6]: the bridge ends it at once (with a DISCONNECT) and connects again for one
    that outlasts the link."""
    from mqtt_broker.wire import Disconnect
    protocol = "mqttv31" if version == 3 else "mqttv50"
    remote = FakeRemote(version=version, bridge_protocol_version=protocol, topic=["q/# out 2"])
    connects = []
    if version == 3:
        sent = answered(remote, Connack())
        assert [type(p) for p in sent] == [Connect, Disconnect]
        connects.append(sent[0])
    for _ in range(2):
        remote.up()
        connects += [p for p in remote.received() if isinstance(p, Connect)]
        remote.down()
    assert [c.clean_start for c in connects] == ([True, False, False] if version == 3 else [True, False])
    remote.broker.stopService()


def test_an_mqtt_311_remote_with_a_session_a_new_one_here_does_not_go_with_is_started_anew() -> None:
    """Asked to resume a session (a remote without one is connected to once), it answers Session
    Present 1: the link is closed before anything crosses (3.1.1's 3.2.2.2), a clean start ends
    that session, and the next link starts one that lasts."""
    from mqtt_broker.wire import Disconnect
    remote = FakeRemote(topic=["out/# out 2"], notifications=False)
    queue(remote, 2, b"numbered from 1 again")
    sent = answered(remote, Connack(session_present=True))
    assert [type(p) for p in sent] == [Connect, Disconnect] and not sent[0].clean_start  # type: ignore[union-attr]
    sent = answered(remote, Connack())
    assert [type(p) for p in sent] == [Connect, Disconnect] and sent[0].clean_start  # type: ignore[union-attr]
    remote.up()
    got = remote.received()
    assert [p.clean_start for p in got if isinstance(p, Connect)] == [False]
    assert [p.payload for p in got if isinstance(p, Publish)] == [b"numbered from 1 again"]
    remote.broker.stopService()


def test_a_bridge_whose_session_here_was_kept_resumes_the_remotes() -> None:
    """Kept from the bridge's last run (or restored from the store), the session here holds what
    the remote's does of their exchanges: the first link of the new run resumes it."""
    bridged = Bridged({**_BRIDGE, "topic": ["q/# out 2"]})
    bridged.accept()
    bridged.bridge.stopService()
    bridged.settle()
    bridged.bridge.startService()
    bridged.accept()
    assert bridged.bridge.state == "connected" and not bridged.bridge.remote.connect.clean_start


def test_a_remote_that_kept_the_subscriptions_the_bridge_made_there_is_not_sent_them_again() -> None:
    """A SUBSCRIBE brings the remote's retained messages again, and Mosquitto sends a bridge
    back those it sent (older, maybe, than one retained here since): a `both` line's came back
    stale after each outage. Once the remote granted them all at this address, its Session
    Present 1 is trusted with them; a new session, changed lines or a refusal subscribe again."""
    remote = FakeRemote(topic=["in/# in 1"], notifications=False)
    bridge: Any = remote.bridge

    def subscribed(session_present: bool, granted: tuple[int, ...] = (1,)) -> list[str]:
        remote.up(session_present=session_present, granted=granted)
        filters = [r.topic_filter for p in remote.received() if isinstance(p, Subscribe) for r in p.subscriptions]
        remote.down()
        return filters

    assert subscribed(False) == ["in/#"]
    assert subscribed(True) == []
    assert subscribed(False) == ["in/#"]
    assert subscribed(False, granted=(0x80,)) == ["in/#"]
    assert subscribed(True) == ["in/#"]
    bridge.config = dataclasses.replace(bridge.config, topic=[*bridge.config.topic, BridgeTopic("more/#", "in", 1)])
    assert subscribed(True) == ["in/#", "more/#"]
    assert subscribed(True) == []
    remote.broker.stopService()


def test_an_mqtt_3_1_remote_is_subscribed_at_each_connection() -> None:
    """Its CONNACK has no Session Present: whether it kept the subscriptions is not known."""
    remote = FakeRemote(version=3, topic=["in/# in 1"], bridge_protocol_version="mqttv31", notifications=False)
    answered(remote, Connack())  # (the clean start of a new session here)
    for _ in range(2):
        remote.up()
        assert [p for p in remote.received() if isinstance(p, Subscribe)]
        remote.down()
    remote.broker.stopService()


@pytest.mark.parametrize("attempt", [True, False])
def test_the_out_topics_are_unsubscribed_at_a_remote_that_kept_the_session_as_mosquitto_does(attempt: bool) -> None:
    """A topic changed from in or both to out: the remote's session kept its subscription, and it
    went on sending (and queuing while the bridge was away) what the bridge only dropped. Not
    the filter of an in line too; not when the remote starts a new session, which holds none."""
    from mqtt_broker.wire import Unsubscribe
    lines = ["t/# out 1", 'x/# out 1 "" r/', "s/# out 1", "s/# in 1", "c/# in 1"]
    remote = FakeRemote(topic=["t/# both 1", 'x/# both 1 "" r/', "s/# in 1", "c/# in 1"], notifications=False,
                        bridge_attempt_unsubscribe=attempt)
    restarted_while_away(remote, *(BridgeTopic.parse(line) for line in lines))
    for session_present in (True, False):
        remote.up(session_present=session_present, granted=(1,))
        unsubscribed = [f for p in remote.received() if isinstance(p, Unsubscribe) for f in p.topic_filters]
        assert unsubscribed == (["t/#", "r/x/#"] if attempt and session_present else [])
        remote.down()
    remote.broker.stopService()


@pytest.mark.parametrize("version", [4, 5])
def test_a_remote_that_answers_a_clean_start_with_a_session_present_is_left_and_tried_again(version: int) -> None:
    """[MQTT-3.2.2-4], 3.1.1's 3.2.2.2: a client with no session state MUST close the network
    connection on Session Present 1."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from mqtt_broker.wire import Connack
    remote = FakeRemote(version=version, bridge_protocol_version="mqttv50" if version == 5 else "mqttv311",
                        topic=["t/# out 1"], notifications=False, cleansession=True)
    remote.reactor.advance(1.3)
    protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(encode(Connack(session_present=True), version))
    assert transport.disconnecting
    protocol.connectionLost(None)
    remote.reactor.advance(0)
    bridge: Any = remote.bridge
    assert (bridge.state, bridge.local, bridge.last_error) == (
        "waiting", None, "Session Present 1 from the server, which was asked for a clean start")
    remote.up()  # (a new session: Session Present 0)
    remote.broker.stopService()


def test_an_mqtt_3_1_remote_says_nothing_of_its_session() -> None:
    """MQTT 3.1's CONNACK has no Session Present (the byte is 0): the remote may have kept its
    session and send an unreleased QoS 2 message again, which is then a resend."""
    remote = FakeRemote(version=3, topic=["in/# in 2"], bridge_protocol_version="mqttv31", cleansession=False)
    subscriber = connected(remote.broker, "sub")
    subscriber.subscribe("in/#", qos=2)
    answered(remote, Connack())  # (the clean start of a new session here)
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


def test_the_bridges_out_topics_may_be_sys_topics_and_its_in_topics_come_under_a_prefix() -> None:
    BridgeTopic.parse("$SYS/broker/# out 0")
    BridgeTopic.parse("$SYS/# in 0 remote/ \"\"")


@pytest.mark.parametrize("line, topic, side", [
    ('# in 1 "" r/', "r/", "remote"),  # empty here
    ('# in 1 local/ ""', "a" * 65530, "remote"),  # too long here
    ('# out 1 l/ ""', "l/", "local"),  # empty there
    ('# out 1 "" p/q/', "/".join(["l"] * 127), "local"),  # too deep there
    ('# out 1 "" remote/', "a" * 65530, "local"),  # too long there
])
def test_a_message_whose_topic_is_no_topic_once_mapped_is_dropped_and_acknowledged(
        line: str, topic: str, side: str) -> None:
    """The other broker would close the link for it (an empty topic [MQTT-4.7.3-1], too deep),
    or it could not be encoded (longer than an MQTT string): sent again at each reconnection,
    it kept the bridge from staying up."""
    bridged = Bridged({"connection": "up", "addresses": ["127.0.0.1:1"], "topic": [line], "restart_timeout": 60})
    bridged.accept()
    assert bridged.bridge.state == "connected"
    publisher = connected(bridged.remote if side == "remote" else bridged.broker, "pub", version=5)
    assert publisher.publish(topic, b"x", qos=1)[0].reason_code == 0  # type: ignore[union-attr]
    bridged.settle()
    bridged.reactor.advance(0)
    bridged.settle()
    assert bridged.bridge.state == "connected", bridged.bridge.last_error
    assert bridged.bridge.stats.dropped == 1 and bridged.bridge.queued == 0


def test_a_bridge_stopped_and_started_again_at_once_makes_one_link() -> None:
    """The old links' ends, told after the new start, were taken for a failure of it: a second
    attempt, and another link once the first was up."""
    bridged = Bridged({"connection": "up", "addresses": ["127.0.0.1:1"], "topic": ["t/# out 1"],
                       "restart_timeout": 60})
    bridged.accept()
    bridged.bridge.stopService()
    bridged.bridge.startService()
    bridged.settle()
    bridged.accept()
    assert bridged.bridge.state == "connected"
    bridged.reactor.advance(60)  # restart_timeout
    bridged.settle()
    assert (bridged.bridge.state, bridged.attempts, bridged.bridge.stats.failures) == ("connected", 2, 0)


def test_a_bridge_stopped_during_a_restart_counts_its_next_broken_link_as_a_failure() -> None:
    bridged = Bridged({"connection": "up", "addresses": ["127.0.0.1:1"], "topic": ["t/# out 1"],
                       "restart_timeout": 60})
    bridged.accept()
    bridge = bridged.bridge
    bridge.restart()
    bridge.stopService()
    bridged.settle()
    assert bridge.state == "stopped"
    bridge.startService()
    bridged.accept()
    assert bridge.state == "connected" and bridge.stats.failures == 0
    bridge.remote.transport.loseConnection()  # the link breaks
    bridged.settle()
    assert (bridge.state, bridge.stats.failures) == ("waiting", 1) and bridge.last_error


def test_a_refused_attempt_and_a_broken_link_are_each_logged_once() -> None:
    """Each was logged as its link closed and again as the bridge failed, with the same reason
    (a broken link a third time, as the local link closed after it); the one line says which
    link broke."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    remote = FakeRemote(topic=["t/# out 1"])
    with LogCapture() as logged:
        for _ in range(2):
            remote.reactor.advance(1.3)  # the back-off, and HostnameEndpoint's steps to its attempt
            protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(encode(Connack(reason_code=5), 4))
            protocol.connectionLost(Failure(ConnectionDone()))
            remote.reactor.advance(0)
        remote.up()
        remote.down()
        remote.reactor.advance(0)
    bridge_lines = [line for line in logged.lines if line.startswith("bridge b: ")]
    assert [line for line in bridge_lines if "0x05" in line] == [
        "bridge b: CONNECT refused with reason code 0x05"] * 2
    assert [line for line in bridge_lines if "connection lost" in line] == [
        "bridge b: remote link closed: connection lost: Connection to the other side was lost in a non-clean "
        "fashion."]
    assert remote.bridge.last_error == "remote link closed: connection lost: Connection to the other side was " \
        "lost in a non-clean fashion."  # type: ignore[union-attr]
    remote.broker.stopService()


def test_messages_that_cannot_cross_are_logged_once_per_thousand_with_their_topic_cut_and_escaped() -> None:
    """A client here or the remote may send them by the thousand a second (larger than the other
    side takes, say): one line each, with the topic whole (up to 64 KiB), was megabytes of log."""
    remote = FakeRemote(topic=["a/# in 0"])
    remote.up()
    topic = "b/\x1b[31m\n2026-12-07T00:00:00 forged " + "x" * 1000
    with LogCapture() as logged:
        for _ in range(2500):
            remote.send(Publish(topic=topic, payload=b"", qos=0))
    lines = [line for line in logged.lines if line.startswith("bridge b: ")]
    assert len(lines) == 3 and remote.bridge.stats.dropped == 2500  # type: ignore[union-attr]
    assert lines[0].startswith("bridge b: 'b/\\x1b[31m\\n2026-12-07T00:00:00 forged xxx")
    assert lines[0].endswith("... (1035 characters)' dropped: no topic line sends it on (1 that could not cross; "
                             "logged once per thousand)")
    assert lines[2].endswith("(2001 that could not cross; logged once per thousand)")
    assert all(len(line) < 400 and line.isprintable() for line in lines), lines
    remote.broker.stopService()


def test_the_reason_string_of_a_remotes_disconnect_is_logged_quoted_cut_and_escaped() -> None:
    """The remote chooses it: written as it came, its newlines and escape sequences made lines
    and colours of the remote's own in the log."""
    from mqtt_broker.wire import Disconnect
    remote = FakeRemote(version=5, bridge_protocol_version="mqttv50", topic=["t/# out 1"])
    remote.up()
    reason = "bye\n2026-12-07T00:00:00 [-] forged \x1b[2J" + "r" * 1000
    with LogCapture() as logged:
        remote.send(Disconnect(reason_code=0x8B, properties={"reason_string": reason}))
        remote.down()  # (the remote closes the socket after it)
    [line] = [line for line in logged.lines if line.startswith("bridge b: ")]
    assert line.startswith("bridge b: remote link closed: DISCONNECT 0x8b from the server ('bye\\n2026-12-07T00:00:00 "
                           "[-] forged \\x1b[2Jrrr")
    assert line.endswith("... (1039 characters)')") and line.isprintable() and len(line) < 400
    remote.broker.stopService()


def test_a_bad_packet_from_the_remote_is_logged_cut() -> None:
    """What is wrong with a remote's packet may quote the remote's text (a Response Topic that is
    no topic name, of 20,000 characters): the line and last_error held it whole."""
    remote = FakeRemote(version=5, bridge_protocol_version="mqttv50", topic=["t/# in 1"])
    remote.up()
    bad = Publish(topic="t/a", payload=b"", properties={"response_topic": "t/+/" + "x" * 20000})
    with LogCapture() as logged:
        remote.protocol.dataReceived(encode(bad, 5))
        remote.down()  # (the socket closes after it)
    [line] = [line for line in logged.lines if line.startswith("bridge b: ")]
    assert "bad packet from the server: response topic 't/+/xxx" in line and len(line) < 500, line[:300]
    assert len(remote.bridge.last_error) < 500  # type: ignore[union-attr]
    remote.broker.stopService()


def test_a_remote_that_refuses_the_bridge_bit_is_tried_again_without_it() -> None:
    """A remote that does not know try_private's bit answers CONNACK 0x01 (unacceptable protocol
    version): the next attempts go without it, as Mosquitto's."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionRefusedError
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from mqtt_broker.wire import Connack
    remote = FakeRemote(topic=["t/# out 1"])
    levels = []
    for _ in range(3):
        remote.reactor.advance(1.3)  # the back-off, and HostnameEndpoint's steps to its attempt
        protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        (connect,) = FrameReader(version=4).feed(transport.value())
        levels.append((connect.protocol_level, connect.bridge))
        protocol.dataReceived(encode(Connack(reason_code=1), 4))
        protocol.connectionLost(Failure(ConnectionRefusedError()))
    assert levels == [(4, True), (4, False), (4, False)]
    remote.broker.stopService()


def test_an_mqtt5_bridge_whose_remote_speaks_3_1_1_connects_again_at_once_with_3_1_1() -> None:
    """A remote of 3.1.1 refuses an MQTT 5 CONNECT in its own form (CONNACK 0x01 [MQTT-3.1.2-2]):
    the bridge connects again at once with 3.1.1, and keeps to it, as Mosquitto's does."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from mqtt_broker.wire import Connack, Suback
    remote = FakeRemote(version=4, bridge_protocol_version="mqttv50", topic=["t/# both 1"], notifications=False)
    remote.reactor.advance(1.3)  # the first attempt's back-off, and HostnameEndpoint's steps
    levels = []
    for answer in (b"\x20\x02\x00\x01", encode(Connack(reason_code=0), 4) +
                   encode(Suback(packet_id=1, reason_codes=(1,)), 4)):
        assert len(remote.reactor.tcpClients) == len(levels) + 1
        protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        levels.append(transport.value()[8])  # the CONNECT's protocol level
        protocol.dataReceived(answer)
        if transport.disconnecting:
            protocol.connectionLost(Failure(ConnectionDone()))
        remote.reactor.advance(0.3)  # no back-off: HostnameEndpoint's steps alone
    bridge = remote.bridge
    assert bridge is not None and levels == [5, 0x84]  # (3.1.1 with try_private's bit)
    assert (bridge.state, bridge.remote.version, bridge.stats.failures) == ("connected", 4, 0)  # type: ignore[union-attr]
    bridge.restart()  # (the admin API's): MQTT 5 is tried again
    protocol.connectionLost(Failure(ConnectionDone()))
    remote.reactor.advance(0.3)
    protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert (len(remote.reactor.tcpClients), transport.value()[8]) == (3, 5)
    remote.broker.stopService()


# --- before the remote is first reached ------------------------------------------------------------

def sent_out(remote: FakeRemote) -> list[tuple[str, bytes, int]]:
    return [(p.topic, p.payload, p.qos) for p in remote.received() if isinstance(p, Publish)]


def test_what_is_published_before_the_remote_is_first_reached_goes_out_once_it_is() -> None:
    """The bridge's session here, subscribed to the out topics, is made as the bridge starts:
    what is published while the remote has never been reachable queues in it, as in a later
    outage (Mosquitto subscribes its bridges at start-up too)."""
    remote = FakeRemote(topic=["out/# out 1"], notifications=False)
    remote.reactor.advance(0)  # the session is made on the in-memory link, within a turn
    assert [s.topic_filter for s in remote.broker.subscriptions_of("local.vm.b")] == ["out/#"]
    assert remote.broker.sessions["local.vm.b"].connection is None  # and left, as in an outage
    publisher = connected(remote.broker, "pub")
    for n in range(3):
        publisher.publish("out/t", f"early {n}".encode(), qos=1, packet_id=n + 1)
    publisher.publish("elsewhere", b"not bridged", qos=1, packet_id=4)
    assert remote.bridge.queued == 3  # type: ignore[union-attr]
    remote.up()
    assert sent_out(remote) == [("out/t", f"early {n}".encode(), 1) for n in range(3)]
    remote.broker.stopService()


def test_an_out_topic_added_while_the_remote_is_away_queues_from_the_start() -> None:
    """Started again with other topic lines (a restart with a new configuration) and the remote
    away: the session follows the new lines at once, so what is published on a new out topic
    waits for the remote, and what is published on a removed one is not kept for it."""
    remote = FakeRemote(topic=["old/# out 1"], notifications=False)
    restarted_while_away(remote, BridgeTopic("new/#", "out", 1))
    assert [s.topic_filter for s in remote.broker.subscriptions_of("local.vm.b")] == ["new/#"]
    publisher = connected(remote.broker, "pub")
    publisher.publish("old/t", b"no longer bridged", qos=1, packet_id=1)
    publisher.publish("new/t", b"bridged now", qos=1, packet_id=2)
    remote.up()
    assert sent_out(remote) == [("new/t", b"bridged now", 1)]
    assert remote.bridge.stats.dropped == 0  # type: ignore[union-attr]
    remote.broker.stopService()


def test_retained_messages_go_out_once_when_the_remote_is_first_reached() -> None:
    """The session made at start does not take the retained messages (Retain Handling 2): the
    link's subscriptions send them once it is up, once each."""
    remote = FakeRemote(topic=["out/# out 1"], notifications=False)
    connected(remote.broker, "pub").publish("out/kept", b"retained", qos=1, retain=True)
    remote.reactor.advance(0)
    remote.up()
    assert sent_out(remote) == [("out/kept", b"retained", 1)]
    remote.broker.stopService()


# --- the state topic ----------------------------------------------------------------------------------

@pytest.mark.parametrize("notification_topic, local_only", [
    ("", False), ("bridges/edge1/status", False), ("bridges/edge1/status", True)])
def test_the_state_is_published_where_mosquitto_publishes_it(notification_topic: str, local_only: bool) -> None:
    """Here and on the remote, on notification_topic, by default
    $SYS/broker/connection/<remote_clientid>/state (not the connection's name); on the remote
    unless notifications_local_only, by the link's first PUBLISH and its will."""
    from mqtt_broker.wire import Connect
    remote = FakeRemote(topic=["out/# out 1"], remote_clientid="edge1", notification_topic=notification_topic,
                        notifications_local_only=local_only)
    topic = notification_topic or "$SYS/broker/connection/edge1/state"

    def here() -> dict[str, bytes]:
        return {m.topic: m.payload for m in remote.broker.retained.match("#")
                if m.topic.startswith("bridges/")} | {
            m.topic: m.payload for m in remote.broker.retained.match("$SYS/broker/connection/#")}
    assert here() == {topic: b"0"}
    remote.up()
    assert here() == {topic: b"1"}
    sent = remote.received()
    connect = next(p for p in sent if isinstance(p, Connect))
    published = [(p.topic, p.payload, p.retain) for p in sent if isinstance(p, Publish)]
    if local_only:
        assert connect.will is None and published == []
    else:
        assert (connect.will.topic, connect.will.payload, connect.will.retain) == (topic, b"0", True)
        assert published == [(topic, b"1", True)]
    remote.down()
    assert here() == {topic: b"0"}
    remote.broker.stopService()


def test_the_state_at_start_reaches_a_qos1_subscriber_that_is_away() -> None:
    """docs/bridges.md: the state topic is at QoS 1, "so that a session subscribed at QoS 1 keeps
    the changes while away". The "0" of the start (after kill -9, the remote unreachable: the
    only one) went at QoS 0, which an offline session does not keep."""
    from durability_helpers import Restarts
    from protocol_helpers import FakeClient

    from mqtt_broker.store.memory import MemoryStore
    table = {"connection": "up", "addresses": ["127.0.0.1:1"], "remote_clientid": "edge-1", "topic": ["a/# out 1"]}
    restarts = Restarts(MemoryStore(), bridge=[table], sys_interval=0)
    broker = restarts.start()
    watcher = connected(broker, "watcher", clean=False)
    retained = [p for p in watcher.subscribe("$SYS/broker/connection/edge-1/state", qos=1) if isinstance(p, Publish)]
    watcher.send(*(Puback(packet_id=p.packet_id) for p in retained if p.qos))
    watcher.lose()
    restarts.restart()
    assert restarts.broker is not None
    again = FakeClient(restarts.broker)
    assert again.connect("watcher", clean=False).session_present  # type: ignore[union-attr]
    states = [p for p in again.received() if isinstance(p, Publish)]
    assert [(p.payload, p.qos) for p in states] == [(b"0", 1)]


def test_the_state_here_is_published_at_qos_1_as_mosquitto_publishes_it() -> None:
    """It was QoS 0: a session subscribed at QoS 1 missed the changes made while it was away."""
    remote = FakeRemote(topic=["out/# out 1"], remote_clientid="edge1")
    topic = "$SYS/broker/connection/edge1/state"
    watcher = connected(remote.broker, "watcher", clean=False)
    [start] = [p for p in watcher.subscribe(topic, qos=1) if isinstance(p, Publish)]  # the start's "0", retained
    assert (start.payload, start.qos, start.retain) == (b"0", 1, True)
    watcher.send(Puback(packet_id=start.packet_id))
    watcher.lose()
    remote.up()
    remote.down()
    watcher = connected(remote.broker, "watcher", clean=False)
    assert [(p.topic, p.payload, p.qos) for p in watcher.received() if isinstance(p, Publish)] == [
        (topic, b"1", 1), (topic, b"0", 1)]
    [kept] = remote.broker.retained.match(topic)
    assert (kept.payload, kept.qos) == (b"0", 1)
    remote.broker.stopService()


# --- the limits set for clients are not the bridge's ----------------------------------------------

def test_the_bridges_local_link_keeps_alive_by_the_brokers_max_keepalive() -> None:
    """max_keepalive gives every connection a Server Keep Alive, the bridge's own link here too,
    which pinged by its CONNECT's (none): the broker closed it for silence after 1.5 times it."""
    remote = FakeRemote(settings={"max_keepalive": 60}, topic=["t/# both 1"])
    remote.up()
    for _ in range(20):  # 200 s of a quiet bridge, the remote answering every PINGREQ
        remote.reactor.advance(10)
        if any(isinstance(p, Pingreq) for p in remote.received()):
            remote.send(Pingresp())
    assert remote.broker.stats.closed_by_reason == {}
    assert remote.bridge.state == "connected"  # type: ignore[union-attr]


def test_the_bridge_keeps_alive_by_the_remotes_server_keep_alive() -> None:
    """[MQTT-3.1.2-21]: a client uses the Server Keep Alive of the CONNACK, not its own: asked
    60 s, given 10, the bridge pinged every 30 s, and the remote dropped it."""
    remote = FakeRemote(5, bridge_protocol_version="mqttv50", topic=["t/# both 1"], notifications=False,
                        keepalive_interval=60)
    remote.up(properties={"server_keep_alive": 10})
    remote.received()
    remote.reactor.advance(5)
    assert any(isinstance(p, Pingreq) for p in remote.received())


@pytest.mark.parametrize("settings", [{"wildcard_subscription_available": False}, {"max_subscriptions_per_client": 1}])
def test_the_bridges_out_topics_are_not_held_to_the_clients_subscription_limits(settings: dict[str, Any]) -> None:
    """The bridge's session here is the broker's own (the ACLs of clients do not apply to it
    either): its out topics were refused (SUBACK 0xA2, 0x97, only logged) and nothing went out."""
    remote = FakeRemote(settings=settings, topic=["t/# out 1", "u/+ out 1"])
    remote.up()
    remote.received()
    connected(remote.broker, "pub").publish("t/x", b"hello", qos=1)
    connected(remote.broker, "pub2").publish("u/x", b"hello too", qos=1)
    remote.reactor.advance(0)
    assert [p.payload for p in remote.received() if isinstance(p, Publish)] == [b"hello", b"hello too"]


@pytest.mark.parametrize("settings", [{"max_session_expiry_interval": 0}, {"persistent_client_expiration": 60}])
def test_the_bridges_session_here_never_expires_whatever_the_limits_of_clients(settings: dict[str, Any]) -> None:
    """docs/bridges.md: the bridge's session here never expires, and what is to go out waits in it
    while the remote cannot be reached: these settings cut it short, and a message published in
    a two-minute outage never reached the remote. Neither does a restart (the store's session)."""
    from durability_helpers import Restarts

    from mqtt_broker.store.memory import MemoryStore
    remote = FakeRemote(settings=settings, topic=["t/# out 1"], notifications=False)
    remote.up()
    remote.down()
    connected(remote.broker, "pub").publish("t/x", b"during the outage", qos=1)
    remote.reactor.advance(120)
    remote.up()
    assert [p.payload for p in remote.received() if isinstance(p, Publish)] == [b"during the outage"]
    bridge = {"connection": "b", "addresses": ["127.0.0.1:1"], "topic": ["t/# out 1"], "notifications": False}
    restarts = Restarts(MemoryStore(), sys_interval=0, bridge=[bridge], **settings)
    restarts.start()
    restarts.reactor.advance(0)  # (the bridge makes its session here as it starts)
    broker = restarts.restart()
    assert broker.sessions[BridgeConfig.from_mapping(bridge).local_client_id].expiry == 0xFFFFFFFF


def test_a_bridges_session_stored_with_a_limit_of_clients_never_expires_once_restored() -> None:
    """A release that held the bridge's session to persistent_client_expiration stored it with
    that expiry (60): restored, it kept it, and expired while the remote stayed away (the local
    link, which would have made it never expire, resumes it only once the remote is back)."""
    from durability_helpers import Restarts

    from mqtt_broker.store.memory import MemoryStore
    bridge = {"connection": "b", "addresses": ["127.0.0.1:1"], "topic": ["t/# out 1"], "notifications": False}
    client_id = BridgeConfig.from_mapping(bridge).local_client_id
    restarts = Restarts(MemoryStore(), sys_interval=0, bridge=[bridge], persistent_client_expiration=60)
    broker = restarts.start()
    restarts.reactor.advance(0)
    session = broker.sessions[client_id]
    session.expiry = 60
    broker.store.save_session(session, restarts.reactor.seconds())  # (as that release left it)
    broker = restarts.restart()
    restarts.reactor.advance(61)  # the remote (127.0.0.1:1) away all along
    assert broker.sessions[client_id].expiry == 0xFFFFFFFF


def held_by_a_hook(qos: int, **settings: Any) -> tuple[FakeRemote, Deferred[None], Any]:
    """A bridge up to this broker, whose publish hook holds the message b"first" until the
    Deferred fires (its PUBACK slow, as with a store's disk behind), and a subscriber of in/# at
    ``qos`` here: (remote, that Deferred, subscriber)."""
    remote = FakeRemote(5, settings={"hook_timeout": 100, **settings}, bridge_protocol_version="mqttv50",
                        topic=["in/# in 1"], notifications=False)
    gate: Deferred[None] = Deferred()
    remote.broker.hooks.on_publish(lambda client, message: gate if message.payload == b"first" else None)
    remote.reactor.advance(0)
    subscriber = connected(remote.broker, "s", 5)
    subscriber.subscribe("in/#", qos=qos)
    remote.up()
    return remote, gate, subscriber


@pytest.mark.parametrize("interval", [50, 10])
def test_a_message_from_the_remote_that_waits_for_a_slot_here_loses_that_time_of_its_expiry(interval: int) -> None:
    """[MQTT-3.3.2-5, -6]: this broker's Receive Maximum full (a slow hook here), a message from
    the remote waited for a slot, then went in with its whole interval, or after it had run out;
    one that ran out is acknowledged to the remote and goes no further."""
    from mqtt_broker.wire import Puback
    remote, gate, subscriber = held_by_a_hook(1, max_inflight_messages=1)
    remote.send(Publish(topic="in/x", payload=b"first", qos=1, packet_id=1, properties={"message_expiry_interval": 100}),
                Publish(topic="in/x", payload=b"second", qos=1, packet_id=2,
                        properties={"message_expiry_interval": interval}))
    remote.reactor.advance(30)  # the first held 30 s by the hook, the second waiting behind it
    gate.callback(None)
    remote.reactor.advance(0)
    got = [p for p in subscriber.received() if isinstance(p, Publish)]
    subscriber.send(Puback(packet_id=got[0].packet_id))
    remote.reactor.advance(0)
    got += [p for p in subscriber.received() if isinstance(p, Publish)]
    assert [(p.payload, p.properties["message_expiry_interval"]) for p in got] == [(b"first", 70)] + (
        [(b"second", interval - 30)] if interval > 30 else [])
    assert sorted(p.packet_id for p in remote.received() if isinstance(p, Puback)) == [1, 2]


def test_what_the_remote_sends_at_qos0_while_this_broker_reads_the_bridge_no_more_is_bounded() -> None:
    """This broker reads the bridge's session no more for a while (a slow hook here; its disk
    behind, too): the remote goes on being read, and what it sent at QoS 0 waited in the pipe
    between the two, without bound. Past max_held_bytes there, it is dropped and counted; QoS 1
    goes on crossing (this broker's Receive Maximum bounds it), acknowledged once taken."""
    from mqtt_broker.wire import Puback
    held = 65536
    remote, gate, subscriber = held_by_a_hook(1, max_held_bytes=held)
    remote.send(Publish(topic="in/x", payload=b"first", qos=0))
    pipe: Any = remote.bridge.local.transport  # type: ignore[union-attr]
    read = encode(Publish(topic="in/x", payload=b"p" * 100, qos=0), 5) * 600  # (64 KiB, as a socket reads)
    for _ in range(40):
        remote.protocol.dataReceived(read)
        remote.reactor.advance(0)
        assert pipe.buffered <= held + 109
    assert remote.transport.producerState == "producing"  # (the remote is read on)
    remote.send(*(Publish(topic="in/x", payload=b"q1", qos=1, packet_id=n) for n in (1, 2)))
    gate.callback(None)
    for _ in range(3):
        remote.reactor.advance(0)
    got = payloads(subscriber)
    dropped = remote.bridge.stats.dropped  # type: ignore[union-attr]
    assert got[0] == b"first" and got[-2:] == [b"q1", b"q1"] and len(got) - 3 + dropped == 24_000 and dropped
    assert [p.packet_id for p in remote.received() if isinstance(p, Puback)] == [1, 2]
    remote.send(Publish(topic="in/x", payload=b"after", qos=0))
    assert payloads(subscriber) == [b"after"]


def test_the_bridge_sends_no_packet_past_mqtts_largest_to_its_remote() -> None:
    """[MQTT-1.5.5, 2.1.4]: to an MQTT 3.1.1 remote (which says nothing of its maximum), the
    largest PUBLISH there is, grown by a topic line's remote prefix, went with a five-byte
    Remaining Length: the remote closed the link, and the message came again at each
    reconnection. It is dropped (acknowledged here), as one too large for a v5 remote is."""
    from mqtt_broker.wire.codec import MAX_REMAINING_LENGTH
    remote = FakeRemote(version=4, max_packet_size=MAX_REMAINING_LENGTH + 5, topic=['t out 0 "" remote/a/longer/prefix/'],
                        notifications=False)
    remote.up()
    remote.received()
    remote.broker.publish("t", bytes(MAX_REMAINING_LENGTH - 4))  # (accepted: the largest PUBLISH there is)
    remote.reactor.advance(0)
    sent = remote.transport.value()
    remote.transport.clear()
    assert len(sent) <= MAX_REMAINING_LENGTH + 5, f"{len(sent)} bytes sent; first bytes {sent[:6].hex()}"


def _serve(remote: FakeRemote, connack: Connack, seconds: int = 300) -> list[Any]:
    """The remote takes the bridge's connection, answers its CONNECT with ``connack``, each
    SUBSCRIBE with a SUBACK granting QoS 1 and each PINGREQ with a PINGRESP, for ``seconds``;
    returns what the bridge sent it."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from mqtt_broker.wire import Suback, Subscribe
    remote.reactor.advance(1.3)  # the back-off, then HostnameEndpoint's steps
    remote.protocol = remote.reactor.tcpClients[-1][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    remote.transport = StringTransport()
    remote.protocol.makeConnection(remote.transport)
    remote.protocol.dataReceived(encode(connack, remote.version))
    remote.reactor.advance(0)
    sent: list[Any] = []
    for _ in range(seconds // 5):
        packets = FrameReader(version=remote.version).feed(remote.transport.value())
        remote.transport.clear()
        sent += packets
        for packet in packets:
            if isinstance(packet, Subscribe):
                remote.send(Suback(packet_id=packet.packet_id, reason_codes=(1,) * len(packet.subscriptions)))
            elif isinstance(packet, Pingreq):
                remote.send(Pingresp())
        remote.reactor.advance(5)
    return sent


def test_in_topics_too_many_for_one_subscribe_under_the_remotes_maximum_packet_size() -> None:
    """A remote that takes packets of 256 bytes at most: the twelve in topics went in one
    SUBSCRIBE, larger, which the link kept back, and the bridge waited for its SUBACK for good
    ("connecting", nothing said, nothing crossing). One SUBSCRIBE a topic, as Mosquitto's bridge."""
    from mqtt_broker.wire import Subscribe
    lines = [f"in/site-42/sensors/building-{n:02}/floor/# in 1" for n in range(12)]
    remote = FakeRemote(5, bridge_protocol_version="mqttv50", topic=lines, notifications=False,
                        keepalive_interval=20)
    sent = _serve(remote, Connack(properties={"maximum_packet_size": 256}))
    assert remote.bridge.state == "connected"  # type: ignore[union-attr]
    assert sorted(r.topic_filter for p in sent if isinstance(p, Subscribe) for r in p.subscriptions) == sorted(
        line.split()[0] for line in lines)
    remote.broker.stopService()


def test_out_topics_too_many_for_one_subscribe_under_this_brokers_maximum_packet_size() -> None:
    lines = [f"out/site-42/sensors/building-{n:02}/floor/# out 1" for n in range(12)]
    remote = FakeRemote(4, topic=lines, notifications=False, max_packet_size=256, keepalive_interval=20)
    _serve(remote, Connack())
    assert remote.bridge.state == "connected"  # type: ignore[union-attr]
    assert len(remote.broker.subscriptions_of("local.vm.b")) == 12
    connected(remote.broker, "pub").publish("out/site-42/sensors/building-01/floor/t", b"21.5", qos=1, packet_id=1)
    remote.reactor.advance(0)
    assert [p.payload for p in FrameReader(version=4).feed(remote.transport.value()) if isinstance(p, Publish)] == [b"21.5"]
    remote.broker.stopService()


def test_a_subscribe_of_one_topic_larger_than_the_remote_takes_closes_the_link_saying_so() -> None:
    lines = ["in/" + "x" * 300 + "/# in 1"]
    remote = FakeRemote(5, bridge_protocol_version="mqttv50", topic=lines, notifications=False)
    _serve(remote, Connack(properties={"maximum_packet_size": 256}), seconds=5)
    link = remote.protocol._wrappedProtocol  # (its transport aborted: a socket's would then be lost)
    assert link.closed and "larger than the server's maximum packet size" in link.why
    remote.broker.stopService()


_BRIDGE = {"connection": "up", "addresses": ["127.0.0.1:1883"], "remote_clientid": "edge", "restart_timeout": 5}


def _published(client: Any) -> list[tuple[str, bytes]]:
    return [(p.topic, p.payload) for p in client.received() if isinstance(p, Publish)]


def test_max_connections_per_minute_does_not_refuse_the_bridges_own_local_link() -> None:
    # A limit meant for clients' reconnection storms: the bridge's in-memory link to this broker
    # CONNECTs as its session is primed at start and at each (re)connection of the remote.
    bridged = Bridged({**_BRIDGE, "topic": ["t/# out 1"]}, max_connections_per_minute=2)
    bridged.accept()
    assert bridged.bridge.state == "connected"
    bridged.bridge.restart()  # as POST /api/v1/bridges/up/restart does
    bridged.settle()
    bridged.reactor.advance(0)
    bridged.accept()
    assert bridged.bridge.state == "connected", bridged.bridge.last_error


def test_with_an_acl_file_a_bridge_still_carries_dollar_topics_other_than_sys(tmp_path: Path) -> None:
    # Without any security the line below carries $aws/... both ways; with an acl_file (which
    # even grants everyone $aws/#) the bridge's own session may neither read nor publish them.
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\ntopic readwrite $aws/#\n")
    bridged = Bridged({**_BRIDGE, "topic": ["$aws/things/# both 1"]}, acl_file=str(acl))
    bridged.accept()
    assert bridged.bridge.state == "connected"
    here = connected(bridged.broker, "here", version=5)
    here.subscribe("$aws/#", qos=1)
    there = connected(bridged.remote, "there", version=5)
    there.subscribe("$aws/#", qos=1)
    connected(bridged.remote, "remote-publisher", version=5).publish("$aws/things/r", b"from there", qos=1)
    bridged.settle()
    connected(bridged.broker, "local-publisher", version=5).publish("$aws/things/l", b"from here", qos=1)
    bridged.settle()
    assert ("$aws/things/r", b"from there") in _published(here)
    assert ("$aws/things/l", b"from here") in _published(there)


def test_mosquittos_bridge_max_packet_size_converted_does_not_drop_what_the_remote_sends(tmp_path: Path) -> None:
    # mosquitto.conf(5): bridge_max_packet_size restricts "the size of messages sent to a remote
    # bridge". The converter carries it over, silently, as this broker's setting of the same name,
    # which limits what is taken FROM the remote: messages Mosquitto bridged in are dropped.
    from mqtt_broker.mosquitto import convert
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\nconnection up\naddress 127.0.0.1:1884\n"
                    "remote_clientid edge\ntopic c/# both 1\nbridge_max_packet_size 300\n")
    bridge = convert(conf).bridges[0]
    assert bridge["bridge_max_packet_size"] == 300  # (carried over, its meaning Mosquitto's here too)
    bridged = Bridged(bridge)
    bridged.accept()
    here = connected(bridged.broker, "here", version=5)
    here.subscribe("c/#", qos=1)
    connected(bridged.remote, "remote-publisher", version=5).publish("c/big", b"x" * 1000, qos=1)
    bridged.settle()
    assert [topic for topic, _ in _published(here)] == ["c/big"], bridged.bridge.stats.dropped


def test_a_mosquitto_topic_line_with_its_direction_in_capitals_is_converted(tmp_path: Path) -> None:
    # Mosquitto 2.0.11 reads the direction with strcasecmp ("OUT", "In" and "Both" start it);
    # docs/mosquitto.md: the converter refuses "a file that would not start".
    from mqtt_broker.mosquitto import convert
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\nconnection up\naddress 127.0.0.1:1884\n"
                    "topic sensors/# OUT 1\ntopic cmd/# In 2 \"\" edge/\n")
    bridge = convert(conf).config().bridge[0]
    assert [(t.pattern, t.direction) for t in bridge.topic] == [("sensors/#", "out"), ("cmd/#", "in")]


def test_the_bridges_own_local_link_takes_none_of_max_connections() -> None:
    # max_connections: "Simultaneous client connections". The bridge's in-memory link to this
    # broker is counted in broker.connections, so it takes a client's place.
    from twisted.internet.address import IPv4Address
    bridged = Bridged({**_BRIDGE, "topic": ["t/# out 1"]}, max_connections=1)
    bridged.accept()
    assert bridged.bridge.state == "connected"
    protocol = bridged.broker.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    assert protocol is not None, "the only client allowed was refused: the bridge's link took its place"


def test_a_mosquitto_restart_timeout_below_one_second_is_converted(tmp_path: Path) -> None:
    # Mosquitto 2.0.11: "restart_timeout interval too low, using 1 second." and it starts.
    from mqtt_broker.mosquitto import convert
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\nconnection up\naddress 127.0.0.1:1884\n"
                    "topic a/# out 1\nrestart_timeout 0\n")
    bridge = convert(conf).config().bridge[0]
    assert bridge.restart_timeout == (1.0, 1.0)


def test_bridge_max_packet_size_bounds_what_goes_to_the_remote() -> None:
    """As Mosquitto's: the largest packet sent to the remote (a larger message is acknowledged
    here, logged and dropped, and what follows goes on)."""
    bridged = Bridged({**_BRIDGE, "topic": ["c/# out 1"], "bridge_max_packet_size": 300})
    bridged.accept()
    there = connected(bridged.remote, "there", version=5)
    there.subscribe("c/#", qos=1)
    here = connected(bridged.broker, "here", version=5)
    here.publish("c/big", b"x" * 1000, qos=1)
    here.publish("c/small", b"x", qos=1, packet_id=2)
    bridged.settle()
    assert [topic for topic, _ in _published(there)] == ["c/small"]
    assert bridged.bridge.stats.dropped == 1


@pytest.mark.parametrize("link", ["remote", "local"])
def test_a_subscribe_after_a_reconnect_takes_no_packet_id_a_qos2_exchange_holds(link: str, monkeypatch: Any) -> None:
    """[MQTT-2.2.1-3]: a new SUBSCRIBE takes a Packet Identifier "currently unused", and a QoS 2
    PUBLISH's holds its id until it ends. The link drops with a QoS 2 message 1 unfinished: the
    bridge's to the remote (both sessions resumed), or the remote's here, whose PUBREL this
    broker awaits: the bridge subscribed again with packet id 1 on that link."""
    from mqtt_broker.bridge.link import Link
    bridged = Bridged({"connection": "up", "addresses": ["127.0.0.1:1883"], "remote_clientid": "edge",
                       "restart_timeout": 5, "topic": ["o/# out 2", "i/# in 2"], "bridge_protocol_version": "mqttv50"})
    bridged.accept()
    session = bridged.broker.sessions[bridged.bridge.config.local_client_id]
    if link == "remote":
        receiver = connected(bridged.remote, "receiver", version=5)
        receiver.subscribe("o/#", qos=2)
        sender = connected(bridged.broker, "sender", version=5)
        sender.publish("o/x", b"1", qos=2)
        sender.send(Pubrel(packet_id=1))
        for _ in range(20):  # (bounded) until the receiver has it, its PUBREC not yet back
            bridged.step()
            if [p for p in receiver.received() if isinstance(p, Publish)]:
                break
    bridged.drop()
    if link == "local":  # (dropped between the PUBREC here and the remote's PUBREL)
        session.expect_pubrel(1)
    in_use = set(session.outgoing if link == "remote" else session.awaiting_pubrel)
    assert in_use
    if link == "remote":  # as after a restart here, which knows the session's exchanges (stored), not
        bridged.bridge._held_at_remote = None  # what the remote holds: it subscribes there again
    sent: list[tuple[str, Any]] = []
    send = Link.send
    monkeypatch.setattr(Link, "send", lambda self, packet: sent.append((self.name, packet)) or send(self, packet))
    bridged.reconnect()
    bridged.settle()
    ids = [p.packet_id for name, p in sent if name == link and isinstance(p, Subscribe)]
    assert ids and not set(ids) & in_use, f"SUBSCRIBE packet ids {ids} while {sorted(in_use)} are in use"


def test_qos0_that_waited_for_a_slot_is_not_dropped_going_on_to_this_broker_reading_the_bridge() -> None:
    """QoS 0 messages from the remote wait behind a QoS 1 one for a slot here (this broker's
    Receive Maximum, up to MAX_WAITING); this broker reads the bridge all along. When the slot
    frees, they all go into the pipe in one turn, past max_held_bytes: they were dropped, though
    this broker was reading the pipe."""
    remote, gate, subscriber = held_by_a_hook(0, max_inflight_messages=1)
    # A QoS 1 message whose PUBACK is slow (a hook here; a store's disk the same), a second one
    # that waits for the slot, and QoS 0 messages behind it, read 64 KiB at a time.
    remote.send(Publish(topic="in/x", payload=b"first", qos=1, packet_id=1),
                Publish(topic="in/x", payload=b"second", qos=1, packet_id=2))
    pipe: Any = remote.bridge.local.transport  # type: ignore[union-attr]
    one = encode(Publish(topic="in/x", payload=b"p" * 200, qos=0), 5)
    read = one * (65536 // len(one))
    sent = 0
    while sent + 65536 // len(one) <= 9000:
        remote.protocol.dataReceived(read)
        remote.reactor.advance(0)
        sent += 65536 // len(one)
        assert pipe.buffered == 0 and pipe.peer.reading  # (this broker reads the bridge: nothing is held)
    gate.callback(None)
    got: list[bytes] = []
    for _ in range(500):
        remote.reactor.advance(0)
        got += payloads(subscriber)
    dropped = remote.bridge.stats.dropped  # type: ignore[union-attr]
    # (The subscriber, sent them all in one turn, takes max_held_bytes of them, its own bound.)
    taken = len(got) + remote.broker.sessions["s"].dropped
    assert (taken, dropped) == (2 + sent, 0)


def test_one_read_of_small_qos0_messages_is_not_dropped_while_this_broker_reads_the_bridge() -> None:
    """One read from the remote (64 KiB, as a socket gives it) of small QoS 0 messages, a topic
    line's local prefix making each longer here: they all go into the pipe in the turn they are
    read, past max_held_bytes (at its least, 65536), and were dropped though this broker was
    reading the pipe."""
    remote = FakeRemote(4, settings={"max_held_bytes": 65536},
                        topic=["# in 0 a/much/longer/local/prefix/for/what/comes/in/ r/"], notifications=False)
    remote.reactor.advance(0)
    subscriber = connected(remote.broker, "s", 5)
    subscriber.subscribe("a/#", qos=0)
    remote.up()
    pipe: Any = remote.bridge.local.transport  # type: ignore[union-attr]
    assert pipe.buffered == 0 and pipe.peer.reading
    one = encode(Publish(topic="r/x", payload=b"p" * 20, qos=0), 4)
    count = 65536 // len(one)
    remote.protocol.dataReceived(one * count)
    got: list[bytes] = []
    for _ in range(100):
        remote.reactor.advance(0)
        got += payloads(subscriber)
    # (The subscriber, sent them all in one turn, takes max_held_bytes of them, its own bound.)
    taken = len(got) + remote.broker.sessions["s"].dropped
    assert (taken, remote.bridge.stats.dropped) == (count, 0)  # type: ignore[union-attr]


def test_a_connect_hook_that_lets_in_only_bridges_lets_the_bridges_own_link_in() -> None:
    # The bridge's in-memory link to this broker passes through the hooks as a client does
    # (docs/bridges.md): a hook tells it by Client.bridge, the bridge's name (None for a client).
    seen: list[tuple[str, str | None]] = []
    bridged = Bridged({**_BRIDGE, "topic": ["t/# both 1"]})
    bridged.broker.hooks.on_connect(lambda client: seen.append((client.client_id, client.bridge))
                                    or client.bridge is not None)
    bridged.accept()
    assert bridged.bridge.state == "connected", bridged.bridge.last_error
    assert FakeClient(bridged.broker).connect("app").reason_code == 5  # type: ignore[union-attr]
    assert set(seen) == {(bridged.bridge.config.local_client_id, "up"), ("app", None)}


@pytest.mark.parametrize("version, code", [(MQTT_5, 0x85), (MQTT_3_1_1, 2)])
def test_a_client_with_the_bridges_local_clientid_is_refused_and_takes_nothing_of_the_bridge(
        version: int, code: int) -> None:
    # Mosquitto 2.0.11 gives such a client nothing of what goes to the remote, nor stops the
    # bridge. The session being an ordinary one, the client took it over: the bridge's link was
    # closed (0x8E) and what was published for the remote went to that client.
    bridged = Bridged({**_BRIDGE, "topic": ["out/# out 1"]})
    bridged.accept()
    there = connected(bridged.remote, "there", version=5)
    there.subscribe("out/#", qos=1)
    impostor = FakeClient(bridged.broker, version)
    with LogCapture() as logged:
        connack = impostor.connect(bridged.bridge.config.local_client_id, clean=False)
    bridged.settle()
    assert (connack.reason_code, impostor.closed) == (code, True)  # type: ignore[union-attr]
    assert "a bridge's session here" in logged.text()
    connected(bridged.broker, "pub", version=5).publish("out/t", b"for the remote", qos=1)
    bridged.settle()
    assert bridged.bridge.state == "connected", bridged.bridge.last_error
    assert _published(there) == [("out/t", b"for the remote")]


@pytest.mark.parametrize("lines, qos", [(["a/# out 0", "a/# out 2"], 2), (["a/# out 2", "a/# out 0"], 0)])
def test_of_two_out_lines_of_one_filter_the_last_sets_the_qos_as_in_mosquitto(lines: list[str], qos: int) -> None:
    # Mosquitto 2.0.11 subscribes its bridge's session for each line: the later subscription of
    # the filter replaces the earlier. The first line's QoS was taken: a converted Mosquitto
    # file sent QoS 2 messages at QoS 0.
    bridged = Bridged({**_BRIDGE, "topic": lines})
    bridged.accept()
    assert bridged.bridge.state == "connected"
    there = connected(bridged.remote, "there", version=5)
    there.subscribe("a/#", qos=2)
    connected(bridged.broker, "here", version=5).publish("a/x", b"m", qos=2)
    bridged.settle()
    assert [(p.topic, p.qos) for p in there.received() if isinstance(p, Publish)] == [("a/x", qos)]


def test_a_bridge_of_a_cluster_must_be_given_its_remote_clientid() -> None:
    # Left out, it was each host's name: as many sessions at the remote and here as nodes.
    table = {"connection": "cloud", "addresses": ["h:1883"], "topic": ["#"]}
    with pytest.raises(ConfigError, match="must be given with cluster") as caught:
        BrokerConfig(cluster="redis://127.0.0.1:6379/0", bridge=[{**table, "remote_clientid": "edge"}, {**table, "connection": "b"}])
    assert caught.value.key == "bridge[2].remote_clientid"
    assert BrokerConfig(bridge=[table]).bridge[0].remote_clientid == ""

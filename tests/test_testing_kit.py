"""mqtt_broker.testing: the broker in memory and its clients, as an embedder's tests use them."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mqtt_broker import Client, Message, Refused, ReasonCode
from mqtt_broker.protocol import PACKETS_PER_TURN
from mqtt_broker.store.memory import MemoryStore
from mqtt_broker.testing import MemoryBroker
from mqtt_broker.wire import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, Connack, Disconnect, Puback, Pubcomp, Publish, Pubrec, Suback,
    Unsuback, Will,
)

from conftest import ROOT

VERSIONS = [MQTT_3_1_1, MQTT_5]


# --- connecting -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [MQTT_3_1, MQTT_3_1_1, MQTT_5])
def test_connect(version: int) -> None:
    broker = MemoryBroker()
    client = broker.client(version)
    connack = client.connect("c1", username="u", password="p")
    assert connack is not None and connack.reason_code == 0 and not connack.session_present
    [seen] = broker.service.clients()
    assert (seen.client_id, seen.username, seen.protocol_version) == ("c1", "u", version)
    assert seen.peer.startswith("127.0.0.1:")
    assert not client.closed


def test_mqtt5_client_learns_its_assigned_client_id() -> None:
    client = MemoryBroker().connect("")
    assert client.client_id.startswith("auto-")
    assert [c.client_id for c in client.broker.service.clients()] == [client.client_id]


def test_connect_shortcut_raises_when_refused() -> None:
    broker = MemoryBroker()
    broker.hooks.on_connect(lambda client: client.client_id != "bad")
    with pytest.raises(AssertionError, match="'bad'"):
        broker.connect("bad")
    refused = broker.client(MQTT_3_1_1)
    assert refused.connect("bad") == Connack(reason_code=5)
    assert refused.closed and broker.service.connections == set()


def test_a_connection_over_max_connections_is_closed_at_once() -> None:
    broker = MemoryBroker(max_connections=1)
    broker.connect("first")
    second = broker.client()
    assert second.protocol is None and second.closed
    with pytest.raises(ConnectionError, match="the connection has ended"):
        second.connect("second")
    with pytest.raises(AssertionError, match="connection of 'third' not accepted"):
        broker.connect("third")


def test_the_transport_is_a_transport() -> None:
    assert verifyObject(ITransport, MemoryBroker().client().transport)


# --- publish and subscribe --------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_and_subscribe(version: int, qos: int) -> None:
    broker = MemoryBroker()
    sub = broker.connect("sub", version=version)
    assert sub.subscribe("t/#", qos=2) == Suback(packet_id=1, reason_codes=(2,))
    pub = broker.connect("pub", version=version)
    ack = pub.publish("t/1", b"hello", qos=qos)
    assert ack == [None, Puback(packet_id=1), Pubcomp(packet_id=1)][qos]
    [message] = sub.messages()
    assert (message.topic, message.payload, message.qos) == ("t/1", b"hello", qos)
    assert sub.messages() == [] and sub.received() == []
    # Both exchanges are complete on the broker's side.
    assert not broker.service.sessions["pub"].awaiting_pubrel
    assert not broker.service.sessions["sub"].outgoing


def test_many_messages_are_acknowledged_as_they_come() -> None:
    broker = MemoryBroker(max_inflight_messages=2)
    sub = broker.connect("sub")
    sub.subscribe("t", qos=1)
    pub = broker.connect("pub")
    for n in range(5):
        pub.publish("t", str(n), qos=1)
    assert [m.payload for m in sub.messages()] == [b"0", b"1", b"2", b"3", b"4"]


def test_a_burst_longer_than_a_turn_is_all_handled_without_advancing_the_clock() -> None:
    """The broker handles PACKETS_PER_TURN packets of a read and the rest at the reactor's next
    turn (a call due at once), which the kit ran only when the test advanced the clock: the
    subscriber got 10,000 messages of 10,001, and the next PUBLISH seemed held by a hook."""
    broker = MemoryBroker(sys_interval=0, max_queued_messages=2 * PACKETS_PER_TURN)
    sub = broker.connect("sub")
    sub.subscribe("t")
    pub = broker.connect("pub")
    start = broker.reactor.seconds()
    pub.send(*[Publish(topic="t", payload=b"%d" % n) for n in range(PACKETS_PER_TURN + 1)])
    assert len(sub.messages()) == PACKETS_PER_TURN + 1
    ack = pub.publish("t", b"last", qos=1)
    assert ack is not None and ack.reason_code == ReasonCode.SUCCESS
    assert broker.reactor.seconds() == start


def test_a_message_sent_with_a_topic_alias_only_has_its_topic() -> None:
    """A client that allows topic aliases is sent a topic once, then its alias alone (MQTT 5
    3.3.2.3.4): the kit gave the later messages the topic ''."""
    broker = MemoryBroker()
    sub = broker.connect("sub", properties={"topic_alias_maximum": 10})
    sub.subscribe("t/#")
    pub = broker.connect("pub")
    for topic in ("t/1", "t/1", "t/2", "t/1"):
        pub.publish(topic, b"x")
    messages = sub.messages()
    assert [m.topic for m in messages] == ["t/1", "t/1", "t/2", "t/1"]
    assert [m.properties["topic_alias"] for m in messages] == [1, 1, 2, 1]


def test_unsubscribe() -> None:
    broker = MemoryBroker()
    sub = broker.connect("sub", version=MQTT_3_1_1)
    sub.subscribe("a", "b")
    assert sub.unsubscribe("a") == Unsuback(packet_id=2)
    broker.service.publish("a", b"x")
    broker.service.publish("b", b"y")
    assert [m.topic for m in sub.messages()] == ["b"]


def test_retained_message_comes_with_the_subscription() -> None:
    broker = MemoryBroker()
    broker.connect("pub").publish("state", b"on", qos=1, retain=True)
    sub = broker.connect("sub")
    sub.subscribe("state", qos=1)
    [retained] = sub.messages()
    assert (retained.payload, retained.retain) == (b"on", True)


def test_without_acknowledge_an_mqtt3_delivery_is_resent_by_advancing_the_clock() -> None:
    broker = MemoryBroker(retry_interval=20)
    sub = broker.connect("sub", version=MQTT_3_1_1, acknowledge=False)
    sub.subscribe("t", qos=1)
    broker.connect("pub").publish("t", b"m", qos=1)
    [first] = sub.messages()
    broker.advance(19)
    assert sub.messages() == []
    broker.advance(1)
    [again] = sub.messages()
    assert again.dup and again.packet_id == first.packet_id
    sub.send(Puback(packet_id=first.packet_id))
    broker.advance(60)
    assert sub.messages() == []


def test_an_acknowledging_client_is_not_resent_anything() -> None:
    broker = MemoryBroker(retry_interval=20)
    sub = broker.connect("sub", version=MQTT_3_1_1)
    sub.subscribe("t", qos=2)
    broker.connect("pub").publish("t", b"m", qos=2)
    broker.advance(100)  # without a look at what came meanwhile
    assert [(m.payload, m.dup) for m in sub.messages()] == [(b"m", False)]


def test_received_takes_what_messages_left() -> None:
    broker = MemoryBroker()
    client = broker.connect("c")
    client.subscribe("t")
    broker.service.publish("t", b"x")
    client.drop()
    assert client.received() == [Publish(topic="t", payload=b"x")]
    assert client.messages() == []


class SlowStore(MemoryStore):
    """A store whose batches the test writes (``write_all``), bounding what waits for them as
    SQLiteStore bounds what waits for its disk (``unwritten_bytes``)."""

    max_unwritten_bytes = 4000

    def __init__(self) -> None:
        super().__init__()
        self.unwritten_bytes = 0
        self._waiting: list[Deferred[None]] = []

    def add_delivery(self, client_id: str, item: Any, packet_id: int | None) -> None:
        self.unwritten_bytes += len(item.message.payload)
        super().add_delivery(client_id, item, packet_id)

    def flushed(self) -> Deferred[None]:
        self._waiting.append(Deferred())
        return self._waiting[-1]

    def write_all(self) -> None:
        self.unwritten_bytes = 0
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


def test_a_client_the_broker_reads_no_more_is_read_once_it_reads_again() -> None:
    """Past its store's bound, the broker reads no more from the publisher until the store has
    caught up (it pauses the transport, as a socket it stops reading): the kit went on handing
    the broker what the client sent, so the PUBLISH after the bound was routed at once."""
    store = SlowStore()
    broker = MemoryBroker(store=store, sys_interval=0)
    offline = broker.connect("offline", clean_start=False, properties={"session_expiry_interval": 600})
    offline.subscribe("t", qos=1)
    offline.drop()
    watcher = broker.connect("watcher")
    watcher.subscribe("t")
    publisher = broker.connect("p")
    store.write_all()
    assert publisher.publish("t", b"x" * 3000, qos=1) is None  # (its PUBACK waits for the store)
    assert publisher.publish("t", b"y" * 3000, qos=1) is None  # past the bound: read no more
    assert publisher.publish("t", b"later", qos=1) is None
    assert [m.payload[:1] for m in watcher.messages()] == [b"x", b"y"]
    store.write_all()
    assert [m.payload for m in watcher.messages()] == [b"later"]
    store.write_all()
    assert publisher.received() == [Puback(packet_id=1), Puback(packet_id=2), Puback(packet_id=3)]


def test_what_a_client_sent_while_the_broker_read_no_more_is_handled_before_its_end() -> None:
    """While a hook decides, the broker reads on until it holds 64 KiB, then reads no more; a
    client that sent more and then dropped has all it sent handled once the hook has decided."""
    broker = MemoryBroker(sys_interval=0)
    decision: Deferred[bool] = Deferred()
    broker.hooks.on_publish(lambda client, message: decision if message.topic == "decided" else None)
    watcher = broker.connect("watcher")
    watcher.subscribe("#")
    publisher = broker.connect("p", will=Will(topic="will", payload=b"gone"))
    publisher.publish("decided", b"1")
    publisher.publish("large", b"x" * 70_000)
    publisher.publish("after", b"3")
    publisher.drop()
    decision.callback(True)
    assert [m.topic for m in watcher.messages()] == ["decided", "large", "after", "will"]


# --- ending connections: wills, keepalive, sessions -------------------------------------------

def test_will_on_drop_and_not_on_disconnect() -> None:
    broker = MemoryBroker()
    watcher = broker.connect("watcher")
    watcher.subscribe("will/#")
    broker.connect("a", will=Will(topic="will/a", payload=b"gone")).drop()
    polite = broker.connect("b", will=Will(topic="will/b", payload=b"gone"))
    polite.disconnect()
    assert polite.closed
    assert [m.topic for m in watcher.messages()] == ["will/a"]
    assert broker.service.connections == {watcher.protocol}


def test_delayed_will_by_advancing_the_clock() -> None:
    broker = MemoryBroker()
    watcher = broker.connect("watcher")
    watcher.subscribe("will")
    broker.connect("c", properties={"session_expiry_interval": 60},
                   will=Will(topic="will", payload=b"gone", properties={"will_delay_interval": 10})).drop()
    broker.advance(9)
    assert watcher.messages() == []
    broker.advance(1)
    assert [m.payload for m in watcher.messages()] == [b"gone"]


@pytest.mark.parametrize("version", VERSIONS)
def test_keepalive_timeout_by_advancing_the_clock(version: int) -> None:  # [MQTT-3.1.2-24]
    broker = MemoryBroker()
    watcher = broker.connect("watcher")
    watcher.subscribe("will")
    client = broker.connect("c", version=version, keep_alive=10, will=Will(topic="will", payload=b"late"))
    broker.advance(10)
    assert client.ping() is not None  # traffic: the 15 s count starts again
    broker.advance(14.9)
    assert not client.closed
    broker.advance(0.1)
    assert client.closed
    assert client.received() == ([Disconnect(reason_code=ReasonCode.KEEP_ALIVE_TIMEOUT, properties={
        "reason_string": "keepalive timeout (15.0s idle)"})] if version == MQTT_5 else [])
    assert [m.payload for m in watcher.messages()] == [b"late"]
    assert broker.service.connections == {watcher.protocol}


def test_mqtt5_session_expiry_by_advancing_the_clock() -> None:
    broker = MemoryBroker()
    client = broker.connect("c", clean_start=False, properties={"session_expiry_interval": 60})
    client.subscribe("t", qos=1)
    client.drop()
    broker.service.publish("t", b"queued", qos=1)
    broker.advance(59)
    again = broker.client()
    connack = again.connect("c", clean_start=False, properties={"session_expiry_interval": 60})
    assert connack is not None and connack.session_present
    assert [m.payload for m in again.messages()] == [b"queued"]
    again.drop()
    broker.advance(60)
    assert "c" not in broker.service.sessions
    assert broker.service.subscriptions_of("c") == []


def test_message_expiry_by_advancing_the_clock() -> None:
    broker = MemoryBroker()
    offline = broker.connect("sub", clean_start=False, properties={"session_expiry_interval": 600})
    offline.subscribe("t", qos=1)
    offline.drop()
    pub = broker.connect("pub")
    pub.publish("t", b"short", qos=1, properties={"message_expiry_interval": 5})
    pub.publish("t", b"long", qos=1, properties={"message_expiry_interval": 50})
    broker.advance(10)
    sub = broker.client()
    sub.connect("sub", clean_start=False, properties={"session_expiry_interval": 600})
    [message] = sub.messages()
    assert message.payload == b"long" and message.properties["message_expiry_interval"] == 40


# --- hooks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_publish_hook_refuses(version: int) -> None:
    broker = MemoryBroker()
    broker.hooks.on_publish(lambda client, message: not message.topic.startswith("private/"))
    sub = broker.connect("sub")
    sub.subscribe("#")
    pub = broker.connect("pub", version=version)
    refused = ReasonCode.NOT_AUTHORIZED if version == MQTT_5 else 0  # MQTT 3 cannot be told
    assert pub.publish("private/x", b"1", qos=1) == Puback(packet_id=1, reason_code=refused)
    assert pub.publish("private/y", b"2", qos=2) == (
        Pubrec(packet_id=2, reason_code=refused) if version == MQTT_5 else Pubcomp(packet_id=2))
    assert pub.publish("public", b"3", qos=1) == Puback(packet_id=3)
    assert [m.topic for m in sub.messages()] == ["public"]


def test_refused_with_a_reason_string() -> None:
    broker = MemoryBroker()
    broker.hooks.on_publish(lambda client, message: Refused(ReasonCode.QUOTA_EXCEEDED, "slow down"))
    ack = broker.connect("pub").publish("t", qos=1)
    assert ack is not None
    assert ack.reason_code == ReasonCode.QUOTA_EXCEEDED and ack.properties["reason_string"] == "slow down"


def test_publish_hook_deferred_fired_later() -> None:
    broker = MemoryBroker()
    decisions: list[Deferred[bool]] = []

    def later(client: Client, message: Message) -> Deferred[bool]:
        decisions.append(Deferred())
        return decisions[-1]

    broker.hooks.on_publish(later)
    sub = broker.connect("sub")
    sub.subscribe("t", qos=2)
    pub = broker.connect("pub")
    assert pub.publish("t", b"first", qos=2) is None  # the hook is deciding
    assert pub.publish("t", b"second", qos=1) is None  # read after the first is decided
    assert sub.messages() == [] and len(decisions) == 1
    decisions[0].callback(True)
    assert [m.payload for m in sub.messages()] == [b"first"]
    # The client answered the PUBREC with PUBREL, which waits behind the second PUBLISH.
    assert pub.received() == [] and len(decisions) == 2
    decisions[1].callback(False)
    assert pub.received() == [Puback(packet_id=2, reason_code=ReasonCode.NOT_AUTHORIZED), Pubcomp(packet_id=1)]
    assert sub.messages() == []
    assert not broker.service.sessions["pub"].awaiting_pubrel


def test_connect_hook_deferred_fired_later() -> None:
    broker = MemoryBroker()
    decision: Deferred[ReasonCode] = Deferred()
    broker.hooks.on_connect(lambda client: decision)
    client = broker.client()
    assert client.connect("c") is None
    assert broker.service.clients() == []
    decision.callback(ReasonCode.BANNED)
    assert client.received() == [Connack(reason_code=ReasonCode.BANNED)]
    assert client.closed and broker.service.connections == set()


def test_coroutine_subscribe_hook() -> None:
    broker = MemoryBroker()
    grant: Deferred[int] = Deferred()

    async def at_most(client: Client, subscription: object) -> int:
        return await grant

    broker.hooks.on_subscribe(at_most)
    sub = broker.connect("sub")
    assert sub.subscribe("t", qos=2) is None
    grant.callback(1)
    assert sub.received() == [Suback(packet_id=1, reason_codes=(1,))]


def test_disconnect_hook_sees_graceful_and_not() -> None:
    broker = MemoryBroker()
    ended: list[tuple[str, bool]] = []
    broker.hooks.on_disconnect(lambda client, graceful: ended.append((client.client_id, graceful)))
    broker.connect("a").disconnect()
    broker.connect("b").drop()
    broker.connect("c", keep_alive=1)
    broker.advance(2)
    assert ended == [("a", True), ("b", False), ("c", False)]


# --- the kit stays out of the broker ----------------------------------------------------------

def test_the_broker_does_not_import_the_kit() -> None:
    code = ("import sys, mqtt_broker, mqtt_broker.tap; mqtt_broker.BrokerService; "
            "assert 'mqtt_broker.testing' not in sys.modules and 'twisted.internet.testing' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def documented_example() -> str:
    page = (ROOT / "docs" / "embedding.md").read_text(encoding="utf-8")
    section = page.split("## Testing code that embeds the broker\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_example() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(documented_example(), "docs/embedding.md", "exec"), namespace)
    namespace["test_a_sensor_publishes_under_its_own_id"]()


def test_the_documented_example_passes_a_strict_type_check(tmp_path: Path) -> None:
    """Embedders' tests are type checked too: the example read ``reason_code`` from what
    ``publish()`` returns, which is None while a hook decides."""
    (tmp_path / "test_example.py").write_text(documented_example())
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
         "test_example.py"], cwd=tmp_path, env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300)
    assert checked.returncode == 0, checked.stdout


def test_a_closed_client_is_let_go() -> None:
    """The kit kept every client it made, and went through all of them at each call: a test of a
    few thousand connections in turn slowed down quadratically (4,000: 16 s)."""
    broker = MemoryBroker()
    client = broker.connect("gone")
    client.subscribe("t")
    broker.connect("other").publish("t", b"last")
    client.disconnect()
    assert client.closed and [m.payload for m in client.messages()] == [b"last"]  # (kept by the client)
    gone = weakref.ref(client)
    del client
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("how", ["setting", "store"])
def test_sqlite_persistence_is_refused_with_a_reason(how: str, tmp_path: Path) -> None:
    """Its writes run in threads, which the fake reactor has none of: no SUBACK nor PUBACK ever
    came, whatever the test advanced."""
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker.store.sqlite import SQLiteStore
    settings: dict[str, Any] = {"persistence": "sqlite", "data_dir": str(tmp_path)} if how == "setting" else {
        "store": SQLiteStore(tmp_path / "mqttbroker.db", MemoryReactorClock())}
    with pytest.raises(ValueError, match="use a MemoryStore"):
        MemoryBroker(**settings)


def test_sqlite_is_refused_only_where_the_broker_would_use_it(tmp_path: Path) -> None:
    """The settings as BrokerService reads them: a TOML file, keywords over a config."""
    from mqtt_broker.config import BrokerConfig
    assert MemoryBroker(config=BrokerConfig(persistence="sqlite"), persistence="memory").service.store is None
    (tmp_path / "broker.toml").write_text("max_qos = 1\n")
    assert MemoryBroker(config=str(tmp_path / "broker.toml")).service.config.max_qos == 1
    (tmp_path / "broker.toml").write_text("persistence = 'sqlite'\n")
    with pytest.raises(ValueError, match="use a MemoryStore"):
        MemoryBroker(config=str(tmp_path / "broker.toml"))


def test_a_json_web_token_lasts_its_lifetime_on_the_kits_clock(tmp_path: Path) -> None:
    """A token's exp is a wall-clock time, which PyJWT checks at CONNECT, and the broker ends the
    connection at it on its own clock: the kit's started at 0, so the connection outlived the
    token by decades of the kit's time."""
    import jwt
    secret = b"an HMAC secret of at least thirty-two bytes"
    (tmp_path / "secret").write_bytes(secret)
    broker = MemoryBroker(jwt_secret_file=str(tmp_path / "secret"), allow_anonymous=False, sys_interval=0)
    now = broker.reactor.seconds()
    assert abs(now - time.time()) < 60
    token = jwt.encode({"sub": "alice", "exp": int(now) + 60}, secret, algorithm="HS256")
    client = broker.client()
    connack = client.connect("alice", password=token)
    assert connack is not None and connack.reason_code == 0
    broker.advance(59)
    assert not client.closed
    broker.advance(2)
    assert client.closed


def test_a_json_web_tokens_times_are_the_kits_once_the_clock_moved(tmp_path: Path) -> None:
    """PyJWT checked iat and nbf against the wall clock, and exp too: once a test advanced the
    clock, a token made at the kit's time was "not yet valid (iat)", and one made with
    time.time() let in a client whose token had run out on the broker's clock."""
    import jwt
    secret = b"an HMAC secret of at least thirty-two bytes"
    (tmp_path / "secret").write_bytes(secret)
    broker = MemoryBroker(jwt_secret_file=str(tmp_path / "secret"), allow_anonymous=False, sys_interval=0)
    start = int(broker.reactor.seconds())
    later = jwt.encode({"sub": "alice", "nbf": start + 600, "exp": start + 3600}, secret, algorithm="HS256")
    early = broker.client().connect("alice", password=later)
    assert early is not None and early.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
    broker.advance(601)
    for claims in ({"nbf": start + 600, "exp": start + 3600}, {"iat": start + 601, "exp": start + 661}):
        token = jwt.encode({"sub": "alice", **claims}, secret, algorithm="HS256")
        connack = broker.client().connect("alice", password=token)
        assert connack is not None and connack.reason_code == ReasonCode.SUCCESS, (claims, connack)
    run_out = jwt.encode({"sub": "alice", "exp": start + 300}, secret, algorithm="HS256")
    connack = broker.client().connect("alice", password=run_out)
    assert connack is not None and connack.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD


def test_a_broker_restarted_on_a_memory_store_goes_on_from_the_time_reached() -> None:
    """The second broker's clock started at the wall clock again, behind the first one's: a
    session outlived its expiry by the time advanced before the restart."""
    store = MemoryStore()
    first = MemoryBroker(store=store, sys_interval=0)
    first.connect("c", clean_start=False, properties={"session_expiry_interval": 60}).drop()
    first.advance(50)
    first.service.stopService()
    second = MemoryBroker(store=store, sys_interval=0)
    assert second.reactor.seconds() == first.reactor.seconds()
    second.advance(9)
    assert "c" in second.service.sessions
    second.advance(2)  # 61 s after the client went away
    assert "c" not in second.service.sessions


@pytest.mark.parametrize("closing", ["keepalive", "publish before connect"])
def test_a_request_no_answer_can_come_to_raises(closing: str) -> None:
    """It returned None, which says a hook is deciding and the answer comes later."""
    broker = MemoryBroker(sys_interval=0)
    if closing == "keepalive":
        client = broker.connect("c", keep_alive=1)
        broker.advance(2)
        with pytest.raises(ConnectionError, match="PUBLISH not sent: the connection has ended"):
            client.publish("t", b"x", qos=1)
        with pytest.raises(ConnectionError):
            client.ping()
    else:
        client = broker.client()
        with pytest.raises(ConnectionError, match="closed the connection without answering the PUBLISH"):
            client.publish("t", b"x", qos=1)
    assert client.closed


def test_a_qos0_publish_on_a_connection_that_ended_raises() -> None:
    """Dropped without a word, it left the test to find its subscriber's list empty."""
    broker = MemoryBroker(sys_interval=0)
    client = broker.connect("c", keep_alive=1)
    broker.advance(2)
    with pytest.raises(ConnectionError, match="PUBLISH not sent: the connection has ended"):
        client.publish("t", b"x")


@pytest.mark.parametrize("options", [
    {"no_local": True}, {"retain_as_published": True}, {"retain_handling": 1},
    {"properties": {"subscription_identifier": 3}}])
def test_mqtt5_options_given_to_an_mqtt3_client_are_refused_not_dropped(options: dict[str, Any]) -> None:
    """MQTT 3.1.1 cannot carry them: sent without them, the test would not test what it asked for."""
    broker = MemoryBroker(sys_interval=0)
    client = broker.connect("c", version=4)
    with pytest.raises(ValueError, match="MQTT 5"):
        client.subscribe("t", **options)
    with pytest.raises(ValueError, match="MQTT 5"):
        client.publish("t", b"x", properties={"message_expiry_interval": 5})
    with pytest.raises(ValueError, match="MQTT 5"):
        broker.client(version=4).connect("d", properties={"session_expiry_interval": 5})
    with pytest.raises(ValueError, match="will_properties: MQTT 5"):
        broker.client(version=4).connect("d", will=Will(topic="w", payload=b"", properties={"will_delay_interval": 5}))
    with pytest.raises(ValueError, match="reason_code: MQTT 5"):
        client.disconnect(0x04)  # (with its will)
    assert client.subscribe("t").reason_codes == (0,)  # type: ignore[union-attr]


@pytest.mark.parametrize("setting", ["clock", "reactor", "endpoints"])
def test_settings_that_would_take_the_broker_off_the_kits_clock_are_refused(setting: str) -> None:
    """clock= was taken: the broker's timers then ran on a clock advance() never moves."""
    with pytest.raises(TypeError, match=f"takes no {setting}"):
        MemoryBroker(**{setting: Clock() if setting != "endpoints" else []})

"""How a node reaches Redis: a password, TLS with the server's certificate checked, and the master
a Sentinel names. Real redis-server (and Sentinel) processes, two nodes each, a message between
them; and the refusals when the password or the certificate is wrong."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from cluster_helpers import HEARTBEAT, wait_until
from conftest import ROOT, BrokerProcess, free_port, wait_for_port
from paho_helpers import PahoClient
from redis_helpers import redis_server

from mqtt_broker.cluster.address import RedisAddress
from mqtt_broker.cluster.redis import RECONNECT_MAX_DELAY, SENTINEL_DISCOVERY_TIMEOUT, Redis


class Server:
    """redis-server (or ``--sentinel``) with the given options, in a directory of its own."""

    def __init__(self, *options: str, sentinel_conf: str | None = None, tls: bool = False) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="mqttbroker-redis-"))
        server = redis_server()
        assert server is not None
        if sentinel_conf is not None:
            conf = self.directory / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\n{sentinel_conf}")
            command = [server, str(conf), "--sentinel"]
        else:
            command = [server, "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                       "--appendonly", "no", *options]
            command += ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.log = open(self.directory / "server.log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def node(url: str, node_id: str, *args: str) -> BrokerProcess:
    return BrokerProcess("--cluster", url, "--cluster-node-id", node_id, "--cluster-heartbeat", HEARTBEAT, *args)


def joined(broker: BrokerProcess) -> bool:
    return "joined through Redis" in broker.output()


def across(a: BrokerProcess, b: BrokerProcess) -> None:
    """A QoS 1 message from a client of ``a`` reaches a client of ``b``."""
    wait_until(lambda: joined(a) and joined(b), "both nodes to join")
    subscriber = PahoClient(b.port, "across-sub")
    publisher = PahoClient(a.port, "across-pub")
    try:
        subscriber.subscribe("across/#", 1)
        for _ in range(100):  # the route reaches a by the control channel
            publisher.publish("across/x", b"over", qos=1)
            if not subscriber.no_message(0.1):
                return
        raise AssertionError("nothing crossed between the nodes")
    finally:
        subscriber.close()
        publisher.close()


@pytest.fixture
def stop_after() -> Iterator[list[object]]:
    started: list[object] = []
    yield started
    for thing in reversed(started):
        thing.stop() if isinstance(thing, BrokerProcess) else thing.close()  # type: ignore[attr-defined]


def test_a_password_in_the_url(stop_after: list[object]) -> None:
    redis = Server("--requirepass", "s3cret")
    stop_after.append(redis)
    a = node(f"redis://:s3cret@127.0.0.1:{redis.port}/2", "pw-a")
    b = node(f"redis://:s3cret@127.0.0.1:{redis.port}/2", "pw-b")
    stop_after += [a, b]
    across(a, b)
    wrong = node(f"redis://:wrong@127.0.0.1:{redis.port}/2", "pw-wrong")
    stop_after.append(wrong)
    wait_until(lambda: "has not reached Redis" in wrong.output(), "the warning that it cannot reach Redis",
               timeout=20)
    assert not joined(wrong)


def test_tls_with_the_server_certificate_checked(stop_after: list[object], tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "certs" / "make-certs.sh"), str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    redis = Server("--tls-cert-file", str(tmp_path / "server.pem"), "--tls-key-file", str(tmp_path / "server.key"),
                   "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no", tls=True)
    stop_after.append(redis)
    url = f"rediss://localhost:{redis.port}/0"
    a = node(url, "tls-a", "--cluster-tls-ca-file", str(tmp_path / "ca.pem"))
    b = node(url, "tls-b", "--cluster-tls-ca-file", str(tmp_path / "ca.pem"))
    stop_after += [a, b]
    across(a, b)
    untrusted = node(url, "tls-untrusted")  # the platform's CAs do not know this one
    stop_after.append(untrusted)
    wait_until(lambda: "has not reached Redis" in untrusted.output(), "the warning that it cannot reach Redis",
               timeout=20)
    assert not joined(untrusted)


def test_tls_trusts_every_ca_of_cluster_tls_ca_file(stop_after: list[object], tmp_path: Path) -> None:
    for directory in ("ours", "other"):
        result = subprocess.run(["bash", str(ROOT / "certs" / "make-certs.sh"), str(tmp_path / directory)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    ours = tmp_path / "ours"
    redis = Server("--tls-cert-file", str(ours / "server.pem"), "--tls-key-file", str(ours / "server.key"),
                   "--tls-ca-cert-file", str(ours / "ca.pem"), "--tls-auth-clients", "no", tls=True)
    stop_after.append(redis)
    bundle = tmp_path / "bundle.pem"  # the CA of Redis's certificate second
    bundle.write_bytes((tmp_path / "other" / "ca.pem").read_bytes() + (ours / "ca.pem").read_bytes())
    broker = node(f"rediss://localhost:{redis.port}/0", "tls-bundle", "--cluster-tls-ca-file", str(bundle))
    stop_after.append(broker)
    wait_until(lambda: joined(broker), "the node to join")


def test_the_master_a_sentinel_names(stop_after: list[object]) -> None:
    redis = Server()
    stop_after.append(redis)
    sentinel = Server(sentinel_conf=f"sentinel monitor mymaster 127.0.0.1 {redis.port} 1\n"
                                    "sentinel down-after-milliseconds mymaster 5000\n")
    stop_after.append(sentinel)
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
    a = node(url, "sentinel-a")
    b = node(url, "sentinel-b")
    stop_after += [a, b]
    across(a, b)


@pytest_twisted.inlineCallbacks
def test_the_sentinels_are_asked_again_within_the_back_off() -> Iterator[Deferred[Any]]:
    """txredisapi waits up to 10 s for a Sentinel to name a master that is up: a node that asked
    while the old master was down stayed off Redis that long after the Sentinels had named the
    new one (11.4 s measured after a master was killed, against three Sentinels). A round of
    asking is bounded by less than the reconnection back-off."""
    link = Redis(RedisAddress.parse(f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/mymaster/0"))
    try:
        assert link._sentinel.discovery_timeout == SENTINEL_DISCOVERY_TIMEOUT < RECONNECT_MAX_DELAY
        # The connections to the Sentinels themselves: txredisapi's back off up to 10 s.
        assert [handler._factory.maxDelay for handler in link._sentinel.sentinels] == [RECONNECT_MAX_DELAY] * 2
    finally:
        yield link.close()


def test_clusters_on_two_databases_of_one_redis_share_nothing(stop_after: list[object]) -> None:
    """Two clusters on one Redis, one on database 0 and one on database 1, a node each. Pub/sub
    ignores the database: each cluster heard the other's events, and its nodes sent the other's
    QoS 0 messages to their subscribers, kept its retained messages, and wrote QoS 1 messages for
    its nodes into inboxes of their own database that nobody reads."""
    import redis

    server = Server()
    stop_after.append(server)
    x = node(f"redis://127.0.0.1:{server.port}/0", "x")
    y = node(f"redis://127.0.0.1:{server.port}/1", "y")
    stop_after += [x, y]
    wait_until(lambda: joined(x) and joined(y), "both nodes to join")
    on_y = PahoClient(y.port, "on-y")
    stop_after.append(on_y)
    on_y.subscribe("tenant/#", 1)
    wait_until(lambda: redis.Redis(port=server.port, db=1).hexists("mqtt:routes:y", "tenant/#"),
               "y's filter to be in its database (its event sent)")
    on_x = PahoClient(x.port, "on-x")
    stop_after.append(on_x)
    on_x.publish("tenant/live", b"at QoS 0", qos=0)
    on_x.publish("tenant/live", b"at QoS 1", qos=1)  # (acknowledged: whatever x wrote for it is in Redis)
    on_x.publish("tenant/kept", b"retained", qos=1, retain=True)
    assert on_y.no_message(1.0)
    assert not redis.Redis(port=server.port, db=0).exists("mqtt:inbox:y")
    late = PahoClient(y.port, "late-on-y")
    stop_after.append(late)
    late.subscribe("tenant/#", 0)
    assert late.no_message(0.5), "y keeps x's retained message"


def test_a_master_turned_replica_is_left_for_the_one_the_sentinels_name(stop_after: list[object]) -> None:
    """A switchover that leaves the old master's clients connected: every write is refused
    READONLY. The node retried its batches there for ever (logging each second that writing
    worked again); it leaves the connection and asks the Sentinels, as redis-py's client does."""
    import redis

    master = Server()
    replica = Server("--replicaof", "127.0.0.1", str(master.port))
    stop_after += [master, replica]
    wait_until(lambda: redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up",
               "the replica to sync")
    sentinel = Server(sentinel_conf=f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
                                    "sentinel down-after-milliseconds mymaster 5000\n")
    stop_after.append(sentinel)
    a = node(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0", "readonly-a")
    stop_after.append(a)
    wait_until(lambda: joined(a), "the node to join")
    publisher = PahoClient(a.port, "readonly-pub")
    try:
        publisher.publish("t/x", b"before", qos=1)  # (acknowledged once stored)
        redis.Redis(port=replica.port).execute_command("REPLICAOF", "NO", "ONE")
        redis.Redis(port=master.port).execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
        told = redis.Redis(port=sentinel.port)
        told.execute_command("SENTINEL", "REMOVE", "mymaster")
        told.execute_command("SENTINEL", "MONITOR", "mymaster", "127.0.0.1", str(replica.port), "1")
        publisher.publish("t/x", b"after", qos=1)  # (PahoClient waits, bounded, for its PUBACK)
    finally:
        publisher.close()


# --- what Redis failing does to a node (in this process) ----------------------------------------

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.defer import inlineCallbacks  # noqa: E402
from twisted.internet.task import Clock, deferLater  # noqa: E402
from twisted.logger import capturedLogs  # noqa: E402

from mqtt_broker import BrokerService  # noqa: E402
from mqtt_broker.config import BrokerConfig, ConfigError  # noqa: E402
from redis_helpers import RedisServer  # noqa: E402


@inlineCallbacks
def until(condition: Any, what: str, clock: Clock | None = None, rounds: int = 300) -> Any:
    """Bounded wait for real Redis answers; the Clock, if any, moves a second a round, for the
    retries it drives."""
    for _ in range(rounds):
        if condition():
            return
        if clock is not None:
            clock.advance(1.0)
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


def node_on(server: RedisServer, clock: Clock) -> BrokerService:
    return BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=server.url, cluster_node_id="a",
                         close_linger=0)


@inlineCallbacks
def joining_out_of_memory(server: RedisServer, clock: Clock) -> Any:
    """Node a started on a Redis that refuses every write that may take memory (OOM), once its
    join has met that answer."""
    server.client().config_set("maxmemory", "1")
    broker = node_on(server, clock)
    with capturedLogs() as events:
        broker.startService()
        yield until(lambda: any("could not join" in (e.get("log_format") or "") for e in events),
                    "the join to meet the OOM answer")
    return broker


@pytest_twisted.inlineCallbacks
def test_a_join_that_meets_a_redis_error_is_tried_again(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Redis answered the join with an error (OOM here; a restarted Redis loading its files
    answers LOADING, a connection may be lost): the failure was logged and nothing tried again,
    while a warning every 5 s said "still trying"."""
    admin = server.client()
    clock = Clock()
    broker = yield joining_out_of_memory(server, clock)
    try:
        admin.config_set("maxmemory", "0")
        yield until(lambda: broker.cluster.ready.called, "the node to join once Redis writes again", clock)
    finally:
        admin.config_set("maxmemory", "0")
        yield broker.stopService()
    assert [call.func for call in clock.getDelayedCalls()] == []  # (the join warning's timer too)


@pytest_twisted.inlineCallbacks
def test_a_connection_refused_at_its_auth_is_tried_again() -> Iterator[Deferred[Any]]:
    """Redis answered a new connection's AUTH with an error ("max number of clients reached";
    a connection lost before the answer does the same): txredisapi gave the connection up for
    good, and the node never reached Redis again however soon it had room."""
    import redis as redis_py
    server = Server("--requirepass", "pw", "--maxclients", "2")
    occupants = [redis_py.Redis(port=server.port, password="pw") for _ in range(2)]
    for occupant in occupants:
        occupant.ping()  # the two connections Redis takes
    ups: list[None] = []
    link = Redis(RedisAddress.parse(f"redis://:pw@127.0.0.1:{server.port}/0"), on_up=lambda: ups.append(None))
    try:
        yield until(lambda: int(occupants[0].info("stats")["rejected_connections"]) >= 4, "connections refused")
        for occupant in occupants:
            occupant.close()  # room again
        yield until(lambda: ups, "the node to reconnect once Redis has room", rounds=600)
        assert (yield link.call("PING")) == b"PONG"
    finally:
        yield link.close()
        server.close()


@pytest_twisted.inlineCallbacks
def test_a_blocking_read_on_a_connection_that_never_answers_times_out(
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Deferred[Any]]:
    """The inbox is read with XREADGROUP ... BLOCK on a connection of its own, which had no reply
    timer: a connection whose other end went without a word (a host power-cycled, a NAT that
    forgot it) was waited on for good, and the node never read its inbox again while it kept
    beating (so no other node took it for dead)."""
    import txredisapi
    from twisted.internet.protocol import Factory, Protocol

    from mqtt_broker.cluster.redis import READ_BLOCK
    clock = Clock()
    monkeypatch.setattr(txredisapi.RedisProtocol, "callLater", clock.callLater)  # (its reply timers)
    listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # accepts, never answers
    link = Redis(RedisAddress.parse(f"redis://127.0.0.1:{listening.getHost().port}/0"), reply_timeout=5.0)
    try:
        yield until(lambda: len(link.commands.pool) == 1 and len(link.reader.pool) == 1, "both connections")
        read = link.read("XREADGROUP", "GROUP", "nodes", "a", "COUNT", 100, "BLOCK", int(READ_BLOCK * 1000),
                         "STREAMS", "mqtt:inbox:a", ">")
        failed: list[Any] = []
        read.addErrback(failed.append)
        clock.advance(READ_BLOCK + 4.9)
        assert not read.called
        clock.advance(0.2)
        assert failed and "Not received Redis response" in str(failed[0].value)
    finally:
        yield link.close()
        yield listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_subscribed_connection_gone_without_a_word_is_found_by_the_heartbeat_and_made_again(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deferred[Any]]:
    """The connection subscribed to the control channel only listens: gone without a word (a NAT
    that forgot it, a Redis host power-cycled), nothing found it, and the node missed every route
    and retained change from then on (a message for a filter subscribed on another node since
    was not forwarded there). Each heartbeat pings it, under the reply timer."""
    import txredisapi
    from twisted.protocols import portforward

    clock = Clock()
    monkeypatch.setattr(txredisapi.RedisProtocol, "callLater", clock.callLater)  # (its reply timers)
    relays: list[Any] = []

    class Relay(portforward.ProxyServer):
        def connectionMade(self) -> None:
            relays.append(self)
            super().connectionMade()

        def dataReceived(self, data: bytes) -> None:
            if self.peer is not None:  # (cut: the node's side hears nothing from now on)
                super().dataReceived(data)

    relay = portforward.ProxyFactory("127.0.0.1", server.port)
    relay.protocol = Relay
    listening = reactor.listenTCP(0, relay, interface="127.0.0.1")
    broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster_node_id="a", close_linger=0,
                           cluster=f"redis://127.0.0.1:{listening.getHost().port}/0")
    broker.startService()
    admin = server.client()

    def listeners() -> int:
        return int(admin.pubsub_numsub("mqtt:control")[0][1])
    try:
        yield broker.cluster.ready
        subscribed = broker.cluster.redis._subscriber.pool
        clock.advance(1.0)  # a heartbeat, its ping answered: the connection stays
        assert any(p.replyQueue.waiting for p in subscribed)
        yield until(lambda: not any(p.replyQueue.waiting for p in subscribed), "the ping to be answered")
        clock.advance(30.1)
        assert (len(relays), listeners()) == (3, 1)
        for cut in relays:  # Redis sees the node's connections close; the node sees nothing
            upstream, cut.peer = cut.peer, None
            if upstream is not None:
                upstream.peer = None
                upstream.transport.unregisterProducer()  # (or closing it stops its producer: the node's side)
                upstream.transport.abortConnection()
        yield until(lambda: listeners() == 0, "Redis to see the subscriber go")
        clock.advance(1.0)  # a heartbeat
        clock.advance(30.1)  # the reply timeout: the connections are made again, through the relay
        yield until(lambda: listeners() == 1, "the node to listen to the control channel again")
    finally:
        yield broker.stopService()
        yield listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_node_sends_redis_nothing_for_the_note_a_disk_store_keeps_that_the_broker_lives(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    """The broker notes to a store that keeps it (SQLite's ``alive(now)``) that it lives, every
    ALIVE_EVERY, finding the method by its name: it found the Redis store's ``alive(node)`` and
    asked Redis each minute whether a node named after the clock was alive, a Deferred nothing
    waited on (a reply timeout was logged as an unhandled error)."""
    from mqtt_broker.broker import ALIVE_EVERY
    clock = Clock()
    broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=server.url, cluster_node_id="a",
                           close_linger=0, sys_interval=0)  # (the $SYS figures count the live nodes)
    broker.startService()
    admin = server.client()

    def asked() -> int:
        return int(admin.info("commandstats").get("cmdstat_exists", {}).get("calls", 0))
    try:
        yield broker.cluster.ready
        broker.cluster.survivor.stop()  # (its heartbeats ask whether the members are alive)
        before = asked()
        clock.advance(ALIVE_EVERY)
        yield broker.cluster.redis.call("PING")  # (answered after whatever was sent before it)
        assert asked() == before
    finally:
        yield broker.stopService()


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:70000/0", "redis://127.0.0.1:0/0", "redis://127.0.0.1:-1/0", "redis://127.0.0.1:6379/-1",
    "redis://127.0.0.1:6379/0?password=secret", "redis://127.0.0.1:6379/0#x"])
def test_a_cluster_url_the_broker_cannot_use_is_refused(url: str) -> None:
    """A port outside 1-65535, a negative database, and a query (silently dropped: no password
    sent) passed the check; the node then only warned every 5 s that it had not reached Redis."""
    with pytest.raises(ConfigError) as caught:
        BrokerConfig(cluster=url)
    assert "secret" not in str(caught.value)


@pytest_twisted.inlineCallbacks
def test_a_connect_after_the_scripts_are_flushed_is_not_refused(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Redis forgot the node's scripts under a connection that stayed up (SCRIPT FLUSH, a
    failover to a replica that never loaded them): the claim's NOSCRIPT answer refused the
    client with 0x88 from a node whose Redis answers."""
    from protocol_helpers import FakeClient

    from mqtt_broker.wire import Connack, Connect
    broker = node_on(server, Clock())
    broker.startService()
    try:
        yield broker.cluster.ready
        first = FakeClient(broker, 5)
        first.send(Connect(protocol_level=5, client_id="first"))  # (the claim's script is known now)
        yield until(lambda: first.transport.value(), "the first CONNACK")
        server.client().script_flush()
        client = FakeClient(broker, 5)
        client.send(Connect(protocol_level=5, client_id="c"))
        got: list[Any] = []
        yield until(lambda: got.extend(client.received()) or got, "the CONNACK")
        assert [p.reason_code for p in got if isinstance(p, Connack)] == [0]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_writes_refused_for_a_while_are_warned_of_once(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Redis refused the node's writes (OOM) and answered its reads: each read of the batch marker
    was taken for "writing to Redis works again", then the batch failed again, and both lines came
    every second for as long as it lasted."""
    clock = Clock()
    broker = node_on(server, clock)
    broker.startService()
    admin = server.client()
    try:
        yield broker.cluster.ready
        with capturedLogs() as events:
            def said(text: str) -> int:
                return sum(text in (e.get("log_format") or "") for e in events)
            def scripts_run() -> int:
                return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
            admin.config_set("maxmemory", "1")
            before = scripts_run()
            broker.store.route("x/#", True)
            written = broker.store.flushed()
            # (The store tries again a second after each failure, on its reactor: a real one.)
            yield until(lambda: scripts_run() >= before + 3, "the batch to be tried three times", rounds=600)
            assert not written.called and (said("failed"), said("works again")) == (1, 0)
            admin.config_set("maxmemory", "0")
            yield until(lambda: written.called, "the batch to be written", rounds=500)
        assert (said("failed"), said("works again")) == (1, 1)
    finally:
        admin.config_set("maxmemory", "0")
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_stopped_while_its_join_waits_to_be_tried_again_leaves_no_timer(
        server: RedisServer) -> Iterator[Deferred[Any]]:
    admin = server.client()
    clock = Clock()
    broker = yield joining_out_of_memory(server, clock)
    try:
        yield broker.stopService()
        assert [call.func for call in clock.getDelayedCalls()] == []
    finally:
        admin.config_set("maxmemory", "0")


@pytest_twisted.inlineCallbacks
def test_a_join_answered_after_the_stop_goes_no_further(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Its last step answered after stop() (the adoption of its own sessions here), the join went
    on: heartbeats for good from a node that had left, and ready fired."""
    clock = Clock()
    broker = node_on(server, clock)
    cluster = broker.cluster
    adopting: Deferred[None] = Deferred()
    asked: list[str] = []

    def adopt(dead: str) -> Deferred[None]:  # (the adoption under way)
        asked.append(dead)
        return adopting
    cluster.survivor.adopt = adopt  # type: ignore[method-assign]
    try:
        broker.startService()
        yield until(lambda: cluster._listening.called and bool(asked), "the join to reach the adoption")
        yield broker.stopService()
        adopting.callback(None)
        assert not cluster.survivor._heartbeat.running and not cluster.ready.called
        assert [call.func for call in clock.getDelayedCalls()] == []
    finally:
        cluster.survivor.stop()


class _Silent(Protocol):
    """A Redis that takes connections and never answers (a stopped process, a hung host)."""

    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]


@pytest_twisted.inlineCallbacks
def test_a_redis_that_never_answers_is_not_taken_for_up() -> Iterator[Deferred[Any]]:
    """docs/cluster.md: one warning per outage. A connection was counted as Redis being up as soon
    as it was made: one that answers nothing was "back" at each connection and "unreachable" again
    at each reply timeout that dropped it."""
    factory = Factory.forProtocol(_Silent)
    factory.accepted = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    events: list[str] = []
    link = Redis(RedisAddress.parse(f"redis://127.0.0.1:{port.getHost().port}/0"), on_up=lambda: events.append("up"),
                 on_down=lambda: events.append("down"), reply_timeout=0.2)
    try:
        for _ in range(3):  # commands sent, each unanswered until its timer drops the connection
            link.call("PING").addErrback(lambda _: None)
        yield until(lambda: factory.accepted >= 2, "the connection dropped and made again")  # type: ignore[attr-defined]
        assert events == [] and not link.up
    finally:
        yield link.close()
        yield port.stopListening()

"""The cluster seen from outside: $SYS, /metrics and the admin API of cluster nodes.

End to end: two broker processes on one real redis-server, each with its admin site, real paho
clients. In this process: a node on a Clock (its $SYS updates and the inbox lag read from Redis
between them), the API's answers from a stand-in cluster (Redis slow: 503), and a broker of its
own, which shows none of it and imports nothing of the cluster.
"""

from __future__ import annotations

import json
import signal
from io import BytesIO
import subprocess
import sys
import urllib.parse
from typing import Any, Iterator

import pytest
import pytest_twisted
from admin_http import KEY, Admin
from cluster_helpers import Cluster, reachable, wait_until
from conftest import free_port, wait_for_port
from openapi_spec_validator import validate
from paho_helpers import PahoClient
from prometheus_client.parser import text_string_to_metric_families
from protocol_helpers import FakeClient, make_broker
from redis_helpers import RedisServer
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mqtt_broker import BrokerService
from mqtt_broker.admin import metrics
from mqtt_broker.admin.api import REDIS_TIMEOUT, ApiResource
from mqtt_broker.admin.figures import InboxLag
from mqtt_broker.admin.keys import hash_key
from mqtt_broker.wire import Connect, Subscribe, SubscriptionRequest

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CLUSTER_TOPICS = {"cluster/node", "cluster/nodes", "cluster/messages/forwarded/sent",
                  "cluster/messages/forwarded/received", "cluster/messages/redirected", "cluster/sessions/adopted",
                  "cluster/inbox/lag"}
CLUSTER_FAMILIES = {"mqtt_cluster_nodes", "mqtt_cluster_forwarded", "mqtt_cluster_redirected", "mqtt_cluster_claims",
                    "mqtt_cluster_adopted", "mqtt_cluster_inbox_lag", "mqtt_cluster_redis_seconds"}


def sys_values(broker: BrokerService) -> dict[str, str]:
    return {m.topic.removeprefix("$SYS/broker/"): m.payload.decode() for m in broker.retained.match("$SYS/#")}


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(text: str) -> Samples:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_in_process(broker: BrokerService) -> str:
    body, _ = metrics.render(metrics.registry(broker, broker.operations))
    return body.decode()


def api_call(broker: BrokerService, path: str, key: str | None = KEY) -> tuple[int, Any, DummyRequest]:
    """GET ``path`` of the admin API in this process. Returns (status, parsed body or None while
    the answer is not written yet, the request)."""
    api = ApiResource(broker, broker.operations)
    request = DummyRequest([b""])
    request.path = path.encode()
    if key is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {key}".encode()])
    body = api.render(request)
    if isinstance(body, bytes):
        return request.responseCode or 200, json.loads(body), request
    written = b"".join(request.written)
    return request.responseCode or 200, json.loads(written) if request.finished else None, request


def answer_of(request: DummyRequest) -> tuple[int, Any]:
    assert request.finished
    return request.responseCode or 200, json.loads(b"".join(request.written))


# --- end to end: two nodes with their admin sites -------------------------------------------------

@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[Cluster, dict[str, Admin]]]:
    cluster = Cluster()
    admins: dict[str, Admin] = {}
    try:
        for node_id in ("a", "b"):
            http_port = free_port()
            node = cluster.add(node_id, "--http", f"tcp:{http_port}:interface=127.0.0.1",
                               "--http-api-key", "ci:" + hash_key(KEY), "--sys-interval", "0.5")
            wait_for_port(http_port, node.process)
            admins[node_id] = Admin(node, http_port)
        for admin in admins.values():
            wait_until(lambda: scrape(admin).get(("mqtt_cluster_nodes", ())) == 2, "each node to know the other")
        yield cluster, admins
    finally:
        cluster.close()


def scrape(admin: Admin) -> Samples:
    answer = admin.call("GET", "/metrics", key=None)
    assert answer.status == 200
    return samples(answer.body.decode())


def settled(cluster: Cluster, node: str, topic_filter: str) -> None:
    wait_until(lambda: topic_filter in cluster.routes(node), f"{node} to hold {topic_filter} in Redis")


class SysWatcher:
    """A subscriber to a node's $SYS/broker/cluster/... topics, keeping the last value of each."""

    def __init__(self, port: int, client_id: str, topic_filter: str = "$SYS/broker/cluster/#") -> None:
        self.client = PahoClient(port, client_id)
        self.client.subscribe(topic_filter)
        self.received: list[tuple[str, str]] = []

    def values(self) -> dict[str, str]:
        for _ in range(10_000):  # bounded: what has arrived so far
            if self.client.messages.empty():
                break
            message = self.client.messages.get_nowait()
            self.received.append((message.topic.removeprefix("$SYS/broker/"), message.payload.decode()))
        return dict(self.received)

    def seen(self, topic: str, payload: str) -> bool:
        self.values()
        return (topic, payload) in self.received

    def close(self) -> None:
        self.client.close()


def test_sys_topics_of_a_node_reach_its_subscribers(nodes: tuple[Cluster, dict[str, Admin]]) -> None:
    cluster, admins = nodes
    watcher = SysWatcher(cluster["a"].port, "sys-watcher-a")
    subscriber = PahoClient(cluster["b"].port, "sys-sub-b")
    publisher = PahoClient(cluster["a"].port, "sys-pub-a")
    try:
        wait_until(lambda: CLUSTER_TOPICS <= set(watcher.values()), "every cluster topic of node a")
        # (the retained value may be from before b joined: the next update says 2)
        wait_until(lambda: watcher.values()["cluster/nodes"] == "2", "node a to count two nodes")
        values = watcher.values()
        assert values["cluster/node"] == "a"
        assert int(values["cluster/inbox/lag"]) >= 0
        assert values["cluster/sessions/adopted"] == "0" and values["cluster/messages/redirected"] == "0"
        subscriber.subscribe("sysfwd/#", 1)
        reachable(publisher, [subscriber], "sysfwd/probe")  # (probes are forwarded too)
        sent = admins["a"].call("GET", "/api/v1/stats").body["cluster"]["forwarded_out"]
        for n in range(3):
            publisher.publish(f"sysfwd/{n}", b"x", qos=1)
        for _ in range(3):
            assert subscriber.message().topic.startswith("sysfwd/")
        wait_until(lambda: int(watcher.values()["cluster/messages/forwarded/sent"]) == sent + 3,
                   "node a's $SYS to count the three messages it forwarded")
    finally:
        for client in (watcher, subscriber, publisher):
            client.close()


def test_a_nodes_sys_topics_stay_on_that_node(nodes: tuple[Cluster, dict[str, Admin]]) -> None:
    """Every node publishes the same $SYS names: one node's values are never forwarded to another's
    subscribers (nor counted as forwarded)."""
    cluster, admins = nodes
    topic = "$SYS/broker/cluster/messages/forwarded/sent"
    name = "cluster/messages/forwarded/sent"
    on_a = SysWatcher(cluster["a"].port, "own-sys-a", topic)
    on_b = SysWatcher(cluster["b"].port, "own-sys-b", topic)
    on_b.client.subscribe("ownsys/#", 0)
    target = PahoClient(cluster["b"].port, "own-sys-target")
    publisher = PahoClient(cluster["a"].port, "own-sys-pub")
    try:
        target.subscribe("ownfwd/#", 1)
        for topic_filter in ("ownfwd/#", "ownsys/#", topic):
            settled(cluster, "b", topic_filter)
        reachable(publisher, [target], "ownfwd/probe")
        wait_until(lambda: name in on_a.values(), "node a's own value")
        a_before = int(on_a.values()[name])
        publisher.publish("ownfwd/1", b"x", qos=1)   # a forwards one more message: its value changes
        target.message()
        wait_until(lambda: int(on_a.values()[name]) > a_before, "node a to publish its new value")
        # A QoS 0 message from a to b's watcher, after a's $SYS update: forwarded QoS 0 messages
        # arrive in order, so anything of a's $SYS sent to b would have come before it.
        for _ in range(150):  # (until node a knows b's route for it)
            publisher.publish("ownsys/fence", b"fence", qos=0)
            if on_b.seen("ownsys/fence", "fence") or wait_for_fence(on_b):
                break
        assert on_b.seen("ownsys/fence", "fence")
        b_out = scrape(admins["b"])[("mqtt_cluster_forwarded_total", (("direction", "out"),))]
        assert {value for got, value in on_b.received if got == name} == {str(int(b_out))}
    finally:
        for client in (on_a, on_b, target, publisher):
            client.close()


def wait_for_fence(watcher: SysWatcher) -> bool:
    try:
        wait_until(lambda: watcher.seen("ownsys/fence", "fence"), "the fence", timeout=0.1)
    except AssertionError:
        return False
    return True


def test_metrics_after_a_cross_node_message(nodes: tuple[Cluster, dict[str, Admin]]) -> None:
    cluster, admins = nodes
    subscriber = PahoClient(cluster["b"].port, "metrics-sub-b")
    publisher = PahoClient(cluster["a"].port, "metrics-pub-a")
    try:
        subscriber.subscribe("metricsfwd/#", 1)
        reachable(publisher, [subscriber], "metricsfwd/probe")
        a_before, b_before = scrape(admins["a"]), scrape(admins["b"])
        for n in range(4):
            publisher.publish(f"metricsfwd/{n}", b"x", qos=1)
        for n in range(2):
            publisher.publish(f"metricsfwd/qos0/{n}", b"x", qos=0)
        for _ in range(6):
            subscriber.message()
    finally:
        subscriber.close()
        publisher.close()
    out = ("mqtt_cluster_forwarded_total", (("direction", "out"),))
    into = ("mqtt_cluster_forwarded_total", (("direction", "in"),))
    a, b = scrape(admins["a"]), scrape(admins["b"])
    assert a[out] - a_before[out] == 6 and a[into] == a_before[into]
    assert b[into] - b_before[into] == 6 and b[out] == b_before[out]
    # What a node's clients published: messages forwarded in are not b's clients' PUBLISHes.
    received = [("mqtt_messages_received_total", (("qos", str(qos)),)) for qos in range(3)]
    assert [a[key] - a_before[key] for key in received] == [2, 4, 0]
    assert [b[key] - b_before[key] for key in received] == [0, 0, 0]
    for node in (a, b):
        assert node[("mqtt_cluster_nodes", ())] == 2
        assert node[("mqtt_cluster_claims_total", ())] >= 1
        assert node[("mqtt_cluster_adopted_total", ())] == 0
        assert node[("mqtt_cluster_redirected_total", ())] == 0
        assert node[("mqtt_cluster_inbox_lag", ())] >= 0
        assert node[("mqtt_cluster_redis_seconds_count", ())] >= 1
        assert 0 < node[("mqtt_cluster_redis_seconds_sum", ())] < node[("mqtt_cluster_redis_seconds_count", ())] * 5
        assert ("mqtt_store_commit_seconds_count", ()) not in node   # the store is Redis: named for it
    text = admins["a"].call("GET", "/metrics", key=None).body.decode()
    found = families(text)
    assert found["mqtt_cluster_nodes"].type == "gauge" and found["mqtt_cluster_inbox_lag"].type == "gauge"
    assert found["mqtt_cluster_forwarded"].type == "counter" and found["mqtt_cluster_redis_seconds"].type == "histogram"
    assert CLUSTER_FAMILIES <= set(found)


def test_api_cluster_nodes(nodes: tuple[Cluster, dict[str, Admin]]) -> None:
    cluster, admins = nodes
    client = PahoClient(cluster["b"].port, "nodes-api-b")
    try:
        client.subscribe("nodesapi/+/x", 1)
        settled(cluster, "b", "nodesapi/+/x")
        answer = admins["a"].call("GET", "/api/v1/cluster/nodes")
        assert answer.status == 200 and answer.body["node"] == "a"
        described = {node["id"]: node for node in answer.body["nodes"]}
        assert set(described) == {"a", "b"}
        assert all(node["alive"] for node in described.values())
        assert described["b"]["clients"] >= 1 and described["b"]["filters"] >= 1
        for node in described.values():
            assert set(node["inbox"]) == {"length", "unread", "unhandled"}
            assert all(isinstance(count, int) and count >= 0 for count in node["inbox"].values())
        assert admins["b"].call("GET", "/api/v1/cluster/nodes").body["node"] == "b"
        missing = admins["a"].call("GET", "/api/v1/cluster/nodes", key=None)
        assert missing.status == 401 and "API key" in missing.body["error"]
        stats = admins["a"].call("GET", "/api/v1/stats").body
        assert stats["cluster"]["node"] == "a" and stats["cluster"]["nodes"] == 2
    finally:
        client.close()


def test_api_locates_a_client_on_any_node(nodes: tuple[Cluster, dict[str, Admin]]) -> None:
    cluster, admins = nodes
    client = PahoClient(cluster["b"].port, "where/am-i", clean=False)   # a slash: percent-encoded
    path = "/api/v1/cluster/clients/" + urllib.parse.quote("where/am-i", safe="")
    try:
        from_a = admins["a"].call("GET", path)
        assert from_a.status == 200
        assert from_a.body["client_id"] == "where/am-i" and from_a.body["node"] == "b"
        assert from_a.body["connected_here"] is False
        assert isinstance(from_a.body["epoch"], int) and from_a.body["epoch"] > 0
        from_b = admins["b"].call("GET", path)
        assert from_b.body == {**from_a.body, "connected_here": True}
    finally:
        client.close()
    # Connected again on the other node: the session moves there, at a higher epoch.
    moved = PahoClient(cluster["a"].port, "where/am-i", clean=False)
    try:
        again = admins["b"].call("GET", path)
        assert again.body["node"] == "a" and again.body["epoch"] > from_a.body["epoch"]
        assert again.body["connected_here"] is False
        assert admins["a"].call("GET", path).body["connected_here"] is True
    finally:
        moved.close()
    nobody = admins["a"].call("GET", "/api/v1/cluster/clients/nobody-has-this-one")
    assert nobody.status == 404 and "nobody-has-this-one" in nobody.body["error"]
    assert admins["a"].call("GET", path, key=None).status == 401


def test_a_session_that_moved_is_not_shown_or_changed_by_its_old_node(nodes: tuple[Cluster, dict[str, Admin]]) -> None:
    """The copy a node keeps of a session another node claimed (for what is still routed to it,
    until the routes settle: 13 s by default) is not its client: its API answered for it, took a
    subscription that then went nowhere, and its figures counted it beside the new owner's."""
    cluster, admins = nodes
    first = PahoClient(cluster["b"].port, "moved-away", clean=False)
    first.subscribe("movedaway/#", 1)
    first.close()
    settled(cluster, "b", "movedaway/#")
    before = admins["b"].call("GET", "/api/v1/stats").body
    moved = PahoClient(cluster["a"].port, "moved-away", clean=False)
    try:
        assert moved.flags.session_present
        b = admins["b"]
        wait_until(lambda: b.call("GET", "/api/v1/clients/moved-away").status == 404,
                   "b to stop answering for the session it gave up", 3)
        assert "on another node" in b.call("GET", "/api/v1/clients/moved-away").body["error"]
        added = b.call("POST", "/api/v1/clients/moved-away/subscriptions", {"topic_filter": "adminsub/#", "qos": 1})
        assert added.status == 404
        assert "moved-away" not in [c["client_id"] for c in b.call("GET", "/api/v1/clients").body["items"]]
        assert b.call("GET", "/api/v1/subscriptions?q=movedaway").body["items"] == []
        stats = b.call("GET", "/api/v1/stats").body
        assert stats["clients_disconnected"] == before["clients_disconnected"] - 1
        assert stats["subscriptions"] == before["subscriptions"] - 1
        a = admins["a"].call("GET", "/api/v1/clients/moved-away")
        assert a.status == 200 and a.body["connected"] is True
    finally:
        moved.close()


def test_openapi_document_of_a_node_is_valid(nodes: tuple[Cluster, dict[str, Admin]]) -> None:
    cluster, admins = nodes
    document = admins["a"].call("GET", "/api/v1/openapi.json", key=None).body
    validate(document)
    assert {"/cluster/nodes", "/cluster/clients/{client_id}"} <= set(document["paths"])


# --- a node in this process, on a Clock --------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest_twisted.inlineCallbacks
def test_a_node_is_ready_once_it_has_joined(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Before, it answers new clients only once Redis has: a probe must not send them there."""
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, cluster=server.url,
                           cluster_node_id="prober", sys_interval=0, close_linger=0)
    broker.startService()
    try:
        status, body, _ = api_call(broker, "/api/v1/ready", key=None)
        assert (status, body) == (503, {"ready": False, "reason": "the cluster node has not joined yet (Redis not reached)"})
        yield broker.cluster.ready
        status, body, _ = api_call(broker, "/api/v1/ready", key=None)
        assert (status, body) == (200, {"ready": True, "listening": 1})
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_in_process_reports_without_waiting_for_redis(server: RedisServer) -> Iterator[Deferred[Any]]:
    server.client().flushall()
    clock = Clock()
    clock.advance(1000.0)
    broker = BrokerService(endpoints=[], reactor=reactor, clock=clock, cluster=server.url, cluster_node_id="solo",
                           cluster_heartbeat=5.0, sys_interval=10, http_api_keys=["ci:" + hash_key(KEY)],
                           close_linger=0)   # (the fake client's connection never closes; the clock is still)
    broker.operations.site()   # the monitors time the store's batches from now on
    broker.startService()
    try:
        at_start = sys_values(broker)
        assert at_start["cluster/node"] == "solo" and at_start["cluster/nodes"] == "1"
        assert at_start["cluster/messages/forwarded/sent"] == at_start["cluster/messages/forwarded/received"] == "0"
        assert "cluster/inbox/lag" not in at_start   # Redis has not answered yet: nothing made up
        assert "mqtt_cluster_inbox_lag" not in families(scrape_in_process(broker))
        yield broker.cluster.ready
        client = FakeClient(broker, 4)
        client.send(Connect(client_id="solo-client"))
        for _ in range(500):   # bounded: the claim's round trip to Redis
            if client.transport.value():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        client.received()
        client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="solo/#", qos=1),)))
        yield broker.store.flushed()
        # Each update asks Redis for the lag and publishes what the previous answer said.
        for _ in range(500):
            clock.advance(10)
            if "cluster/inbox/lag" in sys_values(broker):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert sys_values(broker)["cluster/inbox/lag"] == "0"
        text = scrape_in_process(broker)
        found = samples(text)
        assert found[("mqtt_cluster_nodes", ())] == 1
        assert found[("mqtt_cluster_claims_total", ())] == 1
        assert found[("mqtt_cluster_inbox_lag", ())] == 0
        assert found[("mqtt_cluster_redis_seconds_count", ())] >= 1
        assert ("mqtt_cluster_redis_seconds_bucket", (("le", "0.0001"),)) in found   # finer than SQLite's
        assert "mqtt_store_commit_seconds" not in families(text)
        status, stats, _ = api_call(broker, "/api/v1/stats")
        assert status == 200 and stats["cluster"] == {
            "node": "solo", "nodes": 1, "forwarded_out": 0, "forwarded_in": 0, "redirected": 0, "claims": 1,
            "adopted": 0, "inbox_lag": 0}
        status, body, request = api_call(broker, "/api/v1/cluster/nodes")
        for _ in range(500):
            if request.finished:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        status, body = answer_of(request)
        assert status == 200 and body["node"] == "solo"
        assert [(n["id"], n["alive"], n["clients"], n["filters"]) for n in body["nodes"]] == [("solo", True, 1, 1)]
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_stats_ask_redis_for_the_inbox_lag_without_sys_topics(server: RedisServer) -> Iterator[Deferred[Any]]:
    """With $SYS off and no scrape, /stats was the only reader, and it never asked: null for ever."""
    server.client().flushall()
    broker = BrokerService(endpoints=[], reactor=reactor, cluster=server.url, cluster_node_id="quiet",
                           sys_interval=0, http_api_keys=["ci:" + hash_key(KEY)], close_linger=0)
    broker.startService()
    try:
        yield broker.cluster.ready
        assert api_call(broker, "/api/v1/stats")[1]["cluster"]["inbox_lag"] is None  # not asked yet
        for _ in range(500):  # bounded: Redis's answer
            if api_call(broker, "/api/v1/stats")[1]["cluster"]["inbox_lag"] is not None:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert api_call(broker, "/api/v1/stats")[1]["cluster"]["inbox_lag"] == 0
    finally:
        yield broker.stopService()


@pytest_twisted.inlineCallbacks
def test_a_node_is_not_ready_while_redis_answers_no_heartbeat() -> Iterator[Deferred[Any]]:
    """A Redis that stalls (here stopped with SIGSTOP) keeps its connections: the node said it was
    ready while every CONNECT waited for Redis and was refused after cluster_claim_timeout."""
    server = RedisServer()
    clock = Clock()
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, clock=clock,
                           cluster=server.url, cluster_node_id="stalled", cluster_heartbeat=1.0,
                           cluster_missed_heartbeats=3, sys_interval=0, close_linger=0,
                           http_api_keys=["ci:" + hash_key(KEY)])
    broker.startService()
    try:
        yield broker.cluster.ready
        assert api_call(broker, "/api/v1/ready", key=None)[0] == 200
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                clock.advance(1.0)  # heartbeats that get no answer
                assert api_call(broker, "/api/v1/ready", key=None)[0] == 200  # not silent for long yet
            clock.advance(1.0)
            status, body, _ = api_call(broker, "/api/v1/ready", key=None)
            assert (status, body) == (503, {"ready": False, "reason": "Redis has answered no heartbeat for 4 s: "
                                                                       "new connections wait for it"})
            # What would ask Redis is not asked (and is not left to wait for it on the connection).
            status, body, _ = api_call(broker, "/api/v1/cluster/nodes")
            assert body is not None, "the answer waits for Redis"
            assert status == 503 and body["error"].startswith("Redis has answered no heartbeat")
        finally:
            server.process.send_signal(signal.SIGCONT)
        clock.advance(1.0)
        for _ in range(500):  # bounded: the heartbeat's answer, now that Redis runs again
            if api_call(broker, "/api/v1/ready", key=None)[0] == 200:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert api_call(broker, "/api/v1/ready", key=None)[0] == 200
    finally:
        yield broker.stopService()
        server.close()


# --- the API's answers, from a stand-in cluster ---------------------------------------------------

class StandInStore:
    def __init__(self) -> None:
        self.nodes: Deferred[list[dict[str, Any]]] = Deferred()
        self.owners: dict[str, dict[str, Any]] = {}
        self.asked = 0

    def describe_nodes(self) -> Deferred[list[dict[str, Any]]]:
        self.asked += 1
        return self.nodes

    def locate(self, client_id: str) -> Deferred[dict[str, Any] | None]:
        return succeed(self.owners.get(client_id))


class StandInCluster:
    def __init__(self, node: str = "here") -> None:
        self.node = node
        self.store = StandInStore()

    def unready(self) -> str | None:
        return None


def test_api_answers_503_when_redis_is_slow_and_drops_the_late_answer() -> None:
    broker = make_broker(http_api_keys=["ci:" + hash_key(KEY)], sys_interval=0)
    broker.cluster = StandInCluster()
    status, body, request = api_call(broker, "/api/v1/cluster/nodes")
    assert body is None   # waiting for Redis
    broker.reactor.advance(REDIS_TIMEOUT)
    status, body = answer_of(request)
    assert status == 503 and "Redis did not answer" in body["error"]
    broker.cluster.store.nodes.callback([])   # too late: nothing more is written
    assert answer_of(request) == (status, body)


def test_api_answers_503_when_the_redis_connection_is_lost_while_it_asks() -> None:
    """txredisapi fails every waiting command when its connection drops: that was a 500, and a
    traceback logged each time the dashboard asked."""
    import txredisapi
    from twisted.logger import capturedLogs
    broker = make_broker(http_api_keys=["ci:" + hash_key(KEY)], sys_interval=0)
    broker.cluster = StandInCluster()
    broker.cluster.store.nodes = fail(txredisapi.ConnectionError("Lost connection"))
    with capturedLogs() as events:
        status, body, _ = api_call(broker, "/api/v1/cluster/nodes")
    assert status == 503 and "Lost connection" in body["error"]
    assert [e for e in events if "log_failure" in e] == []


def test_a_program_error_answering_a_cluster_question_is_a_logged_500_not_redis_unavailable() -> None:
    from twisted.logger import capturedLogs
    broker = make_broker(http_api_keys=["ci:" + hash_key(KEY)], sys_interval=0)
    broker.cluster = StandInCluster()
    broker.cluster.store.nodes = fail(KeyError("inbox"))
    with capturedLogs() as events:
        status, body, _ = api_call(broker, "/api/v1/cluster/nodes")
    assert status == 500 and [e for e in events if "log_failure" in e] != []


@pytest_twisted.inlineCallbacks
def test_deleting_a_nodes_sys_value_leaves_the_other_nodes_own(server: RedisServer) -> Iterator[Deferred[Any]]:
    """Each node's $SYS topics are its own (never in Redis): a DELETE of one on a node went to
    Redis like any retained message's, and every node dropped its own value of that topic."""
    server.client().flushall()
    brokers = [BrokerService(endpoints=[], reactor=reactor, cluster=server.url, cluster_node_id=name,
                             sys_interval=3600, http_api_keys=["ci:" + hash_key(KEY)], close_linger=0)
               for name in ("a", "b")]
    for broker in brokers:
        broker.startService()
    try:
        for broker in brokers:
            yield broker.cluster.ready
        a, b = brokers
        assert b.retained.get("$SYS/broker/version") is not None
        api = ApiResource(a, a.operations)
        for method, path, body in (("DELETE", "/api/v1/retained/$SYS/broker/version", b""),
                                   ("POST", "/api/v1/publish", b'{"topic": "after", "payload": "x", "retain": true}')):
            request = DummyRequest([b""])
            request.method, request.path, request.content = method.encode(), path.encode(), BytesIO(body)
            request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {KEY}".encode()])
            if api.render(request) is NOT_DONE_YET:  # (answered once Redis has the change)
                yield request.notifyFinish()
            assert request.responseCode in (200, 204), request.written
        # A change after it, on the same control channel: once b has it, b has had the deletion.
        for _ in range(500):  # (bounded: Redis's round trips)
            if b.retained.get("after") is not None:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert a.retained.get("$SYS/broker/version") is None
        assert b.retained.get("$SYS/broker/version") is not None
    finally:
        for broker in brokers:
            yield broker.stopService()


def test_api_locates_through_the_store() -> None:
    broker = make_broker(http_api_keys=["ci:" + hash_key(KEY)], sys_interval=0)
    broker.cluster = StandInCluster()
    broker.cluster.store.owners["elsewhere"] = {"node": "there", "epoch": 7}
    status, body, _ = api_call(broker, "/api/v1/cluster/clients/elsewhere")
    assert (status, body) == (200, {"client_id": "elsewhere", "node": "there", "epoch": 7, "connected_here": False})
    status, body, _ = api_call(broker, "/api/v1/cluster/clients/gone")
    assert status == 404 and body == {"error": "no node of the cluster holds a session for 'gone'"}
    status, body, _ = api_call(broker, "/api/v1/cluster/clients/elsewhere", key="not-ours")
    assert status == 403


# --- the last known inbox lag ------------------------------------------------------------------

def described(node: str, unread: int, unhandled: int) -> dict[str, Any]:
    return {"id": node, "alive": True, "filters": 0, "clients": 0,
            "inbox": {"length": unread + unhandled, "unread": unread, "unhandled": unhandled}}


def test_inbox_lag_is_the_last_answer_and_asks_one_question_at_a_time() -> None:
    cluster = StandInCluster("me")
    lag = InboxLag(cluster)
    lag.refresh()
    lag.refresh()   # a question is on its way: not asked again
    assert cluster.store.asked == 1 and lag.value is None
    cluster.store.nodes.callback([described("other", 50, 50), described("me", 3, 4)])
    assert lag.value == 7   # this node's unread and unhandled entries
    cluster.store.nodes = fail(ConnectionError("Redis is away"))
    lag.refresh()
    assert cluster.store.asked == 2 and lag.value == 7   # the last known value stays
    cluster.store.nodes = succeed([described("me", 0, 1)])
    lag.refresh()
    assert lag.value == 1


# --- a broker of its own --------------------------------------------------------------------------

def test_a_broker_of_its_own_shows_nothing_of_a_cluster() -> None:
    broker = make_broker(http_api_keys=["ci:" + hash_key(KEY)], sys_interval=10)
    broker.operations.site()
    broker.startService()
    assert broker.operations.inbox_lag is None
    assert not [name for name in sys_values(broker) if name.startswith("cluster/")]
    assert not [name for name in families(scrape_in_process(broker)) if name.startswith("mqtt_cluster")]
    status, stats, _ = api_call(broker, "/api/v1/stats")
    assert status == 200 and "cluster" not in stats
    for path in ("/api/v1/cluster/nodes", "/api/v1/cluster/clients/anyone"):
        status, body, _ = api_call(broker, path)
        assert status == 404 and body == {"error": "this broker is not a node of a cluster (its cluster setting is empty)"}
        assert api_call(broker, path, key=None)[0] == 401   # the key is asked for first, as everywhere


def test_a_broker_of_its_own_with_its_admin_site_imports_nothing_of_the_cluster() -> None:
    code = """
import json, sys
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest
from mqtt_broker import BrokerService
from mqtt_broker.admin import metrics
from mqtt_broker.admin.api import ApiResource
from mqtt_broker.admin.keys import hash_key
broker = BrokerService(endpoints=[], persistence="memory", clock=Clock(), sys_interval=1,
                       http_api_keys=["ci:" + hash_key("k")])
broker.operations.site()
broker.startService()
broker.clock.advance(1)
metrics.render(metrics.registry(broker, broker.operations))
for path in (b"/api/v1/stats", b"/api/v1/cluster/nodes", b"/api/v1/cluster/clients/x"):
    request = DummyRequest([b""])
    request.path = path
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer k"])
    json.loads(ApiResource(broker, broker.operations).render(request))
loaded = [m for m in sys.modules if m.startswith("mqtt_broker.cluster") or m == "txredisapi"]
print(loaded)
sys.exit(1 if loaded else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

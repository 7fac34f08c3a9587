"""The admin HTTP API end to end: a broker process on loopback, urllib for HTTP, paho for MQTT.

One broker serves the whole module; the last test checks that every operation of the OpenAPI
document was called by the tests before it (they run in file order).
"""

from __future__ import annotations

import base64
import queue
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from admin_http import KEY, OTHER_KEY, Admin, start_admin
from cluster_helpers import wait_until
from conftest import BrokerProcess
from openapi_spec_validator import validate
from paho_helpers import WAIT, PahoClient
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import eventFromJSON, formatEvent

from mqtt_broker.admin.api import ROUTES

OPERATIONS: set[tuple[str, str]] = set()


@pytest.fixture(scope="module")
def admin() -> Iterator[Admin]:
    started: list[BrokerProcess] = []

    def start(*args: str, **kwargs: Any) -> BrokerProcess:
        broker = BrokerProcess(*args, **kwargs)
        started.append(broker)
        return broker

    admin = start_admin(start, "--http-max-body-size", "65536", "--max-qos", "2")
    document = admin.call("GET", "/api/v1/openapi.json", key=None).body
    admin.templates = [(method.upper(), path) for path, item in document["paths"].items()
                       for method in item if method != "parameters"]
    yield admin
    OPERATIONS.update(admin.exercised)
    for broker in started:
        broker.stop()


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def v5_client(port: int, client_id: str) -> tuple[mqtt.Client, queue.Queue[Any]]:
    """A paho MQTT 5 client whose disconnect reason codes are collected."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    events: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, u, flags, rc, props: events.put(("connect", rc))
    client.on_disconnect = lambda c, u, flags, rc, props: events.put(("disconnect", rc))
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    assert events.get(timeout=WAIT) == ("connect", 0)
    return client, events


# --- the document and the probes -------------------------------------------------------------

def test_openapi_document_is_valid_and_matches_the_routes(admin: Admin) -> None:
    answer = admin.call("GET", "/api/v1/openapi.json", key=None)
    assert answer.status == 200
    validate(answer.body)
    documented = {(method.upper(), path) for path, item in answer.body["paths"].items()
                  for method in item if method != "parameters"}
    routed = {(route.method, route.template.replace("+}", "}")) for route in ROUTES}
    assert documented == routed



def test_a_path_parameter_that_is_not_utf8_is_400_as_documented(admin: Admin) -> None:
    """Every operation with a parameter in its path answers 400 for one that is not UTF-8 once
    percent-decoded: the document says so for each."""
    assert admin.call("GET", "/api/v1/clients/%ff").status == 400
    document = admin.call("GET", "/api/v1/openapi.json", key=None).body
    undocumented = [f"{method.upper()} {path}" for path, item in document["paths"].items() if "{" in path
                    for method, operation in item.items() if method != "parameters"
                    and "400" not in operation["responses"]]
    assert undocumented == []

def test_health_and_readiness_need_no_key(admin: Admin) -> None:
    health = admin.call("GET", "/api/v1/health", key=None)
    assert health.status == 200 and health.body["status"] == "ok" and health.body["uptime"] >= 0
    ready = admin.call("GET", "/api/v1/ready", key=None)
    assert ready.status == 200 and ready.body == {"ready": True, "listening": 2}


# --- credentials ---------------------------------------------------------------------------

def test_missing_key_is_401_and_wrong_key_is_403(admin: Admin) -> None:
    missing = admin.call("GET", "/api/v1/stats", key=None)
    assert missing.status == 401 and "API key" in missing.body["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = admin.call("GET", "/api/v1/stats", key=OTHER_KEY)
    assert wrong.status == 403 and wrong.body == {"error": "this API key is not accepted"}
    assert admin.call("POST", "/api/v1/publish", {"topic": "x"}, key=None).status == 401
    assert admin.call("DELETE", "/api/v1/clients/anyone", key=OTHER_KEY).status == 403
    header = admin.call("GET", "/api/v1/stats", key=None, headers={"X-API-Key": KEY})
    assert header.status == 200
    assert admin.call("GET", "/api/v1/stats", key=None, headers={"Authorization": "Basic eDp5"}).status == 401


def test_unknown_path_and_wrong_method(admin: Admin) -> None:
    assert admin.call("GET", "/api/v1/nothing").status == 404
    assert admin.call("GET", "/api/v2/stats").status == 404
    answer = admin.call("PUT", "/api/v1/publish", {"topic": "x"})
    assert answer.status == 405 and answer.headers["allow"] == "POST"


# --- clients -----------------------------------------------------------------------------------

def test_list_clients_with_filters_and_paging(admin: Admin) -> None:
    port = admin.broker.port
    gone = PahoClient(port, "list-gone", clean=False)
    gone.subscribe("list/kept", qos=1)
    gone.close()
    clients = [PahoClient(port, f"list-{n}") for n in range(5)]
    v5 = PahoClient(port, "list-v5", version=mqtt.MQTTv5)
    try:
        everyone = admin.call("GET", "/api/v1/clients?q=list-&limit=1000")
        assert everyone.status == 200
        ids = [c["client_id"] for c in everyone.body["items"]]
        assert ids == ["list-0", "list-1", "list-2", "list-3", "list-4", "list-gone", "list-v5"]
        by_id = {c["client_id"]: c for c in everyone.body["items"]}
        assert by_id["list-gone"]["connected"] is False and by_id["list-gone"]["subscription_count"] == 1
        assert by_id["list-1"]["connected"] is True and by_id["list-1"]["peer"].startswith("127.0.0.1:")
        assert by_id["list-v5"]["protocol_version"] == 5 and by_id["list-1"]["protocol_version"] == 4
        offline = admin.call("GET", "/api/v1/clients?q=list-&connected=false").body
        assert [c["client_id"] for c in offline["items"]] == ["list-gone"]
        v5_only = admin.call("GET", "/api/v1/clients?q=LIST&protocol_version=5").body  # q ignores case
        assert [c["client_id"] for c in v5_only["items"]] == ["list-v5"]
        page = admin.call("GET", "/api/v1/clients?q=list-&limit=2&offset=2").body
        assert page["total"] == 7 and page["offset"] == 2 and page["limit"] == 2
        assert [c["client_id"] for c in page["items"]] == ["list-2", "list-3"]
        for bad in ("limit=0", "limit=1001", "offset=-1", "limit=x", "connected=maybe", "protocol_version=6"):
            answer = admin.call("GET", f"/api/v1/clients?{bad}")
            assert answer.status == 400 and answer.body["error"], bad
    finally:
        for client in (*clients, v5):
            client.close()


def test_one_client_with_its_subscriptions(admin: Admin) -> None:
    client = PahoClient(admin.broker.port, "detail/one")   # a slash: the id is percent-encoded in the path
    client.subscribe("detail/+/a", qos=1)
    client.subscribe("detail/#", qos=0)
    try:
        answer = admin.call("GET", f"/api/v1/clients/{quote('detail/one')}")
        assert answer.status == 200
        body = answer.body
        assert body["client_id"] == "detail/one" and body["connected"] and body["keep_alive"] == 60
        assert (body["inflight"], body["queued"], body["subscription_count"]) == (0, 0, 2)
        assert [(s["topic_filter"], s["qos"]) for s in body["subscriptions"]] == [("detail/#", 0), ("detail/+/a", 1)]
        subscriptions = admin.call("GET", f"/api/v1/clients/{quote('detail/one')}/subscriptions").body
        assert [s["topic_filter"] for s in subscriptions["items"]] == ["detail/#", "detail/+/a"]
        everyone = admin.call("GET", f"/api/v1/subscriptions?client_id={quote('detail/one')}").body
        assert everyone["total"] == 2
        assert admin.call("GET", "/api/v1/subscriptions?q=detail/%2B").body["items"][0]["topic_filter"] == "detail/+/a"
        assert admin.call("GET", "/api/v1/clients/nobody").status == 404
        assert admin.call("GET", "/api/v1/clients/nobody/subscriptions").status == 404
    finally:
        client.close()


def test_subscribe_and_unsubscribe_a_client(admin: Admin) -> None:
    port = admin.broker.port
    target = PahoClient(port, "sub-target")
    publisher = PahoClient(port, "sub-publisher")
    try:
        publisher.publish("subapi/r/x", b"kept", qos=1, retain=True)
        answer = admin.call("POST", "/api/v1/clients/sub-target/subscriptions", {"topic_filter": "subapi/+/x", "qos": 1})
        assert answer.status == 201 and answer.body["replaced"] is False
        assert answer.body["subscription"]["topic_filter"] == "subapi/+/x"
        retained = target.message()
        assert (retained.topic, retained.payload, retained.retain) == ("subapi/r/x", b"kept", True)
        publisher.publish("subapi/a/x", b"live", qos=1)
        live = target.message()
        assert (live.topic, live.payload, live.qos) == ("subapi/a/x", b"live", 1)
        again = admin.call("POST", "/api/v1/clients/sub-target/subscriptions", {"topic_filter": "subapi/+/x", "qos": 0})
        assert again.status == 200 and again.body["replaced"] is True
        target.message()  # retained again (Retain Handling 0)
        # The filter is the rest of the path; '+' needs no encoding, '#' does.
        assert admin.call("DELETE", "/api/v1/clients/sub-target/subscriptions/subapi/+/x").status == 204
        publisher.publish("subapi/a/x", b"after", qos=1)
        assert target.no_message()
        assert admin.call("DELETE", "/api/v1/clients/sub-target/subscriptions/subapi/+/x").status == 404
        assert admin.call("POST", "/api/v1/clients/sub-target/subscriptions", {"topic_filter": "subapi/#"}).status == 201
        assert admin.call("DELETE", "/api/v1/clients/sub-target/subscriptions/subapi/%23").status == 204
        for body, message in ((["x"], "must be a JSON object"), ({}, "'topic_filter' is missing"),
                              ({"topic_filter": "a/#/b"}, "invalid topic filter"),
                              ({"topic_filter": "a", "qos": 3}, "'qos' must be 0, 1 or 2"),
                              ({"topic_filter": "a", "qos": "1"}, "'qos' must be int"),
                              ({"topic_filter": 7}, "'topic_filter' must be str"),
                              ({"topic_filter": "$share/g/a", "no_local": True}, "cannot have 'no_local'")):
            bad = admin.call("POST", "/api/v1/clients/sub-target/subscriptions", body)
            assert bad.status == 400 and message in bad.body["error"], body
        malformed = admin.call("POST", "/api/v1/clients/sub-target/subscriptions", raw=b"{not json")
        assert malformed.status == 400 and malformed.body["error"].startswith("malformed JSON")
        assert admin.call("POST", "/api/v1/clients/nobody/subscriptions", {"topic_filter": "a"}).status == 404
    finally:
        target.close()
        publisher.close()


def test_subscribing_a_client_keeps_to_max_subscriptions_per_client(broker_process: type[BrokerProcess]) -> None:
    admin = start_admin(broker_process, "--max-subscriptions-per-client", "2")
    target = PahoClient(admin.broker.port, "limited")
    try:
        for topic_filter in ("a", "b", "a"):  # (the same filter again replaces it)
            assert admin.call("POST", "/api/v1/clients/limited/subscriptions", {"topic_filter": topic_filter}).status < 300
        refused = admin.call("POST", "/api/v1/clients/limited/subscriptions", {"topic_filter": "c"})
        assert refused.status == 400 and "max_subscriptions_per_client (2)" in refused.body["error"]
        assert len(admin.call("GET", "/api/v1/clients/limited").body["subscriptions"]) == 2
        stats = admin.call("GET", "/api/v1/stats").body
        assert stats["subscriptions_refused"] == {"max_subscriptions_per_client": 1}, stats
    finally:
        target.close()


def test_kick_sends_mqtt5_administrative_action(admin: Admin) -> None:
    client, events = v5_client(admin.broker.port, "kick-v5")
    old = PahoClient(admin.broker.port, "kick-v311")
    try:
        answer = admin.call("DELETE", "/api/v1/clients/kick-v5")
        assert answer.status == 200 and answer.body == {"disconnected": "kick-v5"}
        kind, reason = events.get(timeout=WAIT)
        assert kind == "disconnect" and reason.value == 0x98 and reason.getName() == "Administrative action"
        assert admin.call("DELETE", "/api/v1/clients/kick-v311").status == 200
        assert old.event("disconnect")
        connected = admin.call("GET", "/api/v1/clients?q=kick-&connected=true").body
        assert connected["items"] == []
        assert admin.call("DELETE", "/api/v1/clients/kick-v5").status == 404
    finally:
        client.loop_stop()
        old.close()


# --- publishing, retained messages, topics --------------------------------------------------------------

def test_publish(admin: Admin) -> None:
    subscriber = PahoClient(admin.broker.port, "pub-watcher")
    subscriber.subscribe("apipub/#", qos=2)
    try:
        answer = admin.call("POST", "/api/v1/publish", {"topic": "apipub/text", "payload": "héllo", "qos": 1})
        assert answer.status == 200 and answer.body == {"topic": "apipub/text", "qos": 1, "retain": False, "size": 6}
        message = subscriber.message()
        assert (message.topic, message.payload, message.qos) == ("apipub/text", "héllo".encode(), 1)
        binary = bytes(range(256))
        answer = admin.call("POST", "/api/v1/publish", {"topic": "apipub/bin", "payload": base64.b64encode(binary).decode(),
                                                        "payload_encoding": "base64", "qos": 2, "retain": True})
        assert answer.status == 200
        assert subscriber.message().payload == binary
        for body, message_part in (({"topic": "apipub/+"}, "invalid topic name"), ({"topic": ""}, "invalid topic name"),
                                   ({"payload": "x"}, "'topic' is missing"),
                                   ({"topic": "a", "payload_encoding": "base64", "payload": "%%%"}, "not valid base64"),
                                   ({"topic": "a", "payload_encoding": "utf-16"}, "must be utf-8 or base64"),
                                   ({"topic": "a", "qos": 5}, "'qos' must be 0, 1 or 2"),
                                   ({"topic": "a", "retain": "yes"}, "'retain' must be bool"),
                                   # (kept, it failed every SUBSCRIBE to it: no UTF-8 carries the topic)
                                   ({"topic": "apipub/\ud800", "retain": True}, "lone surrogate"),
                                   ({"topic": "apipub/x", "payload": "\udfff"}, "lone surrogate")):
            bad = admin.call("POST", "/api/v1/publish", body)
            assert bad.status == 400 and message_part in bad.body["error"], body
        assert admin.call("POST", "/api/v1/publish", raw=b"").status == 400
        assert admin.call("POST", "/api/v1/publish", raw=b"[1,").body["error"].startswith("malformed JSON")
        assert admin.call("POST", "/api/v1/publish", raw=b"[" * 60_000).body["error"] == "malformed JSON: nested too deep"
        oversize = admin.call("POST", "/api/v1/publish", {"topic": "apipub/big", "payload": "x" * 70_000})
        assert oversize.status == 400 and "http_max_body_size" in oversize.body["error"]
        assert subscriber.no_message()
    finally:
        subscriber.close()


def test_retained_messages(admin: Admin) -> None:
    for topic, payload in (("ret/a", "1"), ("ret/b/c", "2"), ("ret/b/d", "3")):
        assert admin.call("POST", "/api/v1/publish", {"topic": topic, "payload": payload, "retain": True}).status == 200
    listed = admin.call("GET", "/api/v1/retained?filter=ret/%23").body
    assert [(m["topic"], m["payload"]) for m in listed["items"]] == [("ret/a", "1"), ("ret/b/c", "2"), ("ret/b/d", "3")]
    assert [m["topic"] for m in admin.call("GET", "/api/v1/retained?filter=ret/b/%2B&limit=1").body["items"]] == ["ret/b/c"]
    everything = admin.call("GET", "/api/v1/retained?limit=1000").body
    assert {"ret/a", "$SYS/broker/version"} <= {m["topic"] for m in everything["items"]}
    one = admin.call("GET", "/api/v1/retained/ret/b/c")
    assert one.status == 200 and one.body == {"topic": "ret/b/c", "qos": 0, "size": 1, "payload": "2",
                                              "payload_encoding": "utf-8"}
    assert admin.call("DELETE", "/api/v1/retained/ret/b/c").status == 204
    assert admin.call("GET", "/api/v1/retained/ret/b/c").status == 404
    assert admin.call("DELETE", "/api/v1/retained/ret/b/c").status == 404
    late = PahoClient(admin.broker.port, "ret-late")
    late.subscribe("ret/#")
    assert sorted(late.message().topic for _ in range(2)) == ["ret/a", "ret/b/d"]
    assert late.no_message()
    late.close()
    assert admin.call("GET", "/api/v1/retained?filter=a/%23/b").status == 400
    assert admin.call("GET", "/api/v1/retained/ret/%23").status == 400


def test_a_list_of_retained_messages_may_carry_the_first_bytes_of_each_payload(admin: Admin) -> None:
    """The dashboard shows the first characters of each; its poll carried whole payloads (a
    thousand of 16 MiB each, encoded on the reactor thread), which any client could retain."""
    for topic, payload in (("cut/big", "x" * 30_000), ("cut/text", "ab€d"), ("cut/binary", "\xff" * 10)):
        raw = payload.encode("latin-1") if topic == "cut/binary" else payload.encode()
        admin.call("POST", "/api/v1/publish", {"topic": topic, "payload": base64.b64encode(raw).decode(),
                                               "payload_encoding": "base64", "retain": True})
    items = admin.call("GET", "/api/v1/retained?filter=cut/%23&payload_max=3").body["items"]
    assert [(m["topic"], m["size"], m["payload"], m["payload_encoding"]) for m in items] == [
        ("cut/big", 30_000, "xxx", "utf-8"), ("cut/binary", 10, base64.b64encode(b"\xff" * 3).decode(), "base64"),
        ("cut/text", 6, "ab", "utf-8")]  # (not half a €)
    assert admin.call("GET", "/api/v1/retained?payload_max=-1").status == 400


def test_answers_are_not_to_be_sniffed(admin: Admin) -> None:
    """An error echoes what the request said (a client id, a path): no browser is to take it for
    a page, as no browser takes the dashboard's files for anything but what they are."""
    for path, key in (("/api/v1/clients/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", KEY), ("/api/%3Cb%3E", None),
                      ("/api/v1/stats", KEY), ("/metrics", None)):
        assert admin.call("GET", path, key=key).headers.get("x-content-type-options") == "nosniff", path


def test_topic_tree(admin: Admin) -> None:
    publisher = PahoClient(admin.broker.port, "tree-publisher")
    publisher.publish("tree/a/b", b"x")
    publisher.publish("tree/c", b"kept", retain=True)
    publisher.close()
    answer = admin.call("GET", "/api/v1/topics")
    assert answer.status == 200
    [tree] = [node for node in answer.body["tree"]["children"] if node["name"] == "tree"]
    assert [child["name"] for child in tree["children"]] == ["a", "c"]
    b = tree["children"][0]["children"][0]
    assert (b["topic"], b["recent"], b["retained"]) == ("tree/a/b", True, False)
    c = tree["children"][1]
    assert (c["topic"], c["retained"]) == ("tree/c", True)
    assert "$SYS" in [node["name"] for node in answer.body["tree"]["children"]]
    assert "message" not in c
    assert admin.call("GET", "/api/v1/topics?limit=0").status == 400
    assert admin.call("GET", "/api/v1/topics?payload_max=-1").status == 400
    # With payload_max, a retained topic's node holds its message, its payload cut.
    answer = admin.call("GET", "/api/v1/topics?payload_max=2")
    [tree] = [node for node in answer.body["tree"]["children"] if node["name"] == "tree"]
    assert tree["children"][1]["message"] == {"topic": "tree/c", "qos": 0, "size": 4, "payload": "ke",
                                              "payload_encoding": "utf-8"}
    assert "message" not in tree["children"][0]["children"][0]


# --- figures, settings -----------------------------------------------------------------------------

def test_stats_and_metrics_after_a_known_workload(admin: Admin) -> None:
    before = admin.call("GET", "/api/v1/stats").body
    metrics_before = scrape(admin)
    subscriber = PahoClient(admin.broker.port, "stats-sub")
    subscriber.subscribe("stats/#", qos=1)
    publishers = [PahoClient(admin.broker.port, f"stats-pub-{n}") for n in range(3)]
    for publisher in publishers:
        for n in range(10):
            publisher.publish(f"stats/{n}", b"0123456789", qos=1)
    for _ in range(30):
        subscriber.message()
    after = admin.call("GET", "/api/v1/stats").body
    assert after["publish_received"][1] - before["publish_received"][1] == 30
    assert after["publish_sent"][1] - before["publish_sent"][1] == 30
    assert after["connections_total"] - before["connections_total"] == 4
    assert after["clients_connected"] >= 4 and after["bytes_received"] > before["bytes_received"] + 30 * 10
    assert after["version"].startswith("mqtt_broker version") and "load/publish/received/1min" in after["load"]
    metrics = scrape(admin)
    assert metrics[("mqtt_messages_received_total", (("qos", "1"),))] - \
        metrics_before[("mqtt_messages_received_total", (("qos", "1"),))] == 30
    assert metrics[("mqtt_messages_sent_total", (("qos", "1"),))] - \
        metrics_before[("mqtt_messages_sent_total", (("qos", "1"),))] == 30
    assert metrics[("mqtt_connections_total", ())] - metrics_before[("mqtt_connections_total", ())] == 4
    assert metrics[("mqtt_clients_connected", ())] >= 4
    assert metrics[("mqtt_subscriptions", ())] >= 1
    assert metrics[("process_resident_memory_bytes", ())] > 1_000_000 and metrics[("process_open_fds", ())] > 4
    assert metrics[("mqtt_delivery_latency_seconds_count", ())] >= 1   # sampled ten times a second
    # The reactor's lag is first measured a quarter of a second after the broker started: this
    # module's broker may be younger than that (this test run alone), so wait for the measurement.
    wait_until(lambda: scrape(admin)[("mqtt_reactor_lag_seconds_count", ())] >= 1, "the reactor's lag measured", WAIT)
    for client in (subscriber, *publishers):
        client.close()


def scrape(admin: Admin) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = admin.call("GET", "/metrics", key=None)
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.body.decode()) for sample in family.samples}


def test_config_and_reload(admin: Admin) -> None:
    config = admin.call("GET", "/api/v1/config")
    assert config.status == 200
    assert config.body["max_qos"] == 2 and config.body["http_max_body_size"] == 65536
    assert config.body["http_api_keys"] == ["ci"]   # the key's name, never its hash
    reload = admin.call("POST", "/api/v1/config/reload")
    assert reload.status == 200 and reload.body == {"reloaded": True, "problems": []}


def test_a_reload_that_keeps_a_bad_file_says_so(broker_process: Any, tmp_path: Path) -> None:
    """The rules in force stay when a new file cannot be read: the answer says what was not
    reloaded, not that everything was."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\n")
    admin = start_admin(broker_process, "--acl-file", str(acl))
    acl.unlink()
    reload = admin.call("POST", "/api/v1/config/reload")
    assert reload.status == 200 and reload.body["reloaded"] is False
    [problem] = reload.body["problems"]
    assert problem.startswith("security settings: ") and "acl" in problem
    acl.write_text("topic readwrite #\n")
    assert admin.call("POST", "/api/v1/config/reload").body == {"reloaded": True, "problems": []}


def test_changes_are_logged_with_the_key(admin: Admin) -> None:
    # twist writes JSON lines; the text of an event is its format filled in.
    output = "\n".join(formatEvent(eventFromJSON(line)) for line in admin.broker.output().splitlines()
                       if line.startswith("{"))
    assert "admin API: key ci publishes 6 bytes to 'apipub/text'" in output
    assert "admin API: key ci disconnects client 'kick-v5'" in output
    assert "admin API: key ci subscribes 'sub-target' to 'subapi/+/x'" in output
    assert "admin API: key ci deletes the retained message of 'ret/b/c'" in output
    assert "admin API: 'POST' '/api/v1/publish' by key - refused: 401" in output


def test_cluster_paths_of_a_broker_that_is_not_a_node(admin: Admin) -> None:
    # (their answers on cluster nodes: tests/test_admin_cluster.py)
    for path in ("/api/v1/cluster/nodes", "/api/v1/cluster/clients/anyone"):
        answer = admin.call("GET", path)
        assert answer.status == 404 and "not a node of a cluster" in answer.body["error"]
        assert admin.call("GET", path, key=None).status == 401


def test_bridge_paths_of_a_broker_without_bridges(admin: Admin) -> None:
    # (their answers on a broker with bridges: tests/test_admin_bridges.py)
    assert admin.call("GET", "/api/v1/bridges").body == []
    for method, path in (("GET", "/api/v1/bridges/edge"), ("POST", "/api/v1/bridges/edge/restart")):
        answer = admin.call(method, path)
        assert answer.status == 404 and answer.body == {"error": "no bridge 'edge'"}
        assert admin.call(method, path, key=None).status == 401


def test_every_documented_operation_was_exercised(admin: Admin) -> None:
    assert set(admin.templates) - admin.exercised == set()


def test_the_config_shows_no_password() -> None:
    import dataclasses
    import json

    from mqtt_broker.admin.shapes import redacted
    from mqtt_broker.config import BrokerConfig
    config = BrokerConfig(cluster="redis://:s3cret@127.0.0.1:6379/0", http_auth_url="https://svc:pw@127.0.0.1/auth",
                          bridge=[{"connection": "b", "addresses": ["127.0.0.1:1"], "topic": ["t/#"],
                                   "remote_clientid": "edge-1", "remote_username": "edge",
                                   "remote_password": "bridge-pw"}])
    shown = redacted(dataclasses.asdict(config))
    assert shown["cluster"] == "redis://:********@127.0.0.1:6379/0"
    assert shown["http_auth_url"] == "https://svc:********@127.0.0.1/auth"
    assert shown["bridge"][0]["remote_password"] == "********" and shown["bridge"][0]["remote_username"] == "edge"
    assert "s3cret" not in json.dumps(shown) and "bridge-pw" not in json.dumps(shown)


@pytest.mark.parametrize("url, shown", [
    # What the broker itself reads as the Redis password (and sends in AUTH): were shown.
    ("redis://s3cret@127.0.0.1:6379/0", "redis://********@127.0.0.1:6379/0"),
    ("rediss://s3cret@127.0.0.1:6380/0", "rediss://********@127.0.0.1:6380/0"),
    ("redis+sentinel://s3cret@127.0.0.1:26379,127.0.0.2/mymaster/0",
     "redis+sentinel://********@127.0.0.1:26379,127.0.0.2/mymaster/0"),
    ("redis://:abc@s3cret@127.0.0.1:6379/0", "redis://:********@127.0.0.1:6379/0"),
    ("redis://user:s3cret@127.0.0.1", "redis://user:********@127.0.0.1"),
    ("redis://:s3cret pw@127.0.0.1:6379/0", "redis://:********@127.0.0.1:6379/0"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_a_redis_url_shows_no_password_in_any_form(url: str, shown: str) -> None:
    import dataclasses

    from mqtt_broker.admin.shapes import redacted
    from mqtt_broker.cluster.address import RedisAddress
    from mqtt_broker.config import BrokerConfig
    assert RedisAddress.parse(url).password in (None, "s3cret", "abc@s3cret", "s3cret pw")
    assert redacted(dataclasses.asdict(BrokerConfig(cluster=url)))["cluster"] == shown

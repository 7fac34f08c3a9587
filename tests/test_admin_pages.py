"""The admin API in this process (its resource rendered with DummyRequest on a MemoryReactor
broker): what the dashboard polls on a large broker, a publish no MQTT packet can carry, and the
document's schemas against the real answers."""

from __future__ import annotations

import dataclasses
import json
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from admin_helpers import site_connection
from protocol_helpers import connected, make_broker
from test_durability import HeldStore
from twisted.web.test.requesthelper import DummyRequest

from mqtt_broker import BrokerService, Message, Subscription
import mqtt_broker.admin.api as api_module
from mqtt_broker.admin.api import OPENAPI, ApiResource
from mqtt_broker.admin.keys import hash_key
from mqtt_broker.session import Session
from mqtt_broker.wire.codec import MAX_REMAINING_LENGTH

KEY = "pages-key"


def started(**settings: Any) -> tuple[BrokerService, ApiResource]:
    broker = make_broker(http_api_keys=[hash_key(KEY)], **{"sys_interval": 0, **settings})
    broker.startService()
    return broker, ApiResource(broker, broker.operations)


def call(api: ApiResource, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    url = urlsplit(path)
    request = DummyRequest([b""])
    request.method = method.encode()
    request.path = url.path.encode()
    request.uri = path.encode()
    request.content = BytesIO(body)
    request.requestHeaders.addRawHeader(b"authorization", f"Bearer {KEY}".encode())
    answer = api.render(request)
    assert isinstance(answer, bytes)
    return request.responseCode or 200, json.loads(answer) if answer else None


class Unwalkable:
    """A stand-in for a collection of the broker that answers everything but a walk of all it holds."""

    def __init__(self, held: Any) -> None:
        self._held = held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._held, name)

    def __iter__(self) -> Any:
        raise AssertionError("walked every item to answer a page")


# --- a publish too large for any PUBLISH -------------------------------------------------------------

def test_a_publish_no_packet_can_carry_is_refused_before_it_is_routed() -> None:
    """Four bytes of Remaining Length count at most 268,435,455 bytes [MQTT-1.5.5]: a larger
    PUBLISH would be sent with a fifth, which every client takes for a malformed packet (and a
    retained one would be sent so to every later subscriber)."""
    broker, _ = started()
    # topic length (2) + "big/t" (5) + property length (1) + payload
    fits = b"x" * (MAX_REMAINING_LENGTH - 8)
    broker.publish("big/t", fits, retain=True)
    assert broker.retained.get("big/t") is not None
    with pytest.raises(ValueError, match="268435456 bytes after the fixed header of its PUBLISH"):
        broker.publish("big/t", fits + b"y", retain=True)
    retained = broker.retained.get("big/t")
    assert retained is not None and len(retained.payload) == len(fits)


def test_admin_publish_of_a_message_no_packet_can_carry_is_400() -> None:
    broker, api = started(http_max_body_size=MAX_REMAINING_LENGTH + 100)
    subscriber = connected(broker, "big-sub")
    subscriber.subscribe("big/#")
    body = b'{"topic": "big/t", "retain": true, "payload": "' + b"a" * (MAX_REMAINING_LENGTH - 6) + b'"}'
    status, answer = call(api, "POST", "/api/v1/publish", body)
    del body
    assert status == 400 and "more than MQTT's 268435455" in answer["error"], answer
    assert subscriber.received() == [] and broker.retained.get("big/t") is None


# --- the dashboard's polls --------------------------------------------------------------------

def test_one_clients_subscriptions_are_listed_from_its_session() -> None:
    """The dashboard asks for its selected client's subscriptions every two seconds: a walk of
    every subscription of the broker (a hundred thousand clients) held the reactor each time."""
    broker, api = started()
    for n in range(3):
        session = broker.sessions[f"c{n}"] = Session(f"c{n}")
        for topic_filter in ("b/#", "a/+"):
            broker.subscribe(session, Subscription(client_id=f"c{n}", topic_filter=topic_filter, qos=1))
    broker.subscriptions = Unwalkable(broker.subscriptions)  # type: ignore[assignment]
    status, answer = call(api, "GET", "/api/v1/subscriptions?client_id=c1&q=%2B")
    assert status == 200 and [(s["client_id"], s["topic_filter"]) for s in answer["items"]] == [("c1", "a/+")]
    status, answer = call(api, "GET", "/api/v1/subscriptions?client_id=nobody")
    assert (status, answer["total"]) == (200, 0)


def test_one_client_is_answered_with_its_first_subscriptions_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /clients/{id} rendered every subscription of the session: any client can hold 200,000
    (one SUBSCRIBE may carry any number of filters), which held the reactor 2.5 s. It answers the
    first 1,000 by filter, as a page of /clients/{id}/subscriptions would, and their count."""
    import mqtt_broker.admin.api as api_module
    broker, api = started()
    session = broker.sessions["big"] = Session("big")
    filters = [f"s/{n}" for n in range(2500)]
    for topic_filter in filters:
        broker.subscribe(session, Subscription(client_id="big", topic_filter=topic_filter, qos=1))
    rendered: list[Subscription] = []
    monkeypatch.setattr(api_module, "subscription_json",
                        lambda subscription: rendered.append(subscription) or dataclasses.asdict(subscription))
    status, answer = call(api, "GET", "/api/v1/clients/big")
    assert (status, answer["subscription_count"], len(rendered)) == (200, 2500, 1000)
    first = call(api, "GET", "/api/v1/clients/big/subscriptions?limit=1000")[1]["items"]
    assert answer["subscriptions"] == first and [s["topic_filter"] for s in first] == sorted(filters)[:1000]


def test_every_page_of_one_clients_subscriptions_is_a_slice_of_them_sorted() -> None:
    """A page's filters are found without sorting all a client holds (200,000: 666 ms): each page,
    of either operation, is still the slice of the sorted filters that the paging asks for."""
    broker, api = started()
    session = broker.sessions["c"] = Session("c")
    filters = [f"t/{n * 37 % 50}/x" for n in range(50)] + ["a/b", "z", "t/+/x"]
    for topic_filter in filters:
        broker.subscribe(session, Subscription(client_id="c", topic_filter=topic_filter, qos=1))
    ordered = sorted(filters)
    for offset in (0, 1, 7, 49, 52, 53, 60):
        for limit in (1, 3, 10):
            for path in (f"/api/v1/clients/c/subscriptions?offset={offset}&limit={limit}",
                         f"/api/v1/subscriptions?client_id=c&offset={offset}&limit={limit}"):
                status, answer = call(api, "GET", path)
                assert status == 200 and answer["total"] == len(filters), (path, answer)
                assert [s["topic_filter"] for s in answer["items"]] == ordered[offset:offset + limit], path


def test_a_page_of_every_subscription_is_the_same_without_walking_them_all() -> None:
    """Every subscription was walked, and sorted, for each page: 0.8 s of the reactor's for one
    of 500,000. A page is what a sorted list of them all would give, ``total`` its length."""
    broker, api = started()
    for client_id, filters in {"c2": ("b/#", "a/+", "$share/g/a/b"), "c10": ("a/b",), "none": (),
                               "ab": ("x/y", "a/+/c", "$share/h/x/#"), "a": ("a",), "c1": ("z", "b/a")}.items():
        session = broker.sessions[client_id] = Session(client_id)
        for topic_filter in filters:
            broker.subscribe(session, Subscription(client_id=client_id, topic_filter=topic_filter, qos=1))
    broker.unsubscribe(broker.sessions["c2"], "b/#")
    every = sorted(broker.subscriptions, key=lambda s: (s.client_id, s.topic_filter))
    broker.subscriptions = Unwalkable(broker.subscriptions)  # type: ignore[assignment]

    ab = [s for s in every if s.client_id == "ab"]
    for asked, chosen in (("", every), ("q=a", [s for s in every if "a" in s.topic_filter]),
                          ("q=%24share", [s for s in every if "$share" in s.topic_filter]), ("q=nothing", []),
                          ("client_id=ab", ab), ("client_id=ab&q=%2B", [s for s in ab if "+" in s.topic_filter]),
                          ("client_id=none", []), ("client_id=nobody", [])):
        expected = [dataclasses.asdict(s) for s in chosen]
        for offset in range(len(expected) + 2):
            for limit in range(1, len(expected) + 2):
                status, answer = call(api, "GET", f"/api/v1/subscriptions?{asked}&offset={offset}&limit={limit}")
                assert (status, answer) == (200, {"total": len(expected), "offset": offset, "limit": limit,
                                                  "items": expected[offset:offset + limit]}), (asked, offset, limit)


def test_a_session_that_moved_away_is_not_listed_or_counted_among_the_subscriptions() -> None:
    broker, api = started()
    for client_id in ("a", "moved", "z"):
        session = broker.sessions[client_id] = Session(client_id)
        for topic_filter in ("t/1", "t/2"):
            broker.subscribe(session, Subscription(client_id=client_id, topic_filter=topic_filter))

    class MovedAway:
        def moved_away(self, client_id: str) -> bool:
            return client_id == "moved"
    broker.cluster = MovedAway()
    answer = call(api, "GET", "/api/v1/subscriptions?offset=1&limit=2")[1]
    assert (answer["total"], [(s["client_id"], s["topic_filter"]) for s in answer["items"]]) == (
        4, [("a", "t/2"), ("z", "t/1")])
    assert call(api, "GET", "/api/v1/subscriptions?q=1")[1]["total"] == 2
    assert call(api, "GET", "/api/v1/subscriptions?client_id=moved")[1] == {
        "total": 0, "offset": 0, "limit": 100, "items": []}
    broker.cluster = None


def test_the_topic_tree_takes_the_first_retained_topics_without_walking_them_all() -> None:
    broker, api = started()
    for topic in ("z/1", "a/b/c", "a/b", "m", "a/a", "/lead"):
        broker.retained.store(Message(topic=topic, payload=b"on", retain=True))
    broker.subscriptions.recent["m"] = None  # (routed lately, and retained)
    broker.retained = Unwalkable(broker.retained)  # type: ignore[assignment]
    status, answer = call(api, "GET", "/api/v1/topics?limit=4")
    assert status == 200 and answer["count"] == 4

    def leaves(node: dict[str, Any]) -> list[tuple[str, bool, bool]]:
        here = [(node["topic"], node["recent"], node["retained"])] if node["topic"] is not None else []
        return here + [leaf for child in node.get("children", ()) for leaf in leaves(child)]
    assert sorted(leaves(answer["tree"])) == [("/lead", False, True), ("a/a", False, True), ("a/b", False, True),
                                               ("m", True, True)]


# --- the document -------------------------------------------------------------------------------

def test_the_stats_schema_names_every_field_of_the_answer() -> None:
    schema = json.loads(OPENAPI.read_text())["components"]["schemas"]["Stats"]
    _, api = started()
    status, answer = call(api, "GET", "/api/v1/stats")
    assert status == 200
    assert sorted(set(answer) - set(schema["properties"])) == []


# --- what a change or a question through the API may not do -----------------------------------------

def test_an_mqtt3_client_is_given_no_mqtt5_subscription_option() -> None:
    """With Retain As Published, an MQTT 3.1.1 client got live messages with RETAIN 1, which it
    takes for stale retained ones [MQTT-3.3.1-9 of 3.1.1]; with Retain Handling 2, no retained
    message for its new subscription, which MQTT 3.1.1 sends it [MQTT-3.8.4-3]."""
    broker, api = started()
    broker.route_own("t/1", b"kept", retain=True)
    v311 = connected(broker, "v311")
    connected(broker, "v5", version=5)
    for option, value in (("retain_as_published", True), ("no_local", True), ("retain_handling", 2),
                          ("retain_handling", 1)):
        status, body = call(api, "POST", "/api/v1/clients/v311/subscriptions",
                            json.dumps({"topic_filter": "t/#", option: value}).encode())
        assert status == 400 and "MQTT 3 client" in body["error"], (option, value, body)
        status, _ = call(api, "POST", "/api/v1/clients/v5/subscriptions",
                         json.dumps({"topic_filter": "t/#", option: value}).encode())
        assert status in (200, 201)
    assert broker.sessions["v311"].subscriptions == {} and v311.received() == []


def test_a_replay_filter_is_refused() -> None:
    """``$replay/...`` asks a SUBSCRIBE for the message log: the API kept it as a filter, which
    matched nothing and which the client's UNSUBSCRIBE of the same name could not remove."""
    broker, api = started()
    connected(broker, "c", version=5)
    status, body = call(api, "POST", "/api/v1/clients/c/subscriptions", b'{"topic_filter": "$replay/all/a"}')
    assert status == 400 and "$replay/" in body["error"] and broker.sessions["c"].subscriptions == {}


def test_a_page_of_retained_messages_walks_to_its_end_only() -> None:
    """GET /retained (the dashboard's, every two seconds) listed and sorted every retained
    message for each page: 1.9 s with a million. The unfiltered pages are walked in order, level
    by level, to their end; a filter's, sorted so too. The total leaves out what has expired."""
    broker, api = started()
    publisher = connected(broker, "pub", version=5)
    topics = [f"t/{n % 7}/{n}" for n in range(300)] + ["t-x", "t", "t/0"]
    for topic in topics:
        publisher.publish(topic, b"x", retain=True)
    publisher.publish("t/stale", b"x", retain=True, properties={"message_expiry_interval": 1})
    broker.reactor.advance(5)
    walked: list[str] = []
    in_order = broker.retained.in_order

    def counted() -> Any:
        for message in in_order():
            walked.append(message.topic)
            yield message
    broker.retained.in_order = counted  # type: ignore[method-assign]
    in_levels = sorted(topics, key=lambda topic: topic.split("/"))
    status, body = call(api, "GET", "/api/v1/retained?offset=10&limit=20")
    assert status == 200 and body["total"] == len(topics)
    assert [m["topic"] for m in body["items"]] == in_levels[10:30]
    assert len(walked) <= 31
    status, body = call(api, "GET", "/api/v1/retained?filter=t/%2B/%23&offset=10&limit=20")
    assert [m["topic"] for m in body["items"]] == [t for t in in_levels if t.startswith("t/")][10:30]


def test_a_page_of_retained_messages_looks_at_each_expired_one_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/operations.md: the pages after the first look at their own messages only. Each
    unfiltered page counted its total by walking every retained message with an expiry, and
    looked each one up whose time had passed: 200,000, half of them expired before the sweep
    came, took 100 ms a page, every two seconds of the dashboard's. A message is looked at once
    after its time now, by the first page (or sweep) that comes, and a page looks at a bounded
    number of them; the total leaves out those looked at."""
    monkeypatch.setattr(api_module, "EXPIRED_LOOKED_AT_PER_PAGE", 400)
    broker, api = started()
    now = broker.clock.seconds()
    for n in range(2000):  # as a client's PUBLISHes with a Message Expiry Interval leave them
        broker.retained.store(Message(f"dev/{n}/t", b"x", retain=True, expires_at=now + 10 + n % 2 * 10_000))
    looked_up: list[str] = []
    get = broker.retained.get

    def counted(topic: str) -> Message | None:
        looked_up.append(topic)
        return get(topic)
    broker.retained.get = counted  # type: ignore[method-assign]
    assert call(api, "GET", "/api/v1/retained?limit=10")[1]["total"] == 2000 and looked_up == []
    broker.reactor.advance(20)  # half of them expired; the sweep (every 60 s) has not come yet
    totals = [call(api, "GET", "/api/v1/retained?limit=10")[1]["total"] for _ in range(3)]
    assert totals == [1600, 1200, 1000] and len(looked_up) == 1000
    status, body = call(api, "GET", "/api/v1/retained?offset=10&limit=10")
    assert (status, body["total"], len(body["items"]), len(looked_up)) == (200, 1000, 10, 1000)


def test_a_retained_filter_holding_nul_is_400_as_a_subscribes() -> None:
    """docs/operations.md: a bad filter is 400. The other operations refuse U+0000 in a filter
    [MQTT-1.5.4-2]; GET /retained?filter= took it, and answered an empty page."""
    _, api = started()
    for bad in ("a%00", "%00/%23", "$share/g/a"):
        status, answer = call(api, "GET", f"/api/v1/retained?filter={bad}")
        assert status == 400 and "invalid topic filter" in answer["error"], bad


def test_an_expired_retained_message_is_not_shown() -> None:
    """It is gone [MQTT-3.3.2-5] (a new subscriber gets nothing) before the sweep deletes it."""
    broker, api = started()
    publisher = connected(broker, "pub", version=5)
    publisher.publish("status/x", b"stale", retain=True, properties={"message_expiry_interval": 1})
    publisher.publish("status/y", b"kept", retain=True)
    broker.reactor.advance(5)
    assert broker.retained.get("status/x") is not None  # (not swept yet)
    assert call(api, "GET", "/api/v1/retained/status/x")[0] == 404
    assert [m["topic"] for m in call(api, "GET", "/api/v1/retained?filter=status/%23")[1]["items"]] == ["status/y"]
    assert [m["topic"] for m in call(api, "GET", "/api/v1/retained")[1]["items"]] == ["status/y"]
    shown: dict[str, bool] = {}

    def walk(node: dict[str, Any]) -> None:
        shown[node["topic"]] = node["retained"]
        for child in node["children"]:
            walk(child)
    walk(call(api, "GET", "/api/v1/topics")[1]["tree"])
    assert (shown["status/x"], shown["status/y"]) == (False, True)  # (both routed lately)


def test_a_plus_in_a_query_is_a_plus_sign() -> None:
    """The query was read as a form's, where "+" is a space: ?filter=a/+ was the filter "a/ "."""
    broker, api = started()
    connected(broker, "p").publish("a/b", b"x", retain=True)
    connected(broker, "a b")
    assert [m["topic"] for m in call(api, "GET", "/api/v1/retained?filter=a/+")[1]["items"]] == ["a/b"]
    assert [c["client_id"] for c in call(api, "GET", "/api/v1/clients?q=a%20b")[1]["items"]] == ["a b"]


def test_empty_query_parameters_ask_nothing() -> None:
    """As docs/operations.md writes them (``/clients?q=&connected=``)."""
    broker, api = started()
    connected(broker, "p").publish("a/b", b"x", retain=True)
    connected(broker, "s").subscribe("a/#")
    assert call(api, "GET", "/api/v1/clients?q=&connected=&protocol_version=&username=")[1]["total"] == 2
    assert call(api, "GET", "/api/v1/retained?filter=")[1]["total"] == 1
    assert call(api, "GET", "/api/v1/subscriptions?client_id=&q=")[1]["total"] == 1


def test_a_change_before_the_start_is_refused_with_503(tmp_path: Path) -> None:
    """Mounted in a site of one's own before the broker starts, the API answered a publish with
    500 and a traceback: the SQLite store is not open until the start."""
    from twisted.logger import capturedLogs
    broker = make_broker(http_api_keys=[hash_key(KEY)], sys_interval=0, persistence="sqlite", data_dir=str(tmp_path))
    api = ApiResource(broker, broker.operations)
    with capturedLogs() as events:
        status, body = call(api, "POST", "/api/v1/publish", b'{"topic": "t", "payload": "x"}')
    assert status == 503 and "not started" in body["error"]
    assert [e for e in events if "log_failure" in e] == []


def test_the_document_gives_every_change_its_503() -> None:
    document = json.loads(OPENAPI.read_text())
    assert [(method, path) for path, item in document["paths"].items() for method, operation in item.items()
            if method in ("post", "delete") and "503" not in operation["responses"]] == []



# --- changes answered once the store holds them ----------------------------------------------------

def _render(api: ApiResource, method: str, path: str, body: bytes = b"") -> DummyRequest:
    """The request ``call`` makes, rendered, for an answer that may come later (``_answered``)."""
    request = DummyRequest([b""])
    request.method = method.encode()
    request.path = request.uri = path.encode()
    request.content = BytesIO(body)
    request.requestHeaders.addRawHeader(b"authorization", f"Bearer {KEY}".encode())
    answer = api.render(request)
    if isinstance(answer, bytes):
        request.write(answer)
        request.finish()
    return request


def _answered(request: DummyRequest) -> tuple[int, Any] | None:
    """The status and JSON body of a request ``_render`` rendered, None while it is not answered."""
    if not request.finished:
        return None
    body = b"".join(request.written)
    return request.responseCode or 200, json.loads(body) if body else None


def _stored_subscriber(store: Any) -> tuple[BrokerService, ApiResource]:
    """A broker on ``store`` with a stored session, "keeper", whose client is away, subscribed to
    "kept/#" at QoS 1."""
    broker, api = started(store=store)
    keeper = connected(broker, "keeper", clean=False)
    keeper.subscribe("kept/#", qos=1)
    store.write_all()
    keeper.lose()
    store.write_all()
    return broker, api


def test_a_change_through_the_api_is_answered_once_the_store_holds_it() -> None:
    """docs/durability.md: a QoS 1/2 PUBLISH is acknowledged only once the message and its
    routing to every stored session are committed, a SUBACK once the subscription is. POST
    /publish answered 200 once routed, before the store had written it: a kill -9 right after
    the 200 lost the message for a stored offline subscriber (2 runs of 3). So did a subscribe,
    an unsubscribe and a retained message's delete answer before the store had them."""
    store = HeldStore()
    _, api = _stored_subscriber(store)
    changes = [("POST", "/api/v1/publish", b'{"topic": "kept/1", "payload": "m", "qos": 1}', 200),
               ("POST", "/api/v1/publish", b'{"topic": "kept/r", "payload": "r", "retain": true}', 200),
               ("POST", "/api/v1/clients/keeper/subscriptions", b'{"topic_filter": "more/#"}', 201),
               ("DELETE", "/api/v1/clients/keeper/subscriptions/more/%23", b"", 204),
               ("DELETE", "/api/v1/retained/kept/r", b"", 204)]
    for method, path, body, status in changes:
        request = _render(api, method, path, body)
        assert _answered(request) is None, (method, path)
        store.write(store.generation)
        assert _answered(request) is not None and _answered(request)[0] == status, (method, path, _answered(request))
    # Nothing to store: answered at once.
    assert _answered(_render(api, "POST", "/api/v1/publish", b'{"topic": "kept/0", "payload": "m"}'))[0] == 200
    assert store.waiting == {}


def test_a_change_through_the_api_the_store_cannot_write_is_answered_503() -> None:
    """As a client's QoS 1/2 PUBLISH is not acknowledged while the disk fails, and its SUBSCRIBE
    refused with the subscription left as it was (docs/durability.md)."""
    from mqtt_broker.store import StoreError
    store = HeldStore()
    broker, api = _stored_subscriber(store)
    requests = [_render(api, "POST", "/api/v1/publish", b'{"topic": "kept/1", "payload": "m", "qos": 1}'),
                _render(api, "POST", "/api/v1/clients/keeper/subscriptions", b'{"topic_filter": "more/#"}'),
                _render(api, "POST", "/api/v1/clients/keeper/subscriptions",
                        b'{"topic_filter": "kept/#", "qos": 0}')]
    store.write(store.generation, StoreError("the disk is full"))
    answers = [_answered(request) for request in requests]
    assert [answer and answer[0] for answer in answers] == [503] * 3, answers
    assert all("the disk is full" in answer[1]["error"] for answer in answers if answer)
    held = broker.sessions["keeper"].subscriptions
    assert sorted(held) == ["kept/#"] and held["kept/#"].qos == 1  # as they were
    request = _render(api, "DELETE", "/api/v1/clients/keeper/subscriptions/kept/%23")
    store.write(store.generation, StoreError("the disk is full"))
    assert _answered(request) is not None and _answered(request)[0] == 503


def test_a_change_whose_client_went_away_before_the_store_wrote_it_is_not_answered() -> None:
    """The request's connection was lost while the store wrote: no answer, and no error."""
    from twisted.internet.error import ConnectionLost
    from twisted.logger import capturedLogs
    from twisted.python.failure import Failure
    store = HeldStore()
    broker, _ = _stored_subscriber(store)
    protocol, transport = site_connection(broker.operations.site())
    body = b'{"topic": "kept/1", "payload": "m", "qos": 1}'
    protocol.dataReceived(b"POST /api/v1/publish HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer " + KEY.encode()
                          + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert transport.value() == b""
    protocol.connectionLost(Failure(ConnectionLost()))
    with capturedLogs() as events:
        store.write(store.generation)
    assert transport.value() == b""
    assert [e for e in events if e.get("log_failure") is not None or e.get("isError")] == []


# --- paths, keys and refusals a second look found wrong ------------------------------------------------

def test_a_path_is_read_as_utf8_once_percent_decoded() -> None:
    """Through the site: a client id or topic beyond ASCII, percent-encoded (twisted.web takes
    no raw byte beyond ASCII in a request line), names what it says; a path that is not UTF-8
    once decoded is answered 400."""
    broker, _ = started()
    client = connected(broker, "café")
    broker.route_own("température/salon", b"21", retain=True)
    answers = []
    for method, path in ((b"GET", b"/api/v1/retained/temp%C3%A9rature/salon"), (b"DELETE", b"/api/v1/clients/caf%C3%A9"),
                         (b"GET", b"/api/v1/clients/caf%E9")):
        channel, transport = site_connection(broker.operations.site())
        channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                             + b"\r\n\r\n")
        answers.append(transport.value().split(b"\r\n", 1)[0])
    assert answers == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]
    assert client.protocol.state.name == "CLOSED"


def test_a_key_beyond_ascii_is_taken_as_operations_md_hashes_it() -> None:
    """operations.md hashes a key one already has as UTF-8; the header was read as Latin-1 and
    encoded again as UTF-8, so such a key never matched."""
    key = "clé-secrète-0123456789"
    broker = make_broker(http_api_keys=["ops:" + hash_key(key)], sys_interval=0)
    broker.startService()
    api = ApiResource(broker, broker.operations)
    for header in (b"authorization", b"x-api-key"):
        request = DummyRequest([b""])
        request.method, request.path = b"GET", b"/api/v1/stats"
        request.requestHeaders.addRawHeader(header, (b"Bearer " if header == b"authorization" else b"") + key.encode())
        api.render(request)
        assert request.responseCode in (None, 200), header


def test_the_admin_site_mounted_under_a_path_of_ones_own_answers_its_api() -> None:
    """operations.md: the site is there "to mount in their own twisted.web tree", and the
    dashboard asks for its API by a relative URL ("api/v1"). Mounted at /admin/, every API call
    answered 404: the API read the request's whole path and wanted it to begin with /api/v1."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    broker, _ = started()
    root = Resource()
    root.putChild(b"admin", broker.operations.site().resource)
    site = Site(root)
    answers = []
    for path in (b"/admin/api/v1/health", b"/admin/api/v1/stats", b"/admin/api/v2/stats"):
        channel, transport = site_connection(site)
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
        answers.append(transport.value().split(b"\r\n", 1)[0])
    assert answers == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"]


def test_deleting_an_expired_retained_message_is_404_as_reading_it() -> None:
    """GET /retained/{topic} answers 404 for a retained message that expired (not swept yet);
    DELETE answered 204 "Deleted" for the message the API says is not there."""
    broker, api = started()
    publisher = connected(broker, "pub", version=5)
    publisher.publish("status/x", b"stale", retain=True, properties={"message_expiry_interval": 1})
    broker.reactor.advance(5)
    assert call(api, "GET", "/api/v1/retained/status/x")[0] == 404
    assert call(api, "DELETE", "/api/v1/retained/status/x")[0] == 404


def test_paging_values_the_document_allows_are_taken() -> None:
    """openapi.json gives offset and payload_max a minimum of 0 and no maximum; the API answered
    400 to an offset past 2**31 and a payload_max past the largest packet."""
    broker, api = started()
    broker.route_own("r/t", b"v", retain=True)
    status, answer = call(api, "GET", "/api/v1/clients?offset=3000000000")
    assert (status, answer["items"]) == (200, [])
    status, answer = call(api, "GET", "/api/v1/retained?payload_max=300000000")
    assert (status, [item["payload"] for item in answer["items"]]) == (200, ["v"])
    assert call(api, "GET", "/api/v1/clients?offset=" + "9" * 5000)[0] == 400  # (no number that long)


def test_a_sys_value_cannot_be_replaced_through_the_api() -> None:
    """$SYS values are published again when they change or are deleted (operations.md): one
    replaced (POST /publish, retained, on $SYS/broker/version) kept the false value for good.
    The API takes no PUBLISH there, as from a client."""
    broker, api = started(sys_interval=10)
    status, answer = call(api, "POST", "/api/v1/publish",
                          b'{"topic": "$SYS/broker/version", "payload": "mosquitto version 1.0", "retain": true}')
    assert (status, answer["error"]) == (400, "'$SYS/broker/version' is reserved: $SYS topics are the broker's own, "
                                              "$share names shared subscriptions")
    broker.reactor.advance(10)
    version = broker.retained.get("$SYS/broker/version")
    assert version is not None and version.payload.startswith(b"mqtt_broker version")


def test_every_subscription_a_suback_refuses_is_counted_by_its_reason() -> None:
    """mqtt_subscriptions_refused_total: "topic filters refused in SUBACKs"; a hook's refusal
    (and an invalid filter's) was counted nowhere."""
    from mqtt_broker.admin import figures
    from mqtt_broker.hooks import Refused
    from mqtt_broker.wire.codes import ReasonCode
    broker, _ = started(wildcard_subscription_available=False)
    broker.hooks.on_subscribe(lambda client, subscription: Refused(ReasonCode.QUOTA_EXCEEDED)
                              if subscription.topic_filter == "busy" else subscription.topic_filter != "secret")
    client = connected(broker, "s", version=5)
    [suback] = client.subscribe("secret", "busy", "a/#", "ok")
    assert list(suback.reason_codes) == [0x80, 0x97, 0xA2, 0]
    assert figures.read(broker).subscriptions_refused == {
        "UNSPECIFIED_ERROR": 1, "QUOTA_EXCEEDED": 1, "WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED": 1}


def test_a_filter_a_suback_refuses_for_the_store_is_counted() -> None:
    """The store failed a SUBSCRIBE's batch: each filter answered 0x80, and counted nowhere."""
    from twisted.internet.defer import Deferred

    from mqtt_broker.admin import figures
    from mqtt_broker.store import StoreError
    from mqtt_broker.store.memory import MemoryStore

    class Failing(MemoryStore):
        def flushed(self) -> Deferred[None]:
            failed: Deferred[None] = Deferred()
            failed.errback(StoreError("the disk is full"))
            return failed
    broker = make_broker(store=Failing())
    broker.startService()
    client = connected(broker, "s", version=5, clean=False, properties={"session_expiry_interval": 60})
    [suback] = client.subscribe("a", "b")
    assert list(suback.reason_codes) == [0x80, 0x80]
    assert figures.read(broker).subscriptions_refused == {"UNSPECIFIED_ERROR": 2}

"""The admin site as a whole: TLS by endpoint string, MQTT over WebSocket at /mqtt on the same
port, /metrics behind a key, the dashboard's files, readiness, the command line, API keys."""

from __future__ import annotations

import json
import queue
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
import pytest_twisted
from admin_http import KEY, OTHER_KEY, start_admin
from conftest import ROOT, free_port, wait_for_port
from paho_helpers import WAIT, PahoClient
from test_tls import _endpoint_quote, make_certs
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.python import usage
from twisted.web.test.requesthelper import DummyRequest

from mqtt_broker.admin.api import OPENAPI
from mqtt_broker.admin.keys import KeyRing, hash_key, parse
from mqtt_broker.tap import Options, makeService
from protocol_helpers import make_broker


def test_https_by_endpoint_string(broker_process: Any, tmp_path: Path) -> None:
    make_certs(tmp_path / "certs")
    certs = tmp_path / "certs"
    port = free_port()
    endpoint = (f"ssl:{port}:interface=127.0.0.1:privateKey={_endpoint_quote(certs / 'server.key')}"
                f":certKey={_endpoint_quote(certs / 'server.pem')}")
    broker = broker_process("--persistence", "memory", "--http", endpoint.replace("{", "{{").replace("}", "}}"),
                            "--http-api-key", hash_key(KEY))
    wait_for_port(port, broker.process)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    request = urllib.request.Request(f"https://localhost:{port}/api/v1/stats", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        assert response.status == 200 and "clients_connected" in json.load(response)
    with pytest.raises(OSError):  # plain HTTP is not spoken there (URLError or the connection dropped)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=10)


def test_mqtt_over_websocket_shares_the_admin_port(broker_process: Any) -> None:
    admin = start_admin(broker_process, "--http-websocket", "true")
    received: queue.Queue[Any] = queue.Queue()
    connected: queue.Queue[Any] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="over-ws", transport="websockets")
    client.ws_set_options(path="/mqtt")
    client.on_connect = lambda c, u, flags, rc, props: connected.put(rc)
    client.on_subscribe = lambda c, u, mid, rcs, props: connected.put(rcs)
    client.on_message = lambda c, u, m: received.put(m)
    client.connect("127.0.0.1", admin.http_port, keepalive=60)
    client.loop_start()
    try:
        assert connected.get(timeout=WAIT) == 0
        client.subscribe("ws/#", qos=1)
        connected.get(timeout=WAIT)
        publisher = PahoClient(admin.broker.port, "tcp-publisher")
        publisher.publish("ws/t", b"from tcp", qos=1)
        message = received.get(timeout=WAIT)
        assert (message.topic, message.payload) == ("ws/t", b"from tcp")
        publisher.close()
        listed = admin.call("GET", "/api/v1/clients/over-ws")
        assert listed.status == 200 and listed.body["connected"] and listed.body["subscription_count"] == 1
        assert admin.call("GET", "/api/v1/health", key=None).status == 200   # the API still answers beside it
    finally:
        client.loop_stop()
        client.disconnect()


def test_metrics_behind_a_key_and_the_dashboard_files(broker_process: Any) -> None:
    admin = start_admin(broker_process, "--http-metrics-auth", "true")
    missing = admin.call("GET", "/metrics", key=None)
    assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert admin.call("GET", "/metrics", key=OTHER_KEY).status == 403
    scraped = admin.call("GET", "/metrics")
    assert scraped.status == 200 and b"mqtt_messages_received_total" in scraped.body
    page = admin.call("GET", "/", key=None)
    assert page.status == 200 and b'<script src="dashboard.js"' in page.body
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    script = admin.call("GET", "/dashboard.js", key=None)
    assert script.status == 200 and "javascript" in script.headers["content-type"]
    assert admin.call("GET", "/nothing-here.html", key=None).status == 404


def test_without_http_endpoints_nothing_listens_for_http() -> None:
    broker = make_broker()
    broker.startService()
    assert broker.ports == [] and broker.operations.monitors is None


@pytest.mark.parametrize("keys", [[], [hash_key(KEY)]])
def test_an_admin_site_without_keys_is_warned_of_and_says_so(keys: list[str]) -> None:
    """Without http_api_keys every path but health, readiness and the OpenAPI document answers
    401, and nothing said why: the start warns, and the 401 says none is configured."""
    from twisted.logger import capturedLogs

    from mqtt_broker.admin.api import ApiResource
    broker = make_broker(http_endpoints=["tcp:0:interface=127.0.0.1"], http_api_keys=keys)
    with capturedLogs() as events:
        broker.startService()
    try:
        warned = [e for e in events if e["log_level"].name == "warn" and "http_api_keys" in e["log_format"]]
        assert len(warned) == (0 if keys else 1)
        request = DummyRequest([b""])
        request.path = b"/api/v1/clients"
        body = json.loads(ApiResource(broker, broker.operations).render(request))
        assert request.responseCode == 401
        assert ("no API key is configured" in body["error"]) == (not keys), body
    finally:
        broker.stopService()


def test_readiness_before_start_and_after_stop() -> None:
    from mqtt_broker.admin.api import ApiResource
    broker = make_broker()
    api = ApiResource(broker, broker.operations)

    def ready() -> tuple[int, Any]:
        request = DummyRequest([b""])
        request.path = b"/api/v1/ready"
        body = api.render(request)
        return request.responseCode or 200, json.loads(body)
    assert ready() == (503, {"ready": False, "reason": "the broker is not running"})
    broker.startService()
    assert ready() == (503, {"ready": False, "reason": "the broker is not listening"})  # endpoints=[]
    broker.stopService()
    assert ready()[0] == 503


def test_a_refused_request_is_logged_with_its_path_quoted_and_escaped() -> None:
    from twisted.internet.testing import StringTransport
    from twisted.logger import capturedLogs, formatEvent
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from mqtt_broker.admin.api import ApiResource
    broker = make_broker()
    root = Resource()
    root.putChild(b"api", ApiResource(broker, broker.operations))
    channel = Site(root).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    with capturedLogs() as events:
        channel.dataReceived(b"DELETE /api/v1/clients/a\x9b2J\x85forged HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400")  # (a path that is not UTF-8)
    [line] = [formatEvent(e) for e in events if "admin API" in (formatEvent(e) or "")]
    assert line == ("admin API: 'DELETE' '/api/v1/clients/a\\x9b2J\\x85forged' by key - refused: 400 (1 refused "
                    "without a key; logged once per thousand)")


def test_changes_are_refused_once_the_broker_is_stopped() -> None:
    """An HTTP connection kept open across the stop (stopListening closes the port only) could
    change the state of a broker whose store was closed."""
    from mqtt_broker.admin.api import ApiResource
    from mqtt_broker.message import Message
    broker = make_broker(close_linger=0, http_api_keys=[hash_key(KEY)])
    api = ApiResource(broker, broker.operations)
    broker.startService()
    broker.retained.store(Message(topic="status/app", payload=b"up", retain=True))
    broker.stopService()
    request = DummyRequest([b""])
    request.method = b"DELETE"
    request.path = b"/api/v1/retained/status/app"
    request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + KEY.encode())
    answer = json.loads(api.render(request))
    assert request.responseCode == 503 and answer == {"error": "the broker is stopped"}
    assert broker.retained.get("status/app") is not None


@pytest_twisted.inlineCallbacks
def test_a_broker_whose_start_failed_refuses_changes(tmp_path: Path) -> Iterator[Deferred[Any]]:
    """The start failed at its store (the database held by another program): the store is not
    open, as after a stop."""
    from twisted.internet import reactor

    from mqtt_broker.admin.api import ApiResource
    from mqtt_broker.store import StoreError
    from mqtt_broker.store.sqlite import SQLiteStore
    broker = make_broker(persistence="sqlite", data_dir=str(tmp_path), close_linger=0,
                         http_api_keys=[hash_key(KEY)])
    holder = SQLiteStore(tmp_path / "mqttbroker.db", reactor)
    holder.load()
    try:
        with pytest.raises(StoreError):
            broker.startService()
        request = DummyRequest([b""])
        request.method = b"DELETE"
        request.path = b"/api/v1/retained/status/app"
        request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + KEY.encode())
        ApiResource(broker, broker.operations).render(request)
        assert request.responseCode == 503 and broker.stopped
    finally:
        yield holder.close()


# --- the command line ------------------------------------------------------------------------

def test_http_flags_are_repeatable() -> None:
    options = Options()
    options.parseOptions(["--http", "tcp:8080", "--http", "tcp:8081:interface=127.0.0.1",
                          "--http-api-key", hash_key("a"), "--http-api-key", "ops:" + hash_key("b"),
                          "--sys-interval", "2.5", "--http-max-body-size", "1000"])
    config = options["broker_config"]
    assert config.http_endpoints == ["tcp:8080", "tcp:8081:interface=127.0.0.1"]
    assert config.http_api_keys == [hash_key("a"), "ops:" + hash_key("b")]
    assert (config.sys_interval, config.http_max_body_size) == (2.5, 1000)


@pytest.mark.parametrize("args, message", [
    (["--http", "tcp:notaport"], "--http 'tcp:notaport': "),
    (["--http-api-key", "plain-text-key"], "--http-api-key: entry 1 is not a hashed key"),
    (["--sys-interval", "-1"], "--sys-interval: -1.0 is out of range"),
])
def test_bad_http_flags_name_the_flag(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(args)
    assert str(caught.value).startswith(message)


def test_busy_http_port_fails_start_up() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        options = Options()
        options.parseOptions(["--endpoint", f"tcp:{free_port()}:interface=127.0.0.1", "--persistence", "memory",
                              "--http", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"])
        service = makeService(options)
        with pytest.raises(CannotListenError):
            service.startService()
        assert not service.running and service.ports == []


# --- API keys ----------------------------------------------------------------------------------

def test_keys_tool_makes_a_key_and_its_config_line() -> None:
    result = subprocess.run([sys.executable, "-m", "mqtt_broker.admin.keys", "ops"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=True)
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    key = lines["key"].strip()
    entry = json.loads(lines["config"].split("=", 1)[1])[0]
    assert entry == "ops:" + hash_key(key) and len(key) >= 40
    assert KeyRing([entry]).identify(key) == "ops"
    bad = subprocess.run([sys.executable, "-m", "mqtt_broker.admin.keys", "no spaces"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2


@pytest.mark.parametrize("name", ["capteur-é", "٣"])
def test_the_keys_tool_refuses_a_name_the_setting_would_refuse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Letters and digits of any script passed the tool's check (str.isalnum), and the entry it
    printed was refused by twistd mqttbroker (--http-api-key: not a hashed key)."""
    from mqtt_broker.admin import keys
    from mqtt_broker.tap import Options
    assert keys.main(["keys", name]) == 2
    assert "key:" not in capsys.readouterr().out
    entry = f"{name}:{hash_key('x')}"
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--endpoint", "tcp:0", "--http-api-key", entry])


@pytest.mark.parametrize("argument, status", [("--help", 0), ("-h", 0), ("--name", 2)])
def test_the_keys_tool_takes_an_option_for_no_name(argument: str, status: int,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A name may hold "-": "--help" made a key named --help instead of telling how to use it."""
    from mqtt_broker.admin import keys
    assert keys.main(["keys", argument]) == status
    out, err = capsys.readouterr()
    assert "key:    " not in out and "usage: python -m mqtt_broker.admin.keys [NAME]" in (out if status == 0 else err)


def test_key_ids_and_the_documented_one_liner() -> None:
    one_liner = subprocess.run(
        [sys.executable, "-c", 'import hashlib,sys; print("sha256:" + hashlib.sha256(sys.argv[1].encode()).hexdigest())',
         "s3cret"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    assert one_liner == hash_key("s3cret")
    ring = KeyRing([hash_key("s3cret"), "ci:" + hash_key("other")])
    assert ring.identify("s3cret") == hash_key("s3cret")[7:15]   # unnamed: the first 8 hex digits
    assert ring.identify("other") == "ci"
    assert ring.identify("S3cret") is None and ring.identify("") is None
    assert [k.key_id for k in parse(["a.b-c_d:" + hash_key("x")])] == ["a.b-c_d"]


# --- a client that sends and does not read ---------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_pipelined_requests_of_a_client_that_reads_nothing_are_answered_only_as_it_reads() -> Iterator[Deferred[Any]]:
    """200 pipelined GET /api/v1/openapi.json (public, a 42 KB answer) from a client that reads
    nothing. twisted.web's HTTPChannel answered every request it had read, its socket full or
    not: 64 KiB of such requests (1,400) made the transport hold 60 MB until the idle timeout.
    The admin site answers the next request only once its socket took the last answer; then,
    as the client reads, the rest."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from mqtt_broker.linger import unsent_bytes
    from mqtt_broker.testing import MemoryBroker
    site = MemoryBroker(sys_interval=0).service.operations.site()
    rendered: list[Any] = []

    class Counted(site.requestFactory):  # type: ignore[misc, name-defined]
        def process(self) -> None:
            rendered.append(self.channel.transport)
            super().process()

    site.requestFactory = Counted
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    # (accepted sockets take the listener's: without it, Linux lets a loopback socket's send
    # buffer grow to megabytes, which would take many answers before the transport holds any)
    port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: broker\r\n\r\n" * 200
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        client.setblocking(False)
        offset = 0
        for _ in range(500):  # bounded: until all is sent, and no more is answered for 0.2 s
            if offset < len(sent):
                try:
                    offset += client.send(sent[offset:offset + 4096])
                except BlockingIOError:
                    pass
            answered = len(rendered)
            yield deferLater(reactor, 0.01, lambda: None)
            if offset == len(sent) and len(rendered) == answered:
                yield deferLater(reactor, 0.2, lambda: None)
                if len(rendered) == answered:
                    break
        answers, answer = len(rendered), len(OPENAPI.read_bytes())
        assert 1 <= answers <= 5, f"{answers} answers rendered for a client that reads nothing"
        assert unsent_bytes(rendered[0]) < 4 * answer
        for _ in range(20_000):  # bounded: the client reads, and every request is answered
            try:
                client.recv(1 << 16)
            except BlockingIOError:
                yield deferLater(reactor, 0, lambda: None)
            if len(rendered) == 200 and not unsent_bytes(rendered[0]):
                break
        assert len(rendered) == 200
    finally:
        client.close()
        yield port.stopListening()
        if rendered:
            rendered[0].abortConnection()


# --- docs/operations.md: the admin site mounted in an embedder's own twisted.web tree ----------

def test_the_admin_api_mounted_in_an_embedders_tree_keeps_to_http_max_body_size() -> None:
    """docs/operations.md: "Embedders get the same site from `broker.operations.site()`, to listen
    on or to mount in their own twisted.web tree", and a body above `http_max_body_size` is
    answered 400 (the setting: "a larger one is answered 400"). Mounted under a Site of the
    embedder's, the API takes any body: the bound lives only in the admin site's own request
    factory (BoundedRequest), which a mounted resource is not served by."""
    import hashlib
    import json

    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from mqtt_broker.testing import MemoryBroker
    key = "operator-key-0123456789"
    broker = MemoryBroker(sys_interval=0, http_max_body_size=100,
                          http_api_keys=["sha256:" + hashlib.sha256(key.encode()).hexdigest()])

    def status(site: Site, path: str, body: bytes) -> bytes:
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            f"POST {path} HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body)
        return transport.value().split(b"\r\n", 1)[0]

    body = json.dumps({"topic": "t", "payload": "x" * 500}).encode()
    own = broker.service.operations.site()
    assert status(own, "/api/v1/publish", body) == b"HTTP/1.1 400 Bad Request"  # its own site: bounded
    root = Resource()
    root.putChild(b"admin", own.resource)
    assert status(Site(root), "/admin/api/v1/publish", body) == b"HTTP/1.1 400 Bad Request"


def test_the_admin_api_mounted_in_an_embedders_tree_takes_a_chunked_or_large_body() -> None:
    """Mounted under a Site of the embedder's, a request's body is twisted.web's own: a temporary
    file when it is 100,000 bytes or more or comes chunked (no Content-Length), which has no
    getvalue(). POST /publish (and a subscribe) answered 500 and logged a traceback for a body
    well under http_max_body_size."""
    import hashlib
    import json

    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from mqtt_broker.testing import MemoryBroker
    key = "operator-key-0123456789"
    broker = MemoryBroker(sys_interval=0, http_api_keys=["sha256:" + hashlib.sha256(key.encode()).hexdigest()])
    root = Resource()
    root.putChild(b"admin", broker.service.operations.site().resource)

    def status(body: bytes, chunked: bool) -> bytes:
        protocol = Site(root).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        framing = (b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
                   if chunked else f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        protocol.dataReceived(f"POST /admin/api/v1/publish HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {key}\r\n"
                              f"Content-Type: application/json\r\nConnection: close\r\n".encode() + framing)
        return transport.value().split(b"\r\n", 1)[0]

    small = json.dumps({"topic": "t", "payload": "x"}).encode()
    large = json.dumps({"topic": "t", "payload": "x" * 150_000}).encode()
    assert [status(small, chunked=True), status(large, chunked=False)] == [b"HTTP/1.1 200 OK"] * 2

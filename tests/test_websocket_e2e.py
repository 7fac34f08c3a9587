"""MQTT over WebSocket end to end: the broker as a process with --websocket listeners (plain and
TLS), paho-mqtt with transport="websockets" (3.1, 3.1.1, 5), raw WebSocket clients on real
sockets for what libraries will not send, the twisted.web mount, and the plugin's flags.

Every wait is bounded: socket timeouts, queue timeouts, wait_for_port.
"""

from __future__ import annotations

import queue
import socket
import ssl
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest
from conftest import PACKAGE_ROOT, ROOT, BrokerProcess, free_port, wait_for_port
from paho_helpers import PahoClient
from test_tls import _endpoint_quote, client_context, make_certs, read_until_closed
from twisted.internet.error import CannotListenError
from twisted.python import usage
from websocket_helpers import CLOSE, TEXT, RawWebSocket

from mqtt_broker.config import BrokerConfig
from mqtt_broker.tap import Options, makeService
from mqtt_broker.wire import Connack, Connect, Disconnect, Pingreq, Pingresp, Publish, Suback, Subscribe, \
    SubscriptionRequest, encode

WAIT = 10.0


class WebSocketPaho(PahoClient):
    """PahoClient with transport="websockets" (and TLS when ``ca_certs`` is given)."""

    def __init__(self, port: int, client_id: str = "", version: int = mqtt.MQTTv311, path: str = "/mqtt",
                 ca_certs: str | None = None, clean: bool = True) -> None:
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": version, "transport": "websockets"}
        if version != mqtt.MQTTv5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.client.ws_set_options(path=path)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(("connect", (flags, rc)))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.events.put(("subscribe", rcs))
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put(("disconnect", rc))
        if ca_certs is not None:
            self.client.tls_set(ca_certs=ca_certs)
        self.client.connect("localhost" if ca_certs else "127.0.0.1", port, keepalive=60,
                            **({"clean_start": clean} if version == mqtt.MQTTv5 else {}))
        self.client.loop_start()
        kind, (self.flags, self.reason) = self.event("connect")


class WSBroker:
    """A broker process with a TCP endpoint and a WebSocket one."""

    def __init__(self, broker_process: type[BrokerProcess], *args: str, websocket: str = "tcp:{port}:interface=127.0.0.1") -> None:
        self.ws_port = free_port()
        self.broker = broker_process("--websocket", websocket.format(port=self.ws_port), *args)
        self.port = self.broker.port
        wait_for_port(self.ws_port, self.broker.process)

    def events(self) -> list[dict[str, Any]]:
        return self.broker.events()

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events()
                if e.get("log_level", {}).get("name") in ("error", "critical") or "log_failure" in e]


@pytest.fixture
def ws_broker(broker_process: type[BrokerProcess]) -> Iterator[WSBroker]:
    broker = WSBroker(broker_process, "--persistence", "memory")
    yield broker
    assert broker.broker.process.poll() is None, "the broker died:\n" + broker.broker.output()
    assert broker.errors() == []


def round_trip(ws: PahoClient, tcp: PahoClient, tag: str) -> None:
    """A message each way between a WebSocket client and a TCP client, QoS 1."""
    assert [int(getattr(c, "value", c)) for c in ws.subscribe(f"{tag}/to-ws", qos=1)] == [1]
    tcp.subscribe(f"{tag}/to-tcp", qos=1)
    tcp.publish(f"{tag}/to-ws", b"from tcp " + b"x" * 70_000, qos=1)  # a 64-bit frame length
    message = ws.message()
    assert (message.topic, message.payload[:8], len(message.payload), message.qos) == (
        f"{tag}/to-ws", b"from tcp", 70_009, 1)
    ws.publish(f"{tag}/to-tcp", b"from ws", qos=1)
    message = tcp.message()
    assert (message.topic, message.payload, message.qos) == (f"{tag}/to-tcp", b"from ws", 1)


# --- paho-mqtt over ws:// and wss:// ------------------------------------------------------------

@pytest.mark.parametrize("version", [mqtt.MQTTv31, mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1", "3.1.1", "5"])
def test_paho_over_websocket(ws_broker: WSBroker, version: int) -> None:
    ws = WebSocketPaho(ws_broker.ws_port, f"ws-{version}", version)
    tcp = PahoClient(ws_broker.port, f"tcp-{version}", version=version)
    try:
        assert ws.reason == 0
        round_trip(ws, tcp, f"v{version}")
    finally:
        ws.close()
        tcp.close()


@pytest.mark.parametrize("path", ["/", "/mqtt", "/any/path"])
def test_any_path_by_default(ws_broker: WSBroker, path: str) -> None:
    client = WebSocketPaho(ws_broker.ws_port, "pathy", path=path)
    assert client.reason == 0
    client.close()


def test_paths_option(broker_process: type[BrokerProcess]) -> None:
    broker = WSBroker(broker_process, "--websocket-path", "/mqtt", "--persistence", "memory")
    WebSocketPaho(broker.ws_port, "right-path", path="/mqtt").close()
    wrong = RawWebSocket(broker.ws_port, path="/")
    assert wrong.status == 404
    assert wrong.until_closed() == []


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1.1", "5"])
def test_paho_over_websocket_tls(broker_process: type[BrokerProcess], tmp_path: Path, version: int) -> None:
    certs = tmp_path / "certs"
    make_certs(certs)
    wss = (f"ssl:{{port}}:interface=127.0.0.1:privateKey={_endpoint_quote(certs / 'server.key')}"
           f":certKey={_endpoint_quote(certs / 'server.pem')}")
    broker = WSBroker(broker_process, "--persistence", "memory", websocket=wss)
    ws = WebSocketPaho(broker.ws_port, "wss", version, ca_certs=str(certs / "ca.pem"))
    tcp = PahoClient(broker.port, "tcp", version=version)
    try:
        sock = ws.client.socket()._socket  # type: ignore[union-attr]  # under paho's WebSocket wrapper
        assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
        round_trip(ws, tcp, "tls")
    finally:
        ws.close()
        tcp.close()
    # A client that does not trust the CA does not get in; one that speaks plain ws:// neither.
    make_certs(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        RawWebSocket(broker.ws_port, context=client_context(tmp_path / "other" / "ca.pem"))
    with pytest.raises((ConnectionError, socket.timeout)):
        RawWebSocket(broker.ws_port)
    assert broker.errors() == []


def certificate_client(transport: str, port: int, certs: Path, topics: list[str]) -> list[Any]:
    """Connect with the client certificate, subscribe to ``topics``, publish one message to each;
    returns what happened, in order."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cert-{transport}", transport=transport)
    client.tls_set(ca_certs=str(certs / "ca.pem"), certfile=str(certs / "client.pem"), keyfile=str(certs / "client.key"))
    events: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, u, flags, rc, props: events.put(("connect", int(rc.value)))
    client.on_subscribe = lambda c, u, mid, rcs, props: events.put(("subscribe", [int(r.value) for r in rcs]))
    client.on_message = lambda c, u, m: events.put(("message", m.topic, m.payload))
    client.connect("localhost", port)
    client.loop_start()
    happened = []
    try:
        happened.append(events.get(timeout=WAIT))
        client.subscribe([(topic + "/#", 1) for topic in topics])
        happened.append(events.get(timeout=WAIT))
        for topic in topics:
            client.publish(f"{topic}/x", topic.encode(), qos=1).wait_for_publish(WAIT)
        client.publish("end", b"", qos=1).wait_for_publish(WAIT)
        client.subscribe("end")  # answered after every message before it was delivered
        while (event := events.get(timeout=WAIT))[0] != "subscribe":
            happened.append(event)
    finally:
        client.disconnect()
        client.loop_stop()
    return happened


def test_client_certificates_over_wss_as_over_mqtts(broker_process: type[BrokerProcess], tmp_path: Path) -> None:
    """An mqtts: endpoint (client certificates required and verified) under --websocket: a client
    with a certificate gets exactly what it gets on the same kind of endpoint without WebSocket,
    under the same certificate, username and ACL settings; one without a certificate gets nothing."""
    certs = tmp_path / "certs"
    make_certs(certs)
    acl = tmp_path / "acl"
    acl.write_text("user client\ntopic readwrite secure/#\n")
    mqtts = (f"mqtts:{{port}}:interface=127.0.0.1:privateKey={_endpoint_quote(certs / 'server.key')}"
             f":certKey={_endpoint_quote(certs / 'server.pem')}:caCerts={_endpoint_quote(certs / 'ca.pem')}")
    tls_port = free_port()
    broker = WSBroker(broker_process, "--persistence", "memory", "--use-identity-as-username", "true",
                      "--allow-anonymous", "false", "--acl-file", str(acl),
                      "--endpoint", mqtts.format(port=tls_port), websocket=mqtts)
    wait_for_port(tls_port, broker.broker.process)
    over_tls = certificate_client("tcp", tls_port, certs, ["secure", "other"])
    over_wss = certificate_client("websockets", broker.ws_port, certs, ["secure", "other"])
    assert over_tls[0] == ("connect", 0) and ("message", "secure/x", b"secure") in over_tls
    assert over_wss == over_tls
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # no certificate: no TLS
        RawWebSocket(broker.ws_port, context=client_context(certs / "ca.pem")).next_frame()
    assert broker.errors() == []


# --- raw WebSocket cases on a real socket ----------------------------------------------------------

def connected_raw(port: int, client_id: str, **kwargs: Any) -> RawWebSocket:
    client = RawWebSocket(port, **kwargs)
    assert client.status == 101 and client.headers["sec-websocket-protocol"] == "mqtt"
    client.send(encode(Connect(client_id=client_id, keep_alive=30)))
    assert client.packets() == [Connack(reason_code=0)]
    return client


def test_text_frame_closes_the_connection(ws_broker: WSBroker) -> None:  # [MQTT-6.0.0-1]
    client = connected_raw(ws_broker.ws_port, "texter")
    client.send(encode(Pingreq()), TEXT)
    [close] = client.until_closed()  # the broker answers with a close frame and closes, unprompted
    assert close.opcode == CLOSE and close.close_code == 1003


def test_an_mqtt5_client_silent_past_its_keepalive_reads_why_before_the_end(ws_broker: WSBroker) -> None:
    """As over TCP: DISCONNECT 0x8D, which the abort of the socket threw away."""
    client = RawWebSocket(ws_broker.ws_port, version=5)
    client.send(encode(Connect(client_id="sleepy", keep_alive=1, protocol_level=5), 5))
    assert client.packets()[0].reason_code == 0  # type: ignore[union-attr]
    [disconnect] = client.packets()  # within WAIT: 1.5 s
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x8D
    assert client.next_frame().close_code == 1000
    client.send(b"\x03\xe8", CLOSE)
    assert client.until_closed() == []


@pytest.mark.parametrize("offered", [None, ("wamp.2.json",)], ids=["none", "unknown"])
def test_missing_or_unknown_subprotocol_is_refused(ws_broker: WSBroker, offered: tuple[str, ...] | None) -> None:
    client = RawWebSocket(ws_broker.ws_port, protocols=offered)
    assert client.status == 400 and "sec-websocket-protocol" not in client.headers
    assert client.until_closed() == []
    # paho offers "mqtt" itself; the same port still serves it.
    WebSocketPaho(ws_broker.ws_port, "after-refusal").close()


def test_packet_split_across_three_frames(ws_broker: WSBroker) -> None:
    client = RawWebSocket(ws_broker.ws_port)
    connect = encode(Connect(client_id="three-frames", keep_alive=30))
    client.send(connect[:2], fin=False)
    client.send(connect[2:11], opcode=0, fin=False)
    client.send(connect[11:], opcode=0, fin=True)
    assert client.packets() == [Connack(reason_code=0)]
    subscribe = encode(Subscribe(packet_id=3, subscriptions=(SubscriptionRequest(topic_filter="s/#", qos=1),)))
    for part in (subscribe[:1], subscribe[1:4], subscribe[4:]):  # three messages this time
        client.send(part)
    assert client.packets() == [Suback(packet_id=3, reason_codes=(1,))]
    client.send(encode(Disconnect()))
    assert [f.close_code for f in client.until_closed()] == [1000]


def test_two_packets_in_one_frame(ws_broker: WSBroker) -> None:
    client = RawWebSocket(ws_broker.ws_port)
    client.send(encode(Connect(client_id="two-in-one")) +
                encode(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="two"),))) +
                encode(Publish(topic="two", payload=b"to myself")) + encode(Pingreq()))
    connack, suback, publish, pingresp = client.packets(4)
    assert (connack, suback, pingresp) == (Connack(reason_code=0), Suback(packet_id=1, reason_codes=(0,)), Pingresp())
    assert isinstance(publish, Publish) and publish.payload == b"to myself"


def test_oversize_frame_closes_with_1009(broker_process: type[BrokerProcess]) -> None:
    broker = WSBroker(broker_process, "--websocket-max-frame-size", "4096", "--persistence", "memory")
    sub = PahoClient(broker.port, "watcher")
    sub.subscribe("big/#", qos=1)
    client = connected_raw(broker.ws_port, "bigmouth")
    client.send(encode(Publish(topic="big/ok", payload=b"x" * 4000)))
    assert sub.message().topic == "big/ok"
    client.send(encode(Publish(topic="big/no", payload=b"x" * 5000)))
    frame = client.next_frame()
    assert frame.opcode == CLOSE and frame.close_code == 1009
    client.send(b"\x03\xe8", CLOSE)  # answer the close: the broker closes the socket
    assert client.until_closed() == []
    assert sub.no_message()
    sub.close()


def test_ping_answered_and_mqtt_keeps_working(ws_broker: WSBroker) -> None:
    client = connected_raw(ws_broker.ws_port, "pinger")
    client.send(b"ping!", opcode=9)
    pong = client.next_frame()
    assert (pong.opcode, pong.payload) == (10, b"ping!")
    client.send(encode(Pingreq()))
    assert client.packets() == [Pingresp()]


def test_stalled_handshake_is_dropped(broker_process: type[BrokerProcess]) -> None:
    broker = WSBroker(broker_process, "--websocket-handshake-timeout", "1", "--persistence", "memory")
    with socket.create_connection(("127.0.0.1", broker.ws_port), timeout=WAIT) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
        assert read_until_closed(sock) == b""  # aborted by the broker, within WAIT
        assert time.monotonic() - started >= 0.5
    WebSocketPaho(broker.ws_port, "after-stall").close()


def test_oversize_handshake_is_refused(ws_broker: WSBroker) -> None:
    client = RawWebSocket(ws_broker.ws_port, headers={"Cookie": "a" * 20_000})
    assert client.status == 431
    assert client.until_closed() == []


def test_forwarded_for_from_a_trusted_proxy(broker_process: type[BrokerProcess]) -> None:
    broker = WSBroker(broker_process, "--websocket-trusted-proxy", "127.0.0.0/8", "--persistence", "memory",
                      "--connection-messages", "true")
    client = connected_raw(broker.ws_port, "behind-proxy", headers={"X-Forwarded-For": "203.0.113.9, 127.0.0.2"})
    client.send(encode(Disconnect()))
    client.until_closed()
    [closing] = [e for e in broker.events() if e.get("client_id") == "behind-proxy"
                 and e.get("log_format", "").startswith("closing connection")]
    assert closing["peer"] == "203.0.113.9:0"


def test_tcp_and_websocket_clients_take_over_each_others_sessions(ws_broker: WSBroker) -> None:
    tcp = PahoClient(ws_broker.port, "roamer", clean=False)
    tcp.subscribe("roam/#", qos=1)
    tcp.close()
    publisher = PahoClient(ws_broker.port, "publisher")
    publisher.publish("roam/1", b"while away", qos=1)
    ws = WebSocketPaho(ws_broker.ws_port, "roamer", clean=False)
    assert ws.flags.session_present
    assert ws.message().payload == b"while away"
    ws.close()
    publisher.close()


# --- the twisted.web mount ---------------------------------------------------------------------

@pytest.fixture
def site() -> Iterator[tuple[int, int]]:
    """examples/websocket_site.py serving tests/browser: (http port, mqtt tcp port)."""
    http_port, mqtt_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "websocket_site.py"), str(http_port), str(mqtt_port),
         str(ROOT / "tests" / "browser")], env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(http_port, process)
        wait_for_port(mqtt_port, process)
        yield http_port, mqtt_port
    finally:
        process.terminate()
        output = process.communicate(timeout=WAIT)[0].decode(errors="replace")
    assert "Traceback" not in output, output


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1.1", "5"])
def test_resource_shares_a_port_with_a_web_site(site: tuple[int, int], version: int) -> None:
    http_port, mqtt_port = site
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/index.html", timeout=WAIT) as page:
        assert b"mqtt" in page.read()
    ws = WebSocketPaho(http_port, "via-site", version, path="/mqtt")
    tcp = PahoClient(mqtt_port, "via-tcp", version=version)
    try:
        round_trip(ws, tcp, "site")
    finally:
        ws.close()
        tcp.close()
    refused = RawWebSocket(http_port, path="/mqtt", protocols=None)
    assert refused.status == 400
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/index.html", timeout=WAIT) as page:
        assert page.status == 200  # the site goes on serving pages


# --- the plugin: flags and start-up ---------------------------------------------------------------

def parse(*args: str) -> BrokerConfig:
    options = Options()
    options.parseOptions(list(args))
    return options["broker_config"]  # type: ignore[no-any-return]


def test_websocket_flags() -> None:
    config = parse("--websocket", "tcp:8083", "--websocket", "ssl:8084:privateKey=k.pem:certKey=c.pem",
                   "--websocket-path", "/mqtt", "--websocket-path", "/", "--websocket-trusted-proxy", "10.0.0.0/8",
                   "--websocket-origin", "https://app.example.com",
                   "--websocket-compression", "true", "--websocket-max-frame-size", "65536",
                   "--websocket-max-handshake-size", "8192", "--websocket-handshake-timeout", "2.5")
    assert config.endpoints == ["tcp:1883"]
    assert config.websocket_endpoints == ["tcp:8083", "ssl:8084:privateKey=k.pem:certKey=c.pem"]
    assert config.websocket_paths == ["/mqtt", "/"]
    assert config.websocket_trusted_proxies == ["10.0.0.0/8"]
    assert config.websocket_origins == ["https://app.example.com"]
    assert (config.websocket_compression, config.websocket_max_frame_size, config.websocket_max_handshake_size,
            config.websocket_handshake_timeout) == (True, 65536, 8192, 2.5)


def test_websocket_settings_from_file_and_flags_replacing_them(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('websocket_endpoints = ["tcp:8083", "tcp:8084"]\nwebsocket_paths = ["/mqtt"]\n'
                    'websocket_trusted_proxies = ["::1", "10.1.2.3"]\n')
    config = parse("--config", str(path))
    assert config.websocket_endpoints == ["tcp:8083", "tcp:8084"]
    assert config.websocket_paths == ["/mqtt"] and config.websocket_trusted_proxies == ["::1", "10.1.2.3"]
    config = parse("--config", str(path), "--websocket", "tcp:9000")
    assert config.websocket_endpoints == ["tcp:9000"] and config.websocket_paths == ["/mqtt"]


@pytest.mark.parametrize("args,message", [
    (["--websocket", "tcp:notaport"], "--websocket 'tcp:notaport': "),
    (["--websocket", "tcp:8083", "--websocket", "nosuchtransport:1"], "--websocket 'nosuchtransport:1': "),
    (["--websocket-path", "mqtt"], "--websocket-path: 'mqtt' is not a request path"),
    (["--websocket-trusted-proxy", "proxy.example"], "--websocket-trusted-proxy: 'proxy.example' is not an IP"),
    (["--websocket-max-handshake-size", "10"], "--websocket-max-handshake-size: 10 is out of range"),
    (["--websocket-compression", "maybe"], "--websocket-compression: expected bool"),
])
def test_bad_websocket_flags_are_named(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse(*args)
    assert str(caught.value).startswith(message), str(caught.value)


def test_bad_websocket_endpoint_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('websocket_endpoints = ["tcp:x"]\n')
    with pytest.raises(usage.UsageError) as caught:
        parse("--config", str(path))
    assert str(caught.value).startswith(f"{path}: websocket_endpoints 'tcp:x': ")


def test_websocket_only_broker(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('endpoints = []\nwebsocket_endpoints = ["tcp:8083"]\n')
    assert parse("--config", str(path)).endpoints == []
    path.write_text('endpoints = []\n')
    with pytest.raises(usage.UsageError, match="no endpoint to listen on"):
        parse("--config", str(path))


def test_help_shows_websocket_flags() -> None:
    text = str(Options())
    for flag in ("--websocket=", "--websocket-path=", "--websocket-trusted-proxy=", "--websocket-compression=",
                 "--websocket-max-frame-size=", "--websocket-max-handshake-size=", "--websocket-handshake-timeout="):
        assert flag in text, flag


def test_busy_websocket_port_fails_start_up_and_closes_the_rest() -> None:
    tcp_port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        service = makeService(_options(
            "--persistence", "memory", "--endpoint", f"tcp:{tcp_port}:interface=127.0.0.1",
            "--websocket", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"))
        with pytest.raises(CannotListenError):
            service.startService()
    assert not service.running and service.ports == []
    from twisted.internet import reactor
    reactor.runUntilCurrent()  # type: ignore[attr-defined]  # closing a port is a delayed call
    with socket.socket() as again:  # the TCP endpoint opened before it was closed again
        again.bind(("127.0.0.1", tcp_port))


def _options(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_start_listens_on_websocket_endpoints() -> None:
    from twisted.internet import reactor

    ws_ports = [free_port(), free_port()]
    service = makeService(_options("--persistence", "memory", "--endpoint", f"tcp:{free_port()}:interface=127.0.0.1",
                                   *[arg for port in ws_ports for arg in ("--websocket", f"tcp:{port}:interface=127.0.0.1")]))
    service.startService()
    try:
        assert [port.getHost().port for port in service.ports[1:3]] == ws_ports  # type: ignore[attr-defined]
        for port in ws_ports:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        stopped: list[Any] = []
        service.stopService().addBoth(stopped.append)
        if not stopped:
            reactor.runUntilCurrent()  # type: ignore[attr-defined]
    assert stopped == [None]

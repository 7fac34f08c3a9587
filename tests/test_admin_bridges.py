"""Bridges seen from outside: $SYS, /metrics, /stats and the admin API's /bridges.

In this process, on a MemoryReactorClock: the bridge is the real one, its attempt to reach the
remote is the fake reactor's, and the test decides how it ends. Refused (as by a closed loopback
port): the bridge waits to try again. Accepted: the attempt is joined in memory (twisted.test.iosim)
to a second broker in this process, so messages cross the bridge both ways and are counted.

And the dashboard's bridges panel in headless Chromium, against a broker process whose bridge
points at a closed loopback port (screenshot: test-artifacts/dashboard-bridges.png).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from admin_http import KEY, start_admin
import bridge_helpers
from bridge_helpers import write_config
from browser_helpers import click, text_of, wait_for
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from protocol_helpers import connected, make_broker
from selenium import webdriver
from selenium.webdriver.common.by import By
from test_admin_dashboard import ARTIFACTS, browser  # noqa: F401 (the fixture)
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, eventFromJSON, formatEvent
from twisted.web.test.requesthelper import DummyRequest

from mqtt_broker import BrokerService
from mqtt_broker.admin import metrics
from mqtt_broker.admin.api import OPENAPI, ApiResource
from mqtt_broker.admin.keys import hash_key
from mqtt_broker.wire import Publish

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

BRIDGE = {"connection": "up", "addresses": ["127.0.0.1:1", "127.0.0.1:2"], "remote_clientid": "edge-1",
          "topic": ["sensors/# out 1 local/ remote/", "commands/# in 1"], "restart_timeout": 60}
RETRY = 60
"""Seconds the bridge waits before it connects again (past any $SYS update a test waits for)."""
SYS_INTERVAL = 10


class Bridged(bridge_helpers.Bridged):
    """A broker with the one bridge ``up``, and a remote broker that the test joins it to."""

    def __init__(self, reactor: MemoryReactorClock | None = None, addresses: list[str] | None = None) -> None:
        super().__init__(dict(BRIDGE, addresses=addresses) if addresses else BRIDGE, reactor,
                         sys_interval=SYS_INTERVAL, http_api_keys=["ci:" + hash_key(KEY)])


def sys_values(broker: BrokerService) -> dict[str, str]:
    return {m.topic.removeprefix("$SYS/broker/"): m.payload.decode() for m in broker.retained.match("$SYS/#")}


def bridge_sys(broker: BrokerService) -> dict[str, str]:
    return {topic: value for topic, value in sys_values(broker).items() if topic.startswith("bridges/")}


def scrape(broker: BrokerService) -> Samples:
    body, _ = metrics.render(metrics.registry(broker, broker.operations))
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def bridge_samples(broker: BrokerService) -> dict[str, float]:
    """The mqtt_bridge_* samples of bridge ``up``, by name (and direction)."""
    found = {}
    for (name, labels), value in scrape(broker).items():
        if name.startswith("mqtt_bridge_"):
            assert dict(labels)["bridge"] == "up"
            direction = dict(labels).get("direction")
            found[name + (f"/{direction}" if direction else "")] = value
    return found


def call(broker: BrokerService, method: str, path: str, key: str | None = KEY) -> tuple[int, Any]:
    """One call of the admin API in this process: (status, parsed body)."""
    request = DummyRequest([b""])
    request.method = method.encode()
    request.path = f"/api/v1{path}".encode()
    if key is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {key}".encode()])
    body = ApiResource(broker, broker.operations).render(request)
    assert isinstance(body, bytes)
    return request.responseCode or 200, json.loads(body)


# --- a broker without bridges -------------------------------------------------------------------

def test_a_broker_without_bridges_shows_none() -> None:
    broker = make_broker(http_api_keys=["ci:" + hash_key(KEY)], sys_interval=SYS_INTERVAL)
    broker.startService()
    broker.reactor.advance(SYS_INTERVAL)
    assert broker.bridges is None
    assert not [topic for topic in sys_values(broker) if topic.startswith("bridges/")]
    assert not [name for name, _ in scrape(broker) if name.startswith("mqtt_bridge_")]
    status, stats = call(broker, "GET", "/stats")
    assert status == 200 and "bridges" not in stats
    assert call(broker, "GET", "/bridges") == (200, [])
    assert call(broker, "GET", "/bridges/up") == (404, {"error": "no bridge 'up'"})
    assert call(broker, "POST", "/bridges/up/restart") == (404, {"error": "no bridge 'up'"})


# --- a bridge whose remote cannot be reached --------------------------------------------------------

def test_a_bridge_that_cannot_connect_waits_and_says_why() -> None:
    bridged = Bridged()
    broker = bridged.broker
    assert bridged.bridge.state == "connecting"
    bridged.refuse()
    assert bridged.bridge.state == "waiting"
    broker.reactor.advance(SYS_INTERVAL)
    assert bridge_sys(broker) == {
        "bridges/count": "1", "bridges/up/state": "waiting", "bridges/up/queued": "0",
        "bridges/up/messages/sent": "0", "bridges/up/messages/received": "0", "bridges/up/messages/dropped": "0",
        "bridges/up/connects": "0", "bridges/up/failures": "1"}
    assert sys_values(broker)["connection/edge-1/state"] == "0"   # the bridge's own, Mosquitto's (remote_clientid)
    assert bridge_samples(broker) == {
        "mqtt_bridge_up": 0, "mqtt_bridge_queued_messages": 0, "mqtt_bridge_messages_total/out": 0,
        "mqtt_bridge_messages_total/in": 0, "mqtt_bridge_connects_total": 0, "mqtt_bridge_failures_total": 1,
        "mqtt_bridge_dropped_total": 0}
    status, bridges = call(broker, "GET", "/bridges")
    assert status == 200 and [b["name"] for b in bridges] == ["up"]
    one = bridges[0]
    assert one["state"] == "waiting" and one["failures"] == 1 and one["connects"] == 0
    assert one["address"] == "127.0.0.1:1"
    assert one["last_error"].startswith("cannot connect to 127.0.0.1:1: ")
    assert one["addresses"] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert one["remote_client_id"] == "edge-1" and one["local_client_id"] == "local.edge-1"
    assert one["protocol"] == "mqttv311"
    assert one["topics"] == [
        {"pattern": "sensors/#", "direction": "out", "qos": 1, "local_prefix": "local/", "remote_prefix": "remote/"},
        {"pattern": "commands/#", "direction": "in", "qos": 1, "local_prefix": "", "remote_prefix": ""}]
    assert call(broker, "GET", "/bridges/up") == (200, one)
    status, stats = call(broker, "GET", "/stats")
    assert stats["bridges"] == [{key: one[key] for key in ("name", "state", "address", "queued", "messages_out",
                                                          "messages_in", "connects", "failures", "dropped",
                                                          "last_error")}]
    # The next attempt, after restart_timeout, goes to the next address.
    broker.reactor.advance(RETRY)
    assert bridged.attempts == 2 and call(broker, "GET", "/bridges/up")[1]["address"] == "127.0.0.1:2"


def test_a_bridge_key_that_cannot_be_used_is_reported_and_tried_again(tmp_path: Path) -> None:
    """An encrypted key fails the attempt, without OpenSSL asking for a passphrase on a terminal
    (the reactor would wait for it): the bridge says why, waits, and takes the key once it is fixed."""
    from cryptography.hazmat.primitives import serialization
    from test_auth_tls_reload import PKI
    pki = PKI(tmp_path)
    key = tmp_path / "client.key"
    plain = key.read_bytes()
    key.write_bytes(pki.client.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.BestAvailableEncryption(b"passphrase")))
    reactor = MemoryReactorClock()
    broker = BrokerService(endpoints=[], reactor=reactor, sys_interval=0, bridge=[{
        **BRIDGE, "bridge_cafile": str(tmp_path / "ca.pem"), "bridge_certfile": str(tmp_path / "client.pem"),
        "bridge_keyfile": str(key)}])
    broker.startService()
    bridge = broker.bridges.get("up")
    assert bridge.state == "waiting" and not reactor.tcpClients
    assert bridge.last_error.startswith(f"bridge_keyfile={key} is encrypted: ")
    assert bridge.stats.failures == 1
    key.write_bytes(pki.ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))  # another certificate's
    reactor.advance(RETRY)
    assert bridge.state == "waiting" and not reactor.tcpClients and bridge.stats.failures == 2
    assert bridge.last_error == f"bridge_keyfile={key} is not the key of bridge_certfile={tmp_path / 'client.pem'}"
    key.write_bytes(plain)
    reactor.advance(RETRY)
    assert bridge.state == "connecting" and len(reactor.tcpClients) == 1


def test_figures_are_the_bridges_counters() -> None:
    bridged = Bridged()
    stats = bridged.bridge.stats
    stats.messages_out, stats.messages_in, stats.connects, stats.failures, stats.dropped = 11, 22, 3, 4, 5
    broker = bridged.broker
    broker.reactor.advance(SYS_INTERVAL)
    v = bridge_sys(broker)
    assert (v["bridges/up/messages/sent"], v["bridges/up/messages/received"], v["bridges/up/connects"],
            v["bridges/up/failures"], v["bridges/up/messages/dropped"]) == ("11", "22", "3", "4", "5")
    m = bridge_samples(broker)
    assert (m["mqtt_bridge_messages_total/out"], m["mqtt_bridge_messages_total/in"], m["mqtt_bridge_connects_total"],
            m["mqtt_bridge_failures_total"], m["mqtt_bridge_dropped_total"]) == (11, 22, 3, 4, 5)
    one = call(broker, "GET", "/bridges/up")[1]
    assert (one["messages_out"], one["messages_in"], one["connects"], one["failures"], one["dropped"]) == (11, 22, 3, 4, 5)


# --- a bridge joined to a remote broker ------------------------------------------------------------

def test_a_connected_bridge_counts_what_crosses_it() -> None:
    bridged = Bridged()
    broker, remote = bridged.broker, bridged.remote
    bridged.accept()
    assert bridged.bridge.state == "connected"
    remote_subscriber = connected(remote, "remote-sub")
    remote_subscriber.subscribe("remote/sensors/#", qos=1)
    local_subscriber = connected(broker, "local-sub")
    local_subscriber.subscribe("commands/#", qos=1)
    for n in range(3):
        broker.publish(f"local/sensors/{n}", b"reading", qos=1)
    remote.publish("commands/reboot", b"now", qos=1)
    bridged.settle()
    assert sorted(p.topic for p in remote_subscriber.received() if isinstance(p, Publish)) == [
        "remote/sensors/0", "remote/sensors/1", "remote/sensors/2"]
    assert [p.topic for p in local_subscriber.received() if isinstance(p, Publish)] == ["commands/reboot"]
    broker.reactor.advance(SYS_INTERVAL)
    v = bridge_sys(broker)
    assert v["bridges/up/state"] == "connected" and v["bridges/up/connects"] == "1"
    assert v["bridges/up/messages/sent"] == "3" and v["bridges/up/messages/received"] == "1"
    assert v["bridges/up/failures"] == "0" and v["bridges/up/queued"] == "0"
    m = bridge_samples(broker)
    assert m["mqtt_bridge_up"] == 1 and m["mqtt_bridge_connects_total"] == 1
    assert m["mqtt_bridge_messages_total/out"] == 3 and m["mqtt_bridge_messages_total/in"] == 1
    one = call(broker, "GET", "/bridges/up")[1]
    assert one["state"] == "connected" and one["last_error"] == "" and one["address"] == "127.0.0.1:1"


def test_what_waits_for_the_remote_is_reported_as_queued() -> None:
    bridged = Bridged()
    broker = bridged.broker
    bridged.accept()
    bridged.pumps[-1].client.transport.loseConnection()   # the remote goes away
    bridged.settle()
    assert bridged.bridge.state == "waiting"
    for n in range(4):
        broker.publish(f"local/sensors/{n}", b"reading", qos=1)
    broker.publish("elsewhere/x", b"not bridged", qos=1)
    broker.reactor.advance(SYS_INTERVAL)
    assert bridge_sys(broker)["bridges/up/queued"] == "4"
    assert bridge_samples(broker)["mqtt_bridge_queued_messages"] == 4
    assert call(broker, "GET", "/bridges/up")[1]["queued"] == 4
    assert bridge_sys(broker)["bridges/up/failures"] == "1"   # the broken link
    # Back: the queue drains to the remote.
    broker.reactor.advance(RETRY)
    bridged.accept()
    assert bridged.bridge.state == "connected"
    broker.reactor.advance(SYS_INTERVAL)
    v = bridge_sys(broker)
    assert (v["bridges/up/queued"], v["bridges/up/messages/sent"], v["bridges/up/connects"]) == ("0", "4", "2")


# --- restarting ----------------------------------------------------------------------------------------

def test_restart_needs_a_key_and_is_logged() -> None:
    bridged = Bridged()
    broker = bridged.broker
    bridged.refuse()
    assert call(broker, "POST", "/bridges/up/restart", key=None)[0] == 401
    assert call(broker, "POST", "/bridges/up/restart", key="not-a-key-of-ours")[0] == 403
    assert bridged.attempts == 1 and bridged.bridge.state == "waiting"
    with capturedLogs() as events:
        status, body = call(broker, "POST", "/bridges/up/restart")
        refused = call(broker, "POST", "/bridges/nope/restart")
    # At once, from the first address, without waiting out the back-off.
    assert status == 200 and body["name"] == "up" and body["state"] == "connecting"
    assert bridged.attempts == 2 and body["address"] == "127.0.0.1:1"
    assert refused == (404, {"error": "no bridge 'nope'"})
    lines = [formatEvent(event) for event in events if event.get("log_level") == LogLevel.info]
    assert "admin API: key ci restarts bridge up" in lines
    assert "admin API: 'POST' '/api/v1/bridges/nope/restart' by key ci refused: 404" in lines


def test_a_bridge_that_does_not_run_here_is_not_started_by_a_restart() -> None:
    """In a cluster a bridge runs on the node holding its lease; on the others it is stopped,
    and a restart over their API connected it there too: two nodes running one bridge."""
    bridged = Bridged()
    broker = bridged.broker
    bridged.refuse()
    bridged.bridge.stopService()
    assert call(broker, "POST", "/bridges/up/restart") == (409, {"error": "bridge 'up' does not run on this node"})
    bridged.bridge.restart()
    broker.reactor.advance(RETRY)
    assert bridged.attempts == 1 and bridged.bridge.state == "stopped"


def test_restarting_a_connected_bridge_reconnects_it() -> None:
    bridged = Bridged()
    broker = bridged.broker
    bridged.accept()
    assert call(broker, "POST", "/bridges/up/restart")[0] == 200
    bridged.settle()
    assert bridged.attempts == 2 and bridged.bridge.state == "connecting"
    bridged.accept()
    one = call(broker, "GET", "/bridges/up")[1]
    # A restart is not a failure: two links made, none broken.
    assert (one["state"], one["connects"], one["failures"]) == ("connected", 2, 0)


def test_restarting_a_bridge_while_it_connects_connects_again_at_once_from_the_first_address() -> None:
    """While a connect to an address that does not answer was pending (up to its 10 s timeout),
    a restart only set the address back, and that connect's timeout moved the bridge on past the
    first address again: a restart took two timeouts, not "at once"."""
    bridged = Bridged()
    broker = bridged.broker
    bridged.refuse()
    broker.reactor.advance(RETRY)
    assert bridged.attempts == 2 and bridged.reactor.tcpClients[-1][1] == 2  # no answer from there yet
    assert call(broker, "POST", "/bridges/up/restart")[0] == 200
    assert bridged.attempts == 3 and bridged.reactor.tcpClients[-1][1] == 1
    bridged.accept()
    one = call(broker, "GET", "/bridges/up")[1]
    assert (one["state"], one["address"], one["failures"]) == ("connected", "127.0.0.1:1", 1)
    broker.reactor.advance(30)  # (the abandoned attempt's timeout, had it not been cancelled)
    assert bridged.bridge.state == "connected" and bridged.attempts == 3


def test_a_restart_while_the_name_is_looked_up_leaves_one_attempt() -> None:
    """A restart cancels the attempt under way. Cancelled while its name was looked up, it failed
    with DNSLookupError, taken for the bridge's failure: a retry was scheduled beside the
    restart's attempt, and later connected a second time over the link that was up."""
    from twisted.internet.interfaces import IHostnameResolver
    from zope.interface import implementer

    @implementer(IHostnameResolver)
    class Unanswered:
        """Name lookups that the test answers."""

        def __init__(self) -> None:
            self.pending: list[tuple[Any, int]] = []

        def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None,
                            transportSemantics: str = "TCP") -> Any:
            receiver.resolutionBegan(None)
            self.pending.append((receiver, portNumber))

        def answer_last(self) -> None:
            receiver, port = self.pending[-1]
            receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", port))
            receiver.resolutionComplete()

    resolver = Unanswered()
    reactor = MemoryReactorClock()
    reactor.installNameResolver(resolver)
    bridged = Bridged(reactor=reactor, addresses=["remote.example:1883"])
    bridge = bridged.bridge
    assert len(resolver.pending) == 1 and bridge.state == "connecting"
    assert call(bridged.broker, "POST", "/bridges/up/restart")[0] == 200
    resolver.answer_last()
    reactor.advance(0)
    bridged.accept()
    reactor.advance(RETRY)
    bridged.settle()
    assert (bridge.state, bridged.attempts, len(resolver.pending), bridge.stats.failures) == ("connected", 1, 2, 0)


# --- the API's description -------------------------------------------------------------------------

def schema_properties(document: dict[str, Any], name: str) -> set[str]:
    schema = document["components"]["schemas"][name]
    found: set[str] = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        if "$ref" in part:
            found |= schema_properties(document, part["$ref"].rsplit("/", 1)[1])
        found |= set(part.get("properties", {}))
    return found


def test_answers_have_the_documented_fields() -> None:
    document = json.loads(OPENAPI.read_text())
    validate(document)
    bridged = Bridged()
    one = call(bridged.broker, "GET", "/bridges/up")[1]
    assert set(one) == schema_properties(document, "Bridge")
    assert set(one["topics"][0]) == schema_properties(document, "BridgeTopic")
    stats = call(bridged.broker, "GET", "/stats")[1]
    assert set(stats["bridges"][0]) == schema_properties(document, "BridgeFigures")


# --- the dashboard ----------------------------------------------------------------------------------

def test_dashboard_bridges_panel_and_its_restart_button(broker_process: Any, browser: webdriver.Chrome,  # noqa: F811
                                                         tmp_path: Path, refused_port: int) -> None:
    closed = refused_port
    config = write_config(tmp_path / "broker.toml", {}, [{
        "connection": "edge", "addresses": [f"127.0.0.1:{closed}"], "topic": ["dash/# out 1"],
        "restart_timeout": 600}])
    admin = start_admin(broker_process, "--config", str(config))
    browser.get(f"{admin.base}/?interval=300")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "save-key").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "bridges-panel").is_displayed(), "the bridges panel never showed")
    wait_for(browser, lambda d: "waiting" in d.find_element(By.CSS_SELECTOR, 'tr[data-bridge="edge"]').text,
             "the bridge never showed as waiting")
    row = text_of(browser, 'tr[data-bridge="edge"]', "the bridge is not listed")
    assert f"127.0.0.1:{closed}" in row and f"cannot connect to 127.0.0.1:{closed}" in row
    assert "0 of 1 connected" in browser.find_element(By.ID, "bridges-count").text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-bridges.png"))
    assert admin.call("GET", "/api/v1/bridges/edge").body["failures"] == 1
    # Restart from the page: the bridge tries again at once (its back-off is ten minutes) and fails again.
    click(browser, 'tr[data-bridge="edge"] button.restart', "the restart button could not be clicked")
    wait_for(browser, lambda d: admin.call("GET", "/api/v1/bridges/edge").body["failures"] == 2,
             "the restart made no new attempt")
    logged = [formatEvent(eventFromJSON(line)) for line in admin.broker.output().splitlines() if line.startswith("{")]
    assert "admin API: key ci restarts bridge edge" in logged
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []

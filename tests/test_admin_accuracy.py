"""What operators see agrees with what happened, and shows no secret: the admin API rendered with
DummyRequest on a broker in this process, its figures, the addresses it shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol_helpers import connected
from test_admin_pages import KEY, call, started

from mqtt_broker import BrokerService
from mqtt_broker.admin.api import ApiResource
from mqtt_broker.admin.keys import hash_key
from mqtt_broker.wire import Publish

# --- no secret shown -----------------------------------------------------------------------------

SECRET = "c2VjcmV0LW9mLXRoZS1ITUFDLWtleS10aGF0LWlzLWxvbmctZW5vdWdo"  # base64url of an HMAC key


def test_a_reload_refused_for_a_bad_jwks_does_not_show_the_keys_secret(tmp_path: Path) -> None:
    """A JWK without "kty" (an operator's slip editing the file) is refused at the reload; the
    problem the API answers (and the log) quotes PyJWT's message, which holds the whole JWK: the
    HMAC key's "k" (or a private key's "d")."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "k": SECRET, "kid": "a"}]}))
    broker, api = started(jwt_jwks_file=str(jwks), allow_anonymous=False)
    jwks.write_text(json.dumps({"keys": [{"alg": "HS256", "k": SECRET, "kid": "a"}]}))  # "kty" left out
    status, answer = call(api, "POST", "/api/v1/config/reload")
    assert status == 200 and answer["reloaded"] is False, answer
    assert SECRET not in json.dumps(answer), answer["problems"]


# --- packets counted that never went out -----------------------------------------------------------

def test_packets_held_for_the_store_and_dropped_with_their_connection_are_not_counted_as_sent() -> None:
    """A stored session's QoS 1 PUBLISH waits for the store before it goes on the wire; its
    connection ends meanwhile and the PUBLISH is never written (``_forget_unstored``), to be sent
    again (DUP) on the next connection. ``packets_sent`` (``mqtt_packets_sent_total``,
    ``$SYS/broker/messages/sent``: "MQTT packets of every type" sent) counted it all the same, and
    the resend too: one more packet than the clients were sent (``bytes_sent`` is right: held
    bytes are counted once written)."""
    from admin_helpers import CountingClient, Tally
    from test_durability import HeldStore
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker.admin import figures
    from mqtt_broker.wire import Connect, Publish

    store = HeldStore()
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), store=store, sys_interval=0)
    broker.startService()
    tally = Tally()

    def connect(client_id: str, clean: bool) -> tuple[CountingClient, list[Any]]:
        client = CountingClient(broker, tally)
        client.send(Connect(client_id=client_id, clean_start=clean, protocol_level=4))
        store.write_all()
        packets = client.received()
        assert packets[0].reason_code == 0, packets  # type: ignore[attr-defined]
        return client, packets[1:]
    subscriber, _ = connect("s", clean=False)
    subscriber.subscribe("t", qos=1)
    store.write_all()
    subscriber.received()
    publisher, _ = connect("p", clean=True)
    publisher.publish("t", b"m", qos=1, packet_id=1)
    assert subscriber.received() == []          # held for the store
    subscriber.lose()                            # gone before the store wrote it: never sent
    store.write_all()
    publisher.received()
    _, resent = connect("s", clean=False)
    assert [p.dup for p in resent if isinstance(p, Publish)] == [True]   # the one PUBLISH it got
    reading = figures.read(broker)
    assert (reading.bytes_sent, reading.packets_sent) == (tally.bytes_to_clients, tally.packets_to_clients)


def test_packets_sent_never_goes_down_when_a_connection_ends_with_packets_held_for_the_store() -> None:
    """``mqtt_packets_sent_total`` is a counter: Prometheus reads a decrease as a reset (a spike
    of rate() and increase()). A PUBLISH held for the store was counted as sent when written, and
    taken off again when its connection ended before the store wrote it: a scrape between the
    two saw one more packet than the next."""
    from admin_helpers import CountingClient, Tally
    from test_durability import HeldStore
    from twisted.internet.testing import MemoryReactorClock

    from mqtt_broker.admin import figures
    from mqtt_broker.wire import Connect

    store = HeldStore()
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), store=store, sys_interval=0)
    broker.startService()
    tally = Tally()

    def connect(client_id: str, clean: bool) -> CountingClient:
        client = CountingClient(broker, tally)
        client.send(Connect(client_id=client_id, clean_start=clean, protocol_level=4))
        store.write_all()
        client.received()
        return client
    subscriber = connect("s", clean=False)
    subscriber.subscribe("t", qos=1)
    store.write_all()
    subscriber.received()
    publisher = connect("p", clean=True)
    publisher.publish("t", b"m", qos=1, packet_id=1)
    held = figures.read(broker)                 # a scrape while the PUBLISH waits for the store
    subscriber.lose()
    after = figures.read(broker)
    assert (after.packets_sent, after.publish_sent) == (held.packets_sent, held.publish_sent)
    assert (after.packets_sent, after.bytes_sent) == (tally.packets_to_clients, tally.bytes_to_clients)


def test_publishes_held_for_a_full_socket_and_lost_with_their_connection_are_not_counted_as_sent() -> None:
    """A connection whose transport is full holds what it is written (up to max_held_bytes);
    lost meanwhile, that never went. Its PUBLISHes were counted as delivered when written, where
    ``bytes_sent`` counts what goes to the transport: the two disagreed, and QoS 0 messages that
    no client got showed as delivered. (A QoS 1 one goes again, DUP, on the next connection.)"""
    from admin_helpers import CountingClient, Tally

    from mqtt_broker.admin import figures
    from mqtt_broker.wire import Connect

    broker, _ = started()
    tally = Tally()
    subscriber = tally.client(broker, "s", clean=False)
    subscriber.subscribe("t/+", qos=1)
    publisher = tally.client(broker, "p")
    before = figures.read(broker)
    subscriber.protocol.pauseProducing()        # its socket is full
    publisher.publish("t/0", b"m", qos=0)
    publisher.publish("t/1", b"m", qos=1)
    while_held = figures.read(broker)
    subscriber.lose()
    lost = figures.read(broker)
    assert (lost.publish_sent, lost.resent) == (while_held.publish_sent, while_held.resent) == (
        before.publish_sent, before.resent)
    assert (lost.packets_sent, lost.bytes_sent) == (tally.packets_to_clients, tally.bytes_to_clients)
    again = CountingClient(broker, tally)
    again.send(Connect(client_id="s", clean_start=False, protocol_level=4))
    assert [(p.qos, p.dup) for p in again.received() if isinstance(p, Publish)] == [(1, True)]
    reading = figures.read(broker)
    assert (reading.publish_sent, reading.resent) == (before.publish_sent, before.resent + 1)
    assert (reading.packets_sent, reading.bytes_sent) == (tally.packets_to_clients, tally.bytes_to_clients)


def test_resends_on_a_live_connection_are_counted_in_resent_as_the_api_document_says() -> None:
    """openapi.json's ``Stats.resent`` said "PUBLISHes sent again (DUP), after a reconnection";
    an MQTT 3 client that does not acknowledge is sent the message again after retry_interval on
    the same connection, and that is counted too."""
    from mqtt_broker.admin import figures

    broker, _ = started(retry_interval=5)
    subscriber = connected(broker, "s")
    subscriber.subscribe("t", qos=1)
    connected(broker, "p").publish("t", b"m", qos=1)
    assert [p.dup for p in subscriber.received() if isinstance(p, Publish)] == [False]
    broker.reactor.advance(6)
    assert [p.dup for p in subscriber.received() if isinstance(p, Publish)] == [True]
    assert figures.read(broker).resent == 1
    document = json.loads((Path(figures.__file__).with_name("openapi.json")).read_text())
    description = document["components"]["schemas"]["Stats"]["properties"]["resent"]["description"]
    assert "retry_interval" in description, description


# --- the documented codes for bad input ------------------------------------------------------------

def test_unsubscribing_a_client_from_an_invalid_filter_is_400_as_documented() -> None:
    """docs/operations.md: "a bad topic or filter, a bad parameter: 400" (openapi.json gives the
    DELETE its 400). POST .../subscriptions answers 400 for "a/#/b"; DELETE answers 404 "has no
    subscription", as for a valid filter it does not hold."""
    broker, api = started()
    connected(broker, "c")
    assert call(api, "POST", "/api/v1/clients/c/subscriptions", b'{"topic_filter": "a/#/b"}')[0] == 400
    status, answer = call(api, "DELETE", "/api/v1/clients/c/subscriptions/a/%23/b")
    assert status == 400, answer


# --- a subscription made for a client ------------------------------------------------------------

def test_a_subscription_the_api_makes_for_an_mqtt3_bridge_does_not_send_it_back_its_own_messages() -> None:
    """docs/bridges.md: an MQTT 3 client that says it is a bridge (try_private, bit 7 of the
    protocol level) "is not sent back what it publishes", as by Mosquitto: its own SUBSCRIBEs are
    made No Local and Retain As Published (subscribing.py). One the admin API makes for it is a
    plain subscription (and the API refuses 'no_local' for an MQTT 3 client): what the remote
    broker bridges in comes straight back to it, a loop between the two brokers."""

    broker, api = started()
    remote = connected(broker, "mosquitto-bridge", version=4, clean=False, bridge=True)
    remote.subscribe("x/#", qos=1)
    assert broker.sessions["mosquitto-bridge"].subscriptions["x/#"].no_local   # its own SUBSCRIBE's
    assert remote.publish("x/1", b"bridged in") == []
    status, _ = call(api, "POST", "/api/v1/clients/mosquitto-bridge/subscriptions", b'{"topic_filter": "a/#", "qos": 1}')
    assert status == 201
    echoed = [p.topic for p in remote.publish("a/1", b"bridged in") if isinstance(p, Publish)]
    assert echoed == [], "its own message came back to the bridge"


# --- a bridge's address -----------------------------------------------------------------------

def test_a_bridge_to_an_ipv6_remote_shows_its_address_as_host_port() -> None:
    """openapi.json (BridgeFigures.address): "The remote's host:port, connected or last tried";
    the dashboard's bridges panel shows it. For the address "[::1]:1883" the bridge says
    "::1:1883", which is no host:port (the bridge's own settings refuse it as ambiguous: "an IPv6
    address goes in brackets")."""
    import bridge_helpers
    bridged = bridge_helpers.Bridged({"connection": "up", "addresses": ["[::1]:1883"], "topic": ["t/# out 1"]},
                                     http_api_keys=[hash_key(KEY)])
    api = ApiResource(bridged.broker, bridged.broker.operations)
    status, answer = call(api, "GET", "/api/v1/bridges/up")
    assert status == 200 and answer["state"] == "connecting"
    assert answer["address"] == "[::1]:1883", answer["address"]


def test_an_ipv6_clients_address_is_shown_as_host_port() -> None:
    """GET /clients/{id} 'peer' (the dashboard's "address" column, docs/operations.md: "one
    client: address, ..."; ``connecting.describe``: "``host:port``"): a client from ::1 port
    50000 is shown "::1:50000", where the port cannot be told from the address's last group; the
    bracketed "[::1]:50000" is the host:port form (RFC 3986 3.2.2), the one the bridge settings take."""
    from twisted.internet.address import IPv6Address
    from twisted.internet.testing import StringTransport

    from mqtt_broker.wire import Connect, encode
    broker, api = started()
    address = IPv6Address("TCP", "::1", 50000)
    protocol = broker.factory.buildProtocol(address)
    protocol.makeConnection(StringTransport(peerAddress=address))
    protocol.dataReceived(encode(Connect(client_id="v6", clean_start=True, protocol_level=4), 4))
    status, answer = call(api, "GET", "/api/v1/clients/v6")
    assert status == 200 and answer["connected"], answer
    assert answer["peer"] == "[::1]:50000", answer["peer"]


def test_a_subscription_the_api_makes_for_an_offline_mqtt3_bridge_does_not_send_it_back_its_own_messages() -> None:
    """A subscription the admin API makes for an MQTT 3 bridge while it is away is made No Local
    and Retain As Published when it comes back, as its own are: what it publishes does not come
    straight back to it."""
    broker, api = started()
    remote = connected(broker, "mosquitto-bridge", version=4, clean=False, bridge=True)
    remote.lose()
    status, _ = call(api, "POST", "/api/v1/clients/mosquitto-bridge/subscriptions", b'{"topic_filter": "a/#", "qos": 1}')
    assert status == 201
    remote = connected(broker, "mosquitto-bridge", version=4, clean=False, bridge=True)
    echoed = [p.topic for p in remote.publish("a/1", b"bridged in") if isinstance(p, Publish)]
    assert echoed == [], "its own message came back to the bridge"

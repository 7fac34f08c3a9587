"""A reload (SIGHUP, BrokerService.reload, POST /config/reload) while clients are connected, are
being let in, or have messages in flight: in-process, clients on StringTransports."""

from __future__ import annotations

from pathlib import Path

from auth_helpers import reloaded
from protocol_helpers import FakeClient, connected, make_broker

from mqtt_broker.auth import Identity
from mqtt_broker.auth.passwords import PasswordHash
from mqtt_broker.wire.codes import ReasonCode
from mqtt_broker.wire.packets import Connack, Connect, Publish


def password_file(tmp_path: Path, **users: str) -> Path:
    path = tmp_path / "pw"
    path.write_text("".join(f"{user}:{PasswordHash.create(pw.encode())}\n" for user, pw in users.items()))
    return path


def test_a_client_an_auth_hook_gave_an_identity_is_disconnected_when_its_password_is_revoked(tmp_path: Path) -> None:
    """docs/security.md, Reloading: "A connected client that password_file let in is
    disconnected when its entry changed ... or is gone". The password file checked alice's
    password; an on_auth hook then answered an Identity (to hand out rules, say: docs/embedding.md)
    and that Identity, without the password file's entry, replaced the connection's: removing
    alice from the file and reloading leaves her connected."""
    path = password_file(tmp_path, alice="a", bob="b")
    broker = make_broker(password_file=str(path), allow_anonymous=False)
    broker.hooks.on_auth(lambda client, method, data, again: Identity(client_id=client.client_id,
                                                                       username=client.username))
    alice = FakeClient(broker, 5)
    alice.send(Connect(client_id="a", protocol_level=5, username="alice", password=b"a",
                       properties={"authentication_method": "X"}))
    [connack] = alice.received()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    path.write_text(f"bob:{PasswordHash.create(b'b')}\n")  # alice removed
    assert reloaded(broker.reload()) == []
    assert [getattr(p, "reason_code", None) for p in alice.received()] == [0x87]
    assert alice.closed


def test_an_mqtt3_retry_does_not_resend_what_a_reload_made_unreadable(tmp_path: Path) -> None:
    """docs/security.md: "New ACLs apply at once to connected clients". A QoS 1 message in flight
    to an MQTT 3.1.1 client when a reload takes its read right away is not sent again on
    reconnect (BrokerService.attach, _filter_readable), but retry_interval's resend on the live
    connection (Delivery._retry) sends it again, every 20 s, unchecked."""
    acl = tmp_path / "acl"
    acl.write_text("user sub\ntopic read secret/#\nuser pub\ntopic write #\n")
    broker = make_broker(acl_file=str(acl))
    sub = connected(broker, "sub", username="sub")
    sub.subscribe("secret/#", qos=1)
    connected(broker, "pub", username="pub").publish("secret/x", b"in flight", qos=1)
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == [b"in flight"]  # not acknowledged
    acl.write_text("user sub\ntopic read other/#\nuser pub\ntopic write #\n")
    assert reloaded(broker.reload()) == []
    broker.clock.advance(broker.config.retry_interval + 1)  # type: ignore[attr-defined]
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == []


def test_a_client_revoked_between_its_password_check_and_connack_is_refused_with_a_connack(tmp_path: Path) -> None:
    """A reload that changes a user's entry while the hash is being checked refuses the CONNECT
    with CONNACK 0x86, counted as an authentication failure (Security._authenticate). The same
    reload a moment later, while a connect hook decides (BrokerService._drop_revoked), closes
    the connection without any CONNACK, so the client cannot tell a refusal from a network
    fault, and the refusal is counted nowhere (not in refused_by_reason, auth_failures, nor
    closed_by_reason)."""
    from twisted.internet.defer import Deferred
    path = password_file(tmp_path, alice="a", bob="b")
    broker = make_broker(password_file=str(path), allow_anonymous=False)
    deciding: list[Deferred[None]] = []

    def connect_hook(client: object) -> Deferred[None]:
        deciding.append(Deferred())
        return deciding[-1]
    broker.hooks.on_connect(connect_hook)
    alice = FakeClient(broker, 5)
    alice.send(Connect(client_id="a", protocol_level=5, username="alice", password=b"a"))
    assert alice.received() == [] and len(deciding) == 1
    path.write_text(f"bob:{PasswordHash.create(b'b')}\n")  # alice removed
    assert reloaded(broker.reload()) == []
    deciding[0].callback(None)
    assert alice.closed
    [connack] = alice.received()  # (0x86 as for a reload during the check, or 0x87 Not authorized)
    assert isinstance(connack, Connack) and connack.reason_code in (0x86, 0x87), connack
    assert broker.stats.auth_failures == 1


# An EC public key on a curve the cryptography package does not support (SM2, as `openssl
# genpkey -algorithm SM2` makes it): a key put in the wrong file, or of a kind the broker does not know.
SM2_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEVLYFiPV9JwABPVBeuY4uUnee//Qq
mX1kBfv0gHaVcJoYxUSB0xPhL5ewGQvDKzq9JwzfSW6aU9QKfWTEFwEAnw==
-----END PUBLIC KEY-----
"""


def test_a_reload_with_a_jwt_public_key_of_an_unknown_curve_is_refused_and_said(tmp_path: Path) -> None:
    """docs/security.md, Reloading: "if any of them is bad, the error is logged and everything
    stays as it was"; BrokerService.reload returns what was not reloaded. load_keys catches only
    ValueError around load_pem_public_key, which raises cryptography's UnsupportedAlgorithm (not
    a ValueError) for such a key: the reload raises instead (SIGHUP: an "Unhandled Error"
    traceback; the TLS listeners are then not reloaded either), and a start with that file fails
    with a traceback rather than a ConfigError naming jwt_public_key_file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = tmp_path / "jwt.pub"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    broker = make_broker(jwt_public_key_file=str(key), allow_anonymous=False)
    key.write_bytes(SM2_PUBLIC_KEY)
    problems = reloaded(broker.reload())
    assert len(problems) == 1 and "jwt_public_key_file" in problems[0], problems


def test_a_reload_with_a_jwks_nested_too_deeply_to_parse_is_refused_and_said(tmp_path: Path) -> None:
    """As for the key above: json.loads raises RecursionError for it, which the reload let
    through (SIGHUP logged a traceback, the TLS listeners were not reloaded, POST
    /api/v1/config/reload answered 500)."""
    import json
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": "A" * 60, "alg": "HS256"}]}))
    broker = make_broker(jwt_jwks_file=str(jwks), allow_anonymous=False)
    jwks.write_text('{"keys": ' + "[" * 100_000 + "]" * 100_000 + "}")
    problems = reloaded(broker.reload())
    assert len(problems) == 1 and "jwt_jwks_file" in problems[0] and "nested too deeply" in problems[0], problems


def test_an_http_answer_asked_for_before_a_reload_is_not_cached_past_it(tmp_path: Path) -> None:
    """A reload reads http_auth_authorization_file again and empties the answer cache
    (HttpAuthenticator.prepare_reload), so that what the service answered to the old
    Authorization is not reused. A request under way during the reload is answered after it
    and its answer is cached all the same (_remember): sent with the old header, which the
    service may no longer accept (the reason to rotate it), its 401 refuses that client for
    http_auth_cache_seconds more, without asking again with the new header."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from mqtt_broker.auth import Credentials, Refusal, Security
    from mqtt_broker.auth.http_auth import HttpAuthenticator
    (tmp_path / "authorization").write_text("Bearer old")
    clock = Clock()
    http = HttpAuthenticator("http://127.0.0.1:1/auth", authorization_file=str(tmp_path / "authorization"),
                             reactor=clock, clock=clock)
    asked: list[tuple[bytes | None, Deferred[object]]] = []

    def ask(credentials: Credentials) -> Deferred[object]:
        asked.append((http._authorization, Deferred()))
        return asked[-1][1]
    http._ask = ask  # type: ignore[method-assign]
    security = Security(authenticators=[http], allow_anonymous=False, reactor=clock)
    credentials = Credentials(client_id="dev-1", username="alice", password=b"s3cret", peer="127.0.0.1:4000",
                              protocol_version=4)
    answers: list[object] = []
    security.authenticate(credentials).addCallback(answers.append)
    (tmp_path / "authorization").write_text("Bearer new")
    reloaded(security.reload())
    # The service no longer takes the old header: the request under way is answered "denied".
    asked[0][1].callback(Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "denied"))
    assert isinstance(answers[0], Refusal)
    security.authenticate(credentials).addCallback(answers.append)
    assert [authorization for authorization, _ in asked] == [b"Bearer old", b"Bearer new"]


def test_a_message_held_back_by_receive_maximum_is_not_sent_past_a_reload_that_made_it_unreadable(
        tmp_path: Path) -> None:
    """The MQTT 5 side of the same: in flight on the connection before, held back on this one by
    its Receive Maximum (Delivery._resend), it is sent as an acknowledgement frees a slot
    (Delivery.acknowledged) without the read check that attach made before the reload."""
    from mqtt_broker.wire.packets import Puback
    acl = tmp_path / "acl"
    acl.write_text("user sub\ntopic read secret/#\ntopic read open/#\nuser pub\ntopic write #\n")
    broker = make_broker(acl_file=str(acl))
    persistent = {"session_expiry_interval": 100, "receive_maximum": 10}
    sub = connected(broker, "sub", 5, username="sub", clean=False, properties=persistent)
    sub.subscribe("secret/#", "open/#", qos=1)
    broker.publish("open/a", b"A", qos=1)
    broker.publish("secret/b", b"B", qos=1)
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == [b"A", b"B"]  # not acknowledged
    sub.lose()
    sub = FakeClient(broker, 5)
    sub.connect("sub", username="sub", clean=False, properties={**persistent, "receive_maximum": 1})
    [a] = [p for p in sub.received() if isinstance(p, Publish)]  # B held back by the Receive Maximum of 1
    assert a.payload == b"A"
    acl.write_text("user sub\ntopic read open/#\nuser pub\ntopic write #\n")
    assert reloaded(broker.reload()) == []
    sub.send(Puback(packet_id=a.packet_id))
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == []

"""Security, the interface the broker calls: the authentication chain, allow_anonymous,
certificates, authorization with acl_file and an identity's own rules, reload, caching, and
hostile input (never a crash, never access by mistake, never a password in the log)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable
from unittest.mock import patch

import pytest
import pytest_twisted
from auth_helpers import LogCapture, reloaded
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock

import mqtt_broker.auth as auth
from mqtt_broker import BrokerService
from mqtt_broker.auth import AccessRules, Credentials, Identity, Refusal, Security
from mqtt_broker.auth.passwords import PasswordFile, PasswordHash
from mqtt_broker.config import BrokerConfig, ConfigError
from mqtt_broker.passwd import main as passwd
from mqtt_broker.wire.codes import ReasonCode, v3_connack_code


def credentials(username: str | None = "alice", password: bytes | None = b"alice-pw", client_id: str = "c1",
                identity: str | None = None) -> Credentials:
    return Credentials(client_id=client_id, username=username, password=password, peer="127.0.0.1:5000",
                       protocol_version=5, certificate_identity=identity)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    assert passwd(["-c", "-b", str(tmp_path / "pw"), "alice", "alice-pw"]) == 0
    assert passwd(["-b", "-H", "sha512", str(tmp_path / "pw"), "bob", "bob-pw"]) == 0
    (tmp_path / "acl").write_text("topic read public/#\nuser alice\ntopic readwrite alice/#\n"
                                  "pattern readwrite clients/%c/#\n")
    return tmp_path


def hashes(monkeypatch: pytest.MonkeyPatch,
           seen: Callable[[PasswordHash, bytes], Any] = lambda entry, password: password) -> list[Any]:
    """What each hash checked from now on is recorded as (``seen``: by default its password)."""
    hashed: list[Any] = []
    verify = PasswordHash.verify

    def recording(entry: PasswordHash, password: bytes) -> bool:
        hashed.append(seen(entry, password))
        return verify(entry, password)

    monkeypatch.setattr(PasswordHash, "verify", recording)
    return hashed


def security(files: Path, **settings: Any) -> Security:
    values = {"password_file": str(files / "pw"), "acl_file": str(files / "acl"), "allow_anonymous": False}
    return Security.from_config(BrokerConfig(**{**values, **settings}))


async def answer(sec: Security, creds: Credentials) -> Identity | Refusal:
    result = await sec.authenticate(creds)
    assert isinstance(result, (Identity, Refusal))
    return result


def refused(result: Identity | Refusal, code: ReasonCode) -> bool:
    return isinstance(result, Refusal) and result.reason_code == code


# --- configuration ----------------------------------------------------------------------------

def test_nothing_configured_means_disabled() -> None:
    sec = Security.from_config(BrokerConfig())
    assert not sec.enabled
    anyone = Identity(client_id="c", username=None)
    assert sec.can_read(anyone, "a") and sec.can_subscribe(anyone, "#")


@pytest.mark.parametrize("setting", [
    {"allow_anonymous": False}, {"require_certificate": True}, {"use_identity_as_username": True},
    {"password_file": "pw"}, {"acl_file": "acl"}])
def test_any_setting_enables(files: Path, setting: dict[str, Any]) -> None:
    setting = {k: str(files / v) if isinstance(v, str) else v for k, v in setting.items()}
    assert Security.from_config(BrokerConfig(**setting)).enabled


@pytest.mark.parametrize("settings,key", [
    ({"password_file": "absent"}, "password_file"),
    ({"acl_file": "absent"}, "acl_file"),
    ({"jwt_issuer": "me"}, "jwt_secret_file"),
    ({"jwt_secret_file": "absent"}, "jwt_secret_file"),
    ({"http_auth_url": "ftp://example.invalid/"}, "http_auth_url"),
    ({"http_auth_url": "http://127.0.0.1/", "http_auth_authorization_file": "absent"}, "http_auth_authorization_file"),
])
def test_unusable_settings_name_the_key(tmp_path: Path, settings: dict[str, Any], key: str) -> None:
    settings = {k: str(tmp_path / v) if v == "absent" else v for k, v in settings.items()}
    with pytest.raises(ConfigError) as caught:
        Security.from_config(BrokerConfig(**settings))
    assert caught.value.key == key


def test_bad_password_file_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("alice:secret\n")
    with pytest.raises(ConfigError) as caught:
        Security.from_config(BrokerConfig(password_file=str(tmp_path / "pw")))
    assert caught.value.key == "password_file" and "line 1" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_credentials_repr_hides_the_password() -> None:
    assert "alice-pw" not in repr(credentials()) and "alice" in repr(credentials())


# --- the chain -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_password_file(files: Path) -> None:
    sec = security(files)
    ok = await answer(sec, credentials())
    assert ok == Identity(client_id="c1", username="alice")
    assert await answer(sec, credentials("bob", b"bob-pw")) == Identity(client_id="c1", username="bob")
    for wrong in (credentials(password=b"bob-pw"), credentials(password=None), credentials("carol", b"x"),
                  credentials("bob", b"alice-pw"), credentials("", b"")):
        assert refused(await answer(sec, wrong), ReasonCode.BAD_USER_NAME_OR_PASSWORD), wrong
    assert v3_connack_code(ReasonCode.BAD_USER_NAME_OR_PASSWORD) == 4



@pytest_twisted.ensureDeferred
async def test_an_empty_password_is_none_as_in_mosquitto(files: Path) -> None:
    """`mosquitto_passwd -b pw dave ""` (an unset variable in a script) writes a valid entry; a
    CONNECT's zero-length password is none to Mosquitto, which never lets dave in: nor here."""
    assert passwd(["-b", str(files / "pw"), "dave", ""]) == 0
    sec = security(files)
    for empty in (b"", None):
        assert refused(await answer(sec, credentials("dave", empty)), ReasonCode.BAD_USER_NAME_OR_PASSWORD)

@pytest_twisted.ensureDeferred
async def test_allow_anonymous(files: Path) -> None:
    closed = security(files)
    result = await answer(closed, credentials(None, None))
    assert refused(result, ReasonCode.NOT_AUTHORIZED) and v3_connack_code(ReasonCode.NOT_AUTHORIZED) == 5
    # MQTT 5 allows a password without a username: still anonymous.
    assert refused(await answer(closed, credentials(None, b"alice-pw")), ReasonCode.NOT_AUTHORIZED)
    opened = security(files, allow_anonymous=True)
    assert await answer(opened, credentials(None, None)) == Identity(client_id="c1", username=None)
    # An unknown user is not anonymous: refused either way.
    assert refused(await answer(opened, credentials("carol", b"x")), ReasonCode.BAD_USER_NAME_OR_PASSWORD)


def anonymous_warnings(**settings: Any) -> list[str]:
    """The start-up warnings of a broker with these settings that anonymous clients get in."""
    with LogCapture() as logged:
        broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), **settings)
        broker.startService()
        broker.stopService()
    return [line for line in logged.lines if "allow_anonymous is true" in line]


@pytest.mark.parametrize("authenticator", ["password_file", "jwt_secret_file", "http_auth_url"])
def test_a_broker_warns_at_start_up_when_an_authenticator_lets_anonymous_clients_in(
        files: Path, authenticator: str) -> None:
    """docs/security.md: the broker warns at start-up when an authenticator is configured and
    anonymous clients are still let in (allow_anonymous is true by default, as in Mosquitto 1)."""
    (files / "secret").write_bytes(b"s" * 40)
    value = {"password_file": str(files / "pw"), "jwt_secret_file": str(files / "secret"),
             "http_auth_url": "http://127.0.0.1:9/auth"}[authenticator]
    [warning] = anonymous_warnings(**{authenticator: value})
    assert "clients without a username are accepted" in warning
    assert anonymous_warnings(**{authenticator: value, "allow_anonymous": True}) == [warning]
    assert anonymous_warnings(**{authenticator: value, "allow_anonymous": False}) == []
    assert anonymous_warnings() == anonymous_warnings(allow_anonymous=True) == []  # (no authenticator)


@pytest_twisted.ensureDeferred
async def test_without_authenticators_usernames_are_taken_as_given_only_where_anonymous_clients_may_connect(
        files: Path) -> None:
    """As in Mosquitto. With allow_anonymous false nothing could check who a client says it is:
    everyone is refused (any client got the rights of the user it named, an ACL's admin too)."""
    opened = Security.from_config(BrokerConfig(acl_file=str(files / "acl"), allow_anonymous=True))
    assert await answer(opened, credentials("alice", None)) == Identity(client_id="c1", username="alice")
    for acl in ({"acl_file": str(files / "acl")}, {}):
        closed = Security.from_config(BrokerConfig(allow_anonymous=False, **acl))
        for who in (credentials("alice", None), credentials("alice", b"any"), credentials(None, None)):
            assert refused(await answer(closed, who), ReasonCode.NOT_AUTHORIZED), (acl, who)


@pytest_twisted.ensureDeferred
async def test_require_certificate(files: Path) -> None:
    sec = security(files, require_certificate=True)
    assert refused(await answer(sec, credentials()), ReasonCode.NOT_AUTHORIZED)
    # With a certificate the rest of the chain still decides.
    assert await answer(sec, credentials(identity="client")) == Identity(client_id="c1", username="alice")
    assert refused(await answer(sec, credentials(password=b"no", identity="client")),
                   ReasonCode.BAD_USER_NAME_OR_PASSWORD)
    # Verified, without the field that would name it: a certificate all the same.
    verified = dataclasses.replace(credentials(), certificate_verified=True)
    assert await answer(sec, verified) == Identity(client_id="c1", username="alice")


@pytest_twisted.ensureDeferred
async def test_use_identity_as_username(files: Path) -> None:
    sec = security(files, use_identity_as_username=True)
    # The certificate names the client; the CONNECT username and password are not looked at.
    assert await answer(sec, credentials("alice", b"wrong", identity="client")) == Identity(
        client_id="c1", username="client")
    assert await answer(sec, credentials(None, None, identity="dev+1")) == Identity(client_id="c1", username="dev+1")
    assert refused(await answer(sec, credentials()), ReasonCode.NOT_AUTHORIZED)


@pytest_twisted.ensureDeferred
async def test_hashing_runs_off_the_reactor_thread(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = hashes(monkeypatch, lambda entry, password: threading.current_thread())
    sec = security(files)
    await answer(sec, credentials())
    await answer(sec, credentials(password=b"wrong"))
    # An unknown user costs a hash too, so that timing does not tell who exists.
    await answer(sec, credentials("carol", b"x"))
    assert len(threads) == 3 * 2  # (once with each of the file's two kinds of hash, per check)
    assert all(t is not threading.main_thread() for t in threads)


def test_every_check_hashes_the_same_whoever_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of several kinds of hash (iterations raised for some users, a $6$ entry left from
    Mosquitto 1.x): a check of an unknown user hashed with the first entry's kind, one of a
    listed user with its own, and a listed user without a password was refused at once, so the
    time told who is listed (200 ms against 1 ms over TCP). Each check now hashes once with each
    kind in the file."""
    from twisted.internet.task import Clock
    (tmp_path / "pw").write_text(f"alice:{PasswordHash.create(b'a', iterations=101)}\n"
                                 f"bob:{PasswordHash.create(b'b', iterations=20_000)}\n"
                                 f"carol:{PasswordHash.create(b'c', algorithm='sha512')}\n")
    hashed = hashes(monkeypatch, lambda entry, password: (entry.algorithm, entry.iterations))
    sec = Security.from_config(BrokerConfig(password_file=str(tmp_path / "pw")), reactor=Clock())
    kinds = sorted([("sha512-pbkdf2", 101), ("sha512-pbkdf2", 20_000), ("sha512", 0)])
    for username, password, accepted in [("alice", b"a", True), ("bob", b"b", True), ("carol", b"c", True),
                                         ("alice", b"x", False), ("bob", None, False), ("dave", b"x", False),
                                         ("dave", None, False)]:
        hashed.clear()
        answers: list[Any] = []
        sec.authenticate(credentials(username, password)).addCallback(answers.append)
        assert isinstance(answers[0], Identity) is accepted, (username, password)
        assert sorted(hashed) == kinds, (username, password)
    # Reloaded with one kind only: one hash per check.
    (tmp_path / "pw").write_text(f"alice:{PasswordHash.create(b'a', iterations=101)}\n")
    reloaded(sec.reload())
    hashed.clear()
    sec.authenticate(credentials("dave", b"x"))
    assert hashed == [("sha512-pbkdf2", 101)]


def test_a_reactor_without_threads_checks_in_place(files: Path) -> None:
    """Protocol tests run the broker on a task.Clock: answers come at once, on the calling thread."""
    from twisted.internet.task import Clock
    sec = Security.from_config(BrokerConfig(password_file=str(files / "pw")), reactor=Clock())
    answers: list[Any] = []
    sec.authenticate(credentials()).addCallback(answers.append)
    sec.authenticate(credentials(password=b"wrong")).addCallback(answers.append)
    assert answers[0] == Identity(client_id="c1", username="alice")
    assert refused(answers[1], ReasonCode.BAD_USER_NAME_OR_PASSWORD)


class HeldThreads:
    """A reactor whose thread pool runs its jobs only when the test says (``run``)."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def getThreadPool(self) -> HeldThreads:
        return self

    def callInThreadWithCallback(self, on_result: Any, function: Any, *args: Any) -> None:
        self.jobs.append((on_result, function, args))

    def callFromThread(self, function: Any, *args: Any) -> None:
        function(*args)

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for on_result, function, args in jobs:
            try:
                on_result(True, function(*args))
            except BaseException as e:
                from twisted.python.failure import Failure
                on_result(False, Failure(e))


def test_password_checks_queued_when_the_broker_stops_are_not_run(files: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Twisted's pool runs what is queued before its threads end: 100 CONNECTs queued with a
    costly hash held a stop 25 s, hashing for clients already gone."""
    from twisted.internet.interfaces import IReactorThreads
    from zope.interface import directlyProvides
    hashed = hashes(monkeypatch)
    reactor = HeldThreads()
    directlyProvides(reactor, IReactorThreads)
    sec = Security.from_config(BrokerConfig(password_file=str(files / "pw")), reactor=reactor)
    answers: list[Any] = []
    with LogCapture() as log:
        for password in (b"alice-pw", b"wrong"):
            sec.authenticate(credentials(password=password)).addCallback(answers.append)
        sec.authenticate(credentials("carol", b"x")).addCallback(answers.append)  # (unknown: equalized)
        sec.close()
        reactor.run()
    assert hashed == []
    assert [a.reason_code for a in answers] == [ReasonCode.SERVER_SHUTTING_DOWN] * 3
    assert "Traceback" not in log.text()
    # Started again, the broker checks passwords again.
    sec.authenticate(credentials()).addCallback(answers.append)
    reactor.run()
    assert answers[-1] == Identity(client_id="c1", username="alice") and hashed == [b"alice-pw"] * 2  # (two kinds)


@pytest_twisted.ensureDeferred
async def test_an_authenticator_cancelled_while_the_broker_runs_is_a_failure(files: Path) -> None:
    """Only the stop's cancellations refuse quietly with 0x8B (Server shutting down)."""
    from twisted.internet.defer import CancelledError

    class Cancelling:
        name = "cancelling"

        def authenticate(self, creds: Credentials) -> Deferred[Any]:
            return fail(CancelledError())

    sec = Security(authenticators=[Cancelling()])  # type: ignore[list-item]
    with LogCapture() as log:
        result = await answer(sec, credentials())
    assert refused(result, ReasonCode.UNSPECIFIED_ERROR) and "cancelling authentication" in log.text()


@pytest_twisted.ensureDeferred
async def test_a_failing_authenticator_refuses(files: Path) -> None:
    class Broken:
        name = "broken"

        def authenticate(self, creds: Credentials) -> Deferred[Any]:
            return fail(RuntimeError("backend exploded"))

    sec = Security(authenticators=[Broken()])  # type: ignore[list-item]
    with LogCapture() as log:
        result = await answer(sec, credentials())
    assert refused(result, ReasonCode.UNSPECIFIED_ERROR)
    assert "backend exploded" in log.text()


@pytest_twisted.ensureDeferred
async def test_hostile_credentials(files: Path) -> None:
    """Long, odd and non-UTF-8 credentials: answered, never crashed on, never let in by mistake."""
    sec = security(files, allow_anonymous=True)
    names = ["a" * 65535, "+", "#", "a/b", "%u", "%c", "alice\x00", "ålice", "alice ", " alice", "ALICE"]
    passwords = [b"\xff\xfe" * 30000, b"", b"alice-pw\x00", b"alice-pw\x00\x00", b"alice-pw" * 8192, b"\x00"]
    for name in names:
        for password in passwords + [b"alice-pw"]:
            result = await answer(sec, credentials(name, password, client_id=name))
            assert refused(result, ReasonCode.BAD_USER_NAME_OR_PASSWORD), (name[:10], password[:10])
    for password in passwords:
        assert refused(await answer(sec, credentials("alice", password)), ReasonCode.BAD_USER_NAME_OR_PASSWORD)
    for client_id in ("+", "#", "/", "%c", "a" * 65535, ""):
        assert await answer(sec, credentials(client_id=client_id)) == Identity(client_id=client_id, username="alice")


@pytest_twisted.ensureDeferred
async def test_passwords_never_reach_the_log(files: Path) -> None:
    sec = security(files)
    secrets = [b"alice-pw", b"wrong-secret-1", b"\xffraw-secret-2"]
    with LogCapture() as log:
        for password in secrets:
            for username in ("alice", "carol", None):
                await answer(sec, credentials(username, password))
    text = log.text()
    assert "refused client 'c1'" in text and "wrong password" in text
    for password in secrets:
        assert password.decode("utf-8", "replace") not in text and repr(password) not in text
    assert "alice-pw" not in text


def test_a_refused_connect_logs_a_bounded_part_of_what_its_client_named(files: Path) -> None:
    """Before it is authenticated, a client decides what it names itself: a refused CONNECT with a
    client id and a user name of 60,000 control characters was logged whole, in two lines, and
    again repr'd in the JSON event stream (flattened), some 25 bytes logged per byte sent. Refused
    by the password check, or by max_connections_per_minute before it, as the log would write it."""
    from twisted.logger import capturedLogs, eventAsJSON
    from protocol_helpers import FakeClient
    from mqtt_broker.wire import Connack, Connect, encode
    broker = BrokerService(endpoints=[], reactor=MemoryReactorClock(), password_file=str(files / "pw"),
                           allow_anonymous=False, max_connections_per_minute=1)
    named = "\x01" * 60_000
    connects = [Connect(client_id=f"{n}{named}", protocol_level=5, username=named, password=b"guess")
                for n in range(5)]
    assert FakeClient(broker, 5).connect(named, username="alice", password=b"alice-pw").reason_code == 0
    connects.append(Connect(client_id=named, protocol_level=5, username="alice", password=b"alice-pw"))
    codes = []
    with capturedLogs() as events:
        for connect in connects:
            client = FakeClient(broker, 5)
            client.send(connect)
            codes += [p.reason_code for p in client.received() if isinstance(p, Connack)]
            client.lose()
    assert codes == [0x86] * 5 + [0x9F] and len(events) >= 11  # (two lines a refusal; one for 0x9F)
    sent = sum(len(encode(connect, 5)) for connect in connects)
    logged = sum(len(eventAsJSON(event).encode()) for event in events)
    assert logged < sent // 5, f"{logged} bytes logged for {sent} bytes of refused CONNECTs"


# --- authorization --------------------------------------------------------------------------

def test_sys_and_share_can_never_be_published_to(files: Path) -> None:
    for sec in (Security(), Security(acl_file=str(files / "acl"))):
        anyone = Identity(client_id="c", username="alice")
        ruled = Identity(client_id="c", username="alice", rules=AccessRules(("#", "$SYS/#", "$share/#"), ()))
        for identity in (anyone, ruled):
            for topic in ("$SYS/broker/x", "$SYS", "$SYSTEM/x", "$share/g/a"):
                assert not sec.can_publish(identity, topic)
    assert Security().can_publish(Identity(client_id="c", username=None), "$other/x")


def test_acl_file(files: Path) -> None:
    sec = Security(acl_file=str(files / "acl"))
    alice, anonymous = Identity(client_id="c", username="alice"), Identity(client_id="c", username=None)
    assert sec.can_publish(alice, "alice/x") and not sec.can_publish(alice, "public/x")
    assert sec.can_read(anonymous, "public/x") and not sec.can_read(anonymous, "alice/x")
    assert sec.can_publish(anonymous, "clients/c/x") and not sec.can_publish(anonymous, "clients/d/x")
    # Unlike Mosquitto, a filter that matches nothing the client may read is refused; a granted
    # one is still filtered on delivery.
    assert not sec.can_subscribe(anonymous, "alice/#") and sec.can_subscribe(anonymous, "#")
    assert sec.can_subscribe(anonymous, "+/c/#") and sec.can_subscribe(alice, "$share/g/alice/x")
    assert not sec.can_subscribe(alice, "public/#")  # anonymous rules are not hers
    assert Security().can_subscribe(anonymous, "alice/#")  # no acl_file: everything allowed


def test_identity_rules_replace_the_acl_file(files: Path) -> None:
    sec = Security(acl_file=str(files / "acl"))
    device = Identity(client_id="c", username="alice", rules=AccessRules(("up/c/#",), ("down/c/+",)))
    assert sec.can_publish(device, "up/c/temp") and not sec.can_publish(device, "alice/x")
    assert sec.can_read(device, "down/c/cmd") and not sec.can_read(device, "alice/x")
    assert not sec.can_read(device, "public/x")
    assert sec.can_subscribe(device, "down/c/+") and not sec.can_subscribe(device, "down/#")
    assert sec.can_subscribe(device, "$share/g/down/c/x") and not sec.can_subscribe(device, "#")
    locked = Identity(client_id="c", username="alice", rules=AccessRules())
    assert not sec.can_publish(locked, "alice/x") and not sec.can_read(locked, "public/x")


def test_caches_are_bounded(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_CACHED_READS", 10)
    sec = Security(acl_file=str(files / "acl"))
    anonymous = Identity(client_id="c", username=None)
    for round in range(3):
        for n in range(25):
            assert sec.can_read(anonymous, f"public/{n}")
            assert not sec.can_read(anonymous, f"private/{n}")
            assert sec.can_publish(anonymous, f"clients/c/{n}")
            assert not sec.can_publish(anonymous, f"public/{n}")
            assert len(sec._reads) <= 10 and len(sec._writes) <= 10
    sec._reads.clear()
    sec._writes.clear()
    long = "public/" + "x" * auth.MAX_CACHED_TOPIC
    assert sec.can_read(anonymous, long) and not sec.can_publish(anonymous, long)
    # A long client id or username too: kept, each would hold as much for every topic it read.
    for identity in (Identity(client_id="c" * 8000, username=None), Identity(client_id="c", username="u" * 8000)):
        sec.can_read(identity, "public/x"), sec.can_publish(identity, "public/x")
    assert not sec._reads and not sec._writes  # checked each time, not kept


# --- reload -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reload_applies_new_files(files: Path) -> None:
    sec = security(files)
    alice = Identity(client_id="c", username="alice")
    assert sec.can_read(alice, "alice/x") and sec.can_publish(alice, "alice/x")
    assert not sec.can_subscribe(alice, "other/#")
    assert passwd(["-b", str(files / "pw"), "alice", "new-pw"]) == 0
    (files / "acl").write_text("user alice\ntopic read other/#\n")
    await sec.reload()
    assert sec.can_subscribe(alice, "other/#") and not sec.can_subscribe(alice, "alice/#")
    assert await answer(sec, credentials(password=b"new-pw")) == Identity(client_id="c1", username="alice")
    assert refused(await answer(sec, credentials()), ReasonCode.BAD_USER_NAME_OR_PASSWORD)
    # Connected clients are judged by the new rules at once (the read cache is emptied).
    assert not sec.can_read(alice, "alice/x") and sec.can_read(alice, "other/y")
    assert not sec.can_publish(alice, "alice/x")


@pytest.mark.parametrize("broken", ["pw", "acl"])
@pytest_twisted.ensureDeferred
async def test_bad_reload_keeps_everything(files: Path, broken: str) -> None:
    sec = security(files)
    alice = Identity(client_id="c", username="alice")
    good_pw = (files / "pw").read_text()
    assert passwd(["-b", str(files / "pw"), "alice", "new-pw"]) == 0
    (files / "acl").write_text("user alice\ntopic read other/#\n")
    (files / broken).write_text("this is not a valid line\n")
    with LogCapture() as log, pytest.raises(ConfigError) as caught:
        await sec.reload()
    assert caught.value.key == ("password_file" if broken == "pw" else "acl_file")
    assert "reload refused" in log.text() and str(files / broken) in log.text()
    # Neither file's new content is in force: all or nothing.
    assert await answer(sec, credentials()) == Identity(client_id="c1", username="alice")
    assert sec.can_read(alice, "alice/x") and not sec.can_read(alice, "other/y")
    (files / "pw").write_text(good_pw)
    (files / "acl").unlink()
    with pytest.raises(ConfigError):
        await sec.reload()
    assert sec.can_read(alice, "alice/x")


@pytest_twisted.ensureDeferred
async def test_reload_tells_which_password_file_users_no_longer_pass(files: Path) -> None:
    sec = security(files)
    assert passwd(["-b", str(files / "pw"), "carol", "carol-pw"]) == 0
    await sec.reload()
    alice, bob, carol = [await answer(sec, credentials(user, f"{user}-pw".encode()))
                         for user in ("alice", "bob", "carol")]
    assert all(isinstance(i, Identity) and sec.revoked(i) is None for i in (alice, bob, carol))
    # What is kept is the file's hash, never the password.
    assert alice.entry.hash == PasswordFile.load(files / "pw").users["alice"]  # type: ignore[union-attr]
    assert passwd(["-b", str(files / "pw"), "alice", "changed"]) == 0
    assert passwd(["-D", str(files / "pw"), "bob"]) == 0
    assert sec.revoked(alice) is None  # judged by the files in force: not reloaded yet
    await sec.reload()
    assert sec.revoked(alice) == f"the password of 'alice' changed in {files / 'pw'}"  # type: ignore[arg-type]
    assert sec.revoked(bob) == f"user 'bob' is no longer in {files / 'pw'}"  # type: ignore[arg-type]
    assert sec.revoked(carol) is None  # type: ignore[arg-type]
    # Identities the file did not give out have nothing to check again.
    assert sec.revoked(Identity(client_id="c", username="alice")) is None
    assert sec.revoked(Identity(client_id="c", username=None)) is None


def test_a_reload_reads_its_files_in_the_thread_pool_one_reload_at_a_time(files: Path) -> None:
    """Parsing a password file of 100,000 users held the reactor for half a second. A reload
    asked for while another reads begins once that one is in force: the later files win."""
    from twisted.internet.interfaces import IReactorThreads
    from zope.interface import directlyProvides
    reactor = HeldThreads()
    directlyProvides(reactor, IReactorThreads)
    sec = Security.from_config(BrokerConfig(password_file=str(files / "pw"), acl_file=str(files / "acl")),
                               reactor=reactor)
    alice = Identity(client_id="c", username="alice")
    done: list[str] = []
    sec.reload().addCallback(lambda _: done.append("first"))
    sec.reload().addCallback(lambda _: done.append("second"))
    assert len(reactor.jobs) == 1 and sec.can_read(alice, "alice/x")  # nothing read on the reactor
    (files / "acl").write_text("user alice\ntopic read second/#\n")
    reactor.run()
    assert done == ["first"] and len(reactor.jobs) == 1
    assert sec.can_read(alice, "second/x")  # (as the file was when the first's turn came)
    (files / "acl").write_text("user alice\ntopic read third/#\n")
    reactor.run()
    assert done == ["first", "second"]
    assert sec.can_read(alice, "third/x") and not sec.can_read(alice, "second/x")


def test_a_reload_during_the_password_check_refuses_the_old_password(files: Path) -> None:
    from twisted.internet.task import Clock
    # On a Clock the check runs in place, so the reload can come in between.
    sec = Security.from_config(BrokerConfig(password_file=str(files / "pw")), reactor=Clock())
    verify = PasswordHash.verify

    def verify_then_reload(stored: PasswordHash, password: bytes) -> bool:
        assert passwd(["-b", str(files / "pw"), "alice", "changed"]) == 0
        reloaded(sec.reload())
        return verify(stored, password)

    with patch.object(PasswordHash, "verify", verify_then_reload):
        results: list[Any] = []
        sec.authenticate(credentials()).addCallback(results.append)
    assert refused(results[0], ReasonCode.BAD_USER_NAME_OR_PASSWORD)
    assert "changed" in results[0].reason


@pytest_twisted.ensureDeferred
async def test_close(files: Path) -> None:
    await security(files).close()
    await Security().close()


@pytest_twisted.ensureDeferred
async def test_the_password_of_a_client_gone_before_its_turn_is_not_hashed(
        files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of CONNECTs waits for the thread pool; those whose clients left meanwhile were
    hashed all the same (PBKDF2, milliseconds each, for no one), each holding its connection."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from protocol_helpers import FakeClient
    from mqtt_broker.wire import Connect
    hashed = hashes(monkeypatch)
    broker = BrokerService(endpoints=[], reactor=reactor, sys_interval=0, close_linger=0,
                           password_file=str(files / "pw"), allow_anonymous=False)
    broker.startService()
    pool = reactor.getThreadPool()  # type: ignore[attr-defined]
    gate = threading.Event()
    try:
        for _ in range(pool.max):  # every thread busy: the checks wait for their turn
            pool.callInThread(gate.wait, 10)
        for n in range(5):
            client = FakeClient(broker, 5)
            client.send(Connect(client_id=f"gone-{n}", protocol_level=5, username="alice", password=b"guess"))
            client.lose()
        gate.set()
        for _ in range(500):  # bounded: the pool works through its queue
            if pool.q.qsize() == 0 and not pool.working:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert hashed == [] and broker.connections == set()
    finally:
        gate.set()
        await broker.stopService()


def test_an_authentication_withdrawn_while_the_cost_of_a_refusal_is_equalized_logs_nothing() -> None:
    """A user nobody knows costs what a known one does (``equalize``): a client that left
    meanwhile had that cancellation logged as a failure, with a traceback, and its refusal too."""
    class Equalizing:
        name = "slow"

        def __init__(self) -> None:
            self.pending: list[Deferred[None]] = []

        def authenticate(self, credentials: Credentials) -> Deferred[Any]:
            return succeed(None)

        def equalize(self, credentials: Credentials) -> Deferred[None]:
            self.pending.append(Deferred())  # (in_thread's has no canceller either)
            return self.pending[-1]

    chain = Equalizing()
    sec = Security(authenticators=[chain], allow_anonymous=False)  # type: ignore[list-item]
    with LogCapture() as logged:
        answer = sec.authenticate(credentials("nobody", b"x"))
        assert len(chain.pending) == 1 and not answer.called
        answer.cancel()
    assert answer.called and logged.text() == ""


@pytest_twisted.ensureDeferred
async def test_a_user_the_password_file_passes_on_costs_a_hash_when_a_token_refuses_them(
        files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a JSON Web Token key too, a password shaped like a token was refused by it at once for
    a user the file does not list, and after a hash for one it lists: timing told them apart."""
    hashed = hashes(monkeypatch)
    (tmp_path / "secret").write_bytes(b"s" * 32)
    sec = security(files, jwt_secret_file=str(tmp_path / "secret"))
    costs = []
    for user in ("alice", "nobody"):
        hashed.clear()
        answer = await sec.authenticate(credentials(user, b"a.b.c"))
        assert isinstance(answer, Refusal) and answer.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD
        costs.append(len(hashed))
    assert costs == [2, 2]  # (one hash of each kind in the file: $7$ and $6$)

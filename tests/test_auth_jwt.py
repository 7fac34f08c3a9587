"""JWT authentication (mqtt_broker.auth.tokens): keys from a secret, a PEM key and a JWKS; the
claims checked; the attacks refused (alg none, key confusion, bad signature, expired tokens);
claims that carry ACLs; reload."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.task import Clock

from mqtt_broker.auth import AccessRules, Credentials, Identity, Refusal, Security
from mqtt_broker.auth.tokens import JwtAuthenticator, TokenKey, load_keys
from mqtt_broker.config import BrokerConfig, ConfigError
from mqtt_broker.passwd import main as passwd
from mqtt_broker.wire.codes import ReasonCode

from auth_helpers import LogCapture

SECRET = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"  # 64 bytes
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def token(key: Any = SECRET, algorithm: str = "HS256", headers: dict[str, Any] | None = None,
          **claims: Any) -> bytes:
    claims.setdefault("sub", "alice")
    claims.setdefault("exp", int(time.time()) + 300)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers).encode("ascii")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256(claims: bytes, key: bytes) -> bytes:
    """A token signed with HMAC-SHA256 as written (PyJWT's encode refuses a PEM key as a secret)."""
    signing = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(claims)}".encode()
    return signing + b"." + b64(hmac.new(key, signing, hashlib.sha256).digest()).encode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> bytes:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)]).encode()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    (tmp_path / "rsa.pem").write_bytes(pem(RSA_KEY))
    jwks = {"keys": [
        {**json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "r1", "use": "sig"},
        {**json.loads(ECAlgorithm.to_jwk(EC_KEY.public_key())), "kid": "e1"},
        {**json.loads(RSAAlgorithm.to_jwk(OTHER_RSA_KEY.public_key())), "kid": "enc", "use": "enc"},
    ]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    return tmp_path


def security(keys: Path, **settings: Any) -> Security:
    values: dict[str, Any] = {"jwt_secret_file": str(keys / "secret"), "jwt_public_key_file": str(keys / "rsa.pem"),
                              "jwt_jwks_file": str(keys / "jwks.json"), "allow_anonymous": False}
    values.update(settings)
    return Security.from_config(BrokerConfig(**{k: v for k, v in values.items() if v is not None}))


def connect(password: bytes | None, username: str | None = None) -> Credentials:
    return Credentials(client_id="dev-1", username=username, password=password, peer="127.0.0.1:1",
                       protocol_version=5)


async def result(sec: Security, password: bytes | None, username: str | None = None) -> Identity | Refusal:
    return await sec.authenticate(connect(password, username))


def is_refused(answer: Identity | Refusal) -> bool:
    return isinstance(answer, Refusal) and answer.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD


# --- accepted tokens -------------------------------------------------------------------------

@pytest.mark.parametrize("key,algorithm,headers", [
    (SECRET, "HS256", None), (SECRET, "HS384", None), (SECRET, "HS512", None),
    (RSA_KEY, "RS256", None), (RSA_KEY, "RS512", None), (RSA_KEY, "PS256", None),
    (RSA_KEY, "RS256", {"kid": "r1"}), (EC_KEY, "ES256", {"kid": "e1"}), (EC_KEY, "ES256", None),
])
@pytest_twisted.ensureDeferred
async def test_valid_tokens(keys: Path, key: Any, algorithm: str, headers: dict[str, Any] | None) -> None:
    expiry = int(time.time()) + 60
    answer = await result(security(keys), token(key, algorithm, headers, exp=expiry))
    assert answer == Identity(client_id="dev-1", username="alice", expires_at=float(expiry))


@pytest_twisted.ensureDeferred
async def test_eddsa_key_file(tmp_path: Path) -> None:
    (tmp_path / "ed.pem").write_bytes(pem(ED_KEY))
    sec = Security.from_config(BrokerConfig(jwt_public_key_file=str(tmp_path / "ed.pem"), allow_anonymous=False))
    assert isinstance(await result(sec, token(ED_KEY, "EdDSA")), Identity)
    assert is_refused(await result(sec, token(SECRET, "HS256")))


@pytest_twisted.ensureDeferred
async def test_certificate_as_public_key(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    import datetime
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(EC_KEY.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(EC_KEY, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    sec = Security.from_config(BrokerConfig(jwt_public_key_file=str(tmp_path / "cert.pem")))
    assert isinstance(await result(sec, token(EC_KEY, "ES256")), Identity)


# --- refused tokens ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_expired_and_not_yet_valid(keys: Path) -> None:
    sec = security(keys)
    assert is_refused(await result(sec, token(exp=int(time.time()) - 10)))
    assert is_refused(await result(sec, token(nbf=int(time.time()) + 60)))
    assert is_refused(await result(sec, token(iat=int(time.time()) + 600)))
    assert is_refused(await result(sec, token(exp=None)))  # exp is required
    # A NumericDate is a number: one in a string would leave the connection without its end.
    assert is_refused(await result(sec, token(exp=str(int(time.time()) + 300))))
    lenient = security(keys, jwt_leeway=60)
    assert isinstance(await result(lenient, token(exp=int(time.time()) - 10)), Identity)


@pytest_twisted.ensureDeferred
async def test_token_times_are_checked_on_the_brokers_clock(keys: Path) -> None:
    """exp, nbf and iat are checked against the clock the broker runs on (BrokerService's
    clock=), which also ends the connection at exp: PyJWT checked them on the wall clock."""
    now = 1_000_000_000  # (2001: long before the wall clock's time)
    clock = Clock()
    clock.advance(now)
    sec = Security.from_config(BrokerConfig(jwt_secret_file=str(keys / "secret"), allow_anonymous=False,
                                            jwt_leeway=5), clock=clock)
    assert await result(sec, token(exp=now + 60)) == Identity(client_id="dev-1", username="alice",
                                                              expires_at=float(now + 65))
    assert isinstance(await result(sec, token(exp=now - 4)), Identity)
    assert is_refused(await result(sec, token(exp=now - 5)))
    assert isinstance(await result(sec, token(exp=now + 60, nbf=now + 5, iat=now + 5)), Identity)
    assert is_refused(await result(sec, token(exp=now + 60, nbf=now + 6)))
    assert is_refused(await result(sec, token(exp=now + 60, iat=now + 6)))
    assert is_refused(await result(sec, token(exp=now + 60, nbf=str(now))))  # a NumericDate is a number


@pytest_twisted.ensureDeferred
async def test_bad_signatures(keys: Path) -> None:
    sec = security(keys)
    good = token()
    header, claims, signature = good.split(b".")
    forged_claims = b64(json.dumps({"sub": "admin", "exp": int(time.time()) + 300}).encode()).encode()
    for bad in (
        header + b"." + forged_claims + b"." + signature,              # claims changed
        header + b"." + claims + b"." + signature[:-4] + b"AAAA",       # signature changed
        header + b"." + claims + b".",                                  # signature removed
        token(b"another secret that is long enough for hs256!"),        # unknown secret
        token(OTHER_RSA_KEY, "RS256"),                                  # unknown RSA key
        token(OTHER_RSA_KEY, "RS256", {"kid": "enc"}),                  # an encryption key is not for signatures
        token(OTHER_RSA_KEY, "RS256", {"kid": "r1"}),                   # another key under a known kid
        token(EC_KEY, "ES256", {"kid": "r1"}),                          # kid of a key of another kind
    ):
        assert is_refused(await result(sec, bad)), bad


@pytest.mark.parametrize("algorithm", ["none", "None", "NONE", "nOnE", ""])
@pytest_twisted.ensureDeferred
async def test_alg_none_is_always_refused(keys: Path, algorithm: str) -> None:
    sec = security(keys)
    claims = {"sub": "alice", "exp": int(time.time()) + 300}
    for signature in (b"", b"x", SECRET):
        assert is_refused(await result(sec, unsigned({"alg": algorithm, "typ": "JWT"}, claims, signature)))


@pytest_twisted.ensureDeferred
async def test_no_key_confusion(keys: Path) -> None:
    """An HS256 token 'signed' with the RSA public key as its secret must not verify against it."""
    import hashlib
    import hmac
    sec = Security.from_config(BrokerConfig(jwt_public_key_file=str(keys / "rsa.pem")))
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": "alice", "exp": int(time.time()) + 300}).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = hmac.new(pem(RSA_KEY), signing_input, hashlib.sha256).digest()
    assert is_refused(await result(sec, signing_input + b"." + b64(signature).encode()))


@pytest_twisted.ensureDeferred
async def test_issuer_and_audience(keys: Path) -> None:
    sec = security(keys, jwt_issuer="https://issuer.example", jwt_audience="mqtt")
    assert isinstance(await result(sec, token(iss="https://issuer.example", aud="mqtt")), Identity)
    assert isinstance(await result(sec, token(iss="https://issuer.example", aud=["web", "mqtt"])), Identity)
    for claims in ({"iss": "https://evil.example", "aud": "mqtt"}, {"aud": "mqtt"},
                   {"iss": "https://issuer.example", "aud": "web"}, {"iss": "https://issuer.example"},
                   {"iss": "https://issuer", "aud": "mqtt"}, {"iss": "", "aud": "mqtt"}):
        assert is_refused(await result(sec, token(**claims))), claims
    open_audience = security(keys)
    assert is_refused(await result(open_audience, token(aud="mqtt")))  # meant for someone named
    assert isinstance(await result(open_audience, token(iss="anyone")), Identity)


@pytest_twisted.ensureDeferred
async def test_the_issuer_is_compared_whole_whatever_pyjwt_checks(keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyJWT 2.10.0 compared ``iss`` as a substring of the issuer expected (CVE-2024-53861)."""
    monkeypatch.setattr(jwt.api_jwt.PyJWT, "_validate_iss", lambda *args, **kwargs: None)
    sec = security(keys, jwt_issuer="https://issuer.example")
    assert isinstance(await result(sec, token(iss="https://issuer.example")), Identity)
    for issuer in ("https://issuer", "", "i"):
        assert is_refused(await result(sec, token(iss=issuer))), issuer


@pytest_twisted.ensureDeferred
async def test_algorithm_restriction(keys: Path) -> None:
    sec = security(keys, jwt_algorithms="RS256, ES256")
    assert isinstance(await result(sec, token(RSA_KEY, "RS256")), Identity)
    assert is_refused(await result(sec, token(RSA_KEY, "PS256")))
    assert is_refused(await result(sec, token(SECRET, "HS256")))


@pytest.mark.filterwarnings("ignore:The HMAC key is")  # the test's own short-keyed HS512 token
@pytest_twisted.ensureDeferred
async def test_short_secret_accepts_only_fitting_algorithms(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET[:32])
    sec = Security.from_config(BrokerConfig(jwt_secret_file=str(tmp_path / "secret")))
    assert isinstance(await result(sec, token(SECRET[:32], "HS256")), Identity)
    assert is_refused(await result(sec, token(SECRET[:32], "HS512")))


# --- username and ACL claims -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_username_must_be_the_subject(keys: Path) -> None:
    sec = security(keys)
    assert await result(sec, token(), "alice") == await result(sec, token(), None)
    assert is_refused(await result(sec, token(), "admin"))
    assert is_refused(await result(sec, token(sub=None)))
    assert is_refused(await result(sec, token(sub=7)))
    other_claim = security(keys, jwt_username_claim="preferred_username")
    answer = await result(other_claim, token(preferred_username="bob"))
    assert isinstance(answer, Identity) and answer.username == "bob"
    unchecked = security(keys, jwt_username_claim="")
    answer = await result(unchecked, token(sub=None), "whoever")
    assert isinstance(answer, Identity) and answer.username == "whoever"


@pytest_twisted.ensureDeferred
async def test_a_subject_with_a_lone_surrogate_is_refused_as_bad_credentials(keys: Path) -> None:
    """JSON carries "\\ud800", and a str claim was taken whole for the user name: no MQTT string
    holds it [MQTT-1.5.4-1], and the store could not write it (a delayed will's row), which held
    up every write after it."""
    sec = security(keys)
    with LogCapture() as log:
        assert is_refused(await result(sec, token(sub="\ud800")))
        assert is_refused(await result(sec, token(sub="alice\udfff")))
    assert log.text().count("lone surrogate") == 2, log.text()


@pytest_twisted.ensureDeferred
async def test_acl_claims(keys: Path) -> None:
    sec = security(keys)
    answer = await result(sec, token(publish=["devices/dev-1/#"], subscribe="commands/dev-1/+"))
    assert isinstance(answer, Identity)
    assert answer.rules == AccessRules(("devices/dev-1/#",), ("commands/dev-1/+",))
    assert sec.can_publish(answer, "devices/dev-1/temp") and not sec.can_publish(answer, "devices/dev-2/temp")
    assert sec.can_subscribe(answer, "commands/dev-1/+") and not sec.can_subscribe(answer, "commands/#")
    # The claim is a permission to subscribe: it must cover the filter. Overlapping what the
    # client may read (as acl_file asks) is not enough.
    assert not sec.can_subscribe(answer, "#") and not sec.can_subscribe(answer, "commands/+/reboot")
    assert sec.can_subscribe(answer, "commands/dev-1/reboot")
    assert sec.can_read(answer, "commands/dev-1/reboot") and not sec.can_read(answer, "devices/dev-1/temp")
    answer = await result(sec, token(subscribe=[]))
    assert isinstance(answer, Identity) and answer.rules == AccessRules()
    assert (await result(sec, token())).rules is None  # type: ignore[union-attr]
    for bad in (["a/#/b"], [7], {"a": 1}, ["$share/g/x"]):
        assert is_refused(await result(sec, token(publish=bad))), bad
    renamed = security(keys, jwt_publish_claim="pub", jwt_subscribe_claim="sub_filters")
    answer = await result(renamed, token(pub=["x"], publish=["ignored"]))
    assert isinstance(answer, Identity) and answer.rules == AccessRules(("x",), ())


# --- the chain ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_passwords_that_are_not_tokens_are_not_mine(keys: Path) -> None:
    sec = security(keys, allow_anonymous=True)
    for password in (b"plain password", b"\xff\xfe.\x00.x", b"a.b", b"", b"a..b"):
        assert is_refused(await result(sec, password, "alice"))
        assert await result(sec, password) == Identity(client_id="dev-1", username=None)
    # Shaped like a token but garbage: decided (refused), not passed on.
    for password in (b"a.b.c", b"eyJhbGciOiJIUzI1NiJ9.e30.", b"A" * 60000 + b".B.C"):
        assert is_refused(await result(sec, password))


@pytest_twisted.ensureDeferred
async def test_password_file_comes_first(keys: Path) -> None:
    assert passwd(["-c", "-b", str(keys / "pw"), "alice", "alice-pw"]) == 0
    sec = security(keys, password_file=str(keys / "pw"))
    assert await result(sec, b"alice-pw", "alice") == Identity(client_id="dev-1", username="alice")
    # alice is the password file's to decide: a token does not get her in.
    assert is_refused(await result(sec, token(), "alice"))
    answer = await result(sec, token(sub="bob"), "bob")
    assert isinstance(answer, Identity) and answer.username == "bob"


@pytest_twisted.ensureDeferred
async def test_verification_runs_off_the_reactor_thread(keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    original = JwtAuthenticator.verify

    def recording(self: JwtAuthenticator, *args: Any) -> Any:
        threads.append(threading.current_thread())
        return original(self, *args)

    monkeypatch.setattr(JwtAuthenticator, "verify", recording)
    await result(security(keys), token(RSA_KEY, "RS256"))
    assert threads and threads[0] is not threading.main_thread()


# --- configuration and reload ------------------------------------------------------------------

@pytest.mark.parametrize("file,content,key,problem", [
    ("secret", b"short", "jwt_secret_file", "at least 32 bytes"),
    ("key.pem", b"not a key", "jwt_public_key_file", "not a PEM public key"),
    ("jwks.json", b"{", "jwt_jwks_file", "not JSON"),
    ("jwks.json", b"[]", "jwt_jwks_file", "\"keys\" list"),
    ("jwks.json", b'{"keys": [{"kty": "RSA"}]}', "jwt_jwks_file", "key 0"),
    ("jwks.json", b'{"keys": [{"kty": "oct", "k": "c2hvcnQ", "use": "enc"}]}', "jwt_jwks_file", "no usable"),
])
def test_bad_key_files(tmp_path: Path, file: str, content: bytes, key: str, problem: str) -> None:
    (tmp_path / file).write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        Security.from_config(BrokerConfig(**{key: str(tmp_path / file)}))
    assert caught.value.key == key and problem in str(caught.value)


def test_a_jwks_nested_too_deeply_to_parse_is_a_config_error(tmp_path: Path) -> None:
    # json.loads raises RecursionError, no ValueError, for it: a start ended in a traceback.
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError) as caught:
        Security.from_config(BrokerConfig(jwt_jwks_file=str(jwks)))
    assert str(caught.value) == f"jwt_jwks_file: {jwks}: not JSON: nested too deeply"


@pytest.mark.parametrize("algorithms,problem", [("none", "never accepted"), ("RS256,XX1", "unknown algorithm"),
                                                ("HS256", "no configured key fits")])
def test_bad_algorithms(keys: Path, algorithms: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Security.from_config(BrokerConfig(jwt_public_key_file=str(keys / "rsa.pem"), jwt_algorithms=algorithms))
    assert caught.value.key == "jwt_algorithms" and problem in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_reload_reads_new_keys(keys: Path) -> None:
    sec = security(keys, jwt_public_key_file=None, jwt_jwks_file=None)
    new_secret = b"n" * 48
    assert isinstance(await result(sec, token()), Identity)
    (keys / "secret").write_bytes(new_secret)
    await sec.reload()
    assert is_refused(await result(sec, token()))
    assert isinstance(await result(sec, token(new_secret, "HS384")), Identity)
    (keys / "secret").write_bytes(b"short")
    with pytest.raises(ConfigError):
        await sec.reload()
    assert isinstance(await result(sec, token(new_secret, "HS384")), Identity)


@pytest.mark.parametrize("exp", [10**400, "NaN"], ids=["10**400", "NaN"])
@pytest_twisted.ensureDeferred
async def test_an_exp_that_is_no_time_is_a_bad_token(exp: Any) -> None:
    """exp = 10**400 passes PyJWT (an int far ahead) and overflowed a float: 0x80 and a logged
    traceback, where a bad token is 0x86. NaN (which json reads) likewise."""
    sec = Security(authenticators=[JwtAuthenticator([TokenKey(SECRET, frozenset({"HS256"}), None, "secret")])],
                   allow_anonymous=False)
    claims = b'{"sub": "alice", "exp": %s}' % (b"NaN" if exp == "NaN" else str(exp).encode())
    answer = await sec.authenticate(connect(hs256(claims, SECRET)))
    assert isinstance(answer, Refusal) and answer.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD, answer
    assert "exp" in answer.reason, answer


def test_a_pem_key_in_jwt_secret_file_is_refused(tmp_path: Path) -> None:
    """A public key put in jwt_secret_file (for jwt_public_key_file) was taken as an HMAC secret:
    then every HS256 token made PyJWT raise InvalidKeyError, 0x80 and a traceback per CONNECT."""
    (tmp_path / "secret").write_bytes(pem(RSA_KEY))
    with pytest.raises(ConfigError) as caught:
        load_keys(secret_file=str(tmp_path / "secret"))
    assert caught.value.key == "jwt_secret_file" and "jwt_public_key_file" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_a_key_that_cannot_check_a_token_refuses_it_as_bad() -> None:
    """A key PyJWT will not use for the algorithm (InvalidKeyError, not an InvalidTokenError):
    the token is refused (0x86), not a failure of the broker (0x80)."""
    public = pem(RSA_KEY)
    sec = Security(authenticators=[JwtAuthenticator([TokenKey(public, frozenset({"HS256"}), None, "odd")])],
                   allow_anonymous=False)
    answer = await sec.authenticate(connect(hs256(b'{"sub": "alice", "exp": %d}' % (time.time() + 300), public)))
    assert isinstance(answer, Refusal) and answer.reason_code == ReasonCode.BAD_USER_NAME_OR_PASSWORD, answer


def test_a_jwks_key_for_an_algorithm_not_verified_here_is_left_out(tmp_path: Path) -> None:
    """A JWK with "alg": "none" made PyJWK raise NotImplementedError, out of the start (and of a
    SIGHUP reload, which expects ConfigError); such a key verifies nothing here: it is left out."""
    jwks = tmp_path / "jwks.json"
    none = {"kty": "oct", "k": b64(SECRET), "alg": "none", "kid": "n"}
    jwks.write_text(json.dumps({"keys": [none]}))
    with pytest.raises(ConfigError) as caught:
        load_keys(jwks_file=str(jwks))
    assert caught.value.key == "jwt_jwks_file" and "no usable signing key" in str(caught.value)
    jwks.write_text(json.dumps({"keys": [none, {**json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "kid": "r"}]}))
    [kept] = load_keys(jwks_file=str(jwks))
    assert kept.kid == "r"
    for alg in (["RS256"], {"name": "RS256"}):  # (not a name: a TypeError out of the start, unhashable)
        jwks.write_text(json.dumps({"keys": [{**json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key())), "alg": alg}]}))
        with pytest.raises(ConfigError, match="no usable signing key"):
            load_keys(jwks_file=str(jwks))

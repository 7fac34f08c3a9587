"""JWT authentication: a token in the CONNECT password, verified with configured keys (PyJWT).

Keys come from ``jwt_secret_file`` (an HMAC secret, surrounding whitespace removed),
``jwt_public_key_file`` (a PEM public key or certificate) and ``jwt_jwks_file`` (a JSON Web Key
Set; a token's ``kid`` picks the key). Each key accepts only the algorithms of its kind:

============================  ===========================================================
key                           algorithms
============================  ===========================================================
HMAC secret                   HS256 (32+ bytes), HS384 (48+ bytes), HS512 (64+ bytes)
RSA                           RS256, RS384, RS512, PS256, PS384, PS512
EC P-256 / P-384 / P-521      ES256 / ES384 / ES512
Ed25519, Ed448                EdDSA
============================  ===========================================================

narrowed by a JWK's ``alg`` and by ``jwt_algorithms``. ``alg: none`` is never accepted, and an
HMAC algorithm never meets a public key (no key confusion). ``exp`` is required; ``nbf`` and
``iat`` are checked when present, all three against the broker's clock (with ``jwt_leeway``
seconds of slack), the one that ends the connection at ``exp``; ``iss`` and ``aud`` must equal
``jwt_issuer`` and ``jwt_audience`` when those are set (a token with an ``aud`` is refused when
``jwt_audience`` is not set). The username is the ``jwt_username_claim`` claim (``sub``); a
CONNECT username must then equal it. The ``jwt_publish_claim`` and ``jwt_subscribe_claim``
claims (lists of topic filters, or one filter) become the client's :class:`AccessRules`, with
``%c`` and ``%u`` replaced by its client id and username as in ``acl_file`` patterns.

A password that is not shaped like a JWT (three base64url parts) is "not mine".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ..config import BrokerConfig, ConfigError
from ..wire.codes import ReasonCode
from . import Credentials, Identity, Refusal, numeric_date
from .acl import AccessRules
from .authenticators import in_thread, the_clock

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger()

HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}
"""HMAC algorithms and the shortest secret each accepts (RFC 7518 section 3.2)."""
RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}
KNOWN = frozenset([*HMAC, *RSA, *EC_CURVES.values(), "EdDSA"])
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class TokenKey:
    """One verification key, the algorithms it accepts, and its ``kid`` (JWKS keys)."""

    key: Any
    algorithms: frozenset[str]
    kid: str | None = None
    source: str = ""


def _algorithms_for(key: Any) -> frozenset[str]:
    if isinstance(key, bytes):
        return frozenset(name for name, minimum in HMAC.items() if len(key) >= minimum)
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset(RSA)
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = EC_CURVES.get(key.curve.name)
        return frozenset([name]) if name else frozenset()
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return frozenset(["EdDSA"])
    return frozenset()


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", key) from None


def load_keys(secret_file: str = "", public_key_file: str = "", jwks_file: str = "") -> list[TokenKey]:
    """The keys of the configured files; raises ConfigError naming the setting."""
    keys: list[TokenKey] = []
    if secret_file:
        secret = _read(secret_file, "jwt_secret_file").strip()
        if secret.startswith(b"-----BEGIN "):
            raise ConfigError(f"{secret_file}: a PEM key or certificate is not an HMAC secret (a "
                              "public key goes in jwt_public_key_file)", "jwt_secret_file")
        if len(secret) < HMAC["HS256"]:
            raise ConfigError(f"{secret_file}: an HMAC secret needs at least 32 bytes, this one has "
                              f"{len(secret)}", "jwt_secret_file")
        keys.append(TokenKey(secret, _algorithms_for(secret), None, secret_file))
    if public_key_file:
        pem = _read(public_key_file, "jwt_public_key_file")
        public: Any
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                public = load_pem_x509_certificate(pem).public_key()
            else:
                public = load_pem_public_key(pem)
        except ValueError:
            raise ConfigError(f"{public_key_file}: not a PEM public key or certificate",
                              "jwt_public_key_file") from None
        except UnsupportedAlgorithm as e:  # (an elliptic curve the cryptography package lacks)
            raise ConfigError(f"{public_key_file}: unsupported key: {e}", "jwt_public_key_file") from None
        algorithms = _algorithms_for(public)
        if not algorithms:
            raise ConfigError(f"{public_key_file}: unsupported key type {type(public).__name__}",
                              "jwt_public_key_file")
        keys.append(TokenKey(public, algorithms, None, public_key_file))
    if jwks_file:
        keys.extend(_load_jwks(jwks_file))
    return keys


def _load_jwks(path: str) -> list[TokenKey]:
    text = _read(path, "jwt_jwks_file")  # (its ConfigError, a ValueError, as it is)
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not JSON: {e}", "jwt_jwks_file") from None
    except RecursionError:  # (json recurses once per level of arrays or objects)
        raise ConfigError(f"{path}: not JSON: nested too deeply", "jwt_jwks_file") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: a JWKS is an object with a \"keys\" list", "jwt_jwks_file")
    keys = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        wanted = entry.get("alg")
        if wanted is not None and (not isinstance(wanted, str) or wanted not in KNOWN):
            continue  # ("none" among them) no token is verified with it
        kid = entry.get("kid")
        kty = entry.get("kty")
        name = f"key {index}" + (f" ({kid!r})" if isinstance(kid, str) else "")
        if not isinstance(kty, str):
            raise ConfigError(f"{path}: {name}: no \"kty\"", "jwt_jwks_file")
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError, NotImplementedError) as e:
            # Not PyJWT's words: some quote the whole JWK, its secret or private parts included.
            raise ConfigError(f"{path}: {name}: not a usable {kty!r} key ({type(e).__name__})",
                              "jwt_jwks_file") from None
        if hasattr(key, "public_key") and not isinstance(key, bytes):
            key = key.public_key()  # a JWK with private parts: verification needs the public half
        algorithms = _algorithms_for(key)
        if isinstance(wanted, str):
            algorithms = algorithms & {wanted}
        if algorithms:
            keys.append(TokenKey(key, algorithms, kid if isinstance(kid, str) else None, path))
    if not keys:
        raise ConfigError(f"{path}: no usable signing key", "jwt_jwks_file")
    return keys


def parse_algorithms(text: str) -> frozenset[str] | None:
    """``jwt_algorithms`` ("RS256, ES256") as a set, None when empty; raises ConfigError."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names:
        return None
    for name in names:
        if name.lower() == "none":
            raise ConfigError("alg none is never accepted", "jwt_algorithms")
        if name not in KNOWN:
            raise ConfigError(f"unknown algorithm {name!r} (known: {', '.join(sorted(KNOWN))})",
                              "jwt_algorithms")
    return frozenset(names)


class JwtAuthenticator:
    """Decides for clients whose password is a JWT."""

    name = "jwt"

    def __init__(self, keys: list[TokenKey], *, algorithms: frozenset[str] | None = None,
                 issuer: str = "", audience: str = "", leeway: float = 0, username_claim: str = "sub",
                 publish_claim: str = "publish", subscribe_claim: str = "subscribe",
                 reactor: Any = None, clock: IReactorTime | None = None,
                 reload_keys: Callable[[], list[TokenKey]] | None = None) -> None:
        """``clock`` (default: the reactor) is the broker's, which a token's times are checked
        against."""
        self._allowed = algorithms
        self._keys = self._narrow(keys)
        self.issuer, self.audience, self.leeway = issuer, audience, leeway
        self.username_claim, self.publish_claim, self.subscribe_claim = username_claim, publish_claim, subscribe_claim
        self._reactor, self._clock = reactor, clock
        self._reload_keys = reload_keys

    @classmethod
    def from_config(cls, config: BrokerConfig, reactor: Any = None,
                    clock: IReactorTime | None = None) -> JwtAuthenticator:
        """Raises ConfigError naming the setting."""
        def keys() -> list[TokenKey]:
            return load_keys(config.jwt_secret_file, config.jwt_public_key_file, config.jwt_jwks_file)

        authenticator = cls(keys(), algorithms=parse_algorithms(config.jwt_algorithms),
                            issuer=config.jwt_issuer, audience=config.jwt_audience, leeway=config.jwt_leeway,
                            username_claim=config.jwt_username_claim, publish_claim=config.jwt_publish_claim,
                            subscribe_claim=config.jwt_subscribe_claim, reactor=reactor, clock=clock,
                            reload_keys=keys)
        log.info("JWT authentication: {algorithms}", algorithms=", ".join(sorted(authenticator.algorithms)))
        return authenticator

    def _narrow(self, keys: list[TokenKey]) -> list[TokenKey]:
        if self._allowed is not None:
            keys = [TokenKey(k.key, k.algorithms & self._allowed, k.kid, k.source) for k in keys]
        keys = [k for k in keys if k.algorithms]
        if not keys:
            raise ConfigError("no configured key fits the allowed algorithms", "jwt_algorithms")
        return keys

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset().union(*(k.algorithms for k in self._keys))

    def authenticate(self, credentials: Credentials) -> Deferred[Identity | Refusal | None]:
        password = credentials.password
        if password is None:
            return succeed(None)
        try:
            token = password.decode("ascii")
        except UnicodeDecodeError:
            return succeed(None)
        if not _SHAPE.fullmatch(token):
            return succeed(None)
        return in_thread(self._reactor, self.verify, token, credentials, self._now())

    def _now(self) -> float:
        return float(the_clock(self._clock, self._reactor).seconds())

    def verify(self, token: str, credentials: Credentials, now: float) -> Identity | Refusal:
        """Check a token (off the reactor thread: RSA and EC checks take a while) at ``now``,
        the broker's time (read on the reactor thread)."""
        refused = ReasonCode.BAD_USER_NAME_OR_PASSWORD
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return Refusal(refused, "token: malformed header")
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in KNOWN:
            return Refusal(refused, f"token: algorithm {str(algorithm)[:20]!r} refused")
        candidates = [k for k in self._keys if algorithm in k.algorithms
                      and (k.kid is None or kid is None or k.kid == kid)]
        if not candidates:
            return Refusal(refused, f"token: no key for algorithm {algorithm}")
        required = ["exp"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        claims: dict[str, Any] | None = None
        problem = "bad signature"
        for candidate in candidates:
            try:
                claims = jwt.decode(token, candidate.key, algorithms=[algorithm],
                                    audience=self.audience or None, issuer=self.issuer or None,
                                    # (The times are checked below, on the broker's clock:
                                    # PyJWT's is the wall clock.)
                                    options={"require": required, "verify_exp": False,
                                             "verify_nbf": False, "verify_iat": False})
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as e:  # (InvalidKeyError too: a key that cannot check it)
                problem = str(e)[:200] or type(e).__name__
                break
        if claims is None:
            return Refusal(refused, f"token: {problem}")
        if self.issuer and claims.get("iss") != self.issuer:  # (PyJWT 2.10.0 took any substring of it)
            return Refusal(refused, "token: Invalid issuer")
        # A NumericDate is a JSON number (RFC 7519, 2); PyJWT lets "1796384387" through, and
        # NaN, and the connection would then outlive the token.
        expiry = numeric_date(claims.get("exp"))
        if expiry is None:
            return Refusal(refused, "token: exp is not a time")
        if expiry + self.leeway <= now:
            return Refusal(refused, "token: expired")
        for claim in ("nbf", "iat"):
            if claim in claims:
                start = numeric_date(claims[claim])
                if start is None:
                    return Refusal(refused, f"token: {claim} is not a time")
                if start > now + self.leeway:
                    return Refusal(refused, f"token: not yet valid ({claim})")
        return self._identity(claims, credentials, expiry)

    def _identity(self, claims: dict[str, Any], credentials: Credentials, expiry: float) -> Identity | Refusal:
        refused = ReasonCode.BAD_USER_NAME_OR_PASSWORD
        username = credentials.username
        if self.username_claim:
            claimed = claims.get(self.username_claim)
            if not isinstance(claimed, str):
                return Refusal(refused, f"token: no {self.username_claim} claim")
            if username is not None and username != claimed:
                return Refusal(refused, f"token: username is not the {self.username_claim} claim")
            username = claimed
        rules = None
        if self.publish_claim in claims or self.subscribe_claim in claims:
            try:
                rules = AccessRules.from_lists(_filters(claims.get(self.publish_claim)),
                                               _filters(claims.get(self.subscribe_claim))
                                               ).for_client(credentials.client_id, username)
            except ValueError as e:
                return Refusal(refused, f"token: {e}")
        # The token is accepted until exp + leeway; so the connection lasts as long.
        return Identity(client_id=credentials.client_id, username=username, rules=rules,
                        expires_at=expiry + self.leeway)

    def prepare_reload(self) -> Callable[[], None]:
        if self._reload_keys is None:
            return lambda: None
        new = self._narrow(self._reload_keys())

        def commit() -> None:
            self._keys = new
        return commit

    def close(self) -> Deferred[None]:
        return succeed(None)


def _filters(value: Any) -> list[Any]:
    """A claim of topic filters: a list, one string, or absent."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f"topic filters must be a list of strings, not {type(value).__name__}")


__all__ = ["JwtAuthenticator", "TokenKey", "load_keys", "parse_algorithms"]

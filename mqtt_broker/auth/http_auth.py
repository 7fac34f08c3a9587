"""HTTP authentication: ask a web service about each client (treq), or introspect its OAuth2 token.

``http_auth_mode = "json"`` (default): the broker POSTs, as JSON::

    {"client_id": "dev-1", "username": "alice", "password": "secret",
     "password_base64": "c2VjcmV0", "peer": "192.0.2.7:50112", "protocol_version": 5,
     "certificate_identity": null}

(``password`` is null when the password is not UTF-8; ``password_base64`` always carries the
exact bytes; both are null without a password.) The answer decides:

- 2xx with an empty body (one its headers said was empty: ``Content-Length: 0``, a 204, an
  empty chunked body), ``{"result": "allow"}``, or an object with an ACL alone: accepted. The
  object may add ``"publish": [filters]`` and ``"subscribe": [filters]``: the client's ACL (it
  replaces ``acl_file`` for that client; ``%c`` and ``%u`` in them are replaced by the client
  id and username as in ``acl_file`` patterns);
- 401, 403, or 2xx with ``{"result": "deny"}``: refused (0x86, or 0x87 without credentials);
- 2xx with ``{"result": "ignore"}``: not decided here (``allow_anonymous`` then applies to a
  client without a username, any other is refused);
- anything else (another status, a body that is not such JSON or larger than 64 KiB, an
  answer of no length whose connection closed before any body, as a service's that died after
  its headers does, no answer within ``http_auth_timeout``, a refused connection): refused
  with 0x88 (server unavailable) and logged. Nobody gets in because the service is down.

``http_auth_mode = "introspection"``: the password is an OAuth2 access token, checked by
token introspection (RFC 7662): the broker POSTs ``token=...&token_type_hint=access_token``
(form-encoded) to the introspection endpoint, authenticating itself with the header in
``http_auth_authorization_file`` (e.g. ``Basic <base64 of client_id:client_secret>``). An
answer ``{"active": true, ...}`` accepts: the username is the answer's ``username``, else its
``sub``, else the CONNECT's (a CONNECT username that differs from the answer's is refused);
``exp`` becomes the identity's expiry; ``publish``/``subscribe`` members, if any, its ACL.
``{"active": false}`` refuses with 0x86. A client without a password is not decided here.

In both modes ``http_auth_authorization_file`` (optional) holds the ``Authorization`` header
the broker sends. Answers (allow and deny, not errors) are cached for
``http_auth_cache_seconds``, at most ``http_auth_cache_size`` of them, keyed by a keyed hash of
the client id, username, password and the peer's host (not its port): 32 bytes each, however
long the client ids and usernames (up to 64 KiB each) of clients refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ..config import BrokerConfig, ConfigError, url_without_password
from ..wire.codes import ReasonCode
from . import Credentials, Identity, Refusal, numeric_date, withdrawable
from .acl import AccessRules
from .authenticators import the_clock

log = Logger()

MAX_ANSWER = 64 * 1024
JSON, INTROSPECTION = "json", "introspection"
MODES = (JSON, INTROSPECTION)

Answer = Identity | Refusal | None


class BadAnswer(Exception):
    """The service answered something this module cannot use."""


def _read_authorization(path: str) -> bytes | None:
    if not path:
        return None
    try:
        value = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", "http_auth_authorization_file") from None
    if not value or b"\n" in value or b"\r" in value:
        raise ConfigError(f"{path}: expected one line, the Authorization header's value",
                          "http_auth_authorization_file")
    return value


class HttpAuthenticator:
    """Asks a web service (``json`` mode) or an OAuth2 introspection endpoint."""

    name = "http"

    def __init__(self, url: str, *, mode: str = JSON, authorization_file: str = "", timeout: float = 5.0,
                 cache_seconds: float = 60.0, cache_size: int = 10000, reactor: Any = None,
                 clock: Any = None) -> None:
        """Raises ConfigError on a bad URL, mode or authorization file. ``clock`` (default: the
        reactor) times requests out and ages the cache."""
        shown = repr(url_without_password(url))
        try:
            parts = urlsplit(url)
            parts.port  # (read at each request: a bad one refused now)
        except ValueError:  # (its message may quote a password)
            raise ConfigError(f"{shown}: a bad port, or an unclosed [IPv6 address]", "http_auth_url") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{shown} is not an http:// or https:// URL", "http_auth_url")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"{shown}: credentials in the URL are not sent; put the Authorization "
                              "header in http_auth_authorization_file", "http_auth_url")
        if mode not in MODES:
            raise ConfigError(f"{mode!r} is not one of {', '.join(MODES)}", "http_auth_mode")
        self.url, self.mode = url, mode
        self._authorization_file = authorization_file
        self._authorization = _read_authorization(authorization_file)
        self.timeout = timeout
        self.cache_seconds, self.cache_size = cache_seconds, cache_size
        self._reactor, self._clock = reactor, clock
        self._client: Any = None
        self._pool: Any = None
        self._closes = self._reloads = 0
        self._asking: set[Deferred[Answer]] = set()
        """The requests under way, cancelled by ``close``."""
        self._cache: OrderedDict[bytes, tuple[float, Answer]] = OrderedDict()
        self._cache_key = os.urandom(32)  # never a plain password hash in memory
        self.requests = 0
        """Requests sent, for tests and statistics."""

    @classmethod
    def from_config(cls, config: BrokerConfig, reactor: Any = None, clock: Any = None) -> HttpAuthenticator:
        return cls(config.http_auth_url, mode=config.http_auth_mode,
                   authorization_file=config.http_auth_authorization_file, timeout=config.http_auth_timeout,
                   cache_seconds=config.http_auth_cache_seconds, cache_size=config.http_auth_cache_size,
                   reactor=reactor, clock=clock)

    def _the_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def _http(self) -> Any:
        if self._client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool
            reactor = self._the_reactor()
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 10
            self._client = HTTPClient(Agent(reactor, pool=self._pool))
        return self._client

    def _now(self) -> float:
        return float(the_clock(self._clock, self._reactor).seconds())

    # --- the chain ----------------------------------------------------------------------

    def authenticate(self, credentials: Credentials) -> Deferred[Answer]:
        if self.mode == INTROSPECTION:
            if credentials.password is None:
                return succeed(None)
            try:
                credentials.password.decode("utf-8")
            except UnicodeDecodeError:
                return succeed(None)
        key = self._key(credentials)
        cached = self._cached(key)
        if cached is not None:
            return succeed(cached[1])
        self.requests += 1
        asked = self._ask(credentials)
        self._asking.add(asked)
        asked.addBoth(self._answered, asked)
        if self.timeout > 0:
            asked.addTimeout(self.timeout, the_clock(self._clock, self._reactor), onTimeoutCancel=_timed_out)
        # (Withdrawn, the client gone, the request goes, unlogged.)
        return withdrawable(lambda withdrawn: asked.addCallbacks(
            self._remember, self._unavailable, callbackArgs=(key, self._reloads),
            errbackArgs=(self._closes, withdrawn)))

    def _answered(self, result: Any, asked: Deferred[Answer]) -> Any:
        self._asking.discard(asked)
        return result

    def _key(self, credentials: Credentials) -> bytes:
        host = credentials.peer.rsplit(":", 1)[0]
        what = (credentials.client_id, credentials.username, credentials.password, host, credentials.certificate_identity)
        return hmac.new(self._cache_key, repr(what).encode("utf-8", "backslashreplace"), hashlib.sha256).digest()

    def _cached(self, key: bytes) -> tuple[float, Answer] | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry[0] <= self._now():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry

    def _remember(self, answer: Answer, key: bytes, asked_at: int) -> Answer:
        # One asked for before a reload is not kept: it was asked with the Authorization
        # header the reload replaced, which the service may no longer take.
        if self.cache_seconds > 0 and self.cache_size > 0 and asked_at == self._reloads:
            until = self._now() + self.cache_seconds
            if isinstance(answer, Identity) and answer.expires_at is not None:
                until = min(until, answer.expires_at)
            self._cache[key] = (until, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return answer

    def _unavailable(self, failure: Failure, asked_at: int, withdrawn: list[bool]) -> Refusal:
        if self._closes != asked_at:  # the broker stopped, and its requests with it
            raise CancelledError("the broker stopped")
        if withdrawn:
            raise CancelledError("no longer waited for")
        if failure.check(TimeoutError):
            why = f"no answer within {self.timeout}s"
        elif failure.check(BadAnswer):
            why = str(failure.value)
        else:
            why = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"[:300]
        log.error("http authentication at {url}: {why}; refusing", url=self.url, why=why)
        return Refusal(ReasonCode.SERVER_UNAVAILABLE, why)

    # --- one request ----------------------------------------------------------------------

    def _ask(self, credentials: Credentials) -> Deferred[Answer]:
        headers: dict[bytes, list[bytes]] = {}
        if self._authorization is not None:
            headers[b"Authorization"] = [self._authorization]
        password = credentials.password
        if self.mode == JSON:
            text = None
            if password is not None:
                try:
                    text = password.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            body = json.dumps({
                "client_id": credentials.client_id, "username": credentials.username, "password": text,
                "password_base64": base64.b64encode(password).decode("ascii") if password is not None else None,
                "peer": credentials.peer, "protocol_version": credentials.protocol_version,
                "certificate_identity": credentials.certificate_identity,
            }).encode("utf-8")
            headers[b"Content-Type"] = [b"application/json"]
        else:
            assert password is not None
            body = urlencode({"token": password.decode("utf-8"), "token_type_hint": "access_token"}).encode("ascii")
            headers[b"Content-Type"] = [b"application/x-www-form-urlencoded"]
        headers[b"Accept"] = [b"application/json"]
        requested = self._http().post(self.url, data=body, headers=headers, allow_redirects=False)
        return requested.addCallback(self._read, credentials)

    def _read(self, response: Any, credentials: Credentials) -> Deferred[Answer]:
        body = _Body()
        response.deliverBody(body)
        return body.done.addCallback(lambda data: self._decide(response.code, data, credentials))

    def _decide(self, status: int, body: bytes, credentials: Credentials) -> Answer:
        if self.mode == INTROSPECTION:
            return self._introspected(status, body, credentials)
        offered = credentials.username is not None or credentials.password is not None
        denied = Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD if offered else ReasonCode.NOT_AUTHORIZED,
                         "denied")
        if status in (401, 403):
            return denied
        if not 200 <= status < 300:
            raise BadAnswer(f"HTTP status {status}")
        if not body.strip():
            return Identity(client_id=credentials.client_id, username=credentials.username)
        answer = _json_object(body)
        # (Without a result, only an ACL allows: an error object must not let the client in.)
        result = answer.get("result", "allow" if "publish" in answer or "subscribe" in answer else None)
        if result == "deny":
            return denied
        if result == "ignore":
            return None
        if result != "allow":
            raise BadAnswer(f"unknown result {str(result)[:40]!r}" if result is not None else "no result")
        return Identity(client_id=credentials.client_id, username=credentials.username,
                        rules=_rules(answer, credentials.client_id, credentials.username))

    def _introspected(self, status: int, body: bytes, credentials: Credentials) -> Answer:
        if status != 200:
            raise BadAnswer(f"introspection answered HTTP status {status}")
        answer = _json_object(body)
        active = answer.get("active")
        if active is False:
            return Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "introspection: token not active")
        if active is not True:
            raise BadAnswer("introspection answer without a boolean \"active\"")
        named = next((answer[name] for name in ("username", "sub") if isinstance(answer.get(name), str)), None)
        username = credentials.username
        if isinstance(named, str):
            if username is not None and username != named:
                return Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD,
                               "introspection: the username is not the token's")
            username = named
        expiry = answer.get("exp")
        expires_at = None if expiry is None else numeric_date(expiry)
        if expiry is not None and expires_at is None:
            raise BadAnswer("introspection answer whose \"exp\" is not a time")
        return Identity(client_id=credentials.client_id, username=username,
                        rules=_rules(answer, credentials.client_id, username), expires_at=expires_at)

    # --- life cycle ---------------------------------------------------------------------

    def prepare_reload(self) -> Callable[[], None]:
        authorization = _read_authorization(self._authorization_file)

        def commit() -> None:
            self._authorization = authorization
            self._cache.clear()
            self._reloads += 1
        return commit

    def close(self) -> Deferred[None]:
        self._cache.clear()
        self._closes += 1  # (counted, not a flag: started again, the broker asks again)
        for asked in list(self._asking):
            asked.cancel()
        if self._pool is None:
            return succeed(None)
        pool, self._pool, self._client = self._pool, None, None
        closed: Deferred[None] = pool.closeCachedConnections()
        return closed


class _Body(Protocol):
    """A response's body, up to MAX_ANSWER bytes. Cancelled (timed out, withdrawn), it closes
    the connection: a service that stalls in the middle of its answer keeps none open."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred(self._close)
        self._chunks: list[bytes] = []
        self._size = 0

    def _close(self, _: Any = None) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self._close()
            self.done.errback(BadAnswer(f"answer larger than {MAX_ANSWER} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        elif reason.check(PotentialDataLoss):  # (an answer of no length, ended by the close)
            # Closed before any body, the service may have died after its headers: an empty
            # body, which allows, is one whose length said so (Content-Length: 0, a 204, chunks).
            if self._chunks:
                self.done.callback(b"".join(self._chunks))
            else:
                self.done.errback(BadAnswer("the connection closed before any body, in an answer of no length"))
        else:
            self.done.errback(reason)


def _timed_out(result: Any, timeout: float) -> None:
    # The agent reports a cancelled request as ResponseNeverReceived: say what happened.
    raise TimeoutError(f"no answer within {timeout}s")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadAnswer("answer is not JSON") from None
    except RecursionError:  # (json recurses once per level of arrays or objects)
        raise BadAnswer("answer is not JSON: nested too deeply") from None
    if not isinstance(answer, dict):
        raise BadAnswer("answer is not a JSON object")
    return answer


def _rules(answer: dict[str, Any], client_id: str, username: str | None) -> AccessRules | None:
    """The ACL of an answer, for this client (``%c``, ``%u`` replaced), or None."""
    if "publish" not in answer and "subscribe" not in answer:
        return None
    publish, subscribe = answer.get("publish", []), answer.get("subscribe", [])
    if not isinstance(publish, list) or not isinstance(subscribe, list):
        raise BadAnswer("publish and subscribe must be lists of topic filters")
    try:
        return AccessRules.from_lists(publish, subscribe).for_client(client_id, username)
    except ValueError as e:
        raise BadAnswer(str(e)) from None


__all__ = ["HttpAuthenticator", "MODES"]

"""Authentication, topic ACLs: the one interface the broker calls.

The broker builds one :class:`Security` with :meth:`Security.from_config` and, when
``security.enabled`` is true (otherwise it skips every call below):

- on CONNECT: ``verified, identity = security.client_certificate(transport)``, then
  ``security.authenticate(Credentials(..., certificate_identity=identity, certificate_verified=verified))``: a ``Deferred`` that always fires (never fails)
  with an :class:`Identity` (connect; the connection keeps it) or a :class:`Refusal` (answer
  CONNACK with ``refusal.reason_code``, mapped to a 3.x return code by
  :func:`mqtt_broker.wire.codes.v3_connack_code`; the refusal is already logged);
- on each SUBSCRIBE filter: ``security.can_subscribe(identity, topic_filter)`` (False: SUBACK
  0x80 in 3.x, 0x87 in 5): False when nothing could ever be delivered on the filter;
- on each PUBLISH from a client: ``security.can_publish(identity, topic)`` (False: the message
  is dropped; MQTT 5 PUBACK/PUBREC 0x87);
- on each delivery, retained messages sent on SUBSCRIBE included:
  ``security.can_read(identity, topic)`` (False: not delivered). Cached, so it is cheap;
- on SIGHUP: ``security.reload()``, a ``Deferred``; it fails with :class:`ConfigError` (already
  logged) and keeps the old state if a new file is bad. Once it fired, for each connected client,
  ``security.revoked(identity)``: a reason (str) when its credentials no longer pass (password
  changed, user removed): disconnect it;
- on shutdown: ``security.close()`` (a ``Deferred``; closes the HTTP connection pool).

Authentication is a chain. Each authenticator answers allow (an Identity), deny (a Refusal) or
"not mine" (None, ask the next one), in this order:

1. client certificate: with ``require_certificate``, a client without a verified certificate is
   refused (0x87); with ``use_identity_as_username``, the certificate's identity becomes the
   username and nothing else is asked (no identity: refused, 0x87);
2. ``password_file``: decides for the users it lists (wrong or missing password: 0x86);
3. JWT (``jwt_secret_file``, ``jwt_public_key_file``, ``jwt_jwks_file``): decides when the
   password is a JWT (bad signature, expired, wrong issuer or audience, ``alg: none``: 0x86);
4. HTTP (``http_auth_url``): decides for everyone who gets this far, unless it answers
   ``ignore``; unreachable, slow or wrong answers refuse with 0x88 (server unavailable).

When nobody decided: a client without a username is accepted if ``allow_anonymous``, else
refused with 0x87; a client with a username is refused with 0x86, except when no authenticator
is configured at all, where (as in Mosquitto) the username is taken as given.

Authorization: ``$SYS`` topics can never be published to, nor ``$share/...`` topics. Then the
identity's own :class:`AccessRules` (from a JWT's claims or an HTTP answer) decide alone when
present; otherwise ``acl_file`` decides (see :mod:`mqtt_broker.auth.acl`); with neither,
everything is allowed. A SUBSCRIBE is refused when the filter is not covered by one of an
identity's own ``subscribe`` filters, or, with ``acl_file``, when it matches no topic the client
may read; Mosquitto grants every SUBSCRIBE and only filters deliveries, as :meth:`can_read`
still does for the filters granted.

``Identity.expires_at`` (a JWT's or an introspected token's ``exp``) tells the broker when the
credentials run out: it disconnects the client then. With ``enabled`` false the
broker calls nothing here, so it must refuse PUBLISHes to ``$SYS`` itself if it wants them
refused in that case too.

Hash checks, token verification and the reading of files on reload run in the reactor's thread
pool; at start-up, files are read before the broker listens. A password is never logged, nor
shown in a ``repr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import BrokerConfig, ConfigError
from ..logged import shortened
from ..topics import reserved
from ..wire.codes import ReasonCode
from .acl import READ, WRITE, AccessRules, AclFile

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads, IReactorTime

log = Logger()

MAX_CACHED_READS = 100_000
"""Entries of the can_read (and of the can_publish) cache before it is emptied and starts again."""
MAX_CACHED_TOPIC = 256
"""Longer topics, client ids and usernames are checked each time: a cache of the longest (65,535
bytes each) would hold gigabytes."""


T = TypeVar("T")


def withdrawable(start: Callable[[list[bool]], Deferred[T]]) -> Deferred[T]:
    """``start(withdrawn)``'s answer, in a Deferred whose cancellation (the client left) marks
    ``withdrawn`` before it cancels what ``start`` returned: what handles that cancellation then
    knows no one waits for the answer, and neither logs nor refuses it as a failure."""
    withdrawn: list[bool] = []

    def withdraw(_: Deferred[T]) -> None:
        withdrawn.append(True)
        running.cancel()
    answer: Deferred[T] = Deferred(withdraw)

    def settle(result: T | Failure) -> None:
        if answer.called:  # (withdrawn, it has its answer already)
            return
        if isinstance(result, Failure):
            answer.errback(result)
        else:
            answer.callback(result)
    running = start(withdrawn)
    running.addBoth(settle)
    return answer


def numeric_date(value: Any) -> float | None:
    """A JSON NumericDate as seconds, or None if it is not one (a string, a boolean, NaN, or a
    number beyond any float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def lone_surrogate_in(identity: Identity) -> str | None:
    """Which of ``identity``'s client id and user name holds a lone surrogate ("client id",
    "username"), or None. No MQTT string may [MQTT-1.5.4-1], nor can the store write one (a
    delayed will's row), but an auth answer's JSON can carry one (a JWT's ``sub``, an HTTP
    answer's ``username``: "\\ud800")."""
    for what, name in (("client id", identity.client_id), ("username", identity.username)):
        try:
            if name is not None:
                name.encode("utf-8")
        except UnicodeEncodeError:
            return what
    return None


def _cacheable(identity: Identity, topic: str) -> bool:
    return len(topic) <= MAX_CACHED_TOPIC and len(identity.client_id) <= MAX_CACHED_TOPIC and (
        identity.username is None or len(identity.username) <= MAX_CACHED_TOPIC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What a CONNECT brings, plus what the transport knows."""

    client_id: str
    username: str | None
    password: bytes | None = field(repr=False)
    peer: str
    """The remote address, ``host:port``."""
    protocol_version: int
    """3, 4 (3.1.1) or 5."""
    certificate_identity: str | None = None
    """From :meth:`Security.certificate_identity`: set when an ``mqtts:`` endpoint verified a
    client certificate that has the ``certificate_identity`` field."""
    certificate_verified: bool = False
    """An ``mqtts:`` endpoint verified a client certificate (whether it has that field or not)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who an authenticated client is; the connection keeps it for every ``can_*`` call."""

    client_id: str
    username: str | None
    rules: AccessRules | None = None
    """ACL handed out with the authentication (JWT claims, HTTP answer, an auth hook's answer);
    when set, it replaces ``acl_file`` for this client. ``%c`` and ``%u`` in an auth hook's are
    replaced by the broker (:meth:`AccessRules.for_client`)."""
    expires_at: float | None = None
    """POSIX time at which the credentials expire (a JWT's ``exp`` plus ``jwt_leeway``, an
    introspected token's ``exp``); the broker disconnects the client then (MQTT 5: DISCONNECT
    0xA0). None: no expiry."""
    entry: Any = field(default=None, compare=False, repr=False)
    """What the credentials were checked against, kept instead of the password so that a reload
    can tell whether they still pass (:meth:`Security.revoked`): the user name and hash
    ``password_file`` checked, kept when an auth hook's identity replaces the file's. None:
    nothing to check again."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused CONNECT: the reason code to answer with, and why, for the log only (never sent
    to the client: "unknown user" and "wrong password" must look the same from outside)."""

    reason_code: ReasonCode
    reason: str = ""


class Authenticator(Protocol):
    """One link of the chain (see the module docstring)."""

    name: str

    def authenticate(self, credentials: Credentials) -> Deferred[Identity | Refusal | None]:
        """Fires with an Identity (allow), a Refusal (deny) or None (not mine). May fail: the
        chain logs the failure and refuses (0x80)."""

    def prepare_reload(self) -> Callable[[], None]:
        """Read the authenticator's files again; raises ConfigError if one is bad. Returns the
        function that puts what was read in force (called only when every part succeeded, on
        the reactor). Called in the reactor's thread pool: it must change nothing itself."""

    def close(self) -> Deferred[None]:
        """Release connections and the like."""

    # Optional: ``equalize(credentials) -> Deferred`` does the work a check of a known user
    # would, run before refusing a user nobody knows, so timing does not reveal who exists.
    # Optional: ``revoked(identity) -> str | None`` says why an identity this authenticator gave
    # out no longer holds after a reload (None: it holds, or is not this authenticator's).


class Security:
    """Authentication and authorization for one broker; see the module docstring."""

    def __init__(self, *, authenticators: Sequence[Authenticator] = (), acl_file: str = "",
                 allow_anonymous: bool = True, require_certificate: bool = False,
                 use_identity_as_username: bool = False, certificate_identity_field: str = "cn",
                 reactor: Any = None) -> None:
        """Most callers want :meth:`from_config`. ``acl_file`` is read here; raises ConfigError."""
        self._authenticators = list(authenticators)
        self._acl_path = acl_file
        self._acl: AclFile | None = load_acl(acl_file) if acl_file else None
        self._allow_anonymous = allow_anonymous
        self._closes = 0
        self._require_certificate = require_certificate
        self._use_identity_as_username = use_identity_as_username
        self._certificate_field = certificate_identity_field
        self._reactor = reactor
        self._reloads = DeferredLock()
        self._reads: dict[tuple[Any, ...], bool] = {}
        self._writes: dict[tuple[Any, ...], bool] = {}
        self.enabled = bool(self._authenticators or self._acl is not None or not allow_anonymous
                            or require_certificate or use_identity_as_username)
        """False when nothing is configured: everyone may connect and do anything, and the broker
        need not call anything here."""

    @classmethod
    def from_config(cls, config: BrokerConfig, reactor: IReactorTime | IReactorThreads | None = None,
                    clock: IReactorTime | None = None) -> Security:
        """The security of a broker with these settings; reads every configured file.

        Raises ConfigError naming the setting (and file) when something cannot be used. The
        reactor (default: the global one) runs hash checks in its thread pool and HTTP requests.
        ``clock`` (default: the reactor) is the broker's, which ends a connection when its token
        expires: a JSON Web Token's times are checked against it, and HTTP requests time out and
        answers age on it."""
        from .authenticators import authenticators_from_config
        if config.use_identity_as_username and not config.require_certificate:
            log.info("use_identity_as_username: clients without a verified certificate will be refused")
        chain = authenticators_from_config(config, reactor, clock)
        security = cls(authenticators=chain, acl_file=config.acl_file,
                       allow_anonymous=config.allow_anonymous,
                       require_certificate=config.require_certificate,
                       use_identity_as_username=config.use_identity_as_username,
                       certificate_identity_field=config.certificate_identity, reactor=reactor)
        if chain and config.allow_anonymous:
            log.warn("allow_anonymous is true: clients without a username are accepted even though "
                     "{methods} is configured", methods=", ".join(a.name for a in chain))
        if not chain and not config.use_identity_as_username:
            if not config.allow_anonymous:
                log.warn("allow_anonymous is false and there is no password_file, JWT key or "
                         "http_auth_url: every client is refused")
            elif config.acl_file:
                log.warn("acl_file is set but no password_file, JWT key or http_auth_url: usernames "
                         "are taken as the clients give them")
        return security

    # --- authentication -----------------------------------------------------------------

    def certificate_identity(self, transport: Any) -> str | None:
        """The identity (per the ``certificate_identity`` setting) of the client certificate the
        transport verified; None without one. Call it once per connection, at CONNECT."""
        return self.client_certificate(transport)[1]

    def client_certificate(self, transport: Any) -> tuple[bool, str | None]:
        """Whether the transport verified a client certificate, and its identity (as
        :meth:`certificate_identity`)."""
        from .certificates import verified_identity
        return verified_identity(transport, self._certificate_field)

    def authenticate(self, credentials: Credentials) -> Deferred[Identity | Refusal]:
        """Run the chain. Fires with an Identity or a Refusal (logged); never fails. Cancelled
        (its client left), it cancels the authenticator at work and refuses, unlogged."""
        return withdrawable(lambda withdrawn: Deferred.fromCoroutine(self._authenticate(credentials, withdrawn)))

    async def _authenticate(self, credentials: Credentials, withdrawn: list[bool]) -> Identity | Refusal:
        closes = self._closes
        certificate = credentials.certificate_verified or credentials.certificate_identity is not None
        if self._require_certificate and not certificate:  # (an identity alone: Credentials made before the flag)
            return self._refused(credentials, ReasonCode.NOT_AUTHORIZED, "no verified client certificate")
        if self._use_identity_as_username:
            if credentials.certificate_identity is None:
                return self._refused(credentials, ReasonCode.NOT_AUTHORIZED,
                                     "use_identity_as_username: no identity in a verified client certificate")
            return Identity(client_id=credentials.client_id, username=credentials.certificate_identity)
        for asked, authenticator in enumerate(self._authenticators):
            try:
                answer = await authenticator.authenticate(credentials)
            except Exception as e:
                cancelled = self._cancelled(e, authenticator.name, closes, withdrawn)
                if cancelled is not None:
                    return cancelled
                log.failure("{name} authentication of {client_id!r} failed; refusing",
                            name=authenticator.name, client_id=shortened(credentials.client_id))
                return self._refused(credentials, ReasonCode.UNSPECIFIED_ERROR, f"{authenticator.name} failed")
            if isinstance(answer, Refusal):
                # A later authenticator refusing at once (a password shaped like no token) would
                # tell the users the earlier ones passed on from those they hashed for.
                cancelled = await self._equalized(credentials, self._authenticators[:asked], closes, withdrawn)
                if cancelled is not None:
                    return cancelled
                return self._refused(credentials, answer.reason_code, f"{authenticator.name}: {answer.reason}")
            if isinstance(answer, Identity):
                malformed = lone_surrogate_in(answer)
                if malformed is not None:
                    return self._refused(credentials, ReasonCode.BAD_USER_NAME_OR_PASSWORD,
                                         f"{authenticator.name}: the {malformed} holds a lone surrogate")
                revoked = self.revoked(answer)
                if revoked is not None:  # the file changed while the password was being checked
                    return self._refused(credentials, ReasonCode.BAD_USER_NAME_OR_PASSWORD, revoked)
                return answer
        if credentials.username is None:
            if self._allow_anonymous:
                return Identity(client_id=credentials.client_id, username=None)
            return self._refused(credentials, ReasonCode.NOT_AUTHORIZED, "anonymous clients are not allowed")
        if not self._authenticators:
            if self._allow_anonymous:  # as in Mosquitto: user names taken as given (keying an acl_file)
                return Identity(client_id=credentials.client_id, username=credentials.username)
            # (Nothing could check the user name: taken as given, it would let anyone be anyone.)
            return self._refused(credentials, ReasonCode.NOT_AUTHORIZED,
                                 "allow_anonymous is false, and no authenticator (password_file, ...) is configured")
        cancelled = await self._equalized(credentials, self._authenticators, closes, withdrawn)
        if cancelled is not None:
            return cancelled
        return self._refused(credentials, ReasonCode.BAD_USER_NAME_OR_PASSWORD, "no authenticator accepted the user")

    async def _equalized(self, credentials: Credentials, passed: Sequence[Authenticator], closes: int,
                         withdrawn: list[bool]) -> Refusal | None:
        """Cost a user the authenticators in ``passed`` do not know what a known one costs, so
        timing does not tell them apart; the refusal if the client or the broker left meanwhile."""
        for authenticator in passed:
            equalize = getattr(authenticator, "equalize", None)
            if equalize is not None:
                try:
                    await equalize(credentials)
                except Exception as e:
                    cancelled = self._cancelled(e, authenticator.name, closes, withdrawn)
                    if cancelled is not None:
                        return cancelled
                    log.failure("{name}: equalizing the cost of a refusal failed", name=authenticator.name)
        return None

    def _cancelled(self, error: Exception, name: str, closes: int, withdrawn: list[bool]) -> Refusal | None:
        """The refusal, unlogged, for a check cancelled because no one waits for its answer any
        more (the broker stopped, or the client left); None for any other failure."""
        if isinstance(error, CancelledError):
            if self._closes != closes:
                return Refusal(ReasonCode.SERVER_SHUTTING_DOWN, f"{name}: the broker stopped")
            if withdrawn:
                return Refusal(ReasonCode.UNSPECIFIED_ERROR, f"{name}: withdrawn")
        return None

    def _refused(self, credentials: Credentials, code: ReasonCode, reason: str) -> Refusal:
        log.info("refused client {client_id!r} (username {username!r}) from {peer}: {reason} "
                 "(reason code 0x{code:02X})", client_id=shortened(credentials.client_id),
                 username=shortened(credentials.username), peer=credentials.peer, reason=shortened(reason),
                 code=int(code))
        return Refusal(code, reason)

    def revoked(self, identity: Identity) -> str | None:
        """Why the credentials a client connected with no longer pass the files now in force (its
        ``password_file`` entry changed or is gone since), or None. No hashing: the password is
        not kept, only what it was checked against (``identity.entry``)."""
        for authenticator in self._authenticators:
            check = getattr(authenticator, "revoked", None)
            why = check(identity) if check is not None else None
            if why is not None:
                return why
        return None

    # --- authorization ------------------------------------------------------------------

    def can_publish(self, identity: Identity, topic: str) -> bool:
        """Whether the client may publish to ``topic`` (a valid topic name)."""
        if reserved(topic):
            return False
        if identity.rules is not None:
            return identity.rules.can_publish(topic)
        acl = self._acl
        if acl is None:
            return True
        key = (identity.client_id, identity.username, topic)
        writes = self._writes
        allowed = writes.get(key)
        if allowed is None:
            allowed = acl.check(identity.client_id, identity.username, topic, WRITE)
            if _cacheable(identity, topic):
                if len(writes) >= MAX_CACHED_READS:
                    writes.clear()
                writes[key] = allowed
        return allowed

    def can_subscribe(self, identity: Identity, topic_filter: str) -> bool:
        """Whether the client may subscribe to ``topic_filter`` (a valid filter, maybe
        ``$share/...``): with its own rules, when one of their ``subscribe`` filters covers it
        (:meth:`AccessRules.can_subscribe`); with ``acl_file``, when it matches some topic the
        client may read (:meth:`AclFile.can_subscribe`; unlike Mosquitto, which grants every
        filter). :meth:`can_read` still filters each message on a granted filter. Not cached:
        SUBSCRIBEs are rare next to deliveries."""
        if identity.rules is not None:
            return identity.rules.can_subscribe(topic_filter)
        acl = self._acl
        return acl is None or acl.can_subscribe(identity.client_id, identity.username, topic_filter)

    def can_read(self, identity: Identity, topic: str) -> bool:
        """Whether a message on ``topic`` may be delivered to the client (retained ones too)."""
        rules = identity.rules
        key = (identity.client_id, identity.username, topic) if rules is None else (rules, topic)
        reads = self._reads
        allowed = reads.get(key)
        if allowed is None:
            if rules is not None:
                allowed = rules.can_read(topic)
            else:
                acl = self._acl
                allowed = acl is None or acl.check(identity.client_id, identity.username, topic, READ)
            if _cacheable(identity, topic):
                if len(reads) >= MAX_CACHED_READS:
                    reads.clear()
                reads[key] = allowed
        return allowed

    # --- life cycle ---------------------------------------------------------------------

    def reload(self) -> Deferred[None]:
        """Read ``password_file``, ``acl_file`` and the JWT keys (and HTTP credentials) again,
        in the reactor's thread pool (a file of 100,000 users takes half a second to parse).

        All or nothing: if any file is bad, the error is logged, the Deferred fails with
        ConfigError and the rules in force stay. New rules apply to connected clients when it
        fires. A reload asked for while another reads begins when that one is done."""
        return self._reloads.run(self._reload)

    def _reload(self) -> Deferred[None]:
        from .authenticators import in_thread
        return in_thread(self._reactor, self._read_again).addCallbacks(self._put_in_force, self._reload_refused)

    def _read_again(self) -> tuple[list[Callable[[], None]], AclFile | None]:
        # (In a thread: reads and parses, changes nothing.)
        return [a.prepare_reload() for a in self._authenticators], load_acl(self._acl_path) if self._acl_path else None

    def _put_in_force(self, read: tuple[list[Callable[[], None]], AclFile | None]) -> None:
        commits, self._acl = read
        for commit in commits:
            commit()
        self._reads, self._writes = {}, {}
        log.info("security settings reloaded")

    def _reload_refused(self, failure: Failure) -> Failure:
        if failure.check(ConfigError):
            log.error("reload refused, the previous security settings stay in force: {error}",
                      error=str(failure.value))
        return failure

    def close(self) -> Deferred[None]:
        """Release what the authenticators hold (HTTP connections). Fires when done. Checks under
        way are given up: their clients are refused with 0x8B, quietly."""
        from twisted.internet.defer import gatherResults
        self._closes += 1  # (counted, not a flag: started again, the broker checks again)
        closing = [a.close() for a in self._authenticators]
        if not closing:
            return succeed(None)
        return gatherResults(closing, consumeErrors=True).addBoth(lambda _: None)


def load_acl(path: str) -> AclFile:
    """The ACL file at ``path``; raises ConfigError naming ``acl_file`` when it cannot be used."""
    from .acl import AclFileError
    try:
        return AclFile.load(path)
    except AclFileError as e:
        raise ConfigError(str(e), "acl_file") from None


__all__ = ["Security", "Credentials", "Identity", "Refusal", "AccessRules", "Authenticator", "ConfigError", "load_acl"]

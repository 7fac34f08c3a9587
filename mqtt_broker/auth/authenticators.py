"""The password file authenticator, the thread helper, and the chain built from the settings."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed

from ..config import BrokerConfig, ConfigError
from ..wire.codes import ReasonCode
from . import Authenticator, Credentials, Identity, Refusal
from .passwords import PasswordFile, PasswordFileError, PasswordHash

T = TypeVar("T")


def in_thread(reactor: Any, function: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run ``function(*args)`` in the reactor's thread pool (the global reactor when None). A
    reactor without threads (a ``task.Clock`` in tests) runs it in place, deterministically."""
    from twisted.internet.interfaces import IReactorThreads
    from twisted.internet.threads import deferToThreadPool
    if reactor is None:
        from twisted.internet import reactor
    if not IReactorThreads.providedBy(reactor):
        return maybeDeferred(function, *args)
    return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)


class PasswordFileAuthenticator:
    """Mosquitto's ``password_file``: decides for the users it lists, passes the others on."""

    name = "password_file"

    def __init__(self, path: str, reactor: Any = None) -> None:
        """Reads the file; raises ConfigError (key ``password_file``) if it cannot be used."""
        self.path = path
        self._reactor = reactor
        self._file = self._load()
        self._closes = 0

    def _load(self) -> PasswordFile:
        try:
            return PasswordFile.load(self.path)
        except PasswordFileError as e:
            raise ConfigError(str(e), "password_file") from None

    def authenticate(self, credentials: Credentials) -> Deferred[Identity | Refusal | None]:
        if credentials.username is None:
            return succeed(None)
        stored = self._file.users.get(credentials.username)
        if stored is None:
            return succeed(None)
        if credentials.password is None:
            return succeed(Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "no password given"))
        identity = Identity(client_id=credentials.client_id, username=credentials.username, entry=stored)

        def judged(correct: bool) -> Identity | Refusal:
            return identity if correct else Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "wrong password")

        return self._hash(stored.verify, credentials.password).addCallback(judged)

    def equalize(self, credentials: Credentials) -> Deferred[None]:
        """Hash the password as a listed user's would be, and throw the answer away."""
        sample = next(iter(self._file.users.values()), None)
        if sample is None:
            return succeed(None)
        dummy = PasswordHash(sample.algorithm, sample.salt, bytes(len(sample.digest)), sample.iterations)
        return self._hash(dummy.verify, credentials.password or b"").addCallback(lambda _: None)

    def _hash(self, verify: Callable[[bytes], bool], password: bytes) -> Deferred[bool]:
        """``verify(password)`` in the thread pool, unless the broker stops (``close``) before its
        turn comes: a burst of CONNECTs, hashed one after another, held the stop for as long as
        hashing them all took (Twisted's pool runs what is queued before it ends), for clients
        already gone. Fails with CancelledError then."""
        asked_at = self._closes

        def unless_closed() -> bool:
            if self._closes != asked_at:
                raise CancelledError("the broker stopped")
            return verify(password)
        return in_thread(self._reactor, unless_closed)

    def revoked(self, identity: Identity) -> str | None:
        """Why a client let in by this file is no longer: its entry changed (a new password, or
        the same one hashed again) or is gone. Entries are compared, nothing is hashed."""
        if not isinstance(identity.entry, PasswordHash):
            return None  # not let in by this file
        entry = self._file.users.get(identity.username or "")
        if entry is None:
            return f"user {identity.username!r} is no longer in {self.path}"
        if entry != identity.entry:
            return f"the password of {identity.username!r} changed in {self.path}"
        return None

    def prepare_reload(self) -> Callable[[], None]:
        new = self._load()

        def commit() -> None:
            self._file = new
        return commit

    def close(self) -> Deferred[None]:
        self._closes += 1  # (counted, not a flag: started again, the broker checks passwords again)
        return succeed(None)


def authenticators_from_config(config: BrokerConfig, reactor: Any = None) -> list[Authenticator]:
    """The chain for these settings, in order: password file, JWT, HTTP. Raises ConfigError."""
    chain: list[Authenticator] = []
    if config.password_file:
        chain.append(PasswordFileAuthenticator(config.password_file, reactor))
    if config.jwt_secret_file or config.jwt_public_key_file or config.jwt_jwks_file:
        from .tokens import JwtAuthenticator
        chain.append(JwtAuthenticator.from_config(config, reactor))
    elif config.jwt_algorithms or config.jwt_issuer or config.jwt_audience:
        raise ConfigError("JWT settings are given but no key: set jwt_secret_file, "
                          "jwt_public_key_file or jwt_jwks_file", "jwt_secret_file")
    if config.http_auth_url:
        from .http_auth import HttpAuthenticator
        chain.append(HttpAuthenticator.from_config(config, reactor))
    return chain


__all__ = ["PasswordFileAuthenticator", "authenticators_from_config", "in_thread"]

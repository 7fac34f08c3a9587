"""The password file authenticator, the thread helper, and the chain built from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from ..config import BrokerConfig, ConfigError
from ..wire.codes import ReasonCode
from . import Authenticator, Credentials, Identity, Refusal
from .passwords import PasswordFile, PasswordFileError, PasswordHash

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")
log = Logger()


def the_clock(clock: Any, reactor: Any) -> Any:
    """The clock an authenticator goes by: the broker's when given, else its reactor, else the
    global reactor (imported only then: a twistd plugin chooses the reactor first)."""
    if clock is not None:
        return clock
    if reactor is None:
        from twisted.internet import reactor
    return reactor


def in_thread(reactor: Any, function: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run ``function(*args)`` in the reactor's thread pool (the global reactor when None). A
    reactor without threads (a ``task.Clock`` in tests) runs it in place, deterministically.
    Cancelled before its turn in the pool comes (its client left, say), it does not run: a burst
    of clients gone would have kept the pool busy hashing passwords for no one."""
    from twisted.internet.interfaces import IReactorThreads
    from twisted.internet.threads import deferToThreadPool
    if reactor is None:
        from twisted.internet import reactor
    if not IReactorThreads.providedBy(reactor):
        return maybeDeferred(function, *args)
    result: Deferred[T] = Deferred()  # (no canceller: cancelled, it drops the pool's answer)

    def unless_cancelled() -> T:
        if result.called:  # cancelled while it waited for its turn
            raise CancelledError("no longer waited for")
        return function(*args)
    deferToThreadPool(reactor, reactor.getThreadPool(), unless_cancelled).chainDeferred(result)
    return result


class FileEntry(NamedTuple):
    """What a client the file let in was checked against (its ``Identity.entry``), kept too when
    an auth hook's identity, of another username perhaps, replaces the one the file gave."""

    username: str
    hash: PasswordHash


class PasswordFileAuthenticator:
    """Mosquitto's ``password_file``: decides for the users it lists, passes the others on."""

    name = "password_file"

    def __init__(self, path: str, reactor: Any = None) -> None:
        """Reads the file; raises ConfigError (key ``password_file``) if it cannot be used."""
        self.path = path
        self._reactor = reactor
        self._file, self._kinds = self._load()
        self._closes = 0

    def _load(self) -> tuple[PasswordFile, dict[tuple[str, int], PasswordHash]]:
        """The file, and a hash that matches nothing of each kind (algorithm, iterations) in it:
        every check hashes once with each kind, the user's own entry for its kind, so that it
        costs the same whoever is named, listed or not (the time would tell otherwise, in a file
        of several kinds: iterations raised for some users, $6$ entries beside $7$ ones)."""
        try:
            file = PasswordFile.load(self.path)
        except PasswordFileError as e:
            raise ConfigError(str(e), "password_file") from None
        for repeated in file.repeated:
            log.warn("{repeated}", repeated=repeated)
        return file, {(h.algorithm, h.iterations): PasswordHash(h.algorithm, h.salt, bytes(len(h.digest)), h.iterations)
                      for h in file.users.values()}

    def authenticate(self, credentials: Credentials) -> Deferred[Identity | Refusal | None]:
        if credentials.username is None:
            return succeed(None)
        stored = self._file.users.get(credentials.username)
        if stored is None:
            return succeed(None)
        identity = Identity(client_id=credentials.client_id, username=credentials.username,
                            entry=FileEntry(credentials.username, stored))
        password = credentials.password or None  # (a zero-length one is none, as Mosquitto reads it)

        def judged(correct: bool) -> Identity | Refusal:
            if password is None:
                return Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "no password given")
            return identity if correct else Refusal(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "wrong password")

        # (No password: refused all the same, after the same work, as the time would tell.)
        return self._hash(stored if password is not None else None, password or b"").addCallback(judged)

    def equalize(self, credentials: Credentials) -> Deferred[None]:
        """Hash the password as a listed user's would be, and throw the answer away."""
        return self._hash(None, credentials.password or b"").addCallback(lambda _: None)

    def _hash(self, entry: PasswordHash | None, password: bytes) -> Deferred[bool]:
        """Whether ``password`` is ``entry``'s (None: no one's), hashed once with each kind of
        hash in the file, in the thread pool, unless the broker stops (``close``) before its turn
        comes: a burst of CONNECTs, hashed one after another, held the stop for as long as
        hashing them all took (Twisted's pool runs what is queued before it ends), for clients
        already gone. Fails with CancelledError then."""
        asked_at = self._closes
        checks = dict(self._kinds)
        if entry is not None:
            checks[(entry.algorithm, entry.iterations)] = entry

        def unless_closed() -> bool:
            if self._closes != asked_at:
                raise CancelledError("the broker stopped")
            answers = [check.verify(password) for check in checks.values()]  # (every one: no early end)
            return entry is not None and any(answers)
        return in_thread(self._reactor, unless_closed)

    def revoked(self, identity: Identity) -> str | None:
        """Why a client let in by this file is no longer: its entry changed (a new password, or
        the same one hashed again) or is gone. Entries are compared, nothing is hashed."""
        checked = identity.entry
        if not isinstance(checked, FileEntry):
            return None  # not let in by this file
        entry = self._file.users.get(checked.username)
        if entry is None:
            return f"user {checked.username!r} is no longer in {self.path}"
        if entry != checked.hash:
            return f"the password of {checked.username!r} changed in {self.path}"
        return None

    def prepare_reload(self) -> Callable[[], None]:
        new = self._load()

        def commit() -> None:
            self._file, self._kinds = new
        return commit

    def close(self) -> Deferred[None]:
        self._closes += 1  # (counted, not a flag: started again, the broker checks passwords again)
        return succeed(None)


def authenticators_from_config(config: BrokerConfig, reactor: Any = None,
                               clock: IReactorTime | None = None) -> list[Authenticator]:
    """The chain for these settings, in order: password file, JWT, HTTP. Raises ConfigError.
    ``clock`` (default: the reactor) is the broker's: a token's times are checked against it,
    and HTTP requests time out and answers age on it."""
    chain: list[Authenticator] = []
    if config.password_file:
        chain.append(PasswordFileAuthenticator(config.password_file, reactor))
    if config.jwt_secret_file or config.jwt_public_key_file or config.jwt_jwks_file:
        from .tokens import JwtAuthenticator
        chain.append(JwtAuthenticator.from_config(config, reactor, clock))
    elif config.jwt_algorithms or config.jwt_issuer or config.jwt_audience:
        raise ConfigError("JWT settings are given but no key: set jwt_secret_file, "
                          "jwt_public_key_file or jwt_jwks_file", "jwt_secret_file")
    if config.http_auth_url:
        from .http_auth import HttpAuthenticator
        chain.append(HttpAuthenticator.from_config(config, reactor, clock))
    return chain


__all__ = ["PasswordFileAuthenticator", "authenticators_from_config", "in_thread"]

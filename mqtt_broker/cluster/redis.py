"""The connections of a node to Redis, through txredisapi: one for commands and scripts, one for
the blocking read of the node's inbox, one subscribed to the control channel.

``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS) names one server;
``redis+sentinel://[[user]:password@]host[:port],host2[:port]/service[/db]`` asks the Sentinels
for the master of ``service`` before every connection, so a failover is followed. Each
connection reconnects by itself with backoff; ``on_up``/``on_down`` tell the cluster when the
command connection comes and goes.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import txredisapi
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .address import RedisAddress

log = Logger()


class Script:
    """A Lua script, run with EVALSHA (and loaded when Redis does not know it: after a restart
    its script cache is empty)."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Watched:
    """A factory mixin: tells its owner when a connection becomes usable and when it is lost."""

    on_up: Callable[[Any], None] | None = None
    on_down: Callable[[Any], None] | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)  # type: ignore[misc]
        if self.on_up is not None:
            protocol.whenConnected().addCallback(self.on_up)
        if self.on_down is not None:
            protocol.whenDisconnected().addCallback(self.on_down)
        return protocol


RECONNECT_MAX_DELAY = 2.0
"""Seconds between tries to reconnect to Redis, at most (txredisapi's default, 10, would leave a
node cut off for that long after a short outage)."""


READ_BLOCK = 2.0
"""Seconds a blocking read (of the inbox) waits for Redis to have something."""


SENTINEL_DISCOVERY_TIMEOUT = 1.0
"""Seconds one round of asking the Sentinels for the master may take before the connection
attempt fails and is tried again (with the back-off above)."""


class _KeepTrying:
    """A factory mixin: txredisapi gives a connection up for good when its AUTH or SELECT is
    answered with an error ("max number of clients reached", a restarted Redis still loading,
    the connection lost meanwhile), where the node is to go on trying (with the back-off) for as
    long as it runs; only ``disconnect`` stops that."""

    def stopTrying(self) -> Deferred[None]:
        return succeed(None)


class _Factory(_KeepTrying, _Watched, txredisapi.RedisFactory):
    initialDelay = 0.1
    maxDelay = RECONNECT_MAX_DELAY


class _SentinelChecked(txredisapi.SentinelRedisProtocol):
    """A connection to the master a Sentinel named, used only once the server says it is the
    master (a failover may have demoted it since). txredisapi's own check compares the role with
    a str, which fails on a connection that answers bytes (``charset=None``, as ours do)."""

    def connectionMade(self) -> Any:
        def check_role(role: list[Any]) -> Any:
            name = role[0].decode() if isinstance(role[0], bytes) else role[0]
            if self.factory.is_master and name != "master":
                self.transport.loseConnection()
                return None
            return txredisapi.RedisProtocol.connectionMade(self)
        if self.password is not None:
            self.auth(self.password, self.username)
        return self.role().addCallback(check_role)


class _SentinelFactory(_KeepTrying, _Watched, txredisapi.SentinelConnectionFactory):
    maxDelay = RECONNECT_MAX_DELAY
    protocol = _SentinelChecked


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.received(channel, message)


class _SentinelSubscriber(_SentinelChecked, _Subscriber):
    pass


def _execute(factory: Any, *args: Any, apply_timeout: bool) -> Deferred[Any]:
    """A command on the factory's connection while it is up, else through txredisapi's handler,
    which waits for one (calls keep their order: the handler's are sent as the connection joins
    the pool, before it can be used here). The handler finds the connection through an
    inlineCallbacks generator and a queue. Twisted's TCP transport keeps what is written for the
    reactor's next turn, when the socket says it is writable: the command is sent at once
    instead, saving the reactor a turn. A PUBLISH and its answer: 42 µs of CPU through the
    handler, 34 without, 27 sent at once (medians of alternated rounds on a busy machine; idle,
    each wake-up costs several times more, and the same order shows through wider noise)."""
    pool = factory.pool  # (one connection at most: poolsize=1)
    if not pool or not pool[0].connected:
        return factory.handler.execute_command(*args, apply_timeout=apply_timeout)  # type: ignore[no-any-return]
    connection = pool[0]
    result: Deferred[Any] = connection.execute_command(*args, apply_timeout=apply_timeout)
    transport = connection.transport
    if isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting:
        transport.doWrite()  # (a failure leaves it registered: the reactor's own doWrite finds it)
    return result


def _demoted(failure: Any, factory: Any) -> Any:
    """A master the Sentinels named became a replica (a failover that left its clients
    connected): every write is refused READONLY. The connection goes, and the next one is to the
    master the Sentinels name now (its role checked)."""
    if "READONLY" in str(failure.value):
        for connection in factory.pool:
            connection.transport.loseConnection()
    return failure


class Redis:
    """The connections of one node to one Redis."""

    def __init__(self, address: RedisAddress, on_up: Callable[[], None] | None = None,
                 on_down: Callable[[], None] | None = None, connect_timeout: float = 5.0,
                 reply_timeout: float = 30.0, tls_ca_file: str = "") -> None:
        self.address = address
        self._tls_ca_file = tls_ca_file
        self._on_up, self._on_down = on_up, on_down
        self._connect_timeout, self._reply_timeout = connect_timeout, reply_timeout
        self._sentinel = txredisapi.Sentinel(
            list(address.hosts), connectTimeout=connect_timeout, password=address.password,
            username=address.username) if address.service else None
        if self._sentinel is not None:
            # txredisapi waits 10 s for a Sentinel to name a master that is up, however soon
            # after a failover they all name one: a connection tried while the old master is
            # down would leave the node cut off for that long after the new one is named.
            self._sentinel.discovery_timeout = SENTINEL_DISCOVERY_TIMEOUT
            for sentinel in self._sentinel.sentinels:  # (txredisapi's own connections: up to 10 s apart)
                sentinel._factory.initialDelay, sentinel._factory.maxDelay = _Factory.initialDelay, RECONNECT_MAX_DELAY
        self.up = False
        self._up_waiters: list[Deferred[None]] = []
        self.commands = self._connect(_Factory, _SentinelFactory, self._command_up, self._command_down)
        # (Its reads wait up to READ_BLOCK for something to read, then for Redis to answer: a
        # connection whose other end went without a word is found by that timer, and made again.)
        self.reader = self._connect(_Factory, _SentinelFactory, None, None, reply_timeout=READ_BLOCK + reply_timeout)
        self._handlers: dict[bytes, Callable[[bytes], None]] = {}
        self.on_subscribed: Callable[[], None] | None = None
        """Called each time Redis confirms the channels are listened to (after a reconnection:
        what was sent on them meanwhile is lost)."""
        self._subscriber: Any = None
        self._scripts_known: set[str] = set()

    def _connect(self, plain: type, sentinel: type, up: Any, down: Any, reply_timeout: float | None = -1.0,
                 protocol: type | None = None) -> Any:
        timeout = self._reply_timeout if reply_timeout == -1.0 else reply_timeout
        a = self.address
        # No SELECT for database 0: txredisapi gives a connection up for good when SELECT fails,
        # as it does while a restarted Redis is still loading its files.
        kwargs = dict(dbid=a.db or None, poolsize=1, isLazy=True, charset=None, password=a.password, replyTimeout=timeout,
                      convertNumbers=False, username=a.username)
        if self._sentinel is not None:
            factory = sentinel(sentinel_manager=self._sentinel, service_name=a.service, is_master=True, uuid=None,
                               **kwargs)
            endpoint: Any = txredisapi._SentinelEndpoint(factory)
        else:
            host, port = a.hosts[0]
            factory = plain(f"{host}:{port}", **kwargs)
            endpoint = txredisapi._makeEndpoint(host, port, self._connect_timeout, self._tls(host) if a.tls else None)
        if protocol is not None:
            factory.protocol = protocol
        factory.on_up, factory.on_down = up, down
        factory.reconnect = True
        # (txredisapi fails it, which nothing waits on, when a connection's AUTH or SELECT is
        # answered with an error: the connection is tried again, see _KeepTrying.)
        factory.deferred.addErrback(lambda _: None)
        factory.startConnecting(endpoint)
        return factory

    def _tls(self, host: str) -> Any:
        """TLS to Redis, checking its certificate against every CA of ``tls_ca_file`` (else the
        platform's trusted CAs) and its name against ``host``."""
        from twisted.internet import ssl

        from ..auth.tls import certificates
        from ..config import ConfigError
        trust = None
        if self._tls_ca_file:
            try:
                authorities = certificates(self._tls_ca_file, "cluster_tls_ca_file")
            except OSError as e:
                raise ConfigError(f"{self._tls_ca_file}: cannot read: {e.strerror}", "cluster_tls_ca_file") from None
            except ValueError:
                raise ConfigError(f"{self._tls_ca_file}: holds no PEM certificate", "cluster_tls_ca_file") from None
            trust = ssl.trustRootFromCertificates([ssl.Certificate(c) for c in authorities])
        return ssl.optionsForClientTLS(host, trustRoot=trust)

    def _command_up(self, protocol: Any) -> None:
        self._scripts_known.clear()
        # Up once Redis has answered on it: one that takes connections and answers nothing (a
        # hung host) is one outage, not one each time a reply timer drops the connection.
        protocol.ping().addCallbacks(self._answered, lambda _: None)

    def _answered(self, _: Any) -> None:
        if not self.up:
            self.up = True
            if self._on_up is not None:
                self._on_up()
            waiters, self._up_waiters = self._up_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _command_down(self, _: Any) -> None:
        if self.up:
            self.up = False
            if self._on_down is not None:
                self._on_down()

    # --- commands ------------------------------------------------------------------------

    def when_up(self) -> Deferred[None]:
        """Fires once the command connection is up (at once if it is): a command sent then
        reaches Redis unless the connection is lost under it, where one given to ``call`` while
        Redis is away waits in txredisapi's queue, out of reach, to be sent whenever it is back.
        Cancelled before, it waits no more."""
        if self.up:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._up_waiters.remove)
        self._up_waiters.append(waiter)
        return waiter

    def call(self, *args: Any, apply_timeout: bool = True) -> Deferred[Any]:
        """Run a command on the command connection (waiting for one while Redis is away).
        ``apply_timeout=False``: no reply timer of its own, for a command sent often whose answer
        nobody waits for (a hung connection is found by the timers of the others)."""
        result = _execute(self.commands, *args, apply_timeout=apply_timeout)
        return result if self._sentinel is None else result.addErrback(_demoted, self.commands)

    def run(self, script: Script, *args: Any) -> Deferred[Any]:
        """Run a script (no KEYS: the scripts name their keys, which a single Redis allows).

        Commands go in the order they are given, which Redis keeps: a script it may not know
        yet (after a reconnection: Redis may have restarted and lost them) is loaded by a SCRIPT
        LOAD sent just before, not after an answer, which would let later commands overtake it.
        A NOSCRIPT answer (Redis restarted under a connection that looked alive, its scripts
        flushed, a failover to a replica that never loaded them) is answered by loading the
        script and running it again, once: what was sent meanwhile goes before it, which no
        caller minds (the store has one batch on its way at a time, a claim's writes wait for
        its answer)."""
        return self._run(script, args, True)

    def _run(self, script: Script, args: tuple[Any, ...], again: bool) -> Deferred[Any]:
        if script.sha not in self._scripts_known or not self.up:  # (while away: sent once back)
            self._scripts_known.add(script.sha)
            self.call("SCRIPT", "LOAD", script.source).addErrback(lambda _: self._scripts_known.discard(script.sha))

        def unknown(failure: Any) -> Any:
            if "NOSCRIPT" not in str(failure.value):
                return failure
            self._scripts_known.discard(script.sha)
            return self._run(script, args, False) if again else failure
        return self.call("EVALSHA", script.sha, 0, *args).addErrback(unknown)

    def read(self, *args: Any) -> Deferred[Any]:
        """A blocking command (XREADGROUP ... BLOCK, up to READ_BLOCK), on a connection of its own."""
        result = _execute(self.reader, *args, apply_timeout=True)
        return result if self._sentinel is None else result.addErrback(_demoted, self.reader)

    # --- pub/sub -------------------------------------------------------------------------

    def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Call ``handler(message)`` for every message on ``channel``, from now on and across
        reconnections (messages sent while the connection is down are lost: pub/sub keeps none)."""
        self._handlers[channel.encode()] = handler
        if self._subscriber is None:
            # (SUBSCRIBE has no reply timer; the pings sent by ``ping_subscribed`` have one.)
            self._subscriber = self._connect(_Factory, _SentinelFactory, self._subscribe_all, None,
                                             protocol=_SentinelSubscriber if self._sentinel else _Subscriber)
            self._subscriber.received = self._received
        else:
            for protocol in self._subscriber.pool:
                protocol.subscribe([channel]).addErrback(_subscribe_failed, channel)

    def ping_subscribed(self) -> None:
        """PING the subscribed connection, which only listens: gone without a word (a NAT that
        forgot it, a host power-cycled), its reply timer finds it, and it is made again and
        subscribes anew (``on_subscribed``)."""
        for protocol in self._subscriber.pool if self._subscriber is not None else ():
            if protocol.connected:
                protocol.execute_command("PING").addErrback(lambda _: None)  # (the timer closed it)

    def _subscribe_all(self, protocol: Any) -> None:
        subscribed = protocol.subscribe([channel.decode() for channel in self._handlers])
        subscribed.addCallbacks(lambda _: self.on_subscribed and self.on_subscribed(), lambda _: None)

    def _received(self, channel: bytes, message: bytes) -> None:
        handler = self._handlers.get(channel)
        if handler is not None:
            try:
                handler(message)
            except Exception:
                log.failure("handling a message on the Redis channel {channel}", channel=channel)

    def close(self) -> Deferred[Any]:
        from twisted.internet.defer import DeferredList
        factories = [self.commands, self.reader] + ([self._subscriber] if self._subscriber is not None else [])
        closing = [factory.disconnect() for factory in factories]
        if self._sentinel is not None:
            closing.append(self._sentinel.disconnect())
        return DeferredList(closing, consumeErrors=True)


def _subscribe_failed(failure: Any, channel: str) -> None:
    """A connection lost meanwhile subscribes anew to every channel when it is back; anything
    else is worth a line."""
    if not failure.check(txredisapi.ConnectionError):
        log.failure("subscribing to {channel}", failure, channel=channel)


__all__ = ["Redis", "Script"]

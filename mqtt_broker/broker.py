"""The BrokerService: the service and its listeners, sessions, subscriptions, retained messages
and wills, and the MQTTFactory that makes its connections. Routing and delivery, with the QoS
retries, are done by its part ``broker.delivery`` (:mod:`mqtt_broker.delivery`).

It never touches a transport: it talks to connected clients through the few methods of
:class:`~mqtt_broker.protocol.MQTTProtocol` (``send_publish``, ``send_pubrel``, ``drop``, and
the ``paused``/``send_quota``/``identity`` attributes).
"""

from __future__ import annotations

import dataclasses
import resource
from itertools import chain, islice
from operator import methodcaller
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from twisted.application.service import MultiService
from twisted.internet import tcp as twisted_tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import tcp
from .auth import Security
from .auth.tls import ServerTLS, TLSServerEndpoint, parse_description, server_endpoint
from .config import BrokerConfig, ConfigError
from .connect import NEVER, AcceptingConnack, granted_expiry
from .connecting import tally
from .delivery import Delivery
from .history import MessageLog
from .deadlines import Deadlines, cancel
from .lifecycle import State
from .hooks import Hooks
from .linger import AllClosed
from .logged import shortened
from .message import Client, Message, unsendable
from .protocol import MQTTProtocol, describe
from .retained import RetainedMessages
from .session import Queued, Session
from .stats import Stats, once_per_thousand
from .store import Snapshot, Store, StoredWill
from .topics import Subscription, SubscriptionTree
from .wills import Wills
from .wire.codes import ReasonCode
from .wire.packets import MQTT_5, NO_PROPERTIES, Properties

log = Logger()


class MQTTFactory(Factory):
    """Builds an MQTTProtocol per connection, up to ``max_connections``; past it, None (the
    listener closes the socket), or with ``wrapped`` a protocol that aborts it: a factory that
    wraps this one (TLS) takes None for a protocol and fails on it, leaving the socket open."""

    def __init__(self, broker: Any, wrapped: bool = False) -> None:
        self.broker = broker
        self.wrapped = wrapped

    def buildProtocol(self, addr: IAddress) -> Any:  # type: ignore[override]
        protocol = self.build(addr)
        return RefusedConnection() if protocol is None and self.wrapped else protocol

    def build(self, addr: IAddress) -> MQTTProtocol | None:
        # (Stopped: a connection of a listener that outlives the stop, the admin site's.)
        if self.broker.stopped or self.refuse_if_full(addr):
            return None
        protocol = MQTTProtocol(self.broker, self.broker.clock)
        if not self.wrapped:  # (a wrapper may know better: haproxy: reads the client's from its header)
            protocol.peer = describe(addr)  # the transport would make another address object
        return protocol

    def refuse_if_full(self, addr: IAddress) -> bool:
        """Whether max_connections is reached (by ``open_connections``): then the refusal of a
        connection from ``addr`` is counted, and logged ``once_per_thousand`` (a client may open
        thousands a second, and needs send no CONNECT)."""
        broker = self.broker
        limit = broker.config.max_connections
        if limit < 0 or broker.open_connections() < limit:
            return False
        stats = broker.stats
        stats.connections_refused += 1
        tally(stats.refused_by_reason, "max_connections")
        refused = stats.refused_by_reason["max_connections"]
        if once_per_thousand(refused):
            log.warn("refusing a connection from {addr}: max_connections ({limit}) reached ({refused} connections "
                     "refused for it so far; logged once per thousand)", addr=describe(addr), limit=limit, refused=refused)
        return True


class RefusedConnection(Protocol):
    """A connection past max_connections under a wrapping factory: aborted as it is made."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class BrokerService(MultiService):
    """An MQTT broker as a Twisted service.

    ``BrokerService(endpoints=["tcp:1883"])`` listens when started (``startService()`` or as a
    child of an application). Settings come from ``config`` (a :class:`BrokerConfig`, or the
    path of a TOML file) and then from keyword arguments with the same names.
    """

    def __init__(self, endpoints: Iterable[str] | None = None,
                 config: BrokerConfig | str | Path | None = None, *,
                 reactor: Any = None, clock: IReactorTime | None = None, store: Store | None = None,
                 **settings: Any) -> None:
        super().__init__()
        if config is None:
            config = BrokerConfig()
        elif not isinstance(config, BrokerConfig):
            config = BrokerConfig.from_file(config)
        if endpoints is not None:  # (a str is the setting's to refuse, not one endpoint a character)
            settings["endpoints"] = endpoints if isinstance(endpoints, str) else list(endpoints)
        self.config = config.replace(**settings) if settings else config
        self.connack = AcceptingConnack(self.config)
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.hooks = Hooks(self.clock, self.config.hook_timeout)
        """The hooks: register handlers on them (``broker.hooks.on_publish(handler)``)."""
        self._retained_sweep: Any = None
        self._alive_call: Any = None
        self._note_alive: Callable[[float], None] | None = None
        """The store's ``alive``, if it can keep the notes that the broker is alive."""
        self._noted_at = 0.0
        """When the last of those notes was written."""
        self._alive_every = ALIVE_EVERY
        """Seconds between two notes that the broker is alive: ALIVE_EVERY, or less once a
        session of a short expiry has been connected (``_alive_within``)."""
        self.expiries = Deadlines(self.clock, self._expire, SESSIONS_ENDED_PER_TURN)
        """Every disconnected session's expiry, on one timer (``Session.expiry_deadline``)."""
        self.sessions: dict[str, Session] = {}
        self.subscriptions = SubscriptionTree()
        config = self.config
        self.history = MessageLog(config.history_filters, config.history_max_messages, config.history_max_age,
                                  config.history_max_bytes) if config.history_filters else None
        """The message log that subscribers can ask to replay; None when no filter is logged."""
        self.retained = RetainedMessages(kept=config.retain_available, log=self.history)
        self.stats = Stats()
        self.batching = 0
        """Non-zero while a read is being handled: connections gather their writes meanwhile."""
        self.unflushed: list[Any] = []
        """Connections with gathered writes, flushed when the read is done."""
        self.connections: set[Any] = set()
        """Every open client connection (MQTTProtocol), connected or still in CONNECT, or closed
        by the broker and lingering (it leaves in ``connection_lost``)."""
        self.ending = 0
        """How many of ``connections`` have lost their socket while a hook decided and end once
        it has (see ``MQTTProtocol.connectionLost``): not counted against max_connections."""
        self.attached = 0
        """How many of ``connections`` have a session: the clients connected now."""
        self.own_links = 0
        """How many of ``connections`` are this broker's bridges' links to it: not clients, not
        counted against max_connections."""
        self.websockets_without_mqtt = 0
        """How many WebSocket sockets are open with no MQTT connection in ``connections`` for them:
        not upgraded yet, refused with 503, or closing after their MQTT connection ended (the
        client's close frame). Counted against max_connections until they are gone, as a TCP
        socket awaiting CONNECT or lingering is."""
        self._all_closed: AllClosed | None = None
        """While stopping: what waits for the last connection to go."""
        self.keepalives = Deadlines(self.clock, methodcaller("keepalive_due"))
        """Every connection's keepalive deadline, on one timer."""
        self.ports: list[IListeningPort] = []
        self._starting: list[Deferred[Any]] = []
        """The listeners of endpoints that listen later (not the built-in ones)."""
        self._listening = False
        """Whether the endpoints were listened on (by privilegedStartService, or the start)."""
        self._tls: list[tuple[str, ServerTLS]] = []
        """The TLS listeners (endpoint string, context maker), whose files reload() reads again."""
        self.cluster: Any = None
        """This node's link to the other nodes of a cluster (``cluster`` setting), whose store is
        then the node's store; None for a broker of its own (nothing of the cluster is imported)."""
        if self.config.cluster:
            from .cluster.node import Cluster
            self.cluster = Cluster(self, reactor)
            store = self.cluster.store
            self.subscriptions.watch = self.cluster.filter_changed
            self.subscriptions.watch_shared = self.cluster.member_changed
        if store is None and self.config.persistence == "sqlite":
            from .store.sqlite import SQLiteStore
            store = SQLiteStore(Path(self.config.data_dir) / "mqttbroker.db", reactor,
                                self.config.persistence_synchronous)
        self.store = store
        """Where sessions and messages are kept across restarts; None keeps them in memory only."""
        self.bounded_store: Any = store if getattr(store, "max_unwritten_bytes", 0) else None
        """The store, if it bounds what waits for its disk (see ``Store``): a connection whose
        packets take that past its bound is read no more until the store has caught up."""
        if store is not None:
            store.gather = self.gathered
        security = Security.from_config(config, reactor, self.clock)
        self.security: Security | None = security if security.enabled else None
        """Authentication and ACLs; None when nothing is configured (then nothing is checked)."""
        self.wills = Wills(self)
        self.delivery = Delivery(self)
        """Routing and delivery (the hot path), on the state made above."""
        self._connects: dict[int, tuple[float, int]] = {}
        """Per client id (its hash: an id may be 65,535 bytes long, and the table keeps up to
        100,000): the start of its current minute and the CONNECTs in it."""
        self.factory = MQTTFactory(self)
        self.config_check: Callable[[], Deferred[list[str]] | list[str]] | None = None
        """What ``reload`` checks besides: the files the settings were read from, read again
        (twistd's ``--config``); returns the problems (or a Deferred of them), a setting that only
        a restart applies too."""
        self.on_given_up: Callable[[], object] | None = None
        """Called in place of the service's own stop when the broker gives up (``give_up``):
        twistd's (set by tap) stops the reactor, which stops the service and ends the process."""
        self.bridges: Any = None
        """The bridges of the ``bridge`` setting (:class:`mqtt_broker.bridge.Bridges`); None
        without any (nothing of the bridges is imported)."""
        if config.bridge:
            from .bridge import Bridges
            self.bridges = Bridges(self, config.bridge, reactor, self.clock)
        from .admin import Operations
        self.operations = Operations(self)
        """$SYS topics, and the admin site of http_endpoints (see mqtt_broker.admin)."""
        self.operations.setServiceParent(self)

    # --- service ------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Listen on every endpoint: twistd calls this before it sheds root's privileges
        (``--uid``), so that a broker started as root may listen on ports below 1024. Nothing,
        if it is running (see :meth:`startService`)."""
        if self.running:
            return
        super().privilegedStartService()
        try:
            self._listen()
        except BaseException:
            self._unlisten(at_once=True)
            raise

    def startService(self) -> None:
        """Listen on every endpoint (unless :meth:`privilegedStartService` did), then read the
        store: clients connecting meanwhile wait for their CONNACK rather than find no port,
        under ``python -m twisted`` (which calls only this) as under twistd. Any failure to
        listen raises here (after closing what was opened), so twistd stops at start-up instead
        of running without a port. Nothing, if it is running: MultiService.addService starts a
        service added to a running parent, and a broker started already would listen again and
        leave the timers of its first start running after its stop."""
        if self.running:
            return
        _raise_open_files_limit()
        self.delivery.stopped = False
        try:
            if not self._listening:
                self._listen()
            if self.store is not None:
                # (As much of each session's queue as it holds in memory running: no more.)
                self._restore(self.store.load(self.config.max_queued_messages, self.config.max_queued_bytes))
            else:
                self._rearm()
        except BaseException:
            self._unlisten(at_once=True)
            self.delivery.stopped = True  # (not running: nothing is to change it)
            raise
        super().startService()
        self._retained_sweep = self.clock.callLater(RETAINED_SWEEP, self._sweep)
        self._note_alive = getattr(self.store, "alive", None)
        if self._note_alive is not None:
            self._alive()
        if self.cluster is not None:
            self.cluster.start().addErrback(lambda failure: log.failure("joining the cluster", failure))

    def _listen(self) -> None:
        """Listen on every endpoint; raises at the first that cannot be listened on."""
        self._listening = True  # (whatever comes of it: a failure stops the service)
        wrapped = MQTTFactory(self, wrapped=True)  # (for listeners that wrap it: TLS)
        listeners: list[tuple[str, Any, str]] = [
            (description, self.factory if description.split(":", 1)[0] in ("tcp", "tcp6", "unix") else wrapped,
             "MQTT broker listening on {endpoint}")
            for description in self.config.endpoints]
        if self.config.websocket_endpoints:
            from .websocket import WebSocketFactory  # autobahn is imported only when used
            # (One each: a factory counts the handshakes it refused, as logged for its listener.)
            listeners += [(description, WebSocketFactory(self), "MQTT over WebSocket listening on {endpoint}")
                          for description in self.config.websocket_endpoints]
        if self.config.http_endpoints:
            if not self.config.http_api_keys:
                log.warn("no http_api_keys: the admin API and the dashboard refuse every request (401) but health, "
                         "readiness and the OpenAPI document; make a key with python -m mqtt_broker.admin.keys NAME")
            site = self.operations.site()
            listeners += [(description, site, "admin API, metrics and dashboard on {endpoint}")
                          for description in self.config.http_endpoints]
        for description, factory, listening in listeners:
            key = next((name for name in ("websocket_endpoints", "http_endpoints")
                        if description in getattr(self.config, name)), "endpoints")
            try:
                endpoint = server_endpoint(self.reactor, with_backlog(description, self.config.listen_backlog))
            except OSError as e:  # a key or certificate file of ssl:/mqtts: that cannot be read
                reason = f"{e.filename}: cannot read: {e.strerror}" if e.filename else str(e)
                raise ConfigError(f"{description!r}: {reason}", key) from None
            except ValueError as e:  # one that is no PEM, a key that does not fit its certificate
                raise ConfigError(f"{description!r}: {e}", key) from None
            if isinstance(endpoint, TLSServerEndpoint):
                self._tls.append((description, endpoint.tls))
                # Told, not refused: clients that do not check the dates would be cut off too, and
                # the renewed files may be on their way (a reload takes them).
                self._warn_of_dates(description, endpoint.tls)
            listened = tcp.listen(endpoint, factory, self.config.set_tcp_nodelay)
            if not listened.called:  # a plugin's endpoint (onion:, say) listens later
                self._starting.append(listened)
                listened.addCallbacks(self._listened_late, self._not_listened,
                                      callbackArgs=(listened, description, listening), errbackArgs=(listened, description))
                continue
            outcome: list[Any] = []
            listened.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                if outcome[0].check(OverflowError, OSError):  # a port past 65535, no UNIX socket directory
                    raise ConfigError(f"{description!r}: {outcome[0].getErrorMessage()}", key)
                outcome[0].raiseException()
            else:
                self.ports.append(outcome[0])
                log.info(listening, endpoint=description)

    def _warn_of_dates(self, description: str, tls: ServerTLS) -> None:
        problem = tls.dates_problem(self.clock.seconds())
        if problem is not None:
            log.warn("TLS listener {endpoint}: {problem}", endpoint=description, problem=problem)

    def _listened_late(self, port: Any, listened: Deferred[Any], description: str, listening: str) -> None:
        if listened not in self._starting:  # stopped meanwhile
            port.stopListening()
            return
        self._starting.remove(listened)
        self.ports.append(port)
        log.info(listening, endpoint=description)

    def _not_listened(self, failure: Failure, listened: Deferred[Any], description: str) -> None:
        if listened in self._starting:
            self._starting.remove(listened)
            log.failure("cannot listen on {endpoint}: running without it", failure, endpoint=description)

    def _unlisten(self, at_once: bool = False) -> list[Any]:
        """Close every listener (and those still starting once they listen). ``at_once`` (a start
        that failed): a listener of the reactor's own closes now, not at the reactor's next turn,
        which a twistd that fails to start never runs; a UNIX socket's file and its lock would
        stay on disk."""
        stopping = []
        for port in self.ports:
            if at_once and isinstance(port, twisted_tcp.Port):  # (a unix: listener's too)
                port.connectionLost(Failure(ConnectionDone()))  # (what stopListening has the next turn do)
            else:
                stopping.append(port.stopListening())
        self.ports, self._starting, self._tls, self._listening = [], [], [], False
        return stopping

    def stopService(self) -> Deferred[Any]:
        """Stop listening and close every connection (MQTT 5 clients are told 0x8B, Server
        shutting down) and publish the wills that are due: the connections', and without a
        store the delayed ones too. What the hooks are still deciding is cancelled, and the
        store writes what it holds and is closed. Returns a Deferred that fires once every
        connection is gone (or ``close_linger`` is over), the store is closed and the services
        added to this one have stopped; the service may be started again after that."""
        # (A MultiService's stop waits for its children's: an application's services among them.)
        stopping = [super().stopService(), *self._unlisten()]
        for connection in list(self.connections):
            connection.drop(ReasonCode.SERVER_SHUTTING_DOWN, "broker shutting down")
        # After the drops, whose delayed wills wait with the others (published now without a store).
        self.wills.stop()
        # After the drops: a connection's pending decision then finds it closed (no answer, no
        # refusal a client would take as the broker's), and the will hooks the drops and the
        # wills' stop called are cancelled too. (An answer after the stop would route with the
        # store closed.)
        self.hooks.cancel_pending()
        # Routing ends here, not before the drops: a disconnect hook may publish (a presence
        # topic), as the wills they publish are routed.
        self.delivery.stop()
        # The connections linger (close_linger) so that clients read the DISCONNECT 0x8B; the
        # reactor closes what is left once this fires, so waiting longer would only delay the stop.
        self._all_closed = AllClosed(self.connections, self.clock, self.config.close_linger)
        stopping.append(self._all_closed.done)
        self.keepalives.stop()
        cancel(self._retained_sweep)
        cancel(self._alive_call)
        self.expiries.stop()
        for session in self.sessions.values():
            cancel(session.retry_call)
            session.expiry_deadline = session.retry_call = None
        if self.store is not None:
            stopping.append(self.store.close())
        if self.cluster is not None:
            stopping.append(self.cluster.stop())
        if self.security is not None:
            stopping.append(self.security.close())
        return DeferredList([d for d in stopping if d is not None]).addCallback(lambda _: None)

    def give_up(self) -> None:
        """Stop serving for good: what this broker is to be is another process's (its cluster
        node id). ``on_given_up`` if set (under twistd, the process ends), else the service stops."""
        if self.on_given_up is not None:
            self.on_given_up()
        elif self.running:
            self.stopService().addErrback(lambda failure: log.failure("stopping", failure))

    def open_connections(self) -> int:
        """The client connections open now, as max_connections counts them: their sockets, those
        in CONNECT, lingering, or still upgrading or closing over WebSocket included, this broker's
        own bridge links not, nor those whose socket is gone while a hook decides (``ending``),
        up to max_connections of them: each keeps its session and what it read until the hook
        answers (``hook_timeout``, or never), so past as many again they count, or a client that
        connects, publishes and closes in a loop would have the broker hold any number."""
        ending = self.ending
        limit = self.config.max_connections
        if 0 <= limit < ending:
            ending = limit
        return len(self.connections) - ending - self.own_links + self.websockets_without_mqtt

    def connection_lost(self, connection: Any) -> None:
        """A connection's socket is gone (it was detached before)."""
        if connection in self.connections and connection._own:
            self.own_links -= 1
        self.connections.discard(connection)
        if self._all_closed is not None:
            self._all_closed.lost()

    def obey_rules(self) -> None:
        """An auth hook gave an identity rules of its own, on a broker with no security setting:
        they are checked from now on, as with one (what no rules say stays allowed)."""
        if self.security is None:
            log.info("an auth hook gave rules of its own: they are checked from now on")
            self.security = self.delivery.security = Security.from_config(self.config, self.reactor, self.clock)

    def _filter_readable(self, session: Session, identity: Any) -> list[Queued]:
        """Drop what is in flight that ``identity`` may not read; returns the QoS 1 messages of
        shared subscriptions among them, which another member may have [MQTT-4.8.2-5]. A QoS 2
        message sent already is released instead (a PUBREL, not the message, is sent again): the
        client may hold its packet id until then [MQTT-4.3.3-2]."""
        assert self.security is not None
        can_read = self.security.can_read
        unread: list[Queued] = []
        for packet_id, out in list(session.outgoing.items()):
            if not out.released and not can_read(identity, out.message.topic):
                if out.qos == 2:  # (held back by a Receive Maximum, it was sent on a connection before)
                    self.delivery.released(session, packet_id)
                    continue
                del session.outgoing[packet_id]
                self.delivery.forget(session, out)
                if out.share is not None and out.qos == 1:
                    unread.append(out)
        return unread

    def reload(self) -> Deferred[list[str]]:
        """Read the password file, ACL file, JWT keys and the TLS listeners' key and certificate
        files again (SIGHUP under twistd); the security files are read in the reactor's thread
        pool. A bad new file (a certificate that has expired or is not valid yet too) is logged
        and what was in force stays. Connected clients whose credentials no longer pass
        (password changed, user removed from ``password_file``) are disconnected; the others
        keep their connections, and their rights follow the new rules from their next operation
        on; ``config_check``, if set, says what else the files now give. Fires with what was not
        reloaded, and why: nothing when everything was."""
        problems: list[str] = []

        def security_refused(failure: Failure) -> None:
            failure.trap(ConfigError)  # (logged by Security; the old state is kept)
            problems.append(f"security settings: {failure.value}")

        def the_rest(_: object) -> Deferred[list[str]]:
            for description, tls in self._tls:
                try:
                    tls.reload(self.clock.seconds())
                except (OSError, ValueError) as e:
                    log.error("TLS files of {endpoint} not reloaded, the previous certificate stays in use: "
                              "{error}", endpoint=description, error=str(e))
                    problems.append(f"TLS files of {description}: {e}")
                else:
                    log.info("TLS files of {endpoint} reloaded", endpoint=description)
                    self._warn_of_dates(description, tls)
            found = self.config_check() if self.config_check is not None else []
            if isinstance(found, list):
                return succeed(problems + found)
            return found.addCallback(lambda more: problems + more)
        if self.security is None:
            return maybeDeferred(the_rest, None)
        reading: Deferred[None] = self.security.reload().addCallbacks(lambda _: self._drop_revoked(), security_refused)
        return reading.addCallback(the_rest)

    def _drop_revoked(self) -> None:
        """After a reload, disconnect every client (connected, or between its password check and
        CONNACK) whose credentials the new files no longer accept."""
        assert self.security is not None
        for connection in list(self.connections):
            identity = connection.identity
            why = self.security.revoked(identity) if identity is not None else None
            if why is None or connection.state is State.CLOSED:  # (closed: lingering)
                continue
            log.info("disconnecting client {client_id!r} after the reload: {why}",
                     client_id=shortened(identity.client_id), why=why)
            if connection.state is not State.CONNECTED:
                # Between its password check and CONNACK (a hook deciding, an AUTH exchange, a
                # claim in a cluster): refused as a reload during the check itself refuses it.
                connection.refuse(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "credentials no longer accepted")
                continue
            # 0x87 Not authorized: DISCONNECT has no 0x86 (bad user name or password is a CONNACK
            # code), and 0x87 is its code for a client the server no longer authorizes.
            # (Mosquitto also closes such clients on reload.)
            connection.will = None  # nor does it speak for the client any more
            connection.drop(ReasonCode.NOT_AUTHORIZED, "credentials no longer accepted")
        self.wills.drop_revoked(self.security.revoked)

    def connect_allowed(self, client_id: str) -> bool:
        """Whether max_connections_per_minute lets a CONNECT of this client id in; False once as
        many were accepted (``connect_accepted``) in its minute. Refused ones do not count:
        whoever knows a client id would keep its owner out."""
        limit = self.config.max_connections_per_minute
        recent = self._connects.get(hash(client_id)) if limit else None
        return recent is None or self.clock.seconds() - recent[0] >= 60 or recent[1] < limit

    def connect_accepted(self, client_id: str) -> None:
        """Count an accepted CONNECT against max_connections_per_minute."""
        if not self.config.max_connections_per_minute:
            return
        now = self.clock.seconds()
        key = hash(client_id)  # (two ids of one hash share a count: vanishingly rare, and only stricter)
        recent = self._connects.get(key)
        if recent is not None and now - recent[0] < 60:
            self._connects[key] = (recent[0], recent[1] + 1)
            return
        if len(self._connects) >= 100_000:  # forget the old windows now and then
            kept = {k: v for k, v in self._connects.items() if now - v[0] < 60}
            if len(kept) > 50_000:
                # A flood of new ids: the ids counted first go (half of them), or each CONNECT
                # would copy the table. An id dropped so gets a new minute early.
                kept = dict(islice(kept.items(), len(kept) - 50_000, None))
            self._connects = kept
        self._connects[key] = (now, 1)

    def gathered(self, function: Any, *args: Any) -> None:
        """Run ``function(*args)`` with the writes to each connection gathered and sent at once
        when it returns, as for a read (the acknowledgements a store's batch releases, the
        messages of another node of a cluster)."""
        self.batching += 1
        try:
            function(*args)
        finally:
            self.batching -= 1
            if not self.batching and self.unflushed:
                self.flush_writes()

    def flush_writes(self) -> None:
        """Hand each connection's gathered writes to its transport. A connection that queued
        past max_held_bytes and whose transport took everything moves its queue on, gathered again."""
        self.batching += 1
        try:
            while self.unflushed:
                unflushed, self.unflushed = self.unflushed, []
                for connection in unflushed:
                    connection.flush()
                    session = connection.session
                    if session is not None and (session.queue or session.spilled) and not connection.paused:
                        self.delivery.pump(session)
        finally:
            self.batching -= 1

    def _rearm(self) -> None:
        """Started again without a store (an embedding application stopped the service and
        starts it again): the sessions kept in memory have their timers again, a session's expiry
        counted from now. (Their delayed wills were published at the stop.)"""
        for session in self.sessions.values():
            if session.connection is None and session.expiry != NEVER and session.expiry_deadline is None:
                self._expire_in(session, session.expiry)

    def _restore(self, snapshot: Snapshot) -> None:
        """Take up what the store kept: sessions (their expiry measured from when their client
        went away, across the restart), retained messages, delayed wills."""
        store = self.store
        assert store is not None
        now = self.clock.seconds()
        # Started again (an embedding application stopped the service): what memory kept of the
        # sessions gives way to what the store kept, where a session that ended meanwhile is gone.
        for client_id in list(self.sessions):
            self.forget_session(client_id)
        ended = [session for session, disconnected_at in snapshot.sessions
                 if not self.take_session(session, disconnected_at, snapshot.alive_at)]
        left_at = {session.client_id: disconnected_at for session, disconnected_at in snapshot.sessions
                   if disconnected_at is not None}
        ended_ids = {session.client_id for session in ended}
        # Sessions that ended while the broker was down hand what they held of shared
        # subscriptions to another member, once every restored member is back in the tree.
        for session in ended:
            self._leave_unfinished(session)
        for message in snapshot.retained:
            if message.expired(now):
                store.delete_retained(message.topic)
            else:
                self.retained.store(message, logged=0)  # (whether it is newer than the log's: not known)
        for will in snapshot.wills:
            client = Client(client_id=will.client_id, username=will.username, peer="", protocol_version=MQTT_5,
                            clean_start=False, keep_alive=0)
            # A will waits no longer than its session, which may have ended meanwhile [MQTT-3.1.3-9],
            # nor than its delay, counted from when its client left (saved with it): after the
            # system clock stepped back, its due time is further than that.
            due = now if will.client_id in ended_ids else will.due - max(0.0, left_at.get(will.client_id, now) - now)
            if due < will.due and will.client_id not in ended_ids:  # (kept so for the next start)
                store.save_will(StoredWill(will.client_id, will.username, will.message, due))
            self.wills.schedule(client, will.message, due)
        if self.history is not None and getattr(store, "keeps_history", True):
            self.history.restore(snapshot.history)
            store.forget_history(self.history.oldest_seq)
            self.delivery.forget_dropped()
        log.info("restored {sessions} sessions, {retained} retained messages and {wills} delayed wills",
                 sessions=len(self.sessions), retained=len(self.retained), wills=len(self.wills))

    def take_session(self, session: Session, disconnected_at: float | None, alive_at: float | None = None) -> bool:
        """Take up a session whose client is not connected (restored from the store, or adopted
        from a dead node of a cluster): it expires from when its client went away (None: it was
        connected when its broker stopped, which was last known alive at ``alive_at``, or now)."""
        assert self.store is not None
        now = self.clock.seconds()
        if self.bridges is not None and self.bridges.holds(session.client_id):
            session.expiry = NEVER  # (a bridge's never expires: stored by a release that held it to a limit too)
        else:
            session.expiry = granted_expiry(session.expiry, self.config)  # (as the settings are now)
        if disconnected_at is None:  # connected when its broker stopped: it went away then
            disconnected_at = min(now, alive_at) if alive_at is not None else now
            self.store.save_session(session, disconnected_at)
        elif disconnected_at > now:
            # The system clock stepped back since: from then, it would outlive its expiry, and be
            # counted from each start again while the clock is behind, unless kept so.
            disconnected_at = now
            self.store.save_session(session, now)
        if session.expiry != NEVER:
            remaining = disconnected_at + session.expiry - now
            if remaining <= 0:
                self.store.delete_session(session.client_id)
                self._release(session.client_id)
                return False
            self._expire_in(session, remaining)
        max_bytes = self.config.max_queued_bytes
        queue = session.queue
        while max_bytes and len(queue) > 1 and session.queued_bytes > max_bytes:
            # The store's load reads max_queued_messages: the newest beyond the bytes stay stored.
            session.queued_bytes -= len(queue.pop().message.payload)
            session.spilled += 1
            session.loaded_seq = queue[-1].seq
        self.sessions[session.client_id] = session
        for subscription in session.subscriptions.values():
            self.subscriptions.add(subscription)
        return True

    def left_unattached(self, session: Session, ended: bool = False) -> None:
        """A session this broker took for a client that went before it could attach (in a
        cluster: while Redis handed it over): kept as if its client had just disconnected, or
        ended if it was to end with its connection or the client started clean (``ended``)."""
        if ended or not session.expiry:
            self._discard(session)
            self._release(session.client_id)
            return
        if session.expiry != NEVER and session.expiry_deadline is None:
            self._expire_in(session, session.expiry)
        if session.stored:
            assert self.store is not None
            self.store.save_session(session, self.clock.seconds())

    def let_go(self, client_id: str, ended: bool, will_left: bool = True) -> None:
        """Another node of the cluster took the session: close its connection here (0x8E). The
        connection's will (or a delayed will waiting here) is published if its delay is 0 or the
        new connection ended the session (``ended``) [MQTT-3.1.3-9]; otherwise the new connection
        came in time. The copy stays until ``forget_session``: what is routed to it meanwhile
        is passed on to the new owner by the store."""
        self.wills.end(client_id, publish=ended and will_left, in_store=False)
        session = self.sessions.get(client_id)
        if session is None:
            return
        self._unexpire(session)
        connection = session.connection
        if connection is not None:
            will, delay, client = connection.will, connection.will_delay, connection.client
            assert client is not None
            connection.will = None
            connection.session = session.connection = None  # detached here, not by the close
            self._members_connected(session, False)
            self.attached -= 1
            connack_sent = connection.connack_went()  # (before the drop, which forgets it)
            connection.drop(ReasonCode.SESSION_TAKEN_OVER, "session taken over by a connection to another node")
            if will is not None and will_left and (ended or not delay):
                self.wills.publish(client, will, connection.identity)
            if connack_sent:  # (see ``detach``)
                self._notify_disconnect(client, False)

    def moved_away(self, client_id: str) -> bool:
        """Whether the client's session here is the copy of one another node of the cluster
        has claimed (kept until the routes settle, see ``let_go``): not this broker's to show or
        change."""
        return self.cluster is not None and self.cluster.moved_away(client_id)

    def forget_session(self, client_id: str, session: Session | None = None, ended: bool = False) -> None:
        """Forget a copy of a session another node of the cluster holds, or the store (a service
        started again) (``session``: only if it is that copy), without a word to the store; ``ended``: the session ended with the other
        node's claim, and what it did not finish of shared subscriptions goes to other members."""
        if session is not None and self.sessions.get(client_id) is not session:
            return
        session = self.sessions.get(client_id)
        if session is None:
            return
        if session.connection is not None:
            self.let_go(client_id, False)  # (it finds the connection through the session)
        del self.sessions[client_id]
        self._unexpire(session)
        cancel(session.retry_call)
        for topic_filter in session.subscriptions:
            self.subscriptions.remove(client_id, topic_filter)
        session.stored = False
        if ended:
            self._leave_unfinished(session)
        else:
            session.clear()

    # --- embedding API ------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                properties: Properties = NO_PROPERTIES) -> Deferred[None]:
        """Publish a message as the broker itself; returns a Deferred that fires once it is routed
        and, with a store, once the store holds what it changed (a retained message, the queues
        of persistent sessions), or fails with StoreError while the store cannot write (logged
        by the store, which writes it once it can).

        Without retained messages (``retain_available`` off), ``retain`` is dropped. Correlation
        data may be a bytearray or a memoryview: the message keeps bytes of its own.

        Raises ValueError for an invalid topic, QoS or properties (MQTT 5's of a PUBLISH, by
        their names in :mod:`mqtt_broker.wire.properties`, without a topic alias or
        subscription identifier), arguments of other types than these, or a message larger than
        any PUBLISH can carry; and RuntimeError once the broker has been stopped, and, with
        SQLite persistence, before it is started (the database is opened then).
        """
        self.route_own(topic, payload, qos, retain, properties)
        return succeed(None) if self.store is None else self.store.flushed()

    @property
    def stopped(self) -> bool:
        """Whether the service was stopped (and not started again): its store is closed."""
        return self.delivery.stopped

    def route_own(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                  properties: Properties = NO_PROPERTIES) -> None:
        """:meth:`publish`, without waiting for the store: for what goes on once the message is
        routed ($SYS values, a bridge's state), or waits for the store only when it stores
        something (the admin API's publish)."""
        if self.delivery.stopped:
            raise RuntimeError("the broker is stopped: nothing is routed, nor stored")
        if self.store is not None and not self.store.opened:  # (a file the start opens: written to before, it jammed)
            raise RuntimeError("the broker is not started: its store is not open yet")
        # (Compiled, Message checks the types of what it is given, and raises TypeError.)
        if not (isinstance(topic, str) and type(qos) is int and retain in (True, False)
                and isinstance(payload, (bytes, str)) and isinstance(properties, Mapping)):
            raise ValueError(f"no PUBLISH can carry this message: topic {topic!r}, QoS {qos!r}, retain {retain!r}, "
                             f"a {type(payload).__name__} payload, properties {properties!r}")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        # The message's own properties: the caller's dict, changed after, would change it.
        properties = {k: tuple(v) if isinstance(v, list) else v for k, v in properties.items()}
        # (Without retained messages, the flag goes, as from a bridge's remote: clients were told 0.)
        message = Message(topic=topic, payload=payload, qos=qos, retain=bool(retain) and self.config.retain_available,
                          properties=properties)
        # Checked before routing, which would otherwise fail for some subscribers, and keep a
        # retained message that fails each SUBSCRIBE after.
        problem = unsendable(message, self.clock.seconds(), own=True)
        if problem is not None:
            raise ValueError(f"no PUBLISH can carry this message: {problem}")
        self.stats.broker_published += 1
        self.delivery.route(message)

    def clients(self) -> list[Client]:
        """The clients connected now."""
        return [s.connection.client for s in self.sessions.values()
                if s.connection is not None and s.connection.client is not None]

    def subscriptions_of(self, client_id: str) -> list[Subscription]:
        """The subscriptions of a session (connected or not); empty if there is none."""
        session = self.sessions.get(client_id)
        return list(session.subscriptions.values()) if session is not None else []

    # --- sessions -----------------------------------------------------------------------

    def attach(self, connection: Any, client_id: str, clean_start: bool, expiry: int,
               identity: Any = None) -> tuple[Session, bool]:
        """Give a connection its session, taking it over from another connection if there is
        one [MQTT-3.1.4-2]. Returns the session and whether it existed (Session Present)."""
        session = self.sessions.get(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            self.detach(old, graceful=False, taken_over=True, connack_sent=old.connack_went())
            old.drop(ReasonCode.SESSION_TAKEN_OVER, "session taken over by a new connection")
            session = self.sessions.get(client_id)  # gone if it was not to outlive the connection
        # A clean start ends the old session now, so its will is due [MQTT-3.1.3-9].
        self.wills.end(client_id, publish=clean_start)
        if session is not None and clean_start:
            self._discard(session)
            session = None
        present = session is not None
        if session is None:
            session = self.sessions[client_id] = Session(client_id)
        self._unexpire(session)
        session.expiry = expiry
        session.connection = connection
        if 0 < expiry < 4 * self._alive_every and self._alive_call is not None:
            self._alive_within(expiry)
        self._members_connected(session, True)
        if identity is not None and self.security is not None:
            # What is in flight is sent again at once, only if the client may read it: another
            # user may take the session over, and a reload may have taken the right away; what is
            # queued is checked as it goes.
            unread = self._filter_readable(session, identity) if present else []
            session.identity = identity
            if unread:  # (a shared subscription's: for a member that may read them)
                self.delivery.hand_on_all(unread, self.subscriptions.shared_group)
        self.attached += 1
        if self.attached > self.stats.clients_maximum:
            self.stats.clients_maximum = self.attached
        if self.store is not None and (expiry or session.stored):
            session.stored = True
            self.store.save_session(session, None)
        return session, present

    def detach(self, connection: Any, graceful: bool, taken_over: bool = False, connack_sent: bool = True) -> None:
        """A connection ended: publish its will unless it ended gracefully, and keep or discard
        its session. ``taken_over``: by a new connection of its client, here (in a cluster, the
        client stays this node's). ``connack_sent``: False if the CONNACK that accepted it was
        still held (for a will hook, for the store): its client was never told it is connected,
        and ``on_disconnect`` comes only after such a CONNACK."""
        session = connection.session
        if session is None:
            return
        connection.session = None
        session.connection = None
        self._members_connected(session, False)
        self.attached -= 1
        cancel(session.retry_call)
        session.retry_call = None
        will = connection.will
        connection.will = None
        client = connection.client
        if self.cluster is not None:
            self.cluster.disconnected(session, will is not None)
        if will is not None and not graceful:
            delay = connection.will_delay
            if delay and session.expiry:
                # Delayed until the delay or the session's end, whichever comes first [MQTT-3.1.3-9]:
                # the session's end publishes it (_expire), wherever a restart moves that end.
                self.wills.delay(client, will, connection.identity, delay)
            else:
                self.wills.publish(client, will, connection.identity)
        if not session.expiry:
            self._discard(session)
            if not taken_over:
                self._release(session.client_id)
        else:
            if session.expiry != NEVER:
                self._expire_in(session, session.expiry)
            if session.stored:
                assert self.store is not None
                self.store.save_session(session, self.clock.seconds())
        if connack_sent:
            self._notify_disconnect(client, graceful)

    def _members_connected(self, session: Session, connected: bool) -> None:
        """The session's client connected or went away: its shared groups count it among their
        connected members, or no longer (``SharedGroup.connected``)."""
        for subscription in session.subscriptions.values():
            if subscription.share_group is not None:
                self.subscriptions.set_connected(subscription, connected)

    def _notify_disconnect(self, client: Client, graceful: bool) -> None:
        if self.hooks.has_disconnect:
            self.hooks.notify("disconnect", client, graceful)

    def _expire_in(self, session: Session, seconds: float) -> None:
        self._unexpire(session)
        session.expiry_deadline = self.expiries.watch(session, self.clock.seconds() + seconds)

    def _unexpire(self, session: Session) -> None:
        if session.expiry_deadline is not None:
            self.expiries.forget(session.expiry_deadline)
            session.expiry_deadline = None

    def _expire(self, session: Session) -> None:
        """The session's expiry came. Those of a fleet come due at the same instant
        (disconnected by an outage, or restored with the time the broker stopped): they end
        SESSIONS_ENDED_PER_TURN a turn of the reactor (``expiries``), as ending them all in one
        held it."""
        session.expiry_deadline = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.info("session {client_id!r} expired", client_id=shortened(session.client_id))
            self.stats.sessions_expired += 1
            self.wills.end(session.client_id, publish=True)
            self._discard(session)
            self._release(session.client_id)

    def _alive(self) -> None:
        """Tell the store the broker is alive now (see ALIVE_EVERY)."""
        assert self._note_alive is not None
        self._noted_at = now = self.clock.seconds()
        self._note_alive(now)
        self._alive_call = self.clock.callLater(self._alive_every, self._alive)

    def _alive_within(self, expiry: int) -> None:
        """A session of ``expiry`` seconds (less than four notes' time) is connected: from now on
        the notes come four times within it at least (no more often than ALIVE_SOONEST), so that a
        kill takes no more than a quarter of it."""
        self._alive_every = every = max(ALIVE_SOONEST, expiry / 4)
        if not self._alive_call.active():
            return
        now = self.clock.seconds()
        if now - self._noted_at >= every:
            # A kill before the next note would count the session from the last, too long ago:
            # one now. (A storm of such connections writes one a quarter of the shortest expiry.)
            self._alive_call.cancel()
            self._alive()
        elif self._alive_call.getTime() > self._noted_at + every:
            self._alive_call.reset(self._noted_at + every - now)

    def _release(self, client_id: str) -> None:
        """The client's session ended here (not replaced by a new one): in a cluster, this node
        gives the client up."""
        if self.cluster is not None:
            self.cluster.released(client_id)

    def _discard(self, session: Session) -> None:
        self._unexpire(session)  # (a Clean Start ends a session that was waiting to expire)
        for topic_filter in session.subscriptions:
            self.subscriptions.remove(session.client_id, topic_filter)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if session.stored:
            assert self.store is not None
            self.store.delete_session(session.client_id)
            session.stored = False
        self._leave_unfinished(session)

    def _leave_unfinished(self, session: Session) -> None:
        """Empty an ended session (its subscriptions gone): the messages it got through a shared
        subscription and did not finish go to another member, except QoS 2 ones already sent,
        which may not go to a second client [MQTT-4.8.2-5]. Those it spilled to the store go
        with it, counted as dropped if it was a member."""
        orphans = [*(out for out in session.outgoing.values() if out.share is not None and out.qos == 1),
                   *(item for item in session.queue if item.share is not None)]
        spilled = session.spilled
        if spilled and any(s.share_group is not None for s in session.subscriptions.values()):
            # Not read back to be handed on: a store reads once what it was told to write is
            # written, the deletion of the session's records among them (which cannot wait for
            # the read: a new session of the client may be stored meanwhile). Nor does it say
            # which came through a shared subscription: all are counted.
            self.stats.messages_dropped += spilled
            session.dropped += spilled
            if once_per_thousand(session.dropped, spilled):
                log.warn("{count} messages of {client_id!r} in the store went with its session: those of its "
                         "shared subscriptions are not handed on to another member",
                         count=spilled, client_id=shortened(session.client_id))
        session.clear()
        self.delivery.hand_on_all(orphans, self.subscriptions.shared_group)

    # --- subscriptions ------------------------------------------------------------------

    def subscribe(self, session: Session, subscription: Subscription) -> bool:
        """Add (or replace) a subscription; returns whether it replaced one."""
        existed = subscription.topic_filter in session.subscriptions
        session.subscribe(subscription)
        self.subscriptions.add(subscription, session.connection is not None)
        if session.stored:
            assert self.store is not None
            self.store.save_subscription(session.client_id, subscription)
        return existed

    def options_of_mqtt3(self, session: Session, bridge: bool = False) -> None:
        """A session an MQTT 3 client resumes: its subscriptions get the options an MQTT 3
        client's have. Made by an MQTT 5 client, they lose those MQTT 3 has not: routed with
        Retain As Published, a message went to the client with the RETAIN flag of a retained one
        [MQTT-3.3.1-9 of 3.1.1]; with No Local, its own messages did not come back, which it
        could not have asked for; Retain Handling is back to 0, as an MQTT 3 SUBSCRIBE makes it.
        A bridge's (``bridge``, try_private) are No Local and Retain As Published, as its own
        SUBSCRIBEs are made, one the admin API made while it was away too."""
        for subscription in list(session.subscriptions.values()):
            if (subscription.no_local != bridge or subscription.retain_as_published != bridge
                    or subscription.retain_handling):
                self.subscribe(session, dataclasses.replace(subscription, no_local=bridge, retain_as_published=bridge,
                                                            retain_handling=0))
        if session.as_published and not bridge:
            # The messages routed with the option that wait for the client (queued, or to be
            # sent again) lose the flag too, those of a subscription gone since as well. A
            # retained message sent for a new subscription (RETAIN 1 [MQTT-3.3.1-8 of 3.1.1])
            # that waits in the queue cannot be told from those, and loses it as well: a mark on
            # every queued message, kept by the store too, would cost more than this rare case
            # (a session of MQTT 5 and Retain As Published resumed by MQTT 3) is worth. Those
            # waiting in the store only keep theirs.
            for item in (*session.queue, *session.outgoing.values()):
                item.retain = False
            session.as_published = False

    def send_retained(self, session: Session, subscription: Subscription, existed: bool,
                      replay: str | None = None) -> bool:
        """Send the retained messages a new subscription matches [MQTT-3.3.1-6], as its Retain
        Handling option says [MQTT-3.3.1-9..11]; with ``replay``, first the logged messages it
        asks for (see mqtt_broker.history), then the retained messages but those no newer than
        what it sent of their topics.

        Returns False once the session can take no more: the retained message that found it so
        is counted as dropped, and what is left is not even matched (a million took seconds),
        nor are the next filters of a SUBSCRIBE, whose messages could only be dropped too."""
        delivery = self.delivery
        replaying = replay is not None and self.history is not None and subscription.share_group is None
        # No retained messages on a shared subscription (MQTT 5 §4.8.2).
        retained = iter(()) if subscription.share_group is not None or subscription.retain_handling == 2 or (
            subscription.retain_handling == 1 and existed) else self.retained.matching(subscription.topic_filter)
        first = next(retained, None)
        if not replaying and first is None:
            return True
        if self._takes_no_more(session, subscription.qos):
            if first is not None:
                delivery.drop(session, 1)
            return False
        ids = (subscription.subscription_id,) if subscription.subscription_id else ()
        now = self.clock.seconds()
        security = self.security
        readable = (lambda message: True) if security is None or session.identity is None else (
            lambda message: security.can_read(session.identity, message.topic))
        replayed: dict[str, int] = {}  # topic -> the seq of the newest of its logged messages sent
        if replaying:
            assert self.history is not None and replay is not None
            if session.connection is not None:
                # A QoS 2 message is logged as it is routed, before its packet id is stored: it
                # reaches no subscriber before (docs/durability.md), nor a replay.
                session.connection.wait_for_store()
            for entry in self.history.replay(subscription.topic_filter, replay, now):
                message = entry.message
                if not readable(message) or (subscription.no_local and message.sender == session.client_id):
                    continue  # [MQTT-3.8.3-3] for the past too
                replayed[message.topic] = entry.seq
                # (its RETAIN flag as a live message's [MQTT-3.3.1-12, -13])
                delivery.deliver(session, message, min(message.qos, subscription.qos),
                                 message.retain and subscription.retain_as_published, ids)
        expired: list[str] = []
        took_all = True
        for message in chain(() if first is None else (first,), retained):
            if self._takes_no_more(session, subscription.qos):
                delivery.drop(session, 1)
                took_all = False
                break
            if message.expired(now):
                expired.append(message.topic)  # (after the walk, which the tree may not change under)
                continue
            # Kept here before the newest message of its topic the replay sent was logged, the
            # retained message is that one or older: the client has the topic's latest. Kept
            # after, it is newer (set on another node of a cluster, which logs it there).
            if (message.topic in replayed and self.retained.logged(message.topic) < replayed[message.topic]) \
                    or not readable(message) or (subscription.no_local and message.sender == session.client_id):
                continue  # [MQTT-3.8.3-3]
            if delivery.too_large_to_queue(session, message):  # (not spilled to the store either)
                delivery.drop(session, 1)
                continue
            delivery.deliver_retained(session, message, min(message.qos, subscription.qos), ids)
        for topic in expired:
            self._drop_retained(topic)
        return took_all

    def _takes_no_more(self, session: Session, qos: int) -> bool:
        """Whether a session is ``Delivery.full`` for a new subscription of ``qos``, once what
        expired in its queue went (once a second at most: ``Delivery.sweep``)."""
        delivery = self.delivery
        return delivery.full(session, qos) and (not delivery.sweep(session) or delivery.full(session, qos))

    def delete_retained(self, topic: str) -> bool:
        """Delete a topic's retained message, here and in the store (in a cluster, Redis, whence
        every node); False if there was none."""
        if not self.retained.delete(topic):
            return False
        if self.store is not None and not topic.startswith("$SYS/"):  # (each node's own, never stored)
            self.store.delete_retained(topic)
        return True

    def _drop_retained(self, topic: str) -> None:
        """An expired retained message goes [MQTT-3.3.2-5]."""
        self.retained.delete(topic)
        self._expired_retained(topic)

    def _sweep(self) -> None:
        """Every RETAINED_SWEEP: the retained messages that expired go, RETAINED_EXPIRED_PER_TURN
        a turn of the reactor (a SUBSCRIBE meanwhile sends none that expired), then the message
        log's entries past history_max_age."""
        now = self.clock.seconds()
        for topic in self.retained.expire(now, RETAINED_EXPIRED_PER_TURN):
            self._expired_retained(topic)
        if self.retained.due(now):
            self._retained_sweep = self.clock.callLater(0, self._sweep)
            return
        self._retained_sweep = self.clock.callLater(RETAINED_SWEEP, self._sweep)
        if self.history is not None and self.history.max_age:
            self.history.expire(now)
            self.delivery.forget_dropped()

    def _expired_retained(self, topic: str) -> None:
        """An expired retained message goes from the store too. (In a cluster, from Redis only if
        it still holds that one: another node may have set the topic anew. Every node drops it
        from its own copy by itself.)"""
        if self.cluster is not None:
            self.cluster.store.expire_retained(topic)
        elif self.store is not None:
            self.store.delete_retained(topic)

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        self.subscriptions.remove(session.client_id, topic_filter)
        if session.stored:
            assert self.store is not None
            self.store.delete_subscription(session.client_id, topic_filter)
        return True


RETAINED_EXPIRED_PER_TURN = 5000
"""How many expired retained messages a sweep deletes in one turn of the reactor; the others go
in the next turns, reads and writes between."""
SESSIONS_ENDED_PER_TURN = 1000
"""How many of the sessions whose expiry came end in one turn of the reactor; the others wait
for the next turns, reads and writes between (a fleet's sessions come due together)."""
RETAINED_SWEEP = 60.0
"""Seconds between two sweeps of the expired retained messages."""
ALIVE_EVERY = 60.0
"""Seconds between two notes to a store that can keep them (``alive``) that the broker is alive:
a session whose client was connected when the broker was killed counts its expiry from the last
one, within these seconds of the kill, not from the restart. (An idle broker writes its disk
once per note: a minute is nothing next to expiries of minutes or days, and spares flash.) Once
a session of a shorter expiry has been connected, a quarter of it (``_alive_within``): counted
from a minute before the kill, a session of 20 s was gone after a restart at once, and with it
messages its publishers had been acknowledged."""
ALIVE_SOONEST = 1.0
"""The fewest seconds between two notes that the broker is alive, whatever the expiries."""


_BACKLOG_AT = {"tcp": 3, "tcp6": 2, "unix": 3, "ssl": 6, "mqtts": 2}
"""The position of a backlog given by position to each listener given one here, counting the
endpoint's name as 0 (``tcp:PORT:INTERFACE:BACKLOG``). ``mqtts:`` takes only its port by
position, and refuses more."""


def with_backlog(description: str, backlog: int) -> str:
    """A listening endpoint string with a listen queue of ``backlog`` unless it names one: the
    default of 50 overflows when many clients reconnect at once, and a dropped SYN costs the
    client a one-second retry."""
    arguments, options = parse_description(description)
    if arguments[0] == "haproxy":  # (a wrapper: its listener is the endpoint it names)
        arguments = arguments[1:]
    at = _BACKLOG_AT.get(arguments[0]) if arguments else None
    if at is None or "backlog" in options or len(arguments) > at:
        return description
    return f"{description}:backlog={backlog}"


def _raise_open_files_limit() -> None:
    """Many clients need many descriptors: raise the soft limit to the hard one where allowed."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < target:
            # The hard limit stays: an embedding application may want it back.
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warn("could not raise the open files limit: {error}", error=e)

"""MQTTProtocol, one per client connection.

The protocol turns bytes into packets (through the sans-IO reader), checks each packet against
the lifecycle table, dispatches it through an explicit table of handlers (PUBLISH, the most
frequent, by a direct call), and writes what the
broker sends. It never decides routing. This module holds the connection itself (transport
events, keepalive, sending, back-pressure), PINGREQ and DISCONNECT; the CONNECT and AUTH
handlers are in :mod:`mqtt_broker.connecting`, those of PUBLISH and its acknowledgements in
:mod:`mqtt_broker.publishing`, those of SUBSCRIBE and UNSUBSCRIBE in
:mod:`mqtt_broker.subscribing`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable, Final

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    ILoggingContext, IProtocol, IPushProducer, IReactorTime, ITransport,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import classImplements

from . import lifecycle
from .hooks import Refused
from .lifecycle import State
from .message import NOT_CACHED, Client, Message, encoding_kind, shared_properties
from .aliases import InboundAliases, OutboundAliases
from .auth import Identity
from .connect import NEVER, Terms, granted_expiry, read_packet_size
from .connecting import Connecting, count_refusal, describe, takeover_wait, tally
from .delivery import Delivery
from .linger import close_lingering, socket_of, unsent_bytes, unwritten
from .logged import shortened
from .publishing import Publishing, _Acks
from .stats import once_per_thousand
from .subscribing import Subscribing
from .store import StoreError
from .wire import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Auth, Connack, Connect, Disconnect, FrameReader,
    MQTTError, Packet, Pingreq, Pingresp, ProtocolError, Puback, Pubcomp, Pubrec, Pubrel,
    ReasonCode, Subscribe, Unsubscribe, UnsupportedProtocolVersion, encode,
    publish_template,
)
from .wire.properties import sendable

log = Logger(__name__)  # compiled, Logger() would not find the module from the stack

_PINGRESP: Final = encode(Pingresp())
_LEGAL: Final = lifecycle.LEGAL
SEND_LIMIT: Final = 1024 * 1024
"""Bytes a TCP transport hands the kernel per turn of the reactor (Twisted's default, 128 KiB,
is less than a subscriber of several busy publishers is sent per turn)."""
LARGE_PACKET_PROGRESS: Final = 1000
"""Bytes still to come of a packet, above which a read of part of it counts as traffic for the
keepalive, as Mosquitto has it: a large PUBLISH on a slow link keeps its connection alive as it
arrives, where a small packet trickled byte by byte does not."""
READ_WHILE_DECIDING: Final = 64 * 1024
"""Bytes of a connection read and held, not handled, while a hook decides on one of its packets;
reading stops once a read takes it above that. Reading on is how the broker sees a client leave
meanwhile: a socket not read is not watched, and a client gone before the CONNACK was held until
the hook answered."""
RESUMED_GRACE: Final = 1.0
"""Seconds after a client read no more for its backlog is read again at its keepalive
(``keepalive_due``) within which a packet of it must come: what it sent meanwhile waited in the
kernel, and is read at once."""
PACKETS_PER_TURN: Final = 10_000
"""Packets of one connection handled in one turn of the reactor; the rest of what was read waits
for the next turn, as for a hook. A TCP read of PUBLISHes holds fewer; 64 KiB of 2-byte PINGREQs
holds 32,768, and a WebSocket message of 4 KiB may inflate to 16 MiB of them."""


class MQTTProtocol(Connecting, Publishing, Subscribing):
    """One client connection (an ``IProtocol`` of its own, without Twisted's ``Protocol`` as a
    base: that has no slots, so every instance would carry a dict too). ``paused`` is True while
    the transport's buffer is full; the connection then holds what is written to it, up to
    max_held_bytes (a busy subscriber's socket is full for a moment between two turns of the
    reactor, and it keeps taking messages straight from the publish path), and past that the
    broker queues (bounded) instead of writing."""

    # Slots: an idle connection's attributes in a dict would cost 1.5 KiB (more than 30 of them
    # do not share keys), in slots a third of that.
    __slots__ = (
        "broker", "delivery", "clock", "stats", "reader", "state", "_legal", "version", "session", "client",
        "will", "will_delay", "paused", "send_quota", "max_send_size", "problem_information",
        "terms", "peer", "_aliases_in", "_aliases_out", "_auth_method", "_client_id", "identity",
        "_out", "_on_socket", "pending_bytes", "_auth_connect", "_blocked", "_backlogged", "_owed", "_granted",
        "_resumed_at", "_graceful",
        "_last_seen", "_keep_alive", "_deadline", "_expiry_call", "_linger_call",
        "_unstored", "_acks", "_pubacks_waiting", "bridge", "transport", "connected", "_inherited_pubrels",
        "_ended", "_connack_lost", "_reauthenticating", "_own", "_successors", "_awaiting_disk",
    )

    def __init__(self, broker: Any, clock: IReactorTime) -> None:
        self.transport: ITransport | None = None
        self.connected = 0
        self.broker = broker
        self.delivery: Delivery = broker.delivery
        """The broker's routing and delivery, typed: compiled, calls to it are native ones."""
        self.clock = clock
        self.stats = broker.stats
        config = broker.config
        self.reader = FrameReader(max_packet_size=read_packet_size(config), publish_type=Message)
        self.state = State.AWAITING_CONNECT
        self._legal = _LEGAL[self.state]
        self.version = MQTT_3_1_1
        self.session: Any = None
        self.client: Client | None = None
        self.will: Message | None = None
        self.will_delay = 0
        self.paused = False
        """True while the transport's buffer is full: writes are held in ``_out`` until it
        drains, and past max_held_bytes the broker queues instead."""
        self.send_quota = config.max_inflight_messages
        self.max_send_size = NEVER
        self.problem_information = True
        self.terms: Terms | None = None
        self.peer = "?"
        self._aliases_in: InboundAliases | None = None
        self._aliases_out: OutboundAliases | None = None
        self._auth_method: str | None = None
        self._client_id = ""
        self.identity: Identity | None = None
        """Who the security chain says the client is (None without security)."""
        self._out: list[bytes] | None = None
        """Writes gathered while a read is handled or the transport is full (None: none, which
        an idle connection keeps instead of an empty list)."""
        self._on_socket = False
        self.pending_bytes = 0
        """Bytes gathered in ``_out``: the broker stops moving a queue into it past a limit."""
        self._auth_connect: Connect | None = None
        self._reauthenticating = False
        """The broker sent AUTH 0x18 in a re-authentication and waits for the client's answer."""
        self._own = ""
        """The name of the bridge whose in-memory link to this broker this is ("" for a client's
        connection): the limits set for clients (session expiry, wildcard and shared
        subscriptions, subscriptions a client) are not its."""
        self._blocked: Deferred[Any] | None = None
        self._backlogged = False
        """Reading from the client stopped: it reads nothing of what it is sent, answers included,
        and those are held up to max_held_bytes."""
        self._owed = 0
        """What the broker owed the client when reading it stopped: bytes held for it and bytes
        its socket had not taken (see ``keepalive_due``)."""
        self._granted = self._resumed_at = -1.0
        """When reading it stopped for its backlog, its silence counted from then
        (``read_no_more_until_sent``); when ``keepalive_due`` last read it again for its socket
        taking bytes. -1: never."""
        self._awaiting_disk = False
        """Reading from the client stopped: its packets took what waits for the store's disk past
        the store's bound (see ``_added_to_store``)."""
        self._graceful = False
        self._last_seen = 0.0
        self._keep_alive = 0.0
        self._deadline: Any = None
        """This connection's entry in ``broker.keepalives`` (see mqtt_broker.keepalive): its
        CONNECT deadline until CONNECT, then its keepalive's."""
        self._expiry_call: Any = None
        """Disconnects the client when its credentials expire (``identity.expires_at``)."""
        self._linger_call: Any = None
        """Aborts the socket at the end of the linger after the broker closed it (see ``drop``)."""
        self._unstored: deque[_Unstored] | None = None
        """Writes waiting for the store (see ``wait_for_store``), a batch each, oldest first."""
        self._acks: _Acks | None = None
        """The acknowledgements of PUBLISHes waiting for the store's latest batch (see
        ``Publishing._acknowledge_when_stored``)."""
        self._pubacks_waiting = 0
        """QoS 1 PUBLISHes whose PUBACK waits for the store, in this batch or an earlier one:
        they count against the Receive Maximum (MQTT 5, 3.3.4)."""
        self._inherited_pubrels: set[int] | None = None
        """The packet ids of QoS 2 PUBLISHes that a session resumed by this connection had
        received and not yet released: they do not count against this connection's Receive
        Maximum, which starts afresh with each connection (MQTT 5, 4.9)."""
        self.bridge = False
        """An MQTT 3 bridge (try_private): its subscriptions are no-local and retain-as-published."""
        self._ended: Failure | None = None
        """Why the transport ended while a hook decided on a packet of this connected client: the
        connection ends once the packets read before are handled (see ``connectionLost``)."""
        self._connack_lost = False
        """With ``_ended``: the CONNACK that accepted the connection was held still (for a will
        hook, for the store) when the transport ended, and so never went (``connack_went``)."""
        self._successors: list[Deferred[None]] | None = None
        """The waits of new connections of this client for this one to handle what it read (see
        ``hand_over``)."""

    # --- transport events ---------------------------------------------------------------

    def makeConnection(self, transport: ITransport) -> None:
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def logPrefix(self) -> str:
        return "MQTTProtocol"

    def connectionMade(self) -> None:
        self.broker.connections.add(self)
        if self._own:
            self.broker.own_links += 1
        self.broker.stats.connections_total += 1
        if self.peer == "?":  # not told by the factory
            self.peer = describe(self.transport.getPeer())  # type: ignore[union-attr]
        if self.broker.config.set_tcp_nodelay:
            try:
                self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
            except (AttributeError, OSError):
                pass  # not a TCP transport (unix socket, in-memory)
        if isinstance(self.transport, tcp.Connection):  # TCP, or a UNIX socket (a subclass)
            self.transport.SEND_LIMIT = SEND_LIMIT
            self._on_socket = True
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        if self.broker.config.connect_timeout:
            self._deadline = self.broker.keepalives.watch(
                self, self.clock.seconds() + self.broker.config.connect_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self.stats.bytes_received += len(data)
        reader = self.reader
        if self.state is State.AWAITING_CONNECT and not reader.buffered and data and data[0] >> 4 != 1:
            # [MQTT-3.1.0-1] at the first byte, not once the length it claims has come: an HTTP
            # request reads as a PUBACK of 69 bytes, and would hold the socket till connect_timeout.
            self._violation(ProtocolError(f"the first packet is not a CONNECT (first byte 0x{data[0]:02x})"))
            return
        reader.receive_data(data)
        if self._blocked is None:
            self._process()
        elif reader.buffered > READ_WHILE_DECIDING:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _process(self) -> None:
        reader = self.reader
        handlers = _HANDLERS
        count = 0  # counted in a local, added once per read
        broker = self.broker
        store = broker.bounded_store
        unwritten = store.unwritten_bytes if store is not None else 0
        broker.batching += 1
        try:
            while self._blocked is None:
                packet = reader.next_packet()
                if packet is None:
                    return
                count += 1
                if type(packet) not in self._legal:
                    if self.state is State.CLOSED:
                        return
                    lifecycle.check(self.state, packet, self.version)
                if type(packet) is Message:  # compiled, a native call (the table's is a Python one)
                    self._on_publish(packet)
                else:
                    handlers[type(packet)](self, packet)
                if count == PACKETS_PER_TURN and self._blocked is None and self.state is not State.CLOSED \
                        and reader.buffered:
                    self._when(deferLater(self.clock, 0, _nothing), _nothing)  # the rest at the next turn
        except MQTTError as error:
            self._violation(error)
        finally:
            # The keepalive counts whole packets [MQTT-3.1.2-24], and progress on a large one.
            if self._keep_alive and (count or reader.awaited() > LARGE_PACKET_PROGRESS):
                self._last_seen = self.clock.seconds()
            self.stats.packets_received += count
            if store is not None and store.unwritten_bytes > unwritten:
                self._added_to_store(store)
            broker.batching -= 1
            if not broker.batching and broker.unflushed:
                broker.flush_writes()

    def heard(self) -> None:
        """Part of a large packet arrived that the transport holds for now (a WebSocket frame
        waiting for its end): it counts for the keepalive, as it would as bytes of the packet."""
        if self._keep_alive:
            self._last_seen = self.clock.seconds()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        blocked = self._blocked
        if blocked is not None and self.state is State.CONNECTED:
            # A hook decides on a packet read before the end: the packets read after it are
            # handled once it has (a DISCONNECT, say, that discards the will), then it ends.
            self._ended = reason if reason is not None else Failure(ConnectionDone())
            self._connack_lost = self.connack_held()
            self.broker.ending += 1
            return
        if self.state is not State.CLOSED and self.broker.config.connection_messages:
            log.info("connection {client_id!r} from {peer} lost: {reason}" if self.client else
                     "connection from {peer} lost: {reason}",
                     client_id=shortened(self.client.client_id) if self.client else None, peer=self._where(),
                     reason=reason.getErrorMessage() if reason is not None else "closed")
        self._cancel_timers()
        self._set_state(State.CLOSED)
        connack_sent = self.connack_went()
        self._forget_unstored()
        self._forget_out()
        self.broker.detach(self, graceful=self._graceful, taken_over=self._awaited(), connack_sent=connack_sent)
        self.broker.connection_lost(self)
        if blocked is not None:  # (connecting: an authentication, a hook, that no one waits for)
            blocked.cancel()

    # IPushProducer: the transport tells us when its buffer is full and when it drained.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.flush()
        if self._backlogged:
            self._backlogged = False
            if self._blocked is None and not self._awaiting_disk and self.state is not State.CLOSED:
                self.transport.resumeProducing()  # type: ignore[union-attr]
        if self.session is not None:
            self.broker.gathered(self.delivery.pump, self.session)

    def stopProducing(self) -> None:
        self.paused = True

    # --- ending a connection ------------------------------------------------------------

    def drop(self, reason: ReasonCode, message: str, abort: bool = False, routine: bool = False,
             logged: bool = True) -> None:
        """Close the connection; an MQTT 5 client is told why with a DISCONNECT first. Unless
        ``abort``, the socket lingers (``close_linger``) so that the client reads that DISCONNECT
        (or a refusing CONNACK) before the end of the stream: see :mod:`mqtt_broker.linger`.
        ``routine``: the client asked for it; not ``logged``: the caller logs it otherwise (once
        per thousand). Either is logged only with ``connection_messages``."""
        if self.state is State.CLOSED:
            return
        if len(message) > 256:  # (one quoting a client's 64 KiB topic: a reason string holds no more)
            message = message[:253] + "..."
        connack_sent = self.connack_went()
        self._forget_unstored()
        told = False
        if self.state is State.CONNECTED and reason >= 0x80:
            tally(self.stats.closed_by_reason, reason.name)
            if self.version == MQTT_5 and connack_sent:  # not before the CONNACK [MQTT-3.14.0-1]
                self.send(Disconnect(reason_code=reason, properties={"reason_string": sendable(message)}))
                told = True
        if (logged and not routine) or self.broker.config.connection_messages:
            log.info("closing connection {client_id!r} from {peer}: {reason}" if self.client else
                     "closing connection from {peer}: {reason}",
                     client_id=shortened(self.client.client_id) if self.client else None, peer=self._where(),
                     reason=message)
        self._set_state(State.CLOSED)
        self._cancel_timers()  # now, not when the socket goes: it may linger
        self.broker.detach(self, graceful=self._graceful, taken_over=self._awaited(), connack_sent=connack_sent)
        if self._successors is not None:  # what it read is not handled now
            # Not in this call: it may be a takeover by one of them, which the others, going
            # on within it, would find half done.
            self.clock.callLater(0, self._let_successors_on)
        if self._ended is not None:  # the transport is gone already (see connectionLost)
            self._forget_out()
        elif abort and told and (isinstance(self.transport, ProtocolWrapper)
                                 or getattr(self.transport, "closing_handshake", False)):
            # Over TLS (or the PROXY header's wrapper) the DISCONNECT waits in a buffer above the
            # socket, over WebSocket in the socket's, which an abort would throw away: closed as
            # without a linger instead, which bounds the wait for a client that takes nothing
            # (UNTAKEN_LIMIT; over WebSocket the closing handshake's timer).
            self._forget_out()
            self._linger_call = close_lingering(self.transport, self.clock, 0, False)
        elif abort:
            self._forget_out()
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.flush(even_if_paused=True)
            # A paused producer would be resumed once the buffer drains, instead of the
            # connection being closed: Twisted closes only a transport with no paused producer.
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            # A client that ended it is sent nothing more: no last packet to wait for it to read,
            # so no linger on a socket, unless it has not taken what it was sent before (it may
            # never read it: the linger's timer bounds the wait). TLS keeps its timer: it bounds
            # the wait for close_notify.
            linger = self.broker.config.close_linger
            socket = socket_of(self.transport)
            if routine and socket is not None and not unwritten(socket):
                linger = 0
            self._linger_call = close_lingering(socket or self.transport, self.clock, linger, socket is not None)

    def _cancel_timers(self) -> None:
        if self._deadline is not None:
            self.broker.keepalives.forget(self._deadline)
            self._deadline = None
        for call in (self._expiry_call, self._linger_call):
            if call is not None and call.active():
                call.cancel()

    def _violation(self, error: MQTTError) -> None:
        if isinstance(error, UnsupportedProtocolVersion):
            if self.state is not State.AWAITING_CONNECT:  # 0x84 is a CONNACK's, not a DISCONNECT's
                error = ProtocolError(f"a second CONNECT ({error.message})")  # [MQTT-3.1.0-2]
            else:
                # A CONNECT all the same, read whole (the reader refused it in decoding): counted
                # as one, as its CONNACK is counted as sent.
                self.stats.packets_received += 1
                self.stats.connects += 1
                count_refusal(self.stats, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)
                # [MQTT-3.1.2-2]: answer in the 3.1.1 format, which every version can read (the
                # connection's until a CONNECT is accepted).
                self.send(Connack(reason_code=1))
        self.drop(error.reason_code, error.message)

    def _watch_keepalive(self, keep_alive: int) -> None:
        """From CONNECT: the client is disconnected when silent for 1.5 keepalives [MQTT-3.1.2-24]."""
        if self._deadline is not None:
            self.broker.keepalives.forget(self._deadline)
        self._keep_alive = float(keep_alive)
        self._last_seen = self.clock.seconds()
        self._deadline = self.broker.keepalives.watch(self, self._last_seen + self._keep_alive * 1.5)

    def keepalive_due(self) -> float | None:
        """Called by the broker's keepalives at this connection's deadline: closes a connection
        with no CONNECT within connect_timeout (nor, with no keepalive, a CONNACK within
        connect_timeout of its CONNECT), or a client silent for 1.5 keepalives [MQTT-3.1.2-24];
        or returns the next deadline. A client read no more for its backlog is silent only if
        its socket took no more than the answers held for it since; else it is read again."""
        if not self._keep_alive:
            self._deadline = None
            # An abort, not a lingering close: there is nothing to tell a client that is not
            # connected (no DISCONNECT before CONNACK), and the descriptor such a socket holds is
            # what the timeout is there to free, at once.
            self.drop(ReasonCode.MAXIMUM_CONNECT_TIME, "no CONNECT within the connect timeout"
                      if self.state is State.AWAITING_CONNECT else "not connected within the connect timeout",
                      abort=True)
            return None
        limit = self._keep_alive * 1.5
        now = self.clock.seconds()
        deadline = self._last_seen + limit
        if now < deadline:  # (not ``now - last_seen < limit``: by rounding, true at the deadline itself)
            return deadline
        idle = now - self._last_seen
        if self._blocked is not None or self._awaiting_disk:
            # Waiting for a hook or the disk, the broker handles nothing: what the client sent
            # meanwhile (its PINGREQs) is not silence. (hook_timeout bounds the wait for a hook.)
            return now + limit
        if self._backlogged and self._resumed_at <= self._last_seen and \
                self.pending_bytes + unsent_bytes(self.transport) < self._owed:
            # Read no more for its backlog, it reads all the same, slowly: its socket took more
            # than the answers held for it since. Its PINGREQs wait because the broker stopped
            # reading, not because it is silent: it is read again (until the next answer held
            # stops that), and what waits in the kernel comes at once. A client that sent
            # nothing even so is silent: it is looked at again shortly, and dropped unless a
            # packet came since (a client that reads and never sends is not kept for ever).
            self._resumed_at = now
            self._backlogged = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
            return now + min(limit, RESUMED_GRACE)
        self._deadline = None
        # An abort, not a lingering close: a client silent for 1.5 keepalives is presumed
        # gone, and what is queued for it may never drain, so lingering would only hold its
        # descriptor. The DISCONNECT 0x8D is still written first, for a client that is alive
        # after all (best effort: the reset may overtake it).
        why = (f"keepalive timeout ({idle:.1f}s idle; read no more for what it was sent)" if self._backlogged
               else f"keepalive timeout ({idle:.1f}s idle)")
        self.drop(ReasonCode.KEEP_ALIVE_TIMEOUT, why, abort=True)
        return None

    def _set_state(self, state: State) -> None:
        self.state = state
        self._legal = _LEGAL[state]

    # --- waiting for hooks without reordering a client's packets -------------------------

    def _when(self, decision: Any, then: Callable[..., None], *args: Any) -> None:
        """Run ``then(result, *args)`` when a hook decides (at once if ``decision`` is not a
        Deferred); until then, handle nothing more this client sends (what is read waits, up to
        READ_WHILE_DECIDING), so its packets are handled in the order they came."""
        if not isinstance(decision, Deferred):
            if self.state is not State.CLOSED:  # (the hook may have ended it: the broker's stop)
                then(decision, *args)
            return
        done = False

        def run(result: Any) -> None:
            nonlocal done
            done = True
            if self.state is not State.CLOSED:
                store = self.broker.bounded_store
                unwritten = store.unwritten_bytes if store is not None else 0
                then(result, *args)
                if store is not None and store.unwritten_bytes > unwritten:
                    self._added_to_store(store)

        decision.addCallback(run).addErrback(self._after_failure)
        if not done:
            self._blocked = decision
            if self.reader.buffered > READ_WHILE_DECIDING:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            decision.addBoth(self._unblock, decision)

    def _unblock(self, _: Any, decision: Any) -> None:
        if self._blocked is not decision:  # what it decided waits for another decision now
            return
        self._blocked = None
        # Waiting for the hook, the broker handled nothing: the client's silence counts from now
        # (what it sent meanwhile, its PINGREQs, waits to be handled) [MQTT-3.1.2-24].
        self._last_seen = self.clock.seconds()
        ended = self._ended
        if self.state is not State.CLOSED:
            if not self._backlogged and not self._awaiting_disk and ended is None:
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self._process()
        self._handled_what_was_read(ended)

    def _handled_what_was_read(self, ended: Failure | None) -> None:
        # (Apart from _unblock, where ``_blocked`` was set to None: compiled, a reading there is
        # taken to be None still, and a new decision that _process waits for fails it.)
        if self._blocked is not None:  # what was read waits for another decision
            return
        if ended is not None:  # what was read before the end is handled
            self._ended = None
            self.broker.ending -= 1
            self.connectionLost(ended)
        self._let_successors_on()

    def _let_successors_on(self) -> None:
        """The new connections of its client that wait for this one (``hand_over``) go on."""
        successors = self._successors
        if successors is not None:
            self._successors = None
            for waiting in successors:
                if not waiting.called:  # (timed out, or its connection gone)
                    waiting.callback(None)

    def _awaited(self) -> bool:
        """Whether a new connection of its client waits for this one (see ``hand_over``): ending,
        it is taken over, and the client stays this node's."""
        return self._successors is not None and any(not waiting.called for waiting in self._successors)

    def hand_over(self) -> Deferred[None] | None:
        """A new connection of this client is to take its session over: None if this one may be
        closed at once; else, a hook deciding on a packet of it, a Deferred that fires once it
        has handled what it read (the packets after that one too: its PUBLISHes are routed, a
        DISCONNECT 0x00 discards its will [MQTT-3.14.4-3] and ends it), or after hook_timeout
        (``takeover_wait``) at the latest, when the takeover closes it as it is."""
        if self._blocked is None or self.state is not State.CONNECTED:
            return None
        waiting: Deferred[None] = Deferred(_go_on)
        if self._successors is None:
            self._successors = []
        self._successors.append(waiting)
        waiting.addTimeout(takeover_wait(self.broker.config), self.clock)
        return waiting

    def _added_to_store(self, store: Any) -> None:
        """What this client sent added to what waits for the store's disk (``store``: the
        broker's ``bounded_store``). Past the store's bound, read nothing more from it until the
        store has written what it holds: a slow or failing disk then slows the clients that
        feed it, where the broker's memory would grow with every message. What was read is
        handled; nothing is refused."""
        if store.unwritten_bytes > store.max_unwritten_bytes and not self._awaiting_disk \
                and self.state is not State.CLOSED:
            self._awaiting_disk = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
            store.flushed().addBoth(self._store_caught_up, store)

    def _store_caught_up(self, result: Any, store: Any) -> None:
        if self.state is State.CLOSED:
            return
        if isinstance(result, Failure):
            if result.check(StoreError):
                # The disk fails: what waits stays in memory until it works (the store tries
                # again by itself), and reading on would add to it.
                store.flushed().addBoth(self._store_caught_up, store)
                return
            log.failure("waiting for the store", result)
        self._awaiting_disk = False
        # Not read, the client was not silent: its silence counts from now [MQTT-3.1.2-24].
        self._last_seen = self.clock.seconds()
        if self._blocked is None and not self._backlogged:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _after_failure(self, failure: Failure) -> None:
        if self.state is State.CLOSED and failure.check(CancelledError):
            return  # cancelled as the connection ended: nothing to answer
        if failure.check(MQTTError):
            self._violation(failure.value)  # type: ignore[arg-type]
        else:
            log.failure("error handling a packet from {peer}", failure, peer=self._where())
            self.drop(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "internal error")

    # --- sending ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write bytes. While the broker handles a read (``broker.batching``), writes to each
        connection are gathered and go to its transport in one call when the read is done:
        Twisted's write costs about a microsecond, a list append far less. While the transport
        is full (``paused``) they are held until it drains. While earlier writes wait for the
        store, they wait behind them."""
        if self._unstored:
            waiting = self._unstored[-1]
            waiting.data.append(data)
            waiting.size += len(data)
            self.pending_bytes += len(data)
            return
        self._write_now(data)

    def unless_written(self, then: Callable[[], object]) -> None:
        """Call ``then`` if what was written so far never leaves the writes that wait for the
        store: the connection ends while they wait, or its transport is gone already (``_ended``:
        the rest of a read handled before its end)."""
        if self._ended is not None:
            then()
        elif self._unstored:
            waiting = self._unstored[-1]
            if waiting.otherwise is None:
                waiting.otherwise = []
            waiting.otherwise.append(then)

    def read_no_more_until_sent(self) -> None:
        """Read nothing more from the client until its transport has sent what waits
        (``resumeProducing``), or its keepalive finds that it reads (``keepalive_due``): its own
        answers (PUBACKs, PINGRESPs, a WebSocket's pongs) would pile up for as long as it sends
        and does not read."""
        if not self._backlogged:
            self._backlogged = True
            self._owed = self.pending_bytes + unsent_bytes(self.transport)
            if self._keep_alive and self._last_seen > self._granted:
                # Its packets are not read from now on (a PINGREQ sent a moment ago waits): its
                # silence counts from now, once for each packet read (never sending, it is not
                # granted this again and again as reading stops again).
                self._last_seen = self._granted = self.clock.seconds()
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _write_now(self, data: bytes) -> None:
        """``write``, ahead of what waits for the store."""
        if self.broker.batching or self.paused:
            out = self._out
            if out is None:
                self._out = [data]
                self.broker.unflushed.append(self)
            else:
                out.append(data)
            self.pending_bytes += len(data)
            if self.paused and self.pending_bytes > self.broker.config.max_held_bytes:
                self.read_no_more_until_sent()
        else:
            self.stats.bytes_sent += len(data)
            self._transmit(data)

    def flush(self, even_if_paused: bool = False) -> None:
        out = self._out
        if out is not None and (even_if_paused or not self.paused):
            self._out = None
            unstored = sum(w.size for w in self._unstored) if self._unstored else 0
            self.stats.bytes_sent += self.pending_bytes - unstored  # counted per flush, not per message
            self.pending_bytes = unstored
            self._transmit(out[0] if len(out) == 1 else b"".join(out))

    def wait_for_store(self, exact: bool = False) -> None:
        """Hold what is written from now on until the store has made durable every change
        recorded so far: a PUBLISH goes on the wire only once a restart would send it again
        with the same packet id, a PUBREL or PUBCOMP only once the state it ends is stored.
        Writes keep their order; the connection waits once per batch of the store, however
        many messages the batch holds.

        If the batch cannot be written (a full disk, logged by the store), what waited goes out
        all the same, so that clients keep being served (a crash before the disk recovers can
        then repeat a QoS 0/1 message), unless it is ``exact``: a step of a QoS 2 exchange,
        whose state a restart must find, or the message is lost or arrives twice. That waits
        for the disk, as its publisher's acknowledgement does."""
        store = self.broker.store
        if store is None:
            return
        unstored = self._unstored
        if unstored and unstored[-1].generation == store.generation:
            unstored[-1].exact |= exact  # the wait already asked for covers what was just recorded
            return
        stored = store.flushed()
        if stored.called:
            return
        waiting = _Unstored(store.generation, exact)
        if unstored is None:
            unstored = self._unstored = deque()
        unstored.append(waiting)
        stored.addBoth(self._stored, waiting)

    def hold_until(self, decision: Deferred[None]) -> None:
        """Hold what is written from now on (a CONNACK first) until ``decision`` fires, as
        ``wait_for_store`` holds it for the store; what waits for the store behind it waits for
        both."""
        waiting = _Unstored(-1, False, decision=True)  # (no generation: it covers no batch)
        if self._unstored is None:
            self._unstored = deque()
        self._unstored.append(waiting)
        decision.addBoth(self._decided, waiting)

    def _decided(self, _: Any, waiting: _Unstored) -> None:
        if not waiting.sent:
            waiting.ready = True
            self.broker.gathered(self._send_ready)

    def _stored(self, result: Any, waiting: _Unstored) -> None:
        """The store wrote (or failed to write) the batch ``waiting`` waited for, and so every
        earlier one: send what waited for them, in order."""
        unstored = self._unstored
        if waiting.sent or not unstored:
            return
        if isinstance(result, Failure):
            if not result.check(StoreError):
                log.failure("waiting for the store", result)
            elif self._exact_held(waiting):
                assert self.broker.store is not None
                self.broker.store.flushed().addBoth(self._stored, waiting)  # (the store tries again by itself)
                return
        self.broker.gathered(self._send_stored, waiting)

    def _exact_held(self, waiting: _Unstored) -> bool:
        """Whether what waits up to ``waiting`` holds a step of a QoS 2 exchange."""
        for held in self._unstored or ():
            if held.exact:
                return True
            if held is waiting:
                break
        return False

    def _send_stored(self, waiting: _Unstored) -> None:
        unstored = self._unstored
        assert unstored is not None
        for held in unstored:  # (the store writes its batches in order: the earlier ones are written)
            if not held.decision:
                held.ready = True
            if held is waiting:
                break
        self._send_ready()

    def _send_ready(self) -> None:
        """Send what waited for what is done, in order, up to what waits still."""
        unstored = self._unstored
        assert unstored is not None
        broker = self.broker
        while unstored and unstored[0].ready:
            first = unstored.popleft()
            first.sent = True
            if first.data:  # gathered with the other writes (still counted in pending_bytes)
                out = self._out
                if out is None:
                    out = self._out = []
                    broker.unflushed.append(self)
                out += first.data
            if self._ended is not None:  # (the transport gone, nothing went to it)
                for then in first.otherwise or ():
                    then()
        if self.paused and self.pending_bytes > broker.config.max_held_bytes:
            # Now held for a full socket, as _write_now's writes are: a client of a stored
            # session whose every answer waits for the store is read no more either.
            self.read_no_more_until_sent()
        session = self.session
        if session is not None and (session.queue or session.spilled) and not self.paused:
            self.delivery.pump(session)

    def _forget_unstored(self) -> None:
        """The connection ends: what waited for the store is not sent (the session keeps every
        message it held and sends it again on the next connection)."""
        if self._unstored:
            for waiting in self._unstored:
                waiting.sent = True
                self.pending_bytes -= waiting.size
                count_kinds(waiting.data, self.stats.unsent)
                for then in waiting.otherwise or ():
                    then()
            self._unstored.clear()

    def _forget_out(self) -> None:
        """The connection ends: what it gathered, or held for a full socket, never goes to its
        transport."""
        out = self._out
        if out is not None:
            self._out = None
            self.pending_bytes -= sum(len(data) for data in out)
            count_kinds(out, self.stats.unsent)

    def count_unwritten(self, into: list[int]) -> None:
        """Add to ``into`` what was written to this connection and has not gone to its transport
        yet, by kind (see ``count_kinds``): counted as sent, it may still be lost with it."""
        if self._out is not None:
            count_kinds(self._out, into)
        for waiting in self._unstored or ():
            count_kinds(waiting.data, into)

    def _transmit(self, data: bytes) -> None:
        """Hand bytes to the transport. A TCP transport with nothing waiting is given them
        through the socket at once: Twisted's write would keep them for the next turn of the
        reactor, at the cost of two epoll_ctl calls and a dispatch, which is most of the cost of
        a QoS 1 or 2 exchange. What the socket does not take goes the usual way."""
        transport: Any = self.transport
        if self._on_socket and not transport.dataBuffer and not transport._tempDataLen and (
                transport.connected and not transport.disconnecting):
            sent = transport.writeSomeData(data)
            if sent == len(data):
                return
            if type(sent) is int and sent:
                data = data[sent:]
        transport.write(data)

    def send(self, packet: Packet) -> None:
        data = encode(packet, self.version)
        if len(data) > self.max_send_size:
            if getattr(packet, "properties", None):
                # Reason strings and user properties are the first to go [MQTT-3.1.2-24, -3.4.2-2].
                properties = {k: v for k, v in packet.properties.items()  # type: ignore[union-attr]
                              if k not in ("reason_string", "user_property")}
                data = encode(dataclasses.replace(packet, properties=properties), self.version)  # type: ignore[type-var, arg-type]
            if len(data) > self.max_send_size:
                # Not sent [MQTT-3.1.2-24]: a client that cannot be answered (a SUBACK has one code
                # per filter, an AUTH the data a hook gave) is closed, the DISCONNECT left out if
                # even that is too large.
                if not isinstance(packet, Disconnect):
                    self.drop(ReasonCode.PACKET_TOO_LARGE, f"its {type(packet).__name__} would be {len(data)} "
                              f"bytes, more than its Maximum Packet Size")
                return
        self.stats.control_packets_sent += 1
        self.write(data)

    def send_publish(self, message: Message, qos: int, retain: bool, packet_id: int, dup: bool = False,
                     subscription_ids: tuple[int, ...] = ()) -> bool:
        """Write a PUBLISH; False if it is larger than the client accepts (then it is dropped
        and counted, as if delivered [MQTT-3.1.2-25])."""
        alias_topic = None
        if self.version == MQTT_5 and (subscription_ids or message.expires_at is not None or self._aliases_out):
            data, offset, alias_topic = self._encode_for_this_client(message, qos, retain, subscription_ids)
        else:
            # The bytes are shared by every receiver of the same protocol level, QoS and retain flag.
            cache = message.encoded
            if cache is None:
                cache = message.encoded = {}
            key = encoding_kind(self.version == MQTT_5, qos, retain)
            entry = cache.get(key)
            if entry is None:
                properties = message.properties if self.version == MQTT_5 else NO_PROPERTIES
                entry = publish_template(message.topic, message.payload, qos, retain, properties, self.version,
                                         1 if qos else 0)
                if cache is not NOT_CACHED:
                    cache[key] = entry
            data, offset = entry
        size = len(data)
        if size > self.max_send_size and self._aliases_out is not None:
            # Its alias may be what makes it too large (a short topic, a limit just met): a
            # message that fits without one goes without one [MQTT-3.1.2-25].
            if alias_topic is not None:
                self._aliases_out.forget(alias_topic)
            data, offset, _ = self._encode_for_this_client(message, qos, retain, subscription_ids, aliased=False)
            size = len(data)
        if size > self.max_send_size:
            stats = self.stats
            stats.messages_dropped += 1
            stats.dropped_too_large += 1
            if once_per_thousand(stats.dropped_too_large):  # (any client may ask for a small maximum)
                log.info("dropped a {size} byte message to {client_id!r}: above its maximum packet size "
                         "({dropped} dropped so far for their size, to all clients)", size=size,
                         client_id=shortened(self.client.client_id) if self.client else "-",
                         dropped=stats.dropped_too_large)
            return False
        if qos:
            patched = bytearray(data)
            patched[offset] = packet_id >> 8
            patched[offset + 1] = packet_id & 0xFF
            if dup:
                patched[0] |= 0x08
                self.stats.resent += 1
            self.write(bytes(patched))
        else:
            self.write(data)
        return True

    def _encode_for_this_client(self, message: Message, qos: int, retain: bool, subscription_ids: tuple[int, ...],
                                aliased: bool = True) -> tuple[bytes, int, str | None]:
        """An MQTT 5 PUBLISH with properties of this receiver's own, after those of the message
        (``shared_properties``): its subscription identifiers [MQTT-3.3.4-3], the expiry time
        left [MQTT-3.3.2-6], its topic alias (unless not ``aliased``); and the topic given a new
        alias, if any."""
        own: dict[str, Any] = {}
        if subscription_ids:
            own["subscription_identifier"] = subscription_ids
        if message.expires_at is not None:
            own["message_expiry_interval"] = self.delivery.remaining_expiry(message)
        topic = message.topic
        alias_topic = None
        if aliased and self._aliases_out is not None:
            alias, known = self._aliases_out.assign(topic)
            own["topic_alias"] = alias
            if known:
                topic = ""
            else:
                alias_topic = topic
        data, offset = publish_template(topic, message.payload, qos, retain, own, MQTT_5, 1 if qos else 0,
                                        shared=shared_properties(message))
        return data, offset, alias_topic

    def send_pubrel(self, packet_id: int, again: bool = False) -> None:
        """``again``: sent before; MQTT 3.1 marks that with DUP (3.1's 2.1; no later version does)."""
        self.send_ack(0x6A if again and self.version == MQTT_3_1 else 0x62, packet_id)

    def send_ack(self, first: int, packet_id: int) -> None:
        """A PUBACK, PUBREC, PUBREL or PUBCOMP with reason code 0 and no properties, written
        without building a packet: four bytes, the form every protocol level reads [MQTT-3.4.2-1]."""
        self.stats.control_packets_sent += 1
        self.write((first << 24 | 2 << 16 | packet_id).to_bytes(4, "big"))  # (cheaper than bytes(tuple))

    # --- the rest -----------------------------------------------------------------------

    def _on_pingreq(self, packet: Pingreq) -> None:
        if self.broker.hooks.has_ping:
            self._when(self.broker.hooks.resolve("ping", self.client), self._ping_decided)
        else:
            self._pingresp()

    def _ping_decided(self, answer: Any) -> None:
        if not isinstance(answer, Refused):
            self._pingresp()

    def _pingresp(self) -> None:
        self.stats.control_packets_sent += 1
        # Ahead of what waits for the store, which nothing orders it after (a client held behind
        # a failing disk keeps its connection), but the CONNACK [MQTT-3.2.0-1].
        if self.connack_held():
            self.write(_PINGRESP)
        else:
            self._write_now(_PINGRESP)

    def write_connack(self, data: bytes) -> None:
        """Write the CONNACK that accepts the connection. Held for the store, it stays the first
        packet all the same: a PINGRESP waits behind it [MQTT-3.2.0-1], and the connection ends
        without a DISCONNECT before it [MQTT-3.14.0-1]."""
        self.write(data)
        if self._unstored:
            self._unstored[-1].connack = True

    def connack_went(self) -> bool:
        """Whether the CONNACK that accepted the connection went to its transport: False only
        while it is held, or if it was held when the transport ended (True for a connection that
        never had one)."""
        return not self._connack_lost and not self.connack_held()

    def connack_held(self) -> bool:
        """Whether the connection's CONNACK waits for the store (see ``wait_for_store``), or for
        a decision (``hold_until``)."""
        unstored = self._unstored
        if not unstored:
            return False
        return any(waiting.connack for waiting in unstored)

    def _on_disconnect(self, packet: Disconnect) -> None:
        # Only a normal disconnection discards the will [MQTT-3.14.4-3]; MQTT 5's 0x04 and
        # error codes still publish it.
        expiry = packet.properties.get("session_expiry_interval")
        if expiry is not None:
            client = self.client
            if client is not None and not client.properties.get("session_expiry_interval") and expiry:
                raise ProtocolError("session expiry set at DISCONNECT after 0 at CONNECT")  # 3.14.2.2.2
            if self.session is not None:  # (none yet while the client authenticates)
                self.session.expiry = granted_expiry(expiry, self.broker.config)
        self._graceful = packet.reason_code == ReasonCode.SUCCESS
        self.drop(ReasonCode.SUCCESS, f"client disconnected (0x{packet.reason_code:02x})",
                  routine=packet.reason_code < 0x80)


def _nothing(*_: Any) -> None:
    pass


def _go_on(waiting: Deferred[None]) -> None:
    """Cancelled (timed out, or its connection gone), a wait in ``hand_over`` ends as answered."""
    waiting.callback(None)


def count_kinds(writes: list[bytes], into: list[int]) -> None:
    """Add to ``into`` how many of ``writes`` (a packet each) are PUBLISHes sent the first time at
    QoS 0, 1 and 2, PUBLISHes sent again (DUP) and other packets, told by their first byte: the
    kinds of ``Stats.unsent``. Counting them there, as they are written, would cost every message;
    this runs only for what a connection holds when the figures are read or when it ends."""
    for data in writes:
        first = data[0]
        if first >> 4 != 3:
            into[4] += 1
        elif first & 0x08:
            into[3] += 1
        else:
            into[(first >> 1) & 3] += 1


# The dispatch table: one per class, not per connection (thousands of connections would each
# carry ten bound methods). Not PUBLISH (decoded into a Message): _process calls its handler.
_HANDLERS: Final[dict[type, Callable[[MQTTProtocol, Any], None]]] = {
    Connect: MQTTProtocol._on_connect,
    Puback: MQTTProtocol._on_puback,
    Pubrec: MQTTProtocol._on_pubrec,
    Pubrel: MQTTProtocol._on_pubrel,
    Pubcomp: MQTTProtocol._on_pubcomp,
    Subscribe: MQTTProtocol._on_subscribe,
    Unsubscribe: MQTTProtocol._on_unsubscribe,
    Pingreq: MQTTProtocol._on_pingreq,
    Disconnect: MQTTProtocol._on_disconnect,
    Auth: MQTTProtocol._on_auth,
}


# Not a class decorator: mypyc compiles a class with one to a Python class (no native slots).
classImplements(MQTTProtocol, IProtocol, ILoggingContext, IPushProducer)


class _Unstored:
    """Writes of one connection that wait for one batch of the store, or for a decision."""

    __slots__ = ("data", "size", "sent", "generation", "exact", "connack", "otherwise", "decision", "ready")

    def __init__(self, generation: int, exact: bool, decision: bool = False) -> None:
        self.otherwise: list[Callable[[], object]] | None = None
        """What is to happen if they never are (see ``unless_written``)."""
        self.data: list[bytes] = []
        self.size = 0
        self.sent = False
        self.generation = generation
        """The store's ``generation`` when this batch was waited for."""
        self.exact = exact
        """It holds a step of a QoS 2 exchange: sent only once the store has the batch."""
        self.connack = False
        """It holds the connection's CONNACK, which every other packet must follow."""
        self.decision = decision
        """It waits for a decision (``hold_until``), not for the store."""
        self.ready = False
        """What it waited for is done: it goes once those before it have gone."""


__all__ = ["MQTTProtocol", "MQTT_3_1", "MQTT_3_1_1", "MQTT_5", "count_kinds", "describe"]

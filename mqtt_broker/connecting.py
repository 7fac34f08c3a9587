"""CONNECT and enhanced authentication: a client's CONNECT through the security chain, MQTT 5
AUTH exchanges (re-authentication too) and the connect hooks to its CONNACK or refusal, and the
timer that ends a connection when its credentials expire.

:class:`Connecting` is a trait of :class:`~mqtt_broker.protocol.MQTTProtocol`. What a CONNECT
asks against what the settings allow is worked out apart, in :mod:`mqtt_broker.connect`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Final

from mypy_extensions import trait
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .aliases import InboundAliases, OutboundAliases
from .auth import Credentials, Identity, Refusal
from .connect import negotiate
from .delivery import Delivery
from .hooks import CONNACK_REFUSALS, DISCONNECT_REFUSALS, Authenticated, Refused
from .lifecycle import State
from .logged import shortened
from .message import Client, Message
from .stats import once_per_thousand
from .wire import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, Auth, Connack, Connect, Packet, Properties, ProtocolError, ReasonCode,
    v3_connack_code,
)
from .wire.codec import MAX_PACKET_SIZE
from .wire.properties import sendable

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IReactorTime, ITransport

    from .connect import Terms

log = Logger(__name__)  # compiled, Logger() would not find the module from the stack
_VERSION_NAMES: Final = {MQTT_3_1: "3.1", MQTT_3_1_1: "3.1.1", MQTT_5: "5"}

NO_SLOTS: Final[tuple[str, ...]] = ()
"""The slots of MQTTProtocol's traits: empty, so that its instances have no dict (in the pure
build; compiled, they have none anyway). Not a literal, which mypy would take as the slots to
check the traits' assignments against: the attributes are MQTTProtocol's slots."""


def describe(address: IAddress) -> str:
    """A peer's address as logs and hooks show it: ``host:port`` (``[::1]:port``), or ``unix:path`` for a UNIX
    socket's (``unix`` alone: a client's socket has no path, as a rule)."""
    host = getattr(address, "host", None)
    if host is not None:
        port = getattr(address, "port", "")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # (IPv6: its port is no group)
    if isinstance(address, UNIXAddress):
        name = address.name
        path = name.decode(errors="replace") if isinstance(name, bytes) else name
        return f"unix:{path}" if path else "unix"
    return str(address)


TAKEOVER_WAIT: Final = 30.0
"""Seconds at most a client's new connection waits for its old one to handle what it read while
a hook decided (see ``MQTTProtocol.hand_over``), or for a will hook deciding on its will (see
``Wills.decided``), where hook_timeout, the bound otherwise, is 0: a hook may hold its own client
(or will) for ever, not the client's next connection."""


def takeover_wait(config: Any) -> float:
    """The most a new connection of a client waits for its old one (``hand_over``), and for its
    will's hook."""
    return float(config.hook_timeout or TAKEOVER_WAIT)


@trait
class Connecting:
    """The CONNECT and AUTH handlers of MQTTProtocol and what follows from their answers. The
    attributes declared here are the connection's state that they use, which lives in
    ``MQTTProtocol``'s slots and is set up by its ``__init__``. A trait of MQTTProtocol only
    (mypyc compiles a class with one base and any number of traits)."""

    __slots__ = NO_SLOTS

    transport: ITransport | None
    _on_socket: bool
    broker: Any
    delivery: Delivery
    clock: IReactorTime
    stats: Any
    state: State
    version: int
    peer: str
    terms: Terms | None
    client: Client | None
    identity: Identity | None
    session: Any
    will: Message | None
    will_delay: int
    send_quota: int
    max_send_size: int
    problem_information: bool
    bridge: bool
    _client_id: str
    _auth_method: str | None
    _auth_connect: Connect | None
    _reauthenticating: bool
    _own: str
    _aliases_in: InboundAliases | None
    _aliases_out: OutboundAliases | None
    _deadline: Any
    _keep_alive: float
    _expiry_call: Any
    _inherited_pubrels: set[int] | None

    # MQTTProtocol's methods that these use, declared for mypy and mypyc (a trait's calls go by
    # what it declares); MQTTProtocol's own are the ones that run.
    def _set_state(self, state: State) -> None: ...
    def _when(self, decision: Any, then: Callable[..., None], *args: Any) -> None: ...
    def send(self, packet: Packet) -> None: ...
    def write(self, data: bytes) -> None: ...
    def write_connack(self, data: bytes) -> None: ...
    def _watch_keepalive(self, keep_alive: int) -> None: ...
    def drop(self, reason: ReasonCode, message: str, abort: bool = False, routine: bool = False,
             logged: bool = True) -> None: ...
    def wait_for_store(self, exact: bool = False) -> None: ...
    def hold_until(self, decision: Deferred[None]) -> None: ...

    # --- CONNECT and enhanced authentication --------------------------------------------

    def _where(self) -> str:
        """The peer, as logged and as hooks see it: a wrapper's transport (haproxy:) may know it
        only once its client has sent something, after connectionMade."""
        if self.client is None and not self._on_socket and self.transport is not None:
            self.peer = describe(self.transport.getPeer())
        return self.peer

    def _on_connect(self, packet: Connect) -> None:
        self._set_state(State.CONNECTING)
        self.broker.stats.connects += 1
        self.version = packet.protocol_level
        terms = self.terms = negotiate(self.broker.config, packet, self.broker.connack)
        if self._own:
            terms.session_expiry = packet.properties.get("session_expiry_interval", 0)
        # Until CONNACK too (an exchange of AUTH, a hook): a client is watched by the keepalive it
        # gets (max_keepalive's at most) from CONNECT on; one with none has connect_timeout more
        # to be connected.
        if terms.keep_alive:
            self._watch_keepalive(terms.keep_alive)
        elif self._deadline is not None:
            self.broker.keepalives.forget(self._deadline)
            self._deadline = self.broker.keepalives.watch(self, self.clock.seconds() + self.broker.config.connect_timeout)
        self.problem_information = terms.problem_information
        self.max_send_size = terms.max_send_size
        self.client = Client(client_id=terms.client_id, username=packet.username, peer=self._where(),
                             protocol_version=self.version, clean_start=packet.clean_start,
                             keep_alive=terms.keep_alive, properties=packet.properties, bridge=self._own or None)
        if terms.reason:
            self.refuse(terms.reason, terms.why)
            return
        bridges = self.broker.bridges
        if not self._own and bridges is not None and bridges.holds(terms.client_id):
            # Taking it over would close the bridge's link and have the client sent what is for
            # the remote (Mosquitto gives such a client nothing of the bridge's either).
            self.refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "the client id of a bridge's session here")
            return
        if self._over_rate(terms.client_id):  # (checked before the password check, which it saves)
            return
        self.bridge = packet.bridge
        security = self.broker.security
        if security is None or self.identity is not None:
            # An identity given before CONNECT is the broker's own (an in-process bridge's link).
            self._authenticated(self.identity, packet)
            return
        # An empty user name is none, as Mosquitto reads it (clients that send one are anonymous).
        verified, identity = security.client_certificate(self.transport)
        credentials = Credentials(client_id=terms.client_id, username=packet.username or None,
                                  password=packet.password, peer=self.peer, protocol_version=self.version,
                                  certificate_identity=identity, certificate_verified=verified)
        self._when(security.authenticate(credentials), self._authenticated, packet)

    def _over_rate(self, client_id: str) -> bool:
        """Refuse the CONNECT if max_connections_per_minute allows its client id no more; whether
        it did. A CONNECT is counted only once accepted: those of one client id that passed this
        before any of them was (each waiting for its password check, a hook, a claim) are held
        to the limit by checking again then."""
        if self._own or self.broker.connect_allowed(client_id):  # (a bridge's link: not a client's)
            return False
        # Logged once per thousand: the setting is for clients that reconnect in a loop, as fast
        # as they are refused.
        self.refuse(ReasonCode.CONNECTION_RATE_EXCEEDED, "too many CONNECTs for this client id", logged=False)
        refused = self.stats.refused_by_reason[ReasonCode.CONNECTION_RATE_EXCEEDED.name]
        if once_per_thousand(refused):
            log.info("refused a CONNECT of {client_id!r} from {peer}: max_connections_per_minute ({limit}) "
                     "({refused} refused for it so far; logged once per thousand)", client_id=shortened(client_id),
                     peer=self._where(), limit=self.broker.config.max_connections_per_minute, refused=refused)
        return True

    def _authenticated(self, identity: Identity | Refusal | None, packet: Connect) -> None:
        """The security chain's answer (None: there is none); then enhanced authentication and
        connect hooks."""
        if isinstance(identity, Refusal):  # (counted by _refuse, as an authentication failure if it is one)
            self.refuse(identity.reason_code, "authentication failed")
            return
        will = packet.will
        if identity is not None:
            self.identity = identity
            assert self.client is not None and self.broker.security is not None
            if identity.username != self.client.username:  # e.g. a certificate's name
                self.client = dataclasses.replace(self.client, username=identity.username)
            # Accepted, as by Mosquitto (a device moved from it still connects): the will is
            # checked again when it is due, and dropped then unless a reload granted it (one the
            # credentials' own rules forbid is dropped as the session is attached: _attach).
            if will is not None and not will.topic.startswith("$SYS") and not self.broker.security.can_publish(
                    identity, will.topic):
                log.info("will of {client_id!r} to {topic!r} is not allowed: it will not be published",
                         client_id=shortened(self.client.client_id), topic=shortened(will.topic))
        method = packet.properties.get("authentication_method")
        if method is None:
            self._authorize(packet)
        elif not self.broker.hooks.has_auth:
            self.refuse(ReasonCode.BAD_AUTHENTICATION_METHOD, f"no authentication method {method!r}")
        else:
            self._auth_method = method
            self._auth_connect = packet
            self._when(self.broker.hooks.resolve(
                "auth", self.client, method, packet.properties.get("authentication_data"), False),
                self._auth_decided)

    def _on_auth(self, packet: Auth) -> None:
        method = packet.properties.get("authentication_method")
        if self._auth_method is None or method != self._auth_method:
            raise ProtocolError("AUTH without the connection's authentication method")  # [MQTT-4.12.0-1, -5]
        reauthenticating = self.state is State.CONNECTED
        # A re-authentication starts with 0x19; 0x18 answers the broker's 0x18 (§4.12.1, §3.15.2.1).
        expected = ReasonCode.RE_AUTHENTICATE if reauthenticating and not self._reauthenticating \
            else ReasonCode.CONTINUE_AUTHENTICATION
        if packet.reason_code != expected:
            raise ProtocolError(f"AUTH with reason code 0x{packet.reason_code:02x} here")
        self._when(self.broker.hooks.resolve(
            "auth", self.client, method, packet.properties.get("authentication_data"), reauthenticating),
            self._auth_decided)

    def _auth_decided(self, answer: Any) -> None:
        reauthenticating = self.state is State.CONNECTED
        if isinstance(answer, (bytearray, memoryview)):
            answer = bytes(answer)
        final: dict[str, bytes] = {}
        if isinstance(answer, Authenticated):  # authenticated, with data for the client's last step
            final["authentication_data"] = answer.data
            answer = answer.identity
        self._reauthenticating = reauthenticating and isinstance(answer, bytes)
        if isinstance(answer, Identity):  # authenticated, as this identity from now on
            if reauthenticating and answer.expires_at is not None and answer.expires_at <= self.clock.seconds():
                answer = Refused(reason_string="credentials expired")  # (a CONNECT's are refused at attach)
            else:
                self._take_identity(answer)
                if reauthenticating:
                    self._watch_expiry()
        if isinstance(answer, Refused):
            reason = answer.code(ReasonCode.NOT_AUTHORIZED, DISCONNECT_REFUSALS if reauthenticating else CONNACK_REFUSALS)
            if reauthenticating:
                self.stats.auth_failures += 1
                told = answer.reason_string if self.problem_information else None  # (as refuse)
                self.drop(reason, told or "re-authentication failed")  # [MQTT-4.12.1-2]
            else:
                self.refuse(reason, "refused by an auth hook", answer.reason_string)
        elif isinstance(answer, bytes):
            if not reauthenticating:
                self._set_state(State.AUTHENTICATING)
            self.send(Auth(reason_code=ReasonCode.CONTINUE_AUTHENTICATION, properties={
                "authentication_method": self._auth_method, "authentication_data": answer}))
        elif reauthenticating:
            self.send(Auth(properties={"authentication_method": self._auth_method, **final}))
        else:
            connect, self._auth_connect = self._auth_connect, None
            assert connect is not None and self.terms is not None
            if final:  # (the terms' properties may be shared: a dict of its own)
                self.terms.connack_properties = {**self.terms.connack_properties, **final}
            self._authorize(connect)

    def _take_identity(self, identity: Identity) -> None:
        """An auth hook's identity replaces the connection's: its rights apply from the next
        operation (and to what the session is sent), ``%c`` and ``%u`` in them replaced as in
        ``acl_file`` patterns; its expiry to the disconnect timer. What ``password_file`` checked
        stays with it: a reload that revokes it disconnects the client."""
        assert self.client is not None
        changes: dict[str, Any] = {}
        if identity.rules is not None:
            if self.broker.security is None:
                self.broker.obey_rules()
            changes["rules"] = identity.rules.for_client(self.client.client_id, identity.username)
        previous = self.identity
        if identity.entry is None and previous is not None and previous.entry is not None:
            changes["entry"] = previous.entry
        if changes:
            identity = dataclasses.replace(identity, **changes)
        self.identity = identity
        if self.session is not None:
            self.session.identity = identity
        if identity.username != self.client.username:
            self.client = dataclasses.replace(self.client, username=identity.username)

    def _authorize(self, packet: Connect) -> None:
        if self.broker.hooks.has_connect:
            self._when(self.broker.hooks.resolve("connect", self.client), self._connect_decided, packet)
        else:
            self._accept(packet)

    def _connect_decided(self, answer: Any, packet: Connect) -> None:
        if isinstance(answer, Refused):
            self.refuse(answer.code(ReasonCode.NOT_AUTHORIZED, CONNACK_REFUSALS), "refused by a connect hook",
                         answer.reason_string)
        else:
            self._accept(packet)

    def refuse(self, reason: ReasonCode, why: str, reason_string: str | None = None, logged: bool = True) -> None:
        """Refuse the CONNECT, before its CONNACK: a CONNACK with ``reason``, counted, and close
        (not ``logged``: the caller logs it, see ``drop``)."""
        count_refusal(self.stats, reason)
        if self.version == MQTT_5:
            properties = {"reason_string": sendable(reason_string)} if reason_string and self.problem_information else {}
            self.send(Connack(reason_code=reason, properties=properties))
        elif reason not in _NO_V3_CONNACK:
            self.send(Connack(reason_code=v3_connack_code(reason)))  # [MQTT-3.2.2-5]: then close
        # else: no 3.x return code says what is wrong with the will: close without a CONNACK
        # [MQTT-3.2.2-6], as Mosquitto does ("server unavailable" would tell it to come back)
        self.drop(reason, f"{why}: {reason.name}", logged=logged)

    def _accept(self, packet: Connect) -> None:
        client = self.client
        assert client is not None
        previous = self.broker.sessions.get(client.client_id)
        # The connection holding the session here may have packets of the client to handle, read
        # while a hook decided: they come first (messages to route, a DISCONNECT that discards
        # the will [MQTT-3.14.4-3]), before a cluster's claim, which another node's may follow.
        handed_over = previous.connection.hand_over() if previous is not None and previous.connection else None
        self._wait_then(handed_over, self._handed_over, packet)

    def _handed_over(self, _: None, packet: Connect) -> None:
        # The client's wills that hooks decide on here (its last connection's, one whose delay
        # is over) go out, or not, before its CONNACK: a will after it would replace what the
        # client publishes once connected (a retained "online" by its "offline").
        assert self.client is not None
        decided = self.broker.wills.decided(self.client.client_id, takeover_wait(self.broker.config))
        self._wait_then(decided, self._wills_decided, packet)

    def _wait_then(self, waiting: Any, then: Callable[..., None], packet: Connect) -> None:
        """``then(None, packet)`` once ``waiting`` (None, or a wait bounded by
        ``takeover_wait``) fires."""
        if waiting is not None and not self._keep_alive and self._deadline is not None:
            # connect_timeout, which bounds a client without a keepalive until its CONNACK,
            # counts from the end of the wait.
            keepalives, now = self.broker.keepalives, self.clock.seconds()
            keepalives.forget(self._deadline)
            self._deadline = keepalives.watch(
                self, now + takeover_wait(self.broker.config) + self.broker.config.connect_timeout)
        self._when(waiting, then, packet)

    def _wills_decided(self, _: None, packet: Connect) -> None:
        cluster = self.broker.cluster
        if cluster is not None:  # the session may be on another node: take it first
            assert self.client is not None
            self._when(cluster.claim(self.client.client_id, packet.clean_start), self._claimed, packet)
        else:
            self._attach(packet)

    def _claimed(self, claimed: bool, packet: Connect) -> None:
        if claimed:
            self._attach(packet)
        else:
            self.refuse(ReasonCode.SERVER_UNAVAILABLE, "the cluster's Redis did not answer in time")

    def _attach(self, packet: Connect) -> None:
        identity = self.identity
        if identity is not None and identity.expires_at is not None and identity.expires_at <= self.clock.seconds():
            # Expired already (while a hook decided or a cluster claimed the session, or an
            # introspected token whose service's clock is behind): let in, the client would be
            # sent its session's messages first. (A claimed session stays, as if it had left.)
            self.refuse(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "credentials expired before the CONNACK")
            return
        client = self.client
        assert client is not None
        if self._over_rate(client.client_id):  # (counted below, in this same turn)
            return
        terms = self.terms
        self.terms = None  # needed no longer: an idle connection keeps nothing it does not use
        assert terms is not None
        properties = terms.connack_properties
        if self.version == MQTT_5 and self._auth_method is not None:
            properties = {**properties, "authentication_method": self._auth_method}
        # (Without a limit, the common case, it is encoded once.)
        if self.max_send_size < MAX_PACKET_SIZE:
            fitting = self._connack_that_fits(properties)
            if fitting is None:
                return
            properties = fitting
        previous = self.broker.sessions.get(client.client_id)
        ends_stored = packet.clean_start and previous is not None and previous.stored
        self.broker.connect_accepted(client.client_id)
        wills = self.broker.wills
        # A will waiting for its delay goes with this connection (``attach``): dropped, or
        # published after a clean start; the store forgets it.
        ends_will = client.client_id in wills and self.broker.store is not None
        waited = wills.deciding(client.client_id)  # (by ``_handed_over``, takeover_wait at most: not again)
        session, present = self.broker.attach(self, client.client_id, packet.clean_start, terms.session_expiry,
                                              self.identity)
        decided = None if waited else wills.decided(client.client_id, takeover_wait(self.broker.config))
        if decided is not None:
            # A will this connection made due itself (it took over a connection still open, or
            # its clean start ended a session whose will waited for its delay) goes out, or not,
            # before the CONNACK and what follows it, and before what the client sent meanwhile
            # is handled, as those due before it (``_handed_over``).
            self.hold_until(decided)
            self._when(decided, lambda _: None)
        if ends_stored or ends_will:
            # Session Present 0 only once the old session's end is committed: brought back by a
            # crash, its inbound QoS 2 ids would take the new session's first messages for resends.
            # And a will the client cancels by coming back before its delay [MQTT-3.1.3-9] must
            # not come back with a crash after the CONNACK (a failing disk lets the CONNACK go).
            self.wait_for_store(exact=ends_stored)
        self.session = session
        self._client_id = client.client_id
        if present and self.version != MQTT_5:
            self.broker.options_of_mqtt3(session, self.bridge)
        if session.awaiting_pubrel:
            self._inherited_pubrels = set(session.awaiting_pubrel)
        self._set_state(State.CONNECTED)
        self.send_quota = terms.send_quota
        if self.version == MQTT_5 and terms.alias_maximum:
            self._aliases_out = OutboundAliases(terms.alias_maximum)
        if packet.will is not None and not self._forbidden_by_credentials(packet.will.topic):
            will = packet.will
            will_properties = will.properties
            if "will_delay_interval" in will_properties:  # a will property, not a PUBLISH one
                self.will_delay = will_properties["will_delay_interval"]
                will_properties = {k: v for k, v in will_properties.items() if k != "will_delay_interval"}
            self.will = Message(topic=will.topic, payload=will.payload, qos=will.qos, retain=will.retain,
                                properties=will_properties, sender=client.client_id)
        cluster = self.broker.cluster
        if cluster is not None:
            cluster.connected(session, self)
            if self.will is not None:  # in Redis before the CONNACK, for the node that finds us gone
                self.wait_for_store()
        # Session Present is 0 after a clean start [MQTT-3.2.2-1]; MQTT 3.1 has no such flag.
        self._send_connack(present and self.version != MQTT_3_1, properties)
        if self.broker.config.connection_messages:
            log.info("client {client_id!r} connected from {peer} (MQTT {version}, clean start {clean}, "
                     "keepalive {keep_alive} s, session present {present})", client_id=shortened(client.client_id),
                     peer=self.peer, version=_VERSION_NAMES[self.version], clean=packet.clean_start,
                     keep_alive=terms.keep_alive, present=present)
        if not terms.keep_alive and self._deadline is not None:  # (connect_timeout's, until now)
            self.broker.keepalives.forget(self._deadline)
            self._deadline = None
        self._watch_expiry()
        self.delivery.resume(session)

    def _connack_that_fits(self, properties: Properties) -> Properties | None:
        """The CONNACK's properties within the client's Maximum Packet Size, Response Information
        left out if need be (the broker may send it, 3.1.2.11.7); None if the rest does not fit
        either: the connection is then closed, before its session is touched, without a CONNACK
        [MQTT-3.1.2-24] or a DISCONNECT, which may not come before one [MQTT-3.14.0-1]. (Session
        Present does not change its size.)"""
        size = len(self.broker.connack.encode(False, properties, self.version))
        if size > self.max_send_size and "response_information" in properties:
            properties = {k: v for k, v in properties.items() if k != "response_information"}
            size = len(self.broker.connack.encode(False, properties, self.version))
        if size <= self.max_send_size:
            return properties
        self.drop(ReasonCode.PACKET_TOO_LARGE, f"its CONNACK would be {size} bytes, more than its Maximum Packet "
                  f"Size ({self.max_send_size})")
        return None

    def _forbidden_by_credentials(self, topic: str) -> bool:
        """Whether the ACL that came with the client's credentials (a token's claims, an HTTP
        answer, an auth hook's identity) forbids it a will on ``topic``. Such a will is dropped at
        once: those rules are not reloaded, nor kept with a will in the store or in Redis, where
        it is checked after a restart, or by another node, without them. (One that ``acl_file``
        forbids is kept, and checked again when it is due, as by Mosquitto.)"""
        identity, security = self.identity, self.broker.security
        if identity is None or identity.rules is None or security is None or topic.startswith("$SYS"):
            return False
        if security.can_publish(identity, topic):
            return False
        log.info("will of {client_id!r} to {topic!r} is not allowed by its credentials: dropped",
                 client_id=shortened(identity.client_id), topic=shortened(topic))
        return True

    def _send_connack(self, present: bool, properties: Properties) -> None:
        """The CONNACK that accepts the connection, written without building a Connack."""
        data = self.broker.connack.encode(present, properties, self.version)
        self.stats.control_packets_sent += 1
        self.write_connack(data)

    # --- credentials that expire --------------------------------------------------------

    def _watch_expiry(self) -> None:
        """(Re)start the timer that disconnects the client when its credentials expire."""
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None
        expires_at = self.identity.expires_at if self.identity is not None else None
        if expires_at is not None:
            self._expiry_call = self.clock.callLater(max(0.0, expires_at - self.clock.seconds()),
                                                     self._credentials_expired)

    def _credentials_expired(self) -> None:
        self._expiry_call = None
        if self.state is State.CONNECTED:
            # 0xA0 Maximum connect time, "the maximum connection time authorized for this
            # connection has been exceeded" (MQTT 5 3.14.2.1): the token authorized the connection
            # until its exp, and the code tells the client to come back with a fresh one, where
            # 0x87 would say it is refused.
            self.drop(ReasonCode.MAXIMUM_CONNECT_TIME, "credentials expired")


_NO_V3_CONNACK: Final = (ReasonCode.TOPIC_NAME_INVALID, ReasonCode.QOS_NOT_SUPPORTED,
                          ReasonCode.RETAIN_NOT_SUPPORTED, ReasonCode.PAYLOAD_FORMAT_INVALID)
_AUTH_REFUSALS: Final = (ReasonCode.NOT_AUTHORIZED, ReasonCode.BAD_USER_NAME_OR_PASSWORD, ReasonCode.BAD_AUTHENTICATION_METHOD)


def count_refusal(stats: Any, reason: ReasonCode) -> None:
    """Count a refused connection by reason, and as an authentication failure if it is one."""
    tally(stats.refused_by_reason, reason.name)
    if reason in _AUTH_REFUSALS:
        stats.auth_failures += 1


def tally(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1

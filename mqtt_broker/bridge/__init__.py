"""Bridges: this broker as a client of another, forwarding chosen topics both ways.

A bridge is two MQTT client connections made with the broker's own codec: one to the remote
broker, one to this broker through an in-memory pipe (:mod:`.link`). The second is an ordinary
persistent session here (client id ``local_clientid``, never expiring), subscribed to the
``out`` topics: while the remote is away, that session queues what is to go out, in memory and
in the store like any other session's, bounded by ``max_queued_messages`` and
``max_stored_messages`` (drops counted and logged), and resends what was in flight when it
reconnects.

The bridge passes each PUBLISH and acknowledgement across with its packet id unchanged: what
this broker sends its session with id 7 goes to the remote with id 7, the remote's PUBACK 7
comes back as the session's PUBACK 7, and the other way round. So each side's exactly-once
state machine runs end to end, an acknowledgement reaches the sender only once the receiving
broker has taken the message (here: routed and stored), and neither side's state lives in the
bridge: both links are up together or down together, and after a restart both brokers resend
what is unacknowledged (the remote's session is resumed only while the session here goes with
it: a new one here, numbering from 1 again, starts the remote's anew). Ids never clash: the
remote's server-to-client ids become this session's client-to-server ids and the other way
round, each a namespace of its own. One exception: a message the session has at a QoS above
the remote's Maximum QoS crosses at the remote's, and the bridge finishes the session's
exchange for it (at QoS 0 at once; a QoS 2 one sent at QoS 1 when the remote's PUBACK comes);
and so does it for the remote's messages above this broker's ``max_qos``.

Loops are prevented with No Local on both sides (this broker's session always speaks MQTT 5;
an MQTT 3 remote is told it is a bridge, ``try_private``) and by the prefixes.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Any, Callable, Collection, Iterator

from twisted.application.service import Service
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ..wire import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, Connack, Connect, Disconnect, Packet, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
    Subscribe, SubscriptionRequest, Unsuback, Unsubscribe, Will,
)
from ..connect import announced_packet_size, read_packet_size
from ..logged import shortened
from ..message import is_utf8
from ..stats import once_per_thousand
from ..wire.codec import MAX_PACKET_SIZE
from ..wire.codes import ReasonCode
from .config import BridgeConfig, BridgeConfigError, BridgeTopic, mapped_problem
from .link import Link, client_tls, pipe

log = Logger()

_ACKS = (Puback, Pubrec, Pubrel, Pubcomp)
MAX_WAITING = 10_000
"""QoS 0 messages from the remote that wait, at most, behind this broker's full Receive Maximum."""
# Properties a PUBLISH may not carry across: they belong to one connection [MQTT-3.3.4-6].
_HOP_PROPERTIES = ("topic_alias", "subscription_identifier")


class BridgeStats:
    __slots__ = ("messages_out", "messages_in", "connects", "failures", "dropped")

    def __init__(self) -> None:
        self.messages_out = self.messages_in = 0
        self.connects = 0
        """Links made (the first connection and each reconnection)."""
        self.failures = 0
        """Connection attempts that failed, and links that broke."""
        self.dropped = 0
        """Messages from one side with no topic line to map them (e.g. after the topics changed),
        or larger than the remote's Maximum Packet Size; and QoS 0 ones from the remote that this
        broker could not take as fast as they came."""


class Bridge(Service):
    """One ``[[bridge]]``: keeps the two links up, reconnecting with back-off, and forwards
    between them."""

    def __init__(self, broker: Any, config: BridgeConfig, reactor: Any, clock: IReactorTime) -> None:
        self.broker = broker
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.connection = config.connection
        self.setName(f"bridge:{self.connection}")
        self.state = "stopped"
        """stopped, connecting, connected or waiting (to reconnect)."""
        self.stats = BridgeStats()
        self._refused = 0
        """Messages dropped by ``_refuse``: what its throttled line counts."""
        self.address = ""
        self.last_error = ""
        self.remote: Link | None = None
        self.local: Link | None = None
        self._attempt = 0
        self._address_index = 0
        self._retry_call: Any = None
        self._connecting: Any = None
        self._restarting = False
        self._early: list[tuple[Packet, float]] = []
        """What the remote sent before the local link was ready."""
        self._pending_acks = 0
        self._remote_receive = broker.config.max_inflight_messages
        self._remote_max_qos = 2
        self._remote_retain = True
        self._will_qos = 1
        self._private = True
        """Whether an MQTT 3 CONNECT says it is a bridge (try_private): not after a remote refused it."""
        self._version = config.version
        """The protocol level of the CONNECT: 3.1.1 once a remote of 3.1.1 refused MQTT 5."""
        self._local_receive = broker.config.max_inflight_messages
        self._inbound: set[int] = set()
        """Ids of QoS 1/2 messages from the remote not yet completed here, at most this
        broker's Receive Maximum; the next ones wait in ``_waiting``."""
        self._waiting: deque[tuple[Publish, float]] = deque()
        self._lowered: dict[int, int] = {}
        """Ids of the session's QoS 2 messages sent to the remote at a lower QoS (its Maximum QoS),
        and at which: the bridge finishes their exchange with the session itself (a PUBACK from
        the remote is the session's PUBREC; the session's PUBREL is answered here)."""
        self._held_at_remote: tuple[str, tuple[SubscriptionRequest, ...], tuple[str, ...]] | None = None
        """The remote's address, and the subscriptions and unsubscriptions of the topic lines it
        granted there (all of them), in this process: a Session Present 1 there says it still
        holds them."""
        self._subscribing: tuple[str, tuple[SubscriptionRequest, ...], tuple[str, ...]] | None = None
        """What the SUBSCRIBEs and UNSUBSCRIBEs under way make the remote hold, once all are
        granted."""
        self._lowered_in: set[int] = set()
        """Ids of the remote's QoS 2 messages taken here at a lower QoS (``max_qos``): the bridge
        finishes their exchange with the remote itself (this broker's PUBACK is the remote's
        PUBREC, at QoS 0 it is sent at once; the remote's PUBREL is answered here)."""
        self._kept_here = False
        """Whether the bridge's session here goes with the remote's: it was there as the bridge
        started (restored from the store, kept from the bridge's last run, a cluster's claimed
        from another node), or a link of this run started the remote's anew. Until then the
        remote's session is not resumed (see ``_remote_connect``)."""
        self._old_there = False
        """Whether an MQTT 3.1.1 remote answered with Session Present 1 while ``_kept_here`` was
        not: its session is to be started anew."""
        self._priming: Link | None = None
        """In a cluster, the link that makes or claims the session as the bridge starts: the
        first connection to the remote waits for its CONNACK, which says whether there was one."""

    # --- the service ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.config.notifications:
            self._publish_state(b"0")
        self._kept_here = self.config.local_client_id in self.broker.sessions
        self._old_there = False
        self._prime()
        if self._priming is None:
            self._connect()

    def stopService(self) -> None:
        super().stopService()
        self._priming = None
        self._cancel_retry()
        self._abandon_attempt()
        self._say_disconnected()
        self._close_links("bridge stopped", disconnect=True)
        # Their ends are told later, maybe once started again: not that start's broken links.
        self.remote = self.local = None
        self._down("bridge stopped")

    def restart(self) -> None:
        """Drop the links (if up) and connect again now, from the first address. A bridge that
        is not running (its broker stopped; in a cluster, another node runs it) stays so."""
        if not self.running:
            return
        self._cancel_retry()
        self._attempt = 0
        self._address_index = 0
        self._version = self.config.version  # (the remote may speak MQTT 5 by now)
        if self.remote is not None or self.local is not None:
            self._restarting = True
            self._say_disconnected()
            self._close_links("restarted", disconnect=True)  # reconnects when both are down
            return
        self._abandon_attempt()  # (to an address that may not answer for a while)
        if self._priming is None:  # (the first connection comes once the session here is known)
            self._connect()

    def _abandon_attempt(self) -> None:
        """Cancel the connection attempt under way, whose outcome no longer counts."""
        attempt, self._connecting = self._connecting, None
        if attempt is not None:
            attempt.cancel()

    @property
    def queued(self) -> int:
        """Messages waiting in this broker for the remote (queued, stored, or in flight)."""
        session = self.broker.sessions.get(self.config.local_client_id)
        if session is None:
            return 0
        return len(session.queue) + session.spilled + len(session.outgoing)

    # --- connecting ---------------------------------------------------------------------

    def _connect(self) -> None:
        self._cancel_retry()
        if not self.running:
            return
        if self._claim_unknown():
            self._prime()  # (the first connection to the remote follows its CONNACK)
            return
        config = self.config
        host, port = config.endpoints[self._address_index % len(config.endpoints)]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._set_state("connecting")
        endpoint: Any = HostnameEndpoint(self.reactor, host, port, timeout=10)
        if config.tls:
            try:
                endpoint = wrapClientTLS(client_tls(config, host), endpoint)
            except (OSError, ValueError) as e:  # a file moved or replaced since the start: try again later
                self._failed(str(e))
                return
        connect = self._remote_connect()
        # Only an MQTT 5 remote is told the largest packet the bridge takes. An MQTT 3 one sends
        # anything, and closing the link for a packet it cannot know is too large would have it
        # send that packet again at each reconnection: read anything, drop what is too large.
        max_size = read_packet_size(self.broker.config) if connect.protocol_level == MQTT_5 else MAX_PACKET_SIZE
        factory = Factory.forProtocol(lambda: Link(
            "remote", connect, self.clock, max_size, self._remote_up, self._from_remote, self._lost))
        attempt = self._connecting = endpoint.connect(factory)
        attempt.addCallbacks(self._remote_made, self._not_connected, (attempt,), None, (attempt,))

    def _remote_made(self, link: Link, attempt: Any) -> None:
        if attempt is not self._connecting:  # (abandoned: no link of it may stay)
            link.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._connecting = None
        self.remote = link
        link.on_pause = self._remote_paused

    def _not_connected(self, failure: Any, attempt: Any) -> None:
        # An attempt abandoned by a restart or a stop fails as it may (cancelled, or a lookup
        # error when cancelled while the name was resolved): it is not this bridge's failure.
        if attempt is not self._connecting:
            return
        self._connecting = None
        if not self.running:
            return
        self._failed(f"cannot connect to {self.address}: {failure.getErrorMessage()}")

    def _remote_connect(self) -> Connect:
        config = self.config
        version = self._version
        properties: dict[str, Any] = {}
        if version == MQTT_5:
            properties = {"receive_maximum": self._local_receive}
            if not config.cleansession:
                properties["session_expiry_interval"] = 0xFFFFFFFF
            size = announced_packet_size(self.broker.config)
            if size is not None:
                properties["maximum_packet_size"] = size
        will = None
        if config.notifications and not config.notifications_local_only:
            will = Will(topic=config.state_topic, payload=b"0", qos=self._will_qos, retain=self._remote_retain)
        password = config.remote_password.encode() if config.remote_password is not None else None
        # A session here that does not go with the remote's (new: persistence "memory", another
        # data_dir or local_clientid) numbers its messages from 1 again, which the remote's,
        # resumed, would take for resends of the QoS 2 messages of those ids it awaits the PUBREL
        # of, and drop [MQTT-4.3.3-9]: it is started anew [MQTT-3.2.2-4]. An MQTT 3.1.1 remote is
        # asked to resume it first, as its Session Present says whether there is one (see
        # ``_remote_up``): one without is connected to once, not three times. An MQTT 3.1 CONNACK
        # does not say.
        clean_start = config.cleansession or (not self._kept_here and (version != MQTT_3_1_1 or self._old_there))
        return Connect(protocol_name="MQIsdp" if version == 3 else "MQTT", protocol_level=version,
                       clean_start=clean_start, keep_alive=config.keepalive_interval,
                       client_id=config.remote_client_id, will=will, username=config.remote_username,
                       password=password, properties=properties,
                       bridge=config.try_private and self._private and version != MQTT_5)

    def _say_disconnected(self) -> None:
        """Tell the remote the bridge is going: a DISCONNECT of its own discards the will that
        would (as when the link fails, in Mosquitto)."""
        config, remote = self.config, self.remote
        if config.notifications and not config.notifications_local_only and remote is not None and remote.up:
            remote.send(Publish(topic=config.state_topic, payload=b"0", qos=0, retain=self._remote_retain))

    def _remote_up(self, link: Link, connack: Connack) -> None:
        """CONNACK from the remote: subscribe to the in topics there (and unsubscribe the out
        ones from a session it kept) unless it holds them already, then open the local link."""
        if not self._kept_here and not self.config.cleansession:
            if link.connect.clean_start:
                log.info("bridge {name}: its session here is new: the remote's is started anew", name=self.connection)
                if link.version != MQTT_5:
                    # An MQTT 3 session started clean lasts as long as its connection [MQTT-3.1.2-6]:
                    # this one ended the remote's old session, the next starts one that outlasts it.
                    self._kept_here = self._restarting = True
                    link.close("the remote's old session ended", disconnect=True)
                    return
            elif connack.session_present:
                # No session state here to go with it: the connection MUST be closed (3.1.1's
                # 3.2.2.2), and the next starts the remote's anew.
                self._old_there = self._restarting = True
                link.close("Session Present 1 from the server, and no session here to go with it", disconnect=True)
                return
        limit = self.config.bridge_max_packet_size
        if limit:  # (Mosquitto's: what goes to the remote, the smaller with an MQTT 5 remote's own)
            link.max_send_size = min(link.max_send_size or limit, limit)
        properties = connack.properties
        self._remote_receive = properties.get("receive_maximum", 65535) if link.version == MQTT_5 \
            else self.broker.config.max_inflight_messages
        self._remote_max_qos = properties.get("maximum_qos", 2)
        self._remote_retain = bool(properties.get("retain_available", 1))
        # (MQTT 3.1's CONNACK has no Session Present: 0 says nothing.)
        new_session = not connack.session_present and (link.version != MQTT_3_1 or self.config.cleansession)
        if new_session:
            self._forget_remote_qos2()
        self._kept_here = True
        incoming = [t for t in self.config.topic if t.incoming]
        v5 = link.version == MQTT_5
        requests = tuple(SubscriptionRequest(
            topic_filter=t.remote_filter, qos=min(t.qos, self.broker.config.max_qos), no_local=v5,
            retain_as_published=v5, retain_handling=1 if v5 else 0) for t in incoming)
        # A kept session still holds the subscriptions of topics since changed to out: the remote
        # would send (and queue while the bridge is away) what the bridge only drops.
        subscribed = {r.topic_filter for r in requests}
        stale = () if not self.config.bridge_attempt_unsubscribe else tuple(dict.fromkeys(
            t.remote_filter for t in self.config.topic if not t.incoming and t.remote_filter not in subscribed))
        held = (self.address, requests, stale)
        if new_session:
            stale = ()
        elif connack.session_present and held == self._held_at_remote:
            # A SUBSCRIBE would bring the remote's retained messages again: Mosquitto sends a
            # bridge back those it sent, older maybe than one retained here while it was away.
            requests, stale = (), ()
        if requests or stale:
            self._held_at_remote, self._subscribing = None, held
            # Nothing new of ours goes to the remote before the local link opens, which waits for
            # the SUBACKs and UNSUBACKs; but a resumed session's QoS 2 messages to it (their ids
            # the local session's, as they cross) hold their ids until they end.
            session = self.broker.sessions.get(self.config.local_client_id)
            ids = _free_ids(session.outgoing if session is not None else (), len(requests) + len(stale))
            packets: list[Packet] = [Subscribe(packet_id=n, subscriptions=(request,))
                                     for n, request in zip(ids, requests)]
            packets += [Unsubscribe(packet_id=n, topic_filters=(topic_filter,))
                        for n, topic_filter in zip(ids[len(requests):], stale)]
            sent = self._send_all(link, packets)
            if sent:
                self._pending_acks = sent
        else:
            link.hold()  # what comes before the local link is up stays in the reader
            self._open_local()

    def _forget_remote_qos2(self) -> None:
        """The remote starts a new session: it sends no PUBREL for the QoS 2 messages it sent
        before, and may use their packet ids again, for new messages that this broker would take
        for resends and not route [MQTT-4.3.3-9]. (The ids are the remote's, kept by the bridge's
        session here.)"""
        self._lowered_in.clear()
        session = self.broker.sessions.get(self.config.local_client_id)
        if session is not None:
            for packet_id in list(session.awaiting_pubrel):
                self.broker.delivery.pubrel_received(session, packet_id)

    def _open_local(self) -> None:
        self.local = self._local_link(self._local_up, self._from_local, self._lost)

    def _local_link(self, connected: Callable[[Link, Connack], None], receive: Callable[[Link, Packet], None],
                    lost: Callable[[Link, str], None]) -> Link:
        """A client connection to this broker, in memory, that resumes the bridge's session."""
        from ..auth import Identity
        from ..auth.acl import Unrestricted
        from ..protocol import MQTTProtocol
        config = self.config
        broker = self.broker
        server = MQTTProtocol(broker, self.clock)
        server._own = self.connection
        if broker.security is not None:
            # The bridge's session is the broker's own: the ACLs of clients do not apply to it.
            server.identity = Identity(client_id=config.local_client_id, username=None, rules=Unrestricted())
        connect = Connect(protocol_level=MQTT_5, clean_start=False, client_id=config.local_client_id,
                          properties={"session_expiry_interval": 0xFFFFFFFF,
                                      "receive_maximum": min(self._remote_receive, 65535)})
        # (It reads what this broker took already: an MQTT 3 client's largest PUBLISH is a byte
        # longer in the session's MQTT 5, which a reader of max_packet_size failed on.)
        link = Link("local", connect, self.clock, MAX_PACKET_SIZE, connected, receive, lost)
        pipe(self.clock, server, link, self.connection)
        return link

    def _prime(self) -> None:
        """Make the bridge's session here, subscribed to the out topics, as the bridge starts
        rather than once the remote is first reached: what is published before then is to wait
        in it too, as in any outage. One write (CONNECT, the subscriptions, DISCONNECT) does it,
        within the reactor's first turn, before any client can have published (unless a connect
        hook delays the CONNECT). The session is left as in an outage, for the local link to
        resume; Retain Handling 2, as that link's subscriptions send the retained messages. In a
        cluster, a session not here may be another node's: the link claims it, and the first
        connection to the remote waits for its CONNACK."""
        subscribed = {(s.topic_filter, s.qos, s.no_local, s.retain_as_published)
                      for s in self.broker.subscriptions_of(self.config.local_client_id)}
        wanted = {(r.topic_filter, min(r.qos, self.broker.config.max_qos), r.no_local, r.retain_as_published)
                  for r in self._requests(retain_handling=2)}
        in_cluster = self.broker.cluster is not None
        if subscribed == wanted and (self._kept_here or not in_cluster):
            return  # (restored from the store as it is to be, or nothing goes out)
        link = self._local_link(self._primed_up, self._primed, self._primed_lost)
        if in_cluster and not self._kept_here:  # (another node may hold it: the link claims it)
            self._priming = link
        for packet in self._subscription_changes(retain_handling=2):
            link.send(packet)
        link.send(Disconnect())

    def _claim_unknown(self) -> bool:
        """Whether, in a cluster, the bridge's session is not known to be this node's: it may be
        another node's, which goes with the remote's, and the remote's is not to be started anew
        (nor resumed by a new session here) until a claim says which."""
        return (self.broker.cluster is not None and not self._kept_here
                and self.config.local_client_id not in self.broker.sessions)

    def _primed_up(self, link: Link, connack: Connack) -> None:
        """The priming link's claim answered: whether the session was there says whether the
        remote's goes with it."""
        if link is self._priming:
            self._kept_here = connack.session_present
            self._first_connect()

    def _first_connect(self) -> None:
        """The session here is known: the first connection to the remote may go."""
        self._priming = None
        self._connect()

    def _primed(self, link: Link, packet: Packet) -> None:
        if isinstance(packet, (Suback, Unsuback)):
            self._log_refusals(link, packet)

    def _primed_lost(self, link: Link, why: str) -> None:
        if link is self._priming:  # (refused, a claim that Redis did not answer in time, say)
            if self._claim_unknown():  # claimed again after the back-off (see ``_connect``)
                self._priming = None
                self._failed(f"its session here was not claimed: {why}", next_address=False)
                return
            self._first_connect()
        subscribed = {s.topic_filter for s in self.broker.subscriptions_of(self.config.local_client_id)}
        missing = sorted(set(self._out_filters()) - subscribed)
        if missing and self.local is None:  # (the session is being resumed otherwise: the link subscribes)
            log.warn("bridge {name}: its session here is not subscribed to {filters} ({why}): what is "
                     "published there before the first link is up is not sent", name=self.connection,
                     filters=", ".join(missing), why=why)

    def _out_filters(self) -> dict[str, BridgeTopic]:
        """The local filters of the out topics, with the last line of each: its QoS is the
        session's, as in Mosquitto, whose later subscription of a filter replaces the earlier."""
        return {line.local_filter: line for line in self.config.topic if line.outgoing}

    def _subscription_changes(self, retain_handling: int) -> list[Packet]:
        """What makes the session's subscriptions those of the out topics: an UNSUBSCRIBE of each
        of those of topics no longer bridged, a SUBSCRIBE of each out topic (one filter a packet,
        as Mosquitto's bridge sends them: together, they may be larger than a server takes)."""
        wanted = self._out_filters()
        stale = [s.topic_filter for s in self.broker.subscriptions_of(self.config.local_client_id)
                 if s.topic_filter not in wanted]
        requests = self._requests(retain_handling)
        # (Not the ids of the remote's QoS 2 messages this broker awaits the PUBREL of.)
        session = self.broker.sessions.get(self.config.local_client_id)
        ids = _free_ids(session.awaiting_pubrel if session is not None else (), len(stale) + len(requests))
        changes: list[Packet] = [Unsubscribe(packet_id=n, topic_filters=(topic_filter,))
                                 for n, topic_filter in zip(ids, stale)]
        changes += [Subscribe(packet_id=n, subscriptions=(request,)) for n, request in zip(ids[len(stale):], requests)]
        return changes

    def _send_all(self, link: Link, packets: list[Packet]) -> int:
        """Send the packets of a link's start; how many went: 0 if one is larger than the server
        takes, alone as it is, and the link is closed, saying so (it would wait for the answer
        for good)."""
        for packet in packets:
            if not link.send(packet):
                why = f"a {type(packet).__name__.upper()} of one filter is larger than the server's maximum packet size"
                log.warn("bridge {name}: {why}: the link is closed", name=self.connection, why=why)
                link.close(why)
                return 0
        return len(packets)

    def _requests(self, retain_handling: int) -> tuple[SubscriptionRequest, ...]:
        """The subscriptions of the out topics, as the session is to hold them."""
        return tuple(SubscriptionRequest(
            topic_filter=topic_filter, qos=min(line.qos, self._remote_max_qos), no_local=True,
            retain_as_published=self.config.bridge_outgoing_retain, retain_handling=retain_handling)
            for topic_filter, line in self._out_filters().items())

    def _local_up(self, link: Link, connack: Connack) -> None:
        """CONNACK from this broker: make the session's subscriptions those of the out topics."""
        self._local_receive = connack.properties.get("receive_maximum", 65535)
        changes = self._subscription_changes(retain_handling=0)
        if not changes:
            self._both_up()
        elif self._send_all(link, changes):
            self._pending_acks = len(changes)

    def _both_up(self) -> None:
        assert self.remote is not None and self.local is not None
        self._attempt = 0
        self.stats.connects += 1
        self.last_error = ""
        self._set_state("connected")
        log.info("bridge {name} connected to {address}", name=self.connection, address=self.address)
        config = self.config
        if config.notifications and not config.notifications_local_only:
            self.remote.send(Publish(topic=config.state_topic, payload=b"1", qos=0,
                                     retain=self._remote_retain))
        early, self._early = self._early, []
        for packet, since in early:
            self._from_remote(self.remote, packet, since)
        self.remote.release()

    # --- forwarding ---------------------------------------------------------------------

    def _from_remote(self, link: Link, packet: Packet, since: float | None = None) -> None:
        """``since``: when it came, held until the local link was up (what it waited is gone of
        its expiry)."""
        local = self.local
        if local is None or not local.up or self._pending_acks:
            if isinstance(packet, (Suback, Unsuback)) and self._pending_acks and local is None:
                self._subscribed(link, packet)
            else:
                self._early.append((packet, self.clock.seconds() if since is None else since))
            return
        if isinstance(packet, Puback) and packet.packet_id in self._lowered:
            if packet.reason_code >= 0x80:  # (a PUBREC that refuses ends the exchange: no PUBREL comes)
                del self._lowered[packet.packet_id]
            local.send(Pubrec(packet_id=packet.packet_id, reason_code=packet.reason_code))  # (QoS 2 here)
        elif isinstance(packet, Pubrel) and packet.packet_id in self._lowered_in:
            self._lowered_in.discard(packet.packet_id)
            link.send(Pubcomp(packet_id=packet.packet_id))  # (this broker had it at QoS 0 or 1: done)
        elif isinstance(packet, Publish):
            limit = self.broker.config.max_packet_size
            if packet.frame is not None and len(packet.frame) > limit:  # (an MQTT 3 remote)
                self._refuse(link, packet, f"larger than max_packet_size ({limit})")
                return
            topic = self.config.to_local(packet.topic)
            if topic is None:
                self._refuse(link, packet)
                return
            problem = mapped_problem(topic)
            if problem is not None:  # this broker would close the link for it, and it would come again
                self._refuse(link, packet, problem)
                return
            # Above max_qos, this broker would close the link for it (0x9B), and it would come
            # again at each reconnection: the remote's session may have subscribed at QoS 2
            # before max_qos was lowered.
            qos = min(packet.qos, self.broker.config.max_qos)
            if not qos and packet.properties.get("payload_format_indicator") == 1 and not is_utf8(packet.payload):
                # (This broker would close the link for it, 0x99; at QoS 1/2 its refusal goes back.)
                self._refuse(link, packet, "a payload that is not the UTF-8 its format indicator says")
                return
            self.stats.messages_in += 1
            # Retained only where this broker keeps retained messages: it closes the link for one
            # otherwise, and the remote would send it again at each reconnection.
            message = self._crossing(packet, topic, packet.retain and self.broker.config.retain_available, MQTT_5, qos)
            if qos < packet.qos:
                self._lowered_taken(link, packet, qos)
            if self._waiting or (qos and len(self._inbound) >= self._local_receive):
                self._wait(message, since)
            else:
                self._send_in(local, message, since)
        elif isinstance(packet, _ACKS):
            local.send(self._ack(packet, local.version))

    def _from_local(self, link: Link, packet: Packet) -> None:
        if isinstance(packet, (Suback, Unsuback)):
            self._subscribed(link, packet)
            return
        remote = self.remote
        if remote is None or not remote.up:
            return  # both links go down together: the session keeps it for the next time
        if isinstance(packet, Publish):
            topic = self.config.to_remote(packet.topic)
            if topic is None:
                self._refuse(link, packet)
                return
            problem = mapped_problem(topic)
            if problem is not None:  # the remote would close the link for it, and it would go again
                self._refuse(link, packet, problem)
                return
            # A retained message or a packet the remote refuses would make it close the link,
            # and the message come again when it reconnects: retain is dropped, and the packet.
            retain = packet.retain and self.config.bridge_outgoing_retain and self._remote_retain
            crossing = self._crossing(packet, topic, retain, remote.version, self._remote_max_qos)
            if remote.send(crossing):
                self.stats.messages_out += 1
                if crossing.qos < packet.qos:
                    self._lowered_sent(link, packet, crossing.qos)
                else:
                    self._lowered.pop(packet.packet_id, None)
            else:
                self._refuse(link, packet, f"larger than the remote takes ({remote.max_send_size} bytes)")
        elif isinstance(packet, Pubrel) and self._lowered.pop(packet.packet_id, None) is not None:
            link.send(Pubcomp(packet_id=packet.packet_id))  # (the remote had it at QoS 0 or 1: done)
        elif isinstance(packet, Puback) and packet.packet_id in self._lowered_in:
            self._completed(packet.packet_id)
            code = packet.reason_code if remote.version == MQTT_5 else 0
            if code >= 0x80:  # (a PUBREC that refuses ends the exchange: no PUBREL comes)
                self._lowered_in.discard(packet.packet_id)
            remote.send(Pubrec(packet_id=packet.packet_id, reason_code=code))
        elif isinstance(packet, _ACKS):
            if isinstance(packet, (Puback, Pubcomp)) or (isinstance(packet, Pubrec) and packet.reason_code >= 0x80):
                self._completed(packet.packet_id)
            remote.send(self._ack(packet, remote.version))

    def _lowered_sent(self, link: Link, packet: Publish, qos: int) -> None:
        """A message of the session sent at the remote's lower Maximum QoS: what the remote will
        not acknowledge is acknowledged here (at QoS 0, at once, as the remote takes no more), so
        that it does not stay in flight in the session for good."""
        if qos == 0:
            if packet.qos == 1:
                link.send(Puback(packet_id=packet.packet_id))
                return
            link.send(Pubrec(packet_id=packet.packet_id))
        self._lowered[packet.packet_id] = qos  # (QoS 2 here: its PUBREL is answered here)

    def _lowered_taken(self, link: Link, packet: Publish, qos: int) -> None:
        """A message of the remote taken at this broker's lower ``max_qos``: what this broker
        will not acknowledge is acknowledged here (at QoS 0, at once), so that the remote's
        exchange ends."""
        if qos == 0:
            if packet.qos == 1:
                link.send(Puback(packet_id=packet.packet_id))
                return
            link.send(Pubrec(packet_id=packet.packet_id))
        self._lowered_in.add(packet.packet_id)  # (QoS 2 there: its PUBREL is answered here)

    def _send_in(self, local: Link, message: Publish, since: float | None = None) -> None:
        """``since``: the time it came, having waited for a slot: that long is gone of its Message
        Expiry Interval [MQTT-3.3.2-6], and one whose interval ran out goes no further [MQTT-3.3.2-5].
        At QoS 0, past max_held_bytes that this broker has not read yet, it is dropped and counted
        (as what waits for a slot past MAX_WAITING)."""
        interval = message.properties.get("message_expiry_interval")
        if since is not None and interval is not None:
            left = interval - (self.clock.seconds() - since)
            if left <= 0:
                assert self.remote is not None
                self._refuse(self.remote, message, "its message expiry interval ran out while it waited")
                return
            message.properties = {**message.properties, "message_expiry_interval": math.ceil(left - 0.001)}
        pipe: Any = local.transport
        if not message.qos and not pipe.peer.reading and pipe.buffered > self.broker.config.max_held_bytes:
            # This broker reads the session no more for now (its disk is behind, a hook decides)
            # and the pipe has no bound. (While it reads, what goes in within a turn, however
            # much, is read in the next.) Not reading the remote instead would stall both ways
            # with a remote that stops reading a bridge that does not read (as this broker does),
            # once this broker's writes to it fill up too: until the keepalive ends the links.
            self.stats.dropped += 1
            return
        if not local.send(message):
            assert self.remote is not None
            self._refuse(self.remote, message, f"larger than this broker's maximum packet size ({local.max_send_size})")
        elif message.qos:
            self._inbound.add(message.packet_id)

    def _wait(self, message: Publish, since: float | None = None) -> None:
        """This broker's Receive Maximum is reached: the message waits for a slot. The remote's
        own window bounds what waits at QoS 1 and 2; at QoS 0, past MAX_WAITING it is dropped."""
        if not message.qos and len(self._waiting) >= MAX_WAITING:
            self.stats.dropped += 1
            return
        self._waiting.append((message, self.clock.seconds() if since is None else since))

    def _completed(self, packet_id: int) -> None:
        self._inbound.discard(packet_id)
        waiting, local = self._waiting, self.local
        while waiting and local is not None and (not waiting[0][0].qos or len(self._inbound) < self._local_receive):
            self._send_in(local, *waiting.popleft())

    def _subscribed(self, link: Link, packet: Suback | Unsuback) -> None:
        self._log_refusals(link, packet)
        if link is self.remote and any(code >= 0x80 for code in packet.reason_codes):
            self._subscribing = None  # (to be tried again at the next connection)
        self._pending_acks -= 1
        if self._pending_acks:
            return
        if link is self.remote:
            self._held_at_remote, self._subscribing = self._subscribing, None
            link.hold()  # what comes before the local link is up stays in the reader
            self._open_local()
        else:
            self._both_up()

    def _log_refusals(self, link: Link, packet: Suback | Unsuback) -> None:
        refused = [code for code in packet.reason_codes if code >= 0x80] if isinstance(packet, Suback) else []
        if refused:
            log.warn("bridge {name}: the {side} broker refused {count} subscription(s) (0x{code:02x})",
                     name=self.connection, side=link.name, count=len(refused), code=refused[0])

    @staticmethod
    def _crossing(packet: Publish, topic: str, retain: bool, version: int, max_qos: int) -> Publish:
        properties = packet.properties
        if version != MQTT_5:
            properties = {}
        elif any(key in properties for key in _HOP_PROPERTIES):
            properties = {k: v for k, v in properties.items() if k not in _HOP_PROPERTIES}
        qos = min(packet.qos, max_qos)
        return Publish(topic, packet.payload, qos, retain, packet.dup and qos > 0, packet.packet_id if qos else 0,
                       properties)

    @staticmethod
    def _ack(packet: Puback | Pubrec | Pubrel | Pubcomp, version: int) -> Packet:
        code = packet.reason_code if version == MQTT_5 else 0
        return type(packet)(packet_id=packet.packet_id, reason_code=code)

    def _refuse(self, link: Link, packet: Publish, why: str = "no topic line sends it on") -> None:
        """A message that cannot cross (no topic line maps it, say): acknowledged to its sender
        and dropped; logged the first time, then ``once_per_thousand`` (a client here, or the
        remote, may send such messages by the thousand a second)."""
        self.stats.dropped += 1
        self._refused += 1
        if once_per_thousand(self._refused):
            log.info("bridge {name}: {topic!r} dropped: {why} ({refused} that could not cross; logged once per "
                     "thousand)", name=self.connection, topic=shortened(packet.topic), why=why, refused=self._refused)
        if packet.qos == 1 and link is self.remote and packet.packet_id in self._lowered_in:
            link.send(Pubrec(packet_id=packet.packet_id))  # (QoS 2 there, taken at QoS 1 here)
        elif packet.qos == 1:
            link.send(Puback(packet_id=packet.packet_id))
        elif packet.qos == 2:
            link.send(Pubrec(packet_id=packet.packet_id))
            # its PUBREL is answered as any unknown one: by forwarding it, as a PUBCOMP comes back

    # --- back-pressure ------------------------------------------------------------------

    def _remote_paused(self, paused: bool) -> None:
        """The remote's socket is full: stop this broker writing to the bridge's session (it
        holds up to max_held_bytes, then queues)."""
        local = self.local
        if local is None or local.transport is None:
            return
        producer = local.transport.peer.producer  # type: ignore[attr-defined]
        if producer is not None:
            producer.pauseProducing() if paused else producer.resumeProducing()

    # --- losing the links ---------------------------------------------------------------

    def _lost(self, link: Link, why: str) -> None:
        if link is self.remote:
            self.remote = None
            if link.refused == ReasonCode.RETAIN_NOT_SUPPORTED:
                self._remote_retain = False  # the will of the next CONNECT is not retained
            elif link.refused == ReasonCode.QOS_NOT_SUPPORTED:
                self._will_qos = 0  # (a remote of Maximum QoS 0: the will at QoS 1 was refused)
            elif link.refused == 0x01 and link.connect.bridge:
                self._private = False  # (refused for try_private's bit, as Mosquitto: tried without it)
            elif link.refused == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION and link.version == MQTT_5:
                log.info("bridge {name}: {address} does not speak MQTT 5; connecting with 3.1.1",
                         name=self.connection, address=self.address)
                self._version = MQTT_3_1_1  # as Mosquitto's bridge: at once, and from then on
                self._restarting = True
        elif link is self.local:
            self.local = None
        else:
            return
        if not self._restarting and self.state == "connected" and (self.remote is not None or self.local is not None):
            # The first of the two to break: which it was goes into the one line _failed logs.
            why = f"{link.name} link closed: {why}"
        self._close_links(why)
        if self.remote is None and self.local is None:
            self._down(why)

    def _close_links(self, why: str, disconnect: bool = False) -> None:
        for link in (self.remote, self.local):
            if link is not None:
                link.close(why, disconnect)

    def _down(self, why: str) -> None:
        was_connected = self.state == "connected"
        self._early = []
        self._inbound.clear()
        self._waiting.clear()
        self._pending_acks = 0
        restarting, self._restarting = self._restarting, False
        if not self.running:
            self._set_state("stopped")
        elif restarting:
            self._set_state("waiting")
            self._retry_call = self.clock.callLater(0, self._connect)
        else:
            self._failed(why, next_address=not was_connected)

    def _failed(self, why: str, next_address: bool = True) -> None:
        """Wait, then connect again (to the next address unless a link that worked broke)."""
        self.stats.failures += 1
        self.last_error = why
        self._attempt += 1
        if next_address:
            self._address_index += 1
        else:
            self._address_index = 0
        log.warn("bridge {name}: {why}", name=self.connection, why=why)
        base, cap = self.config.restart_timeout
        # Exponential back-off with jitter over the upper half of each step; the exponent stops
        # growing long after the cap is reached, as a float would overflow past 2 ** 1023.
        ceiling = min(cap, base * 2 ** min(self._attempt - 1, 64))
        delay = base if base == cap else random.uniform(max(base, ceiling / 2), ceiling)
        self._set_state("waiting")
        self._retry_call = self.clock.callLater(delay, self._connect)

    def _cancel_retry(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

    def _set_state(self, state: str) -> None:
        previous, self.state = self.state, state
        up = state == "connected"
        if self.config.notifications and (previous == "connected") != up:
            self._publish_state(b"1" if up else b"0")

    def _publish_state(self, state: bytes) -> None:
        # At QoS 1, as Mosquitto: a session that subscribed at QoS 1 keeps the change while away.
        self.broker.route_own(self.config.state_topic, state, qos=min(1, self.broker.config.max_qos), retain=True)


def _free_ids(in_use: Collection[int], count: int) -> list[int]:
    """``count`` packet ids from 1 on that no exchange holds [MQTT-2.2.1-3]."""
    ids: list[int] = []
    n = 0
    while len(ids) < count:
        n += 1
        if n not in in_use:
            ids.append(n)
    return ids


class Bridges:
    """The broker's bridges, by connection name."""

    def __init__(self, broker: Any, configs: list[BridgeConfig], reactor: Any, clock: IReactorTime) -> None:
        self.by_name = {c.connection: Bridge(broker, c, reactor, clock) for c in configs}
        if broker.cluster is not None:
            _Leased(self, broker.cluster.leases).setServiceParent(broker)
            return
        for bridge in self.by_name.values():
            bridge.setServiceParent(broker)

    def __iter__(self) -> Iterator[Bridge]:
        return iter(self.by_name.values())

    def get(self, name: str) -> Bridge | None:
        return self.by_name.get(name)

    def holds(self, client_id: str) -> bool:
        """Whether the session of ``client_id`` here is a bridge's (``local_clientid``)."""
        return any(bridge.config.local_client_id == client_id for bridge in self)


class _Leased(Service):
    """A cluster's bridges: each runs on the node that holds its lease (see
    :mod:`mqtt_broker.cluster.leases`), one node at a time, as two nodes running it would send
    each message across once each, or take its sessions from each other. Its session here is a
    cluster session: the node that starts the bridge claims it as a client's connection would."""

    def __init__(self, bridges: Bridges, leases: Any) -> None:
        self.bridges = bridges
        self.leases = leases

    def startService(self) -> None:
        super().startService()
        for bridge in self.bridges:
            name = f"bridge:{bridge.connection}"
            if bridge.config.notifications:
                self.leases.guard_retained(name, bridge.config.state_topic)
            self.leases.want(name, lambda held, bridge=bridge: self._leased(bridge, held))

    def _leased(self, bridge: Bridge, held: bool) -> None:
        if held and self.running and not bridge.running:
            log.info("bridge {name}: runs on this node of the cluster from now on", name=bridge.connection)
            bridge.startService()
        elif not held and bridge.running:
            log.info("bridge {name}: stopped on this node, whose lease of it ended", name=bridge.connection)
            bridge.stopService()
            topic = bridge.config.state_topic
            if self.running and bridge.config.notifications and topic.startswith("$SYS/"):
                # Each node's own: this one's "0" would tell its clients the bridge is down while
                # another node runs it. The node running it tells its own.
                bridge.broker.route_own(topic, b"", retain=True)

    def stopService(self) -> None:
        super().stopService()
        for bridge in self.bridges:
            if bridge.running:
                bridge.stopService()


__all__ = ["Bridge", "BridgeConfig", "BridgeConfigError", "BridgeTopic", "Bridges"]

"""MQTT over WebSocket (chapter 6 of MQTT 3.1.1 and 5.0): a transport that only moves bytes.

Each WebSocket connection carries one :class:`~mqtt_broker.protocol.MQTTProtocol`, built by the
broker's own factory, so every feature behaves as over TCP. The payload of every binary frame goes
to its ``dataReceived`` as it arrives (MQTT packets may span frames and a frame may hold several:
the MQTT frame reader does the framing [MQTT-6.0.0-2]); each of its ``transport.write`` calls goes
out as one binary frame, or one per MESSAGE_SIZE bytes when it is larger. A text frame closes the
connection [MQTT-6.0.0-1].

autobahn does the opening and closing handshakes, ping/pong, frame parsing and permessage-deflate.
Around it this module adds what a broker needs: subprotocol ``mqtt`` (``mqttv3.1`` for 3.1
clients) required [MQTT-6.0.0-3, -4], optional request paths, bounded handshake size and time,
X-Forwarded-For from trusted proxies only, the broker's connection limit (as sockets are accepted;
HTTP 503 for a site's connections), and back-pressure: MQTTProtocol registers itself as the push
producer of the socket underneath, so a slow WebSocket subscriber is paused and queued exactly
like a slow TCP one.

Two ways in: :class:`WebSocketFactory` for an endpoint (``BrokerService`` builds one for
``websocket_endpoints``), and :class:`WebSocketResource` to mount in a ``twisted.web`` site.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any, Iterable, Sequence

from autobahn.twisted.resource import WebSocketResource as _AutobahnResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket import USES_NVX
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.xormasker import create_xor_masker
from autobahn.util import encode_truncate
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .broker import RefusedConnection
from .connecting import describe
from .deadlines import cancel
from .logged import shortened
from .protocol import LARGE_PACKET_PROGRESS
from .stats import once_per_thousand

log = Logger()

SUBPROTOCOLS = ("mqtt", "mqttv3.1")
"""The WebSocket subprotocols of MQTT: ``mqtt`` (3.1.1 and 5.0), ``mqttv3.1`` (3.1)."""

CLOSE_TIMEOUT = 5.0
"""Seconds the peer has to answer our close frame before the socket is dropped."""
CLOSING_PONGS = 8
"""Pings answered while the broker waits for the client's close frame (the rest are not: one
that pings on meanwhile is given no growing backlog of pongs to hold)."""

MESSAGE_SIZE = 65536
"""The most MQTT bytes the broker sends in one WebSocket message. A client may bound a message
(Python's websockets at 1 MiB, Netty at 64 KiB) and close with 1009 past it, while the output
of one turn may be over a MiB (what a SUBSCRIBE's retained messages or a slow subscriber's held
ones make): it goes out in several messages, as MQTT packets may span them [MQTT-6.0.0-2]."""

_GATHER = 65536
"""Frames up to this payload size that a read cuts wait whole for their end; larger ones stream."""

_OPEN = WebSocketServerProtocol.STATE_OPEN
_CONNECTING = WebSocketServerProtocol.STATE_CONNECTING
_CLOSING = WebSocketServerProtocol.STATE_CLOSING
_CLOSED = WebSocketServerProtocol.STATE_CLOSED
_UNSUPPORTED_DATA = WebSocketServerProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA
_NORMAL = WebSocketServerProtocol.CLOSE_STATUS_CODE_NORMAL
_GOING_AWAY = WebSocketServerProtocol.CLOSE_STATUS_CODE_GOING_AWAY

# Server frames are not masked [RFC 6455 5.1], so a binary frame is a 2, 4 or 10 byte header and
# the payload as it is: cheap enough to build here instead of through autobahn's sendMessage.
_SHORT_HEADERS = [bytes((0x82, n)) for n in range(126)]


def frame_header(length: int) -> bytes:
    """The header of a final, unmasked binary frame of ``length`` payload bytes."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 65536:
        return b"\x82\x7e" + length.to_bytes(2, "big")
    return b"\x82\x7f" + length.to_bytes(8, "big")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: IAddress, forwarded_for: str | None, trusted: Sequence[Network]) -> IAddress:
    """The address of the client behind ``peer``.

    Only when ``peer`` is a trusted proxy does X-Forwarded-For count: its addresses are read
    from the right (the one the nearest proxy added) past trusted proxies, and the first that is
    not one is the client (all trusted: the left-most). Anything that is not an IP address ends
    the walk, so a client cannot hide behind a forged left part of the header. Returns ``peer``
    when the header does not apply; otherwise an address with port 0 (the header has no port).
    """
    host = getattr(peer, "host", None)
    if not trusted or not forwarded_for or host is None or not _is_trusted(host, trusted):
        return peer
    chosen: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    for entry in reversed(forwarded_for.split(",")):
        try:
            address = _unmapped(ipaddress.ip_address(entry.strip()))
        except ValueError:
            break
        chosen = address
        if not any(address in network for network in trusted):
            break
    if chosen is None:
        return peer
    if chosen.version == 6:
        return IPv6Address("TCP", str(chosen), 0)
    return IPv4Address("TCP", str(chosen), 0)


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``::ffff:10.0.0.1`` (an IPv4 peer on a dual-stack socket) as ``10.0.0.1``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask``: as one big integer below 1 KiB (0.5 us for
    64 bytes, against 3 us for a call into autobahn's native masker), natively above."""
    n = len(payload)
    if n > 1024 and USES_NVX:
        return create_xor_masker(mask, n).process(payload)  # type: ignore[no-any-return]
    key = int.from_bytes((mask * ((n >> 2) + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def _is_trusted(host: str, trusted: Sequence[Network]) -> bool:
    try:
        address = _unmapped(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return False
    return any(address in network for network in trusted)


@implementer(ITransport, IConsumer, IPushProducer)
class WebSocketTransport:
    """The transport an MQTTProtocol sees on a WebSocket connection.

    Writes become binary frames of MESSAGE_SIZE bytes at most (nothing is sent once the closing
    handshake has begun, as RFC 6455 5.5.1 requires); producer registration, pausing the input
    and TCP options go to the socket underneath; ``loseConnection`` starts the closing handshake,
    ``abortConnection`` drops the socket. ``getPeer`` is the client's address (from
    X-Forwarded-For behind a trusted proxy).
    """

    __slots__ = ("_websocket", "socket", "_peer")

    closing_handshake = True
    """``loseConnection`` lingers by itself (see :func:`mqtt_broker.linger.close_lingering`): the
    closing handshake reads on until the client's close frame, for at most CLOSE_TIMEOUT."""

    def __init__(self, websocket: MQTTWebSocketProtocol, socket: Any, peer: IAddress) -> None:
        self._websocket = websocket
        self.socket = socket
        """The transport the frames go to: TCP's, or TLS's over it."""
        self._peer = peer

    @property
    def disconnecting(self) -> bool:
        return bool(self._websocket.state != _OPEN)

    def write(self, data: bytes) -> None:
        websocket = self._websocket
        if websocket.state != _OPEN:
            return
        if websocket._perMessageCompress is not None:
            for start in range(0, len(data), MESSAGE_SIZE):
                websocket.sendMessage(data[start:start + MESSAGE_SIZE], isBinary=True)
        elif len(data) <= MESSAGE_SIZE:
            self.socket.write(frame_header(len(data)) + data)
        else:  # one message per MESSAGE_SIZE bytes
            pieces: list[bytes] = []
            for start in range(0, len(data), MESSAGE_SIZE):
                piece = data[start:start + MESSAGE_SIZE]
                pieces += (frame_header(len(piece)), piece)
            self.socket.writeSequence(pieces)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._websocket.close(_NORMAL)

    def abortConnection(self) -> None:
        self._websocket.dropConnection(abort=True)

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        return self.socket.getHost()  # type: ignore[no-any-return]

    # TLS: client certificate authentication sees the same as on an ssl: endpoint (a plain
    # socket raises AttributeError for both, as a TCP transport does).
    def getPeerCertificate(self) -> Any:
        return self.socket.getPeerCertificate()

    def getHandle(self) -> Any:
        return self.socket.getHandle()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.socket.setTcpNoDelay(enabled)

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getTcpNoDelay())

    # IConsumer: the MQTT protocol is the producer of what the socket sends.
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.socket.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.socket.unregisterProducer()

    # IPushProducer: the MQTT protocol pauses its input while a hook decides.
    def pauseProducing(self) -> None:
        self.socket.pauseProducing()

    def resumeProducing(self) -> None:
        self.socket.resumeProducing()

    def stopProducing(self) -> None:
        self.socket.stopProducing()


class MQTTWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket connection, carrying one MQTTProtocol once the opening handshake is done."""

    factory: WebSocketFactory
    maxFramePayloadSize: int  # copied from the factory's protocol options by autobahn
    _closing_pongs = 0  # (on the instance only once it closes)
    _refusal: str | None = None
    """Why onConnect refused the handshake, as failHandshake logs it (its reason is the HTTP
    status's)."""

    def __init__(self) -> None:
        super().__init__()
        self.mqtt: Any = None
        """The MQTTProtocol inside, from the handshake on; None before or when refused."""
        self._peer: IAddress | None = None
        self._handshake_call: Any = None
        self._close_call: Any = None
        self._mqtt_closed_it = False
        self._mqtt_lost = False
        self._without_mqtt = False
        """Whether this socket is counted in the broker's ``websockets_without_mqtt``."""
        self.message_data_total_length = 0  # autobahn sets it per message; the fast path does not

    # --- the opening handshake ----------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._count_without_mqtt(True)
        timeout = self.factory.handshake_timeout
        if timeout:
            # From the moment the socket is accepted, so a stalled TLS handshake counts too.
            self._handshake_call = self.factory.broker.clock.callLater(timeout, self._handshake_timed_out)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """autobahn's, but for its log line, which has ``reason`` whole and as it is, with what the
        client sent in it (header values of up to websocket_max_handshake_size, Latin-1 decoded:
        control characters too). Logged here quoted and cut, the first time, then
        ``once_per_thousand`` on the listener: any client may fail handshakes by the thousand a
        second."""
        factory = self.factory
        factory.refused += 1
        if once_per_thousand(factory.refused):
            log.info("refusing a WebSocket connection from {peer}: {why} ({refused} refused on this listener; "
                     "logged once per thousand)", peer=self._where(),
                     why=self._refusal or repr(shortened(reason)), refused=factory.refused)
        self.wasNotCleanReason = reason
        # The headers HTTP requires of these answers [RFC 9110 15.5.6, 15.5.22].
        required = {405: [("Allow", "GET")], 426: [("Upgrade", "websocket")]}.get(code, [])
        self.sendHttpErrorResponse(code, reason, [*(responseHeaders or []), *required])
        self.dropConnection(abort=False)
        # The socket is closed once the answer is out, over TLS once the client answers the
        # close_notify, which it may never do: the close timer bounds the wait.
        self._bound_the_close()

    def dataReceived(self, data: bytes) -> None:
        if self.state == _OPEN and self.current_frame is None and self._perMessageCompress is None:
            self._receive_frames(data)
            return
        if self.state == _CLOSED:
            # Refused, or closed: over TLS the socket is read until the client's close_notify,
            # and nothing of what comes meanwhile is for anyone.
            self.data = b""
            return
        if self.state == _CONNECTING:
            limit = self.factory.max_handshake_size
            if len(self.data) + len(data) > limit and (self.data + data).find(b"\r\n\r\n", 0, limit) < 0:
                # Bounded before it is buffered, as h11 bounds an incomplete event.
                self.data = b""
                self.failHandshake("Request Header Fields Too Large", 431)
                return
        self._dataReceived(data)  # autobahn's own dataReceived formats a debug line per read

    def processHandshake(self) -> None:
        end = self.data.find(b"\r\n\r\n")
        if end >= 0:
            self.data = _one_extensions_line(self.data[:end]) + self.data[end:]
        super().processHandshake()

    def _receive_frames(self, data: bytes) -> None:
        """The hot path: whole, masked, uncompressed binary frames (and continuations of a binary
        message autobahn began) are unmasked here and handed to MQTT in one call per read, so that MQTT handles
        and answers them together as it does a TCP read; a frame cut by the end of the read waits
        here for its end when it is small. Anything else (a control or text frame, a large frame
        to stream, one autobahn must refuse) ends the loop and autobahn takes the rest, in order.
        About 1 us per frame, against autobahn's 10."""
        buffer = self.data + data if self.data else data
        end = len(buffer)
        offset = 0
        inside = self.inside_message
        limit = self.maxFramePayloadSize
        payloads = []
        wait = True  # for more bytes (True), or let autobahn take what is left (False)
        while end - offset >= 2:
            first = buffer[offset]
            second = buffer[offset + 1]
            # A whole binary message (FIN, opcode 2), or any continuation (opcode 0) inside one;
            # no RSV bit; the mask bit [RFC 6455 5.2]. autobahn begins a fragmented message: it
            # keeps state for the message, which it needs if it takes one of the later frames.
            if (first & 0x7F if inside else first ^ 0x82) or second < 0x80:
                wait = False
                break
            length = second & 0x7F
            if length < 126:
                start = offset + 6
            elif length == 126:
                start = offset + 8
                if end < start:
                    break
                length = int.from_bytes(buffer[offset + 2:offset + 4], "big")
                if length < 126:  # not the shortest encoding: autobahn refuses it
                    wait = False
                    break
            else:
                start = offset + 14
                if end < start:
                    break
                length = int.from_bytes(buffer[offset + 2:offset + 10], "big")
                if length < 65536 or length >> 63:
                    wait = False
                    break
            stop = start + length
            if length > limit > 0 or (stop > end and length > _GATHER):
                wait = False  # too large (autobahn closes with 1009), or large enough to stream
                break
            if stop > end:
                if stop - end > LARGE_PACKET_PROGRESS:  # as over TCP, unseen by MQTT meanwhile
                    self.mqtt.heard()
                break
            payloads.append(_unmask(buffer[start:stop], buffer[start - 4:start]))
            inside = not first & 0x80
            offset = stop
        self.inside_message = inside
        self.data = buffer[offset:] if offset else buffer
        if payloads:
            self.mqtt.dataReceived(payloads[0] if len(payloads) == 1 else b"".join(payloads))
        if self.data and not wait:
            self.consumeData()

    def onPing(self, payload: bytes) -> None:
        if self.state == _CLOSING:
            # Answered until the client's close frame comes [RFC 6455 5.5.2] (autobahn answers
            # only while open); a few, as the socket goes on reading for that frame.
            if self.closedByMe and self._closing_pongs < CLOSING_PONGS:
                self._closing_pongs += 1
                self.sendFrame(opcode=10, payload=payload)
            return
        super().onPing(payload)  # (the pong goes to the socket, past what MQTT holds and counts)
        if self.mqtt is not None and self.mqtt.paused:  # the socket holds more than it sends
            self.mqtt.read_no_more_until_sent()

    def onConnect(self, request: ConnectionRequest) -> str:
        factory = self.factory
        peer = client_address(self.transport.getPeer(),  # type: ignore[union-attr]
                              request.headers.get("x-forwarded-for"),
                              factory.trusted_proxies)
        self._peer = peer  # (before any refusal: its line names the client behind a trusted proxy)
        if factory.paths and request.path not in factory.paths:
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "Not Found")
        origin = request.headers.get("origin")
        if factory.origins and origin is not None and origin.lower() not in factory.origins:
            # A page of another site, in a browser that would lend it the user's cookies or
            # client certificate (cross-site WebSocket hijacking, RFC 6455 10.2).
            self._refusal = f"origin {shortened(origin)!r} not in websocket_origins"
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Forbidden")
        # [MQTT-6.0.0-4]: mqtt, whenever it is offered (3.1.1 and 5.0 say the server selects
        # it; which version the client speaks is known only at its CONNECT); mqttv3.1 alone
        # for a client of 3.1 that offers only that.
        subprotocol = next((p for p in SUBPROTOCOLS if p in request.protocols), None)
        if subprotocol is None:
            # [MQTT-6.0.0-3]: the client must offer mqtt; without it no MQTT is spoken.
            self._refusal = f"subprotocols {shortened(', '.join(request.protocols))!r}, not mqtt"
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "Bad Request: subprotocol mqtt required")
        self._count_without_mqtt(False)  # (from here it counts as the MQTT connection it becomes)
        mqtt = factory.broker.factory.buildProtocol(peer)
        if mqtt is None:  # max_connections: counted and logged by the MQTT factory
            self._count_without_mqtt(True)  # (answered 503, the socket counts until it is gone)
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "Service Unavailable")
        self.mqtt = mqtt
        # An offer the broker cannot take is declined, not a reason to fail the handshake as
        # autobahn would [RFC 7692 5]: without compression, every offer.
        self.websocket_extensions = [(name, params) for name, params in self.websocket_extensions
                                     if factory.compression and _takes(name, params)]
        return subprotocol

    def _count_without_mqtt(self, counted: bool) -> None:
        """Count this socket against max_connections on its own (while no MQTT connection in the
        broker's ``connections`` stands for it), or no longer: once either way."""
        if counted != self._without_mqtt:
            self._without_mqtt = counted
            self.factory.broker.websockets_without_mqtt += 1 if counted else -1

    def _where(self) -> str:
        """The client, as the log names it: behind a trusted proxy, the one it forwards for;
        behind ``haproxy:``, the one its header names (autobahn's ``peer`` was taken before)."""
        if self._peer is not None:
            return describe(self._peer)
        return describe(self.transport.getPeer()) if self.transport is not None else str(self.peer)

    def onOpen(self) -> None:
        cancel(self._handshake_call)
        self._handshake_call = None
        # autobahn keeps the request, whole and parsed, and its answer for the life of the
        # connection, which needs none of them now: up to a few websocket_max_handshake_size.
        self.http_request_data = b""
        self.http_response_data = self.http_status_line = self.http_request_uri = ""
        self.http_request_path = self.http_request_host = self.websocket_origin = ""
        self.http_headers, self.http_request_params = {}, {}
        self.websocket_protocols, self.websocket_extensions = [], []
        assert self.mqtt is not None and self._peer is not None
        self.mqtt.makeConnection(WebSocketTransport(self, self.transport, self._peer))

    def _handshake_timed_out(self) -> None:
        self._handshake_call = None
        if self.state == _CONNECTING:
            log.info("dropping WebSocket connection from {peer}: no handshake within {timeout}s",
                     peer=self._where(), timeout=self.factory.handshake_timeout)
            self.wasNotCleanReason = "opening handshake timeout"
            self.dropConnection(abort=True)

    # --- data: binary frames go to MQTT as they arrive ------------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if not isBinary:
            # [MQTT-6.0.0-1]
            self._fail_connection(_UNSUPPORTED_DATA, "a text frame (MQTT takes binary frames only)")

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.state == _OPEN:
            self.mqtt.dataReceived(payload)

    def onMessageFrameEnd(self) -> None:
        pass  # nothing is collected: the MQTT reader has had every byte already

    def onMessageEnd(self) -> None:
        pass

    # --- closing --------------------------------------------------------------------------

    def close(self, code: int) -> None:
        """The MQTT side ends the connection: start the closing handshake. (MQTT has already
        let go of its session; it hears ``connectionLost`` when the socket closes, as over TCP.)"""
        if self.state == _OPEN:
            self._mqtt_closed_it = True
            self.sendCloseFrame(code=code)

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                       isReply: bool = False) -> None:
        super().sendCloseFrame(code, reasonUtf8, isReply)
        # autobahn's own timer would run on the global reactor; ours runs on the broker's clock.
        # After a reply autobahn closes the socket once what it wrote is out, which a peer that
        # does not read never lets happen: the same timer aborts it.
        if isReply or self.state == _CLOSING:
            self._bound_the_close()
        if not self._mqtt_closed_it:
            # Closed from the WebSocket side (the client's close frame, a text or oversize frame, a
            # protocol error): no more MQTT can flow, so the MQTT connection ends now, will and
            # all, instead of when the peer answers.
            self._lose_mqtt(Failure(ConnectionDone("WebSocket closing handshake")), socket_open=True)

    def _fail_connection(self, code: int = _GOING_AWAY, reason: str = "going away") -> None:
        """autobahn's (with ``failByDrop`` off), logged at info naming the client, where autobahn
        warns naming the socket's peer: a frame the protocol refuses is the client's doing, as a
        malformed packet is over TCP."""
        if self.state == _CLOSED:
            return
        log.info("closing WebSocket connection from {peer}: {reason}", peer=self._where(), reason=reason)
        self.failedByMe = True
        if self.state == _CLOSING:  # (a second error while closing)
            self.dropConnection()
        else:
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123))

    def dropConnection(self, abort: bool = False) -> None:
        """autobahn's, without its warning of a drop that no closing handshake came before, which
        names the socket's peer (a proxy): each is routine here (a timeout, a refused upgrade, an
        MQTT abort, the client's error) and has its line at info already, and a client or a port
        scanner could write warnings at will, which over TCP it cannot."""
        self.unregisterProducer()
        if self.state == _CLOSED:
            return
        # The client answered our close frame: autobahn aborts the socket, which throws away
        # what is not written yet, our close frame too when the answer came in the same read
        # (a client's DISCONNECT and close frame together). Closed, the socket sends it first;
        # one that never drains is aborted by the close timer.
        abort = abort and not (self.wasClean and self.state == _CLOSING)
        self.droppedByMe = True
        self.state = _CLOSED
        self.is_closed.callback(self)  # (txaio.resolve, under Twisted)
        self._closeConnection(abort)

    def _bound_the_close(self) -> None:
        """Abort the socket after CLOSE_TIMEOUT (on the broker's clock) unless it is closed by then."""
        if self._close_call is None:
            self._close_call = self.factory.broker.clock.callLater(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_call = None
        self.wasNotCleanReason = "closing handshake timeout"
        if self.state == _CLOSED:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.dropConnection(abort=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Not autobahn's connectionLost: it logs a client's failed TLS handshake as an error.
        self._connectionLost(reason)  # type: ignore[arg-type]  # autobahn's hint says str; it is the Failure
        cancel(self._handshake_call)
        cancel(self._close_call)
        self._handshake_call = self._close_call = None
        self._count_without_mqtt(False)
        self._lose_mqtt(reason, socket_open=False)

    def _lose_mqtt(self, reason: Failure, socket_open: bool) -> None:
        if self.mqtt is not None and self.mqtt.connected and not self._mqtt_lost:
            self._mqtt_lost = True
            if socket_open:
                # The socket outlives the MQTT connection (until the client's close_notify over
                # TLS, or while the client does not read the answer to its close frame): it
                # counts in its place until it is gone, as a lingering TCP socket does.
                self._count_without_mqtt(True)
            self.mqtt.connectionLost(reason)


class WebSocketFactory(WebSocketServerFactory):
    """Builds an :class:`MQTTWebSocketProtocol` per connection, for ``broker`` (a BrokerService)
    with its ``websocket_*`` settings; ``paths`` overrides ``websocket_paths`` (empty: any).

    Past max_connections (each socket counted until it is gone, upgrading and closing ones
    included) a listener's connection is aborted as it is accepted, as a TCP listener's is; with
    ``listener`` false (the connections of a ``twisted.web`` site, which has accepted them
    already) its upgrade is answered with 503.
    """

    protocol = MQTTWebSocketProtocol  # type: ignore[assignment]
    refused = 0
    """How many opening handshakes it failed."""

    def __init__(self, broker: Any, paths: Iterable[str] | None = None, listener: bool = True) -> None:
        super().__init__(protocols=list(SUBPROTOCOLS), server=None, reactor=broker.reactor)
        config = broker.config
        self.broker = broker
        self.listener = listener
        self.paths = frozenset(config.websocket_paths if paths is None else paths)
        self.origins = frozenset(map(_serialized, config.websocket_origins))
        self.trusted_proxies: tuple[Network, ...] = tuple(
            ipaddress.ip_network(proxy, strict=False) for proxy in config.websocket_trusted_proxies)
        self.max_handshake_size: int = config.websocket_max_handshake_size
        self.handshake_timeout: float = config.websocket_handshake_timeout
        options: dict[str, Any] = {}
        self.compression: bool = config.websocket_compression
        if config.websocket_compression:
            options["perMessageCompressionAccept"] = functools.partial(_accept_deflate, limit=config.max_packet_size)
        self.setProtocolOptions(
            webStatus=False,  # no status page or redirects for a plain GET: 426 Upgrade Required
            # (0: none. A frame may hold several packets [MQTT-6.0.0-2], each within
            # max_packet_size; its payload is streamed to MQTT, never collected.)
            maxFramePayloadSize=config.websocket_max_frame_size,
            maxMessagePayloadSize=0,  # a message is never collected (see onMessageFrameData)
            openHandshakeTimeout=0, closeHandshakeTimeout=0,  # ours, on the broker's clock
            failByDrop=False,  # a protocol error is answered with a close frame giving the reason
            allowNullOrigin=True,  # a page from file:// or a sandbox: onConnect applies websocket_origins
            # RFC 6455's only: the drafts before it (8) carry the page in Sec-WebSocket-Origin,
            # which websocket_origins would not see.
            versions=[13],
            tcpNoDelay=config.set_tcp_nodelay,
            **options)

    def buildProtocol(self, addr: IAddress) -> Any:  # type: ignore[override]
        if self.listener and self.broker.factory.refuse_if_full(addr):
            # Not left to the upgrade's 503: each would stay open until its handshake timeout,
            # holding up to websocket_max_handshake_size of request.
            return RefusedConnection()
        return super().buildProtocol(addr)


_DEFAULT_PORTS = {"http": ":80", "ws": ":80", "https": ":443", "wss": ":443"}


def _serialized(origin: str) -> str:
    """A configured origin as a browser sends it in Origin [RFC 6454 6.2]: in lower case, the
    scheme's default port left out (``https://app.example.com:443`` is ``https://app.example.com``)."""
    origin = origin.lower()
    default = _DEFAULT_PORTS.get(origin.partition("://")[0])
    return origin.removesuffix(default) if default else origin


_EXTENSIONS_LINE = re.compile(rb"\r\nsec-websocket-extensions:[ \t]*([^\r]*)", re.IGNORECASE)


def _one_extensions_line(head: bytes) -> bytes:
    """A request's head with its Sec-WebSocket-Extensions lines made one, their lists joined: a
    client may split them [RFC 6455 9.1], which autobahn refuses as a header given twice."""
    lines = _EXTENSIONS_LINE.findall(head)
    if len(lines) < 2:
        return head
    return _EXTENSIONS_LINE.sub(b"", head) + b"\r\nSec-WebSocket-Extensions: " + b", ".join(lines)


def _takes(extension: str, params: Any) -> bool:
    """Whether an extension offer is one the broker can take: permessage-deflate as autobahn
    reads it."""
    if extension != PerMessageDeflateOffer.EXTENSION_NAME:
        return False
    try:
        PerMessageDeflateOffer.parse(params)
    except Exception:  # (autobahn raises plain Exceptions for what it cannot take)
        return False
    return True


DEFLATE_WINDOW_BITS = 13
DEFLATE_MEM_LEVEL = 4
"""The broker's compressor on each connection. With zlib's defaults (a 32 KiB window, memLevel 8)
it allocates 256 KiB: a connection took 100 KiB resident from its first message (9 without
compression), 230 once sent 80 KiB (17). An 8 KiB window and memLevel 4 allocate 40 KiB (37 and
64 KiB a connection), for 2 to 5 % more bytes sent, at the same speed. A window smaller than the
client's needs no negotiation: it only refers back less far [RFC 7692 7.1.2.1]."""


def _accept_deflate(offers: list[Any], limit: int) -> PerMessageDeflateOfferAccept | None:
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            # Inflated, a message is bounded as a packet is: a small one could inflate a
            # thousandfold, all at once (closed with 1009 past it).
            window = min(DEFLATE_WINDOW_BITS, offer.request_max_window_bits or DEFLATE_WINDOW_BITS)
            return PerMessageDeflateOfferAccept(offer, max_message_size=limit, window_bits=window,
                                                mem_level=DEFLATE_MEM_LEVEL)
    return None


class WebSocketResource(_AutobahnResource):
    """MQTT over WebSocket as a ``twisted.web`` resource, so that it can share a port with other
    HTTP resources (a page, an admin API)::

        root = Resource()
        root.putChild(b"", File("index.html"))
        root.putChild(b"mqtt", WebSocketResource(broker))
        endpoints.serverFromString(reactor, "tcp:8080").listen(Site(root))

    The site routes by path, so ``websocket_paths`` does not apply; every other ``websocket_*``
    setting does (the handshake timeout runs from the moment the site hands the request over).
    """

    def __init__(self, broker: Any) -> None:
        super().__init__(WebSocketFactory(broker, paths=(), listener=False))

    def render(self, request: Any) -> Any:
        transport = request.channel.transport
        if transport is not None:
            # The HTTP channel is the socket's producer; the MQTT connection will register itself.
            transport.unregisterProducer()
        return super().render(request)


__all__ = ["SUBPROTOCOLS", "WebSocketFactory", "WebSocketResource", "WebSocketTransport",
           "MQTTWebSocketProtocol", "client_address", "frame_header"]

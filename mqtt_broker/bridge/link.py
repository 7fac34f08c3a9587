"""The two connections of a bridge: an MQTT client protocol on the broker's own codec, and an
in-memory pipe that joins such a client to an :class:`~mqtt_broker.protocol.MQTTProtocol` of
this broker, so the bridge's session here is an ordinary session (queued, stored, resent); and
the TLS options of the connection to the remote.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IAddress, IProtocol, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logged import shortened
from ..wire import (MQTT_5, Connack, Connect, Disconnect, FrameReader, MQTTError, Packet, Pingreq, Pingresp,
                    Publish, ReasonCode, encode)
from ..wire.codec import MAX_PACKET_SIZE
from .config import BridgeConfig

log = Logger()

_PINGREQ = encode(Pingreq())


class Link(Protocol):
    """An MQTT client connection that hands every packet after a successful CONNACK to
    ``receive``. It sends the CONNECT, keeps the connection alive (PINGREQ every keepalive
    seconds; no answer within half as long again closes it) and fails the connection on a
    refusing CONNACK or a bad packet (the latter with a DISCONNECT of its reason code, MQTT 5).

    ``held``: while true, packets stay in the reader (and the transport is paused), so that the
    other side of the bridge is not sent more than it can take."""

    def __init__(self, name: str, connect: Connect, clock: IReactorTime, max_packet_size: int,
                 connected: Callable[[Link, Connack], None], receive: Callable[[Link, Packet], None],
                 lost: Callable[[Link, str], None]) -> None:
        self.name = name
        self.connect = connect
        self.clock = clock
        self.version = connect.protocol_level
        self.reader = FrameReader(max_packet_size=max_packet_size, version=self.version)
        self._connected, self._receive, self._lost = connected, receive, lost
        self.up = False
        self.closed = False
        self.held = False
        self.why = "connection lost"
        self._last_seen = 0.0
        self._ping_call: Any = None
        self.on_pause: Callable[[bool], None] = lambda paused: None
        """Told when the transport's buffer fills (True) and drains (False)."""
        self.refused = 0
        """The reason code of a CONNACK that refused the CONNECT."""
        self.max_send_size = 0
        """The server's Maximum Packet Size (MQTT 5's CONNACK), 0 for none: ``send`` keeps
        back a larger packet, which the server would answer by closing the connection."""
        self.keep_alive = connect.keep_alive
        """The CONNECT's, or the server's Server Keep Alive, which replaces it [MQTT-3.1.2-21]."""

    # --- transport events ---------------------------------------------------------------

    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        except (AttributeError, OSError):
            pass
        self.transport.registerProducer(_Producer(self), True)  # type: ignore[union-attr]
        self._last_seen = self.clock.seconds()
        self.send(self.connect)
        # Until CONNACK, the keepalive timer is the CONNECT's timeout too.
        self._ping_call = self.clock.callLater(self.connect.keep_alive or 30, self._ping)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_seen = self.clock.seconds()
        self.reader.receive_data(data)
        self.process()

    def process(self) -> None:
        try:
            while not self.held and not self.closed:
                packet = self.reader.next_packet()
                if packet is None:
                    return
                if not self.up:
                    self._connack(packet)
                elif type(packet) is Pingresp:
                    pass
                elif type(packet) is Disconnect:
                    # Its Reason String is the remote's text: quoted, as a client's is in the log.
                    reason = packet.properties.get("reason_string")
                    self.close(f"DISCONNECT 0x{packet.reason_code:02x} from the server"
                               + (f" ({shortened(reason)!r})" if reason else ""))
                elif type(packet) is Publish and "topic_alias" in packet.properties:
                    # The CONNECT announced no Topic Alias Maximum: none may be used (3.3.2.3.4).
                    self.close("a topic alias from the server, which none were allowed",
                               code=ReasonCode.TOPIC_ALIAS_INVALID)
                else:
                    self._receive(self, packet)
        except MQTTError as error:
            # An MQTT 5 client says why [MQTT-4.13.1] (0x95 for a packet over its Maximum Packet
            # Size, 3.1.2.11.4); an MQTT 3 one's DISCONNECT is a normal end, which discards the will.
            self.close(f"bad packet from the server: {shortened(error.message)}",  # (it may quote the server)
                       code=error.reason_code if self.version == MQTT_5 else None)

    def _connack(self, packet: Packet) -> None:
        if type(packet) is not Connack:
            self.close(f"{type(packet).__name__} before CONNACK")
            return
        if packet.reason_code:
            self.refused = packet.reason_code
            self.close(f"CONNECT refused with reason code 0x{packet.reason_code:02x}")
            return
        if packet.session_present and self.connect.clean_start:
            # The client has no session state to match it: it MUST close the connection
            # [MQTT-3.2.2-4] (3.1.1's 3.2.2.2 too), and starts again with a clean start.
            self.close("Session Present 1 from the server, which was asked for a clean start")
            return
        self.up = True
        self.max_send_size = packet.properties.get("maximum_packet_size", 0)
        self.keep_alive = packet.properties.get("server_keep_alive", self.connect.keep_alive)
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = self.clock.callLater(self.keep_alive / 2, self._ping) if self.keep_alive else None
        self._connected(self, packet)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.up = False
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        if reason is not None and not reason.check(ConnectionDone, ConnectionAborted) and self.why == "connection lost":
            self.why = f"connection lost: {reason.getErrorMessage()}"
        self._lost(self, self.why)

    # --- sending ------------------------------------------------------------------------

    def send(self, packet: Packet) -> bool:
        """Write ``packet``; False if it is larger than the server takes (it is not sent)."""
        data = encode(packet, self.version)
        if len(data) > min(self.max_send_size or MAX_PACKET_SIZE, MAX_PACKET_SIZE):  # (an MQTT 3 server says none)
            return False
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]
        return True

    def hold(self) -> None:
        if not self.held:
            self.held = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def release(self) -> None:
        if self.held and not self.closed:
            self.held = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
            self.process()

    def close(self, why: str, disconnect: bool = False, code: ReasonCode | None = None) -> None:
        """End the connection; ``disconnect``: with a DISCONNECT first (a normal end, so the
        server does not publish the will); ``code``: with an MQTT 5 DISCONNECT of that error."""
        if self.closed:
            return
        self.why = why
        self.closed = True
        if (disconnect or code is not None) and self.up:
            self.transport.write(encode(Disconnect(reason_code=code or 0), self.version))  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _ping(self) -> None:
        self._ping_call = None
        if self.closed:
            return
        keep_alive = self.keep_alive
        if not self.up:
            self.close("no CONNACK in time")
            return
        if not keep_alive:
            return
        if self.clock.seconds() - self._last_seen >= keep_alive * 1.5:
            self.close("the server did not answer within the keepalive")
            return
        self.transport.write(_PINGREQ)  # type: ignore[union-attr]
        self._ping_call = self.clock.callLater(keep_alive / 2, self._ping)


@implementer(IPushProducer)
class _Producer:
    """Tells a link when its transport's buffer is full, without making the link a producer
    of its own transport's reading (which ``hold`` pauses)."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def pauseProducing(self) -> None:
        self.link.on_pause(True)

    def resumeProducing(self) -> None:
        self.link.on_pause(False)

    def stopProducing(self) -> None:
        pass


@implementer(IAddress)
class PipeAddress:
    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"bridge:{self.name}"


@implementer(ITransport)
class PipeEnd:
    """One end of an in-memory connection: what is written here reaches the other end's protocol
    on a later turn of the reactor (never within the write, so neither protocol is re-entered)."""

    def __init__(self, clock: IReactorTime, protocol: IProtocol, address: PipeAddress) -> None:
        self.clock = clock
        self.protocol = protocol
        self.address = address
        self.peer: PipeEnd = self
        self.connected = True
        self.disconnecting = False
        self.reading = True
        self.producer: Any = None
        self._out: list[bytes] = []
        self.buffered = 0
        """Bytes written here that the other end has not read yet (held while it is paused)."""
        self._call: Any = None

    def write(self, data: bytes) -> None:
        if self.connected and not self.disconnecting and data:
            self._out.append(data)
            self.buffered += len(data)
            self._schedule()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def _schedule(self) -> None:
        if self._call is None and self.connected:
            self._call = self.clock.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._call = None
        if not self.connected:
            return
        if self._out and self.peer.reading:
            data = b"".join(self._out)
            self._out = []
            self.buffered = 0
            self.peer.protocol.dataReceived(data)
        if self.disconnecting and not self._out:
            self._close(ConnectionDone())

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._schedule()

    def abortConnection(self) -> None:
        self._close(ConnectionAborted())

    def _close(self, reason: Exception) -> None:
        if not self.connected:
            return
        for end in (self, self.peer):
            end.connected = False
            if end._call is not None and end._call.active():
                end._call.cancel()
            end._call = None
        # Both protocols learn it on the next turn, as they would from a socket.
        self.clock.callLater(0, self.protocol.connectionLost, Failure(reason))
        self.clock.callLater(0, self.peer.protocol.connectionLost, Failure(reason))

    # Reading: pausing this end holds what the other end writes.
    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        if not self.reading:
            self.reading = True
            self.peer._schedule()

    def stopProducing(self) -> None:
        self.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def getPeer(self) -> PipeAddress:
        return self.peer.address

    def getHost(self) -> PipeAddress:
        return self.address


def pipe(clock: IReactorTime, a: IProtocol, b: IProtocol, name: str) -> None:
    """Connect two protocols in memory (``a`` is made connected first)."""
    end_a = PipeEnd(clock, a, PipeAddress(name))
    end_b = PipeEnd(clock, b, PipeAddress(name))
    end_a.peer, end_b.peer = end_b, end_a
    a.makeConnection(end_a)
    b.makeConnection(end_b)


def client_tls(config: BridgeConfig, host: str) -> Any:
    """The TLS options of a bridge's connection to ``host``; raises OSError or ValueError naming
    a file that cannot be used."""
    from twisted.internet.error import VerifyError
    from twisted.internet.ssl import (
        Certificate, CertificateOptions, KeyPair, PrivateCertificate, optionsForClientTLS, platformTrust,
        trustRootFromCertificates,
    )

    from ..auth.tls import certificates, private_key
    trust: Any = platformTrust()
    if config.bridge_cafile:
        authorities = certificates(config.bridge_cafile, "bridge_cafile")
        trust = trustRootFromCertificates([Certificate(c) for c in authorities])
    client_certificate = None
    chain: list[Any] = []
    if config.bridge_certfile:
        # The certificates after the bridge's are its chain, sent with it as Mosquitto's
        # bridge_certfile sends them: a remote may trust only the root.
        certificate, *chain = certificates(config.bridge_certfile, "bridge_certfile")
        try:
            client_certificate = PrivateCertificate.fromCertificateAndKeyPair(
                Certificate(certificate), KeyPair(private_key(config.bridge_keyfile, "bridge_keyfile")))
        except VerifyError:  # (one of the two replaced, the other not yet)
            raise ValueError(f"bridge_keyfile={config.bridge_keyfile} is not the key of "
                             f"bridge_certfile={config.bridge_certfile}") from None
    if config.bridge_insecure:  # the chain is checked, the name is not
        return CertificateOptions(
            trustRoot=trust,
            privateKey=client_certificate.privateKey.original if client_certificate else None,
            certificate=client_certificate.original if client_certificate else None,
            extraCertChain=chain or None)
    return optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_certificate,
                               extraCertificateOptions={"extraCertChain": chain} if chain else None)

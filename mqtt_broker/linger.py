"""Closing a connection so that the client reads the broker's last packet: a lingering close.

When the broker ends a connection it has just written why (a DISCONNECT with its reason code, a
refusing CONNACK), but the client may still be writing. A TCP socket closed with unread bytes in
its receive buffer makes the kernel send RST instead of FIN, and the client may then lose the
packet it has not read yet and see ECONNRESET or EPIPE instead of the reason code. So the broker
closes in two steps, as web servers do (Apache's and nginx's lingering close): it writes what is
pending and half-closes its side (FIN), then reads and throws away whatever the client still
sends until the client closes too, or until the linger is over, when the socket is aborted.

What lingers is only the socket: the connection has left the session registry before, and it
still counts against ``max_connections`` until the socket is gone (so a flood of lingering
closes is bounded like any other flood of connections).
"""

from __future__ import annotations

import sys
from typing import Any, Sized

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.protocols.policies import ProtocolWrapper


UNTAKEN_LIMIT = 5.0
"""Seconds a socket closed without a linger (``close_linger`` 0) may wait for its peer to take
what it was sent last before it is aborted."""


def close_lingering(transport: Any, clock: IReactorTime, linger: float, half_close: bool) -> IDelayedCall | None:
    """Close ``transport`` once what it holds is written, reading (and dropping) what still comes
    for at most ``linger`` seconds. Returns the timer that aborts the connection at the end of
    the linger, to be cancelled when the connection is lost first. When ``linger`` is 0 it is
    closed once what it holds is written, the peer's unread bytes or not (on TLS without waiting
    for the peer's close_notify): None, or if the socket still holds bytes the peer has not
    taken, the timer that aborts it after ``UNTAKEN_LIMIT``.

    ``half_close`` is for a transport that is a socket of its own (TCP or UNIX, Twisted's
    ``tcp.Connection``), whose ``loseWriteConnection`` sends FIN after the pending bytes and keeps
    reading. Not for TLS: ``TLSMemoryBIOProtocol`` passes unknown attributes to the socket under
    it, so its ``loseWriteConnection`` would end the TCP stream without a close_notify, cutting
    the TLS record stream. There ``loseConnection`` is a half-close already (a close_notify
    alert) that goes on reading until the peer answers with its own, which Twisted waits for
    without a limit: the timer is the limit. A transport whose ``closing_handshake`` is true (the
    WebSocket one) lingers on its own: its ``loseConnection`` sends a close frame, reads on until
    the answer and has a timer of its own, so it is given no second one.
    """
    handshake = getattr(transport, "closing_handshake", False)
    if linger <= 0:
        if handshake:  # (the client's close frame is read whatever input MQTT had paused)
            transport.resumeProducing()
        transport.loseConnection()
        socket = transport if half_close else None
        if not half_close and not handshake:
            # TLS: its close_notify is written to the socket under it; that is closed once it
            # is, rather than held until the peer answers, which it may never do.
            socket = getattr(transport, "transport", None)
            while isinstance(socket, ProtocolWrapper):  # (TLS over the PROXY header's wrapper)
                socket = socket.transport
            if socket is not None:
                socket.loseConnection()
        if socket is not None and unwritten(socket):
            # It closes once its peer has taken what is left, which a peer that does not read
            # never does: bounded all the same.
            return clock.callLater(UNTAKEN_LIMIT, socket.abortConnection)
        return None
    # Input may be paused while a hook decides; what still comes must be read to be discarded,
    # or it fills the receive buffer and the final close resets after all. (Before the close: a
    # transport that is disconnecting does not resume.)
    transport.resumeProducing()
    if half_close:
        transport.loseWriteConnection()
    else:
        transport.loseConnection()
    if handshake:
        return None
    return clock.callLater(linger, transport.abortConnection)


def socket_of(transport: Any) -> tcp.Connection | None:
    """The socket (TCP or UNIX: Twisted's ``tcp.Connection``) a transport is, or writes to
    unchanged: the PROXY header's wrapper (``haproxy:tcp:``) passes on what it is given, and
    ``close_lingering`` may half-close the socket under it. None for TLS and the rest."""
    if isinstance(transport, tcp.Connection):
        return transport
    tls = sys.modules.get("twisted.protocols.tls")  # (not imported: no transport is TLS)
    if isinstance(transport, ProtocolWrapper) and isinstance(transport.transport, tcp.Connection) and not (
            tls is not None and isinstance(transport, tls.TLSMemoryBIOProtocol)):
        return transport.transport
    return None


def unwritten(transport: Any) -> bool:
    """Whether a socket's transport (Twisted's ``tcp.Connection``) holds bytes its peer has not
    taken yet; False for another kind."""
    return isinstance(transport, tcp.Connection) and bool(transport.dataBuffer or transport._tempDataLen)


def unsent_bytes(transport: Any) -> int:
    """Bytes written to the socket (Twisted's ``tcp.Connection``) that ``transport`` is, or
    writes to under TLS, the PROXY header's wrapper or a WebSocket, that its peer has not taken
    yet: those the transport holds, and on Linux those of the kernel's send buffer (which may
    hold megabytes, and takes more from the transport only once much of it has gone: a slow
    reader takes from it for seconds while the transport holds the same); 0 for another kind.
    While nothing more is written to it, fewer of them later means the peer reads."""
    websocket = sys.modules.get("mqtt_broker.websocket")  # (not imported: no transport is a WebSocket)
    while not isinstance(transport, tcp.Connection):
        if isinstance(transport, ProtocolWrapper):
            transport = transport.transport
        elif websocket is not None and isinstance(transport, websocket.WebSocketTransport):
            transport = transport.socket
        else:
            return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen + _in_kernel(transport)


if sys.platform == "linux":
    from fcntl import ioctl
    from termios import TIOCOUTQ

    def _in_kernel(socket: tcp.Connection) -> int:
        """Bytes of a socket's send buffer that its peer has not acknowledged (Linux's SIOCOUTQ;
        the kernel's own measure for a UNIX socket)."""
        try:
            return int.from_bytes(ioctl(socket.fileno(), TIOCOUTQ, bytes(4)), sys.byteorder)
        except (OSError, ValueError):  # (closed: its descriptor is -1)
            return 0
else:
    def _in_kernel(socket: tcp.Connection) -> int:
        """0: the kernel's measure cannot be told here."""
        return 0


class AllClosed:
    """How long the broker's shutdown waits for the connections it closed to finish lingering:
    ``done`` fires when ``connections`` is empty (``lost()`` is called after each connection
    leaves it), or after ``within`` seconds if it is not by then, or at once if ``within`` is 0.
    The reactor then closes what is left."""

    __slots__ = ("done", "_connections", "_deadline")

    def __init__(self, connections: Sized, clock: IReactorTime, within: float) -> None:
        self.done: Deferred[None] = Deferred()
        self._connections = connections
        self._deadline: IDelayedCall | None = None
        if connections and within > 0:
            self._deadline = clock.callLater(within, self._fire)
        else:
            self._fire()

    def lost(self) -> None:
        """A connection left ``connections``."""
        if not self._connections:
            self._fire()

    def _fire(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if not self.done.called:
            self.done.callback(None)


__all__ = ["AllClosed", "close_lingering", "unsent_bytes", "unwritten"]

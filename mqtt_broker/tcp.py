"""TCP listeners whose connections cost less than Twisted's own, for brokers of many clients.

Twisted's TCP transport (``twisted.internet.tcp.Server``) formats two strings for every
connection it accepts, a log prefix and a repr, and keeps both for as long as the connection
lives: about 160 bytes of an idle connection's 2 KiB. And its ``loseConnection`` of a connection
with nothing left to write still waits for the socket to turn writable, sends it zero bytes and
shuts it down before closing it: four system calls more than the close needs. ``Server`` here is
that transport without those: its log prefix is its listener's, its repr is made when asked
for, and a connection with nothing to write is closed at the reactor's next turn. Its socket is
the bare one of the ``_socket`` module: ``socket.socket.accept`` would turn the listener's family
and type into enums and wrap each connection's descriptor in a Python object besides, for
nothing a transport uses (5% of the broker's CPU while clients connect). And ``Port`` reads each
connection it accepts at once: a client's first bytes are usually there already, and Twisted
would read them only after the reactor's next wait for events.

The broker listens through :func:`listen`, which uses ``Port`` (Twisted's ``tcp.Port`` with
this ``Server``) for Twisted's ``tcp:`` and ``tcp6:`` endpoints on a reactor of file
descriptors, and leaves every other endpoint (``ssl:``, ``unix:``, ...) to itself.
"""

from __future__ import annotations

import _socket
import socket
from typing import Any

from twisted.internet import address, defer, main, tcp
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocol, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.python import log
from twisted.python.failure import Failure

# One for every connection, as Twisted's reactor has it: a Failure computes its exception's
# class names the first time it is asked about them.
_DONE = Failure(main.CONNECTION_DONE)


class Server(tcp.Server):
    """A connection accepted by :class:`Port`."""

    # Closing it is not shared with another process (the socket is FD_CLOEXEC), so close()
    # alone ends the stream: Twisted says as much where it shuts down first all the same.
    _shouldShutdown = False

    def __init__(self, sock: Any, protocol: IProtocol, client: tuple[Any, ...], server: tcp.Port,
                 sessionno: int, reactor: Any) -> None:
        # tcp.Server.__init__ without its two strings.
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        if server.connection_prefix is None:  # type: ignore[attr-defined]  # it is a Port of this module
            server.connection_prefix = self._getLogPrefix(protocol)  # type: ignore[attr-defined]
        server.accepted.append(self)  # type: ignore[attr-defined]
        self.startReading()
        self.connected = 1

    reading = False
    """Whether the reactor reads it (not paused, not closing): what :class:`Port` checks before
    reading it as it is accepted."""

    def startReading(self) -> None:
        self.reading = True
        super().startReading()

    def stopReading(self) -> None:
        self.reading = False
        super().stopReading()

    def logPrefix(self) -> str:
        # Called around every event of the connection: one string per listener.
        return self.server.connection_prefix  # type: ignore[attr-defined, no-any-return]

    def __repr__(self) -> str:
        name = type(self.protocol).__name__ if hasattr(self, "protocol") else "closed"
        return f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"

    def loseConnection(self) -> None:
        if (self.connected and not self.disconnecting and self.producer is None
                and not self.dataBuffer and not self._tempDataLen):
            # Nothing to write: no need to wait for the socket to be writable.
            self.stopReading()
            self.disconnecting = True
            self.reactor.callLater(0, self._close)  # type: ignore[attr-defined]  # a reactor has a clock
        else:
            super().loseConnection()

    def _close(self) -> None:
        if not self.connected or self._aborting:
            return  # aborted meanwhile: the abort ends it
        if self.dataBuffer or self._tempDataLen:
            self.startWriting()  # written after loseConnection: doWrite closes once it is out
        else:
            self.connectionLost(_DONE)


class _Listening(socket.socket):
    """A listening socket whose ``accept`` gives the connection's bare socket object."""

    __slots__ = ("_kind",)

    def __init__(self, listening: socket.socket) -> None:
        self._kind = (int(listening.family), int(listening.type), listening.proto)
        super().__init__(*self._kind, fileno=listening.detach())
        self.setblocking(False)

    def accept(self) -> tuple[Any, Any]:  # type: ignore[override]  # a socket of _socket, not of socket
        fd, peer = self._accept()  # type: ignore[attr-defined]  # socket.socket's own, in C
        return _socket.socket(*self._kind, fd), peer


class Port(tcp.Port):
    """Twisted's TCP listener, accepting :class:`Server` connections."""

    transport = Server
    connection_prefix: str | None = None
    """What its connections log with: their protocol's prefix (Twisted's adds a connection
    number and the peer's address, to a string per connection)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted: list[Server] = []
        """The connections accepted by the current ``doRead``."""

    def createInternetSocket(self) -> socket.socket:
        return _Listening(super().createInternetSocket())

    def doRead(self) -> None:
        # A client's first bytes (an MQTT CONNECT) are usually there by the time its connection
        # is accepted: read them now rather than after the reactor's next wait for events.
        super().doRead()
        accepted, self.accepted = self.accepted, []
        for transport in accepted:
            if transport.reading:
                log.callWithLogger(transport, self._read, transport)

    def _read(self, transport: Server) -> None:
        # What the reactor does with a read event.
        why: BaseException | None
        try:
            why = transport.doRead()
        except BaseException as e:
            log.err()
            why = e
        if why:
            self.reactor._disconnectSelectable(transport, why, True)  # type: ignore[attr-defined]  # a PosixReactorBase


def listen(endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
    """``endpoint.listen(factory)``, through :class:`Port` where the endpoint is Twisted's TCP one
    on a reactor of file descriptors (the listener its ``listen`` would make, but for the
    transport of the connections)."""
    reactor = getattr(endpoint, "_reactor", None)
    if type(endpoint) not in (TCP4ServerEndpoint, TCP6ServerEndpoint) or not isinstance(reactor, PosixReactorBase):
        return endpoint.listen(factory)

    def listening() -> IListeningPort:
        port = Port(endpoint._port, factory, endpoint._backlog, endpoint._interface, reactor)  # type: ignore[attr-defined]
        port.startListening()
        return port
    return defer.execute(listening)


__all__ = ["Port", "Server", "listen"]

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
nothing a transport uses (5% of the broker's CPU while clients connect). ``Port`` accepts
without what only a failure to accept needs (Twisted's loop buffers its log events and makes a
generator each time; any failure but "no more" is still left to it), reads each connection as
it accepts it (a client's first bytes are usually there already, and Twisted would read them
only after the reactor's next wait for events), and can turn Nagle's algorithm off once on the
listening socket rather than on each connection.

The broker listens through :func:`listen`, which uses ``Port`` (Twisted's ``tcp.Port`` with
this ``Server``) for Twisted's ``tcp:`` and ``tcp6:`` endpoints on a reactor of file
descriptors, and leaves every other endpoint (``ssl:``, ``unix:``, ...) to itself, once the
stale lock of a ``unix:`` one that Twisted would take for this process's own is gone, and the
socket file a ``unix:`` one without a lock finds and nothing listens on.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import os
import socket
import stat
import sys
from typing import Any

from twisted.internet import address, defer, main, tcp
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocol, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python import log
from twisted.python.failure import Failure

# One for every connection, as Twisted's reactor has it: a Failure computes its exception's
# class names the first time it is asked about them.
_DONE = Failure(main.CONNECTION_DONE)
logger = Logger()


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
        self.reading = True
        reactor.addReader(self)  # what startReading does
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

    _nodelay_set = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        # Until told otherwise, the socket has its listener's setting: no system call to set
        # what is already so.
        if enabled != self.server.nodelay or self._nodelay_set:  # type: ignore[attr-defined]  # a Port of this module
            super().setTcpNoDelay(enabled)
            self._nodelay_set = True

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

    nodelay = False
    """Whether its connections start with Nagle's algorithm off: set once on the listening
    socket, which Linux's accepted sockets inherit, rather than on each connection."""

    def createInternetSocket(self) -> socket.socket:
        listening = _Listening(super().createInternetSocket())
        if self.nodelay:
            listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return listening

    def doRead(self) -> None:
        # Twisted's accept loop, less what only its failures need (a log buffer, a generator),
        # and reading each connection as it is accepted: a client's first bytes (an MQTT
        # CONNECT) are usually there already, and the reactor would read them only after its
        # next wait for events. Any failure to accept but "no more" is left to Twisted's loop.
        accepted = 0
        try:
            accept, build, reactor = self.socket.accept, self.factory.buildProtocol, self.reactor  # type: ignore[union-attr]  # a listening port has its factory
            for _ in range(self.numberAccepts):
                try:
                    skt, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    super().doRead()
                    return
                accepted += 1
                if len(addr) == 4:  # IPv6: with its scope id, as Twisted has it
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = build(self._addressType("TCP", *addr))
                if protocol is None:
                    skt.close()
                    continue
                sessionno = self.sessionno
                self.sessionno = sessionno + 1
                transport = self.transport(skt, protocol, addr, self, sessionno, reactor)
                protocol.makeConnection(transport)
                if transport.reading:
                    self._read(transport)
        except BaseException:
            log.deferr()
        # As Twisted's: more accepts a call while they all find a connection, fewer when not.
        self.numberAccepts = self.numberAccepts + 20 if accepted == self.numberAccepts else max(1, accepted)

    def _read(self, transport: Server) -> None:
        # What the reactor does with a read event, less the log context it sets around it
        # (callWithLogger, a microsecond and more): a legacy log event of this read has the
        # listener's prefix, not the connection's.
        why: BaseException | None
        try:
            why = transport.doRead()
        except BaseException as e:
            log.err()
            why = e
        if why:
            self.reactor._disconnectSelectable(transport, why, True)  # type: ignore[attr-defined]  # a PosixReactorBase


def listen(endpoint: IStreamServerEndpoint, factory: IProtocolFactory,
           nodelay: bool = False) -> defer.Deferred[IListeningPort]:
    """``endpoint.listen(factory)``, through :class:`Port` where the endpoint is Twisted's TCP one
    on a reactor of file descriptors (the listener its ``listen`` would make, but for the
    transport of the connections). ``nodelay``: the connections of such a listener on Linux
    start with Nagle's algorithm off (:attr:`Port.nodelay`), so that turning it off costs them
    nothing. A ``unix:`` listener's lock that a killed process of this one's id left is removed
    first (:func:`_clear_own_stale_lock`), and so is a socket file without a lock that nothing
    listens on (:func:`_clear_stale_socket`)."""
    reactor = getattr(endpoint, "_reactor", None)
    if type(endpoint) not in (TCP4ServerEndpoint, TCP6ServerEndpoint) or not isinstance(reactor, PosixReactorBase):
        unwrapped = getattr(endpoint, "_wrappedEndpoint", endpoint)  # (haproxy: wraps one)
        _clear_own_stale_lock(unwrapped)
        _clear_stale_socket(unwrapped)
        return endpoint.listen(factory)

    def listening() -> IListeningPort:
        port = Port(endpoint._port, factory, endpoint._backlog, endpoint._interface, reactor)  # type: ignore[attr-defined]
        port.nodelay = nodelay and sys.platform.startswith("linux")
        port.startListening()
        return port
    return defer.execute(listening)


def _clear_own_stale_lock(endpoint: object) -> None:
    """Remove the lock of a ``unix:`` listener (Twisted's ``PATH.lock``, a link to the process id
    of its holder) if it names this process and nothing answers on PATH, with the socket file
    left beside it. A broker killed (kill -9, the OOM killer) leaves both behind; started again
    as the same process id (a container's process 1, its filesystem kept), Twisted took the
    lock's holder for alive, itself, and refused to listen at every start. A lock naming another
    process Twisted removes itself once that process is gone; one that this process holds is in
    use, and PATH answers."""
    if not isinstance(endpoint, UNIXServerEndpoint) or not endpoint._wantPID:
        return
    path = endpoint._address
    lock = f"{path}.lock"
    try:
        if os.readlink(lock) != str(os.getpid()) or _answers(path):
            return
    except OSError:
        return  # no lock, or not Twisted's: Twisted says what it makes of it
    with contextlib.suppress(OSError):  # (no socket left: the lock alone)
        if stat.S_ISSOCK(os.lstat(path).st_mode):  # (as Twisted: never a file a typo named)
            os.remove(path)
    with contextlib.suppress(OSError):  # (if it stays, Twisted says it cannot take it)
        os.remove(lock)


def _clear_stale_socket(endpoint: object) -> None:
    """Remove the socket file of a ``unix:`` listener that has no lock (``lockfile=0``, or none
    left beside it) if nothing answers on it, as Mosquitto unlinks its socket's path before it
    binds: a killed Mosquitto, or a broker killed without a lock, leaves the file, and binding
    failed with "Address already in use" at every start. With a lock, Twisted removes the
    socket itself once the lock's holder is gone. Never a file that is no socket (a typo's)."""
    if not isinstance(endpoint, UNIXServerEndpoint):
        return
    path = endpoint._address
    try:
        if endpoint._wantPID and os.path.lexists(f"{path}.lock"):
            return
        if not stat.S_ISSOCK(os.lstat(path).st_mode) or _answers(path):
            return
        os.remove(path)
    except OSError:
        return  # (none there, or not ours to remove: binding says what is wrong)
    logger.info("removed the stale socket file {path}: nothing listened on it", path=path)


def _answers(path: str) -> bool:
    """Whether a listener takes connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # (a full listen queue would hold a connect: it answers all the same)
        return probe.connect_ex(path) not in (errno.ECONNREFUSED, errno.ENOENT)


__all__ = ["Port", "Server", "listen"]

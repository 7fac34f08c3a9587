"""The broker's TCP listener (mqtt_broker.tcp): Twisted's, with connections that keep no log
strings, sit on _socket's bare socket objects, and close without waiting for a writable socket
when nothing is left to write. Real sockets on loopback, the real reactor; clients are blocking
sockets in threads, every wait bounded by a socket timeout."""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.error import CannotListenError, ConnectionAborted, ConnectionDone
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from mqtt_broker import BrokerService, tcp

WAIT = 10.0


class Recorder(Protocol):
    """Answers each read as ``reply`` says, then remembers how the connection ended."""

    def __init__(self, factory: RecorderFactory) -> None:
        self.factory = factory

    def connectionMade(self) -> None:
        self.factory.made.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.reply(self.transport, data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.lost.append(reason)
        if not self.factory.closed.called:
            self.factory.closed.callback(None)


class RecorderFactory(Factory):
    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.made: list[Recorder] = []
        self.lost: list[Failure] = []
        self.closed: Deferred[None] = Deferred()

    def buildProtocol(self, addr: Any) -> Recorder:
        return Recorder(self)


def exchange(port: int, data: bytes, family: int = socket.AF_INET, host: str = "127.0.0.1") -> tuple[bytes, str]:
    """Send ``data``, read until the server ends the stream: what was read, and how it ended
    (``eof`` for a FIN, else the error's name)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect((host, port))
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as e:
            return received, type(e).__name__
        return received, "eof"


async def serve(reply: Any, data: bytes, ipv6: bool = False,
                nodelay: bool = False) -> tuple[bytes, str, RecorderFactory, int]:
    """One client's exchange with a listener of mqtt_broker.tcp whose protocol answers as
    ``reply`` says: what the client read, how the stream ended, the factory (once the
    connection is lost) and the port."""
    factory = RecorderFactory(reply)
    family, host = (socket.AF_INET6, "::1") if ipv6 else (socket.AF_INET, "127.0.0.1")
    endpoint = (TCP6ServerEndpoint if ipv6 else TCP4ServerEndpoint)(reactor, 0, interface=host)
    port = await tcp.listen(endpoint, factory, nodelay)
    try:
        assert type(port) is tcp.Port
        received, ending = await deferToThread(exchange, port.getHost().port, data, family, host)
        await factory.closed
        assert type(factory.made[0].transport) is tcp.Server
        return received, ending, factory, port.getHost().port
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connections_are_lean_and_close_at_once_when_nothing_is_left() -> None:
    seen: list[str] = []

    def reply(transport: Any, data: bytes) -> None:
        seen.extend((transport.logPrefix(), repr(transport)))
        transport.write(data.upper())
        transport.loseConnection()
        transport.write(b"!")  # written after loseConnection: still sent before the end

    received, ending, factory, port = await serve(reply, b"hello")
    assert (received, ending) == (b"HELLO!", "eof")
    transport = factory.made[0].transport
    assert "logstr" not in vars(transport) and "repstr" not in vars(transport)
    assert seen == ["Recorder", f"<Recorder #0 on {port}>"]
    assert repr(transport) == "<closed #0 on None>"  # the port is closed too
    assert factory.lost[0].check(ConnectionDone)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("ipv6", [False, True])
async def test_a_connection_sits_on_a_bare_nonblocking_socket_closed_on_exec(ipv6: bool) -> None:
    """Not socket.socket's Python wrapper: _socket's own object, whatever the family."""
    seen: list[tuple[Any, ...]] = []

    def reply(transport: Any, data: bytes) -> None:
        sock = transport.getHandle()
        seen.append((type(sock), sock.family, sock.gettimeout(), os.get_inheritable(sock.fileno()),
                     transport.getPeer().host))
        transport.write(data)
        transport.loseConnection()

    received, ending, factory, _ = await serve(reply, b"ping", ipv6)
    assert (received, ending) == (b"ping", "eof")
    family, host = (socket.AF_INET6, "::1") if ipv6 else (socket.AF_INET, "127.0.0.1")
    assert seen == [(_socket.socket, family, 0.0, False, host)]


@pytest_twisted.ensureDeferred
async def test_a_connection_with_nothing_to_write_closes_without_writing() -> None:
    """Its loseConnection neither waits for the socket to be writable nor writes to it."""
    writes: list[int] = []

    def reply(transport: Any, data: bytes) -> None:
        transport.startWriting = lambda: writes.append(1)  # would be the writable wait
        transport.loseConnection()

    received, ending, factory, _ = await serve(reply, b"bye")
    assert (received, ending, writes) == (b"", "eof", [])
    assert len(factory.lost) == 1 and factory.lost[0].check(ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_what_is_still_buffered_is_written_before_the_close() -> None:
    """More than the socket takes at once: Twisted's close, which writes it all first."""
    big = bytes(range(256)) * 40_000  # 10 MB: more than loopback's buffers

    def reply(transport: Any, data: bytes) -> None:
        transport.write(big)
        transport.loseConnection()

    received, ending, _, _ = await serve(reply, b"x")
    assert ending == "eof" and len(received) == len(big) and received == big


@pytest_twisted.ensureDeferred
async def test_an_abort_before_the_close_resets_and_is_lost_once() -> None:
    def reply(transport: Any, data: bytes) -> None:
        transport.loseConnection()
        transport.abortConnection()

    received, ending, factory, _ = await serve(reply, b"x")
    factory.made[0].transport._close()  # what loseConnection scheduled: nothing left to do
    assert (received, ending) == (b"", "ConnectionResetError")
    assert len(factory.lost) == 1 and factory.lost[0].check(ConnectionAborted)


@pytest_twisted.ensureDeferred
async def test_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.fail("the machine has no IPv6 loopback")
    received, ending, factory, _ = await serve(
        lambda transport, data: (transport.write(data), transport.loseConnection()), b"six", ipv6=True)
    assert (received, ending) == (b"six", "eof")
    assert factory.made[0].transport.getPeer().host == "::1"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("nodelay", [False, True])
async def test_nagle_is_off_from_the_start_where_the_listener_says_so(nodelay: bool) -> None:
    """Set once on the listening socket, which the accepted ones inherit; a connection still
    turns it on and off as it is told."""
    seen: list[bool] = []

    def reply(transport: Any, data: bytes) -> None:
        for enabled in (nodelay, not nodelay, nodelay):
            seen.append(transport.getTcpNoDelay())
            transport.setTcpNoDelay(not enabled)
        seen.append(transport.getTcpNoDelay())
        transport.write(data)
        transport.loseConnection()

    received, ending, _, _ = await serve(reply, b"ping", nodelay=nodelay)
    assert (received, ending) == (b"ping", "eof")
    assert seen == [nodelay, not nodelay, nodelay, not nodelay]


class _Refusing(tcp._Listening):
    """A listening socket whose next ``refusals`` accepts fail as a firewall rule makes them."""

    __slots__ = ("refusals",)

    def accept(self) -> tuple[Any, Any]:
        if self.refusals:
            self.refusals -= 1
            raise OSError(errno.EPERM, "refused by a firewall rule")
        return super().accept()


class _RefusingPort(tcp.Port):
    def createInternetSocket(self) -> socket.socket:
        return _Refusing(super().createInternetSocket())


@pytest_twisted.ensureDeferred
async def test_a_failure_to_accept_is_left_to_twisted_which_serves_the_next_connection() -> None:
    factory = RecorderFactory(lambda transport, data: (transport.write(data), transport.loseConnection()))
    port = _RefusingPort(0, factory, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    try:
        port.socket.refusals = 1
        with capturedLogs() as events:
            received, ending = await deferToThread(exchange, port.getHost().port, b"ping")
        assert (received, ending) == (b"ping", "eof")
        assert port.socket.refusals == 0
        assert not [event for event in events if event.get("isError") or "log_failure" in event]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_other_endpoints_and_reactors_listen_as_they_would(tmp_path: Any) -> None:
    memory = MemoryReactor()
    factory = RecorderFactory(None)
    await tcp.listen(TCP4ServerEndpoint(memory, 1883, interface="127.0.0.1"), factory)
    assert memory.tcpServers == [(1883, factory, 50, "127.0.0.1")]  # the endpoint's own listenTCP
    port = await tcp.listen(UNIXServerEndpoint(reactor, str(tmp_path / "s")), factory)
    try:
        assert not isinstance(port, tcp.Port)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("nodelay", [False, True])
async def test_the_broker_turns_nagle_off_as_configured(nodelay: bool) -> None:
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0,
                           set_tcp_nodelay=nodelay)
    broker.startService()
    try:
        with socket.create_connection(("127.0.0.1", broker.ports[0].getHost().port), timeout=WAIT) as client:
            client.sendall(b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c")
            assert await deferToThread(client.recv, 4) == b"\x20\x02\x00\x00"
            [connection] = broker.connections
            assert connection.transport.getTcpNoDelay() is nodelay
    finally:
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_the_broker_listens_with_it() -> None:
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0)
    broker.startService()
    try:
        assert [type(port) for port in broker.ports] == [tcp.Port]
        connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c"
        disconnect = b"\xe0\x00"
        received, ending = await deferToThread(exchange, broker.ports[0].getHost().port, connect + disconnect)
        assert (received, ending) == (b"\x20\x02\x00\x00", "eof")  # CONNACK, then the end
    finally:
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_the_broker_listens_before_twistd_sheds_roots_privileges() -> None:
    """docs/twistd.md: with --uid, a broker started as root may listen on ports below 1024.
    twistd calls privilegedStartService, then sheds root, then startService; the broker listened
    in startService only, so the bind of port 884 was refused. It listens in the first now, once."""
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0)
    broker.privilegedStartService()
    try:
        [port] = broker.ports
        broker.startService()
        assert broker.ports == [port]
        connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c"
        received, ending = await deferToThread(exchange, port.getHost().port, connect + b"\xe0\x00")
        assert (received, ending) == (b"\x20\x02\x00\x00", "eof")
    finally:
        await broker.stopService()
    broker.startService()  # (started again in one process, without twistd: it listens again)
    try:
        assert len(broker.ports) == 1
    finally:
        await broker.stopService()


def test_every_listener_kind_gets_listen_backlog() -> None:
    """mqtts: was left with its parser's 50, the default listen_backlog exists to replace."""
    from mqtt_broker.broker import with_backlog
    for kind in ("tcp:1883", "tcp6:1883", "ssl:8883:privateKey=k", "mqtts:8883:privateKey=k", "unix:/s",
                 "haproxy:tcp:1883"):
        assert with_backlog(kind, 1024) == f"{kind}:backlog=1024"
    assert with_backlog("mqtts:8883:backlog=5", 1024) == "mqtts:8883:backlog=5"


CONNECT = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c"
CONNACK = b"\x20\x02\x00\x00"


@pytest_twisted.ensureDeferred
async def test_behind_haproxy_a_clients_address_is_the_one_its_proxy_says() -> None:
    """haproxy: (any Twisted endpoint string may be given) tells the client's address in the PROXY
    header: that is the peer hooks, logs and the admin API show, not the proxy's; and its listener
    gets listen_backlog as any other."""
    broker = BrokerService(endpoints=["haproxy:tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0)
    broker.startService()
    try:
        [port] = broker.ports
        assert port.backlog == broker.config.listen_backlog
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=WAIT) as client:
            client.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 1883\r\n" + CONNECT)
            assert await deferToThread(client.recv, 4) == CONNACK
            assert [c.peer for c in broker.clients()] == ["203.0.113.7:5555"]
    finally:
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_behind_haproxy_a_client_that_never_connects_is_logged_with_its_own_address() -> None:
    """The peer was read again at CONNECT only: a client whose first packet after its PROXY header
    is not a CONNECT was logged with the proxy's address, one a log reader cannot act on."""
    broker = BrokerService(endpoints=["haproxy:tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0)
    broker.startService()
    try:
        with capturedLogs() as events:
            header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 1883\r\n"
            received, _ = await deferToThread(exchange, broker.ports[0].getHost().port, header + b"\xc0\x00")
            assert received == b""  # (a PINGREQ before CONNECT: closed [MQTT-3.1.0-1])
        [closing] = [e for e in events if "closing connection" in e.get("log_format", "")]
        assert closing["peer"] == "203.0.113.7:5555"
    finally:
        await broker.stopService()



@pytest.mark.parametrize("header", [
    b"PROXY TCP4 10.0.0.1\n2030-01-01T00:00:00_[-]_admin\x1b[2K 127.0.0.1 1 1883\r\n",
    b"PROXY TCP4 example.com 127.0.0.1 5555 1883\r\n",
    b"PROXY TCP4 2001:db8::1 127.0.0.1 5555 1883\r\n",
    b"PROXY TCP6 fe80::1%\x1b[2K\n2030-01-01T00:00:00_[-]_admin ::1 5555 1883\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 99999 1883\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 -1 1883\r\n",
], ids=["a-line-of-its-own", "a-name", "the-other-family", "a-scope-of-its-own", "a-port-past-65535",
        "a-negative-port"])
@pytest_twisted.ensureDeferred
async def test_behind_haproxy_a_header_whose_address_is_no_ip_address_of_its_family_is_refused(header: bytes) -> None:
    """Twisted's reader takes any bytes but a space for a v1 header's address: the broker would
    show them as the client's, to hooks and in its log, a line break and all."""
    broker = BrokerService(endpoints=["haproxy:tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0)
    seen: list[Any] = []
    broker.hooks.on_connect(seen.append)
    broker.startService()
    try:
        received, _ = await deferToThread(exchange, broker.ports[0].getHost().port, header + CONNECT)
        assert (received, seen) == (b"", [])
    finally:
        await broker.stopService()


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.mark.parametrize("header", [
    b"PROXY TCP6 2001:db8:0:0::1 ::1 6000 1883\r\n",
    V2_SIGNATURE + b"\x21\x21\x00\x24" + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + socket.inet_pton(socket.AF_INET6, "::1") + (6000).to_bytes(2, "big") + (1883).to_bytes(2, "big"),
], ids=["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_behind_haproxy_an_ipv6_clients_address_is_written_as_a_direct_clients(header: bytes) -> None:
    """As the kernel writes it, compressed: Twisted's v2 reader wrote all eight groups."""
    broker = BrokerService(endpoints=["haproxy:tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0)
    broker.startService()
    try:
        with socket.create_connection(("127.0.0.1", broker.ports[0].getHost().port), timeout=WAIT) as client:
            client.sendall(header + CONNECT)
            assert await deferToThread(client.recv, 4) == CONNACK
            assert [c.peer for c in broker.clients()] == ["[2001:db8::1]:6000"]
    finally:
        await broker.stopService()



class Collecting(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


V1_HEADER = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 1883\r\n"
V2_HEADER = (V2_SIGNATURE + b"\x21\x11\x00\x0c" + socket.inet_aton("203.0.113.7") + socket.inet_aton("127.0.0.1")
             + (5555).to_bytes(2, "big") + (1883).to_bytes(2, "big"))


@pytest.mark.parametrize("header,peer", [
    (V1_HEADER, "203.0.113.7:5555"),
    (V2_HEADER, "203.0.113.7:5555"),
    (b"PROXY UNKNOWN\r\n", "10.0.0.2:40000"),  # the shortest v1 header: the connection's own address
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", "10.0.0.2:40000"),
    (V2_SIGNATURE + b"\x20\x00\x00\x00", "10.0.0.2:40000"),  # LOCAL: the proxy's own health check
], ids=["v1", "v2", "v1-unknown", "v1-unknown-with-addresses", "v2-local"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-at-a-time"])
def test_behind_haproxy_a_header_may_come_in_pieces_and_say_unknown(header: bytes, peer: str, split: bool) -> None:
    """A header is a stream of bytes like any other (the PROXY protocol's spec, 2.1 and 2.2: the
    receiver waits for the whole of it): Twisted's reader closed a connection whose first read held
    fewer than 8 bytes (16 for v2), and refused v1's "PROXY UNKNOWN\\r\\n"."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from mqtt_broker.connecting import describe
    from mqtt_broker.proxy import ProxyHeaderFactory
    socket_peer = IPv4Address("TCP", "10.0.0.2", 40000)
    wrapper = ProxyHeaderFactory(Factory.forProtocol(Collecting)).buildProtocol(socket_peer)
    transport = StringTransport(peerAddress=socket_peer)
    wrapper.makeConnection(transport)
    data = header + CONNECT
    for chunk in [data[i:i + 1] for i in range(len(data))] if split else [data]:
        wrapper.dataReceived(chunk)
    assert not transport.disconnecting
    assert (wrapper.wrappedProtocol.received, describe(wrapper.getPeer())) == (CONNECT, peer)



def test_behind_haproxy_a_connection_closed_for_its_header_is_logged_once_per_thousand() -> None:
    """With the reason, and never the header's bytes (a client chose them); any client can open
    thousands a second: the first, then one in a thousand, with the count."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.logger import formatEvent

    from mqtt_broker.proxy import ProxyHeaderFactory
    factory = ProxyHeaderFactory(Factory.forProtocol(Collecting))
    socket_peer = IPv4Address("TCP", "10.0.0.2", 40000)
    with capturedLogs() as events:
        for data in [CONNECT] + [b"PROXY TCP4 10.0.0.1\n\x1b[2K 127.0.0.1 1 1883\r\n"] * 1000 + [b"GET / HTTP/1.1\r\n"]:
            wrapper = factory.buildProtocol(socket_peer)
            transport = StringTransport(peerAddress=socket_peer)
            wrapper.makeConnection(transport)
            wrapper.dataReceived(data)
            assert transport.disconnecting and wrapper.wrappedProtocol.received == b""
    assert [formatEvent(e) for e in events] == [
        "closing a connection from 10.0.0.2:40000: no PROXY header (1 closed for their header on this listener; "
        "logged once per thousand)",
        "closing a connection from 10.0.0.2:40000: its address that is no IPv4 address (1001 closed for"
        " their header on this listener; logged once per thousand)"]


def _left_socket(tmp_path: Any) -> str:
    """The path of a socket file a killed listener left: bound, closed, nothing listening."""
    path = str(tmp_path / "mqtt.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(path)  # (closed, its file stays)
    return path


async def _connack_on(path: str, before: bytes = b"") -> bytes:
    """What a client of the unix socket ``path`` is sent for its CONNECT (``before`` it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        client.connect(path)
        client.sendall(before + CONNECT)
        return await deferToThread(client.recv, 4)


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_clients_address_reads_as_one(tmp_path: Any) -> None:
    path = str(tmp_path / "mqtt.sock")
    broker = BrokerService(endpoints=[f"unix:{path}"], reactor=reactor, sys_interval=0)
    broker.startService()
    try:
        assert await _connack_on(path) == CONNACK
        assert [c.peer for c in broker.clients()] == ["unix"]  # (a client's socket has no path)
    finally:
        await broker.stopService()


@pytest.mark.parametrize("prefix", ["", "haproxy:"])
@pytest_twisted.ensureDeferred
async def test_a_unix_listener_starts_over_the_socket_and_lock_a_killed_broker_of_its_process_id_left(
        tmp_path: Any, prefix: str) -> None:
    """Killed (kill -9, the OOM killer), a broker leaves its socket and its lock, a link to its
    process id. Started again as the same process id (a container's process 1), it took the
    lock's owner for alive (itself) and refused to listen, at every start."""
    path = _left_socket(tmp_path)
    os.symlink(str(os.getpid()), f"{path}.lock")
    broker = BrokerService(endpoints=[f"{prefix}unix:{path}"], reactor=reactor, sys_interval=0)
    broker.startService()
    try:
        assert await _connack_on(path, b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 1883\r\n" if prefix else b"") == CONNACK
        assert os.readlink(f"{path}.lock") == str(os.getpid())  # (its own now)
    finally:
        await broker.stopService()


@pytest.mark.parametrize("options", ["", ":lockfile=0"])
@pytest_twisted.ensureDeferred
async def test_a_unix_listener_starts_over_a_socket_file_nothing_listens_on_without_a_lock(
        tmp_path: Any, options: str) -> None:
    """Mosquitto unlinks its socket's path before it binds: a converted listener 0 started where
    a killed Mosquitto (which takes no lock) left the socket file refused to listen, "Address
    already in use", as a listener with lockfile=0 did after a kill."""
    path = _left_socket(tmp_path)
    broker = BrokerService(endpoints=[f"unix:{path}{options}"], reactor=reactor, sys_interval=0)
    with capturedLogs() as events:
        broker.startService()
    try:
        assert await _connack_on(path) == CONNACK
        assert [e["path"] for e in events if "stale" in e.get("log_format", "")] == [path]
    finally:
        await broker.stopService()


@pytest.mark.parametrize("listening", [True, False])
def test_a_unix_listener_takes_no_socket_someone_listens_on_nor_a_file_that_is_no_socket(
        tmp_path: Any, listening: bool) -> None:
    path = str(tmp_path / "mqtt.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        if listening:
            other.bind(path)
            other.listen(1)
        else:
            Path(path).write_text("not a socket")
        broker = BrokerService(endpoints=[f"unix:{path}:lockfile=0"], reactor=reactor, sys_interval=0)
        with pytest.raises(CannotListenError, match="Address already in use"):
            broker.startService()
        if listening:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(WAIT)
                client.connect(path)
        else:
            assert Path(path).read_text() == "not a socket"


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_this_process_listens_on_is_not_taken_from_it(tmp_path: Any) -> None:
    """Its lock names this process too: a second broker on the same path refuses to listen, and
    the first keeps its socket."""
    path = str(tmp_path / "mqtt.sock")
    first = BrokerService(endpoints=[f"unix:{path}"], reactor=reactor, sys_interval=0)
    first.startService()
    try:
        second = BrokerService(endpoints=[f"unix:{path}"], reactor=reactor, sys_interval=0)
        with pytest.raises(CannotListenError, match="Cannot acquire lock"):
            second.startService()
        assert await _connack_on(path) == CONNACK
    finally:
        await first.stopService()


class _Later:
    """An endpoint that listens when told (as a plugin's may: onion:, say), on a real port."""

    def __init__(self) -> None:
        self.go: Deferred[None] = Deferred()
        self.ports: list[Any] = []

    def listen(self, factory: Any) -> Deferred[Any]:
        def listen(_: None) -> Deferred[Any]:
            return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(
                lambda port: self.ports.append(port) or port)
        listened: Deferred[Any] = Deferred()
        self.go.addCallback(listen).chainDeferred(listened)
        return listened


@pytest.fixture
def later(monkeypatch: Any) -> _Later:
    import mqtt_broker.broker
    endpoint = _Later()
    real = mqtt_broker.broker.server_endpoint
    monkeypatch.setattr(mqtt_broker.broker, "server_endpoint",
                        lambda reactor, description: endpoint if description.startswith("later:") else
                        real(reactor, description))
    return endpoint


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_listens_later_is_listened_on_then(later: _Later) -> None:
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1", "later:1"], reactor=reactor, sys_interval=0)
    with capturedLogs() as events:
        broker.startService()
        try:
            assert len(broker.ports) == 1
            later.go.callback(None)
            [_, port] = broker.ports
            assert await deferToThread(exchange, port.getHost().port, CONNECT + b"\xe0\x00") == (CONNACK, "eof")
        finally:
            await broker.stopService()
    assert [e["endpoint"] for e in events if "listening on" in e.get("log_format", "")] == [
        "tcp:0:interface=127.0.0.1", "later:1"]


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_fails_to_listen_later_is_told(later: _Later) -> None:
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1", "later:1"], reactor=reactor, sys_interval=0)
    with capturedLogs() as events:
        broker.startService()
        try:
            later.go.errback(OSError(98, "Address already in use"))
        finally:
            await broker.stopService()
    [failed] = [e for e in events if "log_failure" in e]
    assert failed["endpoint"] == "later:1" and failed["log_failure"].check(OSError)
    assert [e["endpoint"] for e in events if "listening on" in e.get("log_format", "")] == [
        "tcp:0:interface=127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_listens_after_the_stop_is_closed(later: _Later) -> None:
    """Its port came after stopService, which had closed the others: nothing closed it."""
    broker = BrokerService(endpoints=["later:1"], reactor=reactor, sys_interval=0)
    broker.startService()
    await broker.stopService()
    later.go.callback(None)
    [port] = later.ports
    try:
        await deferLater(reactor, 0, lambda: None)  # (a listener closes at the next turn)
        assert not port.connected
    finally:
        if port.connected:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_start_that_fails_closes_what_privilegedStartService_listened_on(tmp_path: Any) -> None:
    """twistd calls privilegedStartService (which listens), then startService: a store that could
    not be opened there left the port accepting clients of a broker that was not running."""
    (tmp_path / "file").write_text("")
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0,
                           persistence="sqlite", data_dir=str(tmp_path / "file"))
    broker.privilegedStartService()
    [port] = broker.ports
    try:
        with pytest.raises(Exception, match="cannot use the data directory"):
            broker.startService()
        await deferLater(reactor, 0, lambda: None)  # (a listener closes at the next turn)
        assert not port.connected and broker.ports == []
    finally:
        if port.connected:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_broker_started_without_twistd_listens_before_it_reads_its_store() -> None:
    """``python -m twisted`` calls startService only: the broker read its store (seconds for a
    large one) before it listened, and clients found no port meanwhile, where under twistd they
    wait for their CONNACK (docs/operations.md)."""
    from mqtt_broker.store.memory import MemoryStore

    class Watched(MemoryStore):
        def load(self, window: int = 0, max_bytes: int = 0) -> Any:
            listening.append(len(broker.ports))
            return super().load(window, max_bytes)
    listening: list[int] = []
    broker = BrokerService(endpoints=["tcp:0:interface=127.0.0.1"], reactor=reactor, sys_interval=0,
                           store=Watched())
    broker.startService()
    try:
        assert listening == [1]
    finally:
        await broker.stopService()


def test_one_endpoint_string_is_refused_as_the_setting_is() -> None:
    """A str where a list is wanted: refused as the setting refuses it, not listened on as one
    endpoint a character ("Unknown endpoint type: 't'" at the start)."""
    from mqtt_broker.config import ConfigError
    with pytest.raises(ConfigError, match="expected list"):
        BrokerService(endpoints="tcp:1883", sys_interval=0)


class _ReadCounting(tcp.Server):
    reads: list[Any] = []

    def doRead(self) -> Any:
        _ReadCounting.reads.append(self)
        return super().doRead()


class _CountingPort(tcp.Port):
    transport = _ReadCounting


@asynccontextmanager
async def _accepted(protocol: type[Recorder], reply: Any) -> AsyncIterator[RecorderFactory]:
    """A client that connected and sent a CONNECT, then the listener's ``doRead`` as the reactor
    calls it once the connection waits to be accepted (the reactor not running meanwhile): the
    factory, its protocol made, while the client is still connected."""
    _ReadCounting.reads = []
    factory = RecorderFactory(reply)
    factory.buildProtocol = lambda addr: protocol(factory)  # type: ignore[method-assign]
    port = _CountingPort(0, factory, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=WAIT) as client:
            client.sendall(b"CONNECT")
            readable, _, _ = select.select([port.socket], [], [], WAIT)
            assert readable, "the connection never reached the listener's queue"
            port.doRead()
            assert len(factory.made) == 1
            yield factory
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_accepted_connection_is_read_at_once() -> None:
    """In the same call as its accept, not after the reactor's next wait for events: an MQTT
    client's CONNECT is usually there already."""
    async with _accepted(Recorder, lambda transport, data: None) as factory:
        assert _ReadCounting.reads == [factory.made[0].transport]
        factory.made[0].transport.abortConnection()  # type: ignore[union-attr]
        await factory.closed


def _at_once(action: str) -> type[Recorder]:
    """A protocol that calls its transport's ``action`` (``loseConnection``, ...) as it is made."""
    class Acting(Recorder):
        def connectionMade(self) -> None:
            super().connectionMade()
            getattr(self.transport, action)()
    return Acting


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_as_it_is_made_is_not_read() -> None:
    async with _accepted(_at_once("loseConnection"), lambda transport, data: None) as factory:
        assert _ReadCounting.reads == []
        await factory.closed


@pytest_twisted.ensureDeferred
async def test_a_connection_paused_as_it_is_made_is_not_read() -> None:
    """A protocol that pauses its transport at once is read only once it resumes it."""
    async with _accepted(_at_once("pauseProducing"), lambda transport, data: transport.loseConnection()) as factory:
        assert _ReadCounting.reads == []
        factory.made[0].transport.resumeProducing()  # type: ignore[union-attr]
        await factory.closed  # read by the reactor once resumed, then closed by the reply
        assert _ReadCounting.reads


def test_the_open_files_limit_is_raised_and_its_hard_limit_kept(monkeypatch: Any) -> None:
    import resource

    from mqtt_broker import broker
    limits = {"now": (1024, resource.RLIM_INFINITY)}
    monkeypatch.setattr(broker.resource, "getrlimit", lambda kind: limits["now"])
    monkeypatch.setattr(broker.resource, "setrlimit", lambda kind, value: limits.update(now=value))
    broker._raise_open_files_limit()
    assert limits["now"] == (1 << 20, resource.RLIM_INFINITY)  # not lowered to 1 << 20 for good
    limits["now"] = (1024, 4096)
    broker._raise_open_files_limit()
    assert limits["now"] == (4096, 4096)

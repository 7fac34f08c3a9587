"""Listeners behind a proxy that tells each client's address in a PROXY header (``haproxy:``).

:class:`ProxyHeaderProtocol` is Twisted's reader of the header (``HAProxyProtocolWrapper``),
less what a log or a hook could be fooled by: Twisted takes any bytes but a space for a v1
header's address, and the broker would show them as the client's; here the header's addresses
must be IP addresses of its family, or the connection is closed, and they are written as the
kernel writes a direct client's (a v2 header's IPv6 one was not compressed). A v2 header that
speaks for a client of a UNIX socket gives the connection's own addresses, the proxy's: its path
is the proxy's business. And it waits for the whole header, as the spec has it: Twisted's closed
a connection whose first read held less than 8 bytes (16 for v2), and refused v1's shortest
header, ``PROXY UNKNOWN``.

Twisted's ``haproxy:`` wraps the listener it names: over ``ssl:`` or ``mqtts:`` its reader of
the header sits inside TLS, and looks for the header in the decrypted stream. A proxy sends it
first, in clear, and the client's TLS handshake after it (the PROXY protocol's spec, HAProxy's
``send-proxy``, AWS's load balancers): :class:`ProxiedTLSEndpoint` listens on TCP, reads the
header there, and runs TLS over what follows.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, _WrapperServerEndpoint
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

from .auth.tls import TLSServerEndpoint
from .connecting import describe
from .stats import once_per_thousand

log = Logger()


def checked(address: IAddress | None) -> IAddress | None:
    """A header's address as the broker shows it: an IP address of its family written as the
    kernel writes one (``2001:db8::1``); None for another kind, which the connection's own
    stands for. Raises ValueError (saying why, not what it holds) if it holds no such IP address."""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    family = 4 if isinstance(address, IPv4Address) else 6
    try:
        host = ipaddress.ip_address(address.host)
    except ValueError:
        host = None
    # (A scope id, "%" and whatever follows, is any bytes but a space, as the address was.)
    if host is None or host.version != family or getattr(host, "scope_id", None) is not None:
        raise ValueError(f"its address that is no IPv{family} address")
    if not 0 <= address.port <= 65535:
        raise ValueError("its port out of 0-65535")
    return type(address)(address.type, host.compressed, address.port)


V1_LONGEST = 107
"""The most bytes a v1 header holds, its CRLF included (the PROXY protocol's spec, 2.1)."""


def read_header(data: bytes) -> tuple[ProxyInfo, int] | None:
    """The PROXY header (v1 or v2) that ``data`` begins with, its addresses :func:`checked`, and
    its length; None while ``data`` is only its beginning. Raises ValueError, saying why (never
    with the header's bytes, which a client chose), if ``data`` begins with none."""
    if data.startswith(V2Parser.PREFIX):
        end = 16 + int.from_bytes(data[14:16], "big")
        if len(data) < max(16, end):
            return None
        try:
            info = V2Parser.parse(data[:end])
        except InvalidProxyHeader:
            raise ValueError("a v2 header that cannot be read") from None
    elif data.startswith(b"PROXY "):
        end = data.find(b"\r\n", 0, V1_LONGEST) + 2
        if end == 1:
            if len(data) >= V1_LONGEST:
                raise ValueError(f"a v1 header of more than {V1_LONGEST} bytes")
            return None
        line = data[:end - 2]
        # UNKNOWN, whatever follows it: the connection's own addresses (2.1). Twisted's reader
        # refuses the shortest header, "PROXY UNKNOWN\r\n".
        try:
            info = ProxyInfo(line, None, None) if line.split(b" ")[1] == b"UNKNOWN" else V1Parser.parse(line)
        except (InvalidProxyHeader, ValueError):  # (ValueError: a port that is no number)
            raise ValueError("a v1 header that cannot be read") from None
    elif V2Parser.PREFIX.startswith(data) or b"PROXY ".startswith(data):
        return None
    else:
        raise ValueError("no PROXY header")
    source = checked(info.source)
    return ProxyInfo(info.header, source, checked(info.destination) if source else None), end


class ProxyHeaderProtocol(HAProxyProtocolWrapper):
    """Reads the PROXY header (v1 or v2) before anything else, however it comes in pieces; then
    tells its addresses. connect_timeout ends a connection that never finishes it."""

    _read = b""
    """What came of the header so far."""

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        data = self._read + data
        try:
            read = read_header(data)
        except ValueError as e:
            self._refuse(str(e))
            return
        if read is None:
            self._read = data
            return
        self._proxyInfo, end = read
        self._read = b""
        if len(data) > end:
            self.wrappedProtocol.dataReceived(data[end:])

    def _refuse(self, why: str) -> None:
        """Close the connection for its header: logged the first time, then ``once_per_thousand``
        (a client may open thousands a second)."""
        factory = self.factory
        assert isinstance(factory, ProxyHeaderFactory)
        factory.refused += 1
        if once_per_thousand(factory.refused):
            assert self.transport is not None
            log.warn("closing a connection from {peer}: {why} ({refused} closed for their header on this listener; "
                     "logged once per thousand)", peer=describe(self.transport.getPeer()), why=why,
                     refused=factory.refused)
        self.loseConnection()


class ProxyHeaderFactory(HAProxyWrappingFactory):
    protocol = ProxyHeaderProtocol  # type: ignore[assignment]  # (a subclass: Twisted's Self in its __init__ puts mypy off)
    refused = 0
    """How many connections it closed for their header."""


def proxied(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """``endpoint``, its connections read by :class:`ProxyHeaderProtocol`; over TLS, a
    :class:`ProxiedTLSEndpoint`."""
    if isinstance(endpoint, TLSServerEndpoint):
        return ProxiedTLSEndpoint.around(endpoint)
    return _WrapperServerEndpoint(endpoint, ProxyHeaderFactory)


class ProxiedTLSEndpoint(TLSServerEndpoint):
    """A TLS listener (``haproxy:ssl:``, ``haproxy:mqtts:``) whose connections begin with a
    PROXY header in clear."""

    @classmethod
    def around(cls, endpoint: TLSServerEndpoint) -> ProxiedTLSEndpoint:
        """The one that listens where ``endpoint`` would, with its TLS."""
        return cls(endpoint._reactor, endpoint._port, endpoint.tls, backlog=endpoint._backlog,  # type: ignore[attr-defined]
                   interface=endpoint._interface)  # type: ignore[attr-defined]

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        tls = TLSMemoryBIOFactory(self.tls, False, protocolFactory)
        listening = TCP4ServerEndpoint(self._reactor, self._port, self._backlog, self._interface)  # type: ignore[attr-defined]
        return listening.listen(ProxyHeaderFactory(tls))


__all__ = ["V1_LONGEST", "ProxiedTLSEndpoint", "ProxyHeaderFactory", "ProxyHeaderProtocol", "checked", "proxied", "read_header"]

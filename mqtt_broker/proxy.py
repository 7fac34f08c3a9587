"""Listeners behind a proxy that tells each client's address in a PROXY header (``haproxy:``).

Twisted's ``haproxy:`` wraps the listener it names: over ``ssl:`` or ``mqtts:`` its reader of
the header sits inside TLS, and looks for the header in the decrypted stream. A proxy sends it
first, in clear, and the client's TLS handshake after it (the PROXY protocol's spec, HAProxy's
``send-proxy``, AWS's load balancers): :class:`ProxiedTLSEndpoint` listens on TCP, reads the
header there, and runs TLS over what follows.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

from .auth.tls import TLSServerEndpoint


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
        return listening.listen(HAProxyWrappingFactory(tls))


__all__ = ["ProxiedTLSEndpoint"]

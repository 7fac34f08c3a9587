"""The ``mqtts:`` server endpoint: TLS that requires and verifies client certificates.

Twisted's ``ssl:`` endpoint cannot ask clients for a certificate. This one can::

    mqtts:8883:privateKey=server.key:certKey=server.pem:caCerts=ca.pem
    mqtts:8883:privateKey=server.key:certKey=server.pem:caCerts=ca.pem:requireCertificate=no
    mqtts:port=8883:interface=127.0.0.1:privateKey=...:certKey=...:caCerts=...:backlog=1024

``port`` (first positional argument or ``port=``), ``privateKey`` (PEM key file), ``certKey``
(PEM certificate file; defaults to ``privateKey``), ``interface``, ``backlog``,
``extraCertChain`` and ``dhParameters`` mean what they mean for ``ssl:``. Then:

- ``caCerts`` (required): a PEM file of one or more CA certificates; a client certificate must
  chain to one of them.
- ``requireCertificate`` (``yes``/``no``, default ``yes``): with ``no``, a client may connect
  without a certificate, but one it sends must still verify.

Only TLS 1.2 and newer are accepted, as on ``ssl:``. The identity in the verified certificate
is read by :func:`mqtt_broker.auth.certificates.certificate_identity` (settings
``use_identity_as_username``, ``certificate_identity``).

Registered as a Twisted plugin by ``twisted/plugins/mqttbroker_mqtts.py``, so every endpoint
string in the broker (and ``twisted.internet.endpoints.serverFromString``) understands it. This
module is imported whenever Twisted lists plugins (``twistd --help``): it imports nothing heavy
until an endpoint is parsed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

_TRUE = ("yes", "true", "1", "on")
_FALSE = ("no", "false", "0", "off")
_OPTIONS = {"port", "privateKey", "certKey", "caCerts", "requireCertificate", "interface", "backlog",
            "extraCertChain", "dhParameters"}


def _flag(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}= must be yes or no, not {text!r}")


def server_from_arguments(reactor: Any, port: str | None = None, privateKey: str = "server.pem",
                          certKey: str | None = None, caCerts: str | None = None,
                          requireCertificate: str = "yes", interface: str = "", backlog: str = "50",
                          extraCertChain: str | None = None, dhParameters: str | None = None,
                          ) -> IStreamServerEndpoint:
    """The endpoint for parsed ``mqtts:`` arguments. Raises ValueError on a bad option and
    OSError on a file that cannot be read (as ``ssl:`` does). Its files can be read again
    (:class:`mqtt_broker.auth.tls.ServerTLS`)."""
    from .tls import ServerTLS, TLSFiles, TLSServerEndpoint

    if port is None:
        raise ValueError("mqtts: needs a port")
    if not caCerts:
        raise ValueError("mqtts: needs caCerts=<PEM file of the CAs that sign client certificates>")
    require = _flag("requireCertificate", requireCertificate)
    try:
        port_number, backlog_number = int(port), int(backlog)
    except ValueError:
        raise ValueError(f"mqtts: port and backlog must be numbers, got {port!r} and {backlog!r}") from None
    tls = ServerTLS(TLSFiles(private_key=privateKey, certificate=certKey or privateKey, ca_certs=caCerts,
                             require_certificate=require, extra_chain=extraCertChain, dh_parameters=dhParameters))
    return TLSServerEndpoint(reactor, port_number, tls, backlog=backlog_number, interface=interface)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MQTTSServerParser:
    """``mqtts:`` endpoint strings (see the module docstring)."""

    prefix = "mqtts"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamServerEndpoint:
        if len(args) > 1:
            raise ValueError(f"mqtts: takes one positional argument (the port), got {args!r}")
        if args and "port" in kwargs:
            raise ValueError("mqtts: port given twice")
        unknown = sorted(set(kwargs) - _OPTIONS)
        if unknown:
            raise ValueError(f"mqtts: unknown option {unknown[0]}= (known: {', '.join(sorted(_OPTIONS))})")
        return server_from_arguments(reactor, *args, **kwargs)


__all__ = ["MQTTSServerParser", "server_from_arguments"]

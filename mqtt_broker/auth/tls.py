"""TLS listeners (``ssl:`` and ``mqtts:``) whose key and certificate files can be read again.

Twisted's ``ssl:`` endpoint reads its files once, into a context that every handshake then
shares. Here each TLS listener gets a :class:`ServerTLS`: every new connection takes the
context made from the files as last read, and :meth:`ServerTLS.reload` reads them again
(``BrokerService.reload()``, SIGHUP). A file that cannot be used, or a certificate that has
expired or is not valid yet, raises an error naming it, and the previous context stays;
connections already open keep the context they began with.

:func:`server_endpoint` builds ``ssl:`` listeners itself, with the options and defaults of
Twisted's parser (``privateKey``, ``certKey``, ``sslmethod``, ``extraCertChain``,
``dhParameters``, ``interface``, ``backlog``); ``mqtts:`` (:mod:`.endpoint`) uses
:class:`ServerTLS` too. Imported only when a TLS listener is made: OpenSSL stays unloaded
otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from zope.interface import implementer

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def certificates(path: str, option: str) -> list[Any]:
    """The OpenSSL certificates of a PEM file; raises OSError if it cannot be read, ValueError
    (naming it) if it holds none or a broken one."""
    from OpenSSL import crypto

    pems = _PEM_CERTIFICATE.findall(Path(path).read_bytes())
    if not pems:
        raise ValueError(f"{option}={path} holds no PEM certificate")
    try:
        return [crypto.load_certificate(crypto.FILETYPE_PEM, pem) for pem in pems]
    except crypto.Error:
        raise ValueError(f"{option}={path} holds a certificate that cannot be read") from None


class _Encrypted(Exception):
    pass


def _no_passphrase(*_: Any) -> bytes:
    # Without a callback OpenSSL asks for the passphrase on the terminal, and the reactor (a
    # reload, a bridge connecting) would wait for someone to type it.
    raise _Encrypted


def private_key(path: str, option: str) -> Any:
    """The OpenSSL key of a PEM file; raises OSError if it cannot be read, ValueError (naming it)
    if it holds none, or an encrypted one."""
    from OpenSSL import crypto

    try:
        return crypto.load_privatekey(crypto.FILETYPE_PEM, Path(path).read_bytes(), passphrase=_no_passphrase)
    except _Encrypted:
        raise ValueError(f"{option}={path} is encrypted: give the key unencrypted "
                         f"(openssl pkey -in KEY -out PLAIN), readable by the broker only") from None
    except crypto.Error:
        raise ValueError(f"{option}={path} holds no PEM private key") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSFiles:
    """The files of one TLS listener, and how to use them."""

    private_key: str
    certificate: str
    ca_certs: str | None = None
    """``mqtts:`` only: client certificates are verified against these CAs."""
    require_certificate: bool = True
    """With ``ca_certs``: refuse a client that sends no certificate."""
    extra_chain: str | None = None
    dh_parameters: str | None = None
    method: str | None = None
    """``ssl:``'s ``sslmethod``, the name of an ``OpenSSL.SSL`` method."""

    def options(self) -> Any:
        """The files read into a Twisted ``CertificateOptions``, its OpenSSL context made now so
        that a key that does not fit its certificate shows here rather than at a handshake.
        Raises OSError (a file that cannot be read; the error names it) or ValueError naming
        the file."""
        from OpenSSL import SSL
        from twisted.internet import ssl
        from twisted.python.filepath import FilePath

        # The certificates after the server's are its chain (a CA's fullchain.pem), sent with it
        # as Mosquitto's certfile and nginx's ssl_certificate send them.
        certificate, *chain = certificates(self.certificate, "certKey")
        key = private_key(self.private_key, "privateKey")
        settings: dict[str, Any] = {}
        if self.method is not None:
            method = getattr(SSL, self.method, None)
            if not isinstance(method, int):
                raise ValueError(f"sslmethod={self.method} is not an OpenSSL method")
            settings["method"] = method
        if self.extra_chain is not None:
            chain += certificates(self.extra_chain, "extraCertChain")
        if chain:
            settings["extraCertChain"] = chain
        if self.dh_parameters is not None:
            FilePath(self.dh_parameters).getContent()  # unreadable: OSError naming it, as ssl: does
            settings["dhParameters"] = ssl.DiffieHellmanParameters.fromFile(FilePath(self.dh_parameters))
        if self.ca_certs is not None:
            settings.update(verify=True, caCerts=certificates(self.ca_certs, "caCerts"),
                            requireCertificate=self.require_certificate,
                            raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        options = ssl.CertificateOptions(privateKey=key, certificate=certificate, **settings)
        try:
            options.getContext()
        except SSL.Error as e:
            raise ValueError(f"privateKey={self.private_key}, certKey={self.certificate}"
                             f"{', dhParameters=' + self.dh_parameters if self.dh_parameters else ''}: "
                             f"cannot be used together ({_openssl_reason(e)})") from None
        return options


def _openssl_reason(error: Exception) -> str:
    """The last OpenSSL reason of an error (e.g. "key values mismatch")."""
    reasons = [entry[2] for entry in error.args[0] if len(entry) == 3] if error.args and isinstance(
        error.args[0], list) else []
    return reasons[-1] if reasons else str(error)


EXPIRY_NOTICE = 14 * 24 * 3600.0
"""How long before a server certificate expires the broker warns of it (seconds)."""


def _dates_problem(certificate: Any, path: str, now: float, notice: float) -> str | None:
    """See :meth:`ServerTLS.dates_problem`; ``certificate`` is an OpenSSL one."""
    x509 = certificate.to_cryptography()
    not_before, not_after = x509.not_valid_before_utc, x509.not_valid_after_utc
    if now > not_after.timestamp():
        return f"certKey={path} has expired (notAfter {not_after:%Y-%m-%d %H:%M:%S} UTC)"
    if now < not_before.timestamp():
        return f"certKey={path} is not valid yet (notBefore {not_before:%Y-%m-%d %H:%M:%S} UTC)"
    if now > not_after.timestamp() - notice:
        return (f"certKey={path} expires within {notice / 86400:g} days "
                f"(notAfter {not_after:%Y-%m-%d %H:%M:%S} UTC)")
    return None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS side of a listener's new connections, made from :attr:`files` as last read."""

    def __init__(self, files: TLSFiles) -> None:
        """Reads the files; raises OSError or ValueError naming the one that cannot be used."""
        self.files = files
        self._options = files.options()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self._options.serverConnectionForTLS(tlsProtocol)

    def dates_problem(self, now: float) -> str | None:
        """Why clients will refuse the certificate in use at ``now`` (seconds since the epoch),
        or soon: it has expired, is not valid yet, or expires within :data:`EXPIRY_NOTICE`;
        None if none of these."""
        return _dates_problem(self._options.certificate, self.files.certificate, now, EXPIRY_NOTICE)

    def reload(self, now: float) -> None:
        """Read the files again. Raises OSError or ValueError naming the file, or a certificate
        that has expired at ``now`` (seconds since the epoch) or is not valid yet, and then the
        context in use stays."""
        options = self.files.options()
        problem = _dates_problem(options.certificate, self.files.certificate, now, 0.0)
        if problem is not None:
            raise ValueError(problem)
        self._options = options


class TLSServerEndpoint(SSL4ServerEndpoint):
    """An ``SSL4ServerEndpoint`` that shows its :class:`ServerTLS`, for reloading."""

    def __init__(self, reactor: Any, port: int, tls: ServerTLS, backlog: int = 50, interface: str = "") -> None:
        super().__init__(reactor, port, tls, backlog=backlog, interface=interface)
        self.tls = tls


def parse_description(description: str) -> tuple[list[str], dict[str, str]]:
    """The arguments of an endpoint string, split as Twisted splits them: ``:`` between
    arguments, the first ``=`` of one names it, a backslash escapes the next character."""
    parts: list[list[str]] = [[""]]
    characters = iter(description)
    for character in characters:
        if character == "\\":
            parts[-1][-1] += next(characters, "")
        elif character == ":":
            parts.append([""])
        elif character == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += character
    return [p[0] for p in parts if len(p) == 1], {p[0]: p[1] for p in parts if len(p) == 2}


def ssl_endpoint(reactor: Any, port: str, privateKey: str = "server.pem", certKey: str | None = None,
                 sslmethod: str | None = None, interface: str = "", backlog: str = "50",
                 extraCertChain: str | None = None, dhParameters: str | None = None) -> TLSServerEndpoint:
    """What Twisted's ``ssl:`` parser makes of these arguments, around a :class:`ServerTLS`."""
    tls = ServerTLS(TLSFiles(private_key=privateKey, certificate=certKey or privateKey, method=sslmethod,
                             extra_chain=extraCertChain, dh_parameters=dhParameters))
    return TLSServerEndpoint(reactor, int(port), tls, backlog=int(backlog), interface=interface)


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """``serverFromString``, except that an ``ssl:`` listener is built by :func:`ssl_endpoint`
    so that its certificate can be reloaded (``mqtts:`` does so itself), and that ``haproxy:``
    reads its PROXY header with :mod:`mqtt_broker.proxy`, over TLS before the handshake."""
    kind, _, inner = description.partition(":")
    if kind == "haproxy" and inner:
        from ..proxy import proxied

        return proxied(server_endpoint(reactor, inner))
    if kind != "ssl":
        return serverFromString(reactor, description)
    arguments, options = parse_description(description)
    return ssl_endpoint(reactor, *arguments[1:], **options)


__all__ = ["EXPIRY_NOTICE", "ServerTLS", "TLSFiles", "TLSServerEndpoint", "certificates", "parse_description", "server_endpoint",
           "ssl_endpoint"]

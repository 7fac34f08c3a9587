"""The identity in a verified client certificate: its common name, subject or an alternative name.

Only a certificate that the TLS layer verified counts. Twisted's stock ``ssl:`` endpoint never
asks a client for one; the ``mqtts:`` endpoint (:mod:`mqtt_broker.auth.endpoint`) requires it
and verifies it against ``caCerts``.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

FIELDS = ("cn", "subject", "dns", "email", "uri")
"""What can name a client: ``cn`` (the subject's first common name, as Mosquitto's
``use_identity_as_username``), ``subject`` (the whole subject as an RFC 4514 string, close to
Mosquitto's ``use_subject_as_username``), or the first ``dns``, ``email`` or ``uri`` subject
alternative name."""

_SAN_TYPES: dict[str, Any] = {
    "dns": x509.DNSName, "email": x509.RFC822Name, "uri": x509.UniformResourceIdentifier}


def identity_of(certificate: x509.Certificate, field: str = "cn") -> str | None:
    """The ``field`` (one of :data:`FIELDS`) of a certificate, or None when it has none."""
    if field == "cn":
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = names[0].value if names else None
        return value if isinstance(value, str) and value else None
    if field == "subject":
        return certificate.subject.rfc4514_string() or None
    kind = _SAN_TYPES.get(field)
    if kind is None:
        raise ValueError(f"unknown certificate field {field!r}; one of {', '.join(FIELDS)}")
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    values = alternative.value.get_values_for_type(kind)
    return str(values[0]) if values else None


def certificate_identity(transport: Any, field: str = "cn") -> str | None:
    """The identity of the client certificate that ``transport`` verified, or None (none
    verified, or one without ``field``)."""
    certificate = verified_certificate(transport)
    return None if certificate is None else identity_of(certificate, field)


def verified_certificate(transport: Any) -> x509.Certificate | None:
    """The client certificate that ``transport`` verified, or None.

    ``transport`` is a connection's transport (``protocol.transport``). None when it is not TLS,
    when the client sent no certificate, or when the certificate was not verified against a
    trusted CA (``getHandle().get_verified_chain()``), so a self-signed certificate offered to an
    endpoint that did not check it never names anyone.
    """
    get_certificate = getattr(transport, "getPeerCertificate", None)
    if get_certificate is None:
        return None
    try:
        certificate = get_certificate()
        if certificate is None:
            return None
        handle = transport.getHandle()
        verified = getattr(handle, "get_verified_chain", None)
        if verified is None or not verified():
            return None
        if not isinstance(certificate, x509.Certificate):
            certificate = certificate.to_cryptography()
    except Exception:  # a transport that is closing, or not an OpenSSL one: no identity
        return None
    return certificate


__all__ = ["FIELDS", "certificate_identity", "identity_of", "verified_certificate"]

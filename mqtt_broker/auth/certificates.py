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
``use_identity_as_username``), ``subject`` (the whole subject, written as Mosquitto's
``use_subject_as_username`` writes it: see :func:`subject_of`), or the first ``dns``, ``email``
or ``uri`` subject alternative name."""

_SAN_TYPES: dict[str, Any] = {
    "dns": x509.DNSName, "email": x509.RFC822Name, "uri": x509.UniformResourceIdentifier}


def identity_of(certificate: x509.Certificate, field: str = "cn") -> str | None:
    """The ``field`` (one of :data:`FIELDS`) of a certificate, or None when it has none."""
    if field == "cn":
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = names[0].value if names else None
        return value if isinstance(value, str) and value else None
    if field == "subject":
        return subject_of(certificate) or None
    kind = _SAN_TYPES.get(field)
    if kind is None:
        raise ValueError(f"unknown certificate field {field!r}; one of {', '.join(FIELDS)}")
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    values = alternative.value.get_values_for_type(kind)
    return str(values[0]) if values else None


# OpenSSL's short names where they are not cryptography's (which writes the others as dotted OIDs).
_OPENSSL_NAMES = {
    NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.SERIAL_NUMBER: "serialNumber", NameOID.STREET_ADDRESS: "street",
    NameOID.TITLE: "title", NameOID.GIVEN_NAME: "GN", NameOID.SURNAME: "SN", NameOID.INITIALS: "initials",
    NameOID.GENERATION_QUALIFIER: "generationQualifier", NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.PSEUDONYM: "pseudonym", NameOID.POSTAL_CODE: "postalCode", NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC", NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL", NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
}


def subject_of(certificate: x509.Certificate) -> str:
    """The subject as Mosquitto's ``use_subject_as_username`` writes it (OpenSSL's RFC 2253 form:
    its short names, and each byte of a non-ASCII character escaped as ``\\XX``), so that the
    ``user`` lines of an acl_file written for Mosquitto name the same clients."""
    return _escaped(certificate.subject.rfc4514_string(_OPENSSL_NAMES))


def _escaped(text: str) -> str:
    return text if text.isascii() else "".join(
        c if c.isascii() else "".join(f"\\{b:02X}" for b in c.encode("utf-8")) for c in text)


def certificate_identity(transport: Any, field: str = "cn") -> str | None:
    """The identity of the client certificate that ``transport`` verified, or None (none
    verified, or one without ``field``)."""
    return verified_identity(transport, field)[1]


def verified_identity(transport: Any, field: str = "cn") -> tuple[bool, str | None]:
    """Whether ``transport`` verified a client certificate, and its ``field`` (None without one).

    ``transport`` is a connection's transport (``protocol.transport``). Not verified when it is
    not TLS, when the client sent no certificate, or when the certificate was not verified
    against a trusted CA (``getHandle().get_verified_chain()``), so a self-signed certificate
    offered to an endpoint that did not check it never names anyone. A certificate OpenSSL
    verified that cryptography's stricter reading refuses (a "_" in a PrintableString, as lax
    CAs write them) is verified all the same, named by its subject as OpenSSL reads it.
    """
    get_certificate = getattr(transport, "getPeerCertificate", None)
    if get_certificate is None:
        return False, None
    try:
        peer = get_certificate()
        verified = getattr(transport.getHandle(), "get_verified_chain", None)
        if peer is None or verified is None or not verified():
            return False, None
    except Exception:  # a transport that is closing, or not an OpenSSL one: no identity
        return False, None
    if isinstance(peer, x509.Certificate):
        return True, identity_of(peer, field)
    try:
        certificate = peer.to_cryptography()
    except Exception:
        return True, _openssl_identity(peer, field)
    return True, identity_of(certificate, field)


def _openssl_identity(peer: Any, field: str) -> str | None:
    """``identity_of`` for a certificate only OpenSSL reads: its common name or its subject (the
    alternative names, which it would take cryptography to read, are none)."""
    try:
        components = [(name.decode(), value.decode("utf-8", "replace"))
                      for name, value in peer.get_subject().get_components()]
    except Exception:
        return None
    if field == "cn":
        return next((value for name, value in components if name == "CN" and value), None)
    if field == "subject":
        special = str.maketrans({c: "\\" + c for c in ',+"\\<>;'})  # (RFC 2253's, as OpenSSL escapes them)
        return ",".join(f"{name}={_escaped(value.translate(special))}" for name, value in reversed(components)) or None
    return None


__all__ = ["FIELDS", "certificate_identity", "identity_of", "verified_identity"]

"""The identity in a verified client certificate: its common name, subject or an alternative name.

Only a certificate that the TLS layer verified counts. Twisted's stock ``ssl:`` endpoint never
asks a client for one; the ``mqtts:`` endpoint (:mod:`mqtt_broker.auth.endpoint`) requires it
and verifies it against ``caCerts``.
"""

from __future__ import annotations

from typing import Any, Iterator

from cryptography import x509
from cryptography.x509.oid import NameOID

FIELDS = ("cn", "subject", "dns", "email", "uri")
"""What can name a client: ``cn`` (the subject's first common name, as Mosquitto's
``use_identity_as_username``), ``subject`` (the whole subject, written as Mosquitto's
``use_subject_as_username`` writes it: see :func:`subject_of`), or the first ``dns``, ``email``
or ``uri`` subject alternative name."""

_COMMON_NAME = NameOID.COMMON_NAME.dotted_string

_SAN_TYPES: dict[str, Any] = {
    "dns": x509.DNSName, "email": x509.RFC822Name, "uri": x509.UniformResourceIdentifier}


def identity_of(certificate: x509.Certificate, field: str = "cn") -> str | None:
    """The ``field`` (one of :data:`FIELDS`) of a certificate, or None when it has none (or one
    that names nobody: see :func:`_named`)."""
    if field == "cn":
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = names[0].value if names else None
        return _named(value) if isinstance(value, str) else None
    if field == "subject":
        return subject_of(certificate) or None  # (a NUL in it written as \00)
    kind = _SAN_TYPES.get(field)
    if kind is None:
        raise ValueError(f"unknown certificate field {field!r}; one of {', '.join(FIELDS)}")
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    values = alternative.value.get_values_for_type(kind)
    return _named(str(values[0])) if values else None


def _named(identity: str) -> str | None:
    """``identity``, or None when it is empty or holds a NUL: no MQTT user name holds U+0000
    [MQTT-1.5.4-2], and a CA that signed "admin\\0.devices.example" for the owner of
    devices.example did not name anyone "admin" (the null-prefix trick, which Mosquitto refuses
    too)."""
    return identity if identity and "\x00" not in identity else None


def subject_of(certificate: x509.Certificate) -> str:
    """The subject as Mosquitto's ``use_subject_as_username`` writes it, so that the ``user``
    lines of an acl_file written for Mosquitto name the same clients: see :func:`_rfc2253`."""
    return _rfc2253(_subject(certificate.tbs_certificate_bytes))


def _short_names(prefix: str, first: int, names: str) -> dict[str, str]:
    return {f"{prefix}.{first + n}": name for n, name in enumerate(names.split())}


# OpenSSL's short names (OBJ_nid2sn) of the attribute types a name may hold, by OID: under each
# prefix, those of consecutive arcs from the first. (OpenSSL 3.0's; it has more OIDs, which no
# name holds: algorithms, extensions.)
_OPENSSL_NAMES = {
    **_short_names("2.5.4", 3, """CN SN serialNumber C L ST street O OU title description searchGuide
        businessCategory postalAddress postalCode postOfficeBox physicalDeliveryOfficeName telephoneNumber
        telexNumber teletexTerminalIdentifier facsimileTelephoneNumber x121Address internationaliSDNNumber
        registeredAddress destinationIndicator preferredDeliveryMethod presentationAddress
        supportedApplicationContext member owner roleOccupant seeAlso userPassword userCertificate
        cACertificate authorityRevocationList certificateRevocationList crossCertificatePair name GN initials
        generationQualifier x500UniqueIdentifier dnQualifier enhancedSearchGuide protocolInformation
        distinguishedName uniqueMember houseIdentifier supportedAlgorithms deltaRevocationList dmdName"""),
    "2.5.4.65": "pseudonym", "2.5.4.72": "role",
    **_short_names("2.5.4", 97, "organizationIdentifier c3 n3 dnsName"),
    **_short_names("1.2.840.113549.1.9", 1, """emailAddress unstructuredName contentType messageDigest
        signingTime countersignature challengePassword unstructuredAddress extendedCertificateAttributes"""),
    **_short_names("0.9.2342.19200300.100.1", 1, """UID textEncodedORAddress mail info favouriteDrink
        roomNumber photo userClass host manager documentIdentifier documentTitle documentVersion
        documentAuthor documentLocation"""),
    **_short_names("0.9.2342.19200300.100.1", 20, """homeTelephoneNumber secretary otherMailbox
        lastModifiedTime lastModifiedBy DC aRecord pilotAttributeType27 mXRecord nSRecord sOARecord
        cNAMERecord"""),
    **_short_names("0.9.2342.19200300.100.1", 37, """associatedDomain associatedName homePostalAddress
        personalTitle mobileTelephoneNumber pagerTelephoneNumber friendlyCountryName uid organizationalStatus
        janetMailbox mailPreferenceOption buildingName dSAQuality singleLevelQuality subtreeMinimumQuality
        subtreeMaximumQuality personalSignature dITRedirect audio documentPublisher"""),
    **_short_names("1.3.6.1.4.1.311.60.2.1", 1, "jurisdictionL jurisdictionST jurisdictionC"),
}

_UTF8_STRING = 0x0C
_WIDTHS = {0x12: 1, 0x13: 1, 0x14: 1, 0x16: 1, 0x17: 1, 0x18: 1, 0x1A: 1, 0x1C: 4, 0x1E: 2}
"""Bytes per character of the other string types OpenSSL writes as text, by tag: Numeric,
Printable, Teletex (read as Latin-1), IA5, the two times, Visible; Universal; BMP."""

_SPECIAL = frozenset(b',+"\\<>;')

_Attribute = tuple[str, int, bytes, bytes]
"""An attribute of a name: its type's OID, and its value's tag, contents and whole DER."""


def _rfc2253(rdns: list[list[_Attribute]]) -> str:
    """A name as OpenSSL's ``X509_NAME_print_ex(..., XN_FLAG_RFC2253)`` writes it: attributes
    from the last to the first (those of a multi-valued RDN too, joined by "+"), named by
    OpenSSL's short names; values converted to UTF-8 and escaped by :func:`_escaped`; an
    attribute of a type OpenSSL has no name for, or a value of a type it does not write as text,
    as "#" and the value's DER in hex, the type then named by its OID."""
    def written(oid: str, tag: int, contents: bytes, whole: bytes) -> str:
        name, text = _OPENSSL_NAMES.get(oid), _text(tag, contents)
        if name is None or text is None:
            return f"{name or oid}=#{whole.hex().upper()}"
        return f"{name}={_escaped(text)}"
    return ",".join("+".join(written(*attribute) for attribute in reversed(rdn)) for rdn in reversed(rdns))


def _text(tag: int, contents: bytes) -> bytes | None:
    """A string's characters in UTF-8 as OpenSSL converts them, or None for a type it dumps."""
    if tag == _UTF8_STRING:
        return contents
    width = _WIDTHS.get(tag)
    if width is None:
        return None
    points = (int.from_bytes(contents[at:at + width], "big") for at in range(0, len(contents) - width + 1, width))
    # (Not a character, a surrogate or past U+10FFFF, which OpenSSL refuses to read anyway: left out.)
    return "".join(chr(p) for p in points if p < 0x110000 and not 0xD800 <= p < 0xE000).encode("utf-8")


def _escaped(text: bytes) -> str:
    """RFC 2253's escaping as OpenSSL does it: a backslash before ``,+"\\<>;``, before a space
    that begins or ends the value and before a "#" that begins it (unless it is the whole value),
    and each control or non-ASCII byte as ``\\XX``."""
    last = len(text) - 1
    return "".join(
        "\\" + chr(byte) if byte in _SPECIAL or (byte == 0x20 and at in (0, last)) or (byte == 0x23 and at == 0 < last)
        else f"\\{byte:02X}" if byte < 0x20 or byte >= 0x7F else chr(byte)
        for at, byte in enumerate(text))


def _subject(tbs_certificate: bytes) -> list[list[_Attribute]]:
    """The subject's RDNs, in a TBSCertificate's DER."""
    [(_, fields, _)] = _elements(tbs_certificate)
    # (version [0], optional), serialNumber, signature, issuer, validity, subject
    tagged = [(tag, contents) for tag, contents, _ in _elements(fields)]
    _, subject = tagged[5 if tagged[0][0] == 0xA0 else 4]
    rdns: list[list[_Attribute]] = []
    for _, rdn, _ in _elements(subject):
        attributes: list[_Attribute] = []
        for _, attribute, _ in _elements(rdn):
            (_, oid, _), (tag, contents, whole) = _elements(attribute)
            attributes.append((_dotted(oid), tag, contents, whole))
        rdns.append(attributes)
    return rdns


def _elements(der: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """The DER elements in ``der``, one after the other: each one's tag, contents and whole."""
    at = 0
    while at < len(der):
        start, tag, size = at, der[at], der[at + 1]
        at += 2
        if size & 0x80:
            count = size & 0x7F
            size, at = int.from_bytes(der[at:at + count], "big"), at + count
        if at + size > len(der):
            raise ValueError("a DER element longer than what holds it")
        yield tag, der[at:at + size], der[start:at + size]
        at += size


def _dotted(oid: bytes) -> str:
    """An OBJECT IDENTIFIER's contents as "2.5.4.3"."""
    arcs, arc = [], 0
    for byte in oid:
        arc = arc << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(arc)
            arc = 0
    first = min(arcs[0] // 40, 2)  # (the first two arcs share a number: 40 * first + second)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


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
    try:
        certificate = peer if isinstance(peer, x509.Certificate) else peer.to_cryptography()
    except Exception:
        return True, _openssl_identity(peer, field)
    try:
        return True, identity_of(certificate, field)
    except ValueError:  # (cryptography reads a certificate's fields as they are asked for)
        return True, None  # one OpenSSL verified that names nobody as read here


def _openssl_identity(peer: Any, field: str) -> str | None:
    """``identity_of`` for a certificate only OpenSSL reads: its common name or its subject (the
    alternative names, which it would take cryptography to read, are none)."""
    from OpenSSL import crypto
    try:
        [(_, certificate, _)] = _elements(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer))
        rdns = _subject(next(_elements(certificate))[2])
    except Exception:
        return None
    if field == "cn":
        name = next((text for rdn in rdns for oid, tag, contents, _ in rdn
                     if oid == _COMMON_NAME and (text := _text(tag, contents))), None)
        return _named(name.decode("utf-8", "replace")) if name is not None else None
    if field == "subject":
        return _rfc2253(rdns) or None
    return None


__all__ = ["FIELDS", "certificate_identity", "identity_of", "verified_identity"]

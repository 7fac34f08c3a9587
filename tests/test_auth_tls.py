"""The mqtts: endpoint (client certificates required and verified) and the identity taken from a
certificate: real TLS on loopback with certificates made by certs/make-certs.sh, Python's ssl
and mosquitto_pub as clients, and the plugin as twistd finds it."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from conftest import ROOT, BrokerProcess
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type  # (private: how a NameAttribute is given a string type)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage

from mqtt_broker.auth import Security
from mqtt_broker.auth.certificates import FIELDS, certificate_identity, identity_of
from mqtt_broker.auth.endpoint import MQTTSServerParser
from mqtt_broker.config import BrokerConfig
from mqtt_broker.tap import Options

MAKE_CERTS = ROOT / "certs" / "make-certs.sh"
WAIT = 10.0


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_pair(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
    (directory / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def issue(subject: x509.Name, issuer_name: x509.Name, issuer_key: Any, key: Any,
          alternative: list[x509.GeneralName] | None = None, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if alternative:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make-certs.sh's CA, server and client (CN=client); a client with alternative names from
    the same CA; and a client from a CA nobody trusts."""
    directory = tmp_path_factory.mktemp("certs")
    result = subprocess.run(["bash", str(MAKE_CERTS), str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ca_certificate = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    key = new_key()
    named = issue(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Plant 7"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "sensor-7")]),
                  ca_certificate.subject, ca_key, key,
                  [x509.DNSName("sensor-7.plant.example"), x509.RFC822Name("ops@plant.example"),
                   x509.UniformResourceIdentifier("spiffe://plant/sensor-7")])
    write_pair(directory, "named", key, named)
    rogue_ca_key = new_key()
    rogue_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA")])
    rogue_ca = issue(rogue_name, rogue_name, rogue_ca_key, rogue_ca_key, ca=True)
    key = new_key()
    write_pair(directory, "rogue", key, issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]),
                                             rogue_ca.subject, rogue_ca_key, key))
    return directory


def mqtts(certs: Path, *extra: str, port: int = 0) -> str:
    return ":".join([f"mqtts:{port}", "interface=127.0.0.1", f"privateKey={certs / 'server.key'}",
                     f"certKey={certs / 'server.pem'}", f"caCerts={certs / 'ca.pem'}", *extra])


class Reporter(Protocol):
    """Answers any data with the client certificate's identities, as JSON."""

    def dataReceived(self, data: bytes) -> None:
        report = {field: certificate_identity(self.transport, field) for field in FIELDS}
        report["security"] = Security.from_config(BrokerConfig(certificate_identity="dns")).certificate_identity(
            self.transport)
        self.transport.write(json.dumps(report).encode() + b"\n")  # type: ignore[union-attr]


@pytest.fixture
def listening(certs: Path) -> Iterator[Any]:
    ports: list[Any] = []

    async def listen(description: str) -> int:
        port = await serverFromString(reactor, description).listen(Factory.forProtocol(Reporter))
        ports.append(port)
        return int(port.getHost().port)

    yield listen
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def tls_exchange(port: int, certs: Path, client: str | None) -> dict[str, Any]:
    """Connect with Python's ssl (in a thread), send a line, return the server's report."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client is not None:
        context.load_cert_chain(str(certs / f"{client}.pem"), str(certs / f"{client}.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"hello\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = tls.recv(4096)
                if not chunk:
                    raise ConnectionError("closed by the server")
                data += chunk
    return json.loads(data)


async def exchange(port: int, certs: Path, client: str | None) -> dict[str, Any]:
    return await threads.deferToThread(tls_exchange, port, certs, client)


async def refused(port: int, certs: Path, client: str | None) -> bool:
    try:
        await exchange(port, certs, client)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


# --- the endpoint -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_verified_client_certificates_name_the_client(certs: Path, listening: Any) -> None:
    port = await listening(mqtts(certs))
    report = await exchange(port, certs, "client")
    assert report == {"cn": "client", "subject": "CN=client,O=mqtt_broker development", "dns": None,
                      "email": None, "uri": None, "security": None}
    report = await exchange(port, certs, "named")
    assert report == {"cn": "sensor-7", "subject": "CN=sensor-7,O=Plant 7", "dns": "sensor-7.plant.example",
                      "email": "ops@plant.example", "uri": "spiffe://plant/sensor-7",
                      "security": "sensor-7.plant.example"}


@pytest_twisted.ensureDeferred
async def test_certificate_required_and_verified(certs: Path, listening: Any) -> None:
    port = await listening(mqtts(certs))
    assert await refused(port, certs, None)
    assert await refused(port, certs, "rogue")
    assert not await refused(port, certs, "client")


@pytest_twisted.ensureDeferred
async def test_optional_certificate(certs: Path, listening: Any) -> None:
    port = await listening(mqtts(certs, "requireCertificate=no"))
    assert (await exchange(port, certs, None))["cn"] is None
    assert (await exchange(port, certs, "client"))["cn"] == "client"
    assert await refused(port, certs, "rogue")  # one that is sent must still verify


@pytest_twisted.ensureDeferred
async def test_stock_ssl_endpoint_gives_no_identity(certs: Path, listening: Any) -> None:
    port = await listening(f"ssl:0:interface=127.0.0.1:privateKey={certs / 'server.key'}:certKey={certs / 'server.pem'}")
    report = await exchange(port, certs, "client")  # the server never asks for the certificate
    assert all(value is None for value in report.values())


@pytest_twisted.ensureDeferred
async def test_plain_tcp_gives_no_identity(listening: Any) -> None:
    port = await listening("tcp:0:interface=127.0.0.1")

    def plain() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"hi")
            return s.recv(4096)

    assert all(v is None for v in json.loads(await threads.deferToThread(plain)).values())


def test_identity_of_edge_cases(certs: Path) -> None:
    key = new_key()
    nameless = issue(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no cn")]),
                     x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]), key, key)
    assert identity_of(nameless, "cn") is None and identity_of(nameless, "dns") is None
    assert identity_of(nameless, "subject") == "O=no cn"
    with pytest.raises(ValueError):
        identity_of(nameless, "serial")
    assert certificate_identity(object()) is None


# --- parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,problem", [
    ("caCerts=", "needs caCerts"), ("requireCertificate=maybe", "must be yes or no"),
    ("nosuchoption=1", "unknown option nosuchoption="), ("backlog=many", "must be numbers"),
])
def test_bad_options(certs: Path, extra: str, problem: str) -> None:
    description = mqtts(certs, extra)
    if extra == "caCerts=":
        description = description.replace(f":caCerts={certs / 'ca.pem'}", "") + ":caCerts="
    with pytest.raises(ValueError, match=problem):
        serverFromString(reactor, description)


def test_files(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        serverFromString(reactor, mqtts(certs).replace(str(certs / "ca.pem"), str(tmp_path / "absent.pem")))
    (tmp_path / "empty.pem").write_text("nothing here\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        serverFromString(reactor, mqtts(certs).replace(str(certs / "ca.pem"), str(tmp_path / "empty.pem")))
    with pytest.raises(ValueError, match="needs a port"):
        MQTTSServerParser().parseStreamServer(reactor, caCerts=str(certs / "ca.pem"))


def test_command_line(certs: Path) -> None:
    options = Options()
    options.parseOptions(["--endpoint", mqtts(certs, port=8883)])
    assert options["broker_config"].endpoints == [mqtts(certs, port=8883)]
    with pytest.raises(usage.UsageError, match="unknown option"):
        Options().parseOptions(["--endpoint", mqtts(certs, "bogus=1", port=8883)])
    # Like ssl:, files are left to start-up (twistd's --rundir is entered after parsing).
    Options().parseOptions(["--endpoint", "mqtts:8883:privateKey=k.pem:certKey=c.pem:caCerts=ca.pem"])


def test_plugin_is_light() -> None:
    """Twisted imports every plugin to list them (twistd --help): this one must stay cheap."""
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location(
            "plugin", {str(ROOT / "twisted" / "plugins" / "mqttbroker_mqtts.py")!r})
        plugin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
        heavy = ["twisted.internet.reactor", "OpenSSL", "twisted.internet.ssl", "cryptography.x509", "jwt",
                 "treq", "mqtt_broker.broker", "mqtt_broker.auth.tokens", "mqtt_broker.auth.http_auth"]
        print(json.dumps({{"prefix": plugin.mqtts.prefix, "loaded": [m for m in heavy if m in sys.modules]}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"prefix": "mqtts", "loaded": []}


def test_plugin_is_found() -> None:
    script = ("from twisted.plugin import getPlugins\n"
              "from twisted.internet.interfaces import IStreamServerEndpointStringParser\n"
              "print(sorted(p.prefix for p in getPlugins(IStreamServerEndpointStringParser)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "mqtts" in result.stdout


CONNECT = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c"
CONNACK = b"\x20\x02\x00\x00"


def proxy_then_tls(port: int, certs: Path, header: bytes) -> bytes:
    """What HAProxy's send-proxy (or an AWS NLB) sends on: the PROXY header in clear, then the
    client's TLS (with make-certs.sh's client certificate) and its CONNECT; the broker's answer."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        raw.sendall(header)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(CONNECT)
            return tls.recv(4)


@pytest.mark.parametrize("listener", ["ssl", "mqtts"])
@pytest_twisted.ensureDeferred
async def test_behind_haproxy_tls_begins_after_the_proxy_header(certs: Path, listener: str) -> None:
    """The PROXY header comes first on the connection, in clear, the TLS handshake after it: the
    client's address is the header's, and its certificate still names it."""
    from mqtt_broker import BrokerService
    tls = (mqtts(certs) if listener == "mqtts" else
           f"ssl:0:interface=127.0.0.1:privateKey={certs / 'server.key'}:certKey={certs / 'server.pem'}")
    broker = BrokerService(endpoints=[f"haproxy:{tls}"], reactor=reactor, sys_interval=0,
                           use_identity_as_username=listener == "mqtts")
    seen: list[Any] = []
    broker.hooks.on_connect(seen.append)
    broker.startService()
    try:
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 1883\r\n"
        answer = await threads.deferToThread(proxy_then_tls, broker.ports[0].getHost().port, certs, header)
        assert answer == CONNACK
        [client] = seen
        assert (client.peer, client.username) == ("203.0.113.7:5555", "client" if listener == "mqtts" else None)
    finally:
        await broker.stopService()


# --- end to end -------------------------------------------------------------------------------

def test_broker_listens_on_mqtts(certs: Path) -> None:
    """twistd finds the plugin: the broker listens on mqtts:, mosquitto_pub with a client
    certificate gets through, without one (or with an untrusted one) it does not."""
    from conftest import free_port
    port = free_port()
    broker = BrokerProcess(listen=mqtts(certs, port=port), port=port)
    try:
        def publish(*client: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(port), "--cafile",
                                   str(certs / "ca.pem"), *client, "-t", "t", "-m", "m", "-q", "1"],
                                  capture_output=True, timeout=WAIT)

        good = publish("--cert", str(certs / "client.pem"), "--key", str(certs / "client.key"))
        assert good.returncode == 0, good.stderr
        assert publish().returncode != 0
        assert publish("--cert", str(certs / "rogue.pem"), "--key", str(certs / "rogue.key")).returncode != 0
    finally:
        broker.stop()


def test_require_certificate_takes_a_verified_one_without_the_identity_field(certs: Path) -> None:
    """require_certificate asks for a verified certificate, nothing more: one without the
    certificate_identity field (no DNS name here) was refused as if there were none."""
    from conftest import free_port
    port = free_port()
    broker = BrokerProcess("--require-certificate", "true", "--certificate-identity", "dns",
                           listen=mqtts(certs, port=port), port=port)
    try:
        done = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(port), "--cafile", str(certs / "ca.pem"),
                               "--cert", str(certs / "client.pem"), "--key", str(certs / "client.key"),
                               "-t", "t", "-m", "m", "-q", "1"], capture_output=True, timeout=WAIT)
        assert done.returncode == 0, (done.stderr, broker.output()[-1000:])
    finally:
        broker.stop()


def test_the_subject_is_written_as_mosquittos_use_subject_as_username_writes_it() -> None:
    """Checked against Mosquitto 2.0.11: OpenSSL's short names (emailAddress, which `openssl req`
    asks for, and serialNumber, were dotted OIDs here) and non-ASCII escaped byte by byte: an
    acl_file `user` line written for Mosquitto names the same client."""
    key = new_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Plant 7"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Büro"), x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
        x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@plant.example"), x509.NameAttribute(NameOID.SERIAL_NUMBER, "42")])
    assert identity_of(issue(subject, subject, key, key), "subject") == (
        r"serialNumber=42,emailAddress=ops@plant.example,CN=dev-1,OU=B\C3\BCro,O=Plant 7,C=GB")


def _tlv(tag: int, body: bytes) -> bytes:
    n, size = len(body), (len(body).bit_length() + 7) // 8
    return bytes([tag]) + (bytes([n]) if n < 128 else bytes([0x80 | size]) + n.to_bytes(size, "big")) + body


class _Handshaken:
    """What the broker reads of a TLS transport (Twisted's TLSMemoryBIOProtocol), over a pyOpenSSL
    connection."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def getPeerCertificate(self) -> Any:
        return self._connection.get_peer_certificate()

    def getHandle(self) -> Any:
        return self._connection


def test_a_certificate_openssl_verified_counts_when_cryptography_will_not_read_it(tmp_path: Path) -> None:
    """A CA-signed certificate whose CN is the PrintableString "dev_1" ("_" is not in its alphabet,
    but lax CAs write such names): the mqtts: endpoint's OpenSSL verifies it, as Mosquitto's does,
    and cryptography refused to read it, so the client counted as having no verified certificate
    (require_certificate and use_identity_as_username refused it, 0x87)."""
    from OpenSSL import SSL, crypto

    from mqtt_broker.auth.tls import TLSFiles
    ca_key, server_key, client_key = (new_key() for _ in range(3))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lax CA")])
    ca = issue(ca_name, ca_name, ca_key, ca_key, ca=True)
    server = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, ca_key, server_key)
    write_pair(tmp_path, "ca", ca_key, ca)
    write_pair(tmp_path, "server", server_key, server)
    # Made as "dev-1" (the builder refuses "_" there), changed, and signed again.
    made = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1", _type=_ASN1Type.PrintableString)]),
                 ca_name, ca_key, client_key)
    tbs = made.tbs_certificate_bytes.replace(b"dev-1", b"dev_1")
    ecdsa_with_sha256 = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    client_der = _tlv(0x30, tbs + ecdsa_with_sha256 + _tlv(0x03, b"\0" + ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))))
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(client_der)
    server_context = TLSFiles(private_key=str(tmp_path / "server.key"), certificate=str(tmp_path / "server.pem"),
                              ca_certs=str(tmp_path / "ca.pem")).options().getContext()  # as mqtts: makes it
    (tmp_path / "client.der").write_bytes(client_der)
    (tmp_path / "client.key").write_bytes(client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.use_certificate_file(str(tmp_path / "client.der"), crypto.FILETYPE_ASN1)
    client_context.use_privatekey_file(str(tmp_path / "client.key"))
    server_side, client_side = SSL.Connection(server_context, None), SSL.Connection(client_context, None)
    server_side.set_accept_state()
    client_side.set_connect_state()
    for _ in range(20):  # a handshake in memory, bounded
        for side in (client_side, server_side):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        for source, target in ((client_side, server_side), (server_side, client_side)):
            try:
                target.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
    assert server_side.get_verified_chain()
    transport = _Handshaken(server_side)
    assert Security().client_certificate(transport) == (True, "dev_1")
    assert [certificate_identity(transport, field) for field in ("subject", "dns")] == ["CN=dev_1", None]


class _Verified:
    """A pyOpenSSL connection that verified ``certificate`` (DER), as far as the broker asks."""

    def __init__(self, certificate: bytes) -> None:
        self._certificate = certificate

    def get_peer_certificate(self) -> Any:
        from OpenSSL import crypto
        return crypto.load_certificate(crypto.FILETYPE_ASN1, self._certificate)

    def get_verified_chain(self) -> list[Any]:
        return [self.get_peer_certificate()]


def _printed_by_openssl(certificate: bytes) -> str:
    """The subject as Mosquitto's use_subject_as_username writes it: X509_NAME_print_ex with
    XN_FLAG_RFC2253, which is what `openssl x509 -nameopt RFC2253` prints."""
    printed = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject", "-nameopt", "RFC2253"],
                             input=certificate, capture_output=True, check=True, timeout=WAIT).stdout
    return printed.decode("latin-1").rstrip("\n").removeprefix("subject=")


def test_the_subject_is_what_openssl_prints_for_mosquitto() -> None:
    """Attributes cryptography has no short name for were dotted OIDs, control characters were
    not escaped, the values of a multi-valued RDN came in the opposite order, and a TeletexString
    (bytes OpenSSL reads as Latin-1) or an attribute OpenSSL does not know (its DER in hex) were
    written otherwise: an acl_file `user` line written for Mosquitto named nobody."""
    key = new_key()
    attribute = x509.NameAttribute
    subjects = [
        [attribute(NameOID.COMMON_NAME, "dev-1"), attribute(x509.ObjectIdentifier("2.5.4.13"), "line 3"),
         attribute(NameOID.UNSTRUCTURED_NAME, "box"), attribute(NameOID.POSTAL_ADDRESS, "1 Road"),
         attribute(NameOID.DOMAIN_COMPONENT, "example"), attribute(NameOID.USER_ID, "u1"),
         attribute(x509.ObjectIdentifier("2.5.4.72"), "operator")],
        [attribute(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), "x"),
         attribute(x509.ObjectIdentifier("1.3.6.1.4.1.99999.2"), "é", _ASN1Type.BMPString)],
        [attribute(NameOID.COMMON_NAME, "dev\x01one\x7f\ttab\x00z")],
        [attribute(NameOID.COMMON_NAME, 'a,b+c"d\\e<f>g;h=i#j k!@$%&*[]^_`{|}~')],
        [attribute(NameOID.ORGANIZATION_NAME, " "), attribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "#"),
         attribute(NameOID.COMMON_NAME, " #a "), attribute(NameOID.LOCALITY_NAME, "#a"),
         attribute(NameOID.STATE_OR_PROVINCE_NAME, "a# "), attribute(NameOID.TITLE, "  "),
         attribute(NameOID.SURNAME, "")],
        [attribute(NameOID.COMMON_NAME, "Büro€"), attribute(NameOID.ORGANIZATION_NAME, "Büro", _ASN1Type.T61String),
         attribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Büro€", _ASN1Type.BMPString),
         attribute(NameOID.LOCALITY_NAME, "Bü😀", _ASN1Type.UniversalString),
         attribute(NameOID.SERIAL_NUMBER, "42", _ASN1Type.NumericString),
         attribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x01\x02", _ASN1Type.BitString)],
    ]
    # The attribute types a name may hold that OpenSSL has a short name for, and the arcs between
    # them it has none for.
    arcs = [*(f"2.5.4.{n}" for n in range(101)), *(f"1.2.840.113549.1.9.{n}" for n in range(1, 10)),
            *(f"0.9.2342.19200300.100.1.{n}" for n in range(1, 60)), "1.3.6.1.4.1.311.60.2.1.1",
            "1.3.6.1.4.1.311.60.2.1.2", "1.3.6.1.4.1.311.60.2.1.3"]
    subjects.append([attribute(x509.ObjectIdentifier(oid), "ab") for oid in arcs])
    names = [x509.Name(subject) for subject in subjects]
    names.append(x509.Name([
        x509.RelativeDistinguishedName([attribute(NameOID.COUNTRY_NAME, "GB")]),
        x509.RelativeDistinguishedName([attribute(NameOID.COMMON_NAME, "dev-1"),
                                        attribute(NameOID.ORGANIZATION_NAME, "P"),
                                        attribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Plant 7")])]))
    differ = {}
    for name in names:
        certificate = issue(name, name, key, key)
        printed = _printed_by_openssl(certificate.public_bytes(serialization.Encoding.DER))
        if identity_of(certificate, "subject") != printed:
            differ[printed] = identity_of(certificate, "subject")
    assert differ == {}


def test_a_subject_only_openssl_reads_is_written_as_openssl_prints_it() -> None:
    """cryptography refuses a PrintableString with a "_" in it; the subject OpenSSL read left a
    leading "#" or space unescaped."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dev-1", _ASN1Type.PrintableString),
                      x509.NameAttribute(NameOID.COMMON_NAME, "#dev 1 ")])
    certificate = issue(name, name, key, key).public_bytes(serialization.Encoding.DER).replace(b"dev-1", b"dev_1")
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(certificate)
    assert certificate_identity(_Handshaken(_Verified(certificate)), "subject") == _printed_by_openssl(certificate) == (
        r"CN=\#dev 1\ ,O=dev_1")


def test_a_name_with_a_nul_in_it_names_nobody() -> None:
    """No MQTT user name holds U+0000 [MQTT-1.5.4-2], and a CA that signs "admin\\0.devices.example"
    for the owner of devices.example named nobody "admin" (the null-prefix trick): Mosquitto
    refuses such a common name, and the client is refused (0x87) as for a certificate without one."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dev-1", _ASN1Type.PrintableString),
                      x509.NameAttribute(NameOID.COMMON_NAME, "admin\x00.devices.example")])
    certificate = issue(name, name, key, key, [x509.DNSName("admin\x00.devices.example")])
    assert [identity_of(certificate, field) for field in ("cn", "dns", "subject")] == [
        None, None, r"CN=admin\00.devices.example,O=dev-1"]
    only_openssl_reads = certificate.public_bytes(serialization.Encoding.DER).replace(b"dev-1", b"dev_1")
    assert certificate_identity(_Handshaken(_Verified(only_openssl_reads)), "cn") is None


@pytest.mark.parametrize("field", ["cn", "subject"])
def test_a_verified_certificate_whose_subject_cannot_be_read_names_nobody(field: str) -> None:
    """cryptography reads a certificate's fields as they are asked for: a subject value of a
    long-form tag raised out of the CONNECT's handling (no CONNACK), where a certificate that names
    nobody is refused as one without the field."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ZZZZ")])
    der = issue(name, name, key, key).public_bytes(serialization.Encoding.DER)
    odd = x509.load_der_x509_certificate(der.replace(b"\x0c\x04ZZZZ", b"\x1f\x1f\x03ZZZ"))

    class Verified:
        def getPeerCertificate(self) -> x509.Certificate:
            return odd

        def getHandle(self) -> Any:
            return self

        def get_verified_chain(self) -> list[Any]:
            return [odd]
    from mqtt_broker.auth.certificates import verified_identity
    assert verified_identity(Verified(), field) == (True, None)


def _chain(directory: Path) -> None:
    """root.pem (a root CA), fullchain.pem (a server certificate for localhost signed by an
    intermediate CA, then that intermediate: what Let's Encrypt's fullchain.pem holds), leaf.key."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def issue(subject: str, issuer: str, key: Any, issuer_key: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem(certificate: x509.Certificate) -> bytes:
        return certificate.public_bytes(serialization.Encoding.PEM)

    root_key, intermediate_key, leaf_key = (new_key() for _ in range(3))
    root = issue("root CA", "root CA", root_key, root_key, True)
    intermediate = issue("intermediate CA", "root CA", intermediate_key, root_key, True)
    leaf = issue("localhost", "intermediate CA", leaf_key, intermediate_key, False)
    (directory / "root.pem").write_bytes(pem(root))
    (directory / "fullchain.pem").write_bytes(pem(leaf) + pem(intermediate))
    (directory / "leaf.key").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _handshake(tls: Any, cafile: str) -> str | None:
    """A TLS handshake in memory between ``tls`` (a listener's connection creator) and Python's
    ssl trusting ``cafile``: None when it succeeds, else the client's error."""
    import ssl

    from twisted.internet.address import IPv4Address
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    clock = Clock()
    server = TLSMemoryBIOFactory(tls, False, Factory.forProtocol(Protocol), clock=clock).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 40000))
    socket = StringTransport()
    server.makeConnection(socket)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context(cafile=cafile).wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(20):  # bounded
        try:
            client.do_handshake()
            return None
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            return str(e)
        data = outgoing.read()
        if data:
            server.dataReceived(data)
        clock.advance(0)
        back = socket.value()
        socket.clear()
        incoming.write(back)
    return "no handshake"


def test_a_mosquitto_certfile_with_its_intermediate_certificates_serves_the_chain(tmp_path: Path) -> None:
    """Mosquitto loads certfile with SSL_CTX_use_certificate_chain_file: the server certificate
    and the intermediates after it (a public CA's fullchain.pem) are sent, and clients that
    trust the root verify the server. Converted (docs/mosquitto.md: `listener 8883` +
    certfile/keyfile -> ssl:...:certKey=...), TLSFiles.options keeps the first certificate of
    certKey only: the intermediate is never sent and every such client fails verification."""
    from twisted.internet import reactor

    from mqtt_broker.auth.tls import server_endpoint
    from mqtt_broker.mosquitto import convert

    _chain(tmp_path)
    (tmp_path / "mosquitto.conf").write_text(
        f"listener 8883\ncertfile {tmp_path / 'fullchain.pem'}\nkeyfile {tmp_path / 'leaf.key'}\n")
    [description] = convert(tmp_path / "mosquitto.conf").settings["endpoints"]
    endpoint = server_endpoint(reactor, description)
    assert _handshake(endpoint.tls, str(tmp_path / "root.pem")) is None  # type: ignore[attr-defined]


def _tls_reader(port: int, certs: Path, header: bytes) -> ssl.SSLSocket:
    """Connect (the PROXY header first, if any), handshake, CONNECT and SUBSCRIBE, read the
    CONNACK and SUBACK, then read nothing more: the open TLS socket, its window small."""
    from mqtt_broker.wire import Connect, Subscribe, SubscriptionRequest, encode
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(WAIT)
    raw.connect(("127.0.0.1", port))
    raw.sendall(header)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(encode(Connect(client_id="reader", keep_alive=0)) + encode(Subscribe(
        packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t"),))))
    seen = b""
    while len(seen) < 9:
        seen += tls.recv(64)
    return tls


@pytest.mark.parametrize("prefix", ["", "haproxy:"], ids=["ssl", "haproxy-ssl"])
@pytest_twisted.inlineCallbacks
def test_a_tls_connection_closed_without_linger_whose_client_takes_nothing_is_not_held(
        certs: Path, prefix: str) -> Iterator[Any]:
    """A socket closed with bytes its client never takes is aborted after UNTAKEN_LIMIT. Under
    haproxy:ssl: the TLS transport writes to the PROXY header's wrapper, not to the socket: the
    socket's bytes were not seen, and the connection was held for ever."""
    from twisted.internet import tcp
    from twisted.internet.task import Clock
    from mqtt_broker import BrokerService
    from mqtt_broker.linger import UNTAKEN_LIMIT
    from protocol_helpers import FakeClient, aborted_after, filled_until_untaken
    clock = Clock()
    endpoint = f"{prefix}ssl:0:interface=127.0.0.1:privateKey={certs / 'server.key'}:certKey={certs / 'server.pem'}"
    broker = BrokerService(endpoints=[endpoint], reactor=reactor, clock=clock, sys_interval=0, close_linger=0,
                           max_queued_messages=1)
    broker.startService()
    client = None
    try:
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 1883\r\n" if prefix else b""
        client = yield threads.deferToThread(_tls_reader, broker.ports[0].getHost().port, certs, header)
        [reader] = broker.connections
        under = reader.transport
        while not isinstance(under, tcp.Connection):
            under = under.transport
        under.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # (no autotuning: it fills)
        yield filled_until_untaken(broker, under)
        FakeClient(broker).connect("reader")  # taken over: closed, no linger
        yield aborted_after(broker, reader, clock, UNTAKEN_LIMIT)
    finally:
        if client is not None:
            client.close()
        yield broker.stopService()

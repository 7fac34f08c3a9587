"""TLS listeners (ssl: and mqtts:) read their key and certificate again on reload: the broker
in this process on loopback, certificates made here, clients on real TLS sockets (Python's ssl,
in threads); and under twistd, on SIGHUP."""

from __future__ import annotations

import datetime
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from auth_helpers import LogCapture, RawClient
from conftest import BrokerProcess, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.endpoints import _parse  # the reference for our own splitting
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from mqtt_broker import BrokerService
from mqtt_broker.auth.tls import TLSServerEndpoint, parse_description, server_endpoint
from mqtt_broker.wire import Pingreq, Pingresp, Publish, Suback, Subscribe, SubscriptionRequest


DAY = 86400.0


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


class PKI:
    """A CA and what it signs: server certificates for localhost, client certificates."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = self._issue(_name("test CA"), ca=True)
        (directory / "ca.pem").write_bytes(_pem(self.ca.certificate))
        self.client = self._issue(_name("client"), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        (directory / "client.pem").write_bytes(_pem(self.client.certificate))
        (directory / "client.key").write_bytes(_key_pem(self.client.key))

    def _issue(self, subject: x509.Name, ca: bool = False, usage: Any = None,
               names: list[x509.GeneralName] | None = None, valid: tuple[float, float] = (-300, 2 * DAY)) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = self.ca if not ca else Issued(key, None)  # type: ignore[arg-type]
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(subject if ca else self.ca.certificate.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now + datetime.timedelta(seconds=valid[0]))
                   .not_valid_after(now + datetime.timedelta(seconds=valid[1]))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Issued(key, builder.sign(issuer.key, hashes.SHA256()))

    def server(self, name: str, valid: tuple[float, float] = (-300, 2 * DAY)) -> Issued:
        """A new server certificate (CN ``name``, for localhost), written as server.pem/.key;
        ``valid``: from and until when, in seconds from now."""
        issued = self._issue(_name(name), usage=ExtendedKeyUsageOID.SERVER_AUTH,
                             names=[x509.DNSName("localhost")], valid=valid)
        (self.directory / "server.pem").write_bytes(_pem(issued.certificate))
        (self.directory / "server.key").write_bytes(_key_pem(issued.key))
        return issued

    def context(self, client_certificate: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.directory / "ca.pem"))
        if client_certificate:
            context.load_cert_chain(str(self.directory / "client.pem"), str(self.directory / "client.key"))
        return context


def listeners(pki: PKI) -> list[str]:
    d = pki.directory
    files = f"privateKey={d / 'server.key'}:certKey={d / 'server.pem'}"
    return [f"ssl:0:interface=127.0.0.1:{files}", f"mqtts:0:interface=127.0.0.1:{files}:caCerts={d / 'ca.pem'}"]


async def connect(port: int, context: ssl.SSLContext, client_id: str) -> RawClient:
    client: RawClient = await deferToThread(RawClient, port, client_id, tls=context)
    assert client.connack.reason_code == 0
    return client


def peer(client: RawClient) -> bytes:
    der = client.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert der is not None
    return der


async def round_trip(client: RawClient, packet: Any, answer: type) -> Any:
    client.send(packet)
    got, before = await deferToThread(client.until, answer)
    assert isinstance(got, answer), (got, before)
    return got


@pytest_twisted.ensureDeferred
async def test_reload_swaps_certificates_for_new_handshakes_only(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    first = pki.server("first")
    broker = BrokerService(endpoints=listeners(pki), reactor=reactor, sys_interval=0)
    broker.startService()
    clients: list[RawClient] = []
    try:
        ssl_port, mqtts_port = (port.getHost().port for port in broker.ports)  # type: ignore[attr-defined]
        plain, verified = pki.context(), pki.context(client_certificate=True)
        old = await connect(ssl_port, plain, "old")
        old_mqtts = await connect(mqtts_port, verified, "old-mqtts")
        clients += [old, old_mqtts]
        assert peer(old) == peer(old_mqtts) == first.der
        await round_trip(old, Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="t"),)),
                         Suback)

        # A key that is not PEM: refused, logged with the file's name, the first certificate stays.
        good_key = (tmp_path / "server.key").read_bytes()
        (tmp_path / "server.key").write_text("not a key\n")
        with LogCapture() as log:
            await broker.reload()
        assert f"privateKey={tmp_path / 'server.key'} holds no PEM private key" in log.text()
        assert log.text().count("not reloaded, the previous certificate stays in use") == 2
        # An encrypted key: refused as such, without OpenSSL asking for its passphrase on a terminal.
        (tmp_path / "server.key").write_bytes(first.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase")))
        with LogCapture() as log:
            await broker.reload()
        assert f"privateKey={tmp_path / 'server.key'} is encrypted" in log.text()
        assert log.text().count("not reloaded, the previous certificate stays in use") == 2
        # A key of another certificate: it does not fit, refused likewise.
        (tmp_path / "server.key").write_bytes(_key_pem(pki.client.key))
        with LogCapture() as log:
            await broker.reload()
        assert "cannot be used together" in log.text() and str(tmp_path / "server.key") in log.text()
        (tmp_path / "server.key").write_bytes(good_key)
        (tmp_path / "ca.pem").write_text("")  # mqtts: also reads its CA file again
        with LogCapture() as log:
            await broker.reload()
        assert f"caCerts={tmp_path / 'ca.pem'} holds no PEM certificate" in log.text()
        (tmp_path / "ca.pem").write_bytes(_pem(pki.ca.certificate))
        for port, context in ((ssl_port, plain), (mqtts_port, verified)):
            probe = await connect(port, context, "probe")
            clients.append(probe)
            assert peer(probe) == first.der

        second = pki.server("second")
        with LogCapture() as log:
            await broker.reload()
        assert log.text().count("reloaded") == 2 and "not reloaded" not in log.text()
        new = await connect(ssl_port, plain, "new")
        new_mqtts = await connect(mqtts_port, verified, "new-mqtts")
        clients += [new, new_mqtts]
        assert peer(new) == peer(new_mqtts) == second.der

        # The clients of before are still connected, on the first certificate, and work.
        for client in (old, old_mqtts):
            await round_trip(client, Pingreq(), Pingresp)
            assert peer(client) == first.der
        new.send(Publish(topic="t", payload=b"after reload"))
        message = await round_trip(old, Pingreq(), Publish)
        assert message.payload == b"after reload"
    finally:
        for client in clients:
            client.close()
        await broker.stopService()


@pytest_twisted.ensureDeferred
async def test_reload_refuses_a_certificate_outside_its_dates(tmp_path: Path) -> None:
    """Every client that checks the dates would refuse it: the certificate in use stays, and
    the reload says why, as for a file that cannot be used."""
    pki = PKI(tmp_path)
    first = pki.server("first", valid=(-300, 30 * DAY))
    broker = BrokerService(endpoints=listeners(pki), reactor=reactor, sys_interval=0)
    broker.startService()
    clients: list[RawClient] = []
    try:
        ssl_port, mqtts_port = (port.getHost().port for port in broker.ports)  # type: ignore[attr-defined]
        plain, verified = pki.context(), pki.context(client_certificate=True)
        for name, valid, why in (("expired", (-10 * DAY, -DAY), "has expired (notAfter "),
                                 ("future", (DAY, 10 * DAY), "is not valid yet (notBefore ")):
            pki.server(name, valid)
            with LogCapture() as log:
                problems = await broker.reload()
            assert len(problems) == 2, problems
            assert all(f"certKey={tmp_path / 'server.pem'} {why}" in problem for problem in problems), problems
            assert log.text().count("not reloaded, the previous certificate stays in use") == 2
            for port, context in ((ssl_port, plain), (mqtts_port, verified)):
                probe = await connect(port, context, name)
                clients.append(probe)
                assert peer(probe) == first.der
        # One that expires within two weeks is taken, and its end told.
        second = pki.server("second", valid=(-300, 2 * DAY))
        with LogCapture() as log:
            assert await broker.reload() == []
        assert log.text().count(f"certKey={tmp_path / 'server.pem'} expires within 14 days (notAfter ") == 2
        probe = await connect(ssl_port, plain, "second")
        clients.append(probe)
        assert peer(probe) == second.der
    finally:
        for client in clients:
            client.close()
        await broker.stopService()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("offset, told", [
    (0.0, None),
    (-DAY, "is not valid yet (notBefore {not_before:%Y-%m-%d %H:%M:%S} UTC)"),
    (17 * DAY, "expires within 14 days (notAfter {not_after:%Y-%m-%d %H:%M:%S} UTC)"),
    (31 * DAY, "has expired (notAfter {not_after:%Y-%m-%d %H:%M:%S} UTC)")],
    ids=["valid", "not-yet-valid", "expiring", "expired"])
async def test_a_certificate_outside_its_dates_or_near_its_end_is_told_at_start(
        tmp_path: Path, offset: float, told: str | None) -> None:
    """Told, and listened on all the same: clients that do not check the dates still connect,
    and a reload takes the renewed files."""
    pki = PKI(tmp_path)
    certificate = pki.server("server", valid=(-300, 30 * DAY)).certificate
    clock = Clock()
    clock.advance(time.time() + offset)
    description = listeners(pki)[0]
    broker = BrokerService(endpoints=[description], reactor=reactor, clock=clock, sys_interval=0)
    with LogCapture() as log:
        broker.startService()
    try:
        assert len(broker.ports) == 1
        dates = {"not_before": certificate.not_valid_before_utc, "not_after": certificate.not_valid_after_utc}
        expected = [] if told is None else [
            f"TLS listener {description}: certKey={tmp_path / 'server.pem'} {told.format(**dates)}"]
        assert [line for line in log.lines if line.startswith("TLS listener ")] == expected
    finally:
        await broker.stopService()


@pytest.mark.parametrize("description", [
    "ssl:8883:privateKey=k.pem", "ssl:port=8883:privateKey=/a\\:b/k.pem:certKey=c=d.pem:backlog=5",
    "tcp:1883:interface=\\:\\:1", "unix:/tmp/x\\\\y", "ssl::", "ssl:8883:=x:a=b=c",
])
def test_endpoint_strings_split_as_twisted_splits_them(description: str) -> None:
    assert parse_description(description) == _parse(description)


def test_ssl_listeners_are_built_here_and_others_by_twisted(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    pki.server("server")
    ssl_description, mqtts_description = listeners(pki)
    for description in (ssl_description, mqtts_description):
        assert isinstance(server_endpoint(reactor, description), TLSServerEndpoint)
    assert not isinstance(server_endpoint(reactor, "tcp:0"), TLSServerEndpoint)
    with pytest.raises(OSError):
        server_endpoint(reactor, ssl_description.replace("server.key", "absent.key"))
    with pytest.raises(TypeError):  # an option ssl: does not have, as Twisted's parser says
        server_endpoint(reactor, ssl_description + ":caCerts=ca.pem")


def test_sighup_reloads_certificates_under_twistd(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    first = pki.server("first")
    port = free_port()
    broker = BrokerProcess(listen=listeners(pki)[0].replace("ssl:0", f"ssl:{port}"), port=port)
    clients: list[RawClient] = []
    try:
        context = pki.context()
        old = RawClient(port, "old", tls=context)
        clients.append(old)
        assert peer(old) == first.der
        second = pki.server("second")
        broker.process.send_signal(signal.SIGHUP)
        old.send(Pingreq())  # answered after the signal is taken (it wakes the reactor first)
        assert isinstance(old.next(), Pingresp)
        seen = b""
        for _ in range(500):  # bounded: the reload is queued on the reactor by the signal handler
            probe = RawClient(port, "probe", tls=context)
            seen = peer(probe)
            probe.close()
            if seen == second.der:
                break
        assert seen == second.der, broker.output()
        old.send(Pingreq())
        assert isinstance(old.next(), Pingresp)
        assert peer(old) == first.der
    finally:
        for client in clients:
            client.close()
        broker.stop()

"""The broker as a real process with its SQLite store, killed with SIGKILL mid-stream and started
again on the same data directory and port: every acknowledged message is delivered, QoS 2
exactly once, and the sessions, subscriptions and retained messages are intact. And a damaged
database stops start-up with a message that says what to do.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pytest

from mqtt_broker.wire import (
    Connack, Connect, Disconnect, FrameReader, Packet, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
    Subscribe, SubscriptionRequest, encode,
)

from conftest import ROOT, BrokerProcess, free_port
from durability_helpers import Receiver

N = 2000
"""QoS 1 messages, and as many QoS 2 ones."""
WINDOW = 20
"""Unacknowledged messages the publisher has out at a time (the broker's Receive Maximum)."""
DEADLINE = 30.0
"""Seconds any phase may take (it takes well under one)."""
SUBSCRIBER = "durable-sub"
PUBLISHER = "durable-pub"
TOPIC = {1: "load/qos1", 2: "load/qos2"}
SESSION = {"session_expiry_interval": 3600}


class Wire:
    """An MQTT 5 connection on a plain socket; ``poll`` waits a bounded time for packets and
    raises ConnectionError once the broker is gone."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(version=5)
        self.pending: list[Packet] = []

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p, 5) for p in packets))

    def poll(self, timeout: float) -> list[Packet]:
        if self.pending:
            packets, self.pending = self.pending, []
            return packets
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return []
        data = self.sock.recv(1 << 20)  # ConnectionResetError is a ConnectionError
        if not data:
            raise ConnectionError("the broker closed the connection")
        return self.reader.feed(data)

    def expect(self, kind: type, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind.__name__} in time")
            self.pending = self.poll(0.5)
        packet = self.pending.pop(0)
        assert isinstance(packet, kind), packet
        return packet

    def connect(self, client_id: str) -> Connack:
        self.send(Connect(client_id=client_id, clean_start=False, protocol_level=5, keep_alive=0,
                          properties=SESSION))
        connack = self.expect(Connack)
        assert connack.reason_code == 0, connack
        return connack

    def close(self) -> None:
        self.sock.close()


def start(broker_process: Callable[..., BrokerProcess], data: Path, port: int | None = None) -> BrokerProcess:
    return broker_process("--data-dir", str(data), port=port)


def kill(broker: BrokerProcess) -> None:
    os.kill(broker.pid, signal.SIGKILL)
    broker.process.wait(10)


class Publisher:
    """Publishes N QoS 1 and N QoS 2 messages (payload: the sequence number), interleaved, with
    packet ids 1..2N, at most WINDOW unacknowledged (QoS 2 until PUBCOMP)."""

    def __init__(self) -> None:
        self.plan = [(qos, seq) for seq in range(N) for qos in (1, 2)]
        self.next = 0
        self.outstanding: dict[int, tuple[int, int, bool]] = {}
        """packet id -> (qos, seq, PUBREC received)."""
        self.acknowledged: set[tuple[int, int]] = set()
        """PUBACK, or PUBREC (the broker has taken the QoS 2 message)."""
        self.completed: set[int] = set()

    def publish(self, wire: Wire, index: int, dup: bool = False) -> None:
        qos, seq = self.plan[index]
        wire.send(Publish(topic=TOPIC[qos], payload=b"%d" % seq, qos=qos, packet_id=index + 1, dup=dup))
        self.outstanding[index + 1] = (qos, seq, False)

    def handle(self, wire: Wire, packet: Packet) -> None:
        if isinstance(packet, Puback):
            assert packet.reason_code == 0, packet
            qos, seq, _ = self.outstanding.pop(packet.packet_id)
            self.acknowledged.add((qos, seq))
        elif isinstance(packet, Pubrec):
            assert packet.reason_code == 0, packet
            qos, seq, _ = self.outstanding[packet.packet_id]
            self.outstanding[packet.packet_id] = (qos, seq, True)
            self.acknowledged.add((qos, seq))
            wire.send(Pubrel(packet_id=packet.packet_id))
        elif isinstance(packet, Pubcomp):
            # 0x92 (id not found) only if the broker took our PUBREL before it was killed and
            # its PUBCOMP was lost; a lost QoS 2 state would show as a second delivery instead.
            assert packet.reason_code in (0, 0x92), packet
            qos, seq, _ = self.outstanding.pop(packet.packet_id)
            self.completed.add(seq)
        else:
            raise AssertionError(f"unexpected {packet!r}")

    def run_until_killed(self, wire: Wire, broker: BrokerProcess) -> None:
        """Publish until half of all messages are acknowledged, kill the broker, and read what
        it had sent until the connection is gone."""
        deadline = time.monotonic() + DEADLINE
        killed = False
        try:
            while time.monotonic() < deadline:
                while not killed and len(self.outstanding) < WINDOW and self.next < len(self.plan):
                    self.publish(wire, self.next)
                    self.next += 1
                for packet in wire.poll(1.0):
                    self.handle(wire, packet)
                if not killed and len(self.acknowledged) >= N:
                    kill(broker)
                    killed = True
        except ConnectionError:
            assert killed, "the connection ended before the broker was killed"
            return
        raise AssertionError("the broker was never killed, or its connection never ended")

    def run_all(self, wire: Wire) -> None:
        while self.next < len(self.plan):
            self.drain(wire, lambda: len(self.outstanding) < WINDOW)
            self.publish(wire, self.next)
            self.next += 1
        self.drain(wire, lambda: not self.outstanding)

    def finish(self, wire: Wire) -> None:
        """After the restart: complete the QoS 2 exchanges (PUBREL for what got PUBREC, the
        PUBLISH again, marked DUP, for what did not [MQTT-4.4.0-1]); QoS 1 messages without
        PUBACK are given up (so a second copy at the subscriber can only be a DUP resend)."""
        released = [pid for pid, (_, _, rec) in self.outstanding.items() if rec]
        unanswered = sorted(pid for pid, (qos, _, rec) in self.outstanding.items() if qos == 2 and not rec)
        for pid in [pid for pid, (qos, _, _) in self.outstanding.items() if qos == 1]:
            del self.outstanding[pid]
        for pid in released:
            wire.send(Pubrel(packet_id=pid))
        self.drain(wire, lambda: not any(rec for _, _, rec in self.outstanding.values()))
        for pid in unanswered:
            del self.outstanding[pid]
        for pid in unanswered:
            self.drain(wire, lambda: len(self.outstanding) < WINDOW)
            self.publish(wire, pid - 1, dup=True)
        self.drain(wire, lambda: not self.outstanding)

    def drain(self, wire: Wire, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE
        while not done():
            assert time.monotonic() < deadline, f"{len(self.outstanding)} exchanges did not complete"
            for packet in wire.poll(1.0):
                self.handle(wire, packet)

    def sent(self, qos: int) -> set[int]:
        return {seq for q, seq in self.plan[:self.next] if q == qos}


class Subscriber:
    """The persistent subscriber: answers everything (Receiver: a QoS 2 PUBLISH whose id awaits
    PUBREL is not given to the application again) and notes what the application got."""

    def __init__(self) -> None:
        self.receiver = Receiver()
        self.copies: dict[tuple[int, bytes], list[bool]] = defaultdict(list)
        """(qos, payload) -> the DUP flag of each copy the application got."""

    def handle(self, wire: Wire, packets: list[Packet]) -> None:
        for packet in packets:
            before = len(self.receiver.delivered)
            replies = self.receiver.handle(packet)
            if len(self.receiver.delivered) > before:
                assert isinstance(packet, Publish)
                self.copies[(packet.qos, packet.payload)].append(packet.dup)
            if replies:
                wire.send(*replies)

    def consume(self, wire: Wire, until: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE
        while not until():
            assert time.monotonic() < deadline, "the subscriber stopped getting messages"
            self.handle(wire, wire.poll(1.0))

    def got(self, qos: int) -> set[int]:
        return {int(payload) for (q, payload) in self.copies if q == qos and payload.isdigit()}


def check_retained(port: int) -> None:
    wire = Wire(port)
    wire.send(Connect(client_id="", clean_start=True, protocol_level=5))
    wire.expect(Connack)
    wire.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="ret/#", qos=1),)))
    packets: list[Packet] = []
    deadline = time.monotonic() + 10
    while len([p for p in packets if isinstance(p, Publish)]) < 2 and time.monotonic() < deadline:
        packets += wire.poll(0.5)
    retained = sorted((p.topic, p.payload, p.retain) for p in packets if isinstance(p, Publish))
    assert retained == [("ret/a", b"A", True), ("ret/b", b"B", True)]
    wire.send(Disconnect())
    wire.close()


def check_delivery(publisher: Publisher, subscriber: Subscriber) -> None:
    """Every acknowledged QoS 1 message delivered, a second copy only with DUP; every QoS 2
    message (all were completed after the restart) given to the application exactly once."""
    problems = []
    acked_qos1 = {seq for qos, seq in publisher.acknowledged if qos == 1}
    missing = sorted(acked_qos1 - subscriber.got(1))
    if missing:
        problems.append(f"{len(missing)} acknowledged QoS 1 messages lost, e.g. {missing[:10]}")
    unknown = sorted(subscriber.got(1) - publisher.sent(1))
    if unknown:
        problems.append(f"QoS 1 messages never published: {unknown[:10]}")
    not_dup = sorted((int(payload), dups) for (qos, payload), dups in subscriber.copies.items()
                     if qos == 1 and payload.isdigit() and not all(dups[1:]))
    if not_dup:
        problems.append(f"{len(not_dup)} QoS 1 messages came again without DUP [MQTT-3.3.1-1] "
                        f"(DUP flag of each copy): {not_dup[:10]}")
    sent_qos2 = publisher.sent(2)
    if publisher.completed != sent_qos2:
        problems.append(f"{len(sent_qos2 - publisher.completed)} QoS 2 exchanges not completed")
    missing = sorted(sent_qos2 - subscriber.got(2))
    if missing:
        problems.append(f"{len(missing)} QoS 2 messages lost, e.g. {missing[:10]}")
    twice = sorted((int(payload), dups) for (qos, payload), dups in subscriber.copies.items()
                   if qos == 2 and payload.isdigit() and len(dups) > 1)
    if twice:
        problems.append(f"{len(twice)} QoS 2 messages given to the application more than once "
                        f"(DUP flag of each copy): {twice[:10]}")
    assert not problems, "\n".join(problems)


def set_up(broker_process: Callable[..., BrokerProcess], data: Path) -> BrokerProcess:
    """A broker on ``data``, the subscriber's persistent session (QoS 1 and QoS 2 topics) and two
    retained messages."""
    broker = start(broker_process, data)
    sub = Wire(broker.port)
    assert not sub.connect(SUBSCRIBER).session_present
    sub.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=TOPIC[1], qos=1),
                                                   SubscriptionRequest(topic_filter=TOPIC[2], qos=2))))
    assert sub.expect(Suback).reason_codes == (1, 2)
    sub.send(Disconnect())
    sub.close()
    pub = Wire(broker.port)
    pub.connect(PUBLISHER)
    pub.send(Publish(topic="ret/a", payload=b"A", qos=1, retain=True, packet_id=60001),
             Publish(topic="ret/b", payload=b"B", qos=1, retain=True, packet_id=60002))
    assert {pub.expect(Puback).packet_id, pub.expect(Puback).packet_id} == {60001, 60002}
    pub.close()
    return broker


def finish_and_check(port: int, publisher: Publisher, subscriber: Subscriber) -> None:
    """After the restart: the sessions are there; the publisher completes its QoS 2 exchanges;
    the subscriber takes everything up to end markers published last (they come after all that
    was queued before them, and prove both subscriptions are still there)."""
    pub = Wire(port)
    assert pub.connect(PUBLISHER).session_present
    publisher.finish(pub)
    sub = Wire(port)
    assert sub.connect(SUBSCRIBER).session_present
    pub.send(Publish(topic=TOPIC[1], payload=b"end-1", qos=1, packet_id=1),
             Publish(topic=TOPIC[2], payload=b"end-2", qos=2, packet_id=2))
    subscriber.consume(sub, lambda: (1, b"end-1") in subscriber.copies and (2, b"end-2") in subscriber.copies)
    check_retained(port)
    check_delivery(publisher, subscriber)
    sub.send(Disconnect())
    pub.close()
    sub.close()


def test_kill_9_while_publishing_loses_no_acknowledged_message(
        broker_process: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    """Killed while the publisher streams and the subscriber is offline (its messages are
    queued in the store)."""
    data = tmp_path / "data"
    broker = set_up(broker_process, data)
    port = broker.port
    publisher = Publisher()
    pub = Wire(port)
    pub.connect(PUBLISHER)
    publisher.run_until_killed(pub, broker)
    pub.close()
    assert N <= len(publisher.acknowledged) < 2 * N
    start(broker_process, data, port)
    finish_and_check(port, publisher, Subscriber())


@pytest.mark.parametrize("stream", ["live", "backlog"])
def test_kill_9_while_the_subscriber_consumes_loses_no_acknowledged_message(
        broker_process: Callable[..., BrokerProcess], tmp_path: Path, stream: str) -> None:
    """Killed while the subscriber is online and consuming: the live stream, or the backlog
    queued (in memory and in the store) while it was offline."""
    data = tmp_path / "data"
    broker = set_up(broker_process, data)
    port = broker.port
    publisher, subscriber = Publisher(), Subscriber()
    pub = Wire(port)
    pub.connect(PUBLISHER)
    if stream == "backlog":
        publisher.run_all(pub)
    sub = Wire(port)
    assert sub.connect(SUBSCRIBER).session_present
    deadline = time.monotonic() + DEADLINE
    alive = [pub, sub]
    killed = False
    while alive:
        assert time.monotonic() < deadline, f"the broker was never killed, or a connection never ended ({len(subscriber.receiver.delivered)} delivered, killed: {killed})"
        while not killed and len(publisher.outstanding) < WINDOW and publisher.next < len(publisher.plan):
            publisher.publish(pub, publisher.next)
            publisher.next += 1
        ready = [w for w in alive if w.pending]  # what came with the CONNACK
        readable = [w.sock for w in ready] or select.select([w.sock for w in alive], [], [], 1.0)[0]
        for wire in [w for w in alive if w.sock in readable]:
            try:
                packets = wire.poll(0)
                if wire is pub:
                    for packet in packets:
                        publisher.handle(pub, packet)
                else:
                    subscriber.handle(sub, packets)
            except ConnectionError:
                assert killed, "a connection ended before the broker was killed"
                alive.remove(wire)
        if not killed and len(subscriber.receiver.delivered) >= N:
            kill(broker)
            killed = True
    pub.close()
    sub.close()
    assert len(subscriber.receiver.delivered) < 2 * N
    start(broker_process, data, port)
    finish_and_check(port, publisher, subscriber)


def test_the_documented_backup_of_a_running_broker_restores(broker_process: Any, tmp_path: Path) -> None:
    """docs/durability.md: a copy of mqttbroker.db alone made while the broker runs may hold
    nothing (the commits are in its write-ahead log); SQLite's backup, as the doc gives it, has
    what was acknowledged, and a broker started on it has it."""
    import re
    from auth_helpers import RawClient
    data = tmp_path / "data"
    broker = broker_process("--data-dir", str(data))
    client = RawClient(broker.port, "keeper", clean_start=False, properties={"session_expiry_interval": 3600})
    client.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="kept/#", qos=1),)))
    assert isinstance(client.next(), Suback)
    client.sock.close()
    publisher = RawClient(broker.port, "publisher")
    publisher.send(Publish(topic="kept/retained", payload=b"r", qos=1, retain=True, packet_id=1))
    publisher.send(Publish(topic="kept/queued", payload=b"q", qos=1, packet_id=2))
    assert [type(publisher.next()), type(publisher.next())] == [Puback, Puback]  # committed
    doc = (ROOT / "docs" / "durability.md").read_text()
    [command] = re.findall(r"^(python3 -c '.*') \\$", doc, re.M)
    backup = tmp_path / "restored" / "mqttbroker.db"
    backup.parent.mkdir()
    subprocess.run(f"{command} {data / 'mqttbroker.db'} {backup}".replace("python3", sys.executable, 1), shell=True,
                   check=True, timeout=30)
    broker.stop()
    restored = broker_process("--data-dir", str(backup.parent))
    again = RawClient(restored.port, "keeper", clean_start=False, properties={"session_expiry_interval": 3600})
    assert again.connack.session_present
    queued = [again.next(), again.next()]
    assert [(p.topic, p.payload) for p in queued if isinstance(p, Publish)] == [("kept/retained", b"r"),
                                                                                ("kept/queued", b"q")]
    reader = RawClient(restored.port, "reader")
    reader.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="kept/retained"),)))
    assert isinstance(reader.next(), Suback)
    retained = reader.next()
    assert isinstance(retained, Publish) and retained.payload == b"r"


def test_damaged_database_stops_start_up_naming_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    database = data / "mqttbroker.db"
    database.write_bytes(b"SQLite format 3\x00" + os.urandom(16384))
    port = free_port()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "twisted", "mqttbroker", "--endpoint", f"tcp:{port}:interface=127.0.0.1",
             "--data-dir", str(data)], cwd=ROOT, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the broker kept running on a damaged database") from None
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode != 0, output
    assert str(database) in output
    assert "move it" in output and ("backup" in output or ".recover" in output), output
    assert database.read_bytes()[:16] == b"SQLite format 3\x00"  # left as it was, for recovery

"""A publisher and a subscriber that resume their sessions as the specification says, and a run
that kills the broker with SIGKILL in the middle of their traffic and starts it again on the
same data directory: the measure of "nothing acknowledged lost, nothing doubled, nothing stuck".

Both clients are MQTT 5 with a session expiry of an hour and reconnect with Clean Start 0. The
publisher keeps up to ``window`` QoS 1/2 messages in flight and, on each reconnect, sends again
every PUBLISH not acknowledged (DUP, same packet id) and every PUBREL not completed
[MQTT-4.4.0-1]. The subscriber keeps the packet ids it awaits PUBREL for and treats a PUBLISH
with such an id as a duplicate (method A of 4.3.3); it grants a Receive Maximum of
``receive_maximum`` and notes every time the broker sends more.

    python tests/crash_clients.py --qos 2 --messages 10000 --kills 15 --runs 10

runs longer trials than the test suite does and prints one line per run.
"""

from __future__ import annotations

import argparse
import random
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mqtt_broker.wire import (
    MQTT_5, Connack, Connect, Disconnect, FrameReader, Packet, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, SubscriptionRequest, encode,
)

HOST = "127.0.0.1"
EXPIRY = 3600


class Violation(Exception):
    """The broker did something a correct broker never does."""


class Endpoint:
    """One client's connection: a non-blocking socket, its reader and what waits to be written.
    The client's state (``Publisher``/``Subscriber``) outlives it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=1.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.reader = FrameReader(version=MQTT_5)
        self.out = bytearray()
        self.connected = False
        """CONNACK received."""

    def send(self, *packets: Packet) -> None:
        for packet in packets:
            self.out += encode(packet, MQTT_5)

    def write_some(self) -> None:
        if self.out:
            sent = self.sock.send(self.out)
            del self.out[:sent]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Publisher:
    client_id: str
    qos: int
    total: int
    window: int
    next_number: int = 0
    inflight: dict[int, tuple[int, bool]] = field(default_factory=dict)
    """Packet id -> (message number, PUBREC received), in the order they were first sent."""
    acknowledged: set[int] = field(default_factory=set)
    """Messages the broker took responsibility for (PUBACK, or PUBREC for QoS 2)."""
    completed: int = 0
    until: int = 0
    """Messages are sent up to this number (not included) for now: the run holds the publisher
    within a window of the next kill, so that it cannot finish before the kills are made."""
    quota: int = 0
    connects: int = 0
    _next_id: int = 1

    def connect_packet(self) -> Connect:
        return Connect(client_id=self.client_id, clean_start=self.connects == 0, keep_alive=60,
                       protocol_level=MQTT_5, properties={"session_expiry_interval": EXPIRY})

    def connected(self, connack: Connack) -> list[Packet]:
        """Resend what is unfinished, in order, before anything new [MQTT-4.4.0-1]."""
        if self.connects and not connack.session_present:
            raise Violation(f"{self.client_id}: session lost (Session Present 0 after a restart)")
        self.connects += 1
        self.quota = min(self.window, connack.properties.get("receive_maximum", 65535))
        again: list[Packet] = []
        for packet_id, (number, released) in self.inflight.items():
            if released:
                again.append(Pubrel(packet_id=packet_id))
            else:
                again.append(Publish(topic="crash/t", payload=b"%d" % number, qos=self.qos,
                                     packet_id=packet_id, dup=True))
        return again + self.more()

    def more(self) -> list[Packet]:
        new: list[Packet] = []
        while len(self.inflight) < self.quota and self.next_number < min(self.until, self.total):
            packet_id = self._next_id
            while packet_id in self.inflight:
                packet_id = packet_id % 65535 + 1
            self._next_id = packet_id % 65535 + 1
            self.inflight[packet_id] = (self.next_number, False)
            new.append(Publish(topic="crash/t", payload=b"%d" % self.next_number, qos=self.qos,
                               packet_id=packet_id))
            self.next_number += 1
        return new

    def handle(self, packet: Packet) -> list[Packet]:
        if isinstance(packet, Puback) and self.qos == 1:
            entry = self.inflight.pop(packet.packet_id, None)
            if entry is None:
                raise Violation(f"PUBACK for packet id {packet.packet_id}, which is not in flight")
            if packet.reason_code >= 0x80:
                raise Violation(f"PUBACK 0x{packet.reason_code:02x} for message {entry[0]}")
            self.acknowledged.add(entry[0])
            self.completed += 1
            return self.more()
        if isinstance(packet, Pubrec) and self.qos == 2:
            entry = self.inflight.get(packet.packet_id)
            if entry is None:
                raise Violation(f"PUBREC for packet id {packet.packet_id}, which is not in flight")
            if packet.reason_code >= 0x80:
                raise Violation(f"PUBREC 0x{packet.reason_code:02x} for message {entry[0]}")
            self.inflight[packet.packet_id] = (entry[0], True)
            self.acknowledged.add(entry[0])
            return [Pubrel(packet_id=packet.packet_id)]
        if isinstance(packet, Pubcomp) and self.qos == 2:
            entry = self.inflight.get(packet.packet_id)
            if entry is None or not entry[1]:
                raise Violation(f"PUBCOMP for packet id {packet.packet_id}, for which no PUBREL was sent")
            del self.inflight[packet.packet_id]
            self.completed += 1
            return self.more()
        raise Violation(f"{self.client_id} got an unexpected {packet!r}")

    @property
    def done(self) -> bool:
        return self.completed == self.total


@dataclass
class Subscriber:
    client_id: str
    qos: int
    receive_maximum: int
    delivered: list[int] = field(default_factory=list)
    """Message numbers as handed to the application, in order."""
    awaiting_pubrel: set[int] = field(default_factory=set)
    subscribed: bool = False
    connects: int = 0
    excess: int = 0
    """PUBLISHes the broker sent beyond the Receive Maximum granted [MQTT-4.9.0-2]."""

    def connect_packet(self) -> Connect:
        return Connect(client_id=self.client_id, clean_start=self.connects == 0, keep_alive=60,
                       protocol_level=MQTT_5, properties={"session_expiry_interval": EXPIRY,
                                                            "receive_maximum": self.receive_maximum})

    def connected(self, connack: Connack) -> list[Packet]:
        if self.connects and not connack.session_present:
            raise Violation(f"{self.client_id}: session lost (Session Present 0 after a restart)")
        self.connects += 1
        if self.subscribed:
            return []
        return [Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="crash/#", qos=self.qos),))]

    def handle(self, packet: Packet) -> list[Packet]:
        if isinstance(packet, Suback):
            if packet.reason_codes != (self.qos,):
                raise Violation(f"SUBACK {packet.reason_codes}")
            self.subscribed = True
            return []
        if isinstance(packet, Publish):
            number = int(packet.payload)
            if packet.qos == 1:
                self.delivered.append(number)
                return [Puback(packet_id=packet.packet_id)]
            if packet.qos != 2:
                raise Violation(f"a QoS {packet.qos} PUBLISH on a QoS 2 subscription")
            if packet.packet_id not in self.awaiting_pubrel:
                if len(self.awaiting_pubrel) >= self.receive_maximum:
                    self.excess += 1
                self.awaiting_pubrel.add(packet.packet_id)
                self.delivered.append(number)
            return [Pubrec(packet_id=packet.packet_id)]
        if isinstance(packet, Pubrel):
            self.awaiting_pubrel.discard(packet.packet_id)
            return [Pubcomp(packet_id=packet.packet_id)]
        raise Violation(f"{self.client_id} got an unexpected {packet!r}")


class Broker:
    """``python -m twisted mqttbroker`` on a fixed port and data directory, killed and started
    again at will."""

    def __init__(self, port: int, data_dir: Path, log_path: Path, *args: str) -> None:
        self.port, self.data_dir, self.args = port, data_dir, args
        self.log = open(log_path, "ab")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "mqttbroker", "--endpoint", f"tcp:{self.port}:interface={HOST}",
             "--data-dir", str(self.data_dir), *self.args], cwd=root, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        self.log.close()


@dataclass
class Report:
    qos: int
    messages: int
    kills: int
    """Kills of a broker serving: one that had acknowledged a message since it started."""
    seed: int
    acknowledged: int = 0
    received: int = 0
    """Distinct messages the subscriber got."""
    duplicates: int = 0
    """Deliveries of a message after its first (allowed at QoS 1 only)."""
    missing: int = 0
    """Acknowledged messages that never arrived."""
    out_of_order: int = 0
    """First deliveries that came after a later message's first delivery."""
    excess: int = 0
    disconnects: list[int] = field(default_factory=list)
    """Reason codes of the DISCONNECTs the broker sent."""
    missing_sample: list[int] = field(default_factory=list)
    """The first and last messages missing."""
    violation: str = ""
    stalled: bool = False
    seconds: float = 0.0
    after_last_restart: float = 0.0
    """Seconds from the last start of the broker until everything had arrived."""

    def ok(self) -> bool:
        return (not self.missing and not self.out_of_order and not self.excess and not self.disconnects
                and not self.violation and not self.stalled and (self.qos == 1 or not self.duplicates)
                and self.received == self.messages)

    def line(self) -> str:
        return (f"qos {self.qos} seed {self.seed}: {self.messages} messages, {self.kills} kills, "
                f"{self.acknowledged} acknowledged, {self.received} received, {self.duplicates} duplicates, "
                f"{self.missing} missing {self.missing_sample or ''}, {self.out_of_order} out of order, {self.excess} over Receive Maximum, "
                f"disconnects {self.disconnects}, {self.seconds:.1f}s ({self.after_last_restart:.1f}s after "
                f"the last restart, {self.received / self.seconds:,.0f} msg/s){' STALLED' if self.stalled else ''}{' ' + self.violation if self.violation else ''}")


def run(qos: int, messages: int, kills: int, seed: int, port: int, workdir: Path, window: int = 100,
        receive_maximum: int = 20, away: float = 0.0, broker_args: tuple[str, ...] = (),
        settle: float = 20.0, deadline: float = 120.0) -> Report:
    """Publish ``messages`` messages through a broker killed ``kills`` times at points of the
    traffic chosen by ``seed``; returns what the subscriber got. After each kill the subscriber
    stays away for up to ``away`` seconds (its messages queue meanwhile). ``settle``: seconds
    allowed after the last restart for everything to arrive (past it, the run has stalled)."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(port, data_dir, workdir / "broker.log", *broker_args)

    def kill() -> None:
        broker.kill()
        broker.start()
    try:
        return exchange(qos, messages, kills, seed, {"pub": port, "sub": port}, kill, window=window,
                        receive_maximum=receive_maximum, away=away, settle=settle, deadline=deadline)
    finally:
        broker.stop()


def exchange(qos: int, messages: int, kills: int, seed: int, ports: dict[str, int], kill: Callable[[], None],
             window: int = 100, receive_maximum: int = 20, away: float = 0.0, settle: float = 20.0,
             deadline: float = 120.0) -> Report:
    """The publisher (on ``ports["pub"]``) sends ``messages`` messages to the subscriber (on
    ``ports["sub"]``); ``kill()`` is called at ``kills`` points of the traffic chosen by ``seed``
    (it may change ``ports``, for clients that move to another node). Returns what the
    subscriber got."""
    rng = random.Random(seed)
    points = sorted(rng.sample(range(messages // 20, messages * 9 // 10), kills))
    report = Report(qos, messages, 0, seed)
    publisher = Publisher("crash-pub", qos, messages, window)
    subscriber = Subscriber("crash-sub", qos, receive_maximum)
    clients: dict[str, Any] = {"sub": subscriber, "pub": publisher}
    endpoints: dict[str, Endpoint | None] = {"sub": None, "pub": None}
    selector = selectors.DefaultSelector()
    started = last_start = time.monotonic()
    kill_at: float | None = None
    back_at = {"sub": 0.0, "pub": 0.0}
    served_from = 0  # messages acknowledged before the last start: the broker serves once past it

    def hold_publisher() -> None:
        """Within a window of the next kill point (all the messages after the last)."""
        publisher.until = points[0] + window if points else messages
    hold_publisher()

    def down(name: str) -> None:
        endpoint = endpoints[name]
        if endpoint is not None:
            selector.unregister(endpoint.sock)
            endpoint.close()
            endpoints[name] = None

    try:
        while True:
            now = time.monotonic()
            if (publisher.done and len(set(subscriber.delivered)) >= messages and not subscriber.awaiting_pubrel
                    and not points):  # (every kill made, if need be after the last message)
                break
            if now - started > deadline or (not points and now - last_start > settle):
                report.stalled = True
                break
            # A kill waits until the broker started last has acknowledged something (two points
            # in one window of messages killed a broker still starting, not in the traffic), and
            # the publisher waits within a window of the next kill, so as not to finish before.
            if points and kill_at is None and publisher.next_number >= points[0] and \
                    len(publisher.acknowledged) > served_from:
                kill_at = now + rng.uniform(0, 0.05)
            if kill_at is not None and now >= kill_at:
                points.pop(0)
                kill_at = None
                report.kills += 1
                served_from = len(publisher.acknowledged)
                hold_publisher()
                kill()
                endpoint = endpoints["pub"]
                if endpoint is not None and endpoint.connected:  # (on a node still up; else on its reconnect)
                    endpoint.send(*publisher.more())
                last_start = time.monotonic()
                back_at["sub"] = last_start + rng.uniform(0, away)
            for name, client in clients.items():
                if endpoints[name] is None and (name == "sub" or subscriber.subscribed) and now >= back_at[name]:
                    try:
                        endpoint = Endpoint(ports[name])
                    except OSError:
                        continue  # not listening yet
                    selector.register(endpoint.sock, selectors.EVENT_READ, name)
                    endpoints[name] = endpoint
                    endpoint.send(client.connect_packet())
            for key, _ in selector.select(0.01):
                name = key.data
                endpoint = endpoints[name]
                assert endpoint is not None
                try:
                    data = endpoint.sock.recv(1 << 16)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    down(name)
                    continue
                client = clients[name]
                for packet in endpoint.reader.feed(data):
                    if isinstance(packet, Connack):
                        if packet.reason_code:
                            raise Violation(f"{client.client_id} refused: CONNACK 0x{packet.reason_code:02x}")
                        endpoint.connected = True
                        endpoint.send(*client.connected(packet))
                    elif isinstance(packet, Disconnect):
                        report.disconnects.append(packet.reason_code)
                        raise Violation(f"{client.client_id} was sent DISCONNECT 0x{packet.reason_code:02x}")
                    else:
                        endpoint.send(*client.handle(packet))
            for name, endpoint in list(endpoints.items()):
                if endpoint is not None:
                    try:
                        endpoint.write_some()
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        down(name)
    except Violation as e:
        report.violation = str(e)
    finally:
        for name in endpoints:
            down(name)
        selector.close()
    end = time.monotonic()
    report.seconds = end - started
    report.after_last_restart = end - last_start
    report.acknowledged = len(publisher.acknowledged)
    report.excess = subscriber.excess
    seen: set[int] = set()
    highest = -1
    for number in subscriber.delivered:
        if number in seen:
            report.duplicates += 1
            continue
        seen.add(number)
        if number < highest:
            report.out_of_order += 1
        highest = max(highest, number)
    report.received = len(seen)
    missing = sorted(publisher.acknowledged - seen)
    report.missing = len(missing)
    report.missing_sample = missing[:5] + missing[-5:]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qos", type=int, default=2, choices=(1, 2))
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--away", type=float, default=0.0,
                        help="the subscriber stays away up to this many seconds after each kill")
    parser.add_argument("broker_args", nargs="*", help="more arguments of the broker (after --)")
    options = parser.parse_args()
    failed = 0
    for n in range(options.runs):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        report = run(options.qos, options.messages, options.kills, options.seed + n, port,
                     Path(tempfile.mkdtemp(prefix="mqttbroker-crash-")), away=options.away,
                     broker_args=tuple(options.broker_args))
        failed += not report.ok()
        print(("ok   " if report.ok() else "FAIL ") + report.line(), flush=True)
    print(f"{options.runs - failed} of {options.runs} runs clean")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

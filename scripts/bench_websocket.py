#!/usr/bin/env python3
"""WebSocket against TCP throughput on one broker, in one run.

    .venv/bin/python scripts/bench_websocket.py [--count 200000] [--size 64] [--rounds 3]

Starts ``python -m twisted mqttbroker`` with a tcp: and a --websocket endpoint on loopback, then
for each flow (tcp->tcp, ws->ws, tcp->ws, ws->tcp) sends COUNT QoS 0 PUBLISHes of SIZE payload
bytes from one publisher to one subscriber and reports messages per second end to end and the
broker's CPU time per message (from /proc). The clients are raw sockets with pre-encoded packets
and frames (one WebSocket frame per packet, as browsers and paho send them), so that the broker,
not the client, is what is measured. The publisher keeps at most WINDOW messages in flight.
Bounded: each flow gives up after --timeout seconds without progress.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mqtt_broker.wire import Connect, Publish, Subscribe, SubscriptionRequest, encode  # noqa: E402

WINDOW = 2000
TOPIC = "bench/ws"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def ws_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    header = bytes((0x82, 0x80 | n)) if n < 126 else bytes((0x82, 0xFE)) + n.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Client:
    """A connected MQTT client on a raw socket, over TCP or WebSocket."""

    def __init__(self, kind: str, port: int, client_id: str) -> None:
        self.kind = kind
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        if kind == "ws":
            self.sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
            while b"\r\n\r\n" not in self.buffer:
                self.buffer += self.sock.recv(4096)
            assert self.buffer.startswith(b"HTTP/1.1 101"), self.buffer
            self.buffer = self.buffer.split(b"\r\n\r\n", 1)[1]
        self.send(encode(Connect(client_id=client_id, keep_alive=0)))
        self.expect(4)  # CONNACK

    def frame(self, packet: bytes) -> bytes:
        return ws_frame(packet) if self.kind == "ws" else packet

    def send(self, packet: bytes) -> None:
        self.sock.sendall(self.frame(packet))

    def expect(self, n: int) -> None:
        """Read n bytes of MQTT (not counting WebSocket framing) and throw them away."""
        got = 0
        while got < n:
            got += self.mqtt_bytes(self.sock.recv(65536))

    def mqtt_bytes(self, data: bytes) -> int:
        """How many MQTT bytes ``data`` completes (WebSocket: frame payloads only)."""
        if self.kind == "tcp":
            return len(data)
        self.buffer += data
        total = 0
        buffer = self.buffer
        offset = 0
        while len(buffer) - offset >= 2:
            n = buffer[offset + 1] & 0x7F
            head = 2
            if n == 126:
                if len(buffer) - offset < 4:
                    break
                n, head = int.from_bytes(buffer[offset + 2:offset + 4], "big"), 4
            elif n == 127:
                if len(buffer) - offset < 10:
                    break
                n, head = int.from_bytes(buffer[offset + 2:offset + 10], "big"), 10
            if len(buffer) - offset < head + n:
                break
            total += n
            offset += head + n
        self.buffer = buffer[offset:]
        return total

    def close(self) -> None:
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flow(pub_kind: str, sub_kind: str, ports: dict[str, int], pid: int, count: int, size: int,
         timeout: float, tag: str) -> tuple[float, float]:
    subscriber = Client(sub_kind, ports[sub_kind], f"sub-{tag}")
    subscriber.send(encode(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=TOPIC),))))
    subscriber.expect(5)  # SUBACK
    publisher = Client(pub_kind, ports[pub_kind], f"pub-{tag}")
    packet = encode(Publish(topic=TOPIC, payload=b"x" * size))
    one = publisher.frame(packet)
    batch = one * 100
    subscriber.sock.setblocking(False)
    publisher.sock.setblocking(True)
    expected_bytes = len(packet) * count
    sent = received_bytes = 0
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    last_progress = time.monotonic()
    while received_bytes < expected_bytes:
        in_flight = sent - received_bytes // len(packet)
        if sent < count and in_flight < WINDOW:
            n = min(100, count - sent)
            publisher.sock.sendall(batch if n == 100 else one * n)
            sent += n
        readable, _, _ = select.select([subscriber.sock], [], [], 0 if sent < count and in_flight < WINDOW else 1.0)
        if readable:
            data = subscriber.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the broker closed the subscriber")
            received_bytes += subscriber.mqtt_bytes(data)
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > timeout:
            raise TimeoutError(f"{tag}: {received_bytes // len(packet)} of {count} after {timeout}s without progress")
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    publisher.close()
    subscriber.close()
    return count / elapsed, cpu / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each flow; the median is reported")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    ports = {"tcp": free_port(), "ws": free_port()}
    broker = subprocess.Popen(
        [sys.executable, "-m", "twisted", "mqttbroker", "--persistence", "memory",
         "--max-queued-messages", "0", "--endpoint", f"tcp:{ports['tcp']}:interface=127.0.0.1",
         "--websocket", f"tcp:{ports['ws']}:interface=127.0.0.1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        wait_port(ports["tcp"], deadline)
        wait_port(ports["ws"], deadline)
        print(f"{args.count} QoS 0 messages of {args.size} bytes per run, median of {args.rounds} runs")
        print(f"{'flow':10} {'msg/s':>10} {'broker CPU us/msg':>18}")
        for pub, sub in (("tcp", "tcp"), ("ws", "ws"), ("tcp", "ws"), ("ws", "tcp")):
            results = [flow(pub, sub, ports, broker.pid, args.count, args.size, args.timeout, f"{pub}-{sub}-{r}")
                       for r in range(args.rounds)]
            rate = statistics.median(r[0] for r in results)
            cpu = statistics.median(r[1] for r in results)
            print(f"{pub + '->' + sub:10} {rate:10,.0f} {cpu:18.2f}", flush=True)
    finally:
        broker.terminate()
        broker.wait(10)


if __name__ == "__main__":
    main()

"""The broker under abuse: crowds, leaks, stalled and hostile clients, huge and unread messages.

Each test runs the real broker as a subprocess on loopback and drives it with raw sockets
(``rawclient``), measuring it from outside through /proc: open descriptors and resident memory.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from typing import Any, Callable

import pytest

from twisted.logger import eventFromJSON, formatEvent

from rawclient import (
    RawClient, closed_by_peer, connect_crowd, open_fds, raise_open_files_limit, reset, rss_bytes,
    wait_until,
)

from mqtt_broker.wire import (
    Connack, Connect, Disconnect, FrameReader, Pingreq, Publish, Puback, Suback, Subscribe, SubscriptionRequest,
    encode,
)
from mqtt_broker.wire.properties import encode_varint

MB = 1_000_000

# A broker's descriptors beyond its baseline that are not leaks: a client that is still being
# torn down, the log file reopened, the kernel's view lagging by a poll.
FD_SLACK = 5


def settled_fds(pid: int) -> int:
    """The broker's descriptor count once the fixture's readiness probe has been closed."""
    counts: list[int] = []

    def stable() -> bool:
        counts.append(open_fds(pid))
        return len(counts) >= 3 and counts[-1] == counts[-2] == counts[-3]
    assert wait_until(stable, 5.0), f"descriptor count never settled: {counts}"
    return counts[-1]


def logged_failures(output: str) -> list[str]:
    """Log lines (twist writes JSON lines) that carry an exception: a failure or a traceback."""
    return [line for line in output.splitlines()
            if '"log_failure"' in line or '"isError": 1' in line or "Traceback" in line]


def round_trip(port: int, topic: str, payload: bytes, qos: int = 0, timeout: float = 5.0) -> float:
    """Subscribe, publish, receive on fresh clients; returns the seconds from publish to delivery."""
    sub = RawClient(port, timeout)
    pub = RawClient(port, timeout)
    try:
        assert sub.connect(f"rt-sub-{topic}").reason_code == 0
        assert pub.connect(f"rt-pub-{topic}").reason_code == 0
        sub.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter=topic, qos=qos),)))
        assert sub.expect(Suback).reason_codes == (qos,)
        start = time.monotonic()
        pub.send(Publish(topic=topic, payload=payload, qos=qos, packet_id=1 if qos else 0))
        if qos:
            assert pub.expect(Puback).packet_id == 1
        message = sub.expect(Publish)
        took = time.monotonic() - start
        assert (message.topic, message.payload, message.qos) == (topic, payload, qos)
        if qos:
            sub.send(Puback(packet_id=message.packet_id))
        return took
    finally:
        sub.close()
        pub.close()


def test_a_broker_out_of_descriptors_closes_what_it_cannot_take_and_goes_on(broker_process) -> None:  # type: ignore[no-untyped-def]
    """With every descriptor it may open in use, the broker closes each further connection at
    once (Twisted's reserved descriptor) rather than leaving it in the listen queue, still
    serves the clients it has, and takes new ones once descriptors are free again."""
    limit = 64
    broker = broker_process("--persistence", "memory", open_files=limit)
    spare = limit - settled_fds(broker.pid)
    count = spare + 20
    crowd = connect_crowd(broker.port, count, timeout=30.0, client_id=lambda i: f"fd-{i}", in_flight=count)
    try:
        assert 0 < len(crowd.connacks) <= spare, (spare, len(crowd.connacks), crowd.failures)
        assert len(crowd.connacks) + len(crowd.failures) == count, "some clients were left waiting"
        assert set(crowd.failures.values()) == {"closed by the broker before CONNACK"}, crowd.failures
        # Twisted logs it once it has closed what it could not take: after the clients saw it.
        assert wait_until(lambda: "EMFILE" in broker.output(), 10.0), broker.output()
        served = crowd.sockets[min(crowd.connacks)]
        served.setblocking(True)
        served.settimeout(10)
        served.sendall(b"\xc0\x00")  # PINGREQ
        assert served.recv(2) == b"\xd0\x00"  # PINGRESP
    finally:
        crowd.close()
    assert wait_until(lambda: open_fds(broker.pid) <= limit - spare + FD_SLACK, 15.0)
    client = RawClient(broker.port)
    try:
        assert client.connect("fd-after").reason_code == 0
    finally:
        client.close()
    assert broker.process.poll() is None, broker.output()


def test_ten_thousand_concurrent_connections(broker_process) -> None:  # type: ignore[no-untyped-def]
    count = 10_000
    limit = raise_open_files_limit()
    assert limit >= count + 500, f"RLIMIT_NOFILE hard limit {limit} is too low for {count} sockets"
    broker = broker_process()
    baseline = settled_fds(broker.pid)
    crowd = connect_crowd(broker.port, count, timeout=120.0, client_id=lambda i: f"crowd-{i}")
    try:
        refused = {i: c.reason_code for i, c in crowd.connacks.items() if c.reason_code}
        print(f"\n{count} connections: CONNACKs in {crowd.elapsed:.1f}s; broker fds {open_fds(broker.pid)}")
        assert not crowd.failures and not refused and len(crowd.connacks) == count, (
            f"{len(crowd.connacks)} CONNACKs of {count} in {crowd.elapsed:.1f}s; "
            f"{len(crowd.failures)} failed (e.g. {list(crowd.failures.items())[:3]}), {len(refused)} refused")
        assert open_fds(broker.pid) >= baseline + count
        took = round_trip(broker.port, "crowd/probe", b"still here")
        print(f"publish/subscribe round trip with {count} clients connected: {took * 1000:.0f} ms")
    finally:
        crowd.close()
    assert wait_until(lambda: open_fds(broker.pid) <= baseline + FD_SLACK, 15.0), (
        f"broker holds {open_fds(broker.pid)} descriptors 15s after {count} clients closed; baseline {baseline}")
    assert broker.process.poll() is None, broker.output()


def test_connection_burst_does_not_overflow_the_listen_queue(broker_process) -> None:  # type: ignore[no-untyped-def]
    # When clients reconnect all at once (a broker restart, a network blip), connections arrive
    # faster than one Python process accepts them; the kernel holds them meanwhile in the listen
    # queue, whose length is the backlog given to listen(). A SYN that finds the queue full is
    # dropped and the client retries only after 1 s (then 3, 7, 15 s...). Here 1,000 clients
    # connect one after another: the kernel completes each handshake in ~12 us, faster than the
    # broker accepts, so the queue must hold a burst of this size. None may wait for a retry.
    count = 1000
    raise_open_files_limit()
    broker = broker_process()
    times: list[float] = []
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            start = time.monotonic()
            sockets.append(socket.create_connection(("127.0.0.1", broker.port), timeout=10.0))
            times.append(time.monotonic() - start)
    finally:
        for sock in sockets:
            sock.close()
    retried = [t for t in times if t >= 0.5]
    print(f"\n{count} sequential connects: {sum(times):.2f}s in all, {len(retried)} waited for a SYN retry")
    assert not retried, (
        f"{len(retried)} of {count} connections waited for a SYN retransmission (slowest {max(times):.2f}s, "
        f"{sum(times):.1f}s in all): the listen backlog is too short for a burst of {count}")


def test_memory_does_not_grow_across_rounds_of_connections(broker_process) -> None:  # type: ignore[no-untyped-def]
    count = 5_000
    raise_open_files_limit()
    broker = broker_process()
    baseline = settled_fds(broker.pid)

    def one_round(name: str) -> int:
        # Each client also subscribes to a topic of its own, so that subscriptions left in the
        # topic tree after their session ended would show as growth too.
        crowd = connect_crowd(
            broker.port, count, timeout=60.0, client_id=lambda i: f"{name}-{i}", in_flight=100,
            then=lambda i: encode(Subscribe(packet_id=1, subscriptions=(
                SubscriptionRequest(topic_filter=f"leak/{name}/{i}", qos=1),))))
        try:
            assert len(crowd.connacks) == count and not any(c.reason_code for c in crowd.connacks.values()), (
                f"round {name}: {len(crowd.connacks)} CONNACKs of {count}, "
                f"failures {list(crowd.failures.items())[:3]}")
        finally:
            crowd.close()
        assert wait_until(lambda: open_fds(broker.pid) <= baseline + FD_SLACK, 15.0), (
            f"round {name}: broker holds {open_fds(broker.pid)} descriptors after its clients closed; "
            f"baseline {baseline}")
        return rss_bytes(broker.pid)

    start = rss_bytes(broker.pid)
    first = one_round("first")
    second = one_round("second")
    print(f"\nRSS: start {start / MB:.1f} MB, after round 1 {first / MB:.1f} MB, after round 2 {second / MB:.1f} MB")
    # CPython keeps freed memory in its arenas and rarely returns it to the OS, so round 1 raises
    # RSS to the high-water mark of 5,000 open connections (about 28 MB above start: ~5 KB a
    # connection) and that stays. Round 2 reuses the same memory, so comparing it with round 1
    # finds leaks without counting the high-water mark: measured growth between rounds was 0 to
    # 5.5 MB (allocator fragmentation settling). Keeping each closed connection's protocol object
    # (tried by not discarding it from the broker's connection set) added 17 MB a round; 10 MB
    # (2 KB per connection) is the line between.
    assert second - first < 10 * MB, (
        f"RSS grew {(second - first) / MB:.1f} MB in a second round of {count} connections "
        f"({first / MB:.1f} -> {second / MB:.1f} MB)")


def test_stalled_clients_are_closed_after_the_connect_timeout(broker_process) -> None:  # type: ignore[no-untyped-def]
    broker = broker_process("--connect-timeout", "1")
    baseline = settled_fds(broker.pid)
    normal = RawClient(broker.port)
    assert normal.connect("normal").reason_code == 0
    connect = encode(Connect(client_id="stalled", keep_alive=60))
    start = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", broker.port), timeout=5) for _ in range(200)]
    halves: list[socket.socket] = []
    reset_early = 0
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        halves.append(sock)
        try:
            sock.sendall(connect[: len(connect) // 2])
        except ConnectionResetError:
            reset_early += 1  # the broker's timeout came first: opening 400 took over a second
    opened = time.monotonic()
    try:
        # Meanwhile the connected client is served as usual.
        assert normal.ping(timeout=2.0) < 2.0
        deadline = opened + 6.0  # connect timeout 1 s, plus generous scheduling slack
        still_open = [i for i, sock in enumerate(silent + halves)
                      if not closed_by_peer(sock, max(deadline - time.monotonic(), 0.01))]
        took = time.monotonic() - opened
        print(f"\n400 stalled connections opened in {opened - start:.2f}s, all closed "
              f"{took:.2f}s after the last was opened ({reset_early} before we could send)")
        assert not still_open, (
            f"{len(still_open)} of 400 stalled connections still open {took:.1f}s after opening "
            f"(silent: {sum(i < 200 for i in still_open)}, half a CONNECT: {sum(i >= 200 for i in still_open)})")
        # The connect timeout is for connections without CONNECT only: this one has outlived it.
        assert normal.ping(timeout=2.0) < 2.0
        assert round_trip(broker.port, "stalled/after", b"fine") < 5.0
    finally:
        for sock in silent + halves:
            sock.close()
        normal.close()
    assert wait_until(lambda: open_fds(broker.pid) <= baseline + FD_SLACK, 15.0), (
        f"broker holds {open_fds(broker.pid)} descriptors; baseline {baseline}")


def test_reconnect_storm_with_the_same_client_ids(broker_process) -> None:  # type: ignore[no-untyped-def]
    ids = [f"storm-{n}" for n in range(20)]
    rounds = 25
    broker = broker_process()
    baseline = settled_fds(broker.pid)
    kept: list[RawClient] = []
    start = time.monotonic()
    for r in range(rounds):
        for n, client_id in enumerate(ids):
            client = RawClient(broker.port, timeout=10.0)
            connect = Connect(client_id=client_id, clean_start=False, keep_alive=60)
            kind = (r + n) % 5
            if kind == 0:  # gone before the CONNACK, with a RST
                client.send(connect)
                reset(client.sock)
            elif kind == 1:  # gone before the CONNACK, with a FIN and no DISCONNECT
                client.send(connect)
                client.close()
            else:  # stays, until the next connection with its id takes the session over
                client.send(connect, Subscribe(packet_id=1, subscriptions=(
                    SubscriptionRequest(topic_filter=f"storm/{client_id}", qos=1),)))
                kept.append(client)
    opened = time.monotonic() - start
    finals: dict[str, RawClient] = {}
    try:
        # Every CONNECT is answered before the next connection with the same id can take over.
        refused = [connack for connack in (client.expect(Connack, 10.0) for client in kept) if connack.reason_code]
        assert not refused, refused[:3]
        for client_id in ids:
            final = finals[client_id] = RawClient(broker.port)
            connack = final.connect(client_id, clean=False)
            assert (connack.reason_code, connack.session_present) == (0, True), (client_id, connack)
        # Every storm connection has been taken over by now, so the broker closed them all.
        deadline = time.monotonic() + 10.0
        still_open = [client for client in kept if not client.closed_by_peer(max(deadline - time.monotonic(), 0.01))]
        print(f"\n{rounds * len(ids)} storm connections opened in {opened:.2f}s; "
              f"broker fds {open_fds(broker.pid)} with 20 clients connected (baseline {baseline})")
        assert not still_open, f"{len(still_open)} of {len(kept)} taken-over connections still open"
        # The sessions survived the storm with their subscriptions.
        for client_id, final in finals.items():
            final.send(Publish(topic=f"storm/{client_id}", payload=client_id.encode(), qos=1, packet_id=1))
            received: dict[type, Any] = {}
            for _ in range(2):  # the PUBACK and the message itself, in either order
                packet = final.receive()
                received[type(packet)] = packet
            assert received[Publish].payload == client_id.encode()
            final.send(Puback(packet_id=received[Publish].packet_id), Disconnect())
    finally:
        for client in [*kept, *finals.values()]:
            client.close()
    assert broker.process.poll() is None, broker.output()
    assert wait_until(lambda: open_fds(broker.pid) <= baseline + FD_SLACK, 15.0), (
        f"broker holds {open_fds(broker.pid)} descriptors after the storm; baseline {baseline}")


def test_garbage_closes_the_sender_only(broker_process) -> None:  # type: ignore[no-untyped-def]
    # Garbage can look like the start of a long packet, which only a timeout ends: 2 s without
    # CONNECT, or 1.5 x the 2 s keepalive after one.
    broker = broker_process("--connect-timeout", "2")
    rng = random.Random(1883)
    sockets: list[socket.socket] = []
    closed_early: set[int] = set()
    for i in range(100):
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        sockets.append(sock)
        garbage = rng.randbytes(rng.randint(1, 4096))
        connect = encode(Connect(client_id=f"garbage-{i}", keep_alive=2))
        try:
            if i % 3 == 0:
                sock.sendall(garbage)
            elif i % 3 == 1:
                sock.sendall(connect + garbage)
            else:
                sock.sendall(connect)
                assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
                sock.sendall(garbage)
        except (ConnectionResetError, BrokenPipeError):
            closed_early.add(i)  # closed while we were still writing: what we want
    try:
        assert round_trip(broker.port, "garbage/during", b"qos1", qos=1) < 5.0
        sent = time.monotonic()
        deadline = sent + 10.0
        still_open = [i for i, sock in enumerate(sockets)
                      if i not in closed_early and not closed_by_peer(sock, max(deadline - time.monotonic(), 0.01))]
        print(f"\n100 garbage senders all closed {time.monotonic() - sent:.2f}s after the last sent "
              f"({len(closed_early)} while still sending)")
        assert not still_open, f"connections {still_open} still open 10 s after sending garbage"
    finally:
        for sock in sockets:
            sock.close()
    assert broker.process.poll() is None, broker.output()
    assert round_trip(broker.port, "garbage/after", b"qos1", qos=1) < 5.0
    # Malformed input must be refused by the codec (MalformedPacket and friends), not by an
    # exception escaping into Twisted's "Unhandled Error".
    errors = logged_failures(broker.output())
    assert not errors, f"{len(errors)} unhandled errors logged, the first: {errors[0][:2000]}"


def run_in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``target`` in a thread; the dict gets its "result" or its "error"."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except BaseException as e:  # handed to the test thread, which raises it
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_large_message_and_oversized_header(broker_process) -> None:  # type: ignore[no-untyped-def]
    limit = 64 * 1024 * 1024
    broker = broker_process("--max-packet-size", str(limit))
    payload = random.Random(40).randbytes(40 * MB)
    digest = hashlib.sha256(payload).hexdigest()
    sub = RawClient(broker.port, timeout=60.0)
    pub = RawClient(broker.port, timeout=60.0)
    pinger = RawClient(broker.port)
    assert sub.connect("big-sub").reason_code == 0
    assert pub.connect("big-pub").reason_code == 0
    assert pinger.connect("big-pinger").reason_code == 0
    sub.send(Subscribe(packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="big", qos=1),)))
    assert sub.expect(Suback).reason_codes == (1,)

    def publish() -> None:
        pub.send(Publish(topic="big", payload=payload, qos=1, packet_id=9))
        assert pub.expect(Puback).packet_id == 9

    def receive() -> tuple[str, int]:
        message = sub.expect(Publish)
        sub.send(Puback(packet_id=message.packet_id))
        return hashlib.sha256(message.payload).hexdigest(), message.qos

    try:
        start = time.monotonic()
        threads = [run_in_thread(publish), run_in_thread(receive)]
        pings: list[float] = []
        while any(thread.is_alive() for thread, _ in threads) and time.monotonic() - start < 90.0:
            pings.append(pinger.ping(timeout=2.0))  # raises TimeoutError after 2 s
            time.sleep(0.02)
        took = time.monotonic() - start
        for thread, outcome in threads:
            thread.join(timeout=1.0)
            assert not thread.is_alive(), f"40 MB message not through after {took:.0f}s"
            if "error" in outcome:
                raise outcome["error"]
        print(f"\n40 MB QoS 1 message delivered in {took:.2f}s; {len(pings)} pings meanwhile, "
              f"slowest {max(pings, default=0) * 1000:.0f} ms")
        assert threads[1][1]["result"] == (digest, 1)
        assert pings and max(pings) < 2.0
    finally:
        sub.close()
        pub.close()

    # A header announcing more than the limit ends the connection at once, body or not: the
    # connection's 60 s keepalive and the 10 s connect timeout are far off.
    announced = limit  # remaining length alone; with the fixed header the packet exceeds the limit
    connected = RawClient(broker.port)
    assert connected.connect("too-big", keep_alive=60).reason_code == 0
    unconnected = RawClient(broker.port)
    start = time.monotonic()
    connected.send_bytes(b"\x30" + encode_varint(announced) + b"\x00\x03big")
    unconnected.send_bytes(b"\x10" + encode_varint(announced) + b"\x00\x04MQTT")
    try:
        assert connected.closed_by_peer(2.0), "an oversized PUBLISH header did not close the connection"
        assert unconnected.closed_by_peer(2.0), "an oversized CONNECT header did not close the connection"
        print(f"oversized headers: connections closed in {(time.monotonic() - start) * 1000:.0f} ms")
        assert pinger.ping(timeout=2.0) < 2.0
    finally:
        connected.close()
        unconnected.close()
        pinger.close()
    assert broker.process.poll() is None, broker.output()


def unread_subscriber(port: int, client_id: str) -> socket.socket:
    """A raw client subscribed to "flood" at QoS 0 that, after its CONNACK, reads nothing until
    the test says so; its small receive buffer keeps the kernel from absorbing a flood for the
    broker."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(5.0)
    sock.connect(("127.0.0.1", port))
    sock.sendall(encode(Connect(client_id=client_id, keep_alive=0)) + encode(Subscribe(
        packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="flood", qos=0),))))
    assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK
    return sock


def dropped_in_sys(port: int, expected: int, timeout: float = 10.0) -> int:
    """The $SYS count of dropped messages, read until it shows ``expected`` (it is published
    every sys_interval) or the time is up; returns the last value seen."""
    watcher = RawClient(port)
    try:
        assert watcher.connect("sys-watcher").reason_code == 0
        watcher.send(Subscribe(packet_id=1, subscriptions=(
            SubscriptionRequest(topic_filter="$SYS/broker/publish/messages/dropped"),)))
        watcher.expect(Suback)
        value = -1
        deadline = time.monotonic() + timeout
        while value != expected and time.monotonic() < deadline:
            value = int(watcher.expect(Publish, timeout=timeout).payload)
        return value
    finally:
        watcher.close()


@pytest.mark.parametrize("bound", [(), ("--max-queued-messages", "0", "--max-queued-bytes", "1000000")],
                         ids=["count", "bytes"])
def test_slow_subscriber_does_not_grow_the_broker(broker_process, bound: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    """A subscriber that never reads, under a QoS 0 flood: the broker keeps at most its queue
    (1,000 messages by default, or 1 MB by bytes) and drops the rest, counted; meanwhile other
    clients are answered at once."""
    broker = broker_process("--sys-interval", "0.2", *bound)
    slow = unread_subscriber(broker.port, "slow")
    pub = RawClient(broker.port, timeout=30.0)
    pinger = RawClient(broker.port)
    assert pub.connect("flood-pub").reason_code == 0
    assert pinger.connect("flood-pinger").reason_code == 0
    assert pub.ping() < 5.0  # the SUBSCRIBE has been handled by now too
    before = rss_bytes(broker.pid)
    count = 20_000
    batch = encode(Publish(topic="flood", payload=bytes(1024))) * 1000
    pings: list[float] = []
    peak = before
    start = time.monotonic()
    try:
        for _ in range(count // 1000):
            pub.send_bytes(batch)
            pings.append(pinger.ping(timeout=2.0))
            peak = max(peak, rss_bytes(broker.pid))
        assert pub.ping(timeout=30.0) < 30.0  # every PUBLISH before it has been routed
        took = time.monotonic() - start
        after = rss_bytes(broker.pid)
        peak = max(peak, after)
        # Now the subscriber reads: it gets what the kernel buffered and what the broker queued;
        # the rest was dropped. Once it has read all (its socket idle for 0.2 s), a marker
        # published then arrives behind them.
        reader = FrameReader()
        received = 0
        marked = False
        slow.settimeout(0.2)
        deadline = time.monotonic() + 30.0
        while not marked:
            assert time.monotonic() < deadline, f"slow subscriber: {received} messages, no marker in 30 s"
            try:
                data = slow.recv(1 << 20)
            except socket.timeout:
                pub.send(Publish(topic="flood", payload=b"marker"))
                continue
            assert data, "the broker closed the slow subscriber"
            payloads = [p.payload for p in reader.feed(data) if isinstance(p, Publish)]
            received += sum(len(payload) == 1024 for payload in payloads)
            marked = b"marker" in payloads
    finally:
        slow.close()
        pub.close()
        pinger.close()
    print(f"\n{count:,} x 1 KiB to an unread subscriber in {took:.2f}s; pings slowest {max(pings) * 1000:.0f} ms; "
          f"RSS {before / MB:.1f} -> peak {peak / MB:.1f}, end {after / MB:.1f} MB; "
          f"the subscriber then read {received} of them")
    assert max(pings) < 2.0
    # Measured: RSS grows by about 2.5 MB with the default queue of 1,000 messages a client (plus
    # the 1 MiB a connection holds while its socket is full); with --max-queued-messages 0 (no
    # limit) the same flood grows it by 21 MB, because every message stays queued for the
    # subscriber. 10 MB is the line between.
    assert peak - before < 10 * MB, f"RSS grew {(peak - before) / MB:.1f} MB for one slow subscriber"
    # The broker kept at most its queue (1,000 messages or 1 MB) beyond what the kernel buffered
    # and the connection held, and dropped the rest.
    assert 1000 < received < count, received
    # Every message not delivered was counted as dropped, in $SYS and in the log.
    assert dropped_in_sys(broker.port, count - received) == count - received
    logged = [formatEvent(eventFromJSON(line)) for line in broker.output().replace("\x1e", "\n").splitlines()
              if line.strip()]
    assert any(line.startswith("queue of 'slow' is full") for line in logged)


def test_a_slow_subscriber_that_reads_and_pings_outlives_its_keepalive_under_a_flood(broker_process) -> None:  # type: ignore[no-untyped-def]
    """A subscriber reading about 20 KB/s under a QoS 0 flood, pinging every second with a
    keepalive of 2 s: the broker stops reading it (what it holds for it is full), but it reads,
    so it is not silent [MQTT-3.1.2-24]. It stays connected for 10 s, three keepalive checks:
    each reads its PINGREQs again (unread, it would be dropped at the next one)."""
    broker = broker_process("--max-held-bytes", "65536")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (its window opens as it reads)
    slow.settimeout(5.0)
    slow.connect(("127.0.0.1", broker.port))
    slow.sendall(encode(Connect(client_id="slow", keep_alive=2)) + encode(Subscribe(
        packet_id=1, subscriptions=(SubscriptionRequest(topic_filter="flood", qos=0),))))
    pub = RawClient(broker.port, timeout=30.0)
    stop = threading.Event()

    def flood() -> None:
        batch = encode(Publish(topic="flood", payload=bytes(1000))) * 50
        while not stop.wait(0.01):  # 50 KB each 10 ms, until the test ends
            pub.send_bytes(batch)
    ended = None
    try:
        assert pub.connect("flood-pub").reason_code == 0
        assert pub.ping() < 5.0  # the SUBSCRIBE has been handled by now too
        flooding, _ = run_in_thread(flood)
        start = pinged = time.monotonic()
        while time.monotonic() - start < 10.0 and ended is None:
            try:
                if time.monotonic() - pinged >= 1.0:
                    slow.sendall(encode(Pingreq()))
                    pinged = time.monotonic()
                if not slow.recv(2048):
                    ended = "closed"
            except OSError as e:
                ended = repr(e)
            stop.wait(0.1)  # the client's pace: 2 KiB every 0.1 s
    finally:
        stop.set()
        slow.close()
        pub.close()
    flooding.join(timeout=5.0)
    assert ended is None, f"{ended} after {time.monotonic() - start:.1f}s: " + " ".join(
        str(event["reason"]) for event in broker.events() if event.get("client_id") == "slow" and "reason" in event)


def test_a_connection_dropped_while_its_socket_is_full_closes(broker_process) -> None:  # type: ignore[no-untyped-def]
    """A connection the broker drops (here, taken over) while its transport is paused on a full
    socket still closes once the client has read what was written to it."""
    broker = broker_process()
    stuck = unread_subscriber(broker.port, "stuck")
    pub = RawClient(broker.port, timeout=30.0)
    try:
        assert pub.connect("flood-pub").reason_code == 0
        assert pub.ping() < 5.0  # the SUBSCRIBE has been handled by now too
        pub.send_bytes(encode(Publish(topic="flood", payload=bytes(1024))) * 8000)
        assert pub.ping(timeout=30.0) < 30.0  # all routed: the broker's writes wait on the full socket
        taker = RawClient(broker.port)
        assert taker.connect("stuck").reason_code == 0  # takes the session over: "stuck" is dropped
        taker.close()
        deadline = time.monotonic() + 30.0
        while stuck.recv(1 << 20):  # read all that was written; then the broker must close
            assert time.monotonic() < deadline, "the dropped connection was never closed"
    finally:
        stuck.close()
        pub.close()

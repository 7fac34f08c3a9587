"""MQTT clients on plain sockets for abuse tests: crowds of them, partial or malformed packets,
sockets that never read. Packets go through the project's sans-IO codec; every wait is bounded.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from mqtt_broker.wire import Connack, Connect, FrameReader, Packet, Pingreq, Pingresp, encode

HOST = "127.0.0.1"
P = TypeVar("P", bound=Packet)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def open_fds(pid: int) -> int:
    """Descriptors the process has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size of the process (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def reset(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Read and discard until the peer closes (EOF or RST); False if it is still open after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, BlockingIOError):
            return False


class RawClient:
    """One blocking MQTT 3.1.1 connection with bounded receives."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader()
        self._pending: deque[Packet] = deque()

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p) for p in packets))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, timeout: float | None = None) -> Packet:
        """The next packet; raises TimeoutError, or ConnectionError if the broker closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet from the broker in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                raise TimeoutError("no packet from the broker in time") from None
            if not data:
                raise ConnectionError("the broker closed the connection")
            self._pending.extend(self.reader.feed(data))
        return self._pending.popleft()

    def expect(self, kind: type[P], timeout: float | None = None) -> P:
        packet = self.receive(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    def connect(self, client_id: str, clean: bool = True, keep_alive: int = 60) -> Connack:
        self.send(Connect(client_id=client_id, clean_start=clean, keep_alive=keep_alive))
        return self.expect(Connack)

    def ping(self, timeout: float | None = None) -> float:
        """A PINGREQ/PINGRESP round trip; returns how long it took, in seconds."""
        start = time.monotonic()
        self.send(Pingreq())
        self.expect(Pingresp, timeout)
        return time.monotonic() - start

    def closed_by_peer(self, timeout: float) -> bool:
        return closed_by_peer(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Crowd:
    """Many connections opened at once; ``connacks[i]`` is the CONNACK socket ``i`` received."""

    sockets: list[socket.socket] = field(default_factory=list)
    connacks: dict[int, Connack] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    elapsed: float = 0.0

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


def connect_crowd(port: int, count: int, timeout: float, client_id: Callable[[int], str],
                  clean: bool = True, keep_alive: int = 0, in_flight: int = 500,
                  then: Callable[[int], bytes] | None = None) -> Crowd:
    """Open ``count`` non-blocking connections, each sending a CONNECT (and ``then(i)`` in the
    same write), with at most ``in_flight`` of them between connect() and CONNACK at a time (a
    load generator's pacing), and read the CONNACKs, for at most ``timeout`` seconds. The
    sockets stay open: close the crowd."""
    crowd = Crowd()
    selector = selectors.DefaultSelector()
    readers: dict[int, FrameReader] = {}
    start = time.monotonic()
    deadline = start + timeout
    opened = 0
    waiting = 0
    try:
        while len(crowd.connacks) + len(crowd.failures) < count and time.monotonic() < deadline:
            while opened < count and waiting < in_flight:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                crowd.sockets.append(sock)
                code = sock.connect_ex((HOST, port))
                if code not in (0, errno.EINPROGRESS):
                    crowd.failures[opened] = f"connect: {errno.errorcode.get(code, code)}"
                else:
                    selector.register(sock, selectors.EVENT_WRITE, opened)
                    waiting += 1
                opened += 1
            for key, events in selector.select(timeout=min(0.5, max(deadline - time.monotonic(), 0))):
                sock, index = key.fileobj, key.data
                assert isinstance(sock, socket.socket)
                if key.events == selectors.EVENT_WRITE:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        crowd.failures[index] = f"connect: {errno.errorcode.get(error, error)}"
                        selector.unregister(sock)
                        waiting -= 1
                        continue
                    data = encode(Connect(client_id=client_id(index), clean_start=clean, keep_alive=keep_alive))
                    if then is not None:
                        data += then(index)
                    assert sock.send(data) == len(data)
                    readers[index] = FrameReader()
                    selector.modify(sock, selectors.EVENT_READ, index)
                    continue
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    crowd.failures[index] = "closed by the broker before CONNACK"
                else:
                    packets = readers[index].feed(data)
                    if not packets:
                        continue
                    assert isinstance(packets[0], Connack), packets
                    crowd.connacks[index] = packets[0]
                selector.unregister(sock)
                readers.pop(index)
                waiting -= 1
    finally:
        selector.close()
    crowd.elapsed = time.monotonic() - start
    return crowd

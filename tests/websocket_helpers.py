"""A byte-exact WebSocket client for tests: the handshake request, masked client frames, a frame
parser, and a blocking client on a real socket (with TLS if asked). Libraries will not send a text
frame to an MQTT broker, split a packet across frames on purpose or lie about a frame's length;
this does. Every wait is bounded by the socket timeout.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import struct
from dataclasses import dataclass

from mqtt_broker.wire import FrameReader, Packet

WAIT = 10.0
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3's sample nonce
ACCEPT = base64.b64encode(hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def handshake_request(path: str = "/mqtt", protocols: tuple[str, ...] | None = ("mqtt",),
                      headers: dict[str, str] | None = None, host: str = "127.0.0.1") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]
    if protocols is not None:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def client_frame(payload: bytes, opcode: int = BINARY, fin: bool = True, mask: bytes = b"\x37\xfa\x21\x3d",
                 rsv1: bool = False, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` overrides the announced payload length (to lie)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv1: bool = False

    @property
    def close_code(self) -> int | None:
        assert self.opcode == CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


class FrameParser:
    """Server frames from a byte stream (server frames are never masked, RFC 6455 5.1)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= 2:
            first, second = self.buffer[0], self.buffer[1]
            assert not second & 0x80, "a server frame must not be masked"
            n, offset = second & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    break
                n, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif n == 127:
                if len(self.buffer) < 10:
                    break
                n, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if len(self.buffer) < offset + n:
                break
            frames.append(Frame(first & 0x0F, self.buffer[offset:offset + n], bool(first & 0x80), bool(first & 0x40)))
            self.buffer = self.buffer[offset + n:]
        return frames


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status code, lower-cased headers, the bytes after them), or None while incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, data[end + 4:]


class RawWebSocket:
    """A blocking WebSocket client on a loopback socket."""

    def __init__(self, port: int, path: str = "/mqtt", protocols: tuple[str, ...] | None = ("mqtt",),
                 headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
                 version: int = 4) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock: socket.socket = context.wrap_socket(sock, server_hostname="localhost") if context else sock
        self.sock.sendall(handshake_request(path, protocols, headers))
        received = b""
        while (response := split_response(received)) is None:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError(f"closed during the handshake after {received!r}")
            received += data
        self.status, self.headers, rest = response
        self.parser = FrameParser()
        self.reader = FrameReader(version=version)
        self.frames: list[Frame] = self.parser.feed(rest)

    def send(self, payload: bytes, opcode: int = BINARY, fin: bool = True, **kwargs: object) -> None:
        self.sock.sendall(client_frame(payload, opcode, fin, **kwargs))  # type: ignore[arg-type]

    def next_frame(self) -> Frame:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.frames += self.parser.feed(data)
        return self.frames.pop(0)

    def packets(self, count: int = 1) -> list[Packet]:
        """The next ``count`` MQTT packets, from as many binary frames as they take."""
        packets: list[Packet] = []
        while len(packets) < count:
            frame = self.next_frame()
            assert frame.opcode == BINARY, frame
            packets += self.reader.feed(frame.payload)
        assert len(packets) == count, packets
        return packets

    def until_closed(self) -> list[Frame]:
        """Every frame until the broker closes the socket; fails if it has not within WAIT."""
        frames, self.frames = self.frames, []
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return frames
            except socket.timeout:
                raise AssertionError(f"the broker kept the connection open for {WAIT}s") from None
            if not data:
                return frames
            frames += self.parser.feed(data)

    def close(self) -> None:
        self.sock.close()

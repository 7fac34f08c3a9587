"""The admin site: the dashboard page at ``/``, the API at ``/api/v1``, ``/metrics``, and MQTT
over WebSocket at ``/mqtt`` when ``http_websocket`` is on.

The dashboard is three static files in ``static/`` (HTML, CSS, plain JavaScript drawing its
charts on canvas): no build step and no third-party code. It polls the API with the key the
operator types in, kept in the browser's local storage. On a node of a cluster (``/stats`` has a
``cluster`` part then) it shows the cluster's nodes too, from ``/api/v1/cluster/nodes``; a broker
of its own is never asked for them. On a broker with bridges (``/stats`` has a ``bridges`` part) it
shows each bridge's state and figures, with a button that restarts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from ..deadlines import cancel
from . import metrics
from .api import ApiResource, BoundedRequest
from .shapes import ApiError
from .keys import KeyRing, presented_key

STATIC = Path(__file__).with_name("static")

REQUEST_LINE_LIMIT = 6 * 65_535 + 1024
"""Bytes of a request line the admin site reads: a path may hold a client id and a topic filter,
each as long as MQTT allows (65,535 bytes) and 3 times that percent-encoded, with the rest of the
line beside them. twisted.web reads 16 KiB: 2,750 non-ASCII characters of an id."""
HEADERS_LIMIT = 16_384
"""Bytes of a request's header lines, the request line apart (414 past REQUEST_LINE_LIMIT, 431
past this)."""
REQUEST_DEADLINE = 60.0
"""Seconds a request has from its first byte to its last (line, headers and body) before its
connection is answered 408 and closed. The idle timeout (as long) starts again with every byte: a
request trickled a byte every 25 s held its connection, and what it had sent, for ever."""

# Everything the page needs is on this site; nothing inline, nothing from elsewhere.
_SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


class StaticFiles(File):
    """The dashboard's files, with headers that keep the page to itself (children inherit them)."""

    def render(self, request: Request) -> Any:
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return super().render(request)

    def directoryListing(self) -> Resource:  # type: ignore[override]
        return self.childNotFound

    def getChild(self, path: bytes, request: Request) -> Resource:
        # A name no file has (a NUL, bytes that are not UTF-8): Twisted's File lets the error of
        # its stat, or of the decoding, out as a 500 or a logged traceback, one request each.
        if b"\x00" in path:
            return self.childNotFound
        try:
            path.decode("utf-8")
        except UnicodeDecodeError:
            return self.childNotFound
        return super().getChild(path, request)  # type: ignore[no-any-return]


class MetricsResource(Resource):
    """``/metrics``: the Prometheus text format, built at scrape time."""

    isLeaf = True

    def __init__(self, broker: Any, operations: Any) -> None:
        super().__init__()
        self.registry = metrics.registry(broker, operations)
        self.keys = KeyRing(broker.config.http_api_keys) if broker.config.http_metrics_auth else None

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"x-content-type-options", b"nosniff")
        if self.keys is not None:
            presented = presented_key(request)
            error = None
            if presented is None:
                request.setHeader(b"www-authenticate", b'Bearer realm="mqtt_broker metrics"')
                error = ApiError(401, "an API key is needed (http_metrics_auth)")
            elif self.keys.identify(presented) is None:
                error = ApiError(403, "this API key is not accepted")
            if error is not None:
                request.setResponseCode(error.status)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return error.message.encode() + b"\n"
        body, content_type = metrics.render(self.registry)
        request.setHeader(b"content-type", content_type.encode())
        return body


class AdminChannel(HTTPChannel):
    """An HTTP/1.1 connection of the admin site, which answers a pipelined request only once its
    transport took the answer before, reads a request line up to :data:`REQUEST_LINE_LIMIT`, and
    gives each request :data:`REQUEST_DEADLINE` seconds to come whole.

    twisted.web's HTTPChannel stops reading when the transport is full between requests, but
    goes on answering the requests it has already read: 64 KiB of pipelined requests from a
    client that reads nothing made the transport hold some 1,400 answers (60 MB of
    ``openapi.json``) until the idle timeout, and held the reactor for each.
    """

    MAX_LENGTH = REQUEST_LINE_LIMIT
    # (the request line and its headers: lineReceived holds the headers alone to HEADERS_LIMIT)
    totalHeadersSize = REQUEST_LINE_LIMIT + HEADERS_LIMIT

    def __init__(self) -> None:
        super().__init__()
        self._pieces: list[bytes] = []
        self._pieces_size = 0
        self._request_line_size = 0
        self._deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if data and self._deadline is None and not self._handlingRequest:
            # (what comes while a request is handled waits unread for it, and starts its deadline
            # once it is read)
            self._deadline = self.callLater(REQUEST_DEADLINE, self._too_slow)
        # LineReceiver joins what it holds of a line with each piece that comes, and looks for
        # the line's end in the whole again: a request line of REQUEST_LINE_LIMIT that came a
        # byte at a time would take the reactor seconds. Pieces with no end of line in them wait
        # here, to be joined once.
        if (data and b"\n" not in data and self.line_mode and not self._busyReceiving and not self.paused
                and len(self._buffer) + self._pieces_size + len(data) <= self.MAX_LENGTH):
            self._pieces.append(data)
            self._pieces_size += len(data)
            self.resetTimeout()
            return
        if self._pieces:
            data = b"".join([*self._pieces, data])
            self._pieces, self._pieces_size = [], 0
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self._receivedHeaderSize:
            self._request_line_size = len(line)
        elif self._receivedHeaderSize - self._request_line_size + len(line) > HEADERS_LIMIT:
            self._refuse(b"431 Request Header Fields Too Large", f"request headers above {HEADERS_LIMIT} bytes")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._receivedHeaderSize:
            self._refuse(b"431 Request Header Fields Too Large", f"a request header above {HEADERS_LIMIT} bytes")
        else:
            self._refuse(b"414 URI Too Long", f"request line above {REQUEST_LINE_LIMIT} bytes")

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        cancel(self._deadline)
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(b"408 Request Timeout", f"the request did not come whole within {REQUEST_DEADLINE:g} seconds")
        if self.abortTimeout is not None:  # (as twisted.web's idle timeout: a client that reads nothing)
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _refuse(self, status: bytes, message: str) -> None:
        """Answer ``status`` with a JSON error, as the API does, and close: what follows in the
        connection cannot be told from the request it cut off (twisted.web closes without an
        answer, or answers a bare 400)."""
        body = json.dumps({"error": message}).encode() + b"\n"
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        self.loseConnection()

    def requestDone(self, request: Request) -> None:
        if self._waitingForTransport:
            # LineReceiver reads no line while paused: the next request waits, unparsed, in its
            # buffer, and the socket is not read, until the transport asks for more.
            self.paused = True
            self._networkProducer.pauseProducing()
        super().requestDone(request)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.paused:
            self.paused = False
            self.dataReceived(b"")


class AdminSite(Site):
    """A Site that keeps no access log (the dashboard polls every few seconds), on
    :class:`AdminChannel` connections."""

    # (in place of twisted.web's wrapper of its HTTPChannel, which would switch to HTTP/2 were it
    # negotiated over TLS: no admin endpoint offers it)
    protocol = AdminChannel  # type: ignore[assignment]

    def log(self, request: Any) -> None:
        pass


def make_site(broker: Any, operations: Any) -> AdminSite:
    root = StaticFiles(str(STATIC))
    root.indexNames = ["index.html"]
    api = ApiResource(broker, operations)
    root.putChild(b"api", api)
    root.putChild(b"metrics", MetricsResource(broker, operations))
    if broker.config.http_websocket:
        from ..websocket import WebSocketResource  # autobahn is imported only when used
        root.putChild(b"mqtt", WebSocketResource(broker))
    request_factory = type("AdminRequest", (BoundedRequest,), {"max_body": broker.config.http_max_body_size,
                                                               "keys": api.keys})
    # twisted.web parses a POST form body into args before any resource checks a key (1 MiB of it
    # held the reactor 300 ms): the API reads JSON only.
    site = AdminSite(root, requestFactory=request_factory, parsePOSTFormSubmission=False, reactor=broker.reactor)
    site.displayTracebacks = False
    return site


__all__ = ["HEADERS_LIMIT", "REQUEST_DEADLINE", "REQUEST_LINE_LIMIT", "AdminChannel", "AdminSite", "MetricsResource",
           "StaticFiles", "make_site"]

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

from pathlib import Path
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from . import metrics
from .api import ApiResource, BoundedRequest
from .shapes import ApiError
from .keys import KeyRing, presented_key

STATIC = Path(__file__).with_name("static")

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
    transport took the answer before.

    twisted.web's HTTPChannel stops reading when the transport is full between requests, but
    goes on answering the requests it has already read: 64 KiB of pipelined requests from a
    client that reads nothing made the transport hold some 1,400 answers (60 MB of
    ``openapi.json``) until the idle timeout, and held the reactor for each.
    """

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
    root.putChild(b"api", ApiResource(broker, operations))
    root.putChild(b"metrics", MetricsResource(broker, operations))
    if broker.config.http_websocket:
        from ..websocket import WebSocketResource  # autobahn is imported only when used
        root.putChild(b"mqtt", WebSocketResource(broker))
    request_factory = type("AdminRequest", (BoundedRequest,), {"max_body": broker.config.http_max_body_size})
    # twisted.web parses a POST form body into args before any resource checks a key (1 MiB of it
    # held the reactor 300 ms): the API reads JSON only.
    site = AdminSite(root, requestFactory=request_factory, parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    return site


__all__ = ["AdminChannel", "AdminSite", "MetricsResource", "StaticFiles", "make_site"]

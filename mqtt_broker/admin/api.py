"""The admin HTTP API: JSON under ``/api/v1``, described by ``openapi.json`` beside this file.

One table, :data:`ROUTES`, says which method and path template goes to which handler, and whether
it needs a key. Templates name path parameters ``{name}`` (one segment, percent-decoded) and
``{name+}`` (the rest of the path, for topic names and filters, which contain ``/``: encode ``#``
as ``%23``). Answers are JSON; an error is ``{"error": "..."}`` with 400 (bad input, including a
malformed or oversized body), 401 (no key), 403 (a key that is not ours), 404, 405, 501, or 503
(a change while the broker is stopped, a publish before it started, one the store cannot write;
a cluster node's Redis that did not answer in time). Every change (POST, DELETE) is logged with
the id of the key that made it. A change to what the store keeps (a QoS 1/2 or retained publish,
a stored session's subscriptions, a retained message's delete) is answered once the store holds
it, as a client's PUBACK or SUBACK is. Query parameters are percent-decoded as a URI's, not a
form's: ``?filter=a/+`` is the filter ``a/+``.

``/cluster/...`` read Redis, which holds what the cluster as a whole knows; a broker that is not a
node of a cluster answers them 404.

``/bridges`` lists the broker's bridges (none: an empty list), each with its settings and its
figures; ``POST /bridges/{name}/restart`` drops a bridge's links and connects again at once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import heapq
import json
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import unquote

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..connecting import tally
from ..history import REPLAY_PREFIX
from ..logged import shortened
from ..stats import once_per_thousand
from ..store import StoreError
from ..topics import Subscription, has_wildcard, reserved, split_shared, valid_topic_filter, valid_topic_name
from ..wire.codec import MAX_REMAINING_LENGTH
from ..wire.codes import ReasonCode
from . import figures
from .shapes import (
    MAX_LIMIT, ApiError, body_field, body_qos, bridge_json, client_json, int_arg, message_json, page, paging,
    redacted, str_arg, subscription_json, topic_tree,
)
from .keys import KeyRing, presented_key

log = Logger()

PREFIX = "/api/v1"
OPENAPI = Path(__file__).with_name("openapi.json")
REDIS_TIMEOUT = 5.0
"""Seconds a cluster endpoint waits for Redis (which may be away: its commands then wait for it)
before answering 503."""
EXPIRED_LOOKED_AT_PER_PAGE = 5000
"""Of the retained messages whose expiry passed since it was last looked for (by a page, or the
sweep), at most this many a page looks at and leaves out of its ``total``; the rest stay counted
until a later page or the sweep (within a minute) has looked at them."""


class BoundedRequest(Request):
    """A request whose body is kept only up to ``max_body`` bytes; past that it is discarded as
    it arrives and ``body_too_large`` is set (the API then answers 400). With ``keys``, the body
    of a request that carries none of them is discarded too (``keyless``): every path that reads
    a body needs a key, and the API answers such a request 401 or 403 without reading it."""

    max_body = 1 << 20
    keys: KeyRing | None = None
    body_too_large = False
    keyless = False
    key_id: str | None = None
    """The id of the key in ``keys`` that a request with a body carries, once its headers are in
    (the API takes it then instead of hashing the key again)."""

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self.max_body:
            self.body_too_large = True
        elif length != 0 and self.keys is not None:
            # Looked at as soon as the headers are in: else anyone who reaches the port has a
            # body of up to max_body held for as long as they take to send it.
            presented = presented_key(self)
            self.key_id = None if presented is None else self.keys.identify(presented)
            self.keyless = self.key_id is None

    def handleContentChunk(self, data: bytes) -> None:
        content = self.content
        if self.body_too_large or self.keyless or content is None:
            return
        if content.tell() + len(data) > self.max_body:
            self.body_too_large = True
            self.content = BytesIO()
            return
        content.write(data)


def _body_too_large(request: Request, limit: int) -> bool:
    """Whether the request's body is over ``limit``: as a ``BoundedRequest`` found as it came,
    or, mounted in another site's tree (whose requests keep whole bodies), by its size."""
    if isinstance(request, BoundedRequest):
        return request.body_too_large
    content = getattr(request, "content", None)  # (twisted.web's DummyRequest has none)
    if content is None:
        return False
    size = content.seek(0, 2)
    content.seek(0)
    return size > limit


def _topic_name(topic: str) -> str:
    """``topic``, if a PUBLISH could carry it (else 400)."""
    if not valid_topic_name(topic) or "\x00" in topic:
        raise ApiError(400, f"invalid topic name {topic!r}")
    return topic


def _topic_filter(topic_filter: str) -> str:
    """``topic_filter``, if a SUBSCRIBE could carry it (else 400)."""
    if not valid_topic_filter(topic_filter) or "\x00" in topic_filter:
        raise ApiError(400, f"invalid topic filter {topic_filter!r}")
    return topic_filter


# --- the resource --------------------------------------------------------------------------

Handler = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Handler
    """Called as ``handler(resource, request, key_id, **path_parameters)``; returns (status, body)
    or a Deferred of it, or raises ApiError."""
    public: bool = False
    """Answered without a key (probes and the API description)."""

    def match(self, segments: list[str]) -> dict[str, str] | None:
        parts = self.template.strip("/").split("/")
        params: dict[str, str] = {}
        for index, part in enumerate(parts):
            if part.endswith("+}"):
                rest = segments[index:]
                if not rest or rest == [""]:
                    return None
                params[part[1:-2]] = unquote("/".join(rest), errors="strict")
                return params
            if index >= len(segments):
                return None
            if part.startswith("{"):
                if not segments[index]:
                    return None
                params[part[1:-1]] = unquote(segments[index], errors="strict")
            elif part != segments[index]:
                return None
        return params if len(segments) == len(parts) else None




def _below_mount(request: Request) -> str:
    """The request's path from ``/api`` on, read as UTF-8: the site may be mounted in an
    embedder's own tree, below a path of theirs (``prepath`` ends with this resource's ``api``;
    it is empty for a request rendered here directly)."""
    below = request.path.split(b"/")[max(len(request.prepath or ()), 1) + 1:]
    try:
        return "/".join(["/api", *(segment.decode("utf-8") for segment in below)])
    except UnicodeDecodeError:
        raise ApiError(400, "path is not UTF-8 once percent-decoded") from None


class ApiResource(Resource):
    """``/api`` of the admin site; everything below it is dispatched through :data:`ROUTES`."""

    isLeaf = True

    def __init__(self, broker: Any, operations: Any) -> None:
        super().__init__()
        self.broker = broker
        self.operations = operations
        self.keys = KeyRing(broker.config.http_api_keys)
        self._refused_without_key = 0
        """POSTs and DELETEs refused before a key was taken: what their throttled line counts."""

    def render(self, request: Request) -> Any:
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        key_id: str | None = None
        try:
            path = _below_mount(request)
            if not (path == PREFIX or path.startswith(PREFIX + "/")):
                raise ApiError(404, f"no such API path {path!r}; the API is under {PREFIX}")
            segments = path[len(PREFIX) + 1:].split("/")
            route, params = self._route(method, segments, request)
            if not route.public:
                key_id = self._authenticate(request)
            if _body_too_large(request, self.broker.config.http_max_body_size):
                raise ApiError(400, f"request body larger than http_max_body_size "
                               f"({self.broker.config.http_max_body_size} bytes)")
            if route.method != "GET" and self.broker.stopped:  # (its store is closed)
                raise ApiError(503, "the broker is stopped")
            result = maybeDeferred(route.handler, self, request, key_id, **params)
        except ApiError as error:
            return self._answer(request, error.status, {"error": error.message}, key_id)
        done: list[bytes] = []

        def answered(body: bytes) -> bytes:
            done.append(body)
            return body
        result.addCallback(lambda answer: self._answer(request, answer[0], answer[1], key_id))
        result.addErrback(self._failed, request, key_id)
        result.addCallback(answered)
        if done:  # answered at once, as nearly every handler does
            return done[0]
        result.addCallback(self._finish, request)
        return NOT_DONE_YET

    def _route(self, method: str, segments: list[str], request: Request) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in ROUTES:
            try:
                params = route.match(segments)
            except UnicodeDecodeError:
                raise ApiError(400, "path is not UTF-8 once percent-decoded") from None
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.append(route.method)
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(set(allowed))).encode())
            raise ApiError(405, f"{method} is not allowed here (allowed: {', '.join(sorted(set(allowed)))})")
        raise ApiError(404, "no such API path")

    def _authenticate(self, request: Request) -> str:
        if isinstance(request, BoundedRequest) and request.key_id is not None and request.keys is self.keys:
            return request.key_id
        presented = presented_key(request)
        if presented is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="mqtt_broker admin"')
            if not self.keys.keys:
                raise ApiError(401, "an API key is needed, and no API key is configured (http_api_keys; make one "
                                    "with python -m mqtt_broker.admin.keys NAME)")
            raise ApiError(401, "an API key is needed: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        key_id = self.keys.identify(presented)
        if key_id is None:
            raise ApiError(403, "this API key is not accepted" if self.keys.keys else
                           "this API key is not accepted: no API key is configured (http_api_keys)")
        return key_id

    def _answer(self, request: Request, status: int, body: Any, key_id: str | None) -> bytes:
        if request.method in (b"POST", b"DELETE") and status >= 400:  # changes made are logged by their handlers
            if key_id is not None:
                log.info("admin API: {method!r} {path!r} by key {key} refused: {status}",
                         method=request.method.decode(), path=shortened(request.path.decode("latin-1")), key=key_id,
                         status=status)
            else:
                # Refused before a key was taken (for it, or before it is looked at: a 404, a
                # 405): anyone who reaches the port may send them by the thousand a second.
                self._refused_without_key += 1
                if once_per_thousand(self._refused_without_key):
                    log.info("admin API: {method!r} {path!r} by key - refused: {status} ({refused} refused without "
                             "a key; logged once per thousand)", method=request.method.decode(),
                             path=shortened(request.path.decode("latin-1")), status=status,
                             refused=self._refused_without_key)
        request.setResponseCode(status)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")  # (an error echoes what the request said)
        if status == 204:
            return b""
        if isinstance(body, bytes):
            request.setHeader(b"content-type", b"application/json")
            return body
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    def _failed(self, failure: Failure, request: Request, key_id: str | None) -> bytes:
        if failure.check(ApiError):
            error: ApiError = failure.value  # type: ignore[assignment]
            return self._answer(request, error.status, {"error": error.message}, key_id)
        log.failure("admin API: {method!r} {path!r} failed", failure, method=request.method.decode(),
                    path=shortened(request.path.decode("latin-1")))
        return self._answer(request, 500, {"error": "internal error (see the broker's log)"}, key_id)

    def _finish(self, body: bytes, request: Request) -> None:
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(body)
            request.finish()

    def _body(self, request: Request) -> dict[str, Any]:
        # Mounted in another site's tree, the content is twisted.web's own: a temporary file for a
        # chunked body or one of 100,000 bytes or more, which has no getvalue().
        content = request.content
        raw = b""
        if content is not None:
            content.seek(0)
            raw = content.read()
        if not raw.strip():
            raise ApiError(400, "a JSON object is needed in the request body")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deep") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            # A lone surrogate ("\ud800") is JSON, and a Python str, but no UTF-8 can carry it:
            # a topic holding one would fail every encoding of every message to it.
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone surrogate (\\ud800-\\udfff), "
                                "which is not a character") from None
        return body

    def _once_stored(self, answer: tuple[int, Any], not_stored: str,
                     undo: Callable[[], None] | None = None) -> tuple[int, Any] | Deferred[tuple[int, Any]]:
        """``answer`` once the store holds what the request changed (at once without a store), as
        a client's PUBACK or SUBACK waits for it: an answer before would promise what a kill -9
        takes back. While the store cannot write, ``undo()`` and 503 ``not_stored``."""
        store = self.broker.store
        if store is None:
            return answer

        def failed(failure: Failure) -> tuple[int, Any]:
            failure.trap(StoreError)
            if undo is not None:
                undo()
            raise ApiError(503, f"{not_stored} ({failure.getErrorMessage()})")
        return store.flushed().addCallbacks(lambda _: answer, failed)

    def _session(self, client_id: str) -> Any:
        session = self.broker.sessions.get(client_id)
        if session is None:
            raise ApiError(404, f"no client or session {client_id!r}")
        if self.broker.moved_away(client_id):
            raise ApiError(404, f"the session of {client_id!r} is on another node now "
                                f"(/api/v1/cluster/clients/{{client_id}} says which)")
        return session

    # --- probes and description -------------------------------------------------------------

    def _health(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        return 200, {"status": "ok", "version": figures.VERSION, "uptime": self._uptime()}

    def _ready(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        broker = self.broker
        if not broker.running:
            return 503, {"ready": False, "reason": "the broker is not running"}
        if not broker.ports:
            return 503, {"ready": False, "reason": "the broker is not listening"}
        unready = broker.cluster.unready() if broker.cluster is not None else None
        if unready is not None:
            return 503, {"ready": False, "reason": unready}
        return 200, {"ready": True, "listening": len(broker.ports)}

    def _openapi(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        if self._openapi_bytes is None:
            self._openapi_bytes = OPENAPI.read_bytes()
        return 200, self._openapi_bytes

    _openapi_bytes: bytes | None = None

    def _uptime(self) -> float:
        started = self.operations.started_at
        return self.broker.clock.seconds() - started if started is not None else 0.0

    # --- figures ----------------------------------------------------------------------------

    def _stats(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        reading = figures.read(self.broker, self.operations.started_at, self.operations.inbox_lag)
        body = reading.as_json()
        body["version"] = figures.VERSION
        body["time"] = self.broker.clock.seconds()
        sys_topics = self.operations.sys
        body["load"] = dict(sys_topics.loads) if sys_topics is not None else {}
        return 200, body

    # --- clients ----------------------------------------------------------------------------

    def _list_clients(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        query = (str_arg(request, "q") or "").lower()
        connected = str_arg(request, "connected")
        if connected not in (None, "true", "false"):
            raise ApiError(400, "query parameter 'connected' must be true or false")
        version = str_arg(request, "protocol_version")
        if version not in (None, "3", "4", "5"):
            raise ApiError(400, "query parameter 'protocol_version' must be 3, 4 or 5")
        username = str_arg(request, "username")
        sessions, moved_away = self.broker.sessions, self.broker.moved_away
        items = []
        for client_id in sorted(sessions):
            session = sessions[client_id]
            if moved_away(client_id):
                continue
            connection = session.connection
            client = connection.client if connection is not None else None
            if connected is not None and (connection is not None) != (connected == "true"):
                continue
            if version is not None and (client is None or client.protocol_version != int(version)):
                continue
            if username is not None and (client is None or client.username != username):
                continue
            if query and not any(query in (text or "").lower() for text in (
                    client_id, client and client.username, client and client.peer)):
                continue
            items.append(session)
        return 200, page(request, items, client_json)

    def _get_client(self, request: Request, key_id: str | None, client_id: str) -> tuple[int, Any]:
        session = self._session(client_id)
        body = client_json(session)
        # Any client may hold 200,000 (2.5 s to render): the first page's worth; the rest are paged
        # by /clients/{id}/subscriptions, and subscription_count says how many there are.
        held = session.subscriptions
        body["subscriptions"] = [subscription_json(held[f]) for f in _in_order(held, 0, MAX_LIMIT)]
        return 200, body

    def _kick_client(self, request: Request, key_id: str | None, client_id: str) -> tuple[int, Any]:
        session = self._session(client_id)
        connection = session.connection
        if connection is None:
            raise ApiError(404, f"client {client_id!r} is not connected")
        log.info("admin API: key {key} disconnects client {client_id!r}", key=key_id, client_id=shortened(client_id))
        # MQTT 5 clients are told why: DISCONNECT 0x98 Administrative action.
        connection.drop(ReasonCode.ADMINISTRATIVE_ACTION, "disconnected by an administrator")
        return 200, {"disconnected": client_id}

    def _client_subscriptions(self, request: Request, key_id: str | None, client_id: str) -> tuple[int, Any]:
        held = self._session(client_id).subscriptions
        offset, limit = paging(request)
        return 200, {"total": len(held), "offset": offset, "limit": limit,
                     "items": [subscription_json(held[f]) for f in _in_order(held, offset, limit)]}

    def _subscribe_client(self, request: Request, key_id: str | None,
                          client_id: str) -> tuple[int, Any] | Deferred[tuple[int, Any]]:
        session = self._session(client_id)
        body = self._body(request)
        config = self.broker.config
        topic_filter = _topic_filter(body_field(body, "topic_filter", str))
        if topic_filter.startswith(REPLAY_PREFIX):  # (a SUBSCRIBE's way to ask for the message log)
            raise ApiError(400, f"{topic_filter!r}: a $replay/ filter is for a SUBSCRIBE; give the filter itself")
        group, _ = split_shared(topic_filter)
        if group is not None and not config.shared_subscription_available:
            raise ApiError(400, "shared subscriptions are turned off (shared_subscription_available)")
        if has_wildcard(topic_filter) and not config.wildcard_subscription_available:
            raise ApiError(400, "wildcard subscriptions are turned off (wildcard_subscription_available)")
        limit = config.max_subscriptions_per_client
        if limit and topic_filter not in session.subscriptions and len(session.subscriptions) >= limit:
            tally(self.broker.stats.subscriptions_refused, "max_subscriptions_per_client")  # (as a SUBSCRIBE's)
            raise ApiError(400, f"{client_id!r} holds max_subscriptions_per_client ({limit}) subscriptions")
        retain_handling = body_field(body, "retain_handling", int, 0)
        if retain_handling not in (0, 1, 2):
            raise ApiError(400, "'retain_handling' must be 0, 1 or 2")
        no_local = body_field(body, "no_local", bool, False)
        if no_local and group is not None:
            raise ApiError(400, "a shared subscription cannot have 'no_local' (MQTT-3.8.3-4)")
        retain_as_published = body_field(body, "retain_as_published", bool, False)
        connection = session.connection
        mqtt3 = connection is not None and connection.client.protocol_version < 5
        if mqtt3 and retain_handling:  # (its retained messages are sent it [MQTT-3.8.4-3 of 3.1.1])
            raise ApiError(400, f"{client_id!r} is an MQTT 3 client: 'retain_handling' is MQTT 5's")
        if connection is not None and connection.bridge:  # (as its own SUBSCRIBEs: see subscribing.py)
            no_local = retain_as_published = True
        elif (no_local or retain_as_published) and mqtt3:
            raise ApiError(400, f"{client_id!r} is an MQTT 3 client: 'no_local' and 'retain_as_published' are "
                                "MQTT 5's")
        subscription = Subscription(
            client_id=client_id, topic_filter=topic_filter, qos=body_qos(body, config.max_qos),
            no_local=no_local, retain_as_published=retain_as_published,
            retain_handling=retain_handling, share_group=group)
        log.info("admin API: key {key} subscribes {client_id!r} to {topic_filter!r}", key=key_id,
                 client_id=shortened(client_id), topic_filter=shortened(topic_filter))
        previous = session.subscriptions.get(topic_filter)
        existed = self.broker.subscribe(session, subscription)
        if session.connection is not None:  # (at once, as a SUBSCRIBE's: see subscribing.py)
            self.broker.send_retained(session, subscription, existed)
        answer = (200 if existed else 201), {"replaced": existed, "subscription": subscription_json(subscription)}
        if not session.stored:
            return answer

        def undo() -> None:
            # As a SUBSCRIBE the store could not write: what it replaced stands again, unless
            # the subscription changed since (that stands).
            if self.broker.sessions.get(client_id) is not session or (
                    session.subscriptions.get(topic_filter) is not subscription):
                return
            if previous is None:
                self.broker.unsubscribe(session, topic_filter)
            else:
                self.broker.subscribe(session, previous)
            tally(self.broker.stats.subscriptions_refused, ReasonCode.UNSPECIFIED_ERROR.name)
        return self._once_stored(answer, "the store cannot write the subscription: it is not made", undo)

    def _unsubscribe_client(self, request: Request, key_id: str | None, client_id: str,
                            topic_filter: str) -> tuple[int, Any] | Deferred[tuple[int, Any]]:
        session = self._session(client_id)
        if not self.broker.unsubscribe(session, _topic_filter(topic_filter)):
            raise ApiError(404, f"{client_id!r} has no subscription {topic_filter!r}")
        log.info("admin API: key {key} unsubscribes {client_id!r} from {topic_filter!r}", key=key_id,
                 client_id=shortened(client_id), topic_filter=shortened(topic_filter))
        if not session.stored:
            return 204, None
        return self._once_stored((204, None), "the subscription is removed, but the store cannot write that now "
                                              "(it does once it can)")

    # --- subscriptions, topics, retained messages -----------------------------------------------

    def _list_subscriptions(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        client_id = str_arg(request, "client_id")
        query = str_arg(request, "q")
        offset, limit = paging(request)
        sessions, moved_away = self.broker.sessions, self.broker.moved_away
        if client_id is None:
            clients = sorted(sessions)
        else:  # (the dashboard asks for its selected client's every 2 s)
            clients = [client_id] if client_id in sessions else []

        def count(held: dict[str, Subscription]) -> int:
            return len(held) if query is None else sum(query in topic_filter for topic_filter in held)
        # The tree holds what the sessions hold: counted through the sessions in the order they lie
        # in memory, then a page taken from their clients in order, each one's own filters sorted,
        # rather than every subscription walked and sorted for every page (500,000: 0.8 s).
        kept = sessions.items() if client_id is None else [(client, sessions[client]) for client in clients]
        total = sum(count(session.subscriptions) for client, session in kept if not moved_away(client))
        items: list[Subscription] = []
        skip = offset
        for client in clients:
            if len(items) == limit:
                break
            if moved_away(client):
                continue
            held = sessions[client].subscriptions
            matching = count(held)
            if skip >= matching:
                skip -= matching
                continue
            chosen = _in_order((f for f in held if query is None or query in f), skip, limit - len(items))
            items += [held[topic_filter] for topic_filter in chosen]
            skip = 0
        return 200, {"total": total, "offset": offset, "limit": limit,
                     "items": [subscription_json(subscription) for subscription in items]}

    def _topics(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        limit = int_arg(request, "limit", 1000, 1, 10_000)
        payload_max = min(int_arg(request, "payload_max", -1, 0), MAX_REMAINING_LENGTH)
        recent = list(self.broker.subscriptions.recent)[-limit:]
        retained = self.broker.retained
        names = set(recent)
        now = self.broker.clock.seconds()

        def kept(topic: str) -> bool:
            message = retained.get(topic)
            return message is not None and not message.expired(now)
        topics = [(t, True, kept(t)) for t in recent]
        room = limit - len(topics)
        if room > 0:
            topics += [(t, False, True) for t in retained.topics(room + len(names)) if t not in names and kept(t)][:room]
        # (With payload_max, each retained topic's message in the same answer: the dashboard's
        # tree showed none for a topic past the first page of /retained.)
        shown = None if payload_max < 0 else lambda topic: message_json(retained.get(topic), payload_max)
        return 200, {"count": len(topics), "tree": topic_tree(topics, shown)}

    def _list_retained(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        topic_filter = str_arg(request, "filter")
        retained = self.broker.retained
        now = self.broker.clock.seconds()  # (one expired is gone [MQTT-3.3.2-5], swept away or not yet)
        # (A page of a thousand payloads of 16 MiB each, encoded on the reactor thread, would stall it.)
        payload_max = min(int_arg(request, "payload_max", MAX_REMAINING_LENGTH, 0), MAX_REMAINING_LENGTH)
        render: Callable[[Any], Any] = lambda message: message_json(message, payload_max)
        if topic_filter is None:  # a page of what may be a million, walked to its end only
            return 200, page(request, (m for m in retained.in_order() if not m.expired(now)), render,
                             total=retained.live(now, EXPIRED_LOOKED_AT_PER_PAGE))
        if split_shared(_topic_filter(topic_filter))[0] is not None:
            raise ApiError(400, f"invalid topic filter {topic_filter!r}")
        messages = sorted((m for m in retained.matching(topic_filter) if not m.expired(now)),
                          key=lambda m: m.topic.split("/"))
        return 200, page(request, messages, render)

    def _get_retained(self, request: Request, key_id: str | None, topic: str) -> tuple[int, Any]:
        message = self.broker.retained.get(_topic_name(topic))
        if message is None or message.expired(self.broker.clock.seconds()):
            raise ApiError(404, f"no retained message on {topic!r}")
        return 200, message_json(message)

    def _delete_retained(self, request: Request, key_id: str | None,
                         topic: str) -> tuple[int, Any] | Deferred[tuple[int, Any]]:
        topic = _topic_name(topic)
        message = self.broker.retained.get(topic)
        expired = message is not None and message.expired(self.broker.clock.seconds())
        if not self.broker.delete_retained(topic) or expired:  # (an expired one goes all the same)
            raise ApiError(404, f"no retained message on {topic!r}")
        log.info("admin API: key {key} deletes the retained message of {topic!r}", key=key_id, topic=shortened(topic))
        return self._once_stored((204, None), "the retained message is deleted, but the store cannot write that now "
                                              "(it does once it can)")

    def _publish(self, request: Request, key_id: str | None) -> tuple[int, Any] | Deferred[tuple[int, Any]]:
        body = self._body(request)
        topic = _topic_name(body_field(body, "topic", str))
        if reserved(topic):  # (as a client's PUBLISH)
            raise ApiError(400, f"{topic!r} is reserved: $SYS topics are the broker's own, $share names shared "
                                "subscriptions")
        encoding = body_field(body, "payload_encoding", str, "utf-8")
        text = body_field(body, "payload", str, "")
        if encoding == "utf-8":
            payload = text.encode("utf-8")
        elif encoding == "base64":
            try:
                payload = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "'payload' is not valid base64") from None
        else:
            raise ApiError(400, "'payload_encoding' must be utf-8 or base64")
        qos = body_qos(body, self.broker.config.max_qos)
        retain = body_field(body, "retain", bool, False)
        if retain and not self.broker.config.retain_available:
            raise ApiError(400, "retained messages are turned off (retain_available)")
        log.info("admin API: key {key} publishes {size} bytes to {topic!r}", key=key_id, size=len(payload),
                 topic=shortened(topic))
        try:
            self.broker.route_own(topic, payload, qos=qos, retain=retain)
        except ValueError as e:  # (one too large for any PUBLISH, say)
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:  # (not started yet: mounted in a site of one's own, its store not open)
            raise ApiError(503, str(e)) from None
        answer = 200, {"topic": topic, "qos": qos, "retain": retain, "size": len(payload)}
        if not (qos or retain):  # (nothing of it is stored)
            return answer
        return self._once_stored(answer, "the message is routed, but the store cannot write it now (it does once "
                                         "it can)")

    # --- the cluster ------------------------------------------------------------------------------

    def _cluster(self) -> Any:
        """The cluster, to ask Redis something: 503 at once while the node knows Redis out of
        reach (a question would wait for REDIS_TIMEOUT, and on the connection after it)."""
        cluster = self.broker.cluster
        if cluster is None:
            raise ApiError(404, "this broker is not a node of a cluster (its cluster setting is empty)")
        unready = cluster.unready()
        if unready is not None:
            raise ApiError(503, unready)
        return cluster

    def _from_redis(self, asked: Deferred[Any]) -> Deferred[Any]:
        """``asked``'s result, or ApiError 503 if Redis has not answered within REDIS_TIMEOUT. The
        question itself is left to finish (cancelling a command queued on the Redis connection
        would disturb the pairing of its replies); a late answer is dropped."""
        from txredisapi import RedisError  # (a cluster's only: not imported without one)
        answer: Deferred[Any] = Deferred()

        def late() -> None:
            answer.errback(ApiError(503, f"Redis did not answer within {REDIS_TIMEOUT:g} seconds"))

        def came(result: Any) -> None:
            if timer.active():
                timer.cancel()
                if isinstance(result, Failure) and result.check(RedisError, ConnectionError):
                    # (the connection lost meanwhile, or Redis answered an error: loading, say)
                    answer.errback(ApiError(503, f"Redis did not answer: {result.getErrorMessage()}"))
                elif isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)
        timer = self.broker.clock.callLater(REDIS_TIMEOUT, late)
        asked.addBoth(came)
        return answer

    def _cluster_nodes(self, request: Request, key_id: str | None) -> Deferred[tuple[int, Any]]:
        cluster = self._cluster()
        return self._from_redis(cluster.store.describe_nodes()).addCallback(
            lambda nodes: (200, {"node": cluster.node, "nodes": nodes}))

    def _locate_client(self, request: Request, key_id: str | None, client_id: str) -> Deferred[tuple[int, Any]]:
        cluster = self._cluster()

        def located(owner: dict[str, Any] | None) -> tuple[int, Any]:
            if owner is None:
                raise ApiError(404, f"no node of the cluster holds a session for {client_id!r}")
            session = self.broker.sessions.get(client_id)
            return 200, {"client_id": client_id, "node": owner["node"], "epoch": owner["epoch"],
                         "connected_here": session is not None and session.connection is not None}
        return self._from_redis(cluster.store.locate(client_id)).addCallback(located)

    # --- bridges ---------------------------------------------------------------------------------

    def _bridge(self, name: str) -> Any:
        bridges = self.broker.bridges
        bridge = bridges.get(name) if bridges is not None else None
        if bridge is None:
            raise ApiError(404, f"no bridge {name!r}")
        return bridge

    def _list_bridges(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        bridges = self.broker.bridges
        return 200, [bridge_json(bridge) for bridge in bridges] if bridges is not None else []

    def _get_bridge(self, request: Request, key_id: str | None, name: str) -> tuple[int, Any]:
        return 200, bridge_json(self._bridge(name))

    def _restart_bridge(self, request: Request, key_id: str | None, name: str) -> tuple[int, Any]:
        bridge = self._bridge(name)
        if not bridge.running:  # (in a cluster, the node holding its lease runs it)
            raise ApiError(409, f"bridge {name!r} does not run on this node")
        log.info("admin API: key {key} restarts bridge {name}", key=key_id, name=name)
        bridge.restart()
        return 200, bridge_json(bridge)

    # --- configuration ------------------------------------------------------------------------

    def _get_config(self, request: Request, key_id: str | None) -> tuple[int, Any]:
        config = redacted(dataclasses.asdict(self.broker.config))
        config["http_api_keys"] = [key.key_id for key in self.keys.keys]  # never the hashes
        return 200, config

    def _reload_config(self, request: Request, key_id: str | None) -> Any:
        reload = getattr(self.broker, "reload", None)
        if reload is None:
            raise ApiError(501, "this broker cannot reload its configuration")
        log.info("admin API: key {key} reloads the configuration", key=key_id)

        def done(problems: list[str] | None) -> tuple[int, Any]:
            # (200 either way: what could be read again was; the rest stays as it was)
            return 200, {"reloaded": not problems, "problems": problems or []}
        result = maybeDeferred(reload)
        return result.addCallback(done)


def _in_order(filters: Iterable[str], offset: int, limit: int) -> list[str]:
    """The ``limit`` filters from ``offset`` on, in order, without sorting them all (a client
    may hold 200,000: the first 1,000 took 666 ms sorted)."""
    return heapq.nsmallest(offset + limit, filters)[offset:]


ROUTES = (
    Route("GET", "/health", ApiResource._health, public=True),
    Route("GET", "/ready", ApiResource._ready, public=True),
    Route("GET", "/openapi.json", ApiResource._openapi, public=True),
    Route("GET", "/stats", ApiResource._stats),
    Route("GET", "/clients", ApiResource._list_clients),
    Route("GET", "/clients/{client_id}", ApiResource._get_client),
    Route("DELETE", "/clients/{client_id}", ApiResource._kick_client),
    Route("GET", "/clients/{client_id}/subscriptions", ApiResource._client_subscriptions),
    Route("POST", "/clients/{client_id}/subscriptions", ApiResource._subscribe_client),
    Route("DELETE", "/clients/{client_id}/subscriptions/{topic_filter+}", ApiResource._unsubscribe_client),
    Route("GET", "/subscriptions", ApiResource._list_subscriptions),
    Route("GET", "/topics", ApiResource._topics),
    Route("GET", "/retained", ApiResource._list_retained),
    Route("GET", "/retained/{topic+}", ApiResource._get_retained),
    Route("DELETE", "/retained/{topic+}", ApiResource._delete_retained),
    Route("POST", "/publish", ApiResource._publish),
    Route("GET", "/config", ApiResource._get_config),
    Route("POST", "/config/reload", ApiResource._reload_config),
    Route("GET", "/cluster/nodes", ApiResource._cluster_nodes),
    Route("GET", "/cluster/clients/{client_id}", ApiResource._locate_client),
    Route("GET", "/bridges", ApiResource._list_bridges),
    Route("GET", "/bridges/{name}", ApiResource._get_bridge),
    Route("POST", "/bridges/{name}/restart", ApiResource._restart_bridge),
)


__all__ = ["ApiResource", "BoundedRequest", "ROUTES", "Route"]

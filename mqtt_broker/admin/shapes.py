"""What the admin API reads and answers: the JSON shapes of the broker's objects, and its checks
of a request's body and query parameters (each failing with an :class:`ApiError` that says what
is wrong)."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
from codecs import getincrementaldecoder
from urllib.parse import unquote_to_bytes
from typing import Any, Callable, Iterable

from ..config import url_without_password
from ..topics import Subscription
from . import figures

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class ApiError(Exception):
    """A request the API refuses: answered ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- the JSON shapes -------------------------------------------------------------------------

def client_json(session: Any) -> dict[str, Any]:
    connection = session.connection
    client = connection.client if connection is not None else None
    # Held back by a smaller Receive Maximum after a reconnection: queued, not in flight (as in /stats).
    held_back = [out for out in session.outgoing.values() if out.unsent] if session.unsent else []
    return {
        "client_id": session.client_id,
        "connected": connection is not None,
        "username": client.username if client else None,
        "peer": client.peer if client else None,
        "protocol_version": client.protocol_version if client else None,
        "keep_alive": client.keep_alive if client else None,
        "clean_start": client.clean_start if client else None,
        "session_expiry_interval": session.expiry,
        "subscription_count": len(session.subscriptions),
        "inflight": len(session.outgoing) - len(held_back),
        "queued": len(session.queue) + session.spilled + len(held_back),
        "queued_bytes": session.queued_bytes + sum(len(out.message.payload) for out in held_back),
        "dropped": session.dropped,
    }


def subscription_json(subscription: Subscription) -> dict[str, Any]:
    return dataclasses.asdict(subscription)


def bridge_json(bridge: Any) -> dict[str, Any]:
    """A bridge's settings (those an operator looks for; never credentials) and its figures."""
    config = bridge.config
    body = dataclasses.asdict(figures.bridge_figures(bridge))
    body.update(
        addresses=list(config.addresses), remote_client_id=config.remote_client_id,
        local_client_id=config.local_client_id, protocol=config.bridge_protocol_version,
        topics=[dataclasses.asdict(topic) for topic in config.topic])
    return body


def payload_json(payload: bytes) -> dict[str, Any]:
    try:
        return {"payload": payload.decode("utf-8"), "payload_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode("ascii"), "payload_encoding": "base64"}


def message_json(message: Any, payload_max: int | None = None) -> dict[str, Any]:
    """A message as JSON; with ``payload_max``, its payload's first bytes only (``size`` is the
    whole payload's), text not cut inside a character."""
    payload = message.payload
    if payload_max is None or len(payload) <= payload_max:
        shown = payload_json(payload)
    else:
        try:  # (an incremental decoder keeps back a character cut in two)
            shown = {"payload": getincrementaldecoder("utf-8")().decode(payload[:payload_max]),
                     "payload_encoding": "utf-8"}
        except UnicodeDecodeError:
            shown = payload_json(payload[:payload_max])
    return {"topic": message.topic, "qos": message.qos, "size": len(payload), **shown}


def topic_tree(topics: list[tuple[str, bool, bool]],
               message: Callable[[str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A tree of topic levels from (topic, seen lately, retained) triples; with ``message``, a
    retained topic's node holds what it gives for the topic."""
    root: dict[str, Any] = {"name": "", "topic": None, "recent": False, "retained": False, "children": {}}
    for topic, recent, retained in topics:
        node = root
        for level in topic.split("/"):
            children = node["children"]
            if level not in children:
                path = level if node is root else node["path"] + "/" + level
                children[level] = {"name": level, "path": path, "topic": None, "recent": False,
                                   "retained": False, "children": {}}
            node = children[level]
        node["topic"] = topic
        node["recent"] = node["recent"] or recent
        node["retained"] = node["retained"] or retained
        if retained and message is not None:
            node["message"] = message(topic)

    def finish(node: dict[str, Any]) -> dict[str, Any]:
        node.pop("path", None)
        node["children"] = [finish(child) for _, child in sorted(node["children"].items())]
        return node
    return finish(root)


# --- input ---------------------------------------------------------------------------------

def redacted(value: Any, key: str = "") -> Any:
    """Settings as the API shows them: without a password, of a setting of its own (a bridge's
    ``remote_password``) or in a URL (``cluster``, ``http_auth_url``)."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if isinstance(value, str) and value:
        return "********" if key.endswith("password") else url_without_password(value)
    return value


def body_field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise ApiError(400, f"{name!r} is missing")
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiError(400, f"{name!r} must be {names}, not {json.dumps(value)}")
    return value


def body_qos(body: dict[str, Any], maximum: int) -> int:
    qos = body_field(body, "qos", int, 0)
    if not 0 <= qos <= 2:
        raise ApiError(400, f"'qos' must be 0, 1 or 2, not {qos}")
    if qos > maximum:
        raise ApiError(400, f"'qos' {qos} is above the broker's max_qos {maximum}")
    return qos


def _query(request: Any, name: str) -> bytes | None:
    """A query parameter (its first value), percent-decoded as a URI's and not as a form's (as
    ``request.args`` has it): a "+" is a plus sign, which a topic filter holds (a space is %20)."""
    wanted = name.encode()
    for pair in request.uri.partition(b"?")[2].split(b"&"):
        key, _, value = pair.partition(b"=")
        if unquote_to_bytes(key) == wanted:
            return unquote_to_bytes(value)
    return None


def int_arg(request: Any, name: str, default: int, low: int, high: int | None = None) -> int:
    raw = _query(request, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be an integer") from None
    if value < low or (high is not None and value > high):
        raise ApiError(400, f"query parameter {name!r} must be at least {low}" if high is None
                       else f"query parameter {name!r} must be in {low}..{high}")
    return value


def str_arg(request: Any, name: str) -> str | None:
    """A query parameter; None if it is not given or empty (``?q=`` asks nothing)."""
    raw = _query(request, name)
    if not raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"query parameter {name!r} is not UTF-8") from None


def paging(request: Any) -> tuple[int, int]:
    """The offset and the limit of the page the request asks for."""
    return int_arg(request, "offset", 0, 0), int_arg(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)


def page(request: Any, items: Iterable[Any], render: Callable[[Any], Any], total: int | None = None) -> dict[str, Any]:
    """The page of ``items`` the request asks for, each made JSON by ``render``: only the page,
    as a list may hold a hundred thousand sessions. ``items`` may be an iterator (taken to the
    page's end only), with its ``total``."""
    offset, limit = paging(request)
    if total is None:
        items = list(items)
        total = len(items)
    start = min(offset, total)  # (islice takes no index past sys.maxsize; any offset is valid)
    return {"total": total, "offset": offset, "limit": limit,
            "items": [render(item) for item in itertools.islice(items, start, start + limit)]}


__all__ = ["MAX_LIMIT", "ApiError", "body_field", "body_qos", "bridge_json", "client_json", "int_arg", "message_json",
           "page", "paging", "payload_json", "redacted", "str_arg", "subscription_json", "topic_tree"]
